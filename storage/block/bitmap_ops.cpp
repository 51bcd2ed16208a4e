// The rules of the dirty bitmap commands (see bitmap_ops.h); the node's home iothread only.
#include "storage/block/bitmap_ops.h"

#include <bit>

#include "storage/block/node.h"

namespace blockd::block {

result<void> check_bitmap(const dirty_bitmap& b, unsigned need) {
  if ((need & need_not_busy) && b.busy)
    return fail("Bitmap '" + b.name() + "' is currently in use by another operation and cannot be used");
  if ((need & need_writable) && b.readonly) return fail("Bitmap '" + b.name() + "' is readonly and cannot be modified");
  if ((need & need_consistent) && b.inconsistent)
    return fail("Bitmap '" + b.name() + "' is inconsistent and cannot be used");
  return {};
}

result<dirty_bitmap*> find_bitmap(node& n, const std::string& name) {
  if (dirty_bitmap* b = n.bitmaps().find(name)) return b;
  return fail("Dirty bitmap '" + name + "' not found");
}

uint64_t default_granularity(const node& n) {
  int64_t cs = n.facts()->cluster_size;
  if (cs <= 0) return 65536;
  return uint64_t(std::clamp<int64_t>(cs, 4096, 65536));
}

result<dirty_bitmap*> add_bitmap(node& n, const bitmap_add_request& a, bool* added_now) {
  if (added_now) *added_now = false;
  uint64_t g = a.granularity ? *a.granularity : default_granularity(n);
  if (dirty_bitmap* have = a.exist_ok ? n.bitmaps().find(a.name) : nullptr) {
    if (have->granularity() == g && have->persistent == a.persistent && have->enabled == !a.disabled &&
        !have->inconsistent)
      return have;
    auto yes = [](bool v) { return std::string(v ? "true" : "false"); };
    return fail("Bitmap '" + a.name + "' already exists on node '" + n.name() + "' with other settings (granularity " +
                std::to_string(have->granularity()) + ", persistent " + yes(have->persistent) + ", recording " +
                yes(have->enabled) + ", inconsistent " + yes(have->inconsistent) +
                "); remove it first or ask for the same settings");
  }
  if (a.granularity && (g < bitmap_min_granularity || !std::has_single_bit(g)))
    return fail("Granularity must be power of 2 and at least 512");
  if (a.persistent) {
    if (!n.driver().stores_bitmaps()) return fail("Can't store persistent bitmaps to " + n.name() + ": Operation not supported");
    // A format that stores bitmaps names a taken name before its own limits (QEMU's qcow2 does).
    if (n.bitmaps().find(a.name)) return fail("Bitmap already exists: " + a.name);
    if (auto r = n.driver().can_store_bitmap(a.name, g); !r)
      return fail("Can't make bitmap '" + a.name + "' persistent in '" + n.name() + "': " + r.error().desc);
  }
  if (n.bitmaps().find(a.name)) return fail("Bitmap already exists: " + a.name);
  if (a.name.size() > bitmap_max_name) return fail("Bitmap name too long: " + a.name);
  auto b = std::make_shared<dirty_bitmap>(a.name, g, n.length());
  b->enabled = !a.disabled;
  b->persistent = a.persistent;
  dirty_bitmap& added = n.bitmaps().add(std::move(b));
  n.sync_bitmap_hook();
  if (added_now) *added_now = true;
  return &added;
}

std::shared_ptr<dirty_bitmap> release_bitmap(node& n, const std::string& name) {
  auto b = n.bitmaps().take(name);
  n.sync_bitmap_hook();
  return b;
}

result<dirty_bitmap*> prepare_remove(node& n, const std::string& name) {
  auto b = find_bitmap(n, name);
  if (!b) return b;
  if (auto r = check_bitmap(**b, need_not_busy | need_writable); !r) return fail(r.error().desc);
  if ((*b)->persistent)
    if (auto r = n.driver().remove_stored_bitmap(name); !r) return fail(r.error().desc);
  return b;
}

namespace {

std::shared_ptr<dirty_bitmap> shared_bitmap(const node& n, const std::string& name) {
  for (auto& b : n.bitmaps().all())
    if (b->name() == name) return b;
  return nullptr;
}

// QEMU's bdrv_is_writable: opened read-write and active.
bool node_writable(const node& n) { return !n.settings().read_only && n.settings().active; }

}  // namespace

result<std::vector<std::shared_ptr<dirty_bitmap>>> hold_export_bitmaps(const std::vector<export_bitmap_ref>& refs,
                                                                      bool readonly_export) {
  std::vector<std::shared_ptr<dirty_bitmap>> found;
  for (auto& r : refs) {
    std::shared_ptr<dirty_bitmap> b;
    if (!r.error.empty()) return fail(r.error);
    if (!r.owner) {
      const node* where = nullptr;
      for (const node* x : r.chain)
        if ((b = shared_bitmap(*x, r.name))) {
          where = x;
          break;
        }
      if (!b) return fail("Bitmap '" + r.name + "' is not found");
      // A read-only export would show a bitmap that changes under its clients (only for the plain
      // form, as in QEMU).
      if (readonly_export && node_writable(*where) && b->enabled)
        return fail("Enabled bitmap '" + r.name + "' incompatible with readonly export");
    } else {
      b = shared_bitmap(*r.owner, r.name);
      if (!b) return fail("Dirty bitmap '" + r.name + "' not found");
    }
    if (auto c = check_bitmap(*b, need_allow_ro); !c) return fail(c.error().desc);
    found.push_back(std::move(b));
  }
  // Marked in a second pass, so a failure above leaves nothing to undo; a bitmap listed twice is
  // held twice (QEMU accepts that too).
  for (auto& b : found) {
    ++b->export_users;
    b->busy = true;
  }
  return found;
}

void release_export_bitmaps(const std::vector<std::shared_ptr<dirty_bitmap>>& held) {
  for (auto& b : held)
    if (b->export_users > 0 && --b->export_users == 0) b->busy = false;
}

}  // namespace blockd::block

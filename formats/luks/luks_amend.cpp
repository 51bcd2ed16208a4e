// x-blockdev-amend for luks: add a key slot (state=active) or erase slots (state=inactive) with QEMU's safety rules and texts; the node's home iothread, node drained.
#include <cerrno>
#include <cstring>
#include <string>
#include <vector>

#include "formats/luks/luks_driver.h"
#include "storage/block/sync_io.h"

namespace blockd::luks {
namespace {

std::optional<std::string> opt_str(const boost::json::object& o, const char* k) {
  auto* v = o.if_contains(k);
  if (!v || !v->is_string()) return std::nullopt;
  return std::string(v->get_string());
}

result<void> write_all(block::sync_io& io, const header& h, size_t slot, const std::vector<uint8_t>* material,
                       uint64_t base) {
  if (material) {
    if (int rc = io.write(material->data(), int64_t(material->size()),
                          int64_t(base) + int64_t(h.slots[slot].key_offset) * int64_t(sector));
        rc < 0)
      return fail(std::string("Cannot write key slot ") + std::to_string(slot) + ": " + std::strerror(-rc));
  }
  if (auto r = write_header(io, h, base); !r) return r;
  if (int rc = io.flush(); rc < 0) return fail(std::string("Cannot flush LUKS header: ") + std::strerror(-rc));
  return {};
}

// Overwrites a slot's key material with random bytes, then marks the slot inactive in the header.
result<void> erase_slot(block::sync_io& io, header& h, size_t i, uint64_t base) {
  std::vector<uint8_t> junk(h.slot_material_bytes());
  random_bytes(junk.data(), junk.size());
  h.slots[i].active = slot_inactive;
  h.slots[i].iterations = 0;
  h.slots[i].salt.fill(0);
  return write_all(io, h, i, &junk, base);
}

size_t active_count(const header& h) {
  size_t n = 0;
  for (auto& s : h.slots) n += s.active == slot_active;
  return n;
}

}  // namespace

result<void> amend_luks(header& h, block::sync_io& io, const boost::json::object& o, bool force,
                        const block::object_refs& objects, const std::string& open_secret, uint64_t base) {
  std::string state = opt_str(o, "state").value_or("active");
  auto new_secret = opt_str(o, "new-secret");
  auto old_secret = opt_str(o, "old-secret");
  auto unlock_secret = opt_str(o, "secret");
  std::optional<int64_t> keyslot;
  if (auto* v = o.if_contains("keyslot"); v && v->is_int64()) keyslot = v->get_int64();
  int64_t iter_time = 2000;
  if (auto* v = o.if_contains("iter-time"); v && v->is_int64()) iter_time = v->get_int64();
  auto read_at = [&](uint64_t off, size_t len, uint8_t* buf) { return io.read(buf, int64_t(len), int64_t(base + off)); };
  auto bad_slot = [](int64_t k) {
    return fail("Invalid keyslot " + std::to_string(k) + " specified, must be between 0 and " +
                std::to_string(num_slots - 1));
  };

  if (state == "active") {
    if (old_secret) return fail("'old-secret' must not be given when activating keyslots");
    if (!new_secret) return fail("'new-secret' is required to activate a keyslot");
    size_t slot = num_slots;
    if (keyslot) {
      if (*keyslot < 0 || *keyslot >= int64_t(num_slots)) return bad_slot(*keyslot);
      slot = size_t(*keyslot);
      if (h.slots[slot].active == slot_active && !force)
        return fail("Refusing to overwrite active keyslot " + std::to_string(slot) + " - please erase it first");
    } else {
      for (size_t i = 0; i < num_slots && slot == num_slots; ++i)
        if (h.slots[i].active != slot_active) slot = i;
      if (slot == num_slots) return fail("Can't add a keyslot - all keyslots are in use");
    }
    std::string pw = open_secret;
    if (unlock_secret) {
      auto s = objects.secret_bytes(*unlock_secret);
      if (!s) return std::unexpected(s.error());
      pw = *s;
    }
    auto master = unlock(h, pw, read_at);
    if (!master) return std::unexpected(master.error());
    auto ns = objects.secret_bytes(*new_secret);
    if (!ns) return std::unexpected(ns.error());
    if (iter_time <= 0) return fail("iter-time must be positive");
    uint64_t iters = pbkdf2_iters_for(h.hash, h.key_bytes, uint64_t(iter_time));
    header next = h;
    auto material = make_slot(next, slot, *master, *ns, iters);
    if (auto r = write_all(io, next, slot, &material, base); !r) return r;
    h = next;
    return {};
  }

  // state == inactive
  if (new_secret) return fail("'new-secret' must not be given when erasing keyslots");
  if (!keyslot && !old_secret)
    return fail("To erase keyslot(s), either explicit keyslot index or the password currently contained in them must be given");
  std::optional<std::string> old_pw;
  if (old_secret) {
    auto s = objects.secret_bytes(*old_secret);
    if (!s) return std::unexpected(s.error());
    old_pw = *s;
  }
  if (keyslot) {
    if (*keyslot < 0 || *keyslot >= int64_t(num_slots)) return bad_slot(*keyslot);
    size_t slot = size_t(*keyslot);
    if (h.slots[slot].active != slot_active)
      return fail("Given keyslot " + std::to_string(slot) + " is already erased (inactive) ");
    if (old_pw) {
      auto k = try_slot(h, slot, *old_pw, read_at);
      if (!k) return std::unexpected(k.error());
      if (!*k)
        return fail("Given keyslot " + std::to_string(slot) + " doesn't contain the given old password for erase operation");
    }
    if (active_count(h) == 1 && !force)
      return fail("Attempt to erase the only active keyslot " + std::to_string(slot) +
                  " which will erase all the data in the image irreversibly - refusing operation");
    return erase_slot(io, h, slot, base);
  }
  std::vector<size_t> match;
  for (size_t i = 0; i < num_slots; ++i) {
    auto k = try_slot(h, i, *old_pw, read_at);
    if (!k) return std::unexpected(k.error());
    if (*k) match.push_back(i);
  }
  if (match.empty()) return fail("No keyslots match given (old) password for erase operation");
  if (match.size() == active_count(h) && !force)
    return fail("All the active keyslots match the (old) password that was given and erasing them will erase all "
                "the data in the image irreversibly - refusing operation");
  for (size_t i : match)
    if (auto r = erase_slot(io, h, i, base); !r) return r;
  return {};
}

}  // namespace blockd::luks

// The qcow2 driver's persistent dirty bitmaps: the directory read at open, bitmaps loaded into the node's set, the in-use marks, storing at close/inactivation/reopen to read-only, removal, and QEMU's limits; home iothread only.
//
// Crash safety follows the format's contract: while blockd may change a bitmap, its directory entry
// carries in_use on disk, so a killed daemon leaves it inconsistent (as QEMU does). Storing writes
// new data clusters and tables, then a new directory, makes their refcounts durable, and only then
// points the header at the new directory; the old clusters are freed after that. A crash in between
// leaks clusters at worst.
#include <bit>

#include <unordered_set>

#include "formats/qcow2/driver_impl.h"
#include "storage/block/bitmap_ops.h"

namespace blockd::qcow2 {
namespace impl {

namespace {
std::string errno_text(int r) { return std::strerror(-r); }
}  // namespace

// ---- the directory ------------------------------------------------------------------------------

// The bitmaps extension as the header holds it: replaced, added or removed in h_.extensions.
void qcow2_driver::set_bitmaps_header(const bitmaps_ext* e) {
  auto& x = h_.extensions;
  auto it = std::find_if(x.begin(), x.end(), [](const extension& v) { return v.type == ext_bitmaps; });
  if (!e) {
    if (it != x.end()) x.erase(it);
    h_.autoclear_features &= ~uint64_t(autoclear_bitmaps);
    return;
  }
  auto data = encode_bitmaps_ext(*e);
  if (it != x.end()) it->data = std::move(data);
  else x.push_back({ext_bitmaps, std::move(data)});
  h_.autoclear_features |= autoclear_bitmaps;
}

// Reads the directory and every bitmap table the extension names (load_metadata). Without the
// autoclear bit a program that does not know bitmaps wrote the image: they are all stale and the
// extension is dropped at the next read-write open (bitmaps_stale_), as QEMU does.
task<int> qcow2_driver::read_bitmap_directory(std::string& err) {
  stored_.clear();
  bm_ext_ = {};
  bitmaps_stale_ = false;
  const extension* x = nullptr;
  for (auto& e : h_.extensions)
    if (e.type == ext_bitmaps) x = &e;
  if (!x) co_return 0;
  if (!(h_.autoclear_features & autoclear_bitmaps)) {
    bitmaps_stale_ = true;
    co_return 0;
  }
  auto ext = parse_bitmaps_ext(x->data, cs_);
  if (!ext) co_return err = ext.error().desc, -EINVAL;
  uint64_t flen = uint64_t(std::max<int64_t>(file_->length(), 0));
  if (ext->directory_offset > flen || ext->directory_size > flen - ext->directory_offset)
    co_return err = "Bitmap directory lies beyond the end of the image file", -EINVAL;
  aligned_buf dir;
  int r = ext->directory_size ? co_await read_range(ext->directory_offset, ext->directory_size, dir) : 0;
  if (r < 0) co_return err = "Failed to read bitmap directory: " + errno_text(r), r;
  auto entries = parse_bitmap_directory(std::span<const uint8_t>(dir.get(), ext->directory_size), ext->nb_bitmaps,
                                        cs_, h_.size);
  if (!entries) co_return err = entries.error().desc, -EINVAL;
  // Tables are held in memory (to free and count their clusters): each lies in the file, so a
  // hostile directory cannot make blockd hold more than the file's size.
  uint64_t total = 0;
  std::vector<stored_bitmap> out;
  for (auto& e : *entries) {
    uint64_t bytes = uint64_t(e.table_size) * 8;
    if (e.table_offset > flen || bytes > flen - e.table_offset)
      co_return err = "Bitmap '" + e.name + "': its bitmap table lies beyond the end of the image file", -EINVAL;
    total += bytes;
    if (total > flen) co_return err = "Bitmap tables take more space than the image file holds", -EINVAL;
    aligned_buf t;
    r = co_await read_range(e.table_offset, bytes, t);
    if (r < 0)
      co_return err = "Could not read bitmap_table table from image for bitmap '" + e.name + "': " + errno_text(r), r;
    stored_bitmap s{e, decode_bitmap_table(std::span<const uint8_t>(t.get(), bytes))};
    for (uint64_t v : s.table) {
      uint64_t off = v & bitmap_entry_offset_mask;
      if (!bitmap_table_entry_ok(v, cs_) || !off) continue;
      // A data cluster past the end of the file cannot be real: the table is garbage.
      if (off > flen || cs_ > flen - off) {
        if (e.in_use()) continue;  // never read; its clusters are not trusted either (see clusters_of)
        co_return err = "Bitmap '" + e.name + "': a data cluster lies beyond the end of the image file", -EINVAL;
      }
    }
    out.push_back(std::move(s));
  }
  stored_ = std::move(out);
  bm_ext_ = *ext;
  co_return 0;
}

// Every cluster a stored bitmap holds (its table and its data), for freeing and for a refcount
// rebuild. Entries that are invalid or past the end of the file are not the bitmap's to give back.
// A hostile image may point a table or a data entry at live metadata, or name one cluster twice:
// such clusters are never given back (freeing them would free metadata, or underflow a refcount).
std::vector<std::pair<uint64_t, uint64_t>> qcow2_driver::clusters_of(const stored_bitmap& s) const {
  std::vector<std::pair<uint64_t, uint64_t>> out;
  uint64_t flen = uint64_t(std::max<int64_t>(file_->length(), 0));
  std::unordered_set<uint64_t> seen;
  std::string what;
  auto take = [&](uint64_t off, uint64_t len) {
    if (!len || overlaps_metadata(off, len, what)) return;
    for (uint64_t c = off / cs_; c < (off + len + cs_ - 1) / cs_; ++c)
      if (!seen.insert(c).second) return;
    out.emplace_back(off, len);
  };
  take(s.e.table_offset, (uint64_t(s.e.table_size) * 8 + cs_ - 1) / cs_ * cs_);
  for (uint64_t v : s.table) {
    uint64_t off = v & bitmap_entry_offset_mask;
    if (!off || !bitmap_table_entry_ok(v, cs_) || off > flen || cs_ > flen - off) continue;
    take(off, cs_);
  }
  return out;
}

void qcow2_driver::count_bitmap_clusters(const std::function<void(uint64_t, uint64_t)>& add) const {
  if (stored_.empty()) return;
  add(bm_ext_.directory_offset, bm_ext_.directory_size);
  for (auto& s : stored_)
    for (auto& [off, len] : clusters_of(s)) add(off, len);
}

// ---- loading ------------------------------------------------------------------------------------

// Makes an in-memory bitmap of every stored one (QEMU's rules): persistent, disabled unless `auto`,
// inconsistent (and disabled) when in_use says a writer died, read-only on a read-only node. A
// stored bitmap in use whose name the node already has is that bitmap (an inactivation kept it).
// All of them join the set together, or none does.
task<int> qcow2_driver::load_bitmaps(std::string& err) {
  std::vector<std::shared_ptr<dirty_bitmap>> made;
  auto data = make_buf(cs_);
  uint64_t per_cluster = cs_ * 8;  // granules one data cluster covers
  for (auto& s : stored_) {
    const bitmap_entry& e = s.e;
    bool taken = bitmaps_->find(e.name) != nullptr;
    for (auto& m : made) taken = taken || m->name() == e.name;
    if (taken) {
      if (e.in_use() && bitmaps_->find(e.name)) continue;
      co_return err = "Bitmap already exists: " + e.name, -EINVAL;
    }
    auto b = std::make_shared<dirty_bitmap>(e.name, e.granularity(), int64_t(h_.size));
    b->persistent = true;
    b->readonly = read_only_;
    if (e.in_use()) {
      b->inconsistent = true;
      b->enabled = false;
      made.push_back(std::move(b));
      continue;
    }
    b->enabled = e.is_auto();
    if (s.table.size() != bitmap_table_entries(h_.size, e.granularity_bits, cs_))
      co_return err = "Could not read bitmap '" + e.name + "' from image: Invalid argument", -EINVAL;
    for (uint64_t v : s.table)
      if (!bitmap_table_entry_ok(v, cs_))
        co_return err = "Could not read bitmap_table table from image for bitmap '" + e.name + "': Invalid argument",
                  -EINVAL;
    for (uint64_t i = 0; i < s.table.size(); ++i) {
      uint64_t first = i * per_cluster;
      if (first >= b->bits()) break;
      uint64_t n = std::min(per_cluster, b->bits() - first);
      uint64_t off = s.table[i] & bitmap_entry_offset_mask;
      if (!off) {
        if (s.table[i] & bitmap_entry_all_ones) b->fill(first, n, true);
        continue;
      }
      int r = co_await io(*file_, io_op::read, int64_t(off), int64_t(cs_)).buffer(data.get());
      if (r < 0) co_return err = "Could not read bitmap '" + e.name + "' from image: " + errno_text(r), r;
      b->load_bytes(first, data.get(), n);
    }
    made.push_back(std::move(b));
  }
  for (auto& b : made) bitmaps_->add(std::move(b));
  co_return 0;
}

// ---- writing the directory ----------------------------------------------------------------------

// Writes `next` as a new directory and points the header at it (or drops the extension when it is
// empty), then frees the old directory. meta_lock_ held. Refcounts of everything `next` names are
// durable before the header names it.
task<int> qcow2_driver::write_bitmap_directory(std::vector<stored_bitmap> next) {
  bitmaps_ext ne{};
  uint64_t dir_clusters = 0;
  if (!next.empty()) {
    std::vector<bitmap_entry> entries;
    for (auto& s : next) entries.push_back(s.e);
    auto bytes = encode_bitmap_directory(entries);
    dir_clusters = (bytes.size() + cs_ - 1) / cs_;
    uint64_t off = 0;
    bool fresh = false;
    int r = co_await alloc_clusters(dir_clusters, off, fresh);
    if (r < 0) co_return r;
    r = co_await guard_new_metadata(off, dir_clusters * cs_, "bitmap directory");
    if (r < 0) co_return r;
    auto buf = make_buf(dir_clusters * cs_);
    std::memcpy(buf.get(), bytes.data(), bytes.size());
    r = co_await io(*file_, io_op::write, int64_t(off), int64_t(dir_clusters * cs_)).buffer(buf.get());
    if (r < 0) co_return r;
    ne = {uint32_t(next.size()), bytes.size(), off};
  }
  int r = co_await write_blocks(*rc_cache_);
  if (r >= 0) r = co_await io(*file_, io_op::flush, 0, 0);
  if (r < 0) co_return r;
  header saved = h_;
  set_bitmaps_header(next.empty() ? nullptr : &ne);
  r = co_await write_header();
  if (r >= 0) r = co_await io(*file_, io_op::flush, 0, 0);
  if (r < 0) {
    h_ = std::move(saved);
    co_return r;
  }
  if (!stored_.empty() && bm_ext_.directory_size)
    queue_free(bm_ext_.directory_offset, (bm_ext_.directory_size + cs_ - 1) / cs_ * cs_);
  stored_ = std::move(next);
  bm_ext_ = ne;
  co_return 0;
}

// Rewrites the directory where it is, for flag changes only (in_use at a read-write open): the
// autoclear bit goes off first, so a crash halfway leaves bitmaps a reader ignores, never a
// half-written directory it trusts. meta_lock_ need not be held: nothing is allocated or freed.
task<int> qcow2_driver::rewrite_bitmap_flags(const std::vector<uint32_t>& flags) {
  h_.autoclear_features &= ~uint64_t(autoclear_bitmaps);
  int r = co_await write_header();
  if (r >= 0) r = co_await io(*file_, io_op::flush, 0, 0);
  if (r < 0) co_return r;
  std::vector<bitmap_entry> entries;
  for (size_t i = 0; i < stored_.size(); ++i) {
    entries.push_back(stored_[i].e);
    entries.back().flags = flags[i];
  }
  auto bytes = encode_bitmap_directory(entries);
  if (bytes.size() != bm_ext_.directory_size) co_return -EINVAL;
  // Whole alignment units: the directory's clusters are its own, so the padding is its to write.
  uint64_t a = std::max<uint64_t>(align_, 1);
  uint64_t len = (bytes.size() + a - 1) / a * a;
  len = std::min(len, (bytes.size() + cs_ - 1) / cs_ * cs_);
  auto buf = make_buf(len);
  std::memcpy(buf.get(), bytes.data(), bytes.size());
  r = co_await io(*file_, io_op::write, int64_t(bm_ext_.directory_offset), int64_t(len)).buffer(buf.get());
  if (r >= 0) r = co_await io(*file_, io_op::flush, 0, 0);
  if (r < 0) co_return r;
  for (size_t i = 0; i < stored_.size(); ++i) stored_[i].e.flags = flags[i];
  h_.autoclear_features |= autoclear_bitmaps;
  r = co_await write_header();
  if (r >= 0) r = co_await io(*file_, io_op::flush, 0, 0);
  co_return r;
}

// Every stored bitmap blockd now owns gets in_use on disk (a read-write open, a reopen to
// read-write, an activation), and its in-memory copy becomes writable.
task<int> qcow2_driver::mark_bitmaps_in_use() {
  std::vector<uint32_t> flags;
  bool change = false;
  for (auto& s : stored_) {
    uint32_t f = s.e.flags;
    dirty_bitmap* b = bitmaps_->find(s.e.name);
    if (b && !s.e.in_use()) {
      f |= bitmap_flag_in_use;
      change = true;
    }
    flags.push_back(f);
  }
  if (change) {
    int r = co_await rewrite_bitmap_flags(flags);
    if (r < 0) co_return r;
  }
  for (auto& s : stored_)
    if (dirty_bitmap* b = bitmaps_->find(s.e.name); b && b->persistent) b->readonly = false;
  co_return 0;
}

// ---- storing ------------------------------------------------------------------------------------

// The cluster just allocated for bitmap metadata must not be metadata already (a lying refcount).
task<int> qcow2_driver::guard_new_metadata(uint64_t off, uint64_t len, const char* what) {
  std::string hit;
  if (!overlaps_metadata(off, len, hit)) co_return 0;
  signal_corruption("Preventing invalid allocation of " + std::string(what) + " at offset " + std::to_string(off) +
                        " (overlaps with " + hit + ")",
                    int64_t(off), int64_t(len));
  co_return -EIO;
}

// Writes one bitmap's data clusters (all-zero ranges get no cluster, all-ones ranges the all-ones
// entry) and its table; fills s.e.table_* and s.table. meta_lock_ held.
task<int> qcow2_driver::write_bitmap(const dirty_bitmap& b, stored_bitmap& s) {
  uint64_t per_cluster = cs_ * 8;
  uint64_t n = bitmap_table_entries(h_.size, s.e.granularity_bits, cs_);
  if (n == 0) co_return -EINVAL;  // an empty disk: a directory entry needs a table (QEMU fails too)
  // Entries go straight into s.table, so a failure part way gives back what was allocated so far.
  s.table.assign(n, 0);
  std::vector<uint64_t>& table = s.table;
  auto buf = make_buf(cs_);
  int64_t gran = int64_t(b.granularity());
  for (int64_t off = b.next_dirty(0); off >= 0;) {
    uint64_t i = (uint64_t(off) / uint64_t(gran)) / per_cluster;
    if (i >= n) break;
    uint64_t first = i * per_cluster;
    uint64_t count = std::min(per_cluster, b.bits() - first);
    int64_t start = int64_t(first) * gran, end = std::min<int64_t>(int64_t(first + count) * gran, b.size());
    bool dirty = false;
    if (b.run_end(start, end, dirty) == end && dirty) {
      table[i] = bitmap_entry_all_ones;
    } else {
      uint64_t host = 0;
      bool fresh = false;
      int r = co_await alloc_clusters(1, host, fresh);
      if (r < 0) co_return r;
      r = co_await guard_new_metadata(host, cs_, "bitmap data");
      if (r < 0) co_return r;  // a cluster on live metadata is never recorded, so never freed
      table[i] = host;  // now the bitmap's: freed with it if a later step fails
      auto bytes = b.to_bytes(first, count);
      std::memset(buf.get(), 0, cs_);
      std::memcpy(buf.get(), bytes.data(), bytes.size());
      r = co_await io(*file_, io_op::write, int64_t(host), int64_t(cs_)).buffer(buf.get());
      if (r < 0) co_return r;
    }
    off = end >= b.size() ? -1 : b.next_dirty(end);
  }
  uint64_t clusters = (n * 8 + cs_ - 1) / cs_;
  uint64_t toff = 0;
  bool fresh = false;
  int r = co_await alloc_clusters(clusters, toff, fresh);
  if (r < 0) co_return r;
  // A table the guard refuses lies on live metadata: it is not recorded, so nothing frees it.
  r = co_await guard_new_metadata(toff, clusters * cs_, "bitmap table");
  if (r < 0) co_return r;
  s.e.table_offset = toff;
  s.e.table_size = uint32_t(n);
  auto tbytes = encode_bitmap_table(table);
  auto tbuf = make_buf(clusters * cs_);
  std::memcpy(tbuf.get(), tbytes.data(), tbytes.size());
  co_return co_await io(*file_, io_op::write, int64_t(toff), int64_t(clusters * cs_)).buffer(tbuf.get());
}

result<void> qcow2_driver::check_bitmap_constraints(const std::string& name, uint64_t granularity) const {
  unsigned bits = unsigned(std::countr_zero(granularity));
  if (bits > max_bitmap_granularity_bits)
    return fail("Granularity exceeds maximum (" + std::to_string(1ull << max_bitmap_granularity_bits) + " bytes)");
  if (bits < min_bitmap_granularity_bits)
    return fail("Granularity is under minimum (" + std::to_string(1ull << min_bitmap_granularity_bits) + " bytes)");
  uint64_t bytes = ((h_.size + granularity - 1) / granularity + 7) / 8;
  if (bytes > max_bitmap_phys_size || bytes > uint64_t(max_bitmap_table_size) * cs_)
    return fail("Too much space will be occupied by the bitmap. Use larger granularity");
  if (name.size() > max_bitmap_name_size)
    return fail("Name length exceeds maximum (" + std::to_string(max_bitmap_name_size) + " characters)");
  return {};
}

// QEMU's qcow2_store_persistent_dirty_bitmaps: every persistent bitmap that is consistent, writable
// and not being removed goes to the image; the stored ones nobody changed (inconsistent ones, or
// read-only copies) stay as they are. `release` (inactivation) then takes the stored bitmaps out of
// the node: the image holds them now, and activation loads them again.
task<int> qcow2_driver::store_bitmaps(bool release, std::string& err) {
  std::vector<stored_bitmap> next = stored_;
  std::vector<stored_bitmap> drop;  // old copies of rewritten bitmaps
  std::vector<std::pair<size_t, dirty_bitmap*>> writes;
  for (auto& bp : bitmaps_->all()) {
    dirty_bitmap& b = *bp;
    if (!b.persistent || b.inconsistent || b.skip_store || b.readonly) continue;
    if (b.size() != int64_t(h_.size)) b.resize(int64_t(h_.size));
    if (auto c = check_bitmap_constraints(b.name(), b.granularity()); !c)
      co_return err = "Bitmap '" + b.name() + "' doesn't satisfy the constraints: " + c.error().desc, -EINVAL;
    auto it = std::find_if(next.begin(), next.end(), [&](const stored_bitmap& s) { return s.e.name == b.name(); });
    if (it == next.end()) {
      if (next.size() + 1 > max_bitmaps) co_return err = "Too many persistent bitmaps", -EINVAL;
      uint64_t dir = 0;
      for (auto& s : next) dir += bitmap_entry_size(s.e.name.size());
      if (dir + bitmap_entry_size(b.name().size()) > max_bitmap_directory_size)
        co_return err = "Bitmap directory is too large", -EINVAL;
      next.push_back({});
      next.back().e.name = b.name();
      it = std::prev(next.end());
    } else {
      if (!it->e.in_use()) co_return err = "Bitmap '" + b.name() + "' already exists in the image", -EINVAL;
      drop.push_back(*it);
    }
    it->e.flags = b.enabled ? bitmap_flag_auto : 0;
    it->e.granularity_bits = uint8_t(std::countr_zero(b.granularity()));
    it->e.table_offset = 0;
    it->e.table_size = 0;
    it->table.clear();
    writes.emplace_back(size_t(it - next.begin()), &b);
  }
  if (!writes.empty()) {
    if (read_only_) co_return err = "No write access", -EPERM;
    co_await meta_lock_.lock();
    co::guard g{meta_lock_};
    int r = 0;
    for (auto& [i, b] : writes) {
      r = co_await write_bitmap(*b, next[i]);
      if (r < 0) break;
    }
    if (r >= 0) r = co_await write_bitmap_directory(next);
    if (r < 0) {
      // What this attempt allocated goes back; the image keeps its old directory.
      for (auto& [i, b] : writes)
        if (next[i].e.table_size) {
          for (auto& [off, len] : clusters_of(next[i])) queue_free(off, len);
        } else {
          for (uint64_t v : next[i].table)
            if (v & bitmap_entry_offset_mask) queue_free(v & bitmap_entry_offset_mask, cs_);
        }
      (void)co_await writeback();
      co_return err = "Failed to update bitmap extension: " + errno_text(r), r;
    }
    for (auto& s : drop)
      for (auto& [off, len] : clusters_of(s)) queue_free(off, len);
    r = co_await writeback();
    if (r >= 0) r = co_await writeback();
    if (r < 0) co_return err = "Could not free the old bitmap clusters: " + errno_text(r), r;
  }
  if (release)
    for (auto& s : stored_)
      if (dirty_bitmap* b = bitmaps_->find(s.e.name); b && b->persistent && !b->inconsistent) bitmaps_->take(s.e.name);
  co_return 0;
}

// ---- block_driver hooks -------------------------------------------------------------------------

result<void> qcow2_driver::can_store_bitmap(const std::string& name, uint64_t granularity) {
  if (h_.version < 3) return fail("Cannot store dirty bitmaps in qcow2 v2 files");
  if (auto c = check_bitmap_constraints(name, granularity); !c) return c;
  uint64_t count = 1, dir = bitmap_entry_size(name.size());
  for (auto& b : bitmaps_->all())
    if (b->persistent) {
      ++count;
      dir += bitmap_entry_size(b->name().size());
    }
  if (count > max_bitmaps) return fail("Maximum number of persistent bitmaps is already reached");
  if (dir > max_bitmap_directory_size) return fail("Not enough space in the bitmap directory");
  return {};
}

result<void> qcow2_driver::remove_stored_bitmap(const std::string& name) {
  auto it = std::find_if(stored_.begin(), stored_.end(), [&](const stored_bitmap& s) { return s.e.name == name; });
  if (it == stored_.end()) return {};
  if (read_only_ || corrupt_) return fail("Failed to update bitmap extension: Read-only file system");
  stored_bitmap gone = *it;
  auto next = stored_;
  next.erase(next.begin() + (it - stored_.begin()));
  int r = run_sync([](qcow2_driver* d, std::vector<stored_bitmap> next, stored_bitmap gone) -> task<int> {
    co_await d->meta_lock_.lock();
    co::guard g{d->meta_lock_};
    int rc = co_await d->write_bitmap_directory(std::move(next));
    if (rc < 0) co_return rc;
    // The directory forgets it first (durable now); only then do its clusters go.
    for (auto& [off, len] : d->clusters_of(gone)) d->queue_free(off, len);
    rc = co_await d->writeback();
    if (rc >= 0) rc = co_await d->writeback();
    if (rc >= 0) rc = co_await d->io(*d->file_, io_op::flush, 0, 0);
    co_return rc;
  }(this, std::move(next), std::move(gone)));
  if (r < 0) return fail("Failed to update bitmap extension: " + errno_text(r));
  return {};
}

// block_resize: QEMU resizes the bitmaps in memory and stores them later, so every stored bitmap
// must be loaded and usable.
result<void> qcow2_driver::check_bitmaps_resizable() const {
  for (auto& s : stored_) {
    dirty_bitmap* b = bitmaps_->find(s.e.name);
    if (!b) return fail("Cannot resize qcow2 with persistent bitmaps that were not loaded into memory");
    if (auto r = check_bitmap(*b, need_default); !r) return r;
  }
  return {};
}

boost::json::array qcow2_driver::bitmap_info() const {
  boost::json::array out;
  for (auto& s : stored_) {
    boost::json::array flags;
    for (auto& f : bitmap_flag_names(s.e.flags)) flags.push_back(boost::json::string(f));
    out.push_back(boost::json::object{{"flags", std::move(flags)}, {"name", s.e.name}, {"granularity", s.e.granularity()}});
  }
  return out;
}

}  // namespace impl
}  // namespace blockd::qcow2

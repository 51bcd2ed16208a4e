// The qcow2 driver's internal snapshots: creating and deleting them, the snapshot table, COPIED flags (entry encoding: snapshot_table.cpp); home iothread only.
#include "formats/qcow2/driver_impl.h"

namespace blockd::qcow2 {
namespace impl {

// ---- internal snapshots -------------------------------------------------------------------------

// Writes `next` as the snapshot table in new clusters, then points the header at it; the old table
// is freed afterwards (a crash in between leaks it, nothing worse).
task<int> qcow2_driver::write_snapshot_table(std::vector<snapshot> next) {
  auto bytes = serialize_snapshots(next);
  uint64_t off = 0, clusters = (bytes.size() + cs_ - 1) / cs_;
  if (!next.empty()) {
    bool fresh = false;
    int r = co_await alloc_clusters(clusters, off, fresh);
    if (r < 0) co_return r;
    auto buf = make_buf(clusters * cs_);
    std::memcpy(buf.get(), bytes.data(), bytes.size());
    r = co_await write_blocks(*rc_cache_);
    if (r >= 0) r = co_await io(*file_, io_op::flush, 0, 0);
    if (r >= 0) r = co_await io(*file_, io_op::write, int64_t(off), int64_t(clusters * cs_)).buffer(buf.get());
    if (r >= 0) r = co_await io(*file_, io_op::flush, 0, 0);
    if (r < 0) co_return r;
  }
  uint64_t old_off = h_.snapshots_offset;
  uint64_t old_clusters = (serialize_snapshots(snapshots_).size() + cs_ - 1) / cs_;
  uint32_t old_n = h_.nb_snapshots;
  h_.snapshots_offset = off;
  h_.nb_snapshots = uint32_t(next.size());
  int r = co_await write_header();
  if (r >= 0) r = co_await io(*file_, io_op::flush, 0, 0);
  if (r < 0) {
    h_.snapshots_offset = old_off;
    h_.nb_snapshots = old_n;
    co_return r;
  }
  if (old_n && old_off) queue_free(old_off, old_clusters * cs_);
  snapshots_ = std::move(next);
  snapshot_table_bytes_ = bytes.size();
  co_return 0;
}

// Makes every COPIED flag of the active tables say whether the refcount is exactly one.
task<int> qcow2_driver::sync_copied_flags() {
  bool l1_changed = false;
  auto table = make_buf(cs_);
  for (uint64_t i = 0; i < l1_.size(); ++i) {
    uint64_t l2 = l1_[i] & offset_mask;
    if (!l2) continue;
    uint64_t rc = 0;
    int r = co_await get_refcount(l2 / cs_, rc);
    if (r < 0) co_return r;
    uint64_t want = l2 | (rc == 1 ? entry_copied : 0);
    if (want != l1_[i]) {
      l1_[i] = want;
      l1_changed = true;
    }
    r = co_await io(*file_, io_op::read, int64_t(l2), int64_t(cs_)).buffer(table.get());
    if (r < 0) co_return r;
    bool changed = false;
    for (uint64_t j = 0; j < h_.l2_entries(); ++j) {
      uint8_t* p = table.get() + j * h_.l2_entry_size();
      l2_words w{be64(p), 0};
      if (!has_host(w) || h_.has_data_file()) continue;
      r = co_await get_refcount((w.entry & offset_mask) / cs_, rc);
      if (r < 0) co_return r;
      uint64_t e = (w.entry & ~entry_copied) | (rc == 1 ? entry_copied : 0);
      if (e != w.entry) {
        put_be64(p, e);
        changed = true;
      }
    }
    if (changed) {
      for (uint64_t s = 0; s < cs_ / l2_cache_->block_bytes(); ++s) l2_cache_->erase(l2 + s * l2_cache_->block_bytes());
      r = co_await io(*file_, io_op::write, int64_t(l2), int64_t(cs_)).buffer(table.get());
      if (r < 0) co_return r;
    }
  }
  if (l1_changed && !l1_.empty()) {
    uint64_t bytes = (l1_.size() * 8 + cs_ - 1) / cs_ * cs_;
    auto buf = make_buf(bytes);
    for (uint64_t i = 0; i < l1_.size(); ++i) put_be64(buf.get() + i * 8, l1_[i]);
    int r = co_await io(*file_, io_op::flush, 0, 0);
    if (r >= 0) r = co_await io(*file_, io_op::write, int64_t(h_.l1_table_offset), int64_t(bytes)).buffer(buf.get());
    if (r < 0) co_return r;
  }
  co_return co_await io(*file_, io_op::flush, 0, 0);
}

task<int> qcow2_driver::do_snapshot_create(const std::string& name, int64_t date_sec, int64_t date_nsec,
                                           std::string& err) {
  if (snapshots_.size() >= 65536) co_return err = "File too large", -EFBIG;
  co_await meta_lock_.lock();
  co::guard g{meta_lock_};
  int r = co_await writeback();
  if (r >= 0) r = co_await writeback();
  if (r < 0) co_return r;
  // Every cluster the active L1 reaches gains a reference: the snapshot's copy of the tables.
  auto table = make_buf(cs_);
  for (uint64_t i = 0; i < l1_.size(); ++i) {
    uint64_t l2 = l1_[i] & offset_mask;
    if (!l2) continue;
    uint64_t rc = 0;
    r = co_await get_refcount(l2 / cs_, rc);
    if (r >= 0) r = co_await set_refcount(l2 / cs_, rc + 1);
    if (r >= 0) r = co_await io(*file_, io_op::read, int64_t(l2), int64_t(cs_)).buffer(table.get());
    if (r < 0) co_return r == -ERANGE ? (err = "refcount overflow (refcount-bits too small for a snapshot)", r) : r;
    for (uint64_t j = 0; j < h_.l2_entries(); ++j) {
      l2_words w{be64(table.get() + j * h_.l2_entry_size()), 0};
      if (h_.has_data_file()) continue;
      uint64_t first = 0, last = 0;
      if (w.entry & entry_compressed) {
        auto d = decode_l2(h_, w.entry);
        first = (d.m.host_offset & ~uint64_t(511)) / cs_;
        last = (d.m.host_offset + d.m.compressed_size - 1) / cs_;
      } else if (w.entry & offset_mask) {
        first = last = (w.entry & offset_mask) / cs_;
      } else {
        continue;
      }
      for (uint64_t c = first; c <= last; ++c) {
        r = co_await get_refcount(c, rc);
        if (r >= 0) r = co_await set_refcount(c, rc + 1);
        if (r < 0) co_return r == -ERANGE ? (err = "refcount overflow (refcount-bits too small for a snapshot)", r) : r;
      }
    }
  }
  // The snapshot's own L1 table.
  uint64_t l1_bytes = uint64_t(l1_.size()) * 8;
  uint64_t l1_clusters = std::max<uint64_t>((l1_bytes + cs_ - 1) / cs_, 1);
  uint64_t l1_off = 0;
  bool fresh = false;
  r = co_await alloc_clusters(l1_clusters, l1_off, fresh);
  if (r < 0) co_return r;
  auto l1buf = make_buf(l1_clusters * cs_);
  for (uint64_t i = 0; i < l1_.size(); ++i) put_be64(l1buf.get() + i * 8, l1_[i] & ~entry_copied);
  // Refcounts first, then the copy, then the tables lose their COPIED flags.
  r = co_await write_blocks(*rc_cache_);
  if (r >= 0) r = co_await io(*file_, io_op::flush, 0, 0);
  if (r >= 0) r = co_await io(*file_, io_op::write, int64_t(l1_off), int64_t(l1_clusters * cs_)).buffer(l1buf.get());
  if (r >= 0) r = co_await sync_copied_flags();
  if (r < 0) co_return r;
  snapshot s;
  uint64_t max_id = 0;
  for (auto& x : snapshots_) max_id = std::max<uint64_t>(max_id, std::strtoull(x.id.c_str(), nullptr, 10));
  s.id = std::to_string(max_id + 1);
  s.name = name;
  s.l1_offset = l1_off;
  s.l1_size = uint32_t(l1_.size());
  s.date_sec = uint32_t(date_sec);
  s.date_nsec = uint32_t(date_nsec);
  // Without a guest the virtual clock is the wall clock, as in qemu-storage-daemon.
  s.vm_clock_nsec = uint64_t(date_sec) * 1000000000ull + uint64_t(date_nsec);
  s.disk_size = h_.size;
  s.has_disk_size = true;
  auto next = snapshots_;
  next.push_back(s);
  r = co_await write_snapshot_table(std::move(next));
  if (r >= 0) r = co_await writeback();
  co_return r;
}

task<int> qcow2_driver::do_snapshot_delete(size_t index, std::string& err) {
  (void)err;
  co_await meta_lock_.lock();
  co::guard g{meta_lock_};
  int r = co_await writeback();
  if (r < 0) co_return r;
  snapshot s = snapshots_[index];
  auto next = snapshots_;
  next.erase(next.begin() + std::ptrdiff_t(index));
  // First the table forgets it (a crash from here on only leaks), then its references go.
  r = co_await write_snapshot_table(std::move(next));
  if (r < 0) co_return r;
  aligned_buf l1buf;
  r = co_await read_range(s.l1_offset, uint64_t(s.l1_size) * 8, l1buf);
  if (r < 0) co_return r;
  auto table = make_buf(cs_);
  for (uint32_t i = 0; i < s.l1_size; ++i) {
    uint64_t l2 = be64(l1buf.get() + i * 8) & offset_mask;
    if (!l2) continue;
    r = co_await io(*file_, io_op::read, int64_t(l2), int64_t(cs_)).buffer(table.get());
    if (r < 0) co_return r;
    for (uint64_t j = 0; j < h_.l2_entries(); ++j) {
      l2_words w{be64(table.get() + j * h_.l2_entry_size()), 0};
      if (w.entry & entry_compressed) free_for_entry(w, free_snapshot);
      else if ((w.entry & offset_mask) && !h_.has_data_file()) queue_free(w.entry & offset_mask, cs_, free_snapshot);
    }
    queue_free(l2, cs_, free_snapshot);
  }
  if (s.l1_size)
    queue_free(s.l1_offset, std::max<uint64_t>((uint64_t(s.l1_size) * 8 + cs_ - 1) / cs_, 1) * cs_, free_snapshot);
  r = co_await writeback();
  if (r >= 0) r = co_await writeback();
  if (r >= 0) r = co_await sync_copied_flags();
  // Tables whose refcount fell to one belong to the active image alone again.
  meta_clusters_.clear();
  for (auto e : reftable_)
    if (e & offset_mask) meta_clusters_[(e & offset_mask) / cs_] = 'r';
  for (auto e : l1_)
    if (e & offset_mask) meta_clusters_[(e & offset_mask) / cs_] = 'l';
  co_return r;
}

result<void> qcow2_driver::snapshot_create(const std::string& name, int64_t date_sec, int64_t date_nsec) {
  if (read_only_ || corrupt_) return fail("Read-only file system");
  std::string err;
  int r = run_sync(do_snapshot_create(name, date_sec, date_nsec, err));
  if (r < 0) return fail(err.empty() ? std::string(std::strerror(-r)) : err);
  return {};
}

result<boost::json::object> qcow2_driver::snapshot_delete(const std::string* id, const std::string* name) {
  size_t index = snapshots_.size();
  for (size_t i = 0; i < snapshots_.size(); ++i) {
    if (id && snapshots_[i].id != *id) continue;
    if (name && snapshots_[i].name != *name) continue;
    index = i;
    break;
  }
  if (index == snapshots_.size()) return fail("no such snapshot");
  boost::json::object info = snapshot_info(snapshots_[index]);
  if (read_only_ || corrupt_) return fail("Read-only file system");
  std::string err;
  int r = run_sync(do_snapshot_delete(index, err));
  if (r < 0) return fail(err.empty() ? std::string(std::strerror(-r)) : err);
  return info;
}

}  // namespace impl
}  // namespace blockd::qcow2

// The qcow2 driver's refcounts and cluster allocation: refcount lookups and updates, new refcount blocks, refcount table growth, single clusters and contiguous areas, frees (class: driver_impl.h); home iothread only.
#include "formats/qcow2/driver_impl.h"

namespace blockd::qcow2 {
namespace impl {

// ---- refcounts ----------------------------------------------------------------------------------

task<int> qcow2_driver::get_refcount(uint64_t cl, uint64_t& out) {
  out = 0;
  uint64_t rbi = cl / rb_entries_;
  if (rbi >= reftable_.size() || !(reftable_[rbi] & offset_mask)) co_return 0;
  meta_block* b = nullptr;
  int r = co_await load(*rc_cache_, reftable_[rbi] & offset_mask, b);
  if (r < 0) co_return r;
  out = refcount_get(h_, b->data.get(), cl % rb_entries_);
  unpin(*rc_cache_, b);
  co_return 0;
}

task<int> qcow2_driver::set_refcount(uint64_t cl, uint64_t v) {
  uint64_t rbi = cl / rb_entries_;
  int r = co_await ensure_refblock(rbi);
  if (r < 0) co_return r;
  if (h_.refcount_bits() < 64 && v >= (uint64_t(1) << h_.refcount_bits())) co_return -ERANGE;
  meta_block* b = nullptr;
  r = co_await load(*rc_cache_, reftable_[rbi] & offset_mask, b);
  if (r < 0) co_return r;
  refcount_set(h_, b->data.get(), cl % rb_entries_, v);
  rc_cache_->set_dirty(b, true);
  unpin(*rc_cache_, b);
  co_return 0;
}

// A missing refcount block goes at the first cluster of the range it describes: every cluster of
// that range is free (no block means all-zero refcounts), and the block counts itself.
task<int> qcow2_driver::ensure_refblock(uint64_t rbi) {
  if (rbi >= reftable_.size()) {
    int r = co_await grow_reftable(rbi);
    if (r < 0) co_return r;
  }
  if (reftable_[rbi] & offset_mask) co_return 0;
  if (corrupt_) co_return -EIO;
  file_->driver().debug_event(blkdebug_event::refblock_alloc);
  uint64_t cl = rbi * rb_entries_;
  uint64_t off = cl * cs_;
  // A range without a block is free by the format's rules; if metadata sits there the refcount
  // table is lying, and writing the block would destroy that metadata.
  std::string what;
  if (overlaps_metadata(off, cs_, what) || cl == 0) {
    signal_corruption("Preventing invalid allocation of a refcount block at offset " + std::to_string(off) +
                          " (overlaps with " + (cl == 0 ? std::string("qcow2_header") : what) + ")",
                      int64_t(off), int64_t(cs_));
    co_return -EIO;
  }
  meta_block* b = nullptr;
  int r = co_await load(*rc_cache_, off, b, /*fresh=*/true);
  if (r < 0) co_return r;
  refcount_set(h_, b->data.get(), 0, 1);
  file_->driver().debug_event(blkdebug_event::refblock_alloc_write);
  r = co_await io(*file_, io_op::write, int64_t(off), int64_t(cs_)).buffer(b->data.get());
  if (r >= 0) r = co_await io(*file_, io_op::flush, 0, 0);
  if (r < 0) {
    unpin(*rc_cache_, b);
    rc_cache_->erase(off);
    co_return r;
  }
  unpin(*rc_cache_, b);
  meta_clusters_[cl] = 'r';
  fresh_end_ = std::max(fresh_end_, off + cs_);
  reftable_[rbi] = off;
  // The reftable entry last: until it is written the new block is merely unreferenced space.
  file_->driver().debug_event(blkdebug_event::refblock_alloc_hookup);
  co_return co_await write_table_entry(reftable_, h_.refcount_table_offset, rbi);
}

// A bigger refcount table goes, with the refcount blocks describing its own clusters, into the
// first range past the current table's reach (free by definition): the blocks first, then the table.
task<int> qcow2_driver::grow_reftable(uint64_t rbi) {
  file_->driver().debug_event(blkdebug_event::reftable_grow);
  uint64_t old_n = reftable_.size();
  uint64_t per_cluster = cs_ / 8;
  uint64_t q = old_n;  // first range with no entry in the current table
  uint64_t new_n = std::max<uint64_t>(rbi + 1, old_n + old_n / 2 + 1);
  uint64_t k = 1, t = 0;
  for (int iter = 0; iter < 64; ++iter) {
    new_n = std::max(new_n, q + k);
    t = (new_n + per_cluster - 1) / per_cluster;
    uint64_t area = k + t;
    uint64_t k2 = (area + rb_entries_ - 1) / rb_entries_;
    if (k2 == k && new_n >= q + k) break;
    k = k2;
  }
  new_n = t * per_cluster;
  if (t * cs_ > max_refcount_table_bytes * 4) co_return -EFBIG;
  uint64_t area_cl = q * rb_entries_;
  // Build the k new blocks: block i describes range q+i and lives at cluster area_cl + i.
  std::vector<aligned_buf> blocks;
  for (uint64_t i = 0; i < k; ++i) blocks.push_back(make_buf(cs_));
  for (uint64_t c = area_cl; c < area_cl + k + t; ++c) refcount_set(h_, blocks[(c / rb_entries_) - q].get(), c % rb_entries_, 1);
  file_->driver().debug_event(blkdebug_event::refblock_alloc_write_blocks);
  for (uint64_t i = 0; i < k; ++i) {
    int r = co_await io(*file_, io_op::write, int64_t((area_cl + i) * cs_), int64_t(cs_)).buffer(blocks[i].get());
    if (r < 0) co_return r;
  }
  auto table = make_buf(t * cs_);
  std::vector<uint64_t> next(new_n, 0);
  for (uint64_t i = 0; i < old_n; ++i) next[i] = reftable_[i];
  for (uint64_t i = 0; i < k; ++i) next[q + i] = (area_cl + i) * cs_;
  for (uint64_t i = 0; i < new_n; ++i) put_be64(table.get() + i * 8, next[i]);
  uint64_t table_off = (area_cl + k) * cs_;
  file_->driver().debug_event(blkdebug_event::refblock_alloc_write_table);
  int r = co_await io(*file_, io_op::write, int64_t(table_off), int64_t(t * cs_)).buffer(table.get());
  if (r >= 0) r = co_await io(*file_, io_op::flush, 0, 0);
  if (r < 0) co_return r;
  uint64_t old_off = h_.refcount_table_offset, old_clusters = h_.refcount_table_clusters;
  h_.refcount_table_offset = table_off;
  h_.refcount_table_clusters = uint32_t(t);
  file_->driver().debug_event(blkdebug_event::refblock_alloc_switch_table);
  r = co_await write_header();
  if (r >= 0) r = co_await io(*file_, io_op::flush, 0, 0);
  if (r < 0) {
    h_.refcount_table_offset = old_off;
    h_.refcount_table_clusters = uint32_t(old_clusters);
    co_return r;
  }
  reftable_ = std::move(next);
  for (uint64_t i = 0; i < k; ++i) meta_clusters_[area_cl + i] = 'r';
  fresh_end_ = std::max(fresh_end_, (area_cl + k + t) * cs_);
  queue_free(old_off, old_clusters * cs_);
  co_return 0;
}

// Several contiguous clusters (an L1 table, a snapshot table) go past everything in use: scanning
// for a free run would never find one longer than a refcount block's range in fresh space, whose
// first cluster holds the block itself. The refcount blocks the area needs are placed in front of
// it and count themselves (the same fixed point as a refcount table growth).
task<int> qcow2_driver::alloc_area(uint64_t n, uint64_t& off) {
  for (int attempt = 0; attempt < 8; ++attempt) {
    uint64_t c0 = (fresh_end_ + cs_ - 1) / cs_;
    uint64_t k = 0;
    std::vector<uint64_t> missing;
    bool covered = true;
    for (int iter = 0; iter < 64; ++iter) {
      uint64_t last = c0 + k + n - 1;
      if (last / rb_entries_ >= reftable_.size()) {
        covered = false;
        break;
      }
      missing.clear();
      for (uint64_t r = c0 / rb_entries_; r <= last / rb_entries_; ++r)
        if (!(reftable_[r] & offset_mask)) missing.push_back(r);
      if (missing.size() <= k) break;
      k = missing.size();
    }
    if (!covered) {
      // The table must reach the area first; its growth moves the end of the file, so start over.
      int r = co_await grow_reftable((c0 + 2 * n + 64) / rb_entries_ + 1);
      if (r < 0) co_return r;
      continue;
    }
    uint64_t first = c0 + k;
    std::unordered_map<uint64_t, aligned_buf> blocks;  // range -> its new refcount block
    for (size_t i = 0; i < missing.size(); ++i) blocks[missing[i]] = make_buf(cs_);
    std::vector<uint64_t> existing;
    auto count = [&](uint64_t c) {
      auto it = blocks.find(c / rb_entries_);
      if (it != blocks.end()) refcount_set(h_, it->second.get(), c % rb_entries_, 1);
      else existing.push_back(c);
    };
    for (size_t i = 0; i < missing.size(); ++i) count(c0 + i);
    for (uint64_t c = first; c < first + n; ++c) count(c);
    for (size_t i = 0; i < missing.size(); ++i) {
      int r = co_await io(*file_, io_op::write, int64_t((c0 + i) * cs_), int64_t(cs_)).buffer(blocks[missing[i]].get());
      if (r < 0) co_return r;
    }
    if (!missing.empty()) {
      int r = co_await io(*file_, io_op::flush, 0, 0);
      if (r < 0) co_return r;
      for (size_t i = 0; i < missing.size(); ++i) {
        reftable_[missing[i]] = (c0 + i) * cs_;
        meta_clusters_[c0 + i] = 'r';
      }
      // The table entries last: until then the new blocks are unreferenced space.
      uint64_t lo = missing.front() * 8, hi = missing.back() * 8 + 8;
      uint64_t a = std::max<uint64_t>(align_, 8);
      lo = lo / a * a;
      hi = (hi + a - 1) / a * a;
      auto buf = make_buf(hi - lo);
      for (uint64_t b = lo; b < hi; b += 8) put_be64(buf.get() + (b - lo), b / 8 < reftable_.size() ? reftable_[b / 8] : 0);
      r = co_await io(*file_, io_op::write, int64_t(h_.refcount_table_offset + lo), int64_t(hi - lo)).buffer(buf.get());
      if (r < 0) co_return r;
    }
    for (uint64_t c : existing) {
      int r = co_await set_refcount(c, 1);
      if (r < 0) co_return r;
    }
    fresh_end_ = (first + n) * cs_;
    off = first * cs_;
    co_return 0;
  }
  co_return -EFBIG;
}

task<int> qcow2_driver::alloc_clusters(uint64_t n, uint64_t& off, bool& fresh) {
  file_->driver().debug_event(blkdebug_event::cluster_alloc);
  if (n > 1) {
    fresh = true;
    co_return co_await alloc_area(n, off);
  }
  uint64_t c = free_hint_;
  for (;;) {
    uint64_t rbi = c / rb_entries_;
    if (rbi >= reftable_.size() || !(reftable_[rbi] & offset_mask)) {
      int r = co_await ensure_refblock(rbi);
      if (r < 0) co_return r;
    }
    bool ok = true;
    for (uint64_t i = 0; i < n; ++i) {
      uint64_t rc = 0;
      uint64_t ci = c + i;
      if (ci / rb_entries_ != rbi && (ci / rb_entries_ >= reftable_.size() || !(reftable_[ci / rb_entries_] & offset_mask))) {
        int r = co_await ensure_refblock(ci / rb_entries_);
        if (r < 0) co_return r;
      }
      int r = co_await get_refcount(ci, rc);
      if (r < 0) co_return r;
      if (rc) {
        c = ci + 1;
        ok = false;
        break;
      }
    }
    if (ok) break;
  }
  if (c == 0) {
    // Cluster 0 holds the header: a zero refcount for it means the refcounts cannot be trusted.
    signal_corruption("Preventing invalid allocation of the header cluster (its refcount is 0)", 0, int64_t(cs_));
    co_return -EIO;
  }
  for (uint64_t i = 0; i < n; ++i) {
    int r = co_await set_refcount(c + i, 1);
    if (r < 0) co_return r;
  }
  off = c * cs_;
  fresh = off >= fresh_end_;
  fresh_end_ = std::max(fresh_end_, off + n * cs_);
  if (n == 1) free_hint_ = c + 1;
  co_return 0;
}

// Clusters scanned for a free run below the end of the used space before the run goes past it
// (one scan per allocation stays short; the next one continues where it stopped).
constexpr uint64_t max_run_scan = 4096;

// `n` contiguous clusters for data (meta_lock_ held): a free run below the end of the used space
// (freed space is reused, as single clusters reuse it), else an area past everything in use.
// `fresh`: the run was never written and reads as zeroes. run_hint_ keeps a scan over space full
// of holes too small for runs from starting at the same first hole every time (frees lower it).
task<int> qcow2_driver::alloc_run(uint64_t n, uint64_t& off, bool& fresh) {
  if (n == 1) co_return co_await alloc_clusters(1, off, fresh);
  file_->driver().debug_event(blkdebug_event::cluster_alloc);
  uint64_t end = fresh_end_ / cs_;
  uint64_t start = std::max<uint64_t>({free_hint_, run_hint_, 1});
  uint64_t c = start, run = 0, first_free = ~0ull;
  for (uint64_t scanned = 0; c < end && scanned < max_run_scan; ++c, ++scanned) {
    uint64_t rbi = c / rb_entries_;
    if (rbi >= reftable_.size() || !(reftable_[rbi] & offset_mask)) break;  // leave unmapped ranges to alloc_area
    uint64_t rc = 0;
    int r = co_await get_refcount(c, rc);
    if (r < 0) co_return r;
    if (rc) {
      run = 0;
      continue;
    }
    if (first_free == ~0ull) first_free = c;
    if (++run == n) break;
  }
  // Nothing below the first free cluster seen is free (the hint's meaning; with none seen, nothing
  // below c), when the scan started at the free hint: holes skipped by run_hint_ stay for single clusters.
  if (start == std::max<uint64_t>(free_hint_, 1)) free_hint_ = std::max(free_hint_, first_free != ~0ull ? first_free : c);
  run_hint_ = run == n ? c + 1 - n : c;
  if (run == n) {
    uint64_t c0 = c + 1 - n;
    for (uint64_t i = 0; i < n; ++i) {
      int r = co_await set_refcount(c0 + i, 1);
      if (r < 0) co_return r;
    }
    off = c0 * cs_;
    fresh = false;
    if (free_hint_ == c0) free_hint_ = c + 1;
    co_return 0;
  }
  fresh = true;
  co_return co_await alloc_area(n, off);
}

void qcow2_driver::free_for_entry(const l2_words& w, free_reason why) {
  if (w.entry & entry_compressed) {
    auto d = decode_l2(h_, w.entry);
    uint64_t start = d.m.host_offset & ~uint64_t(511);
    queue_free(start, d.m.host_offset + d.m.compressed_size - start, why);
    return;
  }
  uint64_t host = w.entry & offset_mask;
  if (host && !h_.has_data_file()) queue_free(host, cs_, why);
}

}  // namespace impl
}  // namespace blockd::qcow2

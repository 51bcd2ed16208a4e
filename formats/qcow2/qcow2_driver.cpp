// The qcow2 block driver's core: metadata caches, cluster mapping, refcounts, crash-ordered writeback, cluster locks, corruption (class: driver_impl.h; data path: qcow2_io.cpp; control: qcow2_control.cpp); home iothread only.
//
// Ordering rules that keep a crashed image consistent (at worst leaked clusters):
//  * a cluster's refcount reaches the disk (and a flush) before any L2 entry naming it is written;
//  * a new L2 table is written and flushed before the L1 entry naming it;
//  * a refcount decrement is applied only after the L2 change that dropped the reference is durable
//    (frees are queued and applied at the end of a writeback), so a freed cluster is never reused
//    while an old on-disk table still points at it;
//  * every metadata change and every writeback runs under one coroutine mutex (meta_lock_), so a
//    writeback sees a consistent set of tables; data I/O never takes it.
// Guest clusters are locked shared (in-place writes) or exclusive (mapping changes), so a mapping
// never changes under a write still in flight to the old host cluster.
#include "formats/qcow2/driver_impl.h"

namespace blockd::qcow2 {


aligned_buf make_buf(size_t len, bool zero) {
  void* p = nullptr;
  if (posix_memalign(&p, 4096, std::max<size_t>(len, 512)) != 0) throw std::bad_alloc();
  if (zero) std::memset(p, 0, std::max<size_t>(len, 512));
  return aligned_buf(static_cast<uint8_t*>(p));
}

// ---- metadata cache ----------------------------------------------------------------------------

meta_block* meta_cache::find(uint64_t offset) {
  auto it = map_.find(offset);
  return it == map_.end() ? nullptr : it->second.get();
}

meta_block* meta_cache::insert(uint64_t offset, std::function<void(std::function<void()>)>* defer) {
  auto b = std::make_unique<meta_block>();
  b->offset = offset;
  b->data = make_buf(block_bytes_, false);
  b->ready.bind(defer);
  auto* p = b.get();
  map_[offset] = std::move(b);
  touch(p);
  return p;
}

void meta_cache::trim() {
  if (map_.size() <= capacity_) return;
  std::vector<meta_block*> victims;
  for (auto& [off, b] : map_)
    if (!b->dirty && !b->pins && !b->loading) victims.push_back(b.get());
  std::sort(victims.begin(), victims.end(), [](auto* a, auto* b) { return a->lru < b->lru; });
  size_t excess = map_.size() - capacity_;
  // Evict a little more than needed so a full cache does not scan on every insert.
  excess = std::min(victims.size(), excess + capacity_ / 8);
  for (size_t i = 0; i < excess; ++i) map_.erase(victims[i]->offset);
}

std::vector<meta_block*> meta_cache::dirty_blocks() {
  std::vector<meta_block*> v;
  for (auto& [off, b] : map_)
    if (b->dirty) v.push_back(b.get());
  std::sort(v.begin(), v.end(), [](auto* a, auto* b) { return a->offset < b->offset; });
  return v;
}

void meta_cache::clear_clean() {
  for (auto it = map_.begin(); it != map_.end();) {
    if (!it->second->dirty && !it->second->pins && !it->second->loading) it = map_.erase(it);
    else ++it;
  }
}


namespace impl {

// ---- synchronous control path ------------------------------------------------------------------

int qcow2_driver::run_sync(task<int> t) {
  if (!env_.block_on) return -ENOTSUP;
  uint32_t saved = ctl_flags_;
  ctl_flags_ = io_control;
  auto* tp = &t;
  int r = env_.block_on([tp](std::function<void(int)> done) { co::start(std::move(*tp), std::move(done)); });
  ctl_flags_ = saved;
  return r;
}

// ---- cache --------------------------------------------------------------------------------------

task<int> qcow2_driver::load(meta_cache& c, uint64_t off, meta_block*& out, bool fresh) {
  meta_block* b = c.find(off);
  if (b) {
    ++b->pins;
    c.touch(b);
    while (b->loading) co_await b->ready.wait();
    if (b->error) {
      int e = b->error;
      unpin(c, b);
      co_return e;
    }
    out = b;
    co_return 0;
  }
  b = c.insert(off, &env_.defer);
  b->pins = 1;
  if (fresh) {
    std::memset(b->data.get(), 0, c.block_bytes());
  } else {
    b->loading = true;
    int r = co_await io(*file_, io_op::read, int64_t(off), int64_t(c.block_bytes())).buffer(b->data.get());
    b->loading = false;
    b->ready.wake_all();
    if (r < 0) {
      b->error = r;
      unpin(c, b);
      co_return r;
    }
  }
  c.trim();
  out = b;
  co_return 0;
}

// ---- mapping ------------------------------------------------------------------------------------

task<int> qcow2_driver::l2_slot(uint64_t cluster, pin& p, size_t& index) {
  uint64_t l1i = cluster >> l2_bits_;
  uint64_t l2i = cluster & ((uint64_t(1) << l2_bits_) - 1);
  uint64_t l2off = l1i < l1_.size() ? l1_[l1i] & offset_mask : 0;
  if (!l2off) co_return -ENOENT;
  uint64_t slice = l2i / slice_entries_;
  meta_block* b = nullptr;
  int r = co_await load(*l2_cache_, l2off + slice * l2_cache_->block_bytes(), b);
  if (r < 0) co_return r;
  p.d = this;
  p.c = l2_cache_.get();
  p.b = b;
  index = l2i % slice_entries_;
  co_return 0;
}

task<int> qcow2_driver::lookup(uint64_t cluster, l2_words& out) {
  out = {};
  // cache-clean-interval: looked at every 1024 lookups, so the clock costs nothing per request.
  if (o_.cache_clean_interval > 0 && (++lookups_ & 1023) == 0) {
    int64_t now = node::now_ns();
    if (now - last_clean_ns_ >= o_.cache_clean_interval * 1000000000ll) {
      if (last_clean_ns_) {
        l2_cache_->clean_unused();
        rc_cache_->clean_unused();
      }
      last_clean_ns_ = now;
    }
  }
  uint64_t l1i = cluster >> l2_bits_;
  if (l1i >= l1_.size() || !(l1_[l1i] & offset_mask)) co_return 0;
  pin p;
  size_t idx = 0;
  int r = co_await l2_slot(cluster, p, idx);
  if (r < 0) co_return r;
  const uint8_t* e = p.b->data.get() + idx * h_.l2_entry_size();
  out.entry = be64(e);
  if (ext()) out.bitmap = be64(e + 8);
  if (!check_entry(cluster, out)) co_return -EIO;
  co_return 0;
}

bool qcow2_driver::check_entry(uint64_t cluster, const l2_words& w) {
  if (!w.entry && !w.bitmap) return true;
  auto d = decode_l2(h_, w.entry, w.bitmap, 0);
  std::string why;
  if (!d.valid) why = d.why;
  if (why.empty() && ext() && !(w.entry & entry_compressed)) {
    uint32_t alloc = uint32_t(w.bitmap), zero = uint32_t(w.bitmap >> 32);
    if (alloc & zero) why = "subcluster both allocated and zero";
    else if (alloc && !(w.entry & offset_mask)) why = "allocated subcluster without a host cluster";
  }
  if (why.empty()) return true;
  signal_corruption("Invalid L2 entry for guest offset " + std::to_string(cluster * cs_) + ": " + why, -1, -1);
  return false;
}

extent qcow2_driver::classify(const l2_words& w, uint64_t in, uint64_t len) const {
  extent e;
  e.len = len;
  if (w.entry & entry_compressed) {
    auto d = decode_l2(h_, w.entry);
    e.kind = run_kind::compressed;
    e.host = d.m.host_offset;
    e.csize = d.m.compressed_size;
    return e;
  }
  uint64_t host = w.entry & offset_mask;
  bool hh = has_host(w);
  auto kind_of = [&](uint32_t sc) {
    if (!ext()) {
      if (w.entry & entry_zero) return hh ? 3 : 1;  // zero (allocated / plain)
      return hh ? 2 : 0;                            // data / unallocated
    }
    if (w.bitmap & (1ull << (32 + sc))) return hh ? 3 : 1;
    if (w.bitmap & (1ull << sc)) return 2;
    return 0;
  };
  uint64_t u = unit();
  uint32_t first = uint32_t(in / u);
  int k = kind_of(first);
  if (ext()) {
    uint64_t end = in + len;
    uint64_t run_end = (uint64_t(first) + 1) * u;
    while (run_end < end && kind_of(uint32_t(run_end / u)) == k) run_end += u;
    e.len = std::min(run_end, end) - in;
  }
  switch (k) {
    case 0: e.kind = run_kind::backing; break;
    case 1: e.kind = run_kind::zero; break;
    case 2:
      e.kind = run_kind::data;
      e.host = host + in;
      break;
    default:
      e.kind = run_kind::zero;
      e.allocated_zero = true;
      break;
  }
  return e;
}

task<int> qcow2_driver::map(uint64_t goff, uint64_t maxlen, extent& out) {
  uint64_t cl = goff >> cbits_, in = goff & (cs_ - 1);
  l2_words w;
  int r = co_await lookup(cl, w);
  if (r < 0) co_return r;
  out = classify(w, in, std::min(maxlen, cs_ - in));
  // Extend across following clusters while the kind (and for data, host contiguity) holds.
  while (out.len < maxlen && out.kind != run_kind::compressed && ((goff + out.len) & (cs_ - 1)) == 0) {
    uint64_t next = (goff + out.len) >> cbits_;
    r = co_await lookup(next, w);
    if (r < 0) co_return r;
    extent e = classify(w, 0, std::min<uint64_t>(maxlen - out.len, cs_));
    if (e.kind != out.kind || e.allocated_zero != out.allocated_zero) break;
    if (e.kind == run_kind::data && e.host != out.host + out.len) break;
    out.len += e.len;
    if (e.len < cs_) break;
  }
  co_return 0;
}

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
  uint64_t chunk = std::max<uint64_t>(align_, 8);
  uint64_t byte = rbi * 8 / chunk * chunk;
  auto buf = make_buf(chunk);
  for (uint64_t i = 0; i < chunk / 8; ++i) {
    uint64_t idx = byte / 8 + i;
    put_be64(buf.get() + i * 8, idx < reftable_.size() ? reftable_[idx] : 0);
  }
  r = co_await io(*file_, io_op::write, int64_t(h_.refcount_table_offset + byte), int64_t(chunk)).buffer(buf.get());
  co_return r;
}

// A bigger refcount table goes, with the refcount blocks describing its own clusters, into the
// first range past the current table's reach (free by definition): the blocks first, then the table.
task<int> qcow2_driver::grow_reftable(uint64_t rbi) {
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
  int r = co_await io(*file_, io_op::write, int64_t(table_off), int64_t(t * cs_)).buffer(table.get());
  if (r >= 0) r = co_await io(*file_, io_op::flush, 0, 0);
  if (r < 0) co_return r;
  uint64_t old_off = h_.refcount_table_offset, old_clusters = h_.refcount_table_clusters;
  h_.refcount_table_offset = table_off;
  h_.refcount_table_clusters = uint32_t(t);
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

task<int> qcow2_driver::write_l1_entry(uint64_t index) {
  uint64_t chunk = std::max<uint64_t>(align_, 8);
  uint64_t byte = index * 8 / chunk * chunk;
  auto buf = make_buf(chunk);
  for (uint64_t i = 0; i < chunk / 8; ++i) {
    uint64_t idx = byte / 8 + i;
    put_be64(buf.get() + i * 8, idx < l1_.size() ? l1_[idx] : 0);
  }
  co_return co_await io(*file_, io_op::write, int64_t(h_.l1_table_offset + byte), int64_t(chunk)).buffer(buf.get());
}

// Makes the L2 table of `cluster` exist and belong to the active L1 alone (meta_lock_ held).
task<int> qcow2_driver::ensure_l2(uint64_t cluster) {
  uint64_t l1i = cluster >> l2_bits_;
  if (l1i >= l1_.size()) co_return -EIO;
  uint64_t ent = l1_[l1i];
  if ((ent & offset_mask) && (ent & entry_copied)) co_return 0;
  uint64_t old = ent & offset_mask;
  auto buf = make_buf(cs_);
  if (old) {
    // Shared with a snapshot: the active image gets its own copy (written back first if cached dirty).
    int r = co_await writeback();
    if (r < 0) co_return r;
    r = co_await io(*file_, io_op::read, int64_t(old), int64_t(cs_)).buffer(buf.get());
    if (r < 0) co_return r;
  }
  uint64_t off = 0;
  bool fresh = false;
  int r = co_await alloc_clusters(1, off, fresh);
  if (r < 0) co_return r;
  std::string what;
  if (overlaps_metadata(off, cs_, what)) {
    signal_corruption("Preventing invalid allocation of L2 table at offset " + std::to_string(off) + " (overlaps with " +
                          what + ")",
                      int64_t(off), int64_t(cs_));
    co_return -EIO;
  }
  // Its refcount is durable before anything can point at it; then the table, then the L1 entry.
  r = co_await write_blocks(*rc_cache_);
  if (r >= 0) r = co_await io(*file_, io_op::flush, 0, 0);
  if (r >= 0) r = co_await io(*file_, io_op::write, int64_t(off), int64_t(cs_)).buffer(buf.get());
  if (r >= 0) r = co_await io(*file_, io_op::flush, 0, 0);
  if (r < 0) co_return r;
  uint64_t saved = l1_[l1i];
  l1_[l1i] = off | entry_copied;
  r = co_await write_l1_entry(l1i);
  if (r < 0) {
    l1_[l1i] = saved;
    queue_free(off, cs_);
    co_return r;
  }
  meta_clusters_[off / cs_] = 'l';
  if (old) {
    meta_clusters_.erase(old / cs_);
    queue_free(old, cs_);
  }
  co_return 0;
}

// ---- writeback ----------------------------------------------------------------------------------

task<int> qcow2_driver::write_blocks(meta_cache& c) {
  auto dirty = c.dirty_blocks();
  if (dirty.empty()) co_return 0;
  join_state j;
  for (auto* b : dirty) {
    ++b->pins;
    start_piece(&j, [](qcow2_driver* d, meta_cache* c, meta_block* b) -> task<int> {
      int r = co_await d->io(*d->file_, io_op::write, int64_t(b->offset), int64_t(c->block_bytes())).buffer(b->data.get());
      if (r >= 0) c->set_dirty(b, false);
      d->unpin(*c, b);
      co_return r;
    }(this, &c, b));
  }
  while (j.left > 0) co_await j.done.wait();
  c.trim();
  co_return j.err;
}

void qcow2_driver::start_piece(join_state* j, task<int> t) {
  j->done.bind(&env_.defer);
  ++j->left;
  co::start(std::move(t), [j](int r) {
    if (r < 0 && !j->err) j->err = r;
    if (--j->left == 0) j->done.wake_all();
  });
}

task<int> qcow2_driver::writeback() {
  // A corrupt image gets no more metadata writes: what is cached may be what is wrong.
  if (corrupt_) co_return -EIO;
  bool wrote = false;
  if (rc_cache_->dirty_count()) {
    int r = co_await write_blocks(*rc_cache_);
    if (r < 0) co_return r;
    wrote = true;
  }
  if (l2_cache_->dirty_count()) {
    if (wrote) {
      int r = co_await io(*file_, io_op::flush, 0, 0);
      if (r < 0) co_return r;
    }
    int r = co_await write_blocks(*l2_cache_);
    if (r < 0) co_return r;
    wrote = true;
  }
  if (!pending_frees_.empty()) {
    // The tables that dropped these references are durable now; only then may the clusters go.
    int r = co_await io(*file_, io_op::flush, 0, 0);
    if (r < 0) co_return r;
    auto frees = std::move(pending_frees_);
    pending_frees_.clear();
    for (auto& f : frees) {
      uint64_t first = f.host / cs_, last = (f.host + f.len - 1) / cs_;
      for (uint64_t c = first; c <= last; ++c) {
        uint64_t rc = 0;
        r = co_await get_refcount(c, rc);
        if (r < 0) co_return r;
        if (rc == 0) {
          signal_corruption("Cannot free cluster at offset " + std::to_string(c * cs_) + ": its refcount is already 0",
                            int64_t(c * cs_), int64_t(cs_));
          co_return -EIO;
        }
        r = co_await set_refcount(c, rc - 1);
        if (r < 0) co_return r;
        if (rc == 1) {
          free_hint_ = std::min(free_hint_, c);
          meta_clusters_.erase(c);
          bool pass = f.why == free_request ? o_.pass_discard_request
                      : f.why == free_snapshot ? o_.pass_discard_snapshot
                                               : o_.pass_discard_other;
          if (pass) (void)co_await io(*file_, io_op::discard, int64_t(c * cs_), int64_t(cs_));
        }
      }
    }
  }
  co_return 0;
}

task<int> qcow2_driver::flush_all() {
  co_await meta_lock_.lock();
  co::guard g{meta_lock_};
  // Two rounds: the second writes the refcount decrements the first applied.
  int r = co_await writeback();
  if (r >= 0) r = co_await writeback();
  if (r >= 0) r = co_await io(*file_, io_op::flush, 0, 0);
  co_return r;
}

task<int> qcow2_driver::write_header() {
  auto bytes = serialize_header(h_);
  if (!bytes) co_return -EINVAL;
  uint64_t len = (bytes->size() + std::max<uint64_t>(align_, 1) - 1) / std::max<uint64_t>(align_, 1) * std::max<uint64_t>(align_, 1);
  len = std::min<uint64_t>(std::max<uint64_t>(len, bytes->size()), cs_);
  auto buf = make_buf(len);
  std::memcpy(buf.get(), bytes->data(), bytes->size());
  co_return co_await io(*file_, io_op::write, 0, int64_t(len)).buffer(buf.get());
}

// Lazy refcounts: the first metadata change marks the image dirty (a crash then means a refcount
// rebuild on the next open); the mark is cleared when the image is closed cleanly.
task<int> qcow2_driver::mark_dirty_flag() {
  if (!o_.lazy_refcounts || dirty_flag_set_) co_return 0;
  h_.incompatible_features |= incompat_dirty;
  int r = co_await write_header();
  if (r >= 0) r = co_await io(*file_, io_op::flush, 0, 0);
  if (r < 0) {
    h_.incompatible_features &= ~incompat_dirty;
    co_return r;
  }
  dirty_flag_set_ = true;
  co_return 0;
}

// Dirty tables stay cached until a flush, or until a cache overflows with them (clean blocks are
// evicted first; dirty ones can only go once written): writing back early would rewrite the same
// tables over and over under a random write load, holding the metadata lock and flushing each time.
task<int> qcow2_driver::maybe_writeback() {
  // Only a cache that has outgrown its capacity (every block it could evict is dirty) forces one: a
  // cache exactly as large as the image's tables stays dirty until the next flush.
  if (l2_cache_->size() <= l2_cache_->capacity() && rc_cache_->size() <= rc_cache_->capacity() &&
      pending_frees_.size() < 4096)
    co_return 0;
  co_await meta_lock_.lock();
  co::guard g{meta_lock_};
  co_return co_await writeback();
}

// ---- cluster locks ------------------------------------------------------------------------------

task<int> qcow2_driver::lock_cluster(uint64_t cl, bool exclusive) {
  for (;;) {
    auto& l = cluster_locks_[cl];
    bool busy = l.exclusive || (exclusive && l.shared > 0);
    if (!busy) {
      if (exclusive) l.exclusive = true;
      else ++l.shared;
      co_return 0;
    }
    co_await cluster_wait_.wait();
  }
}

void qcow2_driver::unlock_cluster(uint64_t cl, bool exclusive) {
  auto it = cluster_locks_.find(cl);
  if (it == cluster_locks_.end()) return;
  if (exclusive) it->second.exclusive = false;
  else --it->second.shared;
  if (!it->second.exclusive && it->second.shared == 0) cluster_locks_.erase(it);
  if (!cluster_wait_.empty()) cluster_wait_.wake_all();
}

// ---- corruption ---------------------------------------------------------------------------------

bool qcow2_driver::overlaps_metadata(uint64_t off, uint64_t len, std::string& what) const {
  auto hit = [&](uint64_t a, uint64_t alen) { return alen && off < a + alen && a < off + len; };
  uint32_t o = o_.overlap;
  if ((o & overlap_main_header) && hit(0, cs_)) return what = "qcow2_header", true;
  if ((o & overlap_active_l1) && hit(h_.l1_table_offset, uint64_t(h_.l1_size) * 8)) return what = "active L1 table", true;
  if ((o & overlap_refcount_table) && hit(h_.refcount_table_offset, uint64_t(h_.refcount_table_clusters) * cs_))
    return what = "refcount table", true;
  if ((o & overlap_snapshot_table) && h_.nb_snapshots && hit(h_.snapshots_offset, snapshot_table_bytes_))
    return what = "snapshot table", true;
  if (o & overlap_inactive_l1)
    for (auto& s : snapshots_)
      if (hit(s.l1_offset, uint64_t(s.l1_size) * 8)) return what = "inactive L1 table", true;
  if (o & (overlap_active_l2 | overlap_refcount_block)) {
    for (uint64_t c = off / cs_; c <= (off + len - 1) / cs_; ++c) {
      auto it = meta_clusters_.find(c);
      if (it == meta_clusters_.end()) continue;
      if (it->second == 'r' && (o & overlap_refcount_block)) return what = "refcount block", true;
      if (it->second == 'l' && (o & overlap_active_l2)) return what = "active L2 table", true;
    }
  }
  return false;
}

void qcow2_driver::signal_corruption(const std::string& msg, int64_t offset, int64_t size) {
  bool fatal = writable();
  if (env_.emit) {
    boost::json::object ev{{"device", ""}, {"node-name", node_name_}, {"msg", msg}};
    if (offset >= 0) ev["offset"] = offset;
    if (size >= 0) ev["size"] = size;
    ev["fatal"] = fatal;
    env_.emit("BLOCK_IMAGE_CORRUPTED", std::move(ev));
  }
  if (!fatal || corrupt_) return;
  corrupt_ = true;
  // The image is marked so no later open trusts it for writing; nothing else is written from now on.
  h_.incompatible_features |= incompat_corrupt;
  ++background_;
  co::start(
      [](qcow2_driver* d) -> task<int> {
        int r = co_await d->write_header();
        if (r >= 0) r = co_await d->io(*d->file_, io_op::flush, 0, 0);
        co_return r;
      }(this),
      [this](int) {
        if (--background_ == 0) background_done_.wake_all();
      });
}

}  // namespace impl
}  // namespace blockd::qcow2

// The qcow2 driver's guest mapping: L1/L2 lookups and entry checks, extents, new and copied L2 tables, guest cluster locks, the synchronous control path, and corruption (overlap checks, the corrupt mark) (class: driver_impl.h); home iothread only.
#include "formats/qcow2/driver_impl.h"

namespace blockd::qcow2 {
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

// One entry of a table of big-endian 64-bit words at `table_offset`, written as the smallest
// aligned piece of the file holding it (its neighbours as they are in memory).
task<int> qcow2_driver::write_table_entry(const std::vector<uint64_t>& table, uint64_t table_offset, uint64_t index) {
  uint64_t chunk = std::max<uint64_t>(align_, 8);
  uint64_t byte = index * 8 / chunk * chunk;
  auto buf = make_buf(chunk);
  for (uint64_t i = 0; i < chunk / 8; ++i) {
    uint64_t idx = byte / 8 + i;
    put_be64(buf.get() + i * 8, idx < table.size() ? table[idx] : 0);
  }
  co_return co_await io(*file_, io_op::write, int64_t(table_offset + byte), int64_t(chunk)).buffer(buf.get());
}

task<int> qcow2_driver::write_l1_entry(uint64_t index) {
  file_->driver().debug_event(blkdebug_event::l1_update);
  co_return co_await write_table_entry(l1_, h_.l1_table_offset, index);
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
  file_->driver().debug_event(blkdebug_event::l2_alloc_write);
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
  if ((o & overlap_bitmap_directory) && !stored_.empty() &&
      hit(bm_ext_.directory_offset, bm_ext_.directory_size))
    return what = "bitmap directory", true;
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

// The qcow2 block driver: cluster mapping, allocation with copy-on-write, metadata caches and crash-ordered writeback; home iothread only.
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
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>

#include "formats/qcow2/qcow2_options.h"
#include "formats/qcow2/compress.h"
#include "formats/qcow2/create.h"
#include "formats/qcow2/qcow2.h"
#include "storage/block/node.h"
#include "storage/block/sync_io.h"

namespace blockd::qcow2 {

using namespace block;

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

namespace {

// ---- scatter lists -----------------------------------------------------------------------------

// The part [off, off+len) of a request's payload as its own scatter list.
struct iov_part {
  iovec inl[4];
  std::vector<iovec> heap;
  iovec* v = inl;
  int n = 0;
  iov_part(const io_request& r, int64_t off, int64_t len) {
    int64_t pos = 0;
    for (int i = 0; i < r.iovcnt && len > 0; ++i) {
      int64_t l = int64_t(r.iov[i].iov_len);
      if (pos + l <= off) {
        pos += l;
        continue;
      }
      int64_t skip = std::max<int64_t>(off - pos, 0);
      int64_t take = std::min(l - skip, len);
      push({static_cast<uint8_t*>(r.iov[i].iov_base) + skip, size_t(take)});
      len -= take;
      off += take;
      pos += l;
    }
  }
  void push(iovec e) {
    if (n < 4 && heap.empty()) {
      inl[n++] = e;
      return;
    }
    if (heap.empty()) heap.assign(inl, inl + n);
    heap.push_back(e);
    v = heap.data();
    n = int(heap.size());
  }
};

void iov_fill(const io_request& r, int64_t off, int64_t len, const uint8_t* src /* null = zeroes */) {
  iov_part p(r, off, len);
  for (int i = 0; i < p.n; ++i) {
    if (src) {
      std::memcpy(p.v[i].iov_base, src, p.v[i].iov_len);
      src += p.v[i].iov_len;
    } else {
      std::memset(p.v[i].iov_base, 0, p.v[i].iov_len);
    }
  }
}

void iov_copy_out(const io_request& r, int64_t off, int64_t len, uint8_t* dst) {
  iov_part p(r, off, len);
  for (int i = 0; i < p.n; ++i) {
    std::memcpy(dst, p.v[i].iov_base, p.v[i].iov_len);
    dst += p.v[i].iov_len;
  }
}

// Waits for a set of started tasks; the first error wins.
struct join_state {
  int left = 0;
  int err = 0;
  co::wait_list done;
};

// How one guest range maps (a run of the same kind inside one cluster, or across clusters).
enum class run_kind { data, zero, backing, compressed };
struct extent {
  run_kind kind = run_kind::zero;
  uint64_t host = 0;  // data: host offset of the first byte; compressed: descriptor host offset
  uint64_t csize = 0;  // compressed: bytes to read
  uint64_t len = 0;
  bool allocated_zero = false;
};

// SnapshotInfo as QMP shows an internal snapshot.
boost::json::object snapshot_info(const snapshot& s) {
  boost::json::object o{{"id", s.id},
                        {"name", s.name},
                        {"vm-state-size", int64_t(s.vm_state_size_large ? s.vm_state_size_large : s.vm_state_size)},
                        {"date-sec", s.date_sec},
                        {"date-nsec", s.date_nsec},
                        {"vm-clock-sec", int64_t(s.vm_clock_nsec / 1000000000)},
                        {"vm-clock-nsec", int64_t(s.vm_clock_nsec % 1000000000)}};
  if (s.icount != ~0ull) o["icount"] = s.icount;
  return o;
}

// A guest cluster's L2 words.
struct l2_words {
  uint64_t entry = 0;
  uint64_t bitmap = 0;
};

class qcow2_driver final : public block_driver {
 public:
  qcow2_driver(open_args& a) : env_(a.env), node_name_(a.node_name) {
    meta_lock_.bind(&env_.defer);
    cluster_wait_.bind(&env_.defer);
  }

  // ---- open --------------------------------------------------------------------------------------
  result<void> open(open_args& a);

  // ---- block_driver --------------------------------------------------------------------------------
  uint32_t caps() const override { return cap_write_zeroes | cap_discard | cap_block_status | cap_resize; }
  driver_limits limits() const override { return {align_, 0}; }
  int64_t length() const override { return int64_t(h_.size); }
  void submit(io_request& r) override;
  result<void> truncate(int64_t size) override;
  void child_perm(const std::string& role, bool read_only, uint32_t node_perm, uint32_t node_shared,
                  uint32_t& perm, uint32_t& shared) const override;
  image_facts facts() const override;
  void close() override;
  void inactivate() override;
  void wait_background();
  result<void> activate() override;
  void rehome(const driver_env& env) override { env_ = env; }
  bool supports_snapshots() const override { return true; }
  result<std::unique_ptr<reopen_state>> reopen_prepare(const reopen_args& a, std::vector<std::string>& consumed) override;
  result<void> snapshot_create(const std::string& name, int64_t date_sec, int64_t date_nsec) override;
  result<boost::json::object> snapshot_delete(const std::string* id, const std::string* name) override;

 private:
  // ---- helpers -----------------------------------------------------------------------------------
  uint64_t cs() const { return cs_; }
  bool ext() const { return h_.extended_l2(); }
  uint64_t unit() const { return ext() ? cs_ / 32 : cs_; }
  bool writable() const { return !read_only_; }
  co::child_io io(node& n, io_op op, int64_t off, int64_t len, uint32_t flags = 0) {
    if ((op == io_op::write || op == io_op::write_zeroes) && off + len > n.length() && &n != backing_) grow(n, off + len);
    return co::child_io(n, op, off, len, flags | ctl_flags_);
  }
  // Allocations go past the end of the image (or data) file, which a node refuses to write: the
  // file grows first, exactly to what is used (its length is visible as the file node's size, as
  // in QEMU). A file that cannot grow (a device) leaves the write to fail with the node's range error.
  void grow(node& n, int64_t end) {
    if (end > n.length()) (void)n.driver().truncate(end);
  }
  int run_sync(task<int> t);

  // ---- metadata cache ----------------------------------------------------------------------------
  task<int> load(meta_cache& c, uint64_t off, meta_block*& out, bool fresh = false);
  void unpin(meta_cache& c, meta_block* b) {
    if (--b->pins == 0 && b->error) c.erase(b->offset);
  }
  struct pin {
    qcow2_driver* d = nullptr;
    meta_cache* c = nullptr;
    meta_block* b = nullptr;
    pin() = default;
    pin(const pin&) = delete;
    pin& operator=(const pin&) = delete;
    ~pin() { reset(); }
    void reset() {
      if (b) d->unpin(*c, b);
      b = nullptr;
    }
  };

  // ---- mapping -----------------------------------------------------------------------------------
  task<int> lookup(uint64_t cluster, l2_words& out);
  task<int> l2_slot(uint64_t cluster, pin& p, size_t& index);  // the slice holding `cluster`'s entry
  static void put_words(meta_block* b, size_t index, bool ext, const l2_words& w) {
    uint8_t* p = b->data.get() + index * (ext ? 16 : 8);
    put_be64(p, w.entry);
    if (ext) put_be64(p + 8, w.bitmap);
  }
  extent classify(const l2_words& w, uint64_t in, uint64_t len) const;
  // Offset 0 means "no cluster" except in an external data file, where it is a real offset; there
  // every cluster has refcount 1, so the COPIED flag tells the two apart (as the spec says).
  bool has_host(const l2_words& w) const {
    if (w.entry & entry_compressed) return false;
    return (w.entry & offset_mask) || (h_.has_data_file() && (w.entry & entry_copied));
  }
  task<int> map(uint64_t goff, uint64_t maxlen, extent& out);
  bool check_entry(uint64_t cluster, const l2_words& w);

  // ---- refcounts and allocation ------------------------------------------------------------------
  task<int> get_refcount(uint64_t cl, uint64_t& out);
  task<int> set_refcount(uint64_t cl, uint64_t v);
  task<int> ensure_refblock(uint64_t rbi);
  task<int> grow_reftable(uint64_t rbi);
  task<int> alloc_clusters(uint64_t n, uint64_t& off, bool& fresh);
  task<int> alloc_area(uint64_t n, uint64_t& off);
  task<int> ensure_l2(uint64_t cluster);
  task<int> write_l1_entry(uint64_t index);
  // Why clusters are freed decides whether their space is discarded (pass-discard-* options).
  enum free_reason : uint8_t { free_other, free_request, free_snapshot };
  void queue_free(uint64_t host, uint64_t len, free_reason why = free_other) { pending_frees_.push_back({host, len, why}); }
  void free_for_entry(const l2_words& w, free_reason why = free_other);

  // ---- writeback ---------------------------------------------------------------------------------
  task<int> write_blocks(meta_cache& c);
  task<int> writeback();  // meta_lock_ held
  task<int> flush_all();
  task<int> write_header();
  task<int> mark_dirty_flag();
  task<int> maybe_writeback();

  // ---- guest requests ----------------------------------------------------------------------------
  task<int> do_read(io_request& r);
  task<int> read_extent(io_request& r, int64_t pos, uint64_t goff, const extent& e);
  task<int> read_old(uint64_t cluster, const l2_words& w, uint64_t in, uint64_t len, uint8_t* out);
  task<int> decompress(uint64_t host, uint64_t csize, uint8_t* out);
  task<int> do_write(io_request& r);
  task<int> write_cluster(io_request& r, int64_t pos, uint64_t cluster, uint64_t in, uint64_t n, bool zero);
  task<int> write_in_place_run(io_request& r);
  task<int> allocating_write(io_request& r, int64_t pos, uint64_t cluster, uint64_t in, uint64_t n, bool zero);
  task<int> do_zero_or_discard(io_request& r, bool discard);
  task<int> raw_data_zero(io_request& r, bool discard);
  task<int> zero_cluster_units(uint64_t cluster, uint64_t in, uint64_t n, bool discard, bool may_unmap);
  task<int> do_flush();
  task<int> do_block_status(io_request& r);
  task<int> do_truncate(int64_t size, std::string& err);
  task<int> load_metadata(std::string& err);
  task<int> rebuild_refcounts(std::string& err);
  task<int> read_range(uint64_t off, uint64_t len, aligned_buf& out);
  task<int> close_image();
  task<int> do_snapshot_create(const std::string& name, int64_t date_sec, int64_t date_nsec, std::string& err);
  task<int> do_snapshot_delete(size_t index, std::string& err);
  task<int> write_snapshot_table(std::vector<snapshot> next);
  task<int> sync_copied_flags();
  void start_piece(join_state* j, task<int> t);

  // Guest cluster locks: shared for in-place writes, exclusive for mapping changes.
  struct cluster_lock {
    int shared = 0;
    bool exclusive = false;
  };
  task<int> lock_cluster(uint64_t cl, bool exclusive);
  void unlock_cluster(uint64_t cl, bool exclusive);

  // ---- corruption --------------------------------------------------------------------------------
  void signal_corruption(const std::string& msg, int64_t offset, int64_t size);
  bool overlaps_metadata(uint64_t off, uint64_t len, std::string& what) const;

  // ---- state -------------------------------------------------------------------------------------
 public:
  driver_env env_;
  std::string node_name_;
  // Handles on the node's child slots: a child replaced by blockdev-reopen is used from the next
  // request on (see edge.h).
  child_ref file_;
  child_ref data_;     // the file slot unless the image has an external data file
  child_ref backing_;  // an empty slot: no backing file
  header h_;
  open_options o_;
  bool read_only_ = false;
  bool corrupt_ = false;
  bool dirty_flag_set_ = false;  // the header's dirty bit is on disk
  uint32_t align_ = 1;
  uint32_t ctl_flags_ = 0;
  uint64_t cs_ = 0;
  uint32_t cbits_ = 0;
  uint32_t l2_bits_ = 0;        // log2 of entries per L2 table
  uint64_t slice_entries_ = 0;  // L2 entries per cache slice
  uint64_t rb_entries_ = 0;     // refcounts per refcount block
  std::vector<uint64_t> l1_;    // host order, l1_cap_ entries (whole clusters)
  std::vector<uint64_t> reftable_;
  std::vector<snapshot> snapshots_;
  std::unique_ptr<meta_cache> l2_cache_;
  std::unique_ptr<meta_cache> rc_cache_;
  co::mutex meta_lock_;
  std::unordered_map<uint64_t, cluster_lock> cluster_locks_;
  co::wait_list cluster_wait_;
  struct pending_free {
    uint64_t host, len;
    uint8_t why;
  };
  std::vector<pending_free> pending_frees_;
  // Metadata clusters of the image file by cluster index: 'r' refcount block, 'l' active L2 table.
  std::unordered_map<uint64_t, char> meta_clusters_;
  uint64_t free_hint_ = 0;
  uint64_t fresh_end_ = 0;  // clusters at or past this offset were never written: they read as zeroes
  uint64_t last_compressed_ = ~0ull;
  uint64_t snapshot_table_bytes_ = 0;  // the snapshot table's extent in the file (overlap checks)
  uint64_t lookups_ = 0;
  int64_t last_clean_ns_ = 0;
  int background_ = 0;  // detached metadata writes (the corrupt mark); close waits for them
  co::wait_list background_done_{&env_.defer};
  aligned_buf compressed_cache_;
};

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

// ---- reads --------------------------------------------------------------------------------------

task<int> qcow2_driver::do_read(io_request& r) {
  int64_t pos = 0;
  while (pos < r.length) {
    extent e;
    uint64_t goff = uint64_t(r.offset + pos);
    int rc = co_await map(goff, uint64_t(r.length - pos), e);
    if (rc < 0) co_return rc;
    rc = co_await read_extent(r, pos, goff, e);
    if (rc < 0) co_return rc;
    pos += int64_t(e.len);
  }
  co_return 0;
}

task<int> qcow2_driver::read_extent(io_request& r, int64_t pos, uint64_t goff, const extent& e) {
  switch (e.kind) {
    case run_kind::data: {
      // A cluster past the end of the file reads as zeroes there (the file is sparse, as QEMU sees it).
      uint64_t flen = uint64_t(std::max<int64_t>(data_->length(), 0));
      uint64_t in_file = e.host < flen ? std::min(e.len, flen - e.host) : 0;
      if (in_file) {
        iov_part p(r, pos, int64_t(in_file));
        int rc = co_await io(*data_, io_op::read, int64_t(e.host), int64_t(in_file)).vector(p.v, p.n);
        if (rc < 0) co_return rc;
      }
      if (in_file < e.len) iov_fill(r, pos + int64_t(in_file), int64_t(e.len - in_file), nullptr);
      co_return 0;
    }
    case run_kind::zero:
      iov_fill(r, pos, int64_t(e.len), nullptr);
      co_return 0;
    case run_kind::backing: {
      uint64_t blen = backing_ ? uint64_t(std::max<int64_t>(backing_->length(), 0)) : 0;
      uint64_t in_backing = goff < blen ? std::min(e.len, blen - goff) : 0;
      if (in_backing) {
        iov_part p(r, pos, int64_t(in_backing));
        int rc = co_await io(*backing_, io_op::read, int64_t(goff), int64_t(in_backing)).vector(p.v, p.n);
        if (rc < 0) co_return rc;
      }
      if (in_backing < e.len) iov_fill(r, pos + int64_t(in_backing), int64_t(e.len - in_backing), nullptr);
      co_return 0;
    }
    case run_kind::compressed: {
      if (last_compressed_ != e.host) {
        int rc = co_await decompress(e.host, e.csize, compressed_cache_.get());
        if (rc < 0) co_return rc;
        last_compressed_ = e.host;
      }
      iov_fill(r, pos, int64_t(e.len), compressed_cache_.get() + (goff & (cs_ - 1)));
      co_return 0;
    }
  }
  co_return -EIO;
}

task<int> qcow2_driver::decompress(uint64_t host, uint64_t csize, uint8_t* out) {
  last_compressed_ = ~0ull;
  uint64_t start = host & ~uint64_t(511);
  uint64_t a = std::max<uint64_t>(align_, 512);
  start = start / a * a;
  uint64_t end = (host + csize + a - 1) / a * a;
  uint64_t flen = uint64_t(std::max<int64_t>(file_->length(), 0));
  if (host + csize > flen + 512 || end <= start) {
    signal_corruption("Compressed cluster at offset " + std::to_string(host) + " lies beyond the end of the image file",
                      int64_t(host), int64_t(csize));
    co_return -EIO;
  }
  if (end > flen) end = (flen + a - 1) / a * a;
  auto buf = make_buf(end - start);
  int r = co_await io(*file_, io_op::read, int64_t(start), int64_t(end - start)).buffer(buf.get());
  if (r < 0) co_return r;
  uint64_t skip = host - start;
  auto d = decompress_cluster(h_.compression_type, buf.get() + skip, size_t(std::min(csize, end - start - skip)), out,
                              size_t(cs_));
  if (!d) co_return -EIO;
  co_return 0;
}

// The current content of [in, in+len) of `cluster` under mapping `w`, into `out` (copy-on-write).
task<int> qcow2_driver::read_old(uint64_t cluster, const l2_words& w, uint64_t in, uint64_t len, uint8_t* out) {
  uint64_t done = 0;
  while (done < len) {
    extent e = classify(w, in + done, len - done);
    uint64_t goff = cluster * cs_ + in + done;
    switch (e.kind) {
      case run_kind::data: {
        int r = co_await io(*data_, io_op::read, int64_t(e.host), int64_t(e.len)).buffer(out + done);
        if (r < 0) co_return r;
        break;
      }
      case run_kind::zero: std::memset(out + done, 0, e.len); break;
      case run_kind::backing: {
        uint64_t blen = backing_ ? uint64_t(std::max<int64_t>(backing_->length(), 0)) : 0;
        uint64_t in_b = goff < blen ? std::min(e.len, blen - goff) : 0;
        if (in_b) {
          int r = co_await io(*backing_, io_op::read, int64_t(goff), int64_t(in_b)).buffer(out + done);
          if (r < 0) co_return r;
        }
        std::memset(out + done + in_b, 0, e.len - in_b);
        break;
      }
      case run_kind::compressed: {
        auto tmp = make_buf(cs_, false);
        int r = co_await decompress(e.host, e.csize, tmp.get());
        if (r < 0) co_return r;
        std::memcpy(out + done, tmp.get() + in + done, e.len);
        break;
      }
    }
    done += e.len;
  }
  co_return 0;
}

// ---- writes -------------------------------------------------------------------------------------

// write_in_place_run: the request cannot go out as one write; it is split per cluster instead.
constexpr int split_per_cluster = 1;
// Clusters one in-place run may span (a few MiB with the default cluster size).
constexpr uint64_t max_run_clusters = 64;

task<int> qcow2_driver::do_write(io_request& r) {
  if (corrupt_) co_return -EIO;
  if (r.op == io_op::write && uint64_t(r.length) > cs_ && !ext()) {
    int rc = co_await write_in_place_run(r);
    if (rc != split_per_cluster) co_return rc < 0 ? rc : co_await maybe_writeback();
  }
  join_state j;
  int64_t pos = 0;
  while (pos < r.length) {
    uint64_t goff = uint64_t(r.offset + pos);
    uint64_t cl = goff >> cbits_, in = goff & (cs_ - 1);
    uint64_t n = std::min<uint64_t>(uint64_t(r.length - pos), cs_ - in);
    start_piece(&j, write_cluster(r, pos, cl, in, n, r.op == io_op::write_zeroes));
    pos += int64_t(n);
  }
  while (j.left > 0) co_await j.done.wait();
  if (j.err < 0) co_return j.err;
  co_return co_await maybe_writeback();
}

// A write over several clusters that are all allocated, ours alone (COPIED) and back to back in the
// image file goes out as one write, as large as the guest's: a 1 MiB sequential write on a filled
// image is one host write rather than sixteen. The clusters are locked shared in ascending order
// (every other path holds one cluster lock at a time), so nothing reallocates them meanwhile.
// Anything else (a hole, a zero or compressed cluster, a gap on the host, a range the corruption
// checks would refuse) returns split_per_cluster and the per-cluster path takes the request.
task<int> qcow2_driver::write_in_place_run(io_request& r) {
  uint64_t first = uint64_t(r.offset) >> cbits_, last = (uint64_t(r.offset + r.length) - 1) >> cbits_;
  if (last - first + 1 > max_run_clusters) co_return split_per_cluster;
  uint64_t locked = 0, host0 = 0;
  int rc = 0;
  for (uint64_t cl = first; cl <= last; ++cl) {
    co_await lock_cluster(cl, false);
    ++locked;
    l2_words w;
    rc = co_await lookup(cl, w);
    if (rc < 0) break;
    bool usable = (w.entry & entry_copied) && has_host(w) && !(w.entry & entry_zero);
    uint64_t host = w.entry & offset_mask;
    if (cl == first) host0 = host;
    if (!usable || host != host0 + (cl - first) * cs_) {
      rc = split_per_cluster;
      break;
    }
  }
  if (rc == 0) {
    uint64_t start = host0 + (uint64_t(r.offset) & (cs_ - 1)), len = uint64_t(r.length);
    std::string what;
    if ((!h_.has_data_file() && start + len > fresh_end_ + cs_) ||
        (o_.overlap && !h_.has_data_file() && overlaps_metadata(start, len, what)))
      rc = split_per_cluster;  // the per-cluster path reports exactly which cluster is broken
    else
      rc = co_await io(*data_, io_op::write, int64_t(start), int64_t(len), r.flags & io_fua).vector(r.iov, r.iovcnt);
  }
  for (uint64_t i = 0; i < locked; ++i) unlock_cluster(first + i, false);
  co_return rc;
}

task<int> qcow2_driver::write_cluster(io_request& r, int64_t pos, uint64_t cl, uint64_t in, uint64_t n, bool zero) {
  co_await lock_cluster(cl, false);
  l2_words w;
  int rc = co_await lookup(cl, w);
  if (rc < 0) {
    unlock_cluster(cl, false);
    co_return rc;
  }
  // In place: the host cluster is ours alone and every touched unit already holds data.
  bool in_place = !zero && (w.entry & entry_copied) && has_host(w);
  if (in_place) {
    if (ext()) {
      uint64_t u = unit();
      for (uint64_t s = in / u; s <= (in + n - 1) / u; ++s)
        if (!(w.bitmap & (1ull << s))) in_place = false;
    } else if (w.entry & entry_zero) {
      in_place = false;
    }
  }
  if (in_place) {
    uint64_t host = (w.entry & offset_mask) + in;
    std::string what;
    if (!h_.has_data_file() && host + n > fresh_end_ + cs_) {
      // The mapping points past everything the image file holds or was given: a broken table.
      unlock_cluster(cl, false);
      signal_corruption("Data cluster of guest offset " + std::to_string(cl * cs_) + " lies beyond the end of the image",
                        int64_t(host), int64_t(n));
      co_return -EIO;
    }
    if (o_.overlap && !h_.has_data_file() && overlaps_metadata(host, n, what)) {
      unlock_cluster(cl, false);
      signal_corruption("Preventing invalid write on metadata (overlaps with " + what + ")", int64_t(host), int64_t(n));
      co_return -EIO;
    }
    iov_part p(r, pos, int64_t(n));
    rc = co_await io(*data_, io_op::write, int64_t(host), int64_t(n), r.flags & io_fua).vector(p.v, p.n);
    unlock_cluster(cl, false);
    co_return rc;
  }
  unlock_cluster(cl, false);
  co_await lock_cluster(cl, true);
  rc = co_await allocating_write(r, pos, cl, in, n, zero);
  unlock_cluster(cl, true);
  co_return rc;
}

task<int> qcow2_driver::allocating_write(io_request& r, int64_t pos, uint64_t cl, uint64_t in, uint64_t n, bool zero) {
  l2_words w;
  int rc = co_await lookup(cl, w);
  if (rc < 0) co_return rc;
  uint64_t u = unit();
  uint64_t u0 = in / u, u1 = (in + n - 1) / u;
  uint64_t wstart = u0 * u, wend = (u1 + 1) * u;
  uint64_t old_host = (w.entry & entry_compressed) ? 0 : (w.entry & offset_mask);
  bool reuse = has_host(w) && (w.entry & entry_copied);
  if (!ext() && reuse && !(w.entry & entry_zero) && !zero) {
    // Became in-place while we waited for the exclusive lock: plain write.
    iov_part p(r, pos, int64_t(n));
    co_return co_await io(*data_, io_op::write, int64_t(old_host + in), int64_t(n), r.flags & io_fua).vector(p.v, p.n);
  }
  uint64_t host = old_host;
  bool fresh = false;
  bool full_copy = false;
  {
    co_await meta_lock_.lock();
    co::guard g{meta_lock_};
    if (corrupt_) co_return -EIO;
    rc = co_await mark_dirty_flag();
    if (rc >= 0) rc = co_await ensure_l2(cl);
    if (rc < 0) co_return rc;
    if (!reuse) {
      if (h_.has_data_file()) {
        host = cl * cs_;  // an external data file maps guest clusters to the same offsets
      } else {
        rc = co_await alloc_clusters(1, host, fresh);
        if (rc < 0) co_return rc;
      }
      // Subclusters already allocated in a shared (or compressed) host cluster move with us.
      if (ext() && has_host(w)) full_copy = true;
      if (w.entry & entry_compressed) full_copy = true;
    }
  }
  if (full_copy) {
    wstart = 0;
    wend = cs_;
  }
  // A new cluster is readable as a whole as soon as its L2 entry exists: the file must cover all of it.
  if (!reuse && int64_t(host + cs_) > data_->length()) grow(*data_, int64_t(host + cs_));
  std::string what;
  if (!h_.has_data_file() && overlaps_metadata(host + wstart, wend - wstart, what)) {
    signal_corruption("Preventing invalid write on metadata (overlaps with " + what + ")", int64_t(host + wstart),
                      int64_t(wend - wstart));
    co_return -EIO;
  }
  // What the units around the written bytes must keep: their current content (backing, zero, old data).
  bool head_tail_zero = true;
  if (wstart < in || in + n < wend) {
    for (uint64_t s = wstart / u; s < wend / u && head_tail_zero; ++s) {
      if (s * u >= in && (s + 1) * u <= in + n) continue;
      extent e = classify(w, s * u, u);
      if (e.kind == run_kind::zero) continue;
      if (e.kind == run_kind::backing) {
        uint64_t blen = backing_ ? uint64_t(std::max<int64_t>(backing_->length(), 0)) : 0;
        if (cl * cs_ + s * u >= blen) continue;
      }
      head_tail_zero = false;
    }
  }
  if (fresh && head_tail_zero && !zero) {
    iov_part p(r, pos, int64_t(n));
    rc = co_await io(*data_, io_op::write, int64_t(host + in), int64_t(n), r.flags & io_fua).vector(p.v, p.n);
  } else if (fresh && head_tail_zero && zero) {
    // A never-written cluster already reads as zeroes (the file was grown over it above).
    rc = int64_t(host + cs_) > data_->length() ? -ENOSPC : 0;
  } else {
    auto buf = make_buf(wend - wstart, false);
    if (wstart < in) rc = co_await read_old(cl, w, wstart, in - wstart, buf.get());
    if (rc >= 0 && in + n < wend) rc = co_await read_old(cl, w, in + n, wend - in - n, buf.get() + (in + n - wstart));
    if (rc >= 0 && full_copy) {
      // The whole cluster moves: the units neither written nor partial keep their old content too.
      rc = co_await read_old(cl, w, 0, cs_, buf.get());
    }
    if (rc >= 0) {
      if (zero) std::memset(buf.get() + (in - wstart), 0, n);
      else iov_copy_out(r, pos, int64_t(n), buf.get() + (in - wstart));
      rc = co_await io(*data_, io_op::write, int64_t(host + wstart), int64_t(wend - wstart), r.flags & io_fua)
               .buffer(buf.get());
    }
  }
  co_await meta_lock_.lock();
  co::guard g{meta_lock_};
  if (rc < 0) {
    if (!reuse && !h_.has_data_file()) queue_free(host, cs_);
    co_return rc;
  }
  pin p;
  size_t idx = 0;
  rc = co_await l2_slot(cl, p, idx);
  if (rc < 0) {
    if (!reuse && !h_.has_data_file()) queue_free(host, cs_);
    co_return rc;
  }
  l2_words nw;
  nw.entry = host | entry_copied;
  if (ext()) {
    uint32_t mask = 0;
    for (uint64_t s = u0; s <= u1; ++s) mask |= 1u << s;
    uint32_t alloc = uint32_t(w.bitmap) | mask;
    if (full_copy && (w.entry & entry_compressed)) alloc = ~0u;
    uint32_t zeros = uint32_t(w.bitmap >> 32) & ~alloc;
    nw.bitmap = uint64_t(alloc) | (uint64_t(zeros) << 32);
  }
  put_words(p.b, idx, ext(), nw);
  l2_cache_->set_dirty(p.b, true);
  if (!reuse && (old_host || (w.entry & entry_compressed))) free_for_entry(w);
  co_return 0;
}

// Zeroes (write_zeroes) or discards whole units through the L2 table; partial units are written
// with zeroes (write_zeroes) or left alone (discard, which is advisory).
task<int> qcow2_driver::do_zero_or_discard(io_request& r, bool discard) {
  if (corrupt_) co_return -EIO;
  if (h_.has_data_file() && (h_.autoclear_features & autoclear_data_file_raw)) co_return co_await raw_data_zero(r, discard);
  bool may_unmap = discard || (r.flags & io_may_unmap);
  // Zeroing works per subcluster; discard, advisory anyway, per cluster (as QEMU 7.2 does).
  uint64_t u = discard ? cs_ : unit();
  int64_t pos = 0;
  // v2 images without extended L2 have no zero clusters: zeroing writes zeroes unless the range
  // can simply be deallocated (no backing file to show through).
  bool table_zero = h_.version >= 3 || ext() || (!backing_ && may_unmap);
  while (pos < r.length) {
    uint64_t goff = uint64_t(r.offset + pos);
    uint64_t cl = goff >> cbits_, in = goff & (cs_ - 1);
    uint64_t n = std::min<uint64_t>(uint64_t(r.length - pos), cs_ - in);
    uint64_t a0 = (in + u - 1) / u * u, a1 = (in + n) / u * u;
    bool tail_of_image = goff + n == h_.size;
    if (tail_of_image && a1 < in + n && (in + n) % u) a1 = std::min(cs_, (in + n + u - 1) / u * u);
    int rc = 0;
    if (!table_zero || a0 >= a1) {
      if (!discard) {
        if (r.flags & io_no_fallback) co_return -ENOTSUP;
        co_await lock_cluster(cl, true);
        rc = co_await allocating_write(r, pos, cl, in, n, true);
        unlock_cluster(cl, true);
      }
    } else {
      if (!discard && (a0 > in || a1 < in + n) && (r.flags & io_no_fallback)) co_return -ENOTSUP;
      co_await lock_cluster(cl, true);
      if (!discard && a0 > in) rc = co_await allocating_write(r, pos, cl, in, a0 - in, true);
      if (rc >= 0) rc = co_await zero_cluster_units(cl, a0, a1 - a0, discard, may_unmap);
      if (rc >= 0 && !discard && a1 < in + n)
        rc = co_await allocating_write(r, pos + int64_t(a1 - in), cl, a1, in + n - a1, true);
      unlock_cluster(cl, true);
    }
    if (rc < 0) co_return rc;
    pos += int64_t(n);
  }
  co_return co_await maybe_writeback();
}

// With a raw external data file the data file alone must stay a valid image of the disk: zeroes
// and discards go to it, and the mapping keeps pointing at it (guest offset = data file offset).
task<int> qcow2_driver::raw_data_zero(io_request& r, bool discard) {
  if (discard) {
    if (!o_.pass_discard_request) co_return 0;
    uint64_t a0 = (uint64_t(r.offset) + cs_ - 1) / cs_ * cs_, a1 = uint64_t(r.offset + r.length) / cs_ * cs_;
    if (a1 <= a0) co_return 0;
    co_return co_await io(*data_, io_op::discard, int64_t(a0), int64_t(a1 - a0));
  }
  int64_t pos = 0;
  while (pos < r.length) {
    uint64_t goff = uint64_t(r.offset + pos);
    uint64_t cl = goff >> cbits_, in = goff & (cs_ - 1);
    uint64_t n = std::min<uint64_t>(uint64_t(r.length - pos), cs_ - in);
    co_await lock_cluster(cl, true);
    l2_words w;
    int rc = co_await lookup(cl, w);
    bool mapped = rc >= 0 && has_host(w) && !(w.entry & entry_zero) && (!ext() || uint32_t(w.bitmap) == ~0u);
    if (rc >= 0 && mapped)
      rc = co_await io(*data_, io_op::write_zeroes, int64_t((w.entry & offset_mask) + in), int64_t(n),
                       r.flags & io_may_unmap);
    else if (rc >= 0)
      rc = co_await allocating_write(r, pos, cl, in, n, true);
    unlock_cluster(cl, true);
    if (rc < 0) co_return rc;
    pos += int64_t(n);
  }
  co_return 0;
}

task<int> qcow2_driver::zero_cluster_units(uint64_t cl, uint64_t in, uint64_t n, bool discard, bool may_unmap) {
  l2_words w;
  int rc = co_await lookup(cl, w);
  if (rc < 0) co_return rc;
  bool allocated = w.entry || w.bitmap;
  // Never-allocated clusters without a backing file already read as zeroes: nothing to record
  // (zeroing a whole fresh disk must not allocate its L2 tables).
  if (!allocated && !backing_) co_return 0;
  co_await meta_lock_.lock();
  co::guard g{meta_lock_};
  if (corrupt_) co_return -EIO;
  rc = co_await mark_dirty_flag();
  if (rc >= 0) rc = co_await ensure_l2(cl);
  if (rc < 0) co_return rc;
  uint64_t host = (w.entry & entry_compressed) ? 0 : (w.entry & offset_mask);
  bool keep_host = has_host(w) && (w.entry & entry_copied) && (!may_unmap || o_.discard_no_unref);
  l2_words nw;
  bool whole = in == 0 && n == cs_;
  if (!ext()) {
    if (h_.version >= 3) nw.entry = keep_host ? (host | entry_copied | entry_zero) : entry_zero;
    else nw.entry = 0;  // v2: deallocate (only reached without a backing file, or by discard)
  } else {
    uint32_t mask = 0;
    for (uint64_t s = in / unit(); s < (in + n) / unit(); ++s) mask |= 1u << s;
    uint32_t alloc = uint32_t(w.bitmap) & ~mask;
    uint32_t zeros = uint32_t(w.bitmap >> 32) | mask;
    bool drop = whole && !keep_host;
    nw.entry = drop || !has_host(w) ? 0 : (w.entry & ~entry_zero);
    if (w.entry & entry_compressed) {
      // A compressed cluster cannot keep part of itself: zeroing all of it is the only change.
      if (!whole) co_return -ENOTSUP;
      nw.entry = 0;
      alloc = 0;
      zeros = ~0u;
    }
    nw.bitmap = uint64_t(alloc) | (uint64_t(zeros) << 32);
  }
  pin p;
  size_t idx = 0;
  rc = co_await l2_slot(cl, p, idx);
  if (rc < 0) co_return rc;
  put_words(p.b, idx, ext(), nw);
  l2_cache_->set_dirty(p.b, true);
  bool host_dropped = (w.entry & entry_compressed) || (has_host(w) && !has_host(nw));
  if (host_dropped) {
    free_for_entry(w, free_request);  // the refcount drop waits for the next writeback; nothing in a data file
    if (discard && o_.pass_discard_request && h_.has_data_file())
      (void)co_await io(*data_, io_op::discard, int64_t(host), int64_t(cs_));
  } else if (keep_host && discard && o_.pass_discard_request) {
    (void)co_await io(*data_, io_op::discard, int64_t(host + in), int64_t(n));
  }
  co_return 0;
}

task<int> qcow2_driver::do_flush() {
  int r = 0;
  {
    co_await meta_lock_.lock();
    co::guard g{meta_lock_};
    r = co_await writeback();
  }
  if (r < 0) co_return r;
  if (data_ != file_) {
    r = co_await io(*data_, io_op::flush, 0, 0);
    if (r < 0) co_return r;
  }
  co_return co_await io(*file_, io_op::flush, 0, 0);
}

task<int> qcow2_driver::do_block_status(io_request& r) {
  extent e;
  int rc = co_await map(uint64_t(r.offset), uint64_t(r.length), e);
  if (rc < 0) co_return rc;
  r.status_length = int64_t(e.len);
  switch (e.kind) {
    case run_kind::data:
    case run_kind::compressed:
      r.status = bs_data | bs_allocated;
      r.depth = 1;
      break;
    case run_kind::zero:
      r.status = bs_zero | bs_allocated;
      r.depth = 1;
      break;
    case run_kind::backing: {
      uint64_t blen = backing_ ? uint64_t(std::max<int64_t>(backing_->length(), 0)) : 0;
      if (uint64_t(r.offset) >= blen) {
        r.status = bs_zero;
        r.depth = 0;
        break;
      }
      uint64_t len = std::min<uint64_t>(e.len, blen - uint64_t(r.offset));
      co::child_io c = io(*backing_, io_op::block_status, r.offset, int64_t(len));
      rc = co_await c;
      if (rc < 0) co_return rc;
      r.status = c.request().status & ~uint32_t(bs_allocated);
      r.status_length = std::min<int64_t>(c.request().status_length, int64_t(len));
      r.depth = c.request().depth > 0 && (c.request().status & bs_allocated) ? c.request().depth + 1
                : c.request().depth > 0                                     ? c.request().depth + 1
                                                                            : 0;
      break;
    }
  }
  co_return 0;
}

void qcow2_driver::submit(io_request& r) {
  task<int> t = [&]() -> task<int> {
    switch (r.op) {
      case io_op::read: return do_read(r);
      case io_op::write: return do_write(r);
      case io_op::write_zeroes: return do_zero_or_discard(r, false);
      case io_op::discard: return do_zero_or_discard(r, true);
      case io_op::flush: return do_flush();
      case io_op::block_status: return do_block_status(r);
    }
    return do_flush();
  }();
  // Completion must never happen inside submit (the driver contract): a request that needed no
  // I/O (zeroes, cached mapping) finishes on the next loop turn instead.
  struct state {
    bool in_submit = true;
    bool finished = false;
    int res = 0;
  };
  auto* st = new state;
  co::start(std::move(t), [&r, st](int res) {
    if (st->in_submit) {
      st->finished = true;
      st->res = res;
      return;
    }
    delete st;
    r.complete(res);
  });
  if (st->finished) {
    int res = st->res;
    delete st;
    env_.defer([&r, res] { r.complete(res); });
    return;
  }
  st->in_submit = false;  // still running: a child's completion finishes it
}

// ---- open ---------------------------------------------------------------------------------------

// Reads [off, off+len) of the image file, rounded out to the file's alignment and cut at its end.
task<int> qcow2_driver::read_range(uint64_t off, uint64_t len, aligned_buf& out) {
  uint64_t a = std::max<uint64_t>(align_, 1);
  uint64_t start = off / a * a;
  uint64_t end = (off + len + a - 1) / a * a;
  uint64_t flen = uint64_t(std::max<int64_t>(file_->length(), 0));
  auto buf = make_buf(end - start);
  uint64_t rend = std::min(end, flen);
  if (rend > start) {
    uint64_t rlen = (rend - start) / a * a;
    if (rlen) {
      int r = co_await io(*file_, io_op::read, int64_t(start), int64_t(rlen)).buffer(buf.get());
      if (r < 0) co_return r;
    }
  }
  if (start != off) std::memmove(buf.get(), buf.get() + (off - start), len);
  out = std::move(buf);
  co_return 0;
}

task<int> qcow2_driver::load_metadata(std::string& err) {
  uint64_t flen = uint64_t(std::max<int64_t>(file_->length(), 0));
  aligned_buf first;
  int r = co_await read_range(0, std::min<uint64_t>(flen, 4096), first);
  if (r < 0) co_return err = "Could not read qcow2 header: " + std::string(std::strerror(-r)), r;
  uint32_t cbits = flen >= 24 ? be32(first.get() + 20) : 0;
  uint64_t want = cbits >= min_cluster_bits && cbits <= max_cluster_bits ? std::min<uint64_t>(flen, uint64_t(1) << cbits)
                                                                         : std::min<uint64_t>(flen, 4096);
  if (want > 4096) {
    r = co_await read_range(0, want, first);
    if (r < 0) co_return err = "Could not read qcow2 header: " + std::string(std::strerror(-r)), r;
  }
  auto h = parse_header(std::span<const uint8_t>(first.get(), std::min<uint64_t>(flen, std::max<uint64_t>(want, 0))), flen);
  if (!h) co_return err = h.error().desc, -EINVAL;
  h_ = std::move(*h);
  cs_ = h_.cluster_size();
  cbits_ = h_.cluster_bits;
  l2_bits_ = cbits_ - (ext() ? 4 : 3);
  rb_entries_ = cs_ * 8 / h_.refcount_bits();
  if (h_.crypt_method)
    co_return err = "The qcow2 image is encrypted (" + std::string(h_.crypt_method == 1 ? "aes" : "luks") +
                    "); blockd does not support encrypted images yet: convert it with qemu-img to an unencrypted one",
                    -ENOTSUP;
  if ((h_.incompatible_features & incompat_corrupt) && writable())
    co_return err = "qcow2: Image is corrupt; cannot be opened read/write", -EACCES;
  if (h_.l1_size > max_l1_bytes / 8) co_return err = "Active L1 table too large", -EFBIG;
  if (h_.l1_size < h_.l1_entries_for(h_.size)) co_return err = "L1 table is too small", -EINVAL;
  if (h_.l1_size && (h_.l1_table_offset & (cs_ - 1))) co_return err = "Invalid L1 table offset", -EINVAL;
  if (uint64_t(h_.refcount_table_clusters) * cs_ > max_refcount_table_bytes)
    co_return err = "Reference count table too large", -EINVAL;
  if (h_.refcount_table_offset & (cs_ - 1) || !h_.refcount_table_clusters)
    co_return err = "Invalid reference count table offset", -EINVAL;
  if (h_.nb_snapshots > 65536) co_return err = "Too many snapshots", -EINVAL;
  if (h_.nb_snapshots && (h_.snapshots_offset & (cs_ - 1))) co_return err = "Invalid snapshot table offset", -EINVAL;

  // Active L1 table.
  l1_.assign(h_.l1_size, 0);
  if (h_.l1_size) {
    if (h_.l1_table_offset + uint64_t(h_.l1_size) * 8 > flen)
      co_return err = "Active L1 table lies beyond the end of the image file", -EINVAL;
    aligned_buf b;
    r = co_await read_range(h_.l1_table_offset, uint64_t(h_.l1_size) * 8, b);
    if (r < 0) co_return err = "Could not read L1 table: " + std::string(std::strerror(-r)), r;
    for (uint32_t i = 0; i < h_.l1_size; ++i) {
      l1_[i] = be64(b.get() + i * 8);
      auto d = decode_l1(h_, l1_[i]);
      if (!d.valid) co_return err = "Invalid L1 entry " + std::to_string(i) + ": " + d.why, -EINVAL;
      if (d.l2_offset && d.l2_offset + cs_ > flen)
        co_return err = "L2 table of L1 entry " + std::to_string(i) + " lies beyond the end of the image file", -EINVAL;
    }
  }
  // Refcount table.
  {
    uint64_t n = uint64_t(h_.refcount_table_clusters) * cs_ / 8;
    if (h_.refcount_table_offset + n * 8 > flen + cs_)
      co_return err = "Reference count table lies beyond the end of the image file", -EINVAL;
    aligned_buf b;
    r = co_await read_range(h_.refcount_table_offset, n * 8, b);
    if (r < 0) co_return err = "Could not read refcount table: " + std::string(std::strerror(-r)), r;
    reftable_.assign(n, 0);
    for (uint64_t i = 0; i < n; ++i) {
      reftable_[i] = be64(b.get() + i * 8);
      uint64_t off = reftable_[i] & offset_mask;
      if ((reftable_[i] & ~offset_mask) || (off & (cs_ - 1)) || (off && off + cs_ > flen + cs_))
        co_return err = "Invalid refcount table entry " + std::to_string(i), -EINVAL;
    }
  }
  // Snapshot table: read growing chunks until every entry parses.
  snapshots_.clear();
  if (h_.nb_snapshots) {
    uint64_t len = 65536;
    for (;;) {
      uint64_t avail = h_.snapshots_offset < flen ? flen - h_.snapshots_offset : 0;
      uint64_t take = std::min(len, avail);
      aligned_buf b;
      r = co_await read_range(h_.snapshots_offset, take, b);
      if (r < 0) co_return err = "Could not read snapshot table: " + std::string(std::strerror(-r)), r;
      auto s = parse_snapshots(b.get(), take, h_.nb_snapshots);
      if (s) {
        for (auto& x : *s) {
          if (uint64_t(x.l1_size) * 8 > max_l1_bytes) co_return err = "Snapshot L1 table too large", -EFBIG;
          if (x.l1_size && (x.l1_offset & (cs_ - 1) || x.l1_offset + uint64_t(x.l1_size) * 8 > flen))
            co_return err = "Snapshot L1 table offset invalid", -EINVAL;
        }
        snapshots_ = std::move(*s);
        snapshot_table_bytes_ = serialize_snapshots(snapshots_).size();
        break;
      }
      if (take < len || len >= (64u << 20)) co_return err = s.error().desc, -EINVAL;
      len *= 4;
    }
  }
  meta_clusters_.clear();
  for (uint64_t i = 0; i < reftable_.size(); ++i)
    if (reftable_[i] & offset_mask) meta_clusters_[(reftable_[i] & offset_mask) / cs_] = 'r';
  for (auto e : l1_)
    if (e & offset_mask) meta_clusters_[(e & offset_mask) / cs_] = 'l';
  fresh_end_ = (flen + cs_ - 1) / cs_ * cs_;
  free_hint_ = 0;
  co_return 0;
}

// Rebuilds every refcount from the tables that reference clusters (after a crash with lazy
// refcounts). The new refcount structures go past everything in use, then the header switches to
// them; the old ones simply become free space.
task<int> qcow2_driver::rebuild_refcounts(std::string& err) {
  uint64_t flen = uint64_t(std::max<int64_t>(file_->length(), 0));
  uint64_t nclusters = (flen + cs_ - 1) / cs_;
  std::vector<uint64_t> want(nclusters + 1, 0);
  bool beyond = false;
  // Everything counted must lie in the file: a table naming space past its end is corrupt, and
  // sizing the rebuild by it would let a hostile image ask for any amount of memory.
  auto add = [&](uint64_t off, uint64_t len) -> bool {
    if (!len) return true;
    uint64_t last = (off + len - 1) / cs_;
    if (off >= flen + cs_ || last >= nclusters + 1) {
      beyond = true;
      return false;
    }
    for (uint64_t c = off / cs_; c <= last; ++c) ++want[c];
    return true;
  };
  add(0, cs_);
  if (h_.nb_snapshots) {
    auto bytes = serialize_snapshots(snapshots_);
    add(h_.snapshots_offset, bytes.size());
  }
  auto walk_l1 = [&](const std::vector<uint64_t>& l1, uint64_t l1_off) -> task<int> {
    add(l1_off, l1.size() * 8);
    auto table = make_buf(cs_);
    for (auto e : l1) {
      uint64_t l2 = e & offset_mask;
      if (!l2) continue;
      add(l2, cs_);
      int r = co_await io(*file_, io_op::read, int64_t(l2), int64_t(cs_)).buffer(table.get());
      if (r < 0) co_return r;
      for (uint64_t i = 0; i < h_.l2_entries(); ++i) {
        l2_words w;
        w.entry = be64(table.get() + i * h_.l2_entry_size());
        if (w.entry & entry_compressed) {
          auto d = decode_l2(h_, w.entry);
          uint64_t start = d.m.host_offset & ~uint64_t(511);
          add(start, d.m.host_offset + d.m.compressed_size - start);
        } else if ((w.entry & offset_mask) && !h_.has_data_file()) {
          add(w.entry & offset_mask, cs_);
        }
      }
    }
    co_return 0;
  };
  int r = co_await walk_l1(l1_, h_.l1_table_offset);
  if (r < 0) co_return err = "Could not rebuild refcounts: " + std::string(std::strerror(-r)), r;
  for (auto& s : snapshots_) {
    aligned_buf b;
    r = co_await read_range(s.l1_offset, uint64_t(s.l1_size) * 8, b);
    if (r < 0) co_return err = "Could not rebuild refcounts: " + std::string(std::strerror(-r)), r;
    std::vector<uint64_t> l1(s.l1_size);
    for (uint32_t i = 0; i < s.l1_size; ++i) l1[i] = be64(b.get() + i * 8);
    r = co_await walk_l1(l1, s.l1_offset);
    if (r < 0) co_return err = "Could not rebuild refcounts: " + std::string(std::strerror(-r)), r;
  }
  if (beyond) co_return err = "Could not rebuild refcounts: a table points beyond the end of the image file", -EIO;
  // The new structures' own clusters, placed after the last cluster anything uses.
  uint64_t used_end = want.size();
  while (used_end > 1 && want[used_end - 1] == 0) --used_end;
  uint64_t area = used_end, k = 1, t = 1;
  for (int i = 0; i < 64; ++i) {
    uint64_t total = area + k + t;
    uint64_t k2 = (total + rb_entries_ - 1) / rb_entries_;
    uint64_t t2 = (k2 * 8 + cs_ - 1) / cs_;
    if (k2 == k && t2 == t) break;
    k = k2;
    t = t2;
  }
  if (want.size() < area + k + t) want.resize(area + k + t, 0);
  for (uint64_t c = area; c < area + k + t; ++c) want[c] = 1;
  uint64_t max_rc = h_.refcount_bits() >= 64 ? ~0ull : (uint64_t(1) << h_.refcount_bits()) - 1;
  auto table = make_buf(t * cs_);
  for (uint64_t i = 0; i < k; ++i) {
    auto blk = make_buf(cs_);
    bool any = false;
    for (uint64_t j = 0; j < rb_entries_; ++j) {
      uint64_t c = i * rb_entries_ + j;
      if (c >= want.size() || !want[c]) continue;
      if (want[c] > max_rc) co_return err = "Could not rebuild refcounts: a refcount overflows refcount-bits", -ERANGE;
      refcount_set(h_, blk.get(), j, want[c]);
      any = true;
    }
    if (!any) continue;
    r = co_await io(*file_, io_op::write, int64_t((area + i) * cs_), int64_t(cs_)).buffer(blk.get());
    if (r < 0) co_return err = "Could not rebuild refcounts: " + std::string(std::strerror(-r)), r;
    put_be64(table.get() + i * 8, (area + i) * cs_);
  }
  r = co_await io(*file_, io_op::write, int64_t((area + k) * cs_), int64_t(t * cs_)).buffer(table.get());
  if (r >= 0) r = co_await io(*file_, io_op::flush, 0, 0);
  if (r < 0) co_return err = "Could not rebuild refcounts: " + std::string(std::strerror(-r)), r;
  h_.refcount_table_offset = (area + k) * cs_;
  h_.refcount_table_clusters = uint32_t(t);
  h_.incompatible_features &= ~incompat_dirty;
  r = co_await write_header();
  if (r >= 0) r = co_await io(*file_, io_op::flush, 0, 0);
  if (r < 0) co_return err = "Could not rebuild refcounts: " + std::string(std::strerror(-r)), r;
  reftable_.assign(t * cs_ / 8, 0);
  for (uint64_t i = 0; i < reftable_.size(); ++i) reftable_[i] = be64(table.get() + i * 8);
  rc_cache_->clear_clean();
  meta_clusters_.clear();
  for (auto e : reftable_)
    if (e & offset_mask) meta_clusters_[(e & offset_mask) / cs_] = 'r';
  for (auto e : l1_)
    if (e & offset_mask) meta_clusters_[(e & offset_mask) / cs_] = 'l';
  fresh_end_ = std::max(fresh_end_, (area + k + t) * cs_);
  co_return 0;
}

std::string resolve_relative(const std::string& image, const std::string& name) {
  if (name.empty() || name[0] == '/' || name.find("://") != std::string::npos || name.rfind("json:", 0) == 0) return name;
  auto slash = image.rfind('/');
  if (slash == std::string::npos || image.rfind("json:", 0) == 0) return name;
  return image.substr(0, slash + 1) + name;
}

// The format of a backing file the header does not name: qcow2 by its magic, raw otherwise.
std::string probe_format(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return "raw";
  uint8_t m[4] = {};
  ssize_t n = ::pread(fd, m, 4, 0);
  ::close(fd);
  return n == 4 && be32(m) == magic ? "qcow2" : "raw";
}

result<void> qcow2_driver::open(open_args& a) {
  file_ = child_ref(a.edge("file"));
  if (!file_) return fail("qcow2 node needs a file child");
  data_ = file_;
  read_only_ = a.read_only;
  align_ = std::max<uint32_t>(file_->driver().limits().request_alignment, 1);
  std::string err;
  // Open runs before the node exists: children's I/O goes out directly under the control flag.
  int r = run_sync(load_metadata(err));
  if (r < 0) return fail(err.empty() ? "Could not open qcow2 image: " + std::string(std::strerror(-r)) : err);
  auto opts = parse_open_options(a.options, h_, h_.size, a.discard_unmap);
  if (!opts) return std::unexpected(opts.error());
  o_ = *opts;
  if (auto* enc = a.options.if_contains("encrypt"); enc && !h_.crypt_method) {
    std::string fmt = enc->is_object() && enc->as_object().contains("format")
                          ? std::string(enc->as_object().at("format").as_string())
                          : "aes";
    return fail("No encryption in image header, but options specified format '" + fmt + "'");
  }
  l2_cache_ = std::make_unique<meta_cache>(o_.l2_slice_bytes, o_.l2_cache_bytes / o_.l2_slice_bytes);
  rc_cache_ = std::make_unique<meta_cache>(cs_, o_.refcount_cache_bytes / cs_);
  slice_entries_ = o_.l2_slice_bytes / h_.l2_entry_size();
  compressed_cache_ = make_buf(cs_);

  // External data file.
  node* df = a.find_child("data-file");
  if (h_.has_data_file()) {
    if (!df) {
      if (h_.data_file.empty()) return fail("'data-file' is required for this image");
      if (!a.open_child) return fail("'data-file' is required for this image");
      // The name is used as it is (relative to the daemon's working directory), as QEMU does.
      boost::json::object o{{"driver", "file"}, {"filename", h_.data_file}};
      if (read_only_) o["read-only"] = true;
      auto c = a.open_child("data-file", o);
      if (!c) return std::unexpected(c.error());
      df = *c;
    }
    data_ = child_ref(a.edge("data-file"));
    align_ = std::max(align_, df->driver().limits().request_alignment);
  } else if (df) {
    return fail("'data-file' can only be set for images with an external data file");
  }

  // Backing file: given (a node, a reference, or null for none), or from the header.
  auto* bopt = a.options.if_contains("backing");
  backing_ = child_ref(a.edge("backing"));
  if (bopt) {
    // given: the slot holds it (or stays empty for null)
  } else if (!bopt && !h_.backing_file.empty() && a.open_child) {
    std::string self = a.filename_of ? a.filename_of(*file_) : "";
    std::string path = resolve_relative(self, h_.backing_file);
    struct stat st_self {}, st_back {};
    if (!self.empty() && ::stat(self.c_str(), &st_self) == 0 && ::stat(path.c_str(), &st_back) == 0 &&
        st_self.st_dev == st_back.st_dev && st_self.st_ino == st_back.st_ino)
      return fail("Backing file '" + path + "' of image '" + self + "' is the image itself");
    std::string fmt = h_.backing_format.empty() ? probe_format(path) : h_.backing_format;
    boost::json::object o{{"driver", fmt}, {"file", boost::json::object{{"driver", "file"}, {"filename", path}}},
                          {"read-only", true}};
    if (!find_driver(fmt)) return fail("Could not open backing file: Unknown driver '" + fmt + "'");
    auto c = a.open_child("backing", o);
    if (!c) return fail("Could not open backing file: " + c.error().desc);
  }
  if (backing_) align_ = std::max(align_, backing_->driver().limits().request_alignment);

  if (writable()) {
    if (h_.incompatible_features & incompat_dirty) {
      // A crash left refcounts behind (lazy refcounts): rebuild them before anything allocates.
      r = run_sync(rebuild_refcounts(err));
      if (r < 0) return fail(err);
    }
    // Autoclear features blockd does not keep up to date (persistent bitmaps) are dropped, so no
    // later reader trusts bitmaps that writes through blockd left stale.
    uint64_t keep = h_.autoclear_features & autoclear_data_file_raw;
    if (keep != h_.autoclear_features) {
      h_.autoclear_features = keep;
      r = run_sync([](qcow2_driver* d) -> task<int> {
        int rc = co_await d->write_header();
        if (rc >= 0) rc = co_await d->io(*d->file_, io_op::flush, 0, 0);
        co_return rc;
      }(this));
      if (r < 0) return fail("Could not update qcow2 header: " + std::string(std::strerror(-r)));
    }
  }
  return {};
}

// ---- control ------------------------------------------------------------------------------------

task<int> qcow2_driver::close_image() {
  int r = co_await flush_all();
  if (r < 0) co_return r;
  if (dirty_flag_set_) {
    h_.incompatible_features &= ~incompat_dirty;
    r = co_await write_header();
    if (r >= 0) r = co_await io(*file_, io_op::flush, 0, 0);
    if (r >= 0) dirty_flag_set_ = false;
  }
  co_return r;
}

void qcow2_driver::wait_background() {
  if (background_)
    (void)run_sync([](qcow2_driver* d) -> task<int> {
      while (d->background_) co_await d->background_done_.wait();
      co_return 0;
    }(this));
}

void qcow2_driver::close() {
  wait_background();
  if (writable() && !corrupt_ && l2_cache_) (void)run_sync(close_image());
  // Writing back may itself find corruption and start the corrupt mark: it finishes first too.
  wait_background();
}

void qcow2_driver::inactivate() {
  if (writable() && !corrupt_ && l2_cache_) (void)run_sync(close_image());
  wait_background();
}

result<void> qcow2_driver::activate() {
  // Another process may have changed the image while we were inactive: read the tables again.
  std::string err;
  l2_cache_->clear_clean();
  rc_cache_->clear_clean();
  int r = run_sync(load_metadata(err));
  if (r < 0) return fail(err);
  return {};
}

task<int> qcow2_driver::do_truncate(int64_t size, std::string& err) {
  if (size % 512) co_return err = "The new size must be a multiple of 512", -EINVAL;
  if (!snapshots_.empty()) co_return err = "Can't resize an image which has snapshots", -ENOTSUP;
  if (corrupt_) co_return err = "Image is corrupt; cannot be resized", -EIO;
  co_await meta_lock_.lock();
  co::guard g{meta_lock_};
  uint64_t old = h_.size;
  uint64_t nsize = uint64_t(size);
  if (nsize < old) {
    // Shrink: every cluster wholly past the new end is dropped.
    uint64_t first = (nsize + cs_ - 1) / cs_, last = (old + cs_ - 1) / cs_;
    for (uint64_t c = first; c < last; ++c) {
      l2_words w;
      int r = co_await lookup(c, w);
      if (r < 0) co_return err = "Could not shrink the image", r;
      if (!w.entry && !w.bitmap) continue;
      pin p;
      size_t idx = 0;
      r = co_await l2_slot(c, p, idx);
      if (r < 0) co_return err = "Could not shrink the image", r;
      put_words(p.b, idx, ext(), l2_words{});
      l2_cache_->set_dirty(p.b, true);
      free_for_entry(w);
    }
    int r = co_await writeback();
    if (r < 0) co_return err = "Could not shrink the image", r;
  } else if (nsize > old) {
    uint64_t need = h_.l1_entries_for(nsize);
    if (need * 8 > max_l1_bytes) co_return err = "Active L1 table too large", -EFBIG;
    if (need > l1_.size()) {
      uint64_t bytes = (need * 8 + cs_ - 1) / cs_ * cs_;
      uint64_t off = 0;
      bool fresh = false;
      int r = co_await alloc_clusters(bytes / cs_, off, fresh);
      if (r < 0) co_return err = "Could not grow the L1 table", r;
      auto buf = make_buf(bytes);
      for (uint64_t i = 0; i < l1_.size(); ++i) put_be64(buf.get() + i * 8, l1_[i]);
      r = co_await write_blocks(*rc_cache_);
      if (r >= 0) r = co_await io(*file_, io_op::flush, 0, 0);
      if (r >= 0) r = co_await io(*file_, io_op::write, int64_t(off), int64_t(bytes)).buffer(buf.get());
      if (r >= 0) r = co_await io(*file_, io_op::flush, 0, 0);
      if (r < 0) co_return err = "Could not grow the L1 table", r;
      uint64_t old_off = h_.l1_table_offset, old_n = h_.l1_size;
      h_.l1_table_offset = off;
      h_.l1_size = uint32_t(need);
      h_.size = nsize;
      r = co_await write_header();
      if (r >= 0) r = co_await io(*file_, io_op::flush, 0, 0);
      if (r < 0) {
        h_.l1_table_offset = old_off;
        h_.l1_size = uint32_t(old_n);
        h_.size = old;
        co_return err = "Could not update the qcow2 header", r;
      }
      l1_.resize(need, 0);
      if (old_n) queue_free(old_off, (old_n * 8 + cs_ - 1) / cs_ * cs_);
      co_return 0;
    }
  }
  h_.size = nsize;
  int r = co_await write_header();
  if (r >= 0) r = co_await io(*file_, io_op::flush, 0, 0);
  if (r < 0) {
    h_.size = old;
    co_return err = "Could not update the qcow2 header", r;
  }
  co_return 0;
}

result<void> qcow2_driver::truncate(int64_t size) {
  if (read_only_) return fail("Image is read-only");
  std::string err;
  int64_t old = int64_t(h_.size);
  int r = run_sync(do_truncate(size, err));
  if (r < 0) return fail(err.empty() ? std::string(std::strerror(-r)) : err);
  // The part of the old last cluster past the old end must read as zeroes now that it is visible.
  if (size > old && old % int64_t(cs_)) {
    int64_t end = std::min<int64_t>(size, (old + int64_t(cs_) - 1) / int64_t(cs_) * int64_t(cs_));
    io_request z;
    z.op = io_op::write_zeroes;
    z.offset = old;
    z.length = end - old;
    r = run_sync(do_zero_or_discard(z, false));
    if (r < 0) return fail("Could not zero the grown tail: " + std::string(std::strerror(-r)));
  }
  return {};
}

void qcow2_driver::child_perm(const std::string& role, bool read_only, uint32_t node_perm, uint32_t node_shared,
                              uint32_t& perm, uint32_t& shared) const {
  if (role == "backing") {
    // A backing file is only read; others may write it only if they keep its content (QEMU's COW rule).
    perm = (node_perm & (perm_consistent_read | perm_write | perm_write_unchanged)) ? uint32_t(perm_consistent_read) : 0u;
    shared = perm_consistent_read | perm_write_unchanged | ((node_shared & perm_write) ? uint32_t(perm_write | perm_resize) : 0u);
    return;
  }
  if (role == "data-file") {
    // Guest data only: what the node's users need, and everything shared but resizing (the
    // mapping assumes the data file's extent).
    perm = node_perm;
    shared = node_shared & ~uint32_t(perm_resize);
    return;
  }
  // The image file: metadata is written whenever the node may be written, and the file grows with
  // allocations; nobody else may write or resize it under the tables, even while we only read.
  perm = node_perm | perm_consistent_read;
  if (!read_only) perm |= perm_write | perm_resize;
  shared = (node_shared & perm_consistent_read) | perm_write_unchanged;
}

// Home thread only, like every other call (the contract checker verifies it): the node publishes
// the result for queries on other threads (node::publish_facts), so the header, the snapshot table
// and the feature bits are read here between two steps of the data path, never during one.
image_facts qcow2_driver::facts() const {
  image_facts f;
  f.virtual_size = int64_t(h_.size);
  // What the file node published (it publishes first: at open, and children first at a refresh).
  f.actual_size = file_->facts()->actual_size;
  f.has_dirty_flag = true;
  uint64_t incompat = h_.incompatible_features;
  f.dirty = incompat & incompat_dirty;
  f.cluster_size = int64_t(cs_);
  f.backing_filename = h_.backing_file;
  f.backing_format = h_.backing_format;
  boost::json::object d;
  d["compat"] = h_.version >= 3 ? "1.1" : "0.10";
  d["compression-type"] = h_.compression_type == compression::zstd ? "zstd" : "zlib";
  if (h_.version >= 3) {
    if (h_.has_data_file()) {
      d["data-file"] = h_.data_file;
      d["data-file-raw"] = bool(h_.autoclear_features & autoclear_data_file_raw);
    }
    d["extended-l2"] = ext();
    d["lazy-refcounts"] = bool(h_.compatible_features & compat_lazy_refcounts);
    d["corrupt"] = bool(incompat & incompat_corrupt);
  }
  d["refcount-bits"] = h_.refcount_bits();
  f.format_specific = boost::json::object{{"type", "qcow2"}, {"data", std::move(d)}};
  f.has_snapshots = true;
  for (auto& s : snapshots_) f.snapshots.push_back(snapshot_info(s));
  return f;
}

// blockdev-reopen: the common flags may change (read-only both ways); the driver's own options keep
// their values (the graph refuses changes to options a driver does not consume).
result<std::unique_ptr<block_driver::reopen_state>> qcow2_driver::reopen_prepare(const reopen_args& a,
                                                                                 std::vector<std::string>& consumed) {
  (void)consumed;
  if (!a.read_only && read_only_ && (h_.incompatible_features & incompat_corrupt))
    return fail("qcow2: Image is corrupt; cannot be opened read/write");
  struct state final : reopen_state {
    qcow2_driver* d;
    bool to_read_only;
    bool to_writable;
    void commit() override {
      if (to_read_only) {
        // Everything cached goes out and the image is marked clean before writes stop.
        if (!d->corrupt_) (void)d->run_sync(d->close_image());
        d->read_only_ = true;
      }
      if (to_writable) d->read_only_ = false;
    }
  };
  auto st = std::make_unique<state>();
  st->d = this;
  st->to_read_only = a.read_only && !read_only_;
  st->to_writable = !a.read_only && read_only_;
  return std::unique_ptr<reopen_state>(std::move(st));
}

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

result<std::unique_ptr<block_driver>> open_qcow2(open_args& a) {
  auto d = std::make_unique<qcow2_driver>(a);
  if (auto r = d->open(a); !r) {
    d->l2_cache_.reset();  // nothing to write back from a failed open
    return std::unexpected(r.error());
  }
  return std::unique_ptr<block_driver>(std::move(d));
}

}  // namespace

void register_qcow2_driver() {
  driver_entry e{"qcow2", false, {"file", "data-file", "backing"}, open_qcow2, nullptr, create_qcow2};
  e.runtime_options = {"lazy-refcounts",  "pass-discard-request", "pass-discard-snapshot", "pass-discard-other",
                       "discard-no-unref", "overlap-check",        "cache-size",            "l2-cache-size",
                       "l2-cache-entry-size", "refcount-cache-size", "cache-clean-interval", "data-file"};
  e.backing_from_image = true;
  e.options_type = "BlockdevOptionsQcow2";
  e.define_options = define_qcow2_options;  // qcow2_options.cpp
  e.create_options_type = "BlockdevCreateOptionsQcow2";
  e.define_create_options = define_qcow2_create_options;
  register_driver(std::move(e));
}

}  // namespace blockd::qcow2

// The qcow2 driver's class and the helpers its parts share (scatter lists, extents, L2 words); home iothread only. Parts: qcow2_cache.cpp (metadata cache, writeback), qcow2_alloc.cpp (refcounts, allocation), qcow2_map.cpp (mapping, L2 tables, cluster locks, corruption), qcow2_io.cpp (reads, writes, zero/discard, flush, block status), qcow2_open.cpp (open, repair), qcow2_control.cpp (close, reopen, facts, registration), qcow2_snapshots.cpp (internal snapshots), qcow2_compressed.cpp (compressed writes, copy-on-read), qcow2_bitmaps.cpp (persistent dirty bitmaps).
// Ordering rules that keep a crashed image consistent (at worst leaked clusters):
//  * a cluster's refcount reaches the disk (and a flush) before any L2 entry naming it is written;
//  * a new L2 table is written and flushed before the L1 entry naming it;
//  * a refcount decrement is applied only after the L2 change that dropped the reference is durable
//    (frees are queued and applied at the end of a writeback), so a freed cluster is never reused
//    while an old on-disk table still points at it;
//  * every metadata change and every writeback runs under one coroutine mutex (meta_lock_), so a
//    writeback sees a consistent set of tables; data I/O never takes it;
//  * bitmap data, tables and directories follow the same rule: refcounts durable before the header
//    names them, old clusters freed only once the header no longer does (qcow2_bitmaps.cpp).
// Guest clusters are locked shared (in-place writes) or exclusive (mapping changes), so a mapping
// never changes under a write still in flight to the old host cluster.
#pragma once
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>

#include "formats/qcow2/bitmap_dir.h"
#include "formats/qcow2/qcow2_options.h"
#include "formats/qcow2/compress.h"
#include "formats/qcow2/create.h"
#include "formats/qcow2/qcow2.h"
#include "formats/qcow2/qcow2_crypto.h"
#include "storage/block/iov.h"
#include "storage/block/node.h"
#include "storage/block/sync_io.h"

namespace blockd::qcow2 {

using namespace block;

// Internal to the driver's translation units (the driver is reached through its registration).
namespace impl {

// ---- scatter lists (storage/block/iov.h, over a request's payload) ------------------------------

struct iov_part : block::iov_part {
  iov_part(const io_request& r, int64_t off, int64_t len) : block::iov_part(r.iov, r.iovcnt, off, len) {}
};
inline void iov_fill(const io_request& r, int64_t off, int64_t len, const uint8_t* src /* null = zeroes */) {
  block::copy_to_iov(r.iov, r.iovcnt, off, src, len);
}
inline void iov_copy_out(const io_request& r, int64_t off, int64_t len, uint8_t* dst) {
  block::copy_from_iov(r.iov, r.iovcnt, off, dst, len);
}

// Waits for a set of started tasks; the first error wins.
struct join_state {
  int left = 0;
  int err = 0;
  co::wait_list done;
};

// Clusters one run (an in-place write, an allocated run, a copy-up) may span: a few MiB with the
// default cluster size.
constexpr uint64_t max_run_clusters = 64;

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
inline boost::json::object snapshot_info(const snapshot& s) {
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
  qcow2_driver(open_args& a) : env_(a.env), node_name_(a.node_name), bitmaps_(a.bitmaps) {
    meta_lock_.bind(&env_.defer);
    rmw_lock_.bind(&env_.defer);
    cluster_wait_.bind(&env_.defer);
  }

  // ---- open --------------------------------------------------------------------------------------
  result<void> open(open_args& a);

  // ---- block_driver --------------------------------------------------------------------------------
  uint32_t caps() const override {
    // Compressed clusters are never encrypted (QEMU stores them in the clear): an encrypted image takes none.
    return cap_write_zeroes | cap_discard | cap_block_status | cap_resize | (crypt_ ? 0u : uint32_t(cap_compress)) |
           cap_copy_on_read;
  }
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
  result<void> amend(const boost::json::object& options, bool force, const object_refs& objects) override;
  result<std::unique_ptr<reopen_state>> reopen_prepare(const reopen_args& a, std::vector<std::string>& consumed) override;
  result<void> snapshot_create(const std::string& name, int64_t date_sec, int64_t date_nsec) override;
  result<void> change_backing_file(const std::string& file, const std::string& format) override;
  result<boost::json::object> snapshot_delete(const std::string* id, const std::string* name) override;
  bool stores_bitmaps() const override { return true; }
  result<void> can_store_bitmap(const std::string& name, uint64_t granularity) override;
  result<void> remove_stored_bitmap(const std::string& name) override;

 private:
  // ---- helpers -----------------------------------------------------------------------------------
  uint64_t cs() const { return cs_; }
  bool ext() const { return h_.extended_l2(); }
  uint64_t unit() const { return ext() ? cs_ / 32 : cs_; }
  bool writable() const { return !read_only_; }
  // Encrypted images: a copy of `len` bytes of the request's payload at `pos`, encrypted for host
  // offset `host` (guest offset `guest`), in a buffer the caller writes out.
  aligned_buf encrypted_copy(const io_request& r, int64_t pos, uint64_t len, uint64_t host, uint64_t guest) const {
    auto b = make_buf(len, false);
    block::copy_from_iov(r.iov, r.iovcnt, pos, b.get(), int64_t(len));
    crypt_->encrypt(host, guest, b.get(), len);
    return b;
  }
  task<int> write_data(io_request& r, int64_t pos, uint64_t len, uint64_t host, uint64_t guest, uint32_t flags);
  co::child_io io(node& n, io_op op, int64_t off, int64_t len, uint32_t flags = 0) {
    if ((op == io_op::write || op == io_op::write_zeroes) && off + len > n.length() && &n != backing_ &&
        !(op == io_op::write && n.driver().extend_by_write(off + len)))
      grow(n, off + len);
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
  task<int> alloc_run(uint64_t n, uint64_t& off, bool& fresh);
  task<int> ensure_l2(uint64_t cluster);
  task<int> write_l1_entry(uint64_t index);
  task<int> write_table_entry(const std::vector<uint64_t>& table, uint64_t table_offset, uint64_t index);
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
  task<int> do_padded(io_request& r);  // encrypted images: reads/writes off 512-byte sectors
  task<int> read_extent(io_request& r, int64_t pos, uint64_t goff, const extent& e);
  task<int> read_plain(io_request& r, int64_t pos, uint64_t goff, uint64_t len);
  task<int> copy_up(io_request& r, int64_t pos, uint64_t goff, uint64_t len);
  task<int> read_old(uint64_t cluster, const l2_words& w, uint64_t in, uint64_t len, uint8_t* out);
  task<int> decompress(uint64_t host, uint64_t csize, uint8_t* out);
  task<int> do_write(io_request& r);
  task<int> write_cluster(io_request& r, int64_t pos, uint64_t cluster, uint64_t in, uint64_t n, bool zero);
  task<int> write_in_place_run(io_request& r);
  task<int> write_alloc_run(io_request& r);
  task<int> run_allocatable(uint64_t cluster, uint64_t off, uint64_t len);
  task<int> alloc_run_write(io_request& r, int64_t pos, uint64_t len, uint64_t first, uint64_t n);
  task<int> copy_up_run(io_request& r, int64_t pos, uint64_t cluster, uint64_t n, uint64_t& done);
  task<int> allocating_write(io_request& r, int64_t pos, uint64_t cluster, uint64_t in, uint64_t n, bool zero);
  task<int> do_write_compressed(io_request& r);
  task<int> write_compressed_cluster(io_request& r, int64_t pos, uint64_t cl, uint64_t n);
  task<int> alloc_compressed_bytes(uint64_t size, uint64_t& host);
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

  // ---- persistent dirty bitmaps (qcow2_bitmaps.cpp) -------------------------------------------------
  // A directory entry as on disk, with its bitmap table.
  struct stored_bitmap {
    bitmap_entry e;
    std::vector<uint64_t> table;
  };
  void set_bitmaps_header(const bitmaps_ext* e);
  task<int> read_bitmap_directory(std::string& err);
  std::vector<std::pair<uint64_t, uint64_t>> clusters_of(const stored_bitmap& s) const;
  void count_bitmap_clusters(const std::function<void(uint64_t, uint64_t)>& add) const;
  task<int> load_bitmaps(std::string& err);
  task<int> write_bitmap_directory(std::vector<stored_bitmap> next);
  task<int> rewrite_bitmap_flags(const std::vector<uint32_t>& flags);
  task<int> mark_bitmaps_in_use();
  task<int> guard_new_metadata(uint64_t off, uint64_t len, const char* what);
  task<int> write_bitmap(const dirty_bitmap& b, stored_bitmap& s);
  result<void> check_bitmap_constraints(const std::string& name, uint64_t granularity) const;
  task<int> store_bitmaps(bool release, std::string& err);
  result<void> check_bitmaps_resizable() const;
  boost::json::array bitmap_info() const;

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
  std::unique_ptr<crypto_ctx> crypt_;  // encrypted images only
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
  co::mutex rmw_lock_;  // encrypted images: one sector read-modify-write at a time
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
  uint64_t run_hint_ = 0;  // where the next scan for a free run starts (alloc_run)
  uint64_t fresh_end_ = 0;  // clusters at or past this offset were never written: they read as zeroes
  uint64_t last_compressed_ = ~0ull;
  uint64_t compress_cursor_ = 0;
  bool inactive_ = false;  // blockdev-set-active off (or opened inactive): reads must not write  // where the next compressed cluster may go (0: a new host cluster)
  uint64_t snapshot_table_bytes_ = 0;  // the snapshot table's extent in the file (overlap checks)
  uint64_t lookups_ = 0;
  int64_t last_clean_ns_ = 0;
  int background_ = 0;  // detached metadata writes (the corrupt mark); close waits for them
  co::wait_list background_done_{&env_.defer};
  aligned_buf compressed_cache_;
  // The node's bitmaps (open_args::bitmaps), the directory on disk in its order, and the extension.
  std::shared_ptr<bitmap_set> bitmaps_;
  std::vector<stored_bitmap> stored_;
  bitmaps_ext bm_ext_{};
  bool bitmaps_stale_ = false;  // an extension without the autoclear bit: ignored, dropped when writable
};

}  // namespace impl
}  // namespace blockd::qcow2

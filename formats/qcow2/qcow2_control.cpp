// The qcow2 driver's control path: close, (in)activate, truncate, permissions, facts, reopen, and its registration; home iothread only.
#include <cstdio>

#include "formats/qcow2/driver_impl.h"
#include "formats/luks/luks_driver.h"

namespace blockd::qcow2 {
namespace impl {

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
  if (writable() && !corrupt_ && l2_cache_) {
    // Bitmaps first (QEMU's order): their clusters are allocated, then everything is written back.
    std::string err;
    (void)run_sync(store_bitmaps(false, err));
    (void)run_sync(close_image());
  }
  // Writing back may itself find corruption and start the corrupt mark: it finishes first too.
  wait_background();
}

void qcow2_driver::inactivate() {
  inactive_ = true;  // another process may own the image now: no copy-on-read writes
  if (writable() && !corrupt_ && l2_cache_) {
    // The image holds the bitmaps from now on; activation loads them again.
    std::string err;
    (void)run_sync(store_bitmaps(true, err));
    (void)run_sync(close_image());
  }
  wait_background();
}

result<void> qcow2_driver::activate() {
  inactive_ = false;
  // Another process may have changed the image while we were inactive: read the tables again.
  std::string err;
  l2_cache_->clear_clean();
  rc_cache_->clear_clean();
  int r = run_sync(load_metadata(err));
  if (r < 0) return fail(err);
  r = run_sync(load_bitmaps(err));
  if (r < 0) return fail(err);
  if (writable()) {
    r = run_sync(mark_bitmaps_in_use());
    if (r < 0) return fail("Can't update bitmap directory: " + std::string(std::strerror(-r)));
  }
  return {};
}

task<int> qcow2_driver::do_truncate(int64_t size, std::string& err) {
  if (size % 512) co_return err = "The new size must be a multiple of 512", -EINVAL;
  if (!snapshots_.empty()) co_return err = "Can't resize an image which has snapshots", -ENOTSUP;
  if (corrupt_) co_return err = "Image is corrupt; cannot be resized", -EIO;
  if (auto b = check_bitmaps_resizable(); !b) co_return err = b.error().desc, -ENOTSUP;
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
    // A backing file is only read, and consistently only when the node's users read consistently
    // (QEMU's COW rule: a parent that only writes, or only rewrites unchanged data, asks for nothing);
    // others may write it only if they keep its content.
    perm = node_perm & perm_consistent_read;
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
// x-blockdev-amend: QEMU's qcow2 amend changes only the encryption, here LUKS key slots, whose
// material lives in the image's header area (luks_amend with every offset from the area's start).
// The node is quiesced; the header area is no cached metadata, so the writes go straight to the file.
result<void> qcow2_driver::amend(const boost::json::object& options, bool force, const object_refs& objects) {
  auto* enc = options.if_contains("encrypt");
  if (!enc || !enc->is_object()) return {};
  if (!crypt_) return fail("image is not encrypted, can't amend");
  if (crypt_->method != crypt_luks) return fail("Crypto format not supported");
  if (read_only_) return fail("Cannot amend the encryption of a read-only qcow2 node");
  sync_io sio(*file_);
  return luks::amend_luks(crypt_->luks, sio, enc->as_object(), force, objects, crypt_->secret, crypt_->hdr_offset);
}

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
    // The directory as the image holds it (in-use flags included), as QEMU reads it for queries.
    if (!stored_.empty()) d["bitmaps"] = bitmap_info();
    d["corrupt"] = bool(incompat & incompat_corrupt);
  }
  d["refcount-bits"] = h_.refcount_bits();
  if (crypt_) {
    d["encrypt"] = crypt_->info();
    f.encrypted = true;
  }
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
  if (!a.read_only && read_only_ && crypt_ && crypt_->method == crypt_aes)
    return fail("Use of AES-CBC encrypted qcow2 images is no longer supported in system emulators: convert it with "
                "qemu-img to an unencrypted qcow2 or a LUKS encrypted image");
  struct state final : reopen_state {
    qcow2_driver* d;
    bool to_read_only;
    bool to_writable;
    void commit() override {
      if (to_read_only) {
        // Bitmaps are stored and everything cached goes out, and the image is marked clean, before
        // writes stop; the stored bitmaps stay in the node, read-only.
        // This runs drained (a store before the drain would miss the writes still coming). A
        // commit cannot fail: bitmaps whose store failed stay in use on disk and are marked
        // inconsistent here too, so nobody trusts them (QEMU would refuse the reopen instead).
        bool stored = true;
        std::string err;
        if (!d->corrupt_) {
          stored = d->run_sync(d->store_bitmaps(false, err)) >= 0;
          (void)d->run_sync(d->close_image());
        }
        if (!stored)
          std::fprintf(stderr, "blockd: node '%s': could not store its dirty bitmaps at reopen to read-only: %s\n",
                       d->node_name_.c_str(), err.c_str());
        d->read_only_ = true;
        for (auto& b : d->bitmaps_->all())
          if (b->persistent) {
            b->readonly = true;
            if (!stored) {
              b->inconsistent = true;
              b->enabled = false;
            }
          }
      }
      if (to_writable) {
        d->read_only_ = false;
        // The stored bitmaps are blockd's to change again: in use on disk, writable in memory. A
        // failure leaves them read-only (QEMU only warns about it too).
        (void)d->run_sync(d->mark_bitmaps_in_use());
      }
    }
  };
  auto st = std::make_unique<state>();
  st->d = this;
  st->to_read_only = a.read_only && !read_only_;
  st->to_writable = !a.read_only && read_only_;
  return std::unique_ptr<reopen_state>(std::move(st));
}

result<std::unique_ptr<block_driver>> open_qcow2(open_args& a) {
  auto d = std::make_unique<qcow2_driver>(a);
  if (auto r = d->open(a); !r) {
    d->l2_cache_.reset();  // nothing to write back from a failed open
    return std::unexpected(r.error());
  }
  return std::unique_ptr<block_driver>(std::move(d));
}

}  // namespace impl

using impl::open_qcow2;


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

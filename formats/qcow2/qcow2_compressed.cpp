// The qcow2 driver's compressed writes (io_compress: the compress filter, backup's compress): one guest cluster at a time, packed byte by byte into shared host clusters (class: driver_impl.h); home iothread only.
#include "formats/qcow2/driver_impl.h"

namespace blockd::qcow2 {
namespace impl {

// As in QEMU, a compressed write only fills clusters nothing is allocated in: rewriting a cluster
// that holds data would need copy-on-write of the old data first, which nobody compressing (an
// image being filled once, a backup target) wants. Such a write fails with EIO.
task<int> qcow2_driver::do_write_compressed(io_request& r) {
  if (corrupt_) co_return -EIO;
  if (h_.has_data_file()) co_return -ENOTSUP;  // compressed clusters live in the image file itself
  if (uint64_t(r.offset) & (cs_ - 1)) co_return -EINVAL;
  // Whole clusters, except the image's last cluster, which may be partial (padded with zeroes).
  if ((uint64_t(r.length) & (cs_ - 1)) && uint64_t(r.offset + r.length) != h_.size) co_return -EINVAL;
  join_state j;
  for (int64_t pos = 0; pos < r.length; pos += int64_t(cs_)) {
    uint64_t n = std::min<uint64_t>(cs_, uint64_t(r.length - pos));
    start_piece(&j, write_compressed_cluster(r, pos, uint64_t(r.offset + pos) >> cbits_, n));
  }
  while (j.left > 0) co_await j.done.wait();
  if (j.err < 0) co_return j.err;
  co_return co_await maybe_writeback();
}

task<int> qcow2_driver::write_compressed_cluster(io_request& r, int64_t pos, uint64_t cl, uint64_t n) {
  auto plain = make_buf(cs_, n < cs_);  // zeroed when the last cluster is partial
  iov_copy_out(r, pos, int64_t(n), plain.get());
  // Compressing costs CPU on this thread; the cluster lock is not held meanwhile.
  auto packed = compress_cluster(h_.compression_type, plain.get(), size_t(cs_));
  if (!packed) co_return -EIO;
  if (packed->empty()) co_return co_await write_cluster(r, pos, cl, 0, n, false);  // does not shrink: stored plain

  co_await lock_cluster(cl, true);
  struct unlock {
    qcow2_driver* d;
    uint64_t cl;
    ~unlock() { d->unlock_cluster(cl, true); }
  } u{this, cl};
  l2_words w;
  int rc = co_await lookup(cl, w);
  if (rc < 0) co_return rc;
  if (has_host(w) || (w.entry & entry_compressed)) co_return -EIO;

  uint64_t size = packed->size();
  uint64_t host = 0;
  {
    co_await meta_lock_.lock();
    co::guard g{meta_lock_};
    if (corrupt_) co_return -EIO;
    rc = co_await mark_dirty_flag();
    if (rc >= 0) rc = co_await ensure_l2(cl);
    if (rc >= 0) rc = co_await alloc_compressed_bytes(size, host);
    if (rc < 0) co_return rc;
  }
  // The data goes out in whole units of the file's alignment (O_DIRECT), padded with zeroes, so no
  // two compressed clusters ever share a unit of a direct write.
  uint64_t a = std::max<uint64_t>(align_, 1);
  uint64_t wlen = (size + a - 1) / a * a;
  // An aligned buffer (O_DIRECT takes no other), zero-padded to the write's length.
  auto out = make_buf(wlen);
  std::memcpy(out.get(), packed->data(), size);
  std::string what;
  if (overlaps_metadata(host, wlen, what)) {
    signal_corruption("Preventing invalid write on metadata (overlaps with " + what + ")", int64_t(host), int64_t(wlen));
    co_return -EIO;
  }
  // The data before the mapping: until the L2 entry names it, the space is merely referenced.
  file_->driver().debug_event(blkdebug_event::write_compressed);
  rc = co_await io(*file_, io_op::write, int64_t(host), int64_t(wlen), r.flags & io_fua).buffer(out.get());
  co_await meta_lock_.lock();
  co::guard g{meta_lock_};
  if (rc < 0) {
    queue_free(host, size);
    co_return rc;
  }
  pin p;
  size_t idx = 0;
  rc = co_await l2_slot(cl, p, idx);
  if (rc < 0) {
    queue_free(host, size);
    co_return rc;
  }
  // Descriptor: the byte offset, and how many 512-byte sectors after the first the data touches.
  uint64_t extra_sectors = ((host + size - 1) >> 9) - (host >> 9);
  l2_words nw;
  nw.entry = entry_compressed | host | (extra_sectors << (62 - (cbits_ - 8)));
  nw.bitmap = 0;
  file_->driver().debug_event(blkdebug_event::l2_update_compressed);
  put_words(p.b, idx, ext(), nw);
  l2_cache_->set_dirty(p.b, true);
  // The read cache is keyed by host offset, and this one may be the offset of a freed cluster's data.
  last_compressed_ = ~0ull;
  co_return 0;
}

// Space for `size` bytes of compressed data: after the previous compressed cluster when it fits in
// the same host cluster (one more reference to it), else at the start of a newly allocated one.
// The cursor is forgotten when its cluster is freed (writeback), so freed space is never reused
// from here while something else may own it. meta_lock_ held.
task<int> qcow2_driver::alloc_compressed_bytes(uint64_t size, uint64_t& host) {
  file_->driver().debug_event(blkdebug_event::cluster_alloc_bytes);
  uint64_t a = std::max<uint64_t>(align_, 1);
  uint64_t need = (size + a - 1) / a * a;
  if (compress_cursor_) {
    uint64_t c = compress_cursor_ / cs_;
    if (compress_cursor_ + need <= (c + 1) * cs_) {
      uint64_t rc = 0;
      int r = co_await get_refcount(c, rc);
      if (r < 0) co_return r;
      bool room = h_.refcount_bits() >= 64 || rc + 1 < (uint64_t(1) << h_.refcount_bits());
      if (rc > 0 && room) {
        r = co_await set_refcount(c, rc + 1);
        if (r < 0) co_return r;
        host = compress_cursor_;
        compress_cursor_ += need;
        if (compress_cursor_ % cs_ == 0) compress_cursor_ = 0;
        co_return 0;
      }
    }
  }
  uint64_t off = 0;
  bool fresh = false;
  int r = co_await alloc_clusters(1, off, fresh);
  if (r < 0) co_return r;
  host = off;
  compress_cursor_ = need < cs_ ? off + need : 0;
  co_return 0;
}

}  // namespace impl
}  // namespace blockd::qcow2

namespace blockd::qcow2 {
namespace impl {

// [goff, goff+len) of the guest into the request at `pos`, as a plain read (no copying).
task<int> qcow2_driver::read_plain(io_request& r, int64_t pos, uint64_t goff, uint64_t len) {
  uint64_t done = 0;
  while (done < len) {
    extent e;
    int rc = co_await map(goff + done, len - done, e);
    if (rc < 0) co_return rc;
    e.len = std::min(e.len, len - done);
    if (e.kind == run_kind::backing) {
      // Read the backing part without the copy flag's detour.
      uint64_t blen = backing_ ? uint64_t(std::max<int64_t>(backing_->length(), 0)) : 0;
      uint64_t g = goff + done;
      uint64_t in_b = g < blen ? std::min(e.len, blen - g) : 0;
      if (in_b) {
        iov_part p(r, pos + int64_t(done), int64_t(in_b));
        rc = co_await io(*backing_, io_op::read, int64_t(g), int64_t(in_b)).vector(p.v, p.n);
        if (rc < 0) co_return rc;
      }
      if (in_b < e.len) iov_fill(r, pos + int64_t(done + in_b), int64_t(e.len - in_b), nullptr);
    } else {
      rc = co_await read_extent(r, pos + int64_t(done), goff + done, e);
      if (rc < 0) co_return rc;
    }
    done += e.len;
  }
  co_return 0;
}

// Copy-on-read of a range the image leaves to its backing file: each cluster is read whole from
// the backing chain and written into this image under the cluster's exclusive lock, the lock every
// write and allocation takes, so no guest write can land between the copy's read and its write.
// A cluster that got allocated meanwhile is simply read.
task<int> qcow2_driver::copy_up(io_request& r, int64_t pos, uint64_t goff, uint64_t len) {
  uint64_t done = 0;
  while (done < len) {
    uint64_t g = goff + done;
    uint64_t cl = g >> cbits_, in = g & (cs_ - 1);
    // Whole clusters (the image's last one may be partial) go as runs: read once, written once.
    uint64_t whole = in ? 0 : (g + (len - done) >= h_.size ? (h_.size - g + cs_ - 1) / cs_ : (len - done) / cs_);
    if (whole >= 2 && !ext() && !crypt_ && !h_.has_data_file()) {
      uint64_t did = 0;
      int rc = co_await copy_up_run(r, pos + int64_t(done), cl, std::min<uint64_t>(whole, max_run_clusters), did);
      if (rc < 0) co_return rc;
      if (did) {
        done += did;
        continue;
      }
    }
    uint64_t n = std::min(len - done, cs_ - in);
    co_await lock_cluster(cl, true);
    l2_words w;
    int rc = co_await lookup(cl, w);
    bool still_backing = rc >= 0 && classify(w, 0, cs_).kind == run_kind::backing && !has_host(w) &&
                         !(w.entry & entry_compressed);
    if (rc >= 0 && !still_backing) rc = co_await read_plain(r, pos + int64_t(done), g, n);
    if (rc >= 0 && still_backing) {
      uint64_t cstart = cl * cs_;
      uint64_t clen = std::min<uint64_t>(cs_, h_.size - cstart);  // the image's last cluster may be partial
      auto buf = make_buf(cs_);
      uint64_t blen = uint64_t(std::max<int64_t>(backing_->length(), 0));
      uint64_t in_b = cstart < blen ? std::min(clen, blen - cstart) : 0;
      if (in_b) rc = co_await io(*backing_, io_op::read, int64_t(cstart), int64_t(in_b)).buffer(buf.get());
      if (rc >= 0) {
        io_request copy;
        copy.op = io_op::write;
        copy.offset = int64_t(cstart);
        copy.set_buffer(buf.get(), int64_t(clen));
        rc = co_await allocating_write(copy, 0, cl, 0, clen, false);
      }
      if (rc >= 0) iov_fill(r, pos + int64_t(done), int64_t(n), buf.get() + in);
    }
    unlock_cluster(cl, true);
    if (rc < 0) co_return rc;
    done += n;
  }
  co_return co_await maybe_writeback();
}

// Copy-up of the whole clusters cluster..cluster+n-1, read into the request at `pos`: the leading
// clusters that still show their backing file are locked, read from it straight into the request's
// buffers and written from there as one allocated run (no bounce buffer, one write). `done`: the
// bytes handled (0 when the first cluster is not a backing one; the caller takes it alone).
task<int> qcow2_driver::copy_up_run(io_request& r, int64_t pos, uint64_t cluster, uint64_t n, uint64_t& done) {
  done = 0;
  uint64_t locked = 0;
  int rc = 0;
  for (uint64_t cl = cluster; cl < cluster + n; ++cl) {
    co_await lock_cluster(cl, true);
    l2_words w;
    rc = co_await lookup(cl, w);
    bool still_backing = rc >= 0 && classify(w, 0, cs_).kind == run_kind::backing && !has_host(w) &&
                         !(w.entry & entry_compressed) && !w.bitmap;
    if (!still_backing) {
      unlock_cluster(cl, true);
      break;
    }
    ++locked;
  }
  if (rc >= 0 && locked) {
    uint64_t start = cluster * cs_;
    uint64_t bytes = std::min<uint64_t>(locked * cs_, h_.size - start);
    uint64_t blen = uint64_t(std::max<int64_t>(backing_->length(), 0));
    uint64_t in_b = start < blen ? std::min(bytes, blen - start) : 0;
    if (in_b) {
      file_->driver().debug_event(blkdebug_event::read_backing_aio);
      iov_part p(r, pos, int64_t(in_b));
      rc = co_await io(*backing_, io_op::read, int64_t(start), int64_t(in_b)).vector(p.v, p.n);
    }
    if (rc >= 0 && in_b < bytes) iov_fill(r, pos + int64_t(in_b), int64_t(bytes - in_b), nullptr);
    if (rc >= 0) rc = co_await alloc_run_write(r, pos, bytes, cluster, locked);
    if (rc >= 0) done = bytes;
  }
  for (uint64_t i = 0; i < locked; ++i) unlock_cluster(cluster + i, true);
  co_return rc;
}

}  // namespace impl
}  // namespace blockd::qcow2

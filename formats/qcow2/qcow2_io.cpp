// The qcow2 driver's data path: reads (with decompression and backing), writes (in place and allocating, copy-on-write), zero/discard, flush and block status; home iothread only.
#include "formats/qcow2/driver_impl.h"

namespace blockd::qcow2 {
namespace impl {

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
      if (in_file && crypt_) {
        // Decrypted in a bounce buffer: the caller's pieces need not hold whole sectors. Bytes past
        // the end of the file decrypt from zeroes, as QEMU reads them.
        file_->driver().debug_event(blkdebug_event::read_aio);
        uint64_t whole = (e.len + crypt_sector - 1) / crypt_sector * crypt_sector;
        auto b = make_buf(whole);
        int rc = co_await io(*data_, io_op::read, int64_t(e.host), int64_t(in_file)).buffer(b.get());
        if (rc < 0) co_return rc;
        crypt_->decrypt(e.host, goff, b.get(), whole);
        iov_fill(r, pos, int64_t(e.len), b.get());
        co_return 0;
      }
      if (in_file) {
        file_->driver().debug_event(blkdebug_event::read_aio);
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
      if ((r.flags & io_copy_up) && backing_ && writable() && !inactive_) co_return co_await copy_up(r, pos, goff, e.len);
      uint64_t blen = backing_ ? uint64_t(std::max<int64_t>(backing_->length(), 0)) : 0;
      uint64_t in_backing = goff < blen ? std::min(e.len, blen - goff) : 0;
      if (in_backing) {
        file_->driver().debug_event(blkdebug_event::read_backing_aio);
        iov_part p(r, pos, int64_t(in_backing));
        int rc = co_await io(*backing_, io_op::read, int64_t(goff), int64_t(in_backing)).vector(p.v, p.n);
        if (rc < 0) co_return rc;
      }
      if (in_backing < e.len) iov_fill(r, pos + int64_t(in_backing), int64_t(e.len - in_backing), nullptr);
      co_return 0;
    }
    case run_kind::compressed: {
      if (last_compressed_ != e.host) {
        file_->driver().debug_event(blkdebug_event::read_compressed);
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
  // The last compressed cluster may end the file at any byte: a file without an alignment is read
  // up to its end exactly (the node refuses a read past it).
  if (end > flen) end = file_->driver().limits().request_alignment > 1 ? (flen + a - 1) / a * a : flen;
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
        if (crypt_) crypt_->decrypt(e.host, goff, out + done, e.len);
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

// `len` bytes of the request's payload at `pos` to host offset `host` of the data file: straight
// from the caller's buffers, or (encrypted image) from an encrypted copy, never encrypting in place.
task<int> qcow2_driver::write_data(io_request& r, int64_t pos, uint64_t len, uint64_t host, uint64_t guest,
                                   uint32_t flags) {
  if (crypt_) {
    auto b = encrypted_copy(r, pos, len, host, guest);
    co_return co_await io(*data_, io_op::write, int64_t(host), int64_t(len), flags).buffer(b.get());
  }
  iov_part p(r, pos, int64_t(len));
  co_return co_await io(*data_, io_op::write, int64_t(host), int64_t(len), flags).vector(p.v, p.n);
}

// write_in_place_run: the request cannot go out as one write; it is split per cluster instead.
constexpr int split_per_cluster = 1;

task<int> qcow2_driver::do_write(io_request& r) {
  if (corrupt_) co_return -EIO;
  if (r.op == io_op::write && uint64_t(r.length) > cs_ && !ext()) {
    int rc = co_await write_in_place_run(r);
    if (rc == split_per_cluster) rc = co_await write_alloc_run(r);
    if (rc != split_per_cluster) {
      if (rc < 0) co_return rc;
      co_return co_await maybe_writeback();  // no co_await inside a conditional expression (GCC 12)
    }
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
      rc = co_await write_data(r, 0, len, start, uint64_t(r.offset), r.flags & io_fua);
  }
  for (uint64_t i = 0; i < locked; ++i) unlock_cluster(first + i, false);
  co_return rc;
}

// A write over several clusters none of which has a host cluster yet (a fresh target of a mirror,
// a commit base, a sequential fill) allocates them as one run of back-to-back host clusters and goes
// out as one write, with one file growth and one pass over the L2 entries: per cluster it would be
// n allocations, n file growths and n small writes. The clusters are locked exclusive in ascending
// order, as write_in_place_run locks its own. Anything else returns split_per_cluster.
task<int> qcow2_driver::write_alloc_run(io_request& r) {
  if (crypt_ || h_.has_data_file() || (r.flags & io_copy_up)) co_return split_per_cluster;
  uint64_t first = uint64_t(r.offset) >> cbits_, last = (uint64_t(r.offset + r.length) - 1) >> cbits_;
  uint64_t n = last - first + 1;
  if (n > max_run_clusters) co_return split_per_cluster;
  uint64_t locked = 0;
  int rc = 0;
  for (uint64_t cl = first; cl <= last; ++cl) {
    co_await lock_cluster(cl, true);
    ++locked;
    rc = co_await run_allocatable(cl, uint64_t(r.offset), uint64_t(r.length));
    if (rc != 0) break;
  }
  if (rc == 0) rc = co_await alloc_run_write(r, 0, uint64_t(r.length), first, n);
  for (uint64_t i = 0; i < locked; ++i) unlock_cluster(first + i, true);
  co_return rc;
}

// 0 when guest cluster `cl` (locked exclusive) may join an allocated run written over
// [off, off+len): it has no host cluster and is not compressed, and the part of it the write leaves
// alone reads as zeroes (the run's head and tail are written as zeroes). Else split_per_cluster.
task<int> qcow2_driver::run_allocatable(uint64_t cl, uint64_t off, uint64_t len) {
  l2_words w;
  int rc = co_await lookup(cl, w);
  if (rc < 0) co_return rc;
  if (has_host(w) || (w.entry & entry_compressed) || w.bitmap) co_return split_per_cluster;
  uint64_t c0 = cl * cs_, c1 = std::min<uint64_t>(c0 + cs_, h_.size);
  bool whole = off <= c0 && off + len >= c1;
  if (whole || classify(w, 0, cs_).kind == run_kind::zero) co_return 0;
  uint64_t blen = backing_ ? uint64_t(std::max<int64_t>(backing_->length(), 0)) : 0;
  co_return c0 >= blen ? 0 : split_per_cluster;
}

// Writes `len` bytes of the request's payload from `pos` to the guest clusters first..first+n-1 (locked exclusive,
// each accepted by run_allocatable) through newly allocated, contiguous host clusters. The
// crash-ordering rules hold as for one cluster: the refcounts are set in the cache here, the data
// is written, and only then do the L2 entries change in the cache; writeback() writes refcounts,
// flushes, then L2 tables.
task<int> qcow2_driver::alloc_run_write(io_request& r, int64_t pos, uint64_t len, uint64_t first, uint64_t n) {
  uint64_t goff = uint64_t(r.offset + pos);
  uint64_t host = 0;
  bool fresh = false;
  int rc = 0;
  {
    co_await meta_lock_.lock();
    co::guard g{meta_lock_};
    if (corrupt_) co_return -EIO;
    rc = co_await mark_dirty_flag();
    for (uint64_t cl = first; rc >= 0 && cl < first + n; ++cl)
      if (cl == first || (cl & ((uint64_t(1) << l2_bits_) - 1)) == 0) rc = co_await ensure_l2(cl);
    if (rc >= 0) rc = co_await alloc_run(n, host, fresh);
    if (rc < 0) co_return rc;
  }
  uint64_t span = n * cs_;
  uint64_t head = goff - first * cs_, tail_at = head + len;
  // The file must cover the whole run before its L2 entries exist: a data write that reaches the
  // run's end lengthens it itself (io()); otherwise the file grows first.
  if (tail_at < span && int64_t(host + span) > data_->length()) grow(*data_, int64_t(host + span));
  std::string what;
  if (overlaps_metadata(host, span, what)) {
    signal_corruption("Preventing invalid write on metadata (overlaps with " + what + ")", int64_t(host), int64_t(span));
    co_return -EIO;
  }
  // Space that was used before holds old bytes: the parts of the edge clusters not written are zeroed.
  if (!fresh && head > 0) rc = co_await io(*data_, io_op::write_zeroes, int64_t(host), int64_t(head));
  if (rc >= 0 && !fresh && tail_at < span)
    rc = co_await io(*data_, io_op::write_zeroes, int64_t(host + tail_at), int64_t(span - tail_at));
  if (rc >= 0) {
    file_->driver().debug_event(blkdebug_event::write_aio);
    rc = co_await write_data(r, pos, len, host + head, goff, r.flags & io_fua);
  }
  co_await meta_lock_.lock();
  co::guard g{meta_lock_};
  if (rc < 0) {
    queue_free(host, span);
    co_return rc;
  }
  for (uint64_t i = 0; i < n; ++i) {
    pin p;
    size_t idx = 0;
    rc = co_await l2_slot(first + i, p, idx);
    if (rc < 0) {
      // The entries already set name their clusters; the rest are given back.
      queue_free(host + i * cs_, span - i * cs_);
      co_return rc;
    }
    l2_words nw;
    nw.entry = (host + i * cs_) | entry_copied;
    put_words(p.b, idx, false, nw);
    l2_cache_->set_dirty(p.b, true);
  }
  co_return 0;
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
    file_->driver().debug_event(blkdebug_event::write_aio);
    rc = co_await write_data(r, pos, n, host, cl * cs_ + in, r.flags & io_fua);
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
    file_->driver().debug_event(blkdebug_event::write_aio);
    co_return co_await write_data(r, pos, n, old_host + in, cl * cs_ + in, r.flags & io_fua);
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
  // Encrypted: zeroes on disk are not zeroes once decrypted, so the whole written range (head and
  // tail units included) goes out encrypted from the buffer below.
  if (crypt_ && (zero || wstart < in || in + n < wend)) head_tail_zero = false;
  // A new cluster is readable as a whole as soon as its L2 entry exists: the file must cover all of
  // it. A data write that ends at the cluster's end lengthens the file itself (io()).
  bool direct_write = fresh && head_tail_zero && !zero;
  bool write_reaches_end = direct_write ? in + n == cs_ : !(fresh && head_tail_zero) && wend == cs_;
  if (!reuse && !write_reaches_end && int64_t(host + cs_) > data_->length()) grow(*data_, int64_t(host + cs_));
  if (fresh && head_tail_zero && !zero) {
    file_->driver().debug_event(blkdebug_event::write_aio);
    rc = co_await write_data(r, pos, n, host + in, cl * cs_ + in, r.flags & io_fua);
  } else if (fresh && head_tail_zero && zero) {
    // A never-written cluster already reads as zeroes (the file was grown over it above).
    rc = int64_t(host + cs_) > data_->length() ? -ENOSPC : 0;
  } else {
    auto buf = make_buf(wend - wstart, false);
    // QEMU's copy-on-write: the old data around the written bytes is read first (cow_read), then
    // written together with the new data in one request (its merged case, announced as write_aio).
    if (wstart < in || in + n < wend || full_copy) file_->driver().debug_event(blkdebug_event::cow_read);
    if (wstart < in) rc = co_await read_old(cl, w, wstart, in - wstart, buf.get());
    if (rc >= 0 && in + n < wend) rc = co_await read_old(cl, w, in + n, wend - in - n, buf.get() + (in + n - wstart));
    if (rc >= 0 && full_copy) {
      // The whole cluster moves: the units neither written nor partial keep their old content too.
      rc = co_await read_old(cl, w, 0, cs_, buf.get());
    }
    if (rc >= 0) {
      if (zero) std::memset(buf.get() + (in - wstart), 0, n);
      else iov_copy_out(r, pos, int64_t(n), buf.get() + (in - wstart));
      if (crypt_) crypt_->encrypt(host + wstart, cl * cs_ + wstart, buf.get(), wend - wstart);
      file_->driver().debug_event(blkdebug_event::write_aio);
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
    if (rc >= 0 && mapped && !crypt_)  // (encrypted zeroes are written as data below)
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
  file_->driver().debug_event(blkdebug_event::flush_to_os);
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
  file_->driver().debug_event(blkdebug_event::flush_to_disk);
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

// An encrypted image's request off 512-byte sectors: the covering sectors are read (decrypted);
// a write lays its bytes over them and writes them back whole. Cycles run one at a time, so two
// writes into one sector never lose each other's bytes (as the luks driver does).
task<int> qcow2_driver::do_padded(io_request& r) {
  int64_t a0 = r.offset / int64_t(crypt_sector) * int64_t(crypt_sector);
  int64_t a1 = (r.offset + r.length + int64_t(crypt_sector) - 1) / int64_t(crypt_sector) * int64_t(crypt_sector);
  auto buf = make_buf(uint64_t(a1 - a0));
  io_request rr;
  rr.op = io_op::read;
  rr.flags = r.flags & io_copy_up;
  rr.offset = a0;
  rr.set_buffer(buf.get(), a1 - a0);
  if (r.op == io_op::read) {
    int rc = co_await do_read(rr);
    if (rc >= 0) block::copy_to_iov(r.iov, r.iovcnt, 0, buf.get() + (r.offset - a0), r.length);
    co_return rc;
  }
  co_await rmw_lock_.lock();
  co::guard g{rmw_lock_};
  int rc = co_await do_read(rr);
  if (rc < 0) co_return rc;
  block::copy_from_iov(r.iov, r.iovcnt, 0, buf.get() + (r.offset - a0), r.length);
  io_request w;
  w.op = io_op::write;
  w.flags = r.flags & io_fua;
  w.offset = a0;
  w.set_buffer(buf.get(), a1 - a0);
  co_return co_await do_write(w);
}

void qcow2_driver::submit(io_request& r) {
  bool off_sector = crypt_ && (r.op == io_op::read || (r.op == io_op::write && !(r.flags & io_compress))) &&
                    (r.offset % int64_t(crypt_sector) || r.length % int64_t(crypt_sector));
  task<int> t = [&]() -> task<int> {
    if (off_sector) return do_padded(r);
    switch (r.op) {
      case io_op::read: return do_read(r);
      case io_op::write: return (r.flags & io_compress) ? do_write_compressed(r) : do_write(r);
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

}  // namespace impl
}  // namespace blockd::qcow2

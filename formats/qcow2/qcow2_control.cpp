// The qcow2 driver's control path: open (metadata load, refcount rebuild), close, (in)activate, truncate, permissions, facts, reopen, internal snapshots, and its registration; home iothread only.
#include "formats/qcow2/driver_impl.h"

namespace blockd::qcow2 {
namespace impl {

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

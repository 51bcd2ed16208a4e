// The qcow2 driver's open and repair: reading and checking the header, tables and bitmap directory, backing and data files, and the refcount rebuild after a crash with lazy refcounts; home iothread only.
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
    file_->driver().debug_event(blkdebug_event::reftable_load);
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
  run_hint_ = 0;
  co_return co_await read_bitmap_directory(err);
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
  if (h_.crypt_method == crypt_luks)
    if (auto c = find_crypto_ext(h_, flen)) add(c->offset, c->length);  // the LUKS header area
  count_bitmap_clusters([&](uint64_t off, uint64_t len) { add(off, len); });
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
  if (h_.crypt_method) {
    // The LUKS header area is read whole (bounded by find_crypto_ext), then unlocked from memory.
    std::vector<uint8_t> area;
    uint64_t area_off = 0;
    uint64_t flen = uint64_t(std::max<int64_t>(file_->length(), 0));
    if (h_.crypt_method == crypt_luks) {
      if (auto c = find_crypto_ext(h_, flen)) {
        aligned_buf b;
        r = run_sync(read_range(c->offset, c->length, b));
        if (r < 0) return fail("Could not read encryption header: " + std::string(std::strerror(-r)));
        area.assign(b.get(), b.get() + c->length);
        area_off = c->offset;
      }
    }
    auto read_at = [&](uint64_t off, size_t len, uint8_t* out) -> int {
      if (off < area_off || off - area_off > area.size() || len > area.size() - (off - area_off)) return -EINVAL;
      std::memcpy(out, area.data() + (off - area_off), len);
      return 0;
    };
    static const object_refs no_objects;
    auto c = open_crypto(h_, a.options, a.objects ? *a.objects : no_objects, read_at, flen, writable());
    if (!c) return std::unexpected(c.error());
    crypt_ = std::move(*c);
    // The cipher works on whole 512-byte sectors (QEMU's request_alignment 512); requests off them
    // are padded by do_padded, as callers may send any byte range.
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

  // Stored bitmaps join the node's set before anything is written (a bad directory fails the open);
  // an inactive node loads them when it is activated, as QEMU does.
  if (!a.inactive) {
    r = run_sync(load_bitmaps(err));
    if (r < 0) return fail(err.empty() ? "Could not load bitmaps: " + std::string(std::strerror(-r)) : err);
  }

  if (writable()) {
    if (h_.incompatible_features & incompat_dirty) {
      // A crash left refcounts behind (lazy refcounts): rebuild them before anything allocates.
      r = run_sync(rebuild_refcounts(err));
      if (r < 0) return fail(err);
    }
    // Autoclear features blockd does not know are dropped, so no later reader trusts what they
    // describe; bitmaps another program left stale (no autoclear bit) lose their extension.
    uint64_t keep = h_.autoclear_features & (autoclear_data_file_raw | autoclear_bitmaps);
    if (bitmaps_stale_) set_bitmaps_header(nullptr);
    if (keep != h_.autoclear_features || bitmaps_stale_) {
      h_.autoclear_features &= keep;
      bitmaps_stale_ = false;
      r = run_sync([](qcow2_driver* d) -> task<int> {
        int rc = co_await d->write_header();
        if (rc >= 0) rc = co_await d->io(*d->file_, io_op::flush, 0, 0);
        co_return rc;
      }(this));
      if (r < 0) return fail("Could not update qcow2 header: " + std::string(std::strerror(-r)));
    }
    // From now on blockd may change the bitmaps: on disk they are in use until stored.
    if (!a.inactive) {
      r = run_sync(mark_bitmaps_in_use());
      if (r < 0) return fail("Can't update bitmap directory: " + std::string(std::strerror(-r)));
    }
  }
  return {};
}

}  // namespace impl
}  // namespace blockd::qcow2

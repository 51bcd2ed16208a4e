// qcow2 image creation (see create.h): checks the options like QEMU, plans the layout and streams it to the file node; the create job's worker thread.
#include "formats/qcow2/create.h"

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "formats/qcow2/layout.h"
#include "formats/qcow2/qcow2_crypto.h"
#include "storage/block/node.h"
#include "storage/block/sync_io.h"

namespace blockd::qcow2 {
namespace {

enum class prealloc_mode { off, metadata, falloc, full };

// QEMU's largest image length (BDRV_MAX_LENGTH): INT64_MAX rounded down to a GiB boundary.
constexpr uint64_t max_image_length = (uint64_t(1) << 63) - (uint64_t(1) << 30);
constexpr uint64_t min_extended_l2_cluster = 16384;  // 32 subclusters of at least 512 bytes
constexpr uint64_t write_chunk = 1 << 20;            // bytes per write request while streaming
constexpr uint64_t zero_chunk = 64ull << 20;         // bytes per write_zeroes request while preallocating

struct options {
  uint64_t size = 0;
  uint32_t version = 3;
  uint64_t cluster_size = 65536;
  bool extended_l2 = false;
  prealloc_mode prealloc = prealloc_mode::off;
  bool lazy_refcounts = false;
  int64_t refcount_bits = 16;
  bool data_file_raw = false;
  const boost::json::value* data_file = nullptr;
  std::optional<std::string> backing_file;
  std::optional<std::string> backing_fmt;
  compression compression_type = compression::zlib;
  const boost::json::object* encrypt = nullptr;  // QCryptoBlockCreateOptions
};

// The schema hands over sizes as int64 when they fit and as uint64 above; QAPI wraps negative
// numbers given for unsigned members, so an int64 is read back as its unsigned bit pattern.
uint64_t as_u64(const boost::json::value& v) {
  if (v.is_uint64()) return v.get_uint64();
  if (v.is_int64()) return uint64_t(v.get_int64());
  return 0;
}

bool is_pow2(uint64_t v) { return v && !(v & (v - 1)); }

uint32_t log2_of(uint64_t v) {
  uint32_t n = 0;
  while (v > 1) {
    v >>= 1;
    ++n;
  }
  return n;
}

uint64_t div_up(uint64_t a, uint64_t b) { return a / b + (a % b != 0); }
uint64_t align_up(uint64_t a, uint64_t b) { return div_up(a, b) * b; }

options parse(const boost::json::object& o) {
  options p;
  if (auto* v = o.if_contains("size")) p.size = as_u64(*v);
  if (auto* v = o.if_contains("version"); v && v->is_string()) p.version = v->get_string() == "v2" ? 2 : 3;
  if (auto* v = o.if_contains("cluster-size")) p.cluster_size = as_u64(*v);
  if (auto* v = o.if_contains("extended-l2"); v && v->is_bool()) p.extended_l2 = v->get_bool();
  if (auto* v = o.if_contains("preallocation"); v && v->is_string()) {
    auto s = v->get_string();
    if (s == "metadata") p.prealloc = prealloc_mode::metadata;
    else if (s == "falloc") p.prealloc = prealloc_mode::falloc;
    else if (s == "full") p.prealloc = prealloc_mode::full;
  }
  if (auto* v = o.if_contains("lazy-refcounts"); v && v->is_bool()) p.lazy_refcounts = v->get_bool();
  if (auto* v = o.if_contains("refcount-bits")) {
    // Values beyond int64 cannot be a valid width; keep them invalid rather than wrapping to one.
    p.refcount_bits = v->is_int64() ? v->get_int64() : -1;
  }
  if (auto* v = o.if_contains("data-file-raw"); v && v->is_bool()) p.data_file_raw = v->get_bool();
  if (auto* v = o.if_contains("data-file"); v && !v->is_null()) p.data_file = v;
  if (auto* v = o.if_contains("backing-file"); v && v->is_string()) p.backing_file = std::string(v->get_string());
  if (auto* v = o.if_contains("backing-fmt"); v && v->is_string()) p.backing_fmt = std::string(v->get_string());
  if (auto* v = o.if_contains("compression-type"); v && v->is_string() && v->get_string() == "zstd")
    p.compression_type = compression::zstd;
  if (auto* v = o.if_contains("encrypt"); v && v->is_object()) p.encrypt = &v->as_object();
  return p;
}

// The filename QEMU records for the data file: the node's own filename (what query-named-block-nodes
// shows), else a json: description of its options.
std::string node_filename(block::node& n) {
  const auto& s = n.settings();
  if (const auto* e = block::find_driver(s.driver); e && e->plain_filename) {
    try {
      std::string plain = e->plain_filename(s.options);
      if (!plain.empty()) return plain;
    } catch (const std::exception&) {
      // A driver whose plain name needs an option this node lacks: fall through to json:.
    }
  }
  boost::json::object o;
  o["driver"] = s.driver;
  for (auto& kv : s.options)
    if (kv.key() != "node-name" && kv.key() != "driver") o[kv.key()] = kv.value();
  return "json:" + boost::json::serialize(o);
}

// The feature name table QEMU writes into v3 images, so tools name the bits of this image.
std::vector<uint8_t> feature_table() {
  static const feature_name names[] = {
      {0, 0, "dirty bit"},     {0, 1, "corrupt bit"}, {0, 2, "external data file"}, {0, 3, "compression type"},
      {0, 4, "extended L2 entries"}, {1, 0, "lazy refcounts"}, {2, 0, "bitmaps"}, {2, 1, "raw external data"},
  };
  std::vector<uint8_t> out;
  for (auto& f : names) {
    uint8_t e[48] = {};
    e[0] = f.type;
    e[1] = f.bit;
    std::memcpy(e + 2, f.name.data(), std::min<size_t>(f.name.size(), 46));
    out.insert(out.end(), e, e + 48);
  }
  return out;
}

std::string errno_text(int neg) { return std::strerror(-neg); }

struct free_deleter {
  void operator()(uint8_t* p) const { std::free(p); }
};
using aligned_buffer = std::unique_ptr<uint8_t, free_deleter>;

// Page-aligned memory, so the buffers also suit a node opened with cache.direct.
aligned_buffer make_buffer(uint64_t bytes) {
  auto* p = static_cast<uint8_t*>(std::aligned_alloc(4096, align_up(bytes, 4096)));
  if (p) std::memset(p, 0, align_up(bytes, 4096));
  return aligned_buffer(p);
}

// Writes a byte stream from offset 0 of a node in large requests whose offsets and lengths keep the
// node's request alignment (a direct-I/O node refuses anything else). The first `head_len` bytes
// are also kept, so the caller can write the header over them last: an image that was cut short
// (cancelled, failed) then never carries the qcow2 magic.
class stream_writer {
 public:
  stream_writer(block::sync_io& io, uint64_t align, uint64_t head_len, const std::function<bool()>& cancelled)
      : io_(io), align_(align), cancelled_(cancelled), chunk_(align_up(write_chunk, align)),
        buf_(make_buffer(chunk_)), head_(head_len, 0) {}

  bool ok() const { return buf_ != nullptr; }
  uint64_t pos() const { return start_ + fill_; }
  std::vector<uint8_t>& head() { return head_; }

  result<void> put(const uint8_t* p, uint64_t n) {
    while (n) {
      uint64_t take = std::min(n, chunk_ - fill_);
      std::memcpy(buf_.get() + fill_, p, take);
      keep_head(p, take);
      fill_ += take;
      p += take;
      n -= take;
      if (fill_ == chunk_)
        if (auto r = drain(); !r) return r;
    }
    return {};
  }

  result<void> zeroes(uint64_t n) {
    while (n) {
      uint64_t take = std::min(n, chunk_ - fill_);
      std::memset(buf_.get() + fill_, 0, take);
      fill_ += take;  // the kept head starts out zero, so it needs no update
      n -= take;
      if (fill_ == chunk_)
        if (auto r = drain(); !r) return r;
    }
    return {};
  }

  // Up to the next multiple of `n` bytes of the stream (a cluster boundary).
  result<void> pad_to(uint64_t n) { return zeroes(align_up(pos(), n) - pos()); }

  // Writes what is left, padded with zeroes to the request alignment.
  result<void> finish() {
    uint64_t padded = align_up(fill_, align_);
    std::memset(buf_.get() + fill_, 0, padded - fill_);
    fill_ = padded;
    return drain();
  }

 private:
  void keep_head(const uint8_t* p, uint64_t n) {
    uint64_t at = pos();
    if (at >= head_.size()) return;
    std::memcpy(head_.data() + at, p, std::min<uint64_t>(n, head_.size() - at));
  }

  result<void> drain() {
    if (cancelled_ && cancelled_()) return fail("qcow2 image creation cancelled");
    if (fill_) {
      int r = io_.write(buf_.get(), int64_t(fill_), int64_t(start_));
      if (r < 0) return fail("Could not write qcow2 image: " + errno_text(r));
    }
    start_ += fill_;
    fill_ = 0;
    return {};
  }

  block::sync_io& io_;
  uint64_t align_;
  const std::function<bool()>& cancelled_;
  uint64_t chunk_;
  aligned_buffer buf_;
  std::vector<uint8_t> head_;
  uint64_t start_ = 0;
  uint64_t fill_ = 0;
};

// A driver's limits are fixed when it opens, so reading them from the job's thread is safe.
uint64_t node_alignment(block::node& n) {
  uint32_t a = n.driver().limits().request_alignment;
  return a > 1 ? a : 1;
}

// Preallocates [from, to) of a node. falloc lets the node allocate zeroed space (write_zeroes
// without unmapping becomes fallocate on files); full writes zero buffers, with the unaligned
// edges (if any) zeroed through write_zeroes, which the node pads itself.
result<void> fill_zeroes(block::sync_io& io, uint64_t from, uint64_t to, prealloc_mode mode, uint64_t align,
                         const std::function<bool()>& cancelled) {
  const std::string cancel_text = "qcow2 image creation cancelled";
  auto zero_range = [&](uint64_t a, uint64_t b) -> result<void> {
    for (uint64_t at = a; at < b; at += zero_chunk) {
      if (cancelled && cancelled()) return fail(cancel_text);
      uint64_t n = std::min(zero_chunk, b - at);
      int r = io.write_zeroes(int64_t(at), int64_t(n));
      if (r < 0) return fail("Could not preallocate data: " + errno_text(r));
    }
    return {};
  };
  if (from >= to) return {};
  if (mode == prealloc_mode::falloc) return zero_range(from, to);
  uint64_t mid_from = std::min(align_up(from, align), to);
  uint64_t mid_to = std::max(mid_from, to / align * align);
  if (auto r = zero_range(from, mid_from); !r) return r;
  uint64_t chunk = align_up(write_chunk, align);
  auto buf = make_buffer(chunk);
  if (!buf) return fail("Could not preallocate data: " + errno_text(-ENOMEM));
  for (uint64_t at = mid_from; at < mid_to; at += chunk) {
    if (cancelled && cancelled()) return fail(cancel_text);
    uint64_t n = std::min(chunk, mid_to - at);
    int r = io.write(buf.get(), int64_t(n), int64_t(at));
    if (r < 0) return fail("Could not preallocate data: " + errno_text(r));
  }
  return zero_range(mid_to, to);
}

}  // namespace

create_layout plan_layout(uint32_t cluster_bits, uint32_t refcount_order, uint64_t l1_entries, uint64_t l2_tables,
                          uint64_t data_clusters) {
  create_layout l;
  l.cluster_bits = cluster_bits;
  l.refcount_order = refcount_order;
  uint64_t cs = l.cluster_size();
  uint64_t per_block = cs * 8 >> refcount_order;  // refcounts in one refcount block
  uint64_t per_table_cluster = cs / 8;            // refcount block offsets in one table cluster
  l.l1_entries = l1_entries;
  l.l1_clusters = div_up(l1_entries * 8, cs);
  l.l2_tables = l2_tables;
  l.data_clusters = data_clusters;
  uint64_t fixed = 1 + l.l1_clusters + l2_tables + data_clusters;  // header, L1, L2s, data
  uint64_t table = 1, blocks = 1;
  for (;;) {
    uint64_t total = fixed + table + blocks;
    uint64_t need_blocks = std::max(blocks, div_up(total, per_block));
    uint64_t need_table = std::max(table, div_up(need_blocks, per_table_cluster));
    if (need_blocks == blocks && need_table == table) break;
    blocks = need_blocks;
    table = need_table;
  }
  l.reftable_offset = cs;
  l.reftable_clusters = table;
  l.refblock_offset = (1 + table) * cs;
  l.refblocks = blocks;
  uint64_t l1_at = l.refblock_offset + blocks * cs;
  l.l1_offset = l1_entries ? l1_at : 0;
  l.l2_offset = l1_at + l.l1_clusters * cs;
  l.data_offset = l.l2_offset + l2_tables * cs;
  l.clusters = fixed + table + blocks;
  return l;
}

result<void> create_qcow2(const block::create_args& a) {
  const auto& o = a.options;
  // QEMU opens the protocol node before it looks at any other option.
  auto* file_ref = o.if_contains("file");
  if (!file_ref) return fail("Parameter 'file' is missing");
  auto file_node = a.resolve(*file_ref);
  if (!file_node) return std::unexpected(file_node.error());
  block::node& file = **file_node;

  options p = parse(o);

  // Option checks, in QEMU's order so that a request with several problems gets the same message.
  if (p.size % 512) return fail("Image size must be a multiple of 512 bytes");
  if (p.extended_l2 && p.version < 3)
    return fail("Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or "
                "greater)");
  if (!is_pow2(p.cluster_size) || p.cluster_size < (uint64_t(1) << min_cluster_bits) ||
      p.cluster_size > (uint64_t(1) << max_cluster_bits))
    return fail("Cluster size must be a power of two between 512 and 2048k");
  if (p.extended_l2 && p.cluster_size < min_extended_l2_cluster)
    return fail("Extended L2 entries are only supported with cluster sizes of at least 16384 bytes");
  // Preallocated clusters would hide the backing file unless their subclusters can stay unallocated.
  if (p.backing_file && p.prealloc != prealloc_mode::off && !p.extended_l2)
    return fail("Backing file and preallocation can only be used at the same time if extended_l2 is on");
  if (p.backing_fmt && !p.backing_file) return fail("Backing format cannot be used without backing file");
  if (p.version < 3 && p.lazy_refcounts)
    return fail("Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)");
  if (p.refcount_bits < 1 || p.refcount_bits > 64 || !is_pow2(uint64_t(p.refcount_bits)))
    return fail("Refcount width must be a power of two and may not exceed 64 bits");
  if (p.version < 3 && p.refcount_bits != 16)
    return fail("Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or "
                "greater)");
  if (p.data_file_raw && !p.data_file) return fail("data-file-raw requires data-file");
  if (p.data_file_raw && p.backing_file) return fail("Backing file and data-file-raw cannot be used at the same time");
  // A raw data file must read the same through the qcow2 metadata, so every cluster gets mapped.
  if (p.data_file_raw && p.prealloc == prealloc_mode::off) p.prealloc = prealloc_mode::metadata;
  block::node* data = nullptr;
  if (p.data_file) {
    if (p.version < 3)
      return fail("External data files are only supported with compatibility level 1.1 and above (use version=v3 "
                  "or greater)");
    auto d = a.resolve(*p.data_file);
    if (!d) return std::unexpected(d.error());
    data = *d;
  }
  if (p.compression_type != compression::zlib && p.version < 3)
    return fail("Non-zlib compression type is only supported with compatibility level 1.1 and above (use "
                "version=v3 or greater)");
  // Encryption: the LUKS header area (with slot 0 for the secret) is built now, so a bad secret or
  // algorithm fails before anything is written; it goes into whole clusters after the L1 table.
  std::vector<uint8_t> crypto_area;
  if (p.encrypt) {
    auto* f = p.encrypt->if_contains("format");
    std::string fmt = f && f->is_string() ? std::string(f->get_string()) : "";
    if (fmt == "qcow")
      return fail("Creating AES-CBC encrypted qcow2 images is not supported: use encrypt.format=luks instead");
    if (fmt != "luks") return fail("Crypto format not supported in qcow2");
    if (p.prealloc != prealloc_mode::off)
      return fail("Preallocation of encrypted qcow2 images is not supported by blockd: use preallocation=off");
    if (data) return fail("An external data file cannot be used with encrypted qcow2 images in blockd");
    auto area = new_luks_area(*p.encrypt, *a.objects);
    if (!area) return std::unexpected(area.error());
    crypto_area = std::move(*area);
  }

  // The header.
  header h;
  h.version = p.version;
  h.cluster_bits = log2_of(p.cluster_size);
  h.size = p.size;
  h.refcount_order = log2_of(uint64_t(p.refcount_bits));
  h.header_length = p.version == 3 ? 112 : v2_header_length;  // v3: with the compression type byte, padded
  h.compression_type = p.compression_type;
  if (!crypto_area.empty()) {
    h.crypt_method = crypt_luks;
    h.extensions.push_back({ext_crypto_header, encode_crypto_ext({0, crypto_area.size()})});  // offset set below
  }
  if (p.extended_l2) h.incompatible_features |= incompat_extended_l2;
  if (p.compression_type != compression::zlib) h.incompatible_features |= incompat_compression;
  if (p.lazy_refcounts) h.compatible_features |= compat_lazy_refcounts;
  if (data) {
    h.incompatible_features |= incompat_data_file;
    if (p.data_file_raw) h.autoclear_features |= autoclear_data_file_raw;
    h.data_file = node_filename(*data);
    h.extensions.push_back({ext_data_file, {}});  // filled from h.data_file, before the feature table as in QEMU
  }
  // QEMU leaves the feature table out of images with clusters of 4 KiB or less, where its 392 bytes
  // would crowd out a backing file name.
  if (p.version == 3 && p.cluster_size > 4096) h.extensions.push_back({ext_feature_table, feature_table()});
  uint64_t l1_entries = h.l1_entries_for(p.size);
  h.l1_size = uint32_t(std::min<uint64_t>(l1_entries, UINT32_MAX));
  if (!serialize_header(h)) return fail("Could not update qcow2 header: No space left on device");

  // The virtual size, checked where QEMU's resize to it would fail.
  if (p.size > uint64_t(INT64_MAX)) return fail("Could not resize image: Image size cannot be negative");
  if (p.size > max_image_length)
    return fail("Could not resize image: offset(" + std::to_string(p.size) + ") exceeds maximum(" +
                std::to_string(max_image_length) + ")");
  if (l1_entries > max_l1_bytes / 8) return fail("Could not resize image: Failed to grow the L1 table: File too large");

  // The backing file name and format go in last, as QEMU assigns them after the resize.
  if (p.backing_file) {
    std::string what = "Could not assign backing file '" + *p.backing_file + "' with format '" +
                       (p.backing_fmt ? *p.backing_fmt : std::string("(null)")) + "': ";
    if (p.backing_file->size() > max_backing_name) return fail(what + "Invalid argument");
    h.backing_file = *p.backing_file;
    if (p.backing_fmt) h.backing_format = *p.backing_fmt;
    if (!serialize_header(h)) return fail(what + "No space left on device");
  }

  // The layout. Preallocation maps every guest cluster: to the same offset of the data file, or
  // to a data area after the metadata in the image file itself.
  uint64_t cs = p.cluster_size;
  uint64_t guest_clusters = div_up(p.size, cs);
  bool prealloc = p.prealloc != prealloc_mode::off;
  uint64_t l2_tables = prealloc ? l1_entries : 0;
  uint64_t data_clusters = prealloc && !data ? guest_clusters : 0;
  // The crypto header area takes the place of the (then absent) preallocated data clusters.
  uint64_t crypto_clusters = div_up(crypto_area.size(), cs);
  if (crypto_clusters) data_clusters = crypto_clusters;
  create_layout l = plan_layout(h.cluster_bits, h.refcount_order, l1_entries, l2_tables, data_clusters);
  for (auto& e : h.extensions)
    if (e.type == ext_crypto_header) e.data = encode_crypto_ext({l.data_offset, crypto_area.size()});
  if (l.reftable_clusters * cs > max_refcount_table_bytes)
    return fail("Could not resize image: Failed to resize refcount structures: File too large");
  h.l1_table_offset = l.l1_offset;
  h.refcount_table_offset = l.reftable_offset;
  h.refcount_table_clusters = uint32_t(l.reftable_clusters);
  auto header_bytes = serialize_header(h);
  if (!header_bytes) return fail("Could not update qcow2 header: No space left on device");

  block::sync_io io(file);
  uint64_t align = node_alignment(file);
  // Where the metadata ends: after the L2 tables, else (as in QEMU) right after the L1 entries,
  // else (size 0, no L1 table) after the refcount blocks.
  uint64_t meta_end = l.refblock_offset + l.refblocks * cs;
  if (l1_entries) meta_end = l.l1_offset + l1_entries * 8;
  if (prealloc) meta_end = l.data_offset;
  if (crypto_clusters) meta_end = l.data_offset + crypto_clusters * cs;
  uint64_t data_end = l.data_clusters ? l.data_offset + l.data_clusters * cs : 0;
  uint64_t file_len = align_up(std::max(meta_end, data_end), std::max<uint64_t>(align, 512));

  // Start from an empty file: what an earlier image left there must not show through the new one
  // (a device cannot shrink and keeps its length; that is fine, nothing is mapped beyond file_len).
  if (io.length() > 0) (void)io.truncate(0);
  if (io.length() < int64_t(file_len))
    if (auto r = io.truncate(int64_t(file_len)); !r) return fail("Could not resize image: " + r.error().desc);

  stream_writer w(io, align, std::max(cs, align), a.cancelled);
  if (!w.ok()) return fail("Could not write qcow2 image: " + errno_text(-ENOMEM));
  std::vector<uint8_t> cluster(cs, 0);
  auto put_cluster = [&]() { return w.put(cluster.data(), cs); };

  // Header cluster: zero for now, the real one goes in at the end.
  if (auto r = w.zeroes(cs); !r) return r;

  // Refcount table: one entry per refcount block, the blocks being contiguous.
  for (uint64_t c = 0; c < l.reftable_clusters; ++c) {
    std::fill(cluster.begin(), cluster.end(), 0);
    for (uint64_t i = 0; i < cs / 8; ++i) {
      uint64_t block = c * (cs / 8) + i;
      if (block >= l.refblocks) break;
      put_be64(&cluster[i * 8], l.refblock_offset + block * cs);
    }
    if (auto r = put_cluster(); !r) return r;
  }

  // Refcount blocks: every cluster below l.clusters is in use exactly once.
  uint64_t per_block = cs * 8 >> h.refcount_order;
  for (uint64_t b = 0; b < l.refblocks; ++b) {
    std::fill(cluster.begin(), cluster.end(), 0);
    uint64_t first = b * per_block;
    uint64_t n = first < l.clusters ? std::min(per_block, l.clusters - first) : 0;
    for (uint64_t i = 0; i < n; ++i) refcount_set(h, cluster.data(), i, 1);
    if (auto r = put_cluster(); !r) return r;
  }

  // L1 table: the preallocated L2 tables, in order, each referenced once (hence COPIED).
  {
    uint8_t e[8];
    for (uint64_t i = 0; i < l1_entries; ++i) {
      put_be64(e, prealloc ? (l.l2_offset + i * cs) | entry_copied : 0);
      if (auto r = w.put(e, 8); !r) return r;
    }
    if (prealloc || crypto_clusters)
      if (auto r = w.pad_to(cs); !r) return r;
  }
  if (crypto_clusters) {
    if (auto r = w.put(crypto_area.data(), crypto_area.size()); !r) return r;
    if (auto r = w.pad_to(cs); !r) return r;
  }

  // L2 tables. A data cluster in the image file sits at data_offset plus its guest offset; in an
  // external data file at its guest offset. COPIED also tells a data-file mapping at offset 0
  // from an unallocated entry. With extended L2 entries the subclusters stay unallocated, as in
  // QEMU, so a backing file still shows through; except over a raw data file, whose contents are
  // the guest data and must read the same through the image.
  if (prealloc) {
    uint64_t entry_size = h.l2_entry_size();
    uint64_t per_l2 = cs / entry_size;
    uint64_t bitmap = p.data_file_raw && p.extended_l2 ? 0xffffffffull : 0;
    for (uint64_t t = 0; t < l2_tables; ++t) {
      std::fill(cluster.begin(), cluster.end(), 0);
      for (uint64_t i = 0; i < per_l2; ++i) {
        uint64_t g = t * per_l2 + i;
        if (g >= guest_clusters) break;
        uint64_t host = data ? g * cs : l.data_offset + g * cs;
        put_be64(&cluster[i * entry_size], host | entry_copied);
        if (p.extended_l2) put_be64(&cluster[i * entry_size + 8], bitmap);
      }
      if (auto r = put_cluster(); !r) return r;
    }
  }

  // Data clusters in the image file: full writes them through the stream; falloc asks the node.
  if (p.prealloc == prealloc_mode::full && l.data_clusters)
    if (auto r = w.zeroes(l.data_clusters * cs); !r) return r;
  uint64_t streamed = w.pos();
  if (auto r = w.finish(); !r) return r;
  if (p.prealloc == prealloc_mode::falloc && l.data_clusters) {
    // The stream's alignment padding may already have zeroed the start of the data area.
    uint64_t from = std::max(l.data_offset, align_up(streamed, align));
    if (auto r = fill_zeroes(io, from, data_end, prealloc_mode::falloc, align, a.cancelled); !r) return r;
  }

  // The external data file grows to the virtual size; preallocation applies to what it grows by,
  // so an existing raw image (data-file-raw) keeps its contents.
  if (data) {
    block::sync_io dio(*data);
    int64_t old_len = dio.length();
    if (old_len < int64_t(p.size)) {
      if (auto r = dio.truncate(int64_t(p.size)); !r) return fail("Could not resize image: " + r.error().desc);
      if (p.prealloc == prealloc_mode::falloc || p.prealloc == prealloc_mode::full)
        if (auto r = fill_zeroes(dio, uint64_t(old_len), p.size, p.prealloc, node_alignment(*data), a.cancelled); !r)
          return r;
    }
    if (int r = dio.flush(); r < 0) return fail("Could not flush the data file: " + errno_text(r));
  }

  // Everything the header points to is on the node; now make it an image.
  if (a.cancelled && a.cancelled()) return fail("qcow2 image creation cancelled");
  if (int r = io.flush(); r < 0) return fail("Could not write qcow2 header: " + errno_text(r));
  auto& head = w.head();
  std::memcpy(head.data(), header_bytes->data(), header_bytes->size());
  auto first = make_buffer(head.size());  // aligned memory for a direct-I/O node
  if (!first) return fail("Could not write qcow2 header: " + errno_text(-ENOMEM));
  std::memcpy(first.get(), head.data(), head.size());
  if (int r = io.write(first.get(), int64_t(head.size()), 0); r < 0)
    return fail("Could not write qcow2 header: " + errno_text(r));
  if (int r = io.flush(); r < 0) return fail("Could not write qcow2 header: " + errno_text(r));
  return {};
}

}  // namespace blockd::qcow2

// qcow2 header parsing/serialization and table entry decoding (see layout.h); pure functions, any thread.
#include "formats/qcow2/layout.h"

#include <algorithm>
#include <cstdio>
#include <cstring>

namespace blockd::qcow2 {
namespace {

std::string hex(uint64_t v) {
  char b[32];
  std::snprintf(b, sizeof b, "%llx", static_cast<unsigned long long>(v));
  return b;
}

// A table of `entries` entries of `entry_size` bytes at `offset`: cluster aligned and addressable.
bool table_ok(const header& h, uint64_t offset, uint64_t entries, uint64_t entry_size) {
  if (entries > (uint64_t(INT64_MAX) / entry_size)) return false;
  uint64_t bytes = entries * entry_size;
  if (offset > uint64_t(INT64_MAX) - bytes) return false;
  return (offset & (h.cluster_size() - 1)) == 0;
}

}  // namespace

uint64_t header::l1_entries_for(uint64_t virtual_size) const {
  uint64_t per_l1 = l2_entries() * cluster_size();  // guest bytes one L2 table maps
  return (virtual_size + per_l1 - 1) / per_l1;
}

std::string unknown_features(const header& h, uint64_t bits) {
  std::string out;
  for (uint32_t bit = 0; bit < 64; ++bit) {
    if (!(bits & (1ull << bit))) continue;
    std::string name;
    for (auto& f : h.features)
      if (f.type == 0 && f.bit == bit) name = f.name;
    if (name.empty()) name = "Unknown incompatible feature: " + hex(1ull << bit);
    if (!out.empty()) out += ", ";
    out += name;
  }
  return out;
}

result<header> parse_header(std::span<const uint8_t> first, uint64_t file_size) {
  (void)file_size;
  header h;
  if (first.size() < v2_header_length || be32(first.data()) != magic) return fail("Image is not in qcow2 format");
  const uint8_t* p = first.data();
  h.version = be32(p + 4);
  if (h.version < 2 || h.version > 3) return fail("Unsupported qcow2 version " + std::to_string(h.version));
  h.backing_file_offset = be64(p + 8);
  h.backing_file_size = be32(p + 16);
  h.cluster_bits = be32(p + 20);
  if (h.cluster_bits < min_cluster_bits || h.cluster_bits > max_cluster_bits)
    return fail("Unsupported cluster size: 2^" + std::to_string(h.cluster_bits));
  h.size = be64(p + 24);
  h.crypt_method = be32(p + 32);
  h.l1_size = be32(p + 36);
  h.l1_table_offset = be64(p + 40);
  h.refcount_table_offset = be64(p + 48);
  h.refcount_table_clusters = be32(p + 56);
  h.nb_snapshots = be32(p + 60);
  h.snapshots_offset = be64(p + 64);
  uint64_t cs = h.cluster_size();
  if (h.version == 2) {
    h.header_length = v2_header_length;
    h.refcount_order = 4;
  } else {
    if (first.size() < v3_min_header_length) return fail("qcow2 header too short");
    h.incompatible_features = be64(p + 72);
    h.compatible_features = be64(p + 80);
    h.autoclear_features = be64(p + 88);
    h.refcount_order = be32(p + 96);
    h.header_length = be32(p + 100);
    if (h.header_length < v3_min_header_length) return fail("qcow2 header too short");
    if (h.header_length > cs) return fail("qcow2 header exceeds cluster size");
    if (h.header_length > first.size()) return fail("qcow2 header exceeds cluster size");
    if (h.header_length > v3_min_header_length) h.compression_type = compression(p[104]);
  }
  if (h.backing_file_offset > cs) return fail("Invalid backing file offset");

  // Header extensions: from the end of the header up to the backing file name (or the cluster end).
  uint64_t ext_limit = h.backing_file_offset ? h.backing_file_offset : cs;
  ext_limit = std::min<uint64_t>(ext_limit, first.size());
  uint64_t off = h.header_length;
  while (off + 8 <= ext_limit) {
    uint32_t type = be32(p + off);
    uint32_t len = be32(p + off + 4);
    off += 8;
    if (type == ext_end) break;
    if (len > ext_limit - off) return fail("Header extension too large");
    extension e{type, std::vector<uint8_t>(p + off, p + off + len)};
    switch (type) {
      case ext_backing_format:
        if (len >= 16) return fail("ERROR: ext_backing_format: len=" + std::to_string(len) + " too large (>=16)");
        h.backing_format.assign(reinterpret_cast<const char*>(p + off), len);
        break;
      case ext_feature_table:
        for (uint32_t i = 0; i + 48 <= len; i += 48) {
          const uint8_t* f = p + off + i;
          feature_name n{f[0], f[1], std::string(reinterpret_cast<const char*>(f + 2), strnlen(reinterpret_cast<const char*>(f + 2), 46))};
          h.features.push_back(std::move(n));
        }
        break;
      case ext_data_file: h.data_file.assign(reinterpret_cast<const char*>(p + off), len); break;
      default: break;
    }
    h.extensions.push_back(std::move(e));
    off += (uint64_t(len) + 7) & ~uint64_t(7);
  }

  if (h.backing_file_offset) {
    if (h.backing_file_size > max_backing_name || h.backing_file_size > cs - h.backing_file_offset)
      return fail("Backing file name too long");
    if (h.backing_file_offset + h.backing_file_size > first.size()) return fail("Backing file name too long");
    h.backing_file.assign(reinterpret_cast<const char*>(p + h.backing_file_offset), h.backing_file_size);
  }

  if (uint64_t unknown = h.incompatible_features & ~uint64_t(incompat_known))
    return fail("Unsupported qcow2 feature(s): " + unknown_features(h, unknown));
  if (h.refcount_order > 6) return fail("Reference count entry width too large; may not exceed 64 bits");
  if (h.incompatible_features & incompat_compression) {
    if (h.compression_type != compression::zlib && h.compression_type != compression::zstd)
      return fail("qcow2: unknown compression type: " + std::to_string(int(h.compression_type)));
  } else if (h.compression_type != compression::zlib) {
    return fail("qcow2: Compression type incompatible feature bit must be set");
  }
  if (h.extended_l2() && h.cluster_bits < 14)
    return fail("Unsupported subcluster size: " + std::to_string(h.cluster_size() / 32));
  if (h.crypt_method > 2) return fail("Unsupported encryption method " + std::to_string(h.crypt_method));

  if (h.refcount_table_clusters == 0) return fail("Image does not contain a reference count table");
  if (uint64_t(h.refcount_table_clusters) * cs > max_refcount_table_bytes) return fail("Reference count table too large");
  if (!table_ok(h, h.refcount_table_offset, uint64_t(h.refcount_table_clusters) * cs / 8, 8))
    return fail("Reference count table offset invalid");
  if (h.nb_snapshots > 65536) return fail("Snapshot table too large");
  if (h.nb_snapshots && !table_ok(h, h.snapshots_offset, h.nb_snapshots, 40)) return fail("Snapshot table offset invalid");
  if (uint64_t(h.l1_size) * 8 > max_l1_bytes) return fail("Active L1 table too large");
  if (h.l1_size < h.l1_entries_for(h.size)) return fail("L1 table is too small");
  if (!table_ok(h, h.l1_table_offset, h.l1_size, 8)) return fail("Active L1 table offset invalid");
  return h;
}

result<std::vector<uint8_t>> serialize_header(header& h) {
  uint64_t cs = h.cluster_size();
  std::vector<uint8_t> out(h.version == 2 ? v2_header_length : h.header_length, 0);
  // Extensions in their order; the ones blockd derives from fields are refreshed from them.
  std::vector<extension> exts;
  bool have_bf = false, have_df = false;
  for (auto& e : h.extensions) {
    if (e.type == ext_backing_format) {
      if (h.backing_format.empty()) continue;
      have_bf = true;
      exts.push_back({e.type, std::vector<uint8_t>(h.backing_format.begin(), h.backing_format.end())});
    } else if (e.type == ext_data_file) {
      if (h.data_file.empty()) continue;
      have_df = true;
      exts.push_back({e.type, std::vector<uint8_t>(h.data_file.begin(), h.data_file.end())});
    } else {
      exts.push_back(e);
    }
  }
  if (!have_bf && !h.backing_format.empty())
    exts.insert(exts.begin(), {ext_backing_format, std::vector<uint8_t>(h.backing_format.begin(), h.backing_format.end())});
  if (!have_df && !h.data_file.empty())
    exts.push_back({ext_data_file, std::vector<uint8_t>(h.data_file.begin(), h.data_file.end())});
  for (auto& e : exts) {
    size_t at = out.size();
    out.resize(at + 8 + ((e.data.size() + 7) & ~size_t(7)), 0);
    put_be32(&out[at], e.type);
    put_be32(&out[at + 4], uint32_t(e.data.size()));
    if (!e.data.empty()) std::memcpy(&out[at + 8], e.data.data(), e.data.size());
  }
  out.resize(out.size() + 8, 0);  // end of extensions
  if (!h.backing_file.empty()) {
    h.backing_file_offset = out.size();
    h.backing_file_size = uint32_t(h.backing_file.size());
    out.insert(out.end(), h.backing_file.begin(), h.backing_file.end());
  } else {
    h.backing_file_offset = 0;
    h.backing_file_size = 0;
  }
  if (out.size() > cs) return fail("the qcow2 header and its extensions do not fit in one cluster");
  uint8_t* p = out.data();
  put_be32(p, magic);
  put_be32(p + 4, h.version);
  put_be64(p + 8, h.backing_file_offset);
  put_be32(p + 16, h.backing_file_size);
  put_be32(p + 20, h.cluster_bits);
  put_be64(p + 24, h.size);
  put_be32(p + 32, h.crypt_method);
  put_be32(p + 36, h.l1_size);
  put_be64(p + 40, h.l1_table_offset);
  put_be64(p + 48, h.refcount_table_offset);
  put_be32(p + 56, h.refcount_table_clusters);
  put_be32(p + 60, h.nb_snapshots);
  put_be64(p + 64, h.snapshots_offset);
  if (h.version == 3) {
    put_be64(p + 72, h.incompatible_features);
    put_be64(p + 80, h.compatible_features);
    put_be64(p + 88, h.autoclear_features);
    put_be32(p + 96, h.refcount_order);
    put_be32(p + 100, h.header_length);
    if (h.header_length > v3_min_header_length) p[104] = uint8_t(h.compression_type);
  }
  return out;
}

l1_decoded decode_l1(const header& h, uint64_t entry) {
  l1_decoded d;
  d.copied = entry & entry_copied;
  d.l2_offset = entry & offset_mask;
  if (entry & ~(offset_mask | entry_copied)) {
    d.valid = false;
    d.why = "L1 entry with reserved bits set";
  } else if (d.l2_offset & (h.cluster_size() - 1)) {
    d.valid = false;
    d.why = "L2 table offset " + hex(d.l2_offset) + " unaligned";
  }
  return d;
}

l2_decoded decode_l2(const header& h, uint64_t entry, uint64_t bitmap, uint32_t subcluster) {
  l2_decoded d;
  d.m.copied = entry & entry_copied;
  if (entry & entry_compressed) {
    uint32_t x = 62 - (h.cluster_bits - 8);
    uint64_t off = entry & ((uint64_t(1) << x) - 1);
    uint64_t extra = (entry & ~entry_copied & ~entry_compressed) >> x;  // additional 512-byte sectors
    d.m.kind = cluster_kind::compressed;
    d.m.host_offset = off;
    // The data starts at `off` and may end anywhere in the last of 1 + extra sectors.
    d.m.compressed_size = (extra + 1) * 512 - (off & 511);
    if (h.extended_l2() && bitmap != 0) {
      d.valid = false;
      d.why = "compressed cluster with a non-zero subcluster bitmap";
    }
    return d;
  }
  uint64_t off = entry & offset_mask;
  d.m.host_offset = off;
  if (entry & ~(offset_mask | entry_copied | entry_zero)) {
    d.valid = false;
    d.why = "L2 entry with reserved bits set";
    return d;
  }
  if (off & (h.cluster_size() - 1)) {
    d.valid = false;
    d.why = "cluster offset " + hex(off) + " unaligned";
    return d;
  }
  if (h.extended_l2()) {
    if (entry & entry_zero) {
      d.valid = false;
      d.why = "extended L2 entry with the zero bit set";
      return d;
    }
    bool alloc = bitmap & (1ull << subcluster);
    bool zero = bitmap & (1ull << (32 + subcluster));
    if (alloc && zero) {
      d.valid = false;
      d.why = "subcluster both allocated and zero";
      return d;
    }
    if (zero) d.m.kind = off ? cluster_kind::zero_allocated : cluster_kind::zero_plain;
    else if (alloc) {
      if (!off) {
        d.valid = false;
        d.why = "allocated subcluster without a host cluster";
        return d;
      }
      d.m.kind = cluster_kind::normal;
    } else {
      d.m.kind = cluster_kind::unallocated;
    }
    return d;
  }
  if (entry & entry_zero) {
    if (h.version < 3) {
      d.valid = false;
      d.why = "zero cluster in a version 2 image";
      return d;
    }
    d.m.kind = off ? cluster_kind::zero_allocated : cluster_kind::zero_plain;
  } else {
    d.m.kind = off ? cluster_kind::normal : cluster_kind::unallocated;
  }
  return d;
}

uint64_t refcount_get(const header& h, const uint8_t* block, uint64_t index) {
  uint32_t bits = h.refcount_bits();
  if (bits >= 8) {
    uint32_t bytes = bits / 8;
    uint64_t v = 0;
    for (uint32_t i = 0; i < bytes; ++i) v = (v << 8) | block[index * bytes + i];
    return v;
  }
  // Sub-byte widths pack from the least significant bits of each byte.
  uint64_t bit = index * bits;
  uint8_t byte = block[bit / 8];
  return (byte >> (bit % 8)) & ((1u << bits) - 1);
}

void refcount_set(const header& h, uint8_t* block, uint64_t index, uint64_t value) {
  uint32_t bits = h.refcount_bits();
  if (bits >= 8) {
    uint32_t bytes = bits / 8;
    for (uint32_t i = 0; i < bytes; ++i) block[index * bytes + bytes - 1 - i] = uint8_t(value >> (8 * i));
    return;
  }
  uint64_t bit = index * bits;
  uint8_t mask = uint8_t(((1u << bits) - 1) << (bit % 8));
  block[bit / 8] = uint8_t((block[bit / 8] & ~mask) | ((value << (bit % 8)) & mask));
}

}  // namespace blockd::qcow2

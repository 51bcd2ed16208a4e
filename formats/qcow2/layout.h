// qcow2 on-disk layout: header (v2/v3) with its extensions, feature bits, L1/L2/refcount entry decoding; pure functions, any thread.
#pragma once
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "protocol/error.h"

namespace blockd::qcow2 {

inline constexpr uint32_t magic = 0x514649fb;  // "QFI\xfb"
inline constexpr uint32_t v2_header_length = 72;
inline constexpr uint32_t v3_min_header_length = 104;
inline constexpr uint32_t min_cluster_bits = 9;   // 512 bytes
inline constexpr uint32_t max_cluster_bits = 21;  // 2 MiB, QEMU's implementation limit
inline constexpr uint32_t max_backing_name = 1023;
inline constexpr uint64_t max_l1_bytes = 32u << 20;           // QEMU's limit on the active L1 table
inline constexpr uint64_t max_refcount_table_bytes = 8u << 20;  // and on the refcount table
inline constexpr uint64_t offset_mask = 0x00fffffffffffe00ull;  // bits 9-55: a host offset in an entry

// Header feature bits.
enum incompatible_bit : uint64_t {
  incompat_dirty = 1ull << 0,
  incompat_corrupt = 1ull << 1,
  incompat_data_file = 1ull << 2,
  incompat_compression = 1ull << 3,
  incompat_extended_l2 = 1ull << 4,
  incompat_known = (1ull << 5) - 1,
};
enum compatible_bit : uint64_t { compat_lazy_refcounts = 1ull << 0 };
enum autoclear_bit : uint64_t {
  autoclear_bitmaps = 1ull << 0,
  autoclear_data_file_raw = 1ull << 1,
  autoclear_known = (1ull << 2) - 1,
};

enum class compression { zlib = 0, zstd = 1 };

// Header extension types.
enum extension_type : uint32_t {
  ext_end = 0,
  ext_backing_format = 0xe2792aca,
  ext_feature_table = 0x6803f857,
  ext_crypto_header = 0x0537be77,
  ext_bitmaps = 0x23852875,
  ext_data_file = 0x44415441,
};

struct extension {
  uint32_t type = 0;
  std::vector<uint8_t> data;  // unpadded
};

// One named feature from the feature name table extension.
struct feature_name {
  uint8_t type = 0;  // 0 incompatible, 1 compatible, 2 autoclear
  uint8_t bit = 0;
  std::string name;
};

struct header {
  uint32_t version = 3;
  uint64_t backing_file_offset = 0;
  uint32_t backing_file_size = 0;
  uint32_t cluster_bits = 16;
  uint64_t size = 0;
  uint32_t crypt_method = 0;
  uint32_t l1_size = 0;
  uint64_t l1_table_offset = 0;
  uint64_t refcount_table_offset = 0;
  uint32_t refcount_table_clusters = 0;
  uint32_t nb_snapshots = 0;
  uint64_t snapshots_offset = 0;
  // v3 (v2 images read as all zero, refcount_order 4)
  uint64_t incompatible_features = 0;
  uint64_t compatible_features = 0;
  uint64_t autoclear_features = 0;
  uint32_t refcount_order = 4;
  uint32_t header_length = v3_min_header_length;
  compression compression_type = compression::zlib;

  // From the extensions and the backing name area.
  std::string backing_file;
  std::string backing_format;
  std::string data_file;
  std::vector<feature_name> features;
  std::vector<extension> extensions;  // every extension in file order, unknown ones included

  uint64_t cluster_size() const { return uint64_t(1) << cluster_bits; }
  bool extended_l2() const { return incompatible_features & incompat_extended_l2; }
  // Bytes per L2 entry and entries per L2 table.
  uint32_t l2_entry_size() const { return extended_l2() ? 16 : 8; }
  uint64_t l2_entries() const { return cluster_size() / l2_entry_size(); }
  uint32_t subclusters() const { return extended_l2() ? 32 : 1; }
  uint32_t refcount_bits() const { return 1u << refcount_order; }
  bool has_data_file() const { return incompatible_features & incompat_data_file; }
  // The number of L1 entries needed to map `size` bytes.
  uint64_t l1_entries_for(uint64_t virtual_size) const;
};

// Parses and checks the header and its extensions from the start of the image (at least the first
// cluster, or the whole file if shorter). `file_size` bounds the table offsets. The error texts are
// QEMU's where QEMU has one, so tools that parse them keep working.
result<header> parse_header(std::span<const uint8_t> first, uint64_t file_size);

// The bytes of `h` as they go at offset 0 (header, extensions, end marker; the backing file name is
// placed right after them and h.backing_file_offset/size are set accordingly). Fails when it does
// not fit in the first cluster.
result<std::vector<uint8_t>> serialize_header(header& h);

// Names of the incompatible features in `bits` that blockd does not know, for the error message
// ("Unsupported qcow2 feature(s): ..."), using the image's own feature name table if it has one.
std::string unknown_features(const header& h, uint64_t bits);

// ---- table entries ---------------------------------------------------------------------------

inline uint64_t be64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v = (v << 8) | p[i];
  return v;
}
inline uint32_t be32(const uint8_t* p) { return uint32_t(p[0]) << 24 | uint32_t(p[1]) << 16 | uint32_t(p[2]) << 8 | p[3]; }
inline uint16_t be16(const uint8_t* p) { return uint16_t(p[0] << 8 | p[1]); }
inline void put_be64(uint8_t* p, uint64_t v) {
  for (int i = 7; i >= 0; --i, v >>= 8) p[i] = uint8_t(v);
}
inline void put_be32(uint8_t* p, uint32_t v) {
  for (int i = 3; i >= 0; --i, v >>= 8) p[i] = uint8_t(v);
}

inline constexpr uint64_t entry_copied = 1ull << 63;      // L1/L2: refcount is exactly one
inline constexpr uint64_t entry_compressed = 1ull << 62;  // L2
inline constexpr uint64_t entry_zero = 1ull << 0;          // L2 (v3, standard entries)

// What one guest cluster (or subcluster) maps to.
enum class cluster_kind {
  unallocated,       // reads from the backing file, or zeroes without one
  zero_plain,        // reads as zeroes, no host cluster
  zero_allocated,    // reads as zeroes, host cluster kept (preallocated)
  normal,            // data at host_offset
  compressed,        // compressed data at host_offset, compressed_size bytes at most
};

struct l2_mapping {
  cluster_kind kind = cluster_kind::unallocated;
  uint64_t host_offset = 0;      // normal/zero_allocated: cluster offset; compressed: byte offset
  uint64_t compressed_size = 0;  // compressed: bytes that may hold the data (whole sectors)
  bool copied = false;
};

// Decodes a standard L2 entry (or the first word of an extended one, with `subcluster` status from
// its bitmap). Entries with reserved bits set or misaligned offsets are reported by `valid`.
struct l2_decoded {
  l2_mapping m;
  bool valid = true;
  std::string why;  // when !valid
};
l2_decoded decode_l2(const header& h, uint64_t entry, uint64_t bitmap = 0, uint32_t subcluster = 0);

// Decodes an L1 entry: the L2 table offset (0 = none) or an error for reserved bits/misalignment.
struct l1_decoded {
  uint64_t l2_offset = 0;
  bool copied = false;
  bool valid = true;
  std::string why;
};
l1_decoded decode_l1(const header& h, uint64_t entry);

// Reads refcount `index` from a refcount block of `h`'s width.
uint64_t refcount_get(const header& h, const uint8_t* block, uint64_t index);
void refcount_set(const header& h, uint8_t* block, uint64_t index, uint64_t value);

}  // namespace blockd::qcow2

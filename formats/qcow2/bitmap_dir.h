// qcow2 persistent dirty bitmaps on disk: the bitmaps header extension, the bitmap directory and bitmap table entries (decode, checks, encode); pure functions, any thread.
#pragma once
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "protocol/error.h"

namespace blockd::qcow2 {

// Limits of QEMU's implementation; images past them are refused the way QEMU refuses them.
inline constexpr uint32_t max_bitmaps = 65535;
inline constexpr uint64_t max_bitmap_directory_size = 1024ull * max_bitmaps;
inline constexpr uint32_t max_bitmap_table_size = 0x8000000;   // entries
inline constexpr uint64_t max_bitmap_phys_size = 0x20000000;   // bytes of bitmap data (512 MiB)
inline constexpr uint32_t min_bitmap_granularity_bits = 9;
inline constexpr uint32_t max_bitmap_granularity_bits = 31;
inline constexpr uint32_t max_bitmap_name_size = 1023;
inline constexpr uint32_t bitmaps_ext_size = 24;

// Directory entry flags. QEMU knows in_use and auto only: an entry with any other bit (the spec's
// extra_data_compatible included) fails its checks, so blockd treats them as reserved too.
inline constexpr uint32_t bitmap_flag_in_use = 1u << 0;
inline constexpr uint32_t bitmap_flag_auto = 1u << 1;
inline constexpr uint32_t bitmap_reserved_flags = ~(bitmap_flag_in_use | bitmap_flag_auto);
inline constexpr uint8_t bitmap_type_dirty_tracking = 1;

// Bitmap table entries: bits 9-55 a data cluster offset; bit 0 with no offset = every bit set.
inline constexpr uint64_t bitmap_entry_offset_mask = 0x00fffffffffffe00ull;
inline constexpr uint64_t bitmap_entry_reserved_mask = 0xff000000000001feull;
inline constexpr uint64_t bitmap_entry_all_ones = 1;

// The bitmaps header extension (type 0x23852875).
struct bitmaps_ext {
  uint32_t nb_bitmaps = 0;
  uint64_t directory_size = 0;
  uint64_t directory_offset = 0;
};
// QEMU's checks and texts, in its order.
result<bitmaps_ext> parse_bitmaps_ext(std::span<const uint8_t> data, uint64_t cluster_size);
std::vector<uint8_t> encode_bitmaps_ext(const bitmaps_ext& e);

// One bitmap directory entry (extra data is refused at load, so none is ever kept).
struct bitmap_entry {
  uint64_t table_offset = 0;
  uint32_t table_size = 0;  // entries
  uint32_t flags = 0;
  uint8_t type = bitmap_type_dirty_tracking;
  uint8_t granularity_bits = 16;
  std::string name;
  bool in_use() const { return flags & bitmap_flag_in_use; }
  bool is_auto() const { return flags & bitmap_flag_auto; }
  uint64_t granularity() const { return uint64_t(1) << granularity_bits; }
};

// Bytes one directory entry takes (header, name, padding to 8).
uint64_t bitmap_entry_size(size_t name_size);
// Bitmap data bytes for `virtual_size` bytes at `granularity_bits` (whole 64-bit words, as QEMU
// serializes them), and the table entries (data clusters) they need.
uint64_t bitmap_data_bytes(uint64_t virtual_size, uint32_t granularity_bits);
uint64_t bitmap_table_entries(uint64_t virtual_size, uint32_t granularity_bits, uint64_t cluster_size);

// Checks one entry against the image (QEMU's constraints): table placement and size, granularity,
// flags, name size, type; a consistent (not in-use) bitmap's table must cover the whole disk.
bool bitmap_entry_ok(const bitmap_entry& e, uint64_t cluster_size, uint64_t virtual_size);

// Decodes the directory (`nb_bitmaps` entries filling `dir` exactly), each entry checked; the texts
// are QEMU's. Names are not checked against each other here (the loader refuses a second bitmap
// of a name as QEMU does, while the directory itself stays readable for queries).
result<std::vector<bitmap_entry>> parse_bitmap_directory(std::span<const uint8_t> dir, uint32_t nb_bitmaps,
                                                         uint64_t cluster_size, uint64_t virtual_size);
std::vector<uint8_t> encode_bitmap_directory(const std::vector<bitmap_entry>& entries);

// Table entries: big-endian words; `valid` is false for reserved bits, a misaligned offset, or an
// offset with the all-ones bit.
bool bitmap_table_entry_ok(uint64_t entry, uint64_t cluster_size);
std::vector<uint64_t> decode_bitmap_table(std::span<const uint8_t> bytes);
std::vector<uint8_t> encode_bitmap_table(const std::vector<uint64_t>& table);

// The QMP flag names of an entry (Qcow2BitmapInfoFlags), in QEMU's order.
std::vector<std::string> bitmap_flag_names(uint32_t flags);

}  // namespace blockd::qcow2

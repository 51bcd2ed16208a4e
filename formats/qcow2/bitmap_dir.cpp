// qcow2 bitmaps extension, bitmap directory and bitmap table encoding (see bitmap_dir.h); pure functions, any thread.
#include "formats/qcow2/bitmap_dir.h"

#include <cstring>

#include "formats/qcow2/layout.h"

namespace blockd::qcow2 {

result<bitmaps_ext> parse_bitmaps_ext(std::span<const uint8_t> d, uint64_t cluster_size) {
  if (d.size() != bitmaps_ext_size) return fail("bitmaps_ext: Invalid extension length");
  if (be32(d.data() + 4) != 0) return fail("bitmaps_ext: Reserved field is not zero");
  bitmaps_ext e;
  e.nb_bitmaps = be32(d.data());
  e.directory_size = be64(d.data() + 8);
  e.directory_offset = be64(d.data() + 16);
  if (e.nb_bitmaps > max_bitmaps)
    return fail("bitmaps_ext: Image has " + std::to_string(e.nb_bitmaps) +
                " bitmaps, exceeding the QEMU supported maximum of " + std::to_string(max_bitmaps));
  if (e.nb_bitmaps == 0) return fail("found bitmaps extension with zero bitmaps");
  if (e.directory_offset & (cluster_size - 1)) return fail("bitmaps_ext: invalid bitmap directory offset");
  if (e.directory_size > max_bitmap_directory_size)
    return fail("bitmaps_ext: bitmap directory size (" + std::to_string(e.directory_size) +
                ") exceeds the maximum supported size (" + std::to_string(max_bitmap_directory_size) + ")");
  return e;
}

std::vector<uint8_t> encode_bitmaps_ext(const bitmaps_ext& e) {
  std::vector<uint8_t> out(bitmaps_ext_size, 0);
  put_be32(out.data(), e.nb_bitmaps);
  put_be64(out.data() + 8, e.directory_size);
  put_be64(out.data() + 16, e.directory_offset);
  return out;
}

uint64_t bitmap_entry_size(size_t name_size) { return (24 + uint64_t(name_size) + 7) & ~uint64_t(7); }

uint64_t bitmap_data_bytes(uint64_t virtual_size, uint32_t granularity_bits) {
  uint64_t bits = (virtual_size + (uint64_t(1) << granularity_bits) - 1) >> granularity_bits;
  return (bits + 63) / 64 * 8;
}

uint64_t bitmap_table_entries(uint64_t virtual_size, uint32_t granularity_bits, uint64_t cluster_size) {
  return (bitmap_data_bytes(virtual_size, granularity_bits) + cluster_size - 1) / cluster_size;
}

bool bitmap_entry_ok(const bitmap_entry& e, uint64_t cs, uint64_t virtual_size) {
  if (e.table_size == 0 || e.table_offset == 0 || (e.table_offset & (cs - 1)) || e.table_size > max_bitmap_table_size)
    return false;
  if (e.granularity_bits > max_bitmap_granularity_bits || e.granularity_bits < min_bitmap_granularity_bits) return false;
  if ((e.flags & bitmap_reserved_flags) || e.name.size() > max_bitmap_name_size) return false;
  if (e.type != bitmap_type_dirty_tracking) return false;
  uint64_t phys = uint64_t(e.table_size) * cs;
  if (phys > max_bitmap_phys_size) return false;
  // A bitmap left in use may have a table of the wrong size (a resize it never saw); a consistent
  // one must cover the disk.
  if (!e.in_use() && virtual_size > ((phys * 8) << e.granularity_bits)) return false;
  return true;
}

result<std::vector<bitmap_entry>> parse_bitmap_directory(std::span<const uint8_t> dir, uint32_t nb_bitmaps,
                                                         uint64_t cs, uint64_t virtual_size) {
  if (dir.empty()) return fail("Requested bitmap directory size is zero");
  if (dir.size() > max_bitmap_directory_size) return fail("Requested bitmap directory size is too big");
  std::vector<bitmap_entry> out;
  size_t pos = 0;
  uint32_t count = 0;
  const std::string broken = "Broken bitmap directory";
  while (pos < dir.size()) {
    if (dir.size() - pos < 24) return fail(broken);
    if (++count > nb_bitmaps) return fail("More bitmaps found than specified in header extension");
    const uint8_t* p = dir.data() + pos;
    bitmap_entry e;
    e.table_offset = be64(p);
    e.table_size = be32(p + 8);
    e.flags = be32(p + 12);
    e.type = p[16];
    e.granularity_bits = p[17];
    uint16_t name_size = be16(p + 18);
    uint32_t extra = be32(p + 20);
    uint64_t size = (24 + uint64_t(name_size) + extra + 7) & ~uint64_t(7);
    if (size > dir.size() - pos) return fail(broken);
    if (extra != 0) return fail("Bitmap extra data is not supported");
    e.name.assign(reinterpret_cast<const char*>(p + 24), name_size);
    if (!bitmap_entry_ok(e, cs, virtual_size))
      return fail("Bitmap '" + std::string(e.name.c_str()) + "' doesn't satisfy the constraints");
    out.push_back(std::move(e));
    pos += size;
  }
  if (count != nb_bitmaps) return fail("Less bitmaps found than specified in header extension");
  return out;
}

std::vector<uint8_t> encode_bitmap_directory(const std::vector<bitmap_entry>& entries) {
  std::vector<uint8_t> out;
  for (auto& e : entries) {
    size_t at = out.size();
    out.resize(at + bitmap_entry_size(e.name.size()), 0);
    uint8_t* p = out.data() + at;
    put_be64(p, e.table_offset);
    put_be32(p + 8, e.table_size);
    put_be32(p + 12, e.flags);
    p[16] = e.type;
    p[17] = e.granularity_bits;
    p[18] = uint8_t(e.name.size() >> 8);
    p[19] = uint8_t(e.name.size());
    std::memcpy(p + 24, e.name.data(), e.name.size());
  }
  return out;
}

bool bitmap_table_entry_ok(uint64_t entry, uint64_t cs) {
  if (entry & bitmap_entry_reserved_mask) return false;
  uint64_t off = entry & bitmap_entry_offset_mask;
  if (off && ((entry & bitmap_entry_all_ones) || (off & (cs - 1)))) return false;
  return true;
}

std::vector<uint64_t> decode_bitmap_table(std::span<const uint8_t> bytes) {
  std::vector<uint64_t> t(bytes.size() / 8);
  for (size_t i = 0; i < t.size(); ++i) t[i] = be64(bytes.data() + i * 8);
  return t;
}

std::vector<uint8_t> encode_bitmap_table(const std::vector<uint64_t>& table) {
  std::vector<uint8_t> out(table.size() * 8);
  for (size_t i = 0; i < table.size(); ++i) put_be64(out.data() + i * 8, table[i]);
  return out;
}

std::vector<std::string> bitmap_flag_names(uint32_t flags) {
  std::vector<std::string> out;
  if (flags & bitmap_flag_in_use) out.push_back("in-use");
  if (flags & bitmap_flag_auto) out.push_back("auto");
  return out;
}

}  // namespace blockd::qcow2

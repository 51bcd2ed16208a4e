// The qcow2 internal snapshot table: parsing and serializing entries (extra data kept as found); pure functions, any thread.
#include <cstring>

#include "formats/qcow2/qcow2.h"

namespace blockd::qcow2 {

result<std::vector<snapshot>> parse_snapshots(const uint8_t* p, size_t len, uint32_t count) {
  std::vector<snapshot> out;
  size_t pos = 0;
  for (uint32_t i = 0; i < count; ++i) {
    if (len - pos < 40) return fail("Snapshot table is truncated (snapshot " + std::to_string(i) + ")");
    const uint8_t* e = p + pos;
    snapshot s;
    s.l1_offset = be64(e);
    s.l1_size = be32(e + 8);
    uint16_t id_len = be16(e + 12), name_len = be16(e + 14);
    s.date_sec = be32(e + 16);
    s.date_nsec = be32(e + 20);
    s.vm_clock_nsec = be64(e + 24);
    s.vm_state_size = be32(e + 32);
    uint32_t extra = be32(e + 36);
    pos += 40;
    if (extra > 1024) return fail("Too much extra metadata in snapshot table entry " + std::to_string(i));
    if (len - pos < size_t(extra) + id_len + name_len)
      return fail("Snapshot table is truncated (snapshot " + std::to_string(i) + ")");
    s.extra.assign(p + pos, p + pos + extra);
    if (extra >= 8) s.vm_state_size_large = be64(p + pos);
    if (extra >= 16) {
      s.disk_size = be64(p + pos + 8);
      s.has_disk_size = true;
    }
    if (extra >= 24) s.icount = be64(p + pos + 16);
    pos += extra;
    s.id.assign(reinterpret_cast<const char*>(p + pos), id_len);
    pos += id_len;
    s.name.assign(reinterpret_cast<const char*>(p + pos), name_len);
    pos += name_len;
    pos = (pos + 7) & ~size_t(7);
    if (pos > len) pos = len;
    if (s.l1_offset & 511) return fail("Snapshot L1 table offset invalid");
    out.push_back(std::move(s));
  }
  return out;
}

std::vector<uint8_t> serialize_snapshots(const std::vector<snapshot>& snaps) {
  std::vector<uint8_t> out;
  for (auto& s : snaps) {
    std::vector<uint8_t> extra = s.extra;
    if (extra.size() < 24) extra.resize(24, 0);
    put_be64(extra.data(), s.vm_state_size_large);
    put_be64(extra.data() + 8, s.disk_size);
    put_be64(extra.data() + 16, s.icount);
    size_t start = out.size();
    out.resize(start + 40);
    uint8_t* e = out.data() + start;
    put_be64(e, s.l1_offset);
    put_be32(e + 8, s.l1_size);
    e[12] = uint8_t(s.id.size() >> 8);
    e[13] = uint8_t(s.id.size());
    e[14] = uint8_t(s.name.size() >> 8);
    e[15] = uint8_t(s.name.size());
    put_be32(e + 16, s.date_sec);
    put_be32(e + 20, s.date_nsec);
    put_be64(e + 24, s.vm_clock_nsec);
    put_be32(e + 32, s.vm_state_size);
    put_be32(e + 36, uint32_t(extra.size()));
    out.insert(out.end(), extra.begin(), extra.end());
    out.insert(out.end(), s.id.begin(), s.id.end());
    out.insert(out.end(), s.name.begin(), s.name.end());
    out.resize((out.size() + 7) & ~size_t(7), 0);
  }
  return out;
}

}  // namespace blockd::qcow2

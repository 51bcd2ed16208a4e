// The dm-log-writes on-disk format as blklogwrites writes it, and the log state an open reads; control path on the node's home (open), constants anywhere.
#pragma once
#include <boost/json.hpp>

#include <cstdint>

#include "protocol/error.h"

namespace blockd::block {

class node;

// Little-endian on disk. Sector 0: the super block (magic, version, nr_entries, sectorsize, then
// zeroes to the sector's end). From sector 1: each entry in a sector of its own (sector,
// nr_sectors, flags, data_len, zeroes), followed by the write's data (a zero write: zeroed sectors).
constexpr uint64_t log_magic = 0x6a736677736872ull;
constexpr uint64_t log_version = 1;
constexpr uint64_t log_flush_flag = 1u << 0;
constexpr uint64_t log_fua_flag = 1u << 1;
constexpr uint64_t log_discard_flag = 1u << 2;
constexpr uint64_t log_mark_flag = 1u << 3;
constexpr uint64_t log_flag_mask = log_flush_flag | log_fua_flag | log_discard_flag | log_mark_flag;
constexpr uint32_t log_super_size = 28;  // packed: three u64 and one u32
constexpr uint32_t log_entry_size = 32;

struct log_state {
  uint32_t sector_size = 512;
  unsigned sector_bits = 9;
  uint64_t cur_log_sector = 1;  // where the next entry goes
  uint64_t nr_entries = 0;
  uint64_t update_interval = 4096;
};

// A power of two from the super block's size up to 8 MiB (QEMU's rule).
bool log_sector_size_valid(uint64_t s);
// The options' log settings; with log-append, the existing log's super block and entries (read
// from `log` with sync_io, on its home), refused with QEMU's texts when they are not a log.
result<log_state> read_log_state(const boost::json::object& options, node& log);

void register_blklogwrites_driver();

}  // namespace blockd::block

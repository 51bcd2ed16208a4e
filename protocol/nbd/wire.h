// NBD wire vocabulary (magics, option/reply/command numbers, flags) and big-endian helpers; plain C++, any thread.
#pragma once
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

namespace blockd::nbd {

// Handshake.
constexpr uint64_t nbd_magic = 0x4e42444d41474943ull;  // "NBDMAGIC"
constexpr uint64_t opts_magic = 0x49484156454f5054ull;  // "IHAVEOPT"
constexpr uint64_t rep_magic = 0x0003e889045565a9ull;   // option reply
constexpr uint16_t flag_fixed_newstyle = 1u << 0;
constexpr uint16_t flag_no_zeroes = 1u << 1;
constexpr uint32_t flag_c_fixed_newstyle = 1u << 0;
constexpr uint32_t flag_c_no_zeroes = 1u << 1;

enum opt : uint32_t {
  opt_export_name = 1,
  opt_abort = 2,
  opt_list = 3,
  opt_peek_export = 4,
  opt_starttls = 5,
  opt_info = 6,
  opt_go = 7,
  opt_structured_reply = 8,
  opt_list_meta_context = 9,
  opt_set_meta_context = 10,
  opt_extended_headers = 11,
};

constexpr uint32_t rep_err_bit = 1u << 31;
enum rep : uint32_t {
  rep_ack = 1,
  rep_server = 2,
  rep_info = 3,
  rep_meta_context = 4,
  rep_err_unsup = rep_err_bit | 1,
  rep_err_policy = rep_err_bit | 2,
  rep_err_invalid = rep_err_bit | 3,
  rep_err_platform = rep_err_bit | 4,
  rep_err_tls_reqd = rep_err_bit | 5,
  rep_err_unknown = rep_err_bit | 6,
  rep_err_shutdown = rep_err_bit | 7,
  rep_err_block_size_reqd = rep_err_bit | 8,
  rep_err_too_big = rep_err_bit | 9,
  rep_err_ext_header_reqd = rep_err_bit | 10,
};

enum info : uint16_t { info_export = 0, info_name = 1, info_description = 2, info_block_size = 3 };

// Transmission flags (16 bits, sent with NBD_INFO_EXPORT / the EXPORT_NAME reply).
enum tflag : uint16_t {
  tf_has_flags = 1u << 0,
  tf_read_only = 1u << 1,
  tf_send_flush = 1u << 2,
  tf_send_fua = 1u << 3,
  tf_rotational = 1u << 4,
  tf_send_trim = 1u << 5,
  tf_send_write_zeroes = 1u << 6,
  tf_send_df = 1u << 7,
  tf_can_multi_conn = 1u << 8,
  tf_send_resize = 1u << 9,
  tf_send_cache = 1u << 10,
  tf_send_fast_zero = 1u << 11,
  tf_block_stat_payload = 1u << 12,
};

// Transmission.
constexpr uint32_t request_magic = 0x25609513u;
constexpr uint32_t extended_request_magic = 0x21e41c71u;
constexpr uint32_t simple_reply_magic = 0x67446698u;
constexpr uint32_t structured_reply_magic = 0x668e33efu;
constexpr uint32_t extended_reply_magic = 0x6e8a278cu;
constexpr size_t compact_request_size = 28;
constexpr size_t extended_request_size = 32;

enum cmd : uint16_t {
  cmd_read = 0,
  cmd_write = 1,
  cmd_disc = 2,
  cmd_flush = 3,
  cmd_trim = 4,
  cmd_cache = 5,
  cmd_write_zeroes = 6,
  cmd_block_status = 7,
  cmd_resize = 8,
};

enum cmd_flag : uint16_t {
  cf_fua = 1u << 0,
  cf_no_hole = 1u << 1,
  cf_df = 1u << 2,
  cf_req_one = 1u << 3,
  cf_fast_zero = 1u << 4,
  cf_payload_len = 1u << 5,
};

constexpr uint16_t reply_flag_done = 1u << 0;
enum reply_type : uint16_t {
  rt_none = 0,
  rt_offset_data = 1,
  rt_offset_hole = 2,
  rt_block_status = 5,
  rt_block_status_ext = 6,
  rt_error = (1u << 15) | 1,
  rt_error_offset = (1u << 15) | 2,
};

// NBD errno values (the protocol's own numbering, equal to Linux's).
enum nbd_errno : uint32_t {
  e_perm = 1,
  e_io = 5,
  e_nomem = 12,
  e_inval = 22,
  e_nospc = 28,
  e_overflow = 75,
  e_notsup = 95,
  e_shutdown = 108,
};

// base:allocation flags.
constexpr uint32_t state_hole = 1u << 0;
constexpr uint32_t state_zero = 1u << 1;

// Limits (QEMU's NBD_MAX_BUFFER_SIZE and NBD_MAX_STRING_SIZE): option payloads and data transfers
// beyond these are refused, whatever the client claims.
constexpr uint32_t max_buffer_size = 32u << 20;
constexpr uint32_t max_string_size = 4096;

// Fixed context ids, as QEMU numbers them (so replies are comparable): bitmaps follow from 2.
constexpr uint32_t meta_id_base_allocation = 0;
constexpr uint32_t meta_id_allocation_depth = 1;
constexpr uint32_t meta_id_dirty_bitmap = 2;

inline uint16_t get16(const uint8_t* p) { return uint16_t(p[0] << 8 | p[1]); }
inline uint32_t get32(const uint8_t* p) { return uint32_t(p[0]) << 24 | uint32_t(p[1]) << 16 | uint32_t(p[2]) << 8 | p[3]; }
inline uint64_t get64(const uint8_t* p) { return uint64_t(get32(p)) << 32 | get32(p + 4); }
inline void put16(std::string& out, uint16_t v) {
  char b[2] = {char(v >> 8), char(v)};
  out.append(b, 2);
}
inline void put32(std::string& out, uint32_t v) {
  char b[4] = {char(v >> 24), char(v >> 16), char(v >> 8), char(v)};
  out.append(b, 4);
}
inline void put64(std::string& out, uint64_t v) {
  put32(out, uint32_t(v >> 32));
  put32(out, uint32_t(v));
}

// QEMU's names for options and commands (they appear in error messages clients print).
const char* opt_name(uint32_t o);
const char* cmd_name(uint16_t c);

// Maps a negative errno from the block layer to the NBD error a client sees (QEMU's system_errno_to_nbd_errno).
uint32_t errno_to_nbd(int negative_errno);

}  // namespace blockd::nbd

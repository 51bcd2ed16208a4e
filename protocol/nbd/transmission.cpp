// NBD transmission codec: header parsing, QEMU's request checks, simple/structured/extended reply encoding; plain C++, one connection's thread.
#include "protocol/nbd/transmission.h"

#include <cstdio>

#include "protocol/nbd/wire.h"

namespace blockd::nbd {

parse_status parse_request(const uint8_t* p, size_t n, reply_mode m, request& r, size_t& used) {
  bool ext = m == reply_mode::extended;
  size_t size = ext ? extended_request_size : compact_request_size;
  if (n < 4) return parse_status::need_more;
  if (get32(p) != (ext ? extended_request_magic : request_magic)) return parse_status::bad_magic;
  if (n < size) return parse_status::need_more;
  r.flags = get16(p + 4);
  r.type = get16(p + 6);
  r.cookie = get64(p + 8);
  r.offset = get64(p + 16);
  r.length = ext ? get64(p + 24) : get32(p + 24);
  used = size;
  return parse_status::ok;
}

void put_request(std::string& out, reply_mode m, const request& r) {
  bool ext = m == reply_mode::extended;
  put32(out, ext ? extended_request_magic : request_magic);
  put16(out, r.flags);
  put16(out, r.type);
  put64(out, r.cookie);
  put64(out, r.offset);
  if (ext) put64(out, r.length);
  else put32(out, uint32_t(r.length));
}

request_check check_request(const request& r, const export_state& x) {
  request_check c;
  bool ext = x.mode == reply_mode::extended;
  uint16_t valid = cf_fua;
  bool check_length = false, check_rofs = false;
  uint64_t effect_length = r.length;
  switch (r.type) {
    case cmd_disc: c.disc = true; return c;
    case cmd_read:
      if (x.mode != reply_mode::simple) valid |= cf_df;
      check_length = true;
      break;
    case cmd_write:
      if (ext) valid |= cf_payload_len;
      c.payload = r.length;
      check_length = true;
      check_rofs = true;
      break;
    case cmd_flush: break;
    case cmd_cache: check_length = true; break;
    case cmd_trim: check_rofs = true; break;
    case cmd_write_zeroes:
      valid |= cf_no_hole | cf_fast_zero;
      check_rofs = true;
      break;
    case cmd_block_status:
      valid |= cf_req_one;
      if (ext && (r.flags & cf_payload_len)) {
        valid |= cf_payload_len;
        c.payload = r.length;
        // The effect length travels in the payload; its range is checked once the payload is read.
        effect_length = 0;
        if (r.length < 8 || r.length > 8 + 4 * 4096) {
          c.error = e_inval;
          c.message = "unexpected block status payload length " + std::to_string(r.length);
          // A short payload is read and dropped; an oversized one is not read at all.
          c.disconnect = r.length > 8 + 4 * 4096;
          return c;
        }
      }
      break;
    default: break;
  }
  if (ext && (r.flags & cf_payload_len) && r.type != cmd_write && r.type != cmd_block_status) {
    // A payload announced for a command that takes none is still in the stream: it is read and
    // dropped (up to the largest buffer) and the request refused, or the client is hung up on.
    // Left unread, it would be parsed as the next request headers.
    c.payload = r.length;
    c.error = e_inval;
    c.message = "unexpected payload for command " + std::string(cmd_name(r.type));
    c.disconnect = r.length > max_buffer_size;
    return c;
  }
  if (check_length && r.length > max_buffer_size) {
    c.error = e_inval;
    c.message = "len (" + std::to_string(r.length) + ") is larger than max len (" + std::to_string(max_buffer_size) + ")";
    // A WRITE's payload was not read: the stream cannot be resynchronised.
    c.disconnect = c.payload > 0;
    return c;
  }
  // Every refusal past this point is EINVAL, as QEMU sends for anything nbd_co_receive_request rejects.
  if (x.read_only && check_rofs) {
    c.error = e_inval;
    c.message = "Export is read-only";
    return c;
  }
  if (r.offset > x.size || effect_length > x.size - r.offset) {
    c.error = e_inval;
    c.message = "operation past EOF; From: " + std::to_string(r.offset) + ", Len: " + std::to_string(effect_length) +
                ", Size: " + std::to_string(x.size);
    return c;
  }
  if (r.flags & ~valid) {
    char buf[96];
    std::snprintf(buf, sizeof buf, "unsupported flags for command %s (got 0x%x)", cmd_name(r.type), r.flags);
    c.error = e_inval;
    c.message = buf;
    return c;
  }
  if (r.type > cmd_block_status) {
    c.error = e_inval;
    c.message = "invalid request type (" + std::to_string(r.type) + ") received";
  }
  return c;
}

void put_chunk_header(std::string& out, reply_mode m, uint16_t flags, uint16_t type, uint64_t cookie,
                      uint64_t offset, uint64_t payload_len) {
  if (m == reply_mode::extended) {
    put32(out, extended_reply_magic);
    put16(out, flags);
    put16(out, type);
    put64(out, cookie);
    put64(out, offset);
    put64(out, payload_len);
  } else {
    put32(out, structured_reply_magic);
    put16(out, flags);
    put16(out, type);
    put64(out, cookie);
    put32(out, uint32_t(payload_len));
  }
}

static void put_simple(std::string& out, uint64_t cookie, uint32_t err) {
  put32(out, simple_reply_magic);
  put32(out, err);
  put64(out, cookie);
}

void put_done(std::string& out, reply_mode m, uint64_t cookie, uint64_t offset) {
  if (m == reply_mode::extended) return put_chunk_header(out, m, reply_flag_done, rt_none, cookie, offset, 0);
  put_simple(out, cookie, 0);
}

void put_read_done(std::string& out, reply_mode m, uint64_t cookie, uint64_t offset) {
  if (m == reply_mode::simple) return put_simple(out, cookie, 0);
  put_chunk_header(out, m, reply_flag_done, rt_none, cookie, offset, 0);
}

void put_error(std::string& out, reply_mode m, uint64_t cookie, uint64_t offset, uint32_t err,
               const std::string& msg) {
  if (m == reply_mode::simple) return put_simple(out, cookie, err);
  std::string text = msg.substr(0, max_string_size);
  put_chunk_header(out, m, reply_flag_done, rt_error, cookie, offset, 6 + text.size());
  put32(out, err);
  put16(out, uint16_t(text.size()));
  out += text;
}

void put_read_header(std::string& out, reply_mode m, uint64_t cookie, uint64_t offset, uint64_t len, bool done) {
  if (m == reply_mode::simple) return put_simple(out, cookie, 0);
  put_chunk_header(out, m, done ? reply_flag_done : 0, rt_offset_data, cookie, offset, 8 + len);
  put64(out, offset);
}

void put_hole(std::string& out, reply_mode m, uint64_t cookie, uint64_t offset, uint32_t len, bool done) {
  put_chunk_header(out, m, done ? reply_flag_done : 0, rt_offset_hole, cookie, offset, 12);
  put64(out, offset);
  put32(out, len);
}

void put_block_status(std::string& out, reply_mode m, uint64_t cookie, uint64_t offset, uint32_t context_id,
                      const std::vector<extent>& extents, bool done) {
  uint16_t f = done ? reply_flag_done : 0;
  if (m == reply_mode::extended) {
    put_chunk_header(out, m, f, rt_block_status_ext, cookie, offset, 8 + 16 * extents.size());
    put32(out, context_id);
    put32(out, uint32_t(extents.size()));
    for (auto& e : extents) {
      put64(out, e.length);
      put64(out, e.flags);
    }
    return;
  }
  put_chunk_header(out, m, f, rt_block_status, cookie, offset, 4 + 8 * extents.size());
  put32(out, context_id);
  for (auto& e : extents) {
    put32(out, uint32_t(e.length));
    put32(out, e.flags);
  }
}

bool parse_block_status_payload(const uint8_t* p, size_t n, block_status_payload& out) {
  if (n < 8 || (n - 8) % 4) return false;
  out.effect_length = get64(p);
  out.ids.clear();
  for (size_t i = 8; i < n; i += 4) out.ids.push_back(get32(p + i));
  return true;
}

}  // namespace blockd::nbd

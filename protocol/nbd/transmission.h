// NBD transmission phase codec: request header parsing and validation, reply and chunk encoding; plain C++, one connection's thread.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "protocol/nbd/handshake.h"

namespace blockd::nbd {

struct request {
  uint16_t flags = 0;
  uint16_t type = 0;
  uint64_t cookie = 0;
  uint64_t offset = 0;
  uint64_t length = 0;  // 32 bits in compact headers, 64 in extended ones
};

enum class parse_status { need_more, ok, bad_magic };

// Parses one request header from `n` bytes (compact or extended, as negotiated); `used` is its size.
parse_status parse_request(const uint8_t* p, size_t n, reply_mode m, request& r, size_t& used);
// The header parse_request reads back as `r` (a client handed to another connection mid-request).
void put_request(std::string& out, reply_mode m, const request& r);

// What the server does with a parsed request before touching the node (QEMU's nbd_co_receive_request).
struct request_check {
  uint32_t error = 0;          // NBD errno to reply; 0 = go ahead
  std::string message;         // the text of the error chunk in structured mode
  uint64_t payload = 0;        // bytes following the header that belong to this request
  bool disconnect = false;     // the payload cannot be read (too large): reply, then hang up
  bool disc = false;           // NBD_CMD_DISC: close without a reply
};

struct export_state {
  uint64_t size = 0;
  bool read_only = false;
  reply_mode mode = reply_mode::simple;
};

request_check check_request(const request& r, const export_state& x);

// Reply encoding: each appends to `out`. Payloads (read data) are written by the caller right after
// the header these functions produce, so data never passes through this buffer.
//
// Success without payload: a simple reply, or a NONE chunk with DONE in extended mode.
void put_done(std::string& out, reply_mode m, uint64_t cookie, uint64_t offset);
// An error: a simple reply in simple mode, an ERROR chunk (with `msg`) otherwise.
void put_error(std::string& out, reply_mode m, uint64_t cookie, uint64_t offset, uint32_t err, const std::string& msg);
// The header in front of `len` bytes of read data: a simple reply, or an OFFSET_DATA chunk.
void put_read_header(std::string& out, reply_mode m, uint64_t cookie, uint64_t offset, uint64_t len, bool done);
// The end of a READ that carries no data: a simple reply, or a NONE chunk with DONE (a data chunk
// may not be empty).
void put_read_done(std::string& out, reply_mode m, uint64_t cookie, uint64_t offset);
// An OFFSET_HOLE chunk (structured or extended only).
void put_hole(std::string& out, reply_mode m, uint64_t cookie, uint64_t offset, uint32_t len, bool done);

struct extent {
  uint64_t length = 0;
  uint32_t flags = 0;
};
// A BLOCK_STATUS chunk (BLOCK_STATUS_EXT in extended mode) for one context.
void put_block_status(std::string& out, reply_mode m, uint64_t cookie, uint64_t offset, uint32_t context_id,
                      const std::vector<extent>& extents, bool done);

// The chunk header itself (exposed for tests and for the few replies built by hand).
void put_chunk_header(std::string& out, reply_mode m, uint16_t flags, uint16_t type, uint64_t cookie,
                      uint64_t offset, uint64_t payload_len);

// Extended-mode BLOCK_STATUS payload: the effect length and the contexts the client wants.
struct block_status_payload {
  uint64_t effect_length = 0;
  std::vector<uint32_t> ids;
};
bool parse_block_status_payload(const uint8_t* p, size_t n, block_status_payload& out);

}  // namespace blockd::nbd

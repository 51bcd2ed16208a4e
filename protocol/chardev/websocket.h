// RFC 6455 server side for websocket chardevs: the HTTP upgrade handshake and frame coding, with QEMU's replies and close texts; plain C++, the chardev's thread.
#pragma once
#include <cstddef>
#include <cstdint>
#include <ctime>
#include <string>
#include <string_view>

namespace blockd::chr {

// The value of Sec-WebSocket-Accept for a client key (base64 of SHA-1 of key + the RFC's GUID).
std::string websocket_accept_key(std::string_view client_key);
std::string base64_encode(std::string_view bytes);

struct ws_handshake {
  enum class status { incomplete, accepted, refused };
  status st = status::incomplete;
  size_t consumed = 0;   // request bytes used (the rest is already frame data)
  std::string response;  // what to send: 101 on acceptance, 400/404 on refusal (then close)
};

// Judges the client's HTTP request in `in` (all bytes received so far). Checks, in QEMU's order:
// method GET (400), path "/" (404), HTTP/1.1 (400), then Host, Upgrade: websocket, Connection:
// upgrade, Sec-WebSocket-Version: 13, a 24-character Sec-WebSocket-Key and, when the client
// offers subprotocols, "binary" among them (400). Replies carry QEMU's "Server: QEMU VNC" and a
// Date header made from `now`. A request that grows past 4 KiB without ending is refused.
ws_handshake websocket_server_handshake(std::string_view in, std::time_t now);

enum ws_opcode : uint8_t { ws_continuation = 0, ws_text = 1, ws_binary = 2, ws_close = 8, ws_ping = 9, ws_pong = 10 };

// One server frame (FIN set, never masked).
std::string websocket_frame(uint8_t opcode, std::string_view payload);
std::string websocket_close_frame(uint16_t code, std::string_view reason);

// Decodes client frames as they stream in. Binary and continuation payloads become data at once
// (a large frame does not wait until it is complete); ping gets a pong, close gets QEMU's close
// reply. A protocol violation (unmasked frame, text or unknown opcode) answers a close frame with
// QEMU's text and ends the connection.
class websocket_decoder {
 public:
  struct output {
    std::string data;    // payload bytes for the frontend
    std::string reply;   // frames to send back (pong, close)
    bool closed = false; // the connection ends once `reply` is sent
  };
  void feed(std::string_view in, output& out);
  bool closed() const { return closed_; }

 private:
  void fail(output& out, uint16_t code, std::string_view reason);
  std::string header_;       // bytes of the frame header read so far
  uint64_t remaining_ = 0;   // payload bytes still to come in the current frame
  uint64_t offset_ = 0;      // payload bytes of the current frame seen (the mask index)
  uint8_t mask_[4] = {};
  uint8_t opcode_ = 0;
  bool in_payload_ = false;
  std::string control_;      // a control frame's payload, kept until complete
  bool closed_ = false;
};

}  // namespace blockd::chr

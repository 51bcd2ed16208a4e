// Websocket handshake (RFC 6455 section 4.2) and frame coding (section 5) as QEMU's websock channel answers; plain C++, the chardev's thread.
#include "protocol/chardev/websocket.h"

#include <gnutls/crypto.h>

#include <algorithm>
#include <cctype>
#include <cstring>
#include <map>

namespace blockd::chr {
namespace {

constexpr size_t max_request = 4096;  // QEMU's handshake buffer limit

std::string lower(std::string_view s) {
  std::string r(s);
  for (auto& c : r) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return r;
}

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

// Does a comma-separated header value hold `token` (compared without case)?
bool has_token(std::string_view value, std::string_view token) {
  std::string want = lower(token);
  while (!value.empty()) {
    size_t comma = value.find(',');
    std::string_view part = trim(value.substr(0, comma));
    if (lower(part) == want) return true;
    if (comma == std::string_view::npos) break;
    value.remove_prefix(comma + 1);
  }
  return false;
}

std::string http_date(std::time_t now) {
  std::tm tm{};
  ::gmtime_r(&now, &tm);
  char buf[64];
  std::strftime(buf, sizeof buf, "%a, %d %b %Y %H:%M:%S GMT", &tm);
  return buf;
}

ws_handshake refuse(int code, std::time_t now, size_t consumed) {
  ws_handshake h;
  h.st = ws_handshake::status::refused;
  h.consumed = consumed;
  std::string date = http_date(now);
  if (code == 404) {
    h.response = "HTTP/1.1 404 Not Found\r\nServer: QEMU VNC\r\nDate: " + date + "\r\nConnection: close\r\n\r\n";
  } else {
    // QEMU's 400 reply ends after its last header, without the blank line; clients see the
    // connection close right after it.
    h.response = "HTTP/1.1 400 Bad Request\r\nServer: QEMU VNC\r\nDate: " + date +
                 "\r\nConnection: close\r\nSec-WebSocket-Version: 13\r\n";
  }
  return h;
}

}  // namespace

std::string base64_encode(std::string_view in) {
  static const char tbl[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  out.reserve((in.size() + 2) / 3 * 4);
  size_t i = 0;
  for (; i + 3 <= in.size(); i += 3) {
    uint32_t v = uint32_t(uint8_t(in[i])) << 16 | uint32_t(uint8_t(in[i + 1])) << 8 | uint8_t(in[i + 2]);
    out += {tbl[v >> 18], tbl[(v >> 12) & 63], tbl[(v >> 6) & 63], tbl[v & 63]};
  }
  if (size_t rest = in.size() - i; rest) {
    uint32_t v = uint32_t(uint8_t(in[i])) << 16 | (rest == 2 ? uint32_t(uint8_t(in[i + 1])) << 8 : 0);
    out += tbl[v >> 18];
    out += tbl[(v >> 12) & 63];
    out += rest == 2 ? tbl[(v >> 6) & 63] : '=';
    out += '=';
  }
  return out;
}

std::string websocket_accept_key(std::string_view client_key) {
  std::string text(client_key);
  text += "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
  unsigned char digest[20];
  gnutls_hash_fast(GNUTLS_DIG_SHA1, text.data(), text.size(), digest);
  return base64_encode(std::string_view(reinterpret_cast<const char*>(digest), sizeof digest));
}

ws_handshake websocket_server_handshake(std::string_view in, std::time_t now) {
  size_t end = in.find("\r\n\r\n");
  if (end == std::string_view::npos) {
    if (in.size() > max_request) return refuse(400, now, in.size());
    return {};
  }
  size_t consumed = end + 4;
  std::string_view head = in.substr(0, end);
  size_t eol = head.find("\r\n");
  std::string_view request_line = head.substr(0, eol);
  std::string_view rest = eol == std::string_view::npos ? std::string_view() : head.substr(eol + 2);

  // "METHOD PATH VERSION"
  size_t sp1 = request_line.find(' ');
  size_t sp2 = sp1 == std::string_view::npos ? sp1 : request_line.find(' ', sp1 + 1);
  if (sp2 == std::string_view::npos) return refuse(400, now, consumed);
  std::string_view method = request_line.substr(0, sp1);
  std::string_view path = request_line.substr(sp1 + 1, sp2 - sp1 - 1);
  std::string_view version = request_line.substr(sp2 + 1);
  if (method != "GET") return refuse(400, now, consumed);
  if (path != "/") return refuse(404, now, consumed);
  if (version != "HTTP/1.1") return refuse(400, now, consumed);

  std::map<std::string, std::string> headers;  // names lower-cased; the last one given wins
  while (!rest.empty()) {
    size_t nl = rest.find("\r\n");
    std::string_view line = rest.substr(0, nl);
    rest = nl == std::string_view::npos ? std::string_view() : rest.substr(nl + 2);
    size_t colon = line.find(':');
    if (colon == std::string_view::npos) return refuse(400, now, consumed);
    headers[lower(trim(line.substr(0, colon)))] = std::string(trim(line.substr(colon + 1)));
  }
  auto get = [&](const char* name) -> const std::string* {
    auto it = headers.find(name);
    return it == headers.end() ? nullptr : &it->second;
  };
  const std::string* protocols = get("sec-websocket-protocol");
  const std::string* ver = get("sec-websocket-version");
  const std::string* key = get("sec-websocket-key");
  const std::string* upgrade = get("upgrade");
  const std::string* connection = get("connection");
  if (!get("host") || !upgrade || !has_token(*upgrade, "websocket") || !connection ||
      !has_token(*connection, "upgrade") || !ver || *ver != "13" || !key || key->size() != 24 ||
      (protocols && !has_token(*protocols, "binary")))
    return refuse(400, now, consumed);

  ws_handshake h;
  h.st = ws_handshake::status::accepted;
  h.consumed = consumed;
  h.response = "HTTP/1.1 101 Switching Protocols\r\nServer: QEMU VNC\r\nDate: " + http_date(now) +
               "\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: " + websocket_accept_key(*key) +
               "\r\n";
  if (protocols) h.response += "Sec-WebSocket-Protocol: binary\r\n";
  h.response += "\r\n";
  return h;
}

std::string websocket_frame(uint8_t opcode, std::string_view payload) {
  std::string f;
  f.reserve(payload.size() + 10);
  f.push_back(static_cast<char>(0x80 | opcode));
  uint64_t n = payload.size();
  if (n < 126) {
    f.push_back(static_cast<char>(n));
  } else if (n <= 0xFFFF) {
    f.push_back(static_cast<char>(126));
    f.push_back(static_cast<char>(n >> 8));
    f.push_back(static_cast<char>(n & 0xFF));
  } else {
    f.push_back(static_cast<char>(127));
    for (int shift = 56; shift >= 0; shift -= 8) f.push_back(static_cast<char>((n >> shift) & 0xFF));
  }
  f.append(payload);
  return f;
}

std::string websocket_close_frame(uint16_t code, std::string_view reason) {
  std::string p;
  p.push_back(static_cast<char>(code >> 8));
  p.push_back(static_cast<char>(code & 0xFF));
  p.append(reason);
  return websocket_frame(ws_close, p);
}

void websocket_decoder::fail(output& out, uint16_t code, std::string_view reason) {
  out.reply += websocket_close_frame(code, reason);
  out.closed = true;
  closed_ = true;
}

void websocket_decoder::feed(std::string_view in, output& out) {
  size_t i = 0;
  while (i < in.size() && !closed_) {
    if (!in_payload_) {
      header_.push_back(in[i++]);
      if (header_.size() < 2) continue;
      auto b0 = static_cast<uint8_t>(header_[0]), b1 = static_cast<uint8_t>(header_[1]);
      size_t len7 = b1 & 0x7F;
      size_t need = 2 + (len7 == 126 ? 2 : len7 == 127 ? 8 : 0) + ((b1 & 0x80) ? 4 : 0);
      if (!(b1 & 0x80)) {
        fail(out, 1002, "client frames must be masked");
        return;
      }
      if (header_.size() < need) continue;
      opcode_ = b0 & 0x0F;
      if (opcode_ != ws_continuation && opcode_ != ws_binary && opcode_ != ws_close && opcode_ != ws_ping &&
          opcode_ != ws_pong) {
        fail(out, 1003, "only binary, close, ping, and pong frames are supported");
        return;
      }
      uint64_t n = len7;
      size_t pos = 2;
      if (len7 == 126) {
        n = uint64_t(uint8_t(header_[2])) << 8 | uint8_t(header_[3]);
        pos = 4;
      } else if (len7 == 127) {
        n = 0;
        for (int k = 0; k < 8; ++k) n = n << 8 | uint8_t(header_[2 + k]);
        pos = 10;
      }
      if (opcode_ >= ws_close && n > 125) {
        fail(out, 1002, "control frame payload too long");
        return;
      }
      std::memcpy(mask_, header_.data() + pos, 4);
      header_.clear();
      remaining_ = n;
      offset_ = 0;
      control_.clear();
      in_payload_ = true;
    }
    // Payload bytes (possibly none).
    size_t take = static_cast<size_t>(std::min<uint64_t>(remaining_, in.size() - i));
    std::string& sink = opcode_ >= ws_close ? control_ : out.data;
    for (size_t k = 0; k < take; ++k) sink.push_back(static_cast<char>(uint8_t(in[i + k]) ^ mask_[(offset_ + k) & 3]));
    i += take;
    offset_ += take;
    remaining_ -= take;
    if (remaining_ > 0) break;
    in_payload_ = false;
    if (opcode_ == ws_ping) {
      out.reply += websocket_frame(ws_pong, control_);
    } else if (opcode_ == ws_close) {
      fail(out, 1000, "peer requested close");
      return;
    }
  }
}

}  // namespace blockd::chr

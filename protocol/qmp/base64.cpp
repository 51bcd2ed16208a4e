// Base64 as QMP arguments carry it (see base64.h); plain C++, any thread.
#include "protocol/qmp/base64.h"

#include <cstdint>

namespace blockd::qmp {

result<std::string> glib_base64_decode(std::string_view text) {
  auto rank = [](unsigned char c) -> int {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+') return 62;
    if (c == '/') return 63;
    if (c == '=') return 0;  // GLib ranks padding as zero bits and remembers where it was
    return -1;
  };
  for (char c : text)
    if (rank(static_cast<unsigned char>(c)) < 0) return fail("Base64 data contains invalid characters");
  std::string out;
  uint32_t v = 0;
  int n = 0;
  char prev = 0, last = 0;  // the group's third and fourth characters
  for (char c : text) {
    v = v << 6 | static_cast<uint32_t>(rank(static_cast<unsigned char>(c)));
    prev = last;
    last = c;
    if (++n < 4) continue;
    n = 0;
    out.push_back(static_cast<char>((v >> 16) & 0xFF));
    if (prev != '=') out.push_back(static_cast<char>((v >> 8) & 0xFF));
    if (last != '=') out.push_back(static_cast<char>(v & 0xFF));
  }
  return out;
}

}  // namespace blockd::qmp

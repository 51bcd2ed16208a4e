// UTF-8 encoding of one code point, for the JSON parser's \u escapes and ringbuf-read's text; plain C++, any thread.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>

namespace blockd::qmp {

// QEMU's rule for a code point it accepts in JSON and writes out: Unicode scalar values that are
// not noncharacters (U+FDD0..U+FDEF and U+xFFFE/U+xFFFF of every plane).
inline bool valid_codepoint(uint32_t cp) {
  if (cp > 0x10FFFF) return false;
  if (cp >= 0xD800 && cp <= 0xDFFF) return false;  // surrogates
  if (cp >= 0xFDD0 && cp <= 0xFDEF) return false;  // noncharacters
  if ((cp & 0xFFFE) == 0xFFFE) return false;       // U+xFFFE, U+xFFFF
  return true;
}

// Appends `cp` (at most U+10FFFF; callers pass only values they decoded) as UTF-8.
inline void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

// Decodes the code point at s[i] the way QEMU's JSON writer does (its "modified UTF-8"): lead
// bytes announce up to six bytes (the pre-2003 rule); a sequence cut short by a non-continuation
// byte or the end makes one U+FFFD for the bytes so far; a complete but overlong, surrogate,
// noncharacter or out-of-range sequence makes one U+FFFD for all of it; C0 80 is NUL. Advances i.
inline uint32_t next_qemu_codepoint(std::string_view s, size_t& i) {
  constexpr uint32_t bad = 0xFFFD;
  auto c = static_cast<uint8_t>(s[i]);
  if (c < 0x80) {
    ++i;
    return c;
  }
  size_t len = c >= 0xFE ? 0 : c >= 0xFC ? 6 : c >= 0xF8 ? 5 : c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 0;
  if (len == 0) {  // a continuation byte, or FE/FF, as a lead
    ++i;
    return bad;
  }
  uint32_t cp = c & (0x7F >> len);
  size_t k = 1;
  for (; k < len; ++k) {
    if (i + k >= s.size()) break;
    auto cc = static_cast<uint8_t>(s[i + k]);
    if ((cc & 0xC0) != 0x80) break;
    cp = cp << 6 | (cc & 0x3F);
  }
  if (k < len) {
    i += k;
    return bad;
  }
  i += len;
  static const uint32_t min_cp[] = {0, 0, 0x80, 0x800, 0x10000, 0x200000, 0x4000000};
  if (len == 2 && cp == 0) return 0;
  if (cp < min_cp[len] || !valid_codepoint(cp)) return bad;
  return cp;
}

}  // namespace blockd::qmp

// UTF-8 encoding of one code point, for the JSON parser's \u escapes and ringbuf-read's text; plain C++, any thread.
#pragma once
#include <cstdint>
#include <string>

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

}  // namespace blockd::qmp

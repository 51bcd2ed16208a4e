// The value scanner shared by keyval and QemuOpts: a value runs to a single ',' and ",," stands for a comma; any thread.
#pragma once
#include <string>
#include <string_view>

namespace blockd {

// Reads the value starting at `pos`; leaves `pos` on the terminating ',' (or at the end).
inline std::string scan_escaped_value(std::string_view text, size_t& pos) {
  std::string value;
  while (pos < text.size()) {
    if (text[pos] == ',') {
      if (pos + 1 < text.size() && text[pos + 1] == ',') {
        value.push_back(',');
        pos += 2;
        continue;
      }
      break;
    }
    value.push_back(text[pos++]);
  }
  return value;
}

}  // namespace blockd

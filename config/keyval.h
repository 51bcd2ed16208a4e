// QEMU's keyval syntax (dotted keys, ",," escapes, implied first key, help) parsed into a JSON tree; any thread.
#pragma once
#include <boost/json.hpp>
#include <string_view>

#include "protocol/error.h"

namespace blockd {

struct keyval_parsed {
  boost::json::object tree;  // every leaf is a string; dotted keys nest; dense numeric keys form arrays
  bool help = false;         // a "help" or "?" item was given
};

// Parses `text`. With a non-empty `implied_key`, a first item without '=' is that key's value.
// Errors carry QSD's texts ("Invalid parameter 'x'", "Expected '=' after parameter 'x'", ...).
result<keyval_parsed> keyval_parse(std::string_view text, std::string_view implied_key);

}  // namespace blockd

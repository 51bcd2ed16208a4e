// QemuOpts syntax (used by --chardev and -T): key=value items, implied first key, short-form booleans; any thread.
#pragma once
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "protocol/error.h"

namespace blockd {

struct qemu_opts_parsed {
  std::vector<std::pair<std::string, std::string>> options;  // in command-line order
  std::vector<std::string> warnings;                         // deprecation notes, printed before any error
  bool help = false;
};

// Parses `text`; names not in `allowed` stop parsing with "Invalid parameter 'x'". Warnings for
// items before the failing one are still returned inside the error's hint (one per line), so the
// caller can print them in QSD's order.
result<qemu_opts_parsed> qemu_opts_parse(std::string_view text, std::string_view implied_key,
                                         const std::vector<std::string>& allowed);

}  // namespace blockd

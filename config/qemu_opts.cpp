// QemuOpts parser with QEMU's short-form boolean handling and messages; any thread.
#include "config/qemu_opts.h"
#include "config/escaped_value.h"

#include <algorithm>

namespace blockd {

result<qemu_opts_parsed> qemu_opts_parse(std::string_view text, std::string_view implied_key,
                                         const std::vector<std::string>& allowed) {
  qemu_opts_parsed out;
  auto is_allowed = [&](const std::string& n) { return std::find(allowed.begin(), allowed.end(), n) != allowed.end(); };
  auto failure = [&](std::string msg) {
    error e(std::move(msg));
    for (auto& w : out.warnings) e.hint += w + "\n";
    return std::unexpected(e);
  };
  size_t i = 0;
  bool first = true;
  while (i < text.size()) {
    // Name: up to '=' or ','; ",," inside a name is an escaped comma as well.
    std::string name;
    size_t j = i;
    while (j < text.size() && text[j] != '=') {
      if (text[j] == ',') {
        if (j + 1 < text.size() && text[j + 1] == ',') {
          name.push_back(',');
          j += 2;
          continue;
        }
        break;
      }
      name.push_back(text[j++]);
    }
    bool has_eq = j < text.size() && text[j] == '=';
    std::string value;
    if (has_eq) value = scan_escaped_value(text, ++j);
    i = j < text.size() ? j + 1 : j;
    if (!has_eq) {
      if (name == "help" || name == "?") {
        out.help = true;
        first = false;
        continue;
      }
      if (first && !implied_key.empty()) {
        out.options.emplace_back(std::string(implied_key), name);
        first = false;
        continue;
      }
      // Short-form boolean: "x" means x=on, "nox" means x=off (deprecated, still accepted).
      std::string key = name;
      std::string val = "on";
      if (name.starts_with("no") && name.size() > 2 && !is_allowed(name)) {
        key = name.substr(2);
        val = "off";
      }
      out.warnings.push_back("short-form boolean option '" + name + "' deprecated\nPlease use " + key + "=" + val +
                             " instead");
      name = key;
      value = val;
    }
    first = false;
    if (!is_allowed(name)) return failure("Invalid parameter '" + name + "'");
    out.options.emplace_back(std::move(name), std::move(value));
  }
  return out;
}

}  // namespace blockd

// QSD-compatible command-line scanning (getopt_long rules) into an ordered plan; main thread at start-up.
#pragma once
#include <expected>
#include <optional>
#include <string>
#include <vector>

namespace blockd {

enum class cli_option { blockdev, chardev, export_, monitor, nbd_server, object, trace, positional };

struct cli_item {
  cli_option opt;
  std::string location;  // how errors name it: "--object ARG" (as typed, abbreviations included)
  std::string arg;
};

// Pass 1 decides help/version/daemonize/pidfile and catches syntax errors, in argument order: the
// first -h or -V (or syntax error) ends the scan, as in QSD. Everything else runs later, in order.
struct cli_plan {
  bool help = false;
  bool version = false;
  bool daemonize = false;
  std::optional<std::string> pidfile;
  std::vector<cli_item> items;
};

struct cli_failure {
  std::string message;  // the whole line, program name included
};

std::expected<cli_plan, cli_failure> parse_command_line(int argc, char** argv);

}  // namespace blockd

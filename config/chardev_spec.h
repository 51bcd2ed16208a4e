// Character-device settings (--chardev) as blockd uses them, built from QemuOpts key/value pairs; any thread.
#pragma once
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "protocol/error.h"

namespace blockd {

struct chardev_spec {
  std::string id;
  std::string backend;  // "socket", "stdio", "null"

  // socket
  std::string path;     // unix socket path (or abstract name)
  bool abstract_ns = false;
  bool tight = true;
  std::string host, port;
  bool ipv4 = false, ipv6 = false;
  std::optional<int> fd;  // pre-opened socket
  bool server = false;
  bool wait = true;       // server only: block start-up until the first client connects
  bool nodelay = false;
  int64_t reconnect_ms = 0;  // client only: reconnect after this long

  // stdio
  bool signal = true;

  std::string logfile;
  bool logappend = false;

  // The filename QEMU reports for this chardev ("unix:/p,server=on", "stdio", "null").
  std::string describe() const;
};

using option_list = std::vector<std::pair<std::string, std::string>>;

// Every option name QemuOpts accepts for --chardev, whatever the backend.
const std::vector<std::string>& chardev_option_names();
// Backends QSD knows; blockd builds the ones listed by chardev_backends_supported().
const std::vector<std::string>& chardev_backends_known();
const std::vector<std::string>& chardev_backends_supported();

// Converts the parsed --chardev options (in command-line order, "backend" and "id" included) into a
// spec, with QSD's messages for missing or malformed values.
result<chardev_spec> chardev_spec_from_options(const option_list& opts);

// QOM/QAPI identifier rule (letters, digits, '-', '.', '_', starting with a letter).
bool id_wellformed(const std::string& id);

// QSD's error for a malformed identifier in parameter `param`, with the rule as its hint.
error identifier_error(const std::string& param = "id");

}  // namespace blockd

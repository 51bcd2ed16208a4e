// Character-device settings (QAPI's ChardevBackend) built from --chardev QemuOpts or from chardev-add's JSON, with QSD's texts; any thread.
#pragma once
#include <boost/json.hpp>

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "protocol/error.h"

namespace blockd {

// One chardev backend as QEMU's ChardevBackend describes it, after defaults are applied. Both the
// command line and chardev-add/-change end here, so both accept the same backends and options.
struct chardev_spec {
  std::string id;
  std::string backend;  // a ChardevBackendKind value: "socket", "ringbuf", "memory", ...

  // ChardevCommon
  std::string logfile;
  bool logappend = false;

  // file: in (optional), out, append
  std::string in_path, out_path;
  bool append = false;
  // serial, parallel, pipe (ChardevHostdev)
  std::string device;

  // socket: addr; udp: remote (and local). Flat SocketAddress objects ({"type": "unix", "path": ...})
  // holding the members as given, which is what qom-get addr shows for a client socket.
  boost::json::object addr;
  boost::json::object local_addr;  // udp only; empty when not given
  std::string tls_creds, tls_authz;
  bool server = true;  // QMP's default; the command line's is false
  bool wait = false;
  bool wait_given = false;
  bool nodelay = false;
  bool telnet = false, tn3270 = false, websocket = false;
  bool reconnect_given = false;
  int64_t reconnect_ms = 0;
  // A descriptor handed over by an in-process caller (tests): used instead of addr, server or not.
  std::optional<int> handed_fd;

  std::string chardev;               // mux: the chardev it multiplexes
  std::vector<std::string> hub;      // hub (QSD 10.2): the chardevs it aggregates
  bool signal = true;                // stdio
  int64_t size = 65536;              // ringbuf, memory
  std::string pty_link;              // pty (QSD 10.2's ChardevPty.path): a symlink to the slave

  // --chardev ...,mux=on: the backend is created as "<id>-base" with a mux "<id>" over it.
  bool mux = false;
  // A command-line chardev: descriptors may be given by number, wait=on may block start-up.
  bool from_cli = false;

  // Convenience views of `addr`.
  std::string addr_type() const;
  std::string addr_str(const char* member) const;
  bool addr_bool(const char* member, bool dflt) const;
};

using option_list = std::vector<std::pair<std::string, std::string>>;

// Every option name QemuOpts accepts for --chardev, whatever the backend.
const std::vector<std::string>& chardev_option_names();
// The backends blockd can open, in the order `--chardev help` and query-chardev-backends list
// them (QSD 7.2's orders, plus QSD 10.2's hub).
const std::vector<std::string>& chardev_backends_help_order();
const std::vector<std::string>& chardev_backends_query_order();
// ChardevBackendKind values with no implementation in QSD either (vc, msmouse, spicevmc, ...).
bool chardev_backend_unavailable(const std::string& kind);

// Converts the parsed --chardev options (in command-line order, "backend" and "id" included) into
// a spec, with QSD's messages for missing or malformed values. `warnings` receives the
// deprecation notes QSD prints (aliases tty/parport).
result<chardev_spec> chardev_spec_from_options(const option_list& opts, std::vector<std::string>* warnings = nullptr);

// Converts chardev-add's (schema-checked) `backend` ({"type": KIND, "data": {...}}) into a spec.
result<chardev_spec> chardev_spec_from_qmp(const std::string& id, const boost::json::object& backend);

// Checks of QEMU's qmp_chardev_validate_socket that do not need the system (texts verbatim).
result<void> validate_socket_spec(const chardev_spec& s);

// QOM/QAPI identifier rule (letters, digits, '-', '.', '_', starting with a letter).
bool id_wellformed(const std::string& id);

// QSD's error for a malformed identifier in parameter `param`, with the rule as its hint.
error identifier_error(const std::string& param = "id");

}  // namespace blockd

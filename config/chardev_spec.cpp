// Builds chardev_spec values from --chardev options with QSD's error texts; any thread.
#include "config/chardev_spec.h"

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdlib>

namespace blockd {

const std::vector<std::string>& chardev_option_names() {
  static const std::vector<std::string> names = {
      "backend", "id", "path", "host", "port", "fd", "local", "localaddr", "localport", "to", "ipv4", "ipv6",
      "wait", "server", "delay", "nodelay", "reconnect", "reconnect-ms", "telnet", "tn3270", "websocket",
      "width", "height", "cols", "rows", "mux", "signal", "name", "debug", "size", "chardev", "append",
      "logfile", "logappend", "logtimestamp", "tight", "abstract", "tls-creds", "tls-authz"};
  return names;
}

const std::vector<std::string>& chardev_backends_known() {
  static const std::vector<std::string> names = {"pty", "udp", "memory", "file", "socket", "stdio",
                                                 "ringbuf", "null", "parallel", "pipe", "mux"};
  return names;
}

const std::vector<std::string>& chardev_backends_supported() {
  static const std::vector<std::string> names = {"socket", "stdio", "null"};
  return names;
}

bool id_wellformed(const std::string& id) {
  if (id.empty() || !std::isalpha(static_cast<unsigned char>(id[0]))) return false;
  return std::all_of(id.begin() + 1, id.end(), [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '.' || c == '_';
  });
}

namespace {

std::optional<std::string> last(const option_list& opts, std::string_view key) {
  std::optional<std::string> v;
  for (auto& [k, val] : opts)
    if (k == key) v = val;
  return v;
}

result<bool> get_bool(const option_list& opts, std::string_view key, bool dflt) {
  auto v = last(opts, key);
  if (!v) return dflt;
  if (*v == "on" || *v == "yes" || *v == "true" || *v == "y") return true;
  if (*v == "off" || *v == "no" || *v == "false" || *v == "n") return false;
  return fail("Parameter '" + std::string(key) + "' expects 'on' or 'off'");
}

result<int64_t> get_number(const option_list& opts, std::string_view key, int64_t dflt) {
  auto v = last(opts, key);
  if (!v) return dflt;
  errno = 0;
  char* end = nullptr;
  unsigned long long n = std::strtoull(v->c_str(), &end, 0);
  if (v->empty() || *end != '\0' || errno != 0 || v->front() == '-')
    return fail("Parameter '" + std::string(key) + "' expects a number");
  return static_cast<int64_t>(n);
}

}  // namespace

std::string chardev_spec::describe() const {
  if (backend != "socket") return backend;
  std::string s;
  if (!path.empty())
    s = "unix:" + path;
  else if (fd)
    s = "fd:" + std::to_string(*fd);
  else
    s = "tcp:" + host + ":" + port;
  if (server) s += ",server=on";
  return s;
}

error identifier_error(const std::string& param) {
  error e("Parameter '" + param + "' expects an identifier");
  e.hint = "Identifiers consist of letters, digits, '-', '.', '_', starting with a letter.";
  return e;
}

result<chardev_spec> chardev_spec_from_options(const option_list& opts) {
  for (auto& [k, v] : opts)
    if (std::find(chardev_option_names().begin(), chardev_option_names().end(), k) == chardev_option_names().end())
      return fail("Invalid parameter '" + k + "'");
  chardev_spec s;
  auto backend = last(opts, "backend");
  auto id = last(opts, "id");
  if (!id) return fail("chardev: no id specified");
  if (!id_wellformed(*id)) {
    return std::unexpected(identifier_error());
  }
  s.id = *id;
  if (!backend) return fail("chardev: \"" + s.id + "\" missing backend");
  s.backend = *backend;
  auto& known = chardev_backends_known();
  if (std::find(known.begin(), known.end(), s.backend) == known.end())
    return fail("'" + s.backend + "' is not a valid char driver name");
  auto& supported = chardev_backends_supported();
  if (std::find(supported.begin(), supported.end(), s.backend) == supported.end())
    return fail("chardev backend '" + s.backend + "' is not supported by blockd; use socket, stdio or null");
  if (auto mux = get_bool(opts, "mux", false); !mux) return std::unexpected(mux.error());
  else if (*mux) return fail("chardev '" + s.id + "': mux=on is not supported by blockd; give each monitor its own chardev");
  if (auto lf = last(opts, "logfile")) s.logfile = *lf;
  if (auto la = get_bool(opts, "logappend", false); !la) return std::unexpected(la.error());
  else s.logappend = *la;

  if (s.backend == "stdio") {
    auto sig = get_bool(opts, "signal", true);
    if (!sig) return std::unexpected(sig.error());
    s.signal = *sig;
    return s;
  }
  if (s.backend != "socket") return s;

  auto path = last(opts, "path");
  auto host = last(opts, "host");
  auto fd = last(opts, "fd");
  int given = (path ? 1 : 0) + (host ? 1 : 0) + (fd ? 1 : 0);
  if (given > 1) return fail("None or one of 'path', 'fd' or 'host' option required.");
  for (const char* unsupported : {"telnet", "tn3270", "websocket", "tls-creds", "tls-authz"}) {
    auto b = last(opts, unsupported);
    if (!b) continue;
    if (std::string_view(unsupported).starts_with("tls"))
      return fail("chardev '" + s.id + "': '" + unsupported + "' is not supported by blockd yet");
    auto on = get_bool(opts, unsupported, false);
    if (!on) return std::unexpected(on.error());
    if (*on) return fail("chardev '" + s.id + "': " + unsupported + "=on is not supported by blockd");
  }
  auto server = get_bool(opts, "server", false);
  if (!server) return std::unexpected(server.error());
  s.server = *server;
  auto wait = get_bool(opts, "wait", true);
  if (!wait) return std::unexpected(wait.error());
  s.wait = *wait;
  auto delay = get_bool(opts, "delay", true);
  if (!delay) return std::unexpected(delay.error());
  auto nodelay = get_bool(opts, "nodelay", false);
  if (!nodelay) return std::unexpected(nodelay.error());
  s.nodelay = *nodelay || !*delay;
  auto reconnect = get_number(opts, "reconnect", 0);
  if (!reconnect) return std::unexpected(reconnect.error());
  auto reconnect_ms = get_number(opts, "reconnect-ms", 0);
  if (!reconnect_ms) return std::unexpected(reconnect_ms.error());
  if (*reconnect && *reconnect_ms) return fail("'reconnect' and 'reconnect-ms' are mutually exclusive");
  s.reconnect_ms = *reconnect_ms ? *reconnect_ms : *reconnect * 1000;
  if (s.server && s.reconnect_ms) return fail("'reconnect' option is incompatible with socket in server listen mode");
  auto abs = get_bool(opts, "abstract", false);
  if (!abs) return std::unexpected(abs.error());
  s.abstract_ns = *abs;
  auto tight = get_bool(opts, "tight", true);
  if (!tight) return std::unexpected(tight.error());
  s.tight = *tight;
  auto v4 = get_bool(opts, "ipv4", false), v6 = get_bool(opts, "ipv6", false);
  if (!v4) return std::unexpected(v4.error());
  if (!v6) return std::unexpected(v6.error());
  s.ipv4 = *v4;
  s.ipv6 = *v6;

  if (path) {
    s.path = *path;
  } else if (host) {
    s.host = *host;
    auto port = last(opts, "port");
    if (!port) return fail("chardev: socket: no port given");
    s.port = *port;
  } else {
    std::string text = fd ? *fd : "";
    char* end = nullptr;
    errno = 0;
    long n = std::strtol(text.c_str(), &end, 10);
    if (text.empty() || *end != '\0' || errno != 0 || n < 0 || n > 65535)
      return fail("Unable to parse FD number " + text);
    s.fd = static_cast<int>(n);
  }
  return s;
}

}  // namespace blockd

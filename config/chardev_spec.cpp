// Builds chardev_spec values from --chardev options and chardev-add JSON with QSD's error texts; any thread.
#include "config/chardev_spec.h"

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdlib>

namespace blockd {

namespace json = boost::json;

// ---- names ------------------------------------------------------------------------------------

namespace {

enum class opt_type { str, boolean, number, size };

struct opt_desc {
  const char* name;
  opt_type type;
};

// QEMU's qemu_chardev_opts (7.2) plus reconnect-ms (10.2), with the type QemuOpts checks.
const std::vector<opt_desc>& option_table() {
  static const std::vector<opt_desc> t = {
      {"backend", opt_type::str},      {"path", opt_type::str},           {"host", opt_type::str},
      {"port", opt_type::str},         {"fd", opt_type::str},             {"local", opt_type::boolean},
      {"localaddr", opt_type::str},    {"localport", opt_type::str},      {"to", opt_type::number},
      {"ipv4", opt_type::boolean},     {"ipv6", opt_type::boolean},       {"wait", opt_type::boolean},
      {"server", opt_type::boolean},   {"delay", opt_type::boolean},      {"nodelay", opt_type::boolean},
      {"reconnect", opt_type::number}, {"reconnect-ms", opt_type::number}, {"telnet", opt_type::boolean},
      {"tn3270", opt_type::boolean},   {"tls-creds", opt_type::str},      {"tls-authz", opt_type::str},
      {"websocket", opt_type::boolean}, {"width", opt_type::number},      {"height", opt_type::number},
      {"cols", opt_type::number},      {"rows", opt_type::number},        {"mux", opt_type::boolean},
      {"signal", opt_type::boolean},   {"name", opt_type::str},           {"debug", opt_type::number},
      {"size", opt_type::size},        {"chardev", opt_type::str},        {"append", opt_type::boolean},
      {"logfile", opt_type::str},      {"logappend", opt_type::boolean},  {"tight", opt_type::boolean},
      {"abstract", opt_type::boolean}, {"id", opt_type::str},
      // hub (QSD 10.2): chardevs.0 ... chardevs.3
      {"chardevs.0", opt_type::str},   {"chardevs.1", opt_type::str},     {"chardevs.2", opt_type::str},
      {"chardevs.3", opt_type::str}};
  return t;
}

}  // namespace

const std::vector<std::string>& chardev_option_names() {
  static const std::vector<std::string> names = [] {
    std::vector<std::string> v;
    for (auto& d : option_table()) v.push_back(d.name);
    return v;
  }();
  return names;
}

const std::vector<std::string>& chardev_backends_help_order() {
  static const std::vector<std::string> names = {"pty",      "udp",      "memory", "file", "socket", "stdio", "ringbuf",
                                                 "null",     "parallel", "pipe",   "mux",  "serial", "hub"};
  return names;
}

const std::vector<std::string>& chardev_backends_query_order() {
  static const std::vector<std::string> names = {"serial", "mux",    "pipe", "parallel", "null", "ringbuf", "stdio",
                                                 "socket", "file",   "memory", "udp",    "pty",  "hub"};
  return names;
}

bool chardev_backend_unavailable(const std::string& kind) {
  auto& known = chardev_backends_help_order();
  return std::find(known.begin(), known.end(), kind) == known.end();
}

bool id_wellformed(const std::string& id) {
  if (id.empty() || !std::isalpha(static_cast<unsigned char>(id[0]))) return false;
  return std::all_of(id.begin() + 1, id.end(), [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '.' || c == '_';
  });
}

error identifier_error(const std::string& param) {
  error e("Parameter '" + param + "' expects an identifier");
  e.hint = "Identifiers consist of letters, digits, '-', '.', '_', starting with a letter.";
  return e;
}

// ---- spec helpers -----------------------------------------------------------------------------

std::string chardev_spec::addr_type() const { return addr_str("type"); }

std::string chardev_spec::addr_str(const char* member) const {
  auto* v = addr.if_contains(member);
  return v && v->is_string() ? std::string(v->as_string()) : std::string();
}

bool chardev_spec::addr_bool(const char* member, bool dflt) const {
  auto* v = addr.if_contains(member);
  return v && v->is_bool() ? v->as_bool() : dflt;
}

// ---- QemuOpts ---------------------------------------------------------------------------------

namespace {

std::optional<std::string> last(const option_list& opts, std::string_view key) {
  std::optional<std::string> v;
  for (auto& [k, val] : opts)
    if (k == key) v = val;
  return v;
}

std::optional<bool> parse_bool(const std::string& v) {
  if (v == "on" || v == "yes" || v == "true" || v == "y") return true;
  if (v == "off" || v == "no" || v == "false" || v == "n") return false;
  return std::nullopt;
}

std::optional<uint64_t> parse_number(const std::string& v) {
  if (v.empty()) return std::nullopt;
  errno = 0;
  char* end = nullptr;
  unsigned long long n = std::strtoull(v.c_str(), &end, 0);
  if (*end != '\0' || errno != 0) return std::nullopt;
  return static_cast<uint64_t>(n);
}

// QEMU's qemu_strtosz: a decimal number (a fraction allowed) with an optional B/K/M/G/T/P/E suffix.
std::optional<uint64_t> parse_size(const std::string& v) {
  if (v.empty() || !std::isdigit(static_cast<unsigned char>(v[0]))) return std::nullopt;
  size_t i = 0;
  while (i < v.size() && std::isdigit(static_cast<unsigned char>(v[i]))) ++i;
  std::string whole = v.substr(0, i), frac;
  if (i < v.size() && v[i] == '.') {
    size_t j = ++i;
    while (i < v.size() && std::isdigit(static_cast<unsigned char>(v[i]))) ++i;
    frac = v.substr(j, i - j);
    if (frac.empty()) return std::nullopt;
  }
  uint64_t mult = 1;
  if (i < v.size()) {
    int shift = 0;
    switch (std::toupper(static_cast<unsigned char>(v[i]))) {
      case 'B': shift = 0; break;
      case 'K': shift = 10; break;
      case 'M': shift = 20; break;
      case 'G': shift = 30; break;
      case 'T': shift = 40; break;
      case 'P': shift = 50; break;
      case 'E': shift = 60; break;
      default: return std::nullopt;
    }
    mult = uint64_t(1) << shift;
    if (++i != v.size()) return std::nullopt;
  } else if (!frac.empty()) {
    return std::nullopt;  // a fraction of a byte
  }
  errno = 0;
  unsigned long long w = std::strtoull(whole.c_str(), nullptr, 10);
  if (errno != 0) return std::nullopt;
  long double value = static_cast<long double>(w);
  if (!frac.empty()) value += std::strtold(("0." + frac).c_str(), nullptr);
  value *= static_cast<long double>(mult);
  if (value >= 18446744073709551616.0L) return std::nullopt;
  return static_cast<uint64_t>(value);
}

// The checks QemuOpts makes while it takes each option, in command-line order.
result<void> check_types(const option_list& opts) {
  for (auto& [k, v] : opts) {
    auto it = std::find_if(option_table().begin(), option_table().end(), [&](const opt_desc& d) { return k == d.name; });
    if (it == option_table().end()) return fail("Invalid parameter '" + k + "'");
    switch (it->type) {
      case opt_type::str: break;
      case opt_type::boolean:
        if (!parse_bool(v)) return fail("Parameter '" + k + "' expects 'on' or 'off'");
        break;
      case opt_type::number:
        if (!parse_number(v)) return fail("Parameter '" + k + "' expects a number");
        break;
      case opt_type::size:
        if (!parse_size(v)) {
          error e("Parameter '" + k + "' expects a non-negative number below 2^64");
          e.hint =
              "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
              "and exabytes, respectively.";
          return std::unexpected(e);
        }
        break;
    }
  }
  return {};
}

bool opt_bool(const option_list& opts, std::string_view key, bool dflt) {
  auto v = last(opts, key);
  return v ? *parse_bool(*v) : dflt;
}

int64_t opt_number(const option_list& opts, std::string_view key, int64_t dflt) {
  auto v = last(opts, key);
  return v ? static_cast<int64_t>(*parse_number(*v)) : dflt;
}

bool given(const option_list& opts, std::string_view key) { return last(opts, key).has_value(); }

std::string opt_str(const option_list& opts, std::string_view key) { return last(opts, key).value_or(""); }

result<void> parse_socket_options(const option_list& opts, chardev_spec& s) {
  auto path = last(opts, "path"), host = last(opts, "host"), port = last(opts, "port"), fd = last(opts, "fd");
  if ((path ? 1 : 0) + (host ? 1 : 0) + (fd ? 1 : 0) > 1) return fail("None or one of 'path', 'fd' or 'host' option required.");
  if (host && !port) return fail("chardev: socket: no port given");
  if (given(opts, "delay") && given(opts, "nodelay")) return fail("'delay' and 'nodelay' are mutually exclusive");
  s.nodelay = !opt_bool(opts, "delay", true) || opt_bool(opts, "nodelay", false);
  // The command line's defaults differ from QMP's: client unless server=on, and a server waits
  // for its first client unless wait=off.
  s.server = opt_bool(opts, "server", false);
  s.telnet = opt_bool(opts, "telnet", false);
  s.tn3270 = opt_bool(opts, "tn3270", false);
  s.websocket = opt_bool(opts, "websocket", false);
  s.wait_given = given(opts, "wait") || s.server;
  s.wait = opt_bool(opts, "wait", true);
  if (given(opts, "reconnect") && given(opts, "reconnect-ms"))
    return fail("'reconnect' and 'reconnect-ms' are mutually exclusive");
  s.reconnect_given = given(opts, "reconnect") || given(opts, "reconnect-ms");
  s.reconnect_ms = given(opts, "reconnect") ? opt_number(opts, "reconnect", 0) * 1000 : opt_number(opts, "reconnect-ms", 0);
  s.tls_creds = opt_str(opts, "tls-creds");
  s.tls_authz = opt_str(opts, "tls-authz");
  if (path) {
    s.addr = {{"type", "unix"}, {"path", *path}, {"tight", opt_bool(opts, "tight", true)},
              {"abstract", opt_bool(opts, "abstract", false)}};
  } else if (host) {
    s.addr = {{"type", "inet"}, {"host", *host}, {"port", *port}};
    if (given(opts, "to")) s.addr["to"] = opt_number(opts, "to", 0);
    if (given(opts, "ipv4")) s.addr["ipv4"] = opt_bool(opts, "ipv4", false);
    if (given(opts, "ipv6")) s.addr["ipv6"] = opt_bool(opts, "ipv6", false);
  } else {
    s.addr = {{"type", "fd"}, {"str", fd.value_or("")}};
  }
  return {};
}

}  // namespace

result<chardev_spec> chardev_spec_from_options(const option_list& opts, std::vector<std::string>* warnings) {
  chardev_spec s;
  s.from_cli = true;
  auto id = last(opts, "id");
  if (id && !id_wellformed(*id)) return std::unexpected(identifier_error());
  if (auto r = check_types(opts); !r) return std::unexpected(r.error());
  if (!id) return fail("chardev: no id specified");
  s.id = *id;
  auto backend = last(opts, "backend");
  if (!backend) return fail("chardev: \"" + s.id + "\" missing backend");
  s.backend = *backend;
  for (auto [alias, name] : {std::pair{"tty", "serial"}, std::pair{"parport", "parallel"}}) {
    if (s.backend != alias) continue;
    if (warnings)
      warnings->push_back(std::string("The alias '") + alias + "' is deprecated, use '" + name + "' instead");
    s.backend = name;
  }
  if (chardev_backend_unavailable(s.backend)) return fail("'" + s.backend + "' is not a valid char driver name");
  s.logfile = opt_str(opts, "logfile");
  s.logappend = opt_bool(opts, "logappend", false);
  s.mux = opt_bool(opts, "mux", false);

  const std::string& b = s.backend;
  if (b == "file") {
    if (!given(opts, "path")) return fail("chardev: file: no filename given");
    s.out_path = opt_str(opts, "path");
    s.append = opt_bool(opts, "append", false);
  } else if (b == "pipe" || b == "serial" || b == "parallel") {
    if (!given(opts, "path"))
      return fail("chardev: " + std::string(b == "serial" ? "serial/tty" : b) + ": no device path given");
    s.device = opt_str(opts, "path");
  } else if (b == "udp") {
    std::string host = opt_str(opts, "host"), port = opt_str(opts, "port");
    std::string localaddr = opt_str(opts, "localaddr"), localport = opt_str(opts, "localport");
    if (host.empty()) host = "localhost";
    if (port.empty()) return fail("chardev: udp: remote port not specified");
    s.addr = {{"type", "inet"}, {"host", host}, {"port", port}};
    if (given(opts, "ipv4")) s.addr["ipv4"] = opt_bool(opts, "ipv4", false);
    if (given(opts, "ipv6")) s.addr["ipv6"] = opt_bool(opts, "ipv6", false);
    if (!localaddr.empty() || !localport.empty())
      s.local_addr = {{"type", "inet"}, {"host", localaddr}, {"port", localport.empty() ? "0" : localport}};
  } else if (b == "ringbuf" || b == "memory") {
    // size=0 (or none) means the default on the command line.
    auto v = last(opts, "size");
    uint64_t n = v ? *parse_size(*v) : 0;
    s.size = n ? static_cast<int64_t>(n) : 65536;
  } else if (b == "mux") {
    if (!given(opts, "chardev")) return fail("chardev: mux: no chardev given");
    s.chardev = opt_str(opts, "chardev");
  } else if (b == "hub") {
    for (int i = 0; i < 4; ++i)
      if (auto c = last(opts, "chardevs." + std::to_string(i))) s.hub.push_back(*c);
    if (s.hub.empty()) return fail("chardev: hub: no chardevs given");
  } else if (b == "stdio") {
    s.signal = opt_bool(opts, "signal", true);
  } else if (b == "pty") {
    s.pty_link = opt_str(opts, "path");
  } else if (b == "socket") {
    if (auto r = parse_socket_options(opts, s); !r) return std::unexpected(r.error());
  }
  return s;
}

// ---- QMP --------------------------------------------------------------------------------------

namespace {

bool jbool(const json::object& o, const char* k, bool dflt) {
  auto* v = o.if_contains(k);
  return v && v->is_bool() ? v->as_bool() : dflt;
}

std::string jstr(const json::object& o, const char* k) {
  auto* v = o.if_contains(k);
  return v && v->is_string() ? std::string(v->as_string()) : std::string();
}

// SocketAddressLegacy {"type": T, "data": {...}} -> the flat SocketAddress {"type": T, ...}.
json::object flatten(const json::value& legacy) {
  const auto& o = legacy.as_object();
  json::object flat;
  flat["type"] = o.at("type");
  if (auto* d = o.if_contains("data"); d && d->is_object())
    for (auto& kv : d->as_object()) flat[kv.key()] = kv.value();
  return flat;
}

}  // namespace

result<chardev_spec> chardev_spec_from_qmp(const std::string& id, const json::object& backend) {
  chardev_spec s;
  s.id = id;
  s.backend = std::string(backend.at("type").as_string());
  static const json::object empty;
  const json::object* dp = &empty;
  if (auto* d = backend.if_contains("data"); d && d->is_object()) dp = &d->as_object();
  const json::object& data = *dp;
  s.logfile = jstr(data, "logfile");
  s.logappend = jbool(data, "logappend", false);
  const std::string& b = s.backend;
  if (b == "file") {
    s.in_path = jstr(data, "in");
    s.out_path = jstr(data, "out");
    s.append = jbool(data, "append", false);
  } else if (b == "serial" || b == "parallel" || b == "pipe") {
    s.device = jstr(data, "device");
  } else if (b == "socket") {
    s.addr = flatten(data.at("addr"));
    s.tls_creds = jstr(data, "tls-creds");
    s.tls_authz = jstr(data, "tls-authz");
    s.server = jbool(data, "server", true);
    s.wait_given = data.contains("wait");
    s.wait = jbool(data, "wait", false);
    s.nodelay = jbool(data, "nodelay", false);
    s.telnet = jbool(data, "telnet", false);
    s.tn3270 = jbool(data, "tn3270", false);
    s.websocket = jbool(data, "websocket", false);
    s.reconnect_given = data.contains("reconnect-ms");
    if (auto* r = data.if_contains("reconnect-ms"); r && r->is_int64()) s.reconnect_ms = r->as_int64();
  } else if (b == "udp") {
    s.addr = flatten(data.at("remote"));
    if (auto* l = data.if_contains("local")) s.local_addr = flatten(*l);
  } else if (b == "mux") {
    s.chardev = jstr(data, "chardev");
  } else if (b == "hub") {
    if (auto* c = data.if_contains("chardevs"); c && c->is_array())
      for (auto& e : c->as_array())
        if (e.is_string()) s.hub.emplace_back(e.as_string());
  } else if (b == "stdio") {
    s.signal = jbool(data, "signal", true);
  } else if (b == "ringbuf" || b == "memory") {
    if (auto* z = data.if_contains("size"); z && z->is_int64()) s.size = z->as_int64();
  } else if (b == "pty") {
    s.pty_link = jstr(data, "path");
  }
  return s;
}

result<void> validate_socket_spec(const chardev_spec& s) {
  std::string type = s.addr_type();
  if (type == "fd") {
    if (s.reconnect_given) return fail("'reconnect' option is incompatible with 'fd' address type");
    if (!s.tls_creds.empty() && !s.server)
      return fail("'tls_creds' option is incompatible with 'fd' address type as client");
  }
  if (!s.tls_authz.empty() && s.tls_creds.empty()) return fail("'tls_authz' option requires 'tls_creds' option");
  if (s.server) {
    if (s.reconnect_given) return fail("'reconnect' option is incompatible with socket in server listen mode");
  } else {
    if (s.websocket) return fail("Websocket client is not implemented");
    if (s.wait_given) return fail("'wait' option is incompatible with socket in client connect mode");
  }
  return {};
}

}  // namespace blockd

// Resolving, listening and connecting for socket chardevs, and QEMU's address texts; the chardev's iothread (connect_blocking on a reactor worker).
#include "actors/chardev/socket_address.h"

#include <linux/vm_sockets.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <cstring>

namespace blockd::chr {

namespace json = boost::json;

namespace {

std::string str(const json::object& o, const char* k) {
  auto* v = o.if_contains(k);
  return v && v->is_string() ? std::string(v->as_string()) : std::string();
}
bool flag(const json::object& o, const char* k, bool dflt) {
  auto* v = o.if_contains(k);
  return v && v->is_bool() ? v->as_bool() : dflt;
}
std::string errstr(int e) { return std::strerror(e); }

std::string numeric_host(const sock_addr& a, std::string* port) {
  char host[NI_MAXHOST] = {}, serv[NI_MAXSERV] = {};
  ::getnameinfo(a.sa(), a.len, host, sizeof host, serv, sizeof serv, NI_NUMERICHOST | NI_NUMERICSERV);
  if (port) *port = serv;
  return host;
}

result<sock_addr> vsock_address(const json::object& addr) {
  sock_addr a;
  auto* vm = reinterpret_cast<sockaddr_vm*>(&a.ss);
  vm->svm_family = AF_VSOCK;
  char* end = nullptr;
  std::string cid = str(addr, "cid"), port = str(addr, "port");
  unsigned long c = std::strtoul(cid.c_str(), &end, 10);
  if (cid.empty() || *end) return fail("Failed to parse cid '" + cid + "'");
  unsigned long p = std::strtoul(port.c_str(), &end, 10);
  if (port.empty() || *end) return fail("Failed to parse port '" + port + "'");
  vm->svm_cid = static_cast<unsigned>(c);
  vm->svm_port = static_cast<unsigned>(p);
  a.len = sizeof(sockaddr_vm);
  return a;
}

}  // namespace

result<std::vector<sock_addr>> resolve_inet(const json::object& addr, int socktype, bool passive) {
  std::string host = str(addr, "host"), port = str(addr, "port");
  addrinfo hints{};
  hints.ai_socktype = socktype;
  hints.ai_flags = passive ? AI_PASSIVE : 0;
  bool v4 = flag(addr, "ipv4", false), v6 = flag(addr, "ipv6", false);
  hints.ai_family = v4 && !v6 ? AF_INET : (v6 && !v4 ? AF_INET6 : AF_UNSPEC);
  addrinfo* res = nullptr;
  int rc = ::getaddrinfo(host.empty() ? nullptr : host.c_str(), port.c_str(), &hints, &res);
  if (rc != 0) return fail("address resolution failed for " + host + ":" + port + ": " + ::gai_strerror(rc));
  std::vector<sock_addr> out;
  for (auto* ai = res; ai; ai = ai->ai_next) {
    sock_addr a;
    std::memcpy(&a.ss, ai->ai_addr, ai->ai_addrlen);
    a.len = ai->ai_addrlen;
    out.push_back(a);
  }
  ::freeaddrinfo(res);
  return out;
}

result<sock_addr> unix_address(const json::object& addr) {
  std::string path = str(addr, "path");
  bool abstract_ns = flag(addr, "abstract", false), tight = flag(addr, "tight", true);
  sock_addr a;
  auto* un = reinterpret_cast<sockaddr_un*>(&a.ss);
  un->sun_family = AF_UNIX;
  size_t max = sizeof(un->sun_path) - 1 - (abstract_ns ? 1 : 0);
  if (path.size() > max) return fail("UNIX socket path '" + path + "' is too long");
  if (abstract_ns) {
    std::memcpy(un->sun_path + 1, path.data(), path.size());
    a.len = tight ? static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + path.size())
                  : static_cast<socklen_t>(sizeof(sockaddr_un));
  } else {
    std::memcpy(un->sun_path, path.data(), path.size());
    a.len = static_cast<socklen_t>(sizeof(sockaddr_un));
  }
  return a;
}

result<std::vector<int>> listen_on(const json::object& addr) {
  std::string type = str(addr, "type");
  if (type == "unix" || type == "vsock") {
    auto a = type == "unix" ? unix_address(addr) : vsock_address(addr);
    if (!a) return std::unexpected(a.error());
    int fd = ::socket(a->family(), SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return fail((type == "unix" ? "Failed to create Unix socket: " : "Failed to create socket: ") + errstr(errno));
    std::string path = str(addr, "path");
    if (type == "unix" && !flag(addr, "abstract", false)) {
      // A socket file left by an earlier run would make bind fail; only sockets are removed
      // (QEMU removes whatever is there, blockd will not delete a user's regular file).
      struct stat st;
      if (::lstat(path.c_str(), &st) == 0 && S_ISSOCK(st.st_mode)) ::unlink(path.c_str());
    }
    if (::bind(fd, a->sa(), a->len) < 0) {
      int e = errno;
      ::close(fd);
      if (type == "unix") return fail("Failed to bind socket to " + path + ": " + errstr(e));
      return fail("Failed to bind socket: " + errstr(e));
    }
    if (::listen(fd, 1) < 0) {
      int e = errno;
      ::close(fd);
      return fail("Failed to listen on socket: " + errstr(e));
    }
    return std::vector<int>{fd};
  }
  if (type != "inet") return fail("socket type unsupported");
  auto list = resolve_inet(addr, SOCK_STREAM, true);
  if (!list) return std::unexpected(list.error());
  bool has_v4 = false;
  for (auto& a : *list) has_v4 |= a.family() == AF_INET;
  // A port range (to=) is tried upwards, as QEMU's inet_listen does.
  int first = std::atoi(str(addr, "port").c_str());
  int last = first;
  if (auto* to = addr.if_contains("to"); to && to->is_int64() && to->as_int64() > first) last = int(to->as_int64());
  std::vector<int> fds;
  std::string err;
  for (auto& a : *list) {
    int fd = ::socket(a.family(), SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
      err = "Failed to create socket: " + errstr(errno);
      continue;
    }
    int one = 1;
    (void)::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (a.family() == AF_INET6 && has_v4) (void)::setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
    bool bound = false;
    for (int port = first; port <= last; ++port) {
      sock_addr b = a;
      if (b.family() == AF_INET) reinterpret_cast<sockaddr_in*>(&b.ss)->sin_port = htons(uint16_t(port));
      if (b.family() == AF_INET6) reinterpret_cast<sockaddr_in6*>(&b.ss)->sin6_port = htons(uint16_t(port));
      if (::bind(fd, b.sa(), b.len) == 0) {
        bound = true;
        break;
      }
      if (errno != EADDRINUSE) {
        err = "Failed to bind socket: " + errstr(errno);
        break;
      }
      err = "Failed to find an available port: " + errstr(errno);
    }
    if (!bound || ::listen(fd, 1) < 0) {
      if (bound) err = "Failed to listen on socket: " + errstr(errno);
      ::close(fd);
      continue;
    }
    fds.push_back(fd);
  }
  if (fds.empty()) return fail(err.empty() ? "Failed to find an available port" : err);
  return fds;
}

result<int> connect_blocking(const json::object& addr) {
  std::string type = str(addr, "type");
  if (type == "unix" || type == "vsock") {
    auto a = type == "unix" ? unix_address(addr) : vsock_address(addr);
    if (!a) return std::unexpected(a.error());
    int fd = ::socket(a->family(), SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return fail("Failed to create socket: " + errstr(errno));
    if (::connect(fd, a->sa(), a->len) < 0) {
      int e = errno;
      ::close(fd);
      if (type == "unix") return fail("Failed to connect to '" + str(addr, "path") + "': " + errstr(e));
      return fail("Failed to connect to '" + str(addr, "cid") + ":" + str(addr, "port") + "': " + errstr(e));
    }
    return fd;
  }
  if (type != "inet") return fail("socket type unsupported");
  auto list = resolve_inet(addr, SOCK_STREAM, false);
  if (!list) return std::unexpected(list.error());
  int last_errno = ECONNREFUSED;
  for (auto& a : *list) {
    int fd = ::socket(a.family(), SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
      last_errno = errno;
      continue;
    }
    if (::connect(fd, a.sa(), a.len) == 0) return fd;
    last_errno = errno;
    ::close(fd);
  }
  return fail("Failed to connect to '" + str(addr, "host") + ":" + str(addr, "port") + "': " + errstr(last_errno));
}

sock_addr local_of(int fd) {
  sock_addr a;
  a.len = sizeof a.ss;
  if (::getsockname(fd, reinterpret_cast<sockaddr*>(&a.ss), &a.len) < 0) a.len = 0;
  return a;
}

sock_addr peer_of(int fd) {
  sock_addr a;
  a.len = sizeof a.ss;
  if (::getpeername(fd, reinterpret_cast<sockaddr*>(&a.ss), &a.len) < 0) a.len = 0;
  return a;
}

json::object address_of(const sock_addr& a) {
  json::object o;
  if (a.family() == AF_INET || a.family() == AF_INET6) {
    std::string port;
    std::string host = numeric_host(a, &port);
    o["type"] = "inet";
    o["host"] = host;
    o["port"] = port;
    o[a.family() == AF_INET ? "ipv4" : "ipv6"] = true;
  } else if (a.family() == AF_UNIX) {
    auto* un = reinterpret_cast<const sockaddr_un*>(&a.ss);
    size_t plen = a.len > offsetof(sockaddr_un, sun_path) ? a.len - offsetof(sockaddr_un, sun_path) : 0;
    o["type"] = "unix";
    if (plen > 0 && un->sun_path[0] == '\0') {
      // Abstract: the name runs to the end of the address; a short address is a "tight" one.
      o["path"] = std::string(un->sun_path + 1, plen - 1);
      o["abstract"] = true;
      o["tight"] = a.len < sizeof(sockaddr_un);
    } else {
      o["path"] = std::string(un->sun_path, ::strnlen(un->sun_path, plen));
    }
  } else if (a.family() == AF_VSOCK) {
    auto* vm = reinterpret_cast<const sockaddr_vm*>(&a.ss);
    o["type"] = "vsock";
    o["cid"] = std::to_string(vm->svm_cid);
    o["port"] = std::to_string(vm->svm_port);
  }
  return o;
}

std::string address_text(const json::object& addr, const std::string& proto) {
  std::string type = str(addr, "type");
  if (type == "unix") {
    std::string s = "unix:" + str(addr, "path");
    if (flag(addr, "abstract", false)) s += std::string(",abstract=on,tight=") + (flag(addr, "tight", true) ? "on" : "off");
    return s;
  }
  if (type == "inet") return proto + ":" + str(addr, "host") + ":" + str(addr, "port");
  if (type == "vsock") return "vsock:" + str(addr, "cid") + ":" + str(addr, "port");
  if (type == "fd") return "fd:" + str(addr, "str");
  return "unknown";
}

std::string endpoint_text(const sock_addr& a) {
  if (a.family() == AF_UNIX) {
    auto* un = reinterpret_cast<const sockaddr_un*>(&a.ss);
    size_t plen = a.len > offsetof(sockaddr_un, sun_path) ? a.len - offsetof(sockaddr_un, sun_path) : 0;
    return std::string(un->sun_path, ::strnlen(un->sun_path, plen));  // an abstract name prints empty, as in QEMU
  }
  std::string port;
  std::string host = numeric_host(a, &port);
  if (a.family() == AF_INET6) return "[" + host + "]:" + port;
  return host + ":" + port;
}

}  // namespace blockd::chr

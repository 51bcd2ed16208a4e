// Opens chardev sockets/stdio with QSD's error texts; runs on the main iothread (start-up or QMP).
#include "actors/monitor/chardev.h"

#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

namespace blockd {
namespace {

std::string errstr(int e) { return std::strerror(e); }

result<sockaddr_un> unix_address(const chardev_spec& s, socklen_t* len) {
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  size_t max = sizeof(a.sun_path) - (s.abstract_ns ? 1 : 0) - 1;
  if (s.path.size() > max)
    return fail("UNIX socket path '" + s.path + "' is too long");
  if (s.abstract_ns) {
    std::memcpy(a.sun_path + 1, s.path.data(), s.path.size());
    *len = s.tight ? static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + s.path.size())
                   : static_cast<socklen_t>(sizeof a);
  } else {
    std::memcpy(a.sun_path, s.path.data(), s.path.size());
    *len = static_cast<socklen_t>(sizeof a);
  }
  return a;
}

void set_nodelay(int fd, bool on) {
  int v = on ? 1 : 0;
  (void)::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &v, sizeof v);
}

}  // namespace

result<std::unique_ptr<chardev>> chardev::open(const chardev_spec& spec, const std::string& note_prefix) {
  std::unique_ptr<chardev> c(new chardev(spec));
  if (auto r = c->setup(); !r) return std::unexpected(r.error());
  if (c->kind_ == kind::socket_server && spec.wait) {
    std::fprintf(stderr, "%sinfo: blockd waiting for connection on: %s\n", note_prefix.c_str(),
                 ("disconnected:" + spec.describe()).c_str());
    for (;;) {
      int fd = ::accept4(c->listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
      if (fd >= 0) {
        c->adopt_connection(fd);
        break;
      }
      if (errno != EINTR) return fail("Failed to accept a connection on '" + spec.describe() + "': " + errstr(errno));
    }
  }
  return c;
}

chardev::~chardev() {
  drop_connection();
  if (listen_fd_ >= 0) ::close(listen_fd_);
  if (!unlink_on_close_.empty()) ::unlink(unlink_on_close_.c_str());
}

result<void> chardev::setup() {
  const auto& s = spec_;
  if (s.backend == "null") {
    kind_ = kind::null;
    return {};
  }
  if (s.backend == "stdio") {
    kind_ = kind::stdio;
    in_fd_ = STDIN_FILENO;
    out_fd_ = STDOUT_FILENO;
    return {};
  }
  kind_ = s.server ? kind::socket_server : kind::socket_client;
  if (s.fd) {
    int fd = ::fcntl(*s.fd, F_DUPFD_CLOEXEC, 3);
    if (fd < 0) return fail("Unable to use file descriptor " + std::to_string(*s.fd) + ": " + errstr(errno));
    if (s.server)
      listen_fd_ = fd;
    else
      adopt_connection(fd);
    return {};
  }
  if (!s.server) return reconnect_now();

  if (!s.path.empty()) {
    socklen_t len = 0;
    auto addr = unix_address(s, &len);
    if (!addr) return std::unexpected(addr.error());
    int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return fail("Failed to create Unix socket: " + errstr(errno));
    if (!s.abstract_ns) {
      // A stale socket file from an earlier run would make bind fail; only sockets are removed.
      struct stat st;
      if (::lstat(s.path.c_str(), &st) == 0 && S_ISSOCK(st.st_mode)) ::unlink(s.path.c_str());
    }
    if (::bind(fd, reinterpret_cast<sockaddr*>(&*addr), len) < 0) {
      int e = errno;
      ::close(fd);
      return fail("Failed to bind socket to " + s.path + ": " + errstr(e));
    }
    if (::listen(fd, 1) < 0) {
      int e = errno;
      ::close(fd);
      return fail("Failed to listen on socket: " + errstr(e));
    }
    listen_fd_ = fd;
    if (!s.abstract_ns) unlink_on_close_ = s.path;
    return {};
  }

  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_ADDRCONFIG;
  hints.ai_family = s.ipv4 && !s.ipv6 ? AF_INET : (s.ipv6 && !s.ipv4 ? AF_INET6 : AF_UNSPEC);
  addrinfo* res = nullptr;
  int rc = ::getaddrinfo(s.host.empty() ? nullptr : s.host.c_str(), s.port.c_str(), &hints, &res);
  if (rc != 0)
    return fail("address resolution failed for " + s.host + ":" + s.port + ": " + ::gai_strerror(rc));
  int last_errno = 0;
  for (auto* ai = res; ai; ai = ai->ai_next) {
    int fd = ::socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
    if (fd < 0) {
      last_errno = errno;
      continue;
    }
    int one = 1;
    (void)::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (::bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 && ::listen(fd, 1) == 0) {
      listen_fd_ = fd;
      break;
    }
    last_errno = errno;
    ::close(fd);
  }
  ::freeaddrinfo(res);
  if (listen_fd_ < 0) return fail("Failed to bind socket: " + errstr(last_errno));
  return {};
}

result<void> chardev::reconnect_now() {
  const auto& s = spec_;
  if (!s.path.empty()) {
    socklen_t len = 0;
    auto addr = unix_address(s, &len);
    if (!addr) return std::unexpected(addr.error());
    int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return fail("Failed to create socket: " + errstr(errno));
    if (::connect(fd, reinterpret_cast<sockaddr*>(&*addr), len) < 0) {
      int e = errno;
      ::close(fd);
      return fail("Failed to connect to '" + s.path + "': " + errstr(e));
    }
    adopt_connection(fd);
    return {};
  }
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_family = s.ipv4 && !s.ipv6 ? AF_INET : (s.ipv6 && !s.ipv4 ? AF_INET6 : AF_UNSPEC);
  addrinfo* res = nullptr;
  int rc = ::getaddrinfo(s.host.c_str(), s.port.c_str(), &hints, &res);
  if (rc != 0)
    return fail("address resolution failed for " + s.host + ":" + s.port + ": " + ::gai_strerror(rc));
  int last_errno = ECONNREFUSED;
  for (auto* ai = res; ai; ai = ai->ai_next) {
    int fd = ::socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
    if (fd < 0) {
      last_errno = errno;
      continue;
    }
    if (::connect(fd, ai->ai_addr, ai->ai_addrlen) == 0) {
      ::freeaddrinfo(res);
      adopt_connection(fd);
      return {};
    }
    last_errno = errno;
    ::close(fd);
  }
  ::freeaddrinfo(res);
  return fail("Failed to connect to '" + s.host + ":" + s.port + "': " + errstr(last_errno));
}

void chardev::adopt_connection(int fd) {
  drop_connection();
  if (spec_.nodelay) set_nodelay(fd, true);
  in_fd_ = out_fd_ = fd;
}

void chardev::drop_connection() {
  if (kind_ == kind::stdio) {
    in_fd_ = out_fd_ = -1;  // never close the process's own stdio
    return;
  }
  if (in_fd_ >= 0) ::close(in_fd_);
  in_fd_ = out_fd_ = -1;
}

std::string chardev::filename() const {
  if (kind_ == kind::socket_server || kind_ == kind::socket_client)
    return (connected() || kind_ == kind::socket_client ? "" : "disconnected:") + spec_.describe();
  return spec_.describe();
}

}  // namespace blockd

// Socket address work for socket and udp chardevs: resolving, listening, connecting, and the SocketAddress/filename forms QEMU reports; the chardev's iothread (connect_blocking on a reactor worker).
#pragma once
#include <boost/json.hpp>
#include <sys/socket.h>

#include <string>
#include <vector>

#include "config/chardev_spec.h"
#include "protocol/error.h"

namespace blockd::chr {

struct sock_addr {
  sockaddr_storage ss{};
  socklen_t len = 0;
  int family() const { return ss.ss_family; }
  const sockaddr* sa() const { return reinterpret_cast<const sockaddr*>(&ss); }
};

// getaddrinfo for an inet SocketAddress ({host, port, ipv4, ipv6}); QEMU's text on failure.
result<std::vector<sock_addr>> resolve_inet(const boost::json::object& addr, int socktype, bool passive);
// A unix SocketAddress ({path, abstract, tight}) as a sockaddr_un.
result<sock_addr> unix_address(const boost::json::object& addr);

// Listening sockets for a server chardev: one per resolved address, as QEMU's net listener
// makes them (so "localhost" listens on 127.0.0.1 and ::1). QEMU's texts.
result<std::vector<int>> listen_on(const boost::json::object& addr);
// One blocking connection attempt (run on a reactor worker); returns the socket.
result<int> connect_blocking(const boost::json::object& addr);

// The SocketAddress QEMU builds from a socket's own address (qom-get addr of a server).
boost::json::object address_of(const sock_addr& a);
sock_addr local_of(int fd);
sock_addr peer_of(int fd);

// "unix:/p", "unix:n,abstract=on,tight=on", "tcp:h:p" (with `proto` for inet), "vsock:c:p", "fd:n".
std::string address_text(const boost::json::object& addr, const std::string& proto);
// A connected socket's side as QEMU prints it: host:port (IPv6 in brackets), or the unix path.
std::string endpoint_text(const sock_addr& a);

}  // namespace blockd::chr

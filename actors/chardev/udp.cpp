// The udp backend: a datagram socket bound to the local address and connected to the remote one; each write is one datagram; the chardev's iothread.
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "actors/chardev/backends.h"
#include "actors/chardev/fd_stream.h"
#include "actors/chardev/stream_chardev.h"
#include "actors/chardev/socket_address.h"

namespace blockd::chr {
namespace {

class udp_chardev final : public stream_chardev {
 public:
  udp_chardev(chardev_spec s, env e, int fd) : stream_chardev(std::move(s), std::move(e)) {
    finish_output_on_close_ = false;  // a datagram not sent by now has nobody waiting for it
    stream_ = fd_stream::create(*env_.reactor, fd, fd, fd_stream::mode::datagram);
    stream_->set_handler(this);
    be_open_ = true;
  }
  std::string filename() const override { return "udp"; }

 protected:
  // A refused datagram (ICMP port unreachable) shows as an error; UDP has no connection to lose.
  void stream_end(int) override {}
  void stream_write_failed(int) override {}
};

}  // namespace

opened open_udp(const chardev_spec& s, const env& e) {
  if (s.addr_type() != "inet" || (!s.local_addr.empty() && s.local_addr.at("type").as_string() != "inet"))
    return fail("socket type unsupported for datagram");
  auto remote = resolve_inet(s.addr, SOCK_DGRAM, false);
  if (!remote) return std::unexpected(remote.error());
  const sock_addr& peer = remote->front();
  int fd = ::socket(peer.family(), SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return fail(std::string("Failed to create socket: ") + std::strerror(errno));
  int one = 1;
  (void)::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (!s.local_addr.empty()) {
    boost::json::object local = s.local_addr;
    // No local host: the wildcard of the remote's family.
    if (local.if_contains("host") && local.at("host").as_string().empty()) local.erase("host");
    local[peer.family() == AF_INET6 ? "ipv6" : "ipv4"] = true;
    auto here = resolve_inet(local, SOCK_DGRAM, true);
    if (!here) {
      ::close(fd);
      return std::unexpected(here.error());
    }
    if (::bind(fd, here->front().sa(), here->front().len) < 0) {
      int err = errno;
      ::close(fd);
      return fail(std::string("Failed to bind socket: ") + std::strerror(err));
    }
  }
  if (::connect(fd, peer.sa(), peer.len) < 0) {
    int err = errno;
    ::close(fd);
    return fail("Failed to connect to '" + s.addr_str("host") + ":" + s.addr_str("port") + "': " + std::strerror(err));
  }
  return std::shared_ptr<chardev>(std::make_shared<udp_chardev>(s, e, fd));
}

}  // namespace blockd::chr

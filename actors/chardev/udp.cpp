// The udp backend: a datagram socket bound to the local address and connected to the remote one; each write is one datagram; the chardev's iothread.
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "actors/chardev/backends.h"
#include "actors/chardev/fd_stream.h"
#include "actors/chardev/socket_address.h"

namespace blockd::chr {
namespace {

class udp_chardev final : public chardev, public fd_stream::handler {
 public:
  udp_chardev(chardev_spec s, env e, int fd) : chardev(std::move(s), std::move(e)) {
    stream_ = fd_stream::create(*env_.reactor, fd, fd, fd_stream::mode::datagram);
    stream_->set_handler(this);
    be_open_ = true;
  }
  std::string filename() const override { return "udp"; }
  size_t backlog() const override { return stream_ ? stream_->backlog() : 0; }

 protected:
  void backend_write(std::string_view bytes) override {
    if (stream_) stream_->write(bytes);
  }
  void resume_reading() override {
    if (stream_) stream_->read_more();
  }
  void on_close() override {
    if (stream_) stream_->shutdown(false);
    stream_.reset();
  }
  bool stream_wants_input() override { return wants_input(); }
  void stream_data(std::string_view bytes) override { deliver_input(bytes); }
  // A refused datagram (ICMP port unreachable) shows as an error; UDP has no connection to lose.
  void stream_end(int) override {}
  void stream_write_failed(int) override {}

 private:
  std::shared_ptr<fd_stream> stream_;
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

// The pty backend: a pseudo-terminal whose slave a client opens; connection found by polling for hang-up as QEMU does; the chardev's iothread.
#include <fcntl.h>
#include <poll.h>
#include <pty.h>
#include <termios.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

#include "actors/chardev/backends.h"
#include "actors/chardev/fd_stream.h"
#include "actors/chardev/stream_chardev.h"

namespace blockd::chr {
namespace {

// How often an unconnected pty looks for a client on its slave. QEMU checks once a second; a
// shorter period only makes the greeting come sooner.
constexpr uint64_t poll_period_ns = 200'000'000;

// Nobody holds the slave open: the master is hung up until a client opens it, which is how QEMU
// tells "connected" from "not connected" (it cannot be waited for, hence the timer).
bool slave_open(int master) {
  pollfd p{master, POLLIN, 0};
  if (::poll(&p, 1, 0) < 0) return false;
  return !(p.revents & POLLHUP);
}

class pty_chardev final : public stream_chardev {
 public:
  pty_chardev(chardev_spec s, env e, int master, std::string slave)
      : stream_chardev(std::move(s), std::move(e)), master_(master), slave_(std::move(slave)) {
    timer_.on_done = [this](int res) { on_timer(res); };
  }
  ~pty_chardev() override {
    if (master_ >= 0) ::close(master_);
    if (!link_.empty()) ::unlink(link_.c_str());
  }

  result<void> make_link() {
    if (spec_.pty_link.empty()) return {};
    (void)::unlink(spec_.pty_link.c_str());
    if (::symlink(slave_.c_str(), spec_.pty_link.c_str()) < 0)
      return fail("Failed to create symlink '" + spec_.pty_link + "' to '" + slave_ + "': " + std::strerror(errno));
    link_ = spec_.pty_link;
    return {};
  }

  void start() { arm_timer(); }
  std::string filename() const override { return "pty:" + slave_; }
  std::string pty_path() const override { return slave_; }

 protected:
  void backend_write(std::string_view bytes) override {
    // Without a client the output is dropped, as QEMU does; a write is also a chance to notice
    // a client that opened the slave since the last check.
    if (!stream_ && slave_open(master_)) connect();
    if (stream_) stream_->write(bytes);
  }
  void on_close() override {
    stream_chardev::on_close();
    if (timer_.busy) env_.reactor->cancel(&timer_);
  }
  void stream_end(int) override { disconnect(); }
  void stream_write_failed(int) override { disconnect(); }

 private:
  void arm_timer() {
    if (closed_ || timer_.busy) return;
    timer_.arm(shared_from_this());
    env_.reactor->timeout(poll_period_ns, &timer_);
  }
  void on_timer(int res) {
    if (closed_ || res == -ECANCELED || stream_) return;
    if (slave_open(master_))
      connect();
    else
      arm_timer();
  }
  void connect() {
    // The stream borrows the master: the pty lives as long as the chardev, across clients.
    stream_ = fd_stream::create(*env_.reactor, master_, master_, fd_stream::mode::file, false);
    stream_->set_handler(this);
    deliver_event(event::opened);
    stream_->read_more();
  }
  void disconnect() {
    // The last slave descriptor closed (reads fail with EIO): back to waiting for a client.
    if (stream_) stream_->shutdown(false);
    stream_.reset();
    deliver_event(event::closed);
    arm_timer();
  }

  int master_;
  std::string slave_;
  std::string link_;
  op timer_;
};

}  // namespace

opened open_pty(const chardev_spec& s, const env& e) {
  int master = -1, slave = -1;
  char name[256] = {};
  if (::openpty(&master, &slave, name, nullptr, nullptr) < 0)
    return fail(std::string("Failed to create PTY: ") + std::strerror(errno));
  // Raw mode on the terminal both ends share, as QEMU sets it; then the slave is closed so
  // that a client opening it is what "connected" means.
  termios t{};
  if (::tcgetattr(slave, &t) == 0) {
    ::cfmakeraw(&t);
    (void)::tcsetattr(slave, TCSAFLUSH, &t);
  }
  ::close(slave);
  (void)::fcntl(master, F_SETFD, FD_CLOEXEC);
  auto c = std::make_shared<pty_chardev>(s, e, master, name);
  if (auto r = c->make_link(); !r) return std::unexpected(r.error());
  // QEMU prints this for every pty, from the command line or chardev-add.
  std::fprintf(stderr, "char device redirected to %s (label %s)\n", name, s.id.c_str());
  c->start();
  return std::shared_ptr<chardev>(c);
}

}  // namespace blockd::chr

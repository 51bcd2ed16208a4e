// The descriptor backends (file, pipe, serial, parallel, stdio), null and ringbuf/memory, with QSD's texts; the chardev's iothread.
#include <fcntl.h>
#include <linux/ppdev.h>
#include <sys/ioctl.h>
#include <termios.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "actors/chardev/backends.h"
#include "actors/chardev/fd_stream.h"
#include "actors/chardev/stream_chardev.h"
#include "protocol/chardev/ringbuf.h"

namespace blockd::chr {
namespace {

std::string could_not_open(const std::string& path) { return "Could not open '" + path + "': " + std::strerror(errno); }

// io_uring keeps O_NONBLOCK descriptors from waiting (it returns -EAGAIN instead of polling), so
// every descriptor the reactor reads is put back to blocking mode; the reactor never blocks on it.
void make_blocking(int fd) {
  int fl = ::fcntl(fd, F_GETFL);
  if (fl >= 0 && (fl & O_NONBLOCK)) (void)::fcntl(fd, F_SETFL, fl & ~O_NONBLOCK);
}

// QEMU's "null": be_opened stays false, output vanishes.
class null_chardev final : public chardev {
 public:
  null_chardev(chardev_spec s, env e) : chardev(std::move(s), std::move(e)) {}

 protected:
  void backend_write(std::string_view) override {}
};

// A backend over one or two descriptors: open from the start, input until EOF (then CLOSED for
// the frontend, as QEMU's fd chardevs do), output kept in order.
class fd_chardev : public stream_chardev {
 public:
  fd_chardev(chardev_spec s, env e, int in, int out, bool owns) : stream_chardev(std::move(s), std::move(e)) {
    stream_ = fd_stream::create(*env_.reactor, in, out, fd_stream::mode::file, owns);
    stream_->set_handler(this);
    be_open_ = true;
  }

 protected:
  void stream_end(int) override { deliver_event(event::closed); }
  void stream_write_failed(int) override {}  // output is dropped from here on, as QEMU ignores it
};

// stdio: raw terminal input while it is a tty (signals kept with signal=on), restored on close.
class stdio_chardev final : public fd_chardev {
 public:
  stdio_chardev(chardev_spec s, env e) : fd_chardev(std::move(s), std::move(e), STDIN_FILENO, STDOUT_FILENO, false) {
    in_use = true;
    if (::isatty(STDIN_FILENO) && ::tcgetattr(STDIN_FILENO, &saved_) == 0) {
      termios t = saved_;
      t.c_iflag &= ~(IGNBRK | BRKINT | PARMRK | ISTRIP | INLCR | IGNCR | ICRNL | IXON);
      t.c_oflag |= OPOST;
      t.c_lflag &= ~(ECHO | ECHONL | ICANON | IEXTEN);
      if (!spec_.signal) t.c_lflag &= ~ISIG;
      t.c_cflag &= ~(CSIZE | PARENB);
      t.c_cflag |= CS8;
      t.c_cc[VMIN] = 1;
      t.c_cc[VTIME] = 0;
      restore_ = ::tcsetattr(STDIN_FILENO, TCSANOW, &t) == 0;
    }
  }
  ~stdio_chardev() override { restore(); }
  static inline bool in_use = false;

 protected:
  void on_close() override {
    fd_chardev::on_close();
    restore();
    in_use = false;
  }

 private:
  void restore() {
    if (restore_) ::tcsetattr(STDIN_FILENO, TCSANOW, &saved_);
    restore_ = false;
  }
  termios saved_{};
  bool restore_ = false;
};

// parallel: a claimed parport. QEMU's Linux parport backend drives the port through ioctls for an
// emulated parallel device; a QSD frontend has none, so output is dropped, as QEMU's is.
class parallel_chardev final : public chardev {
 public:
  parallel_chardev(chardev_spec s, env e, int fd) : chardev(std::move(s), std::move(e)), fd_(fd) { be_open_ = true; }
  ~parallel_chardev() override { release(); }

 protected:
  void backend_write(std::string_view) override {}
  void on_close() override { release(); }

 private:
  void release() {
    if (fd_ < 0) return;
    (void)::ioctl(fd_, PPRELEASE);
    ::close(fd_);
    fd_ = -1;
  }
  int fd_;
};

class ringbuf_chardev final : public chardev {
 public:
  ringbuf_chardev(chardev_spec s, env e) : chardev(std::move(s), std::move(e)), ring_(static_cast<uint64_t>(spec_.size)) {
    be_open_ = true;  // QEMU's ringbuf is open from the start: a monitor's greeting lands in the ring
  }
  ring_buffer ring_;

 protected:
  void backend_write(std::string_view bytes) override { ring_.write(bytes); }
};

template <class T, class... A>
std::shared_ptr<chardev> make(A&&... a) {
  return std::make_shared<T>(std::forward<A>(a)...);
}

}  // namespace

opened open_null(const chardev_spec& s, const env& e) { return make<null_chardev>(s, e); }

opened open_file(const chardev_spec& s, const env& e) {
  int flags = O_WRONLY | O_CREAT | O_CLOEXEC | (s.append ? O_APPEND : O_TRUNC);
  int out = ::open(s.out_path.c_str(), flags, 0666);
  if (out < 0) return fail(could_not_open(s.out_path));
  int in = -1;
  if (!s.in_path.empty()) {
    in = ::open(s.in_path.c_str(), O_RDONLY | O_CLOEXEC);
    if (in < 0) {
      auto err = could_not_open(s.in_path);
      ::close(out);
      return fail(err);
    }
  }
  return make<fd_chardev>(s, e, in, out, true);
}

opened open_pipe(const chardev_spec& s, const env& e) {
  // PATH.in and PATH.out when both exist, else PATH itself for both directions (opened
  // read-write, so a FIFO opens without waiting for the other end).
  std::string in_name = s.device + ".in", out_name = s.device + ".out";
  int in = ::open(in_name.c_str(), O_RDWR | O_CLOEXEC);
  int out = ::open(out_name.c_str(), O_RDWR | O_CLOEXEC);
  if (in < 0 || out < 0) {
    if (in >= 0) ::close(in);
    if (out >= 0) ::close(out);
    in = out = ::open(s.device.c_str(), O_RDWR | O_CLOEXEC);
    if (in < 0) return fail(could_not_open(s.device));
  }
  make_blocking(in);
  make_blocking(out);
  return make<fd_chardev>(s, e, in, out, true);
}

opened open_serial(const chardev_spec& s, const env& e) {
  int fd = ::open(s.device.c_str(), O_RDWR | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
  if (fd < 0) return fail(could_not_open(s.device));
  make_blocking(fd);
  termios t{};
  // QEMU's tty_serial_init(115200, 'N', 8, 1): raw input, 8N1, no flow control. A device that is
  // no tty (QEMU accepts /dev/null) simply keeps its settings.
  if (::tcgetattr(fd, &t) == 0) {
    cfsetispeed(&t, B115200);
    cfsetospeed(&t, B115200);
    t.c_iflag &= ~(IGNBRK | BRKINT | PARMRK | ISTRIP | INLCR | IGNCR | ICRNL | IXON);
    t.c_oflag |= OPOST;
    t.c_lflag &= ~(ECHO | ECHONL | ICANON | IEXTEN | ISIG);
    t.c_cflag &= ~(CSIZE | PARENB | PARODD | CRTSCTS | CSTOPB);
    t.c_cflag |= CS8 | CREAD | CLOCAL;
    t.c_cc[VMIN] = 1;
    t.c_cc[VTIME] = 0;
    (void)::tcsetattr(fd, TCSANOW, &t);
  }
  return make<fd_chardev>(s, e, fd, fd, true);
}

opened open_parallel(const chardev_spec& s, const env& e) {
  int fd = ::open(s.device.c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0) return fail(could_not_open(s.device));
  if (::ioctl(fd, PPCLAIM) < 0) {
    std::string err = std::string("not a parallel port: ") + std::strerror(errno);
    ::close(fd);
    return fail(err);
  }
  return make<parallel_chardev>(s, e, fd);
}

opened open_stdio(const chardev_spec& s, const env& e) {
  if (e.daemonized) return fail("cannot use stdio with -daemonize");
  if (stdio_chardev::in_use) return fail("cannot use stdio by multiple character devices");
  return make<stdio_chardev>(s, e);
}

opened open_ringbuf(const chardev_spec& s, const env& e) {
  if (auto r = check_ringbuf_size(s.size); !r) return std::unexpected(r.error());
  return make<ringbuf_chardev>(s, e);
}

ring_buffer* ring_of(chardev& c) {
  auto* r = dynamic_cast<ringbuf_chardev*>(&c);
  return r ? &r->ring_ : nullptr;
}

}  // namespace blockd::chr

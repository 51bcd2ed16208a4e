// The two reactor backends (io_uring and poll); each instance runs on its iothread only.
#include "storage/io/reactor.h"

#include <liburing.h>
#include <poll.h>
#include <fcntl.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <deque>
#include <utility>
#include <vector>

namespace blockd::io {
namespace {

enum class op_kind { read, write, readv, writev, fsync, fallocate, recv, send, accept, connect, timeout, cancel };

struct op {
  op_kind kind;
  int fd = -1;
  void* buf = nullptr;
  size_t len = 0;
  int64_t off = -1;
  const void* addr = nullptr;
  unsigned addrlen = 0;
  uint64_t ns = 0;
  const iovec* iov = nullptr;
  int iovcnt = 0;
  int mode = 0;  // fsync: datasync flag; fallocate: mode
  completion* c = nullptr;       // the continuation (nullptr for the reactor's own cancel requests)
  completion* target = nullptr;  // for cancel
};

// The operations both backends queue the same way: each becomes an `op` handed to push().
class op_reactor : public reactor {
 public:
  void read(int fd, void* buf, size_t len, int64_t off, completion* c) override {
    push({.kind = op_kind::read, .fd = fd, .buf = buf, .len = len, .off = off, .c = c});
  }
  void write(int fd, const void* buf, size_t len, int64_t off, completion* c) override {
    push({.kind = op_kind::write, .fd = fd, .buf = const_cast<void*>(buf), .len = len, .off = off, .c = c});
  }
  void readv(int fd, const iovec* iov, int iovcnt, int64_t off, completion* c) override {
    push({.kind = op_kind::readv, .fd = fd, .off = off, .iov = iov, .iovcnt = iovcnt, .c = c});
  }
  void writev(int fd, const iovec* iov, int iovcnt, int64_t off, completion* c) override {
    push({.kind = op_kind::writev, .fd = fd, .off = off, .iov = iov, .iovcnt = iovcnt, .c = c});
  }
  void fsync(int fd, bool datasync, completion* c) override {
    push({.kind = op_kind::fsync, .fd = fd, .mode = datasync ? 1 : 0, .c = c});
  }
  void fallocate(int fd, int mode, int64_t off, int64_t len, completion* c) override {
    push({.kind = op_kind::fallocate, .fd = fd, .len = static_cast<size_t>(len), .off = off, .mode = mode, .c = c});
  }
  void recv(int fd, void* buf, size_t len, completion* c) override {
    push({.kind = op_kind::recv, .fd = fd, .buf = buf, .len = len, .c = c});
  }
  void send(int fd, const void* buf, size_t len, completion* c) override {
    push({.kind = op_kind::send, .fd = fd, .buf = const_cast<void*>(buf), .len = len, .c = c});
  }
  void accept(int fd, completion* c) override { push({.kind = op_kind::accept, .fd = fd, .c = c}); }

 protected:
  virtual void push(op o) = 0;
};

// ---------------------------------------------------------------------------------------------
// io_uring backend. Completions carry the completion pointer as user_data; cancel requests carry
// user_data 0 and are dropped when they complete.
class uring_reactor final : public op_reactor {
 public:
  explicit uring_reactor(io_uring ring) : ring_(ring), kernel_limit_(ring.cq.ring_entries) {}
  ~uring_reactor() override { io_uring_queue_exit(&ring_); }

  const char* kind() const override { return "io_uring"; }

  void connect(int fd, const void* addr, unsigned addrlen, completion* c) override {
    queue({.kind = op_kind::connect, .fd = fd, .addr = addr, .addrlen = addrlen, .c = c});
  }
  void timeout(uint64_t ns, completion* c) override { queue({.kind = op_kind::timeout, .ns = ns, .c = c}); }

  void cancel(completion* c) override {
    // Not yet handed to the kernel: complete it ourselves on the next turn.
    auto it = std::find_if(overflow_.begin(), overflow_.end(), [c](const op& o) { return o.c == c; });
    if (it != overflow_.end()) {
      overflow_.erase(it);
      cancelled_.push_back(c);
      return;
    }
    queue({.kind = op_kind::cancel, .target = c});
  }

  size_t in_flight() const override { return in_flight_; }

  unsigned run_once(bool block) override {
    unsigned done = 0;
    // Operations cancelled before submission complete here, never inside cancel().
    while (!cancelled_.empty()) {
      auto* c = cancelled_.front();
      cancelled_.pop_front();
      --in_flight_;
      c->complete(-ECANCELED);
      ++done;
      block = false;
    }
    drain_overflow();
    int rc = block ? io_uring_submit_and_wait(&ring_, 1) : io_uring_submit(&ring_);
    (void)rc;  // -EINTR / -EBUSY: reap what is there and come back next turn
    io_uring_cqe* cqe = nullptr;
    while (io_uring_peek_cqe(&ring_, &cqe) == 0) {
      auto* c = reinterpret_cast<completion*>(static_cast<uintptr_t>(cqe->user_data));
      int res = cqe->res;
      io_uring_cqe_seen(&ring_, cqe);
      --in_kernel_;
      if (c == nullptr) continue;  // our own cancel request
      if (timers_.find_and_erase(c) && res == -ETIME) res = 0;
      --in_flight_;
      c->complete(res);
      ++done;
    }
    return done;
  }

 private:
  // Timeouts need their timespec alive until the kernel completes them.
  struct timer_table {
    std::vector<std::pair<completion*, __kernel_timespec*>> items;
    __kernel_timespec* add(completion* c, uint64_t ns) {
      auto* ts = new __kernel_timespec{static_cast<long long>(ns / 1000000000u), static_cast<long long>(ns % 1000000000u)};
      items.emplace_back(c, ts);
      return ts;
    }
    bool find_and_erase(completion* c) {
      for (auto it = items.begin(); it != items.end(); ++it)
        if (it->first == c) {
          delete it->second;
          items.erase(it);
          return true;
        }
      return false;
    }
    ~timer_table() {
      for (auto& [c, ts] : items) delete ts;
    }
  };

  void push(op o) override { queue(o); }
  void queue(op o) {
    if (o.c) ++in_flight_;
    if (!overflow_.empty() || !prep(o)) overflow_.push_back(o);
  }

  void drain_overflow() {
    while (!overflow_.empty()) {
      if (!prep(overflow_.front())) {
        if (in_kernel_ >= kernel_limit_) return;  // the completion queue is full: wait for reaping
        io_uring_submit(&ring_);                   // make room in the submission queue, try again
        if (!prep(overflow_.front())) return;
      }
      overflow_.pop_front();
    }
  }

  bool prep(const op& o) {
    // Never hand the kernel more operations than the completion queue can hold, so no completion
    // can overflow; the rest waits in overflow_.
    if (in_kernel_ >= kernel_limit_) return false;
    io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
    if (!sqe) return false;
    ++in_kernel_;
    switch (o.kind) {
      case op_kind::read:
        io_uring_prep_read(sqe, o.fd, o.buf, static_cast<unsigned>(o.len), o.off < 0 ? static_cast<__u64>(-1) : o.off);
        break;
      case op_kind::write:
        io_uring_prep_write(sqe, o.fd, o.buf, static_cast<unsigned>(o.len), o.off < 0 ? static_cast<__u64>(-1) : o.off);
        break;
      case op_kind::readv: io_uring_prep_readv(sqe, o.fd, o.iov, static_cast<unsigned>(o.iovcnt), o.off); break;
      case op_kind::writev: io_uring_prep_writev(sqe, o.fd, o.iov, static_cast<unsigned>(o.iovcnt), o.off); break;
      case op_kind::fsync: io_uring_prep_fsync(sqe, o.fd, o.mode ? IORING_FSYNC_DATASYNC : 0); break;
      case op_kind::fallocate: io_uring_prep_fallocate(sqe, o.fd, o.mode, o.off, static_cast<off_t>(o.len)); break;
      case op_kind::recv: io_uring_prep_recv(sqe, o.fd, o.buf, o.len, 0); break;
      case op_kind::send: io_uring_prep_send(sqe, o.fd, o.buf, o.len, MSG_NOSIGNAL); break;
      case op_kind::accept: io_uring_prep_accept(sqe, o.fd, nullptr, nullptr, SOCK_CLOEXEC); break;
      case op_kind::connect:
        io_uring_prep_connect(sqe, o.fd, static_cast<const sockaddr*>(o.addr), o.addrlen);
        break;
      case op_kind::timeout: io_uring_prep_timeout(sqe, timers_.add(o.c, o.ns), 0, 0); break;
      case op_kind::cancel: io_uring_prep_cancel(sqe, o.target, 0); break;
    }
    io_uring_sqe_set_data(sqe, o.c);
    return true;
  }

  io_uring ring_;
  std::deque<op> overflow_;
  std::deque<completion*> cancelled_;
  timer_table timers_;
  size_t in_flight_ = 0;
  unsigned in_kernel_ = 0;     // prepared or submitted and not yet reaped
  unsigned kernel_limit_;
};

// ---------------------------------------------------------------------------------------------
// poll(2) backend for hosts that forbid io_uring. Socket and pipe operations wait for readiness and
// then run the system call without blocking; positioned file I/O runs at the next turn.
class poll_reactor final : public op_reactor {
 public:
  const char* kind() const override { return "poll"; }

  void connect(int fd, const void* addr, unsigned addrlen, completion* c) override {
    // Local (unix/loopback) connects finish at once; the result is still delivered asynchronously.
    int rc = ::connect(fd, static_cast<const sockaddr*>(addr), addrlen);
    ready_.emplace_back(c, rc < 0 ? -errno : 0);
  }
  void timeout(uint64_t ns, completion* c) override {
    push({.kind = op_kind::timeout, .ns = now_ns() + ns, .c = c});
  }
  void cancel(completion* c) override {
    auto it = std::find_if(pending_.begin(), pending_.end(), [c](const op& o) { return o.c == c; });
    if (it == pending_.end()) return;  // already completed or about to
    pending_.erase(it);
    ready_.emplace_back(c, -ECANCELED);
  }
  size_t in_flight() const override { return pending_.size() + ready_.size(); }

  unsigned run_once(bool block) override {
    // Positioned I/O and file control do not wait for readiness: they run here, synchronously on
    // this loop (the fallback is correct but serializes the iothread's file I/O).
    for (auto it = pending_.begin(); it != pending_.end();) {
      if (int res; file_op(*it, res)) {
        ready_.emplace_back(it->c, res);
        it = pending_.erase(it);
      } else {
        ++it;
      }
    }
    int wait_ms = -1;
    uint64_t now = now_ns();
    for (auto& o : pending_)
      if (o.kind == op_kind::timeout) {
        int64_t left = static_cast<int64_t>(o.ns) - static_cast<int64_t>(now);
        int ms = left <= 0 ? 0 : static_cast<int>((left + 999999) / 1000000);
        wait_ms = wait_ms < 0 ? ms : std::min(wait_ms, ms);
      }
    if (!block || !ready_.empty()) wait_ms = 0;

    std::vector<pollfd> fds;
    std::vector<size_t> which;
    for (size_t i = 0; i < pending_.size(); ++i) {
      auto& o = pending_[i];
      if (o.kind == op_kind::timeout) continue;
      short ev = (o.kind == op_kind::write || o.kind == op_kind::send) ? POLLOUT : POLLIN;
      fds.push_back({o.fd, ev, 0});
      which.push_back(i);
    }
    if (!fds.empty() || wait_ms != 0) {
      int n = ::poll(fds.data(), fds.size(), wait_ms);
      if (n < 0) n = 0;
    }
    std::vector<size_t> finished;
    for (size_t k = 0; k < fds.size(); ++k) {
      if (!fds[k].revents) continue;
      auto& o = pending_[which[k]];
      int res = attempt(o);
      if (res == -EAGAIN) continue;
      ready_.emplace_back(o.c, res);
      finished.push_back(which[k]);
    }
    now = now_ns();
    for (size_t i = 0; i < pending_.size(); ++i)
      if (pending_[i].kind == op_kind::timeout && pending_[i].ns <= now) {
        ready_.emplace_back(pending_[i].c, 0);
        finished.push_back(i);
      }
    std::sort(finished.rbegin(), finished.rend());
    for (size_t i : finished) pending_.erase(pending_.begin() + static_cast<long>(i));

    unsigned done = 0;
    auto batch = std::move(ready_);
    ready_.clear();
    for (auto& [c, res] : batch) {
      c->complete(res);
      ++done;
    }
    return done;
  }

 private:
  static uint64_t now_ns() {
    return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                     std::chrono::steady_clock::now().time_since_epoch())
                                     .count());
  }
  void push(op o) override { pending_.push_back(o); }

  static bool file_op(const op& o, int& res) {
    ssize_t n;
    switch (o.kind) {
      case op_kind::read: if (o.off < 0) return false; n = ::pread(o.fd, o.buf, o.len, o.off); break;
      case op_kind::write: if (o.off < 0) return false; n = ::pwrite(o.fd, o.buf, o.len, o.off); break;
      case op_kind::readv: n = ::preadv(o.fd, o.iov, o.iovcnt, o.off); break;
      case op_kind::writev: n = ::pwritev(o.fd, o.iov, o.iovcnt, o.off); break;
      case op_kind::fsync: n = o.mode ? ::fdatasync(o.fd) : ::fsync(o.fd); break;
      case op_kind::fallocate: n = ::fallocate(o.fd, o.mode, o.off, static_cast<off_t>(o.len)); break;
      default: return false;
    }
    res = n < 0 ? -errno : static_cast<int>(n);
    return true;
  }

  static int attempt(op& o) {
    ssize_t n = 0;
    switch (o.kind) {
      case op_kind::read: n = ::read(o.fd, o.buf, o.len); break;
      case op_kind::write: n = ::write(o.fd, o.buf, o.len); break;
      case op_kind::recv: n = ::recv(o.fd, o.buf, o.len, MSG_DONTWAIT); break;
      case op_kind::send: n = ::send(o.fd, o.buf, o.len, MSG_DONTWAIT | MSG_NOSIGNAL); break;
      case op_kind::accept: n = ::accept4(o.fd, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK); break;
      default: return -EINVAL;
    }
    if (n < 0) return errno == EWOULDBLOCK ? -EAGAIN : -errno;
    return static_cast<int>(n);
  }

  std::vector<op> pending_;
  std::vector<std::pair<completion*, int>> ready_;
};

}  // namespace

std::unique_ptr<reactor> reactor::create(unsigned entries, std::string* note) {
  io_uring ring;
  int rc = io_uring_queue_init(entries, &ring, 0);
  if (rc == 0) return std::make_unique<uring_reactor>(ring);
  if (note) *note = std::string("io_uring unavailable (") + std::strerror(-rc) + "), using poll";
  return create_poll();
}

std::unique_ptr<reactor> reactor::create_poll() { return std::make_unique<poll_reactor>(); }

}  // namespace blockd::io

// The two reactor backends (io_uring and poll): iothread only, except the poll backend's file-I/O workers.
#include "storage/io/reactor.h"

#include <fcntl.h>
#include <liburing.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <mutex>
#include <system_error>
#include <thread>
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
// then run the system call without blocking. Positioned file I/O, fsync and fallocate cannot be
// waited for with poll (a regular file always polls ready and the call blocks inside the kernel), so
// they go to a few worker threads owned by this reactor; the loop thread only collects the results.
//
// Why one pool per reactor rather than one for the process: a result has exactly one loop to return
// to, a slow fsync on one iothread cannot delay another iothread's I/O, and the destructor knows
// every thread that may still touch its queues. Four threads keep an iothread's queue depth busy on
// a disk without flooding the host with threads; they start on the first file operation, so loops
// that only serve sockets (the monitor) never own any.
class poll_reactor final : public op_reactor {
 public:
  ~poll_reactor() override {
    {
      std::lock_guard<std::mutex> g(pool_mx_);
      pool_stop_ = true;
    }
    pool_cv_.notify_all();
    // A worker in the middle of a system call finishes it (the buffers are still alive: whoever
    // destroys a reactor with I/O in flight keeps them until it returns); queued jobs never start.
    // Their completions are dropped, as the io_uring backend drops what it still has in the kernel.
    for (auto& t : workers_) t.join();
    if (pool_wake_fd_ >= 0) ::close(pool_wake_fd_);
  }

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
    if (it != pending_.end()) {
      pending_.erase(it);
      ready_.emplace_back(c, -ECANCELED);
      return;
    }
    // A file operation not yet picked up by a worker is withdrawn; one that a worker is running (or
    // has finished) completes with its real result. Either way it completes once.
    auto st = std::find_if(staged_.begin(), staged_.end(), [c](const pool_job* j) { return j->o.c == c; });
    if (st != staged_.end()) {
      put_job(*st);
      staged_.erase(st);
      ready_.emplace_back(c, -ECANCELED);
      return;
    }
    if (pool_outstanding_ == 0) return;
    pool_job* withdrawn = nullptr;
    {
      std::lock_guard<std::mutex> g(pool_mx_);
      auto q = std::find_if(pool_queue_.begin(), pool_queue_.end(), [c](const pool_job* j) { return j->o.c == c; });
      if (q != pool_queue_.end()) {
        withdrawn = *q;
        pool_queue_.erase(q);
      }
    }
    if (withdrawn) {
      --pool_outstanding_;
      put_job(withdrawn);
      ready_.emplace_back(c, -ECANCELED);
    }
  }
  size_t in_flight() const override { return pending_.size() + ready_.size() + staged_.size() + pool_outstanding_; }

  unsigned run_once(bool block) override {
    hand_to_workers();
    // Without workers (the pool could not start) file operations run here, synchronously: correct,
    // but the iothread waits for each one.
    for (auto it = pending_.begin(); it != pending_.end();) {
      if (!is_file_op(*it)) {
        ++it;
        continue;
      }
      ready_.emplace_back(it->c, run_file_op(*it));
      it = pending_.erase(it);
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
    size_t socket_fds = fds.size();
    // Workers finishing a job make this eventfd readable, which ends the wait below.
    if (pool_outstanding_ > 0) fds.push_back({pool_wake_fd_, POLLIN, 0});
    if (!fds.empty() || wait_ms != 0) {
      int n = ::poll(fds.data(), fds.size(), wait_ms);
      if (n < 0) n = 0;
    }
    std::vector<size_t> finished;
    for (size_t k = 0; k < socket_fds; ++k) {
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
    collect_from_workers();

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
  struct pool_job {
    op o;
    int res = 0;
  };

  static uint64_t now_ns() {
    return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                     std::chrono::steady_clock::now().time_since_epoch())
                                     .count());
  }

  static bool is_file_op(const op& o) {
    switch (o.kind) {
      case op_kind::read:
      case op_kind::write: return o.off >= 0;  // at the current position: a pipe or tty, polled
      case op_kind::readv:
      case op_kind::writev:
      case op_kind::fsync:
      case op_kind::fallocate: return true;
      default: return false;
    }
  }

  void push(op o) override {
    if (is_file_op(o) && start_pool()) {
      pool_job* j = get_job();
      j->o = o;
      staged_.push_back(j);  // handed over at the next turn, one lock for the whole batch
      return;
    }
    pending_.push_back(o);
  }

  // Starts the workers once; false when the host refuses threads or an eventfd (the caller then
  // runs the operation on the loop, as before the pool existed, rather than failing it).
  bool start_pool() {
    if (!workers_.empty()) return true;
    if (pool_failed_) return false;
    pool_wake_fd_ = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (pool_wake_fd_ < 0) {
      pool_failed_ = true;
      return false;
    }
    // Workers take no signals: the daemon's handlers and signalfd expect them on its own threads, and
    // a blocking system call interrupted here would only come back as EINTR to retry.
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    try {
      for (unsigned i = 0; i < pool_threads; ++i) {
        workers_.emplace_back([this] { worker(); });
        pthread_setname_np(workers_.back().native_handle(), "blockd-fileio");
      }
    } catch (const std::system_error&) {
      // Fewer threads than asked for still work; none at all means the synchronous fallback.
      if (workers_.empty()) pool_failed_ = true;
    }
    pthread_sigmask(SIG_SETMASK, &old, nullptr);
    return !workers_.empty();
  }

  void hand_to_workers() {
    if (staged_.empty()) return;
    {
      std::lock_guard<std::mutex> g(pool_mx_);
      for (auto* j : staged_) pool_queue_.push_back(j);
    }
    pool_outstanding_ += staged_.size();
    if (staged_.size() == 1)
      pool_cv_.notify_one();
    else
      pool_cv_.notify_all();
    staged_.clear();
  }

  void collect_from_workers() {
    if (pool_outstanding_ == 0) return;
    // Reset the eventfd before taking the list: a job finished after the swap signals again.
    uint64_t count;
    (void)!::read(pool_wake_fd_, &count, sizeof count);
    std::vector<pool_job*> done;
    {
      std::lock_guard<std::mutex> g(pool_mx_);
      done.swap(pool_done_);
    }
    for (auto* j : done) {
      ready_.emplace_back(j->o.c, j->res);
      put_job(j);
    }
    pool_outstanding_ -= done.size();
  }

  void worker() {
    std::unique_lock<std::mutex> lk(pool_mx_);
    for (;;) {
      pool_cv_.wait(lk, [this] { return pool_stop_ || !pool_queue_.empty(); });
      if (pool_stop_) return;
      pool_job* j = pool_queue_.front();
      pool_queue_.pop_front();
      lk.unlock();
      j->res = run_file_op(j->o);
      lk.lock();
      bool first = pool_done_.empty();
      pool_done_.push_back(j);
      if (first) {
        uint64_t one = 1;
        (void)!::write(pool_wake_fd_, &one, sizeof one);
      }
    }
  }

  pool_job* get_job() {
    if (job_free_.empty()) {
      job_store_.push_back(std::make_unique<pool_job>());
      return job_store_.back().get();
    }
    pool_job* j = job_free_.back();
    job_free_.pop_back();
    return j;
  }
  void put_job(pool_job* j) { job_free_.push_back(j); }

  // The blocking system call of a file operation; any thread.
  static int run_file_op(const op& o) {
    ssize_t n;
    do {
      switch (o.kind) {
        case op_kind::read: n = ::pread(o.fd, o.buf, o.len, o.off); break;
        case op_kind::write: n = ::pwrite(o.fd, o.buf, o.len, o.off); break;
        case op_kind::readv: n = ::preadv(o.fd, o.iov, o.iovcnt, o.off); break;
        case op_kind::writev: n = ::pwritev(o.fd, o.iov, o.iovcnt, o.off); break;
        case op_kind::fsync: n = o.mode ? ::fdatasync(o.fd) : ::fsync(o.fd); break;
        case op_kind::fallocate: n = ::fallocate(o.fd, o.mode, o.off, static_cast<off_t>(o.len)); break;
        default: return -EINVAL;
      }
    } while (n < 0 && errno == EINTR);
    return n < 0 ? -errno : static_cast<int>(n);
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

  static constexpr unsigned pool_threads = 4;

  std::vector<op> pending_;                         // socket/pipe operations and timers
  std::vector<std::pair<completion*, int>> ready_;  // results to deliver at the end of this turn

  // File operations: staged_ (loop thread) -> pool_queue_ -> a worker -> pool_done_ -> ready_.
  std::vector<pool_job*> staged_;
  size_t pool_outstanding_ = 0;  // handed to the workers and not yet collected; loop thread only
  std::vector<std::unique_ptr<pool_job>> job_store_;
  std::vector<pool_job*> job_free_;
  std::mutex pool_mx_;  // guards pool_queue_, pool_done_, pool_stop_
  std::condition_variable pool_cv_;
  std::deque<pool_job*> pool_queue_;
  std::vector<pool_job*> pool_done_;
  bool pool_stop_ = false;
  bool pool_failed_ = false;
  int pool_wake_fd_ = -1;
  std::vector<std::thread> workers_;
};

}  // namespace

std::unique_ptr<reactor> reactor::create(unsigned entries, std::string* note) {
  io_uring ring;
  // COOP_TASKRUN: a completion produced off this thread (io-wq workers, device interrupts) waits for
  // the loop's next kernel entry instead of kicking it with an IPI; TASKRUN_FLAG makes liburing's
  // peek enter the kernel when such completions are pending. A sleeping loop is still woken.
  // (DEFER_TASKRUN would need the ring created on the loop thread; iothread creates it on its parent.)
  io_uring_params p{};
  p.flags = IORING_SETUP_COOP_TASKRUN | IORING_SETUP_TASKRUN_FLAG;
  int rc = io_uring_queue_init_params(entries, &ring, &p);
  if (rc == -EINVAL) {  // kernels before 5.19 do not know these flags
    p = io_uring_params{};
    rc = io_uring_queue_init_params(entries, &ring, &p);
  }
  if (rc == 0) return std::make_unique<uring_reactor>(ring);
  if (note) *note = std::string("io_uring unavailable (") + std::strerror(-rc) + "), using poll";
  return create_poll();
}

std::unique_ptr<reactor> reactor::create_poll() { return std::make_unique<poll_reactor>(); }

}  // namespace blockd::io

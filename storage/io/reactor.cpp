// The two reactor backends (io_uring and poll): iothread only, except the poll backend's file-I/O workers.
#include "storage/io/reactor.h"

#include <fcntl.h>
#include <liburing.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <functional>
#include <list>
#include <mutex>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

namespace blockd::io {
namespace {

enum class op_kind { read, write, readv, writev, fsync, fallocate, recv, send, sendmsg, accept, connect, timeout, cancel, call };

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
  std::function<int()> fn = nullptr;  // for call: the blocking work to run on a worker thread
};

// The blocking system call of a file operation (or an offloaded call); any thread.
int run_blocking(const op& o) {
  ssize_t n;
  do {
    switch (o.kind) {
      case op_kind::read: n = ::pread(o.fd, o.buf, o.len, o.off); break;
      case op_kind::write: n = ::pwrite(o.fd, o.buf, o.len, o.off); break;
      case op_kind::readv: n = ::preadv(o.fd, o.iov, o.iovcnt, o.off); break;
      case op_kind::writev: n = ::pwritev(o.fd, o.iov, o.iovcnt, o.off); break;
      case op_kind::fsync: n = o.mode ? ::fdatasync(o.fd) : ::fsync(o.fd); break;
      case op_kind::fallocate: n = ::fallocate(o.fd, o.mode, o.off, static_cast<off_t>(o.len)); break;
      case op_kind::call: return o.fn();
      default: return -EINVAL;
    }
  } while (n < 0 && errno == EINTR);
  return n < 0 ? -errno : static_cast<int>(n);
}

// Threads that run blocking operations for one reactor; the loop thread hands jobs over and
// collects the results, which it then completes itself (workers never call a completion).
//
// Why one pool per reactor rather than one for the process: a result has exactly one loop to return
// to, a slow fsync on one iothread cannot delay another iothread's I/O, and the destructor knows
// every thread that may still touch its queues.
//
// Size: between pool_limits.min and .max (the iothread's thread-pool-min/-max, QEMU's defaults 0
// and 64). A thread starts when a job is handed over and no thread is idle to take it, up to max;
// one above min that waited idle_timeout for work exits, as QEMU's pool does. With min 0 nothing
// starts before first use, so loops that only serve sockets (the monitor) own no thread.
class worker_pool {
 public:
  ~worker_pool() {
    {
      std::lock_guard<std::mutex> g(mx_);
      stop_ = true;
    }
    cv_.notify_all();
    // A worker in the middle of a system call finishes it (the buffers are still alive: whoever
    // destroys a reactor with I/O in flight keeps them until it returns); queued jobs never start.
    // Their completions are dropped, as the io_uring backend drops what it still has in the kernel.
    for (auto& w : workers_) w.thread.join();
    if (wake_fd_ >= 0) ::close(wake_fd_);
  }

  // Loop thread: makes the pool usable (its eventfd); false when it cannot run anything on threads
  // (no eventfd, or no thread could ever be started): the caller then runs the operation itself.
  bool start() {
    if (wake_fd_ >= 0 || failed_) return !failed_;
    wake_fd_ = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (wake_fd_ < 0) failed_ = true;
    return !failed_;
  }

  // Loop thread. Raising min starts the missing threads now ("min threads exist"); a lower max
  // makes threads above it exit after their current job; idle threads re-arm their timeout.
  void set_limits(const pool_limits& l) {
    reap();
    {
      std::lock_guard<std::mutex> g(mx_);
      limits_ = l;
      limits_.max = std::max(limits_.max, 1u);
      limits_.min = std::min(limits_.min, limits_.max);
      if ((limits_.min > live_ || !queue_.empty()) && start()) {
        while (live_ < limits_.min && spawn_locked()) {
        }
        // A higher max serves jobs that were waiting for a thread now, not at the next hand-over.
        size_t untaken = queue_.size() > idle_ ? queue_.size() - idle_ : 0;
        while (untaken > 0 && live_ < limits_.max && spawn_locked()) --untaken;
      }
    }
    cv_.notify_all();
  }

  // Loop thread: every live worker moves to `cpus` now (under the lock, so no worker can exit and
  // have its tid reused meanwhile); workers started later apply it themselves.
  int set_affinity(const cpu_set_t* cpus) {
    std::lock_guard<std::mutex> g(mx_);
    has_affinity_ = cpus != nullptr;
    if (cpus) affinity_ = *cpus;
    if (!cpus) return 0;  // running workers keep their set; new ones inherit the loop thread's
    int rc = 0;
    for (auto& w : workers_)
      if (!w.exited && w.tid != 0 && ::sched_setaffinity(w.tid, sizeof affinity_, &affinity_) != 0 && rc == 0)
        rc = -errno;
    return rc;
  }

  void fill(reactor_stats& s) const {
    std::lock_guard<std::mutex> g(mx_);
    s.pool_threads = live_;
    s.pool_threads_peak = peak_;
    s.pool_tids.clear();
    for (auto& w : workers_)
      if (!w.exited && w.tid != 0) s.pool_tids.push_back(w.tid);
  }

  // Readable while results wait to be collected.
  int wake_fd() const { return wake_fd_; }
  // Handed over and not yet collected, plus staged; loop thread only.
  size_t outstanding() const { return outstanding_ + staged_.size(); }
  // A finished job waits to be collected; any thread, no lock (the busy-poll check).
  bool has_done() const { return has_done_.load(std::memory_order_acquire); }

  // Loop thread: queue an operation; it goes to the workers at the next hand_over().
  void stage(op o) {
    job* j = get_job();
    j->o = std::move(o);
    staged_.push_back(j);
  }

  void hand_over() {
    if (unjoined_.load(std::memory_order_relaxed) != 0) reap();
    if (staged_.empty()) return;
    bool no_threads;
    size_t n = staged_.size();
    {
      std::lock_guard<std::mutex> g(mx_);
      for (auto* j : staged_) queue_.push_back(j);
      // Jobs no idle thread will take get a new thread each, up to max; the rest wait for a busy
      // thread to finish.
      size_t untaken = queue_.size() > idle_ ? queue_.size() - idle_ : 0;
      while (untaken > 0 && live_ < limits_.max && spawn_locked()) --untaken;
      no_threads = live_ == 0;
    }
    outstanding_ += n;
    staged_.clear();
    if (no_threads) {
      // Not a single thread could be started: correct but synchronous from now on.
      failed_ = true;
      run_queue_here();
      return;
    }
    if (n == 1)
      cv_.notify_one();
    else
      cv_.notify_all();
  }

  // Takes back an operation no worker has started; false if one is running it (or has finished).
  bool withdraw(completion* c) {
    auto st = std::find_if(staged_.begin(), staged_.end(), [c](const job* j) { return j->o.c == c; });
    if (st != staged_.end()) {
      put_job(*st);
      staged_.erase(st);
      return true;
    }
    if (outstanding_ == 0) return false;
    job* withdrawn = nullptr;
    {
      std::lock_guard<std::mutex> g(mx_);
      auto q = std::find_if(queue_.begin(), queue_.end(), [c](const job* j) { return j->o.c == c; });
      if (q != queue_.end()) {
        withdrawn = *q;
        queue_.erase(q);
      }
    }
    if (!withdrawn) return false;
    --outstanding_;
    put_job(withdrawn);
    return true;
  }

  // Loop thread: moves finished results to `ready`.
  void collect(std::vector<std::pair<completion*, int>>& ready) {
    if (outstanding_ == 0) return;
    // Reset the eventfd before taking the list: a job finished after the swap signals again.
    uint64_t count;
    (void)!::read(wake_fd_, &count, sizeof count);
    std::vector<job*> done;
    {
      std::lock_guard<std::mutex> g(mx_);
      done.swap(done_);
      has_done_.store(false, std::memory_order_relaxed);
    }
    for (auto* j : done) {
      ready.emplace_back(j->o.c, j->res);
      put_job(j);
    }
    outstanding_ -= done.size();
  }

 private:
  struct job {
    op o{};
    int res = 0;
  };
  // One thread. Elements of a std::list keep their address, so a worker holds a pointer to its own;
  // the loop thread adds and (after joining) erases them. tid and exited are guarded by mx_.
  struct worker {
    std::thread thread;
    int tid = 0;
    bool exited = false;
  };

  // mx_ held. Workers take no signals: the daemon's handlers and signalfd expect them on its own
  // threads, and a blocking system call interrupted here would only come back as EINTR to retry.
  bool spawn_locked() {
    workers_.emplace_back();
    worker* w = &workers_.back();
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    bool ok = true;
    try {
      w->thread = std::thread([this, w] { work(w); });
    } catch (const std::system_error&) {
      ok = false;  // fewer threads than asked for still work
    }
    pthread_sigmask(SIG_SETMASK, &old, nullptr);
    if (!ok) {
      workers_.pop_back();
      return false;
    }
    pthread_setname_np(w->thread.native_handle(), "blockd-fileio");
    ++live_;
    peak_ = std::max(peak_, live_);
    return true;
  }

  void work(worker* w) {
    std::unique_lock<std::mutex> lk(mx_);
    w->tid = static_cast<int>(::syscall(SYS_gettid));
    if (has_affinity_) ::sched_setaffinity(0, sizeof affinity_, &affinity_);
    for (;;) {
      bool leave = false;
      while (!stop_ && queue_.empty() && !leave) {
        if (live_ > limits_.max) {
          leave = true;
          break;
        }
        ++idle_;
        bool timed_out = false;
        if (live_ > limits_.min)
          timed_out = cv_.wait_for(lk, std::chrono::nanoseconds(limits_.idle_timeout_ns)) == std::cv_status::timeout;
        else
          cv_.wait(lk);
        --idle_;
        leave = timed_out && queue_.empty() && live_ > limits_.min;
      }
      if (stop_) return;  // the destructor joins every thread, exited or not
      if (leave || live_ > limits_.max) {
        // Above the bounds (idle too long, or max lowered): go; the loop thread joins it later.
        --live_;
        w->exited = true;
        w->tid = 0;
        unjoined_.fetch_add(1, std::memory_order_relaxed);
        return;
      }
      job* j = queue_.front();
      queue_.pop_front();
      lk.unlock();
      j->res = run_blocking(j->o);
      lk.lock();
      finish_locked(j);
    }
  }

  // mx_ held: a result for the loop; the first one of a batch signals its eventfd.
  void finish_locked(job* j) {
    bool first = done_.empty();
    done_.push_back(j);
    has_done_.store(true, std::memory_order_release);
    if (first) {
      uint64_t one = 1;
      (void)!::write(wake_fd_, &one, sizeof one);
    }
  }

  // Loop thread, when no worker exists: runs what was queued here, results as if from a worker.
  void run_queue_here() {
    std::deque<job*> q;
    {
      std::lock_guard<std::mutex> g(mx_);
      q.swap(queue_);
    }
    for (auto* j : q) j->res = run_blocking(j->o);
    std::lock_guard<std::mutex> g(mx_);
    for (auto* j : q) finish_locked(j);
  }

  // Loop thread: joins threads that left (outside the lock: they release it on the way out).
  void reap() {
    std::vector<std::list<worker>::iterator> gone;
    {
      std::lock_guard<std::mutex> g(mx_);
      for (auto it = workers_.begin(); it != workers_.end(); ++it)
        if (it->exited) gone.push_back(it);
    }
    for (auto it : gone) {
      it->thread.join();
      workers_.erase(it);
    }
    unjoined_.fetch_sub(gone.size(), std::memory_order_relaxed);
  }

  job* get_job() {
    if (free_.empty()) {
      store_.push_back(std::make_unique<job>());
      return store_.back().get();
    }
    job* j = free_.back();
    free_.pop_back();
    return j;
  }
  void put_job(job* j) {
    j->o.fn = nullptr;
    free_.push_back(j);
  }

  // staged_ (loop thread) -> queue_ -> a worker -> done_ -> the loop's ready list.
  std::vector<job*> staged_;
  size_t outstanding_ = 0;  // handed to the workers and not yet collected; loop thread only
  std::vector<std::unique_ptr<job>> store_;
  std::vector<job*> free_;
  mutable std::mutex mx_;  // guards queue_, done_, stop_, limits_, the counts, affinity, worker tid/exited
  std::condition_variable cv_;
  std::deque<job*> queue_;
  std::vector<job*> done_;
  std::atomic<bool> has_done_{false};
  std::atomic<size_t> unjoined_{0};  // workers that exited and wait for reap()
  pool_limits limits_;
  unsigned live_ = 0, idle_ = 0, peak_ = 0;
  bool has_affinity_ = false;
  cpu_set_t affinity_{};
  bool stop_ = false;
  bool failed_ = false;  // loop thread only
  int wake_fd_ = -1;
  std::list<worker> workers_;
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
  void readv(int fd, const iovec* iov, int iovcnt, int64_t off, completion* c, bool run_here) override {
    op o{.kind = op_kind::readv, .fd = fd, .off = off, .iov = iov, .iovcnt = iovcnt, .c = c};
    if (run_here) return complete_soon(c, run_blocking(o));
    push(std::move(o));
  }
  void writev(int fd, const iovec* iov, int iovcnt, int64_t off, completion* c, bool run_here) override {
    op o{.kind = op_kind::writev, .fd = fd, .off = off, .iov = iov, .iovcnt = iovcnt, .c = c};
    if (run_here) return complete_soon(c, run_blocking(o));
    push(std::move(o));
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
  void sendmsg(int fd, const msghdr* msg, completion* c) override {
    push({.kind = op_kind::sendmsg, .fd = fd, .addr = msg, .c = c});
  }
  void accept(int fd, completion* c) override { push({.kind = op_kind::accept, .fd = fd, .c = c}); }
  void offload(std::function<int()> fn, completion* c) override {
    push({.kind = op_kind::call, .c = c, .fn = std::move(fn)});
  }

 protected:
  virtual void push(op o) = 0;
  // A result known now, delivered on the next turn (never inside the call that produced it).
  virtual void complete_soon(completion* c, int res) = 0;
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
      cancelled_.emplace_back(c, -ECANCELED);
      return;
    }
    if (pool_.withdraw(c)) {
      cancelled_.emplace_back(c, -ECANCELED);
      return;
    }
    queue({.kind = op_kind::cancel, .target = c});
  }

  size_t in_flight() const override { return in_flight_; }

  bool poll_ready() override {
    // A CQE in the ring, or (COOP_TASKRUN | TASKRUN_FLAG) completions the kernel holds as task work
    // until this thread enters it: both are reaped by the next run_once(false).
    return !cancelled_.empty() || io_uring_cq_ready(&ring_) > 0 ||
           (IO_URING_READ_ONCE(*ring_.sq.kflags) & (IORING_SQ_TASKRUN | IORING_SQ_CQ_OVERFLOW)) != 0 ||
           pool_.has_done();
  }
  void set_max_batch(unsigned n) override {
    max_batch_ = n;
    if (n && io_uring_sq_ready(&ring_) >= n) submit(false);
  }
  void set_pool_limits(const pool_limits& l) override { pool_.set_limits(l); }
  int set_worker_affinity(const cpu_set_t* cpus) override { return pool_.set_affinity(cpus); }
  reactor_stats stats() const override {
    reactor_stats s = stats_;
    pool_.fill(s);
    return s;
  }

  unsigned run_once(bool block) override {
    unsigned done = 0;
    // Operations cancelled before submission complete here, never inside cancel(); so do offloaded
    // calls that ran here because the pool has no threads.
    while (!cancelled_.empty()) {
      auto [c, res] = cancelled_.front();
      cancelled_.pop_front();
      --in_flight_;
      c->complete(res);
      ++done;
      block = false;
    }
    pool_.hand_over();
    if (pool_.outstanding() > 0 && !pool_wake_.armed) {
      // Finished offloaded calls signal the pool's eventfd; a read on it wakes this loop.
      pool_wake_.armed = true;
      queue({.kind = op_kind::read, .fd = pool_.wake_fd(), .buf = &pool_wake_.buf, .len = sizeof pool_wake_.buf,
             .c = &pool_wake_});
    }
    drain_overflow();
    submit(block);  // -EINTR / -EBUSY: reap what is there and come back next turn
    io_uring_cqe* cqe = nullptr;
    while (io_uring_peek_cqe(&ring_, &cqe) == 0) {
      auto* c = reinterpret_cast<completion*>(static_cast<uintptr_t>(cqe->user_data));
      int res = cqe->res;
      io_uring_cqe_seen(&ring_, cqe);
      --in_kernel_;
      if (c == nullptr) continue;  // our own cancel request
      if (c == &pool_wake_) {
        pool_wake_.armed = false;
        continue;
      }
      if (timers_.find_and_erase(c) && res == -ETIME) res = 0;
      --in_flight_;
      c->complete(res);
      ++done;
    }
    if (pool_.outstanding() > 0) {
      std::vector<std::pair<completion*, int>> results;
      pool_.collect(results);
      for (auto& [c, res] : results) {
        --in_flight_;
        c->complete(res);
        ++done;
      }
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

  void push(op o) override {
    if (o.kind != op_kind::call) return queue(std::move(o));
    // Blocking work (ioctls io_uring has no operation for) runs on the pool's threads.
    ++in_flight_;
    if (pool_.start()) return pool_.stage(std::move(o));
    cancelled_.emplace_back(o.c, run_blocking(o));  // no threads: run here, complete next turn
  }
  void complete_soon(completion* c, int res) override {
    ++in_flight_;
    cancelled_.emplace_back(c, res);
  }
  void queue(op o) {
    if (o.c && o.c != &pool_wake_) ++in_flight_;
    if (!overflow_.empty() || !prep(o)) overflow_.push_back(std::move(o));
  }

  void drain_overflow() {
    while (!overflow_.empty()) {
      if (!prep(overflow_.front())) {
        if (in_kernel_ >= kernel_limit_) return;  // the completion queue is full: wait for reaping
        submit(false);                             // make room in the submission queue, try again
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
      case op_kind::sendmsg:
        io_uring_prep_sendmsg(sqe, o.fd, static_cast<const msghdr*>(o.addr), MSG_NOSIGNAL);
        break;
      case op_kind::accept: io_uring_prep_accept(sqe, o.fd, nullptr, nullptr, SOCK_CLOEXEC); break;
      case op_kind::connect:
        io_uring_prep_connect(sqe, o.fd, static_cast<const sockaddr*>(o.addr), o.addrlen);
        break;
      case op_kind::timeout: io_uring_prep_timeout(sqe, timers_.add(o.c, o.ns), 0, 0); break;
      case op_kind::cancel: io_uring_prep_cancel(sqe, o.target, 0); break;
      case op_kind::call: break;  // never queued to the ring (see push)
    }
    io_uring_sqe_set_data(sqe, o.c);
    // aio-max-batch: a full batch goes to the kernel at once instead of at the end of the turn.
    if (max_batch_ && io_uring_sq_ready(&ring_) >= max_batch_) submit(false);
    return true;
  }

  // Every submission goes through here, so the counters (and aio-max-batch's cap) see all of them.
  int submit(bool wait) {
    unsigned queued = io_uring_sq_ready(&ring_);
    int rc = wait ? io_uring_submit_and_wait(&ring_, 1) : io_uring_submit(&ring_);
    if (queued > 0) {
      ++stats_.submit_calls;
      if (rc > 0) {
        stats_.sqes_submitted += static_cast<unsigned>(rc);
        stats_.max_sqes_per_submit = std::max(stats_.max_sqes_per_submit, static_cast<unsigned>(rc));
      }
    }
    return rc;
  }

  // The read that waits for the worker pool's eventfd; not counted as an operation in flight.
  struct pool_wake_read final : completion {
    bool armed = false;
    uint64_t buf = 0;
    void complete(int) override {}
  };

  io_uring ring_;
  std::deque<op> overflow_;
  std::deque<std::pair<completion*, int>> cancelled_;  // completed on the next turn
  timer_table timers_;
  size_t in_flight_ = 0;
  unsigned in_kernel_ = 0;     // prepared or submitted and not yet reaped
  unsigned kernel_limit_;
  unsigned max_batch_ = 0;  // aio-max-batch; 0: no cap
  reactor_stats stats_;     // submission counters (the pool's figures are filled in by stats())
  pool_wake_read pool_wake_;
  worker_pool pool_;  // destroyed before the ring: joins the workers
};

// ---------------------------------------------------------------------------------------------
// poll(2) backend for hosts that forbid io_uring. Socket and pipe operations wait for readiness and
// then run the system call without blocking. Positioned file I/O, fsync and fallocate cannot be
// waited for with poll (a regular file always polls ready and the call blocks inside the kernel), so
// they go to the reactor's worker pool, as offloaded calls do; the loop only collects the results.
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
    if (it != pending_.end()) {
      pending_.erase(it);
      ready_.emplace_back(c, -ECANCELED);
      return;
    }
    // A file operation not yet picked up by a worker is withdrawn; one that a worker is running (or
    // has finished) completes with its real result. Either way it completes once.
    if (pool_.withdraw(c)) ready_.emplace_back(c, -ECANCELED);
  }
  size_t in_flight() const override { return pending_.size() + ready_.size() + pool_.outstanding(); }

  bool poll_ready() override {
    if (!ready_.empty() || pool_.has_done()) return true;
    // Sockets and pipes: one poll(2) that does not wait (a system call per check, but this backend
    // only runs where io_uring is refused).
    poll_fds_.clear();
    uint64_t now = 0;
    for (auto& o : pending_) {
      if (o.kind == op_kind::timeout) {
        if (now == 0) now = now_ns();
        if (o.ns <= now) return true;
        continue;
      }
      if (is_blocking_op(o)) return true;  // runs synchronously on the next turn
      bool out = o.kind == op_kind::write || o.kind == op_kind::send || o.kind == op_kind::sendmsg;
      poll_fds_.push_back({o.fd, static_cast<short>(out ? POLLOUT : POLLIN), 0});
    }
    return !poll_fds_.empty() && ::poll(poll_fds_.data(), poll_fds_.size(), 0) > 0;
  }
  void set_max_batch(unsigned) override {}  // nothing is submitted in batches here
  void set_pool_limits(const pool_limits& l) override { pool_.set_limits(l); }
  int set_worker_affinity(const cpu_set_t* cpus) override { return pool_.set_affinity(cpus); }
  reactor_stats stats() const override {
    reactor_stats s;
    pool_.fill(s);
    return s;
  }

  unsigned run_once(bool block) override {
    pool_.hand_over();
    // Without workers (the pool could not start) file operations run here, synchronously: correct,
    // but the iothread waits for each one.
    for (auto it = pending_.begin(); it != pending_.end();) {
      if (!is_blocking_op(*it)) {
        ++it;
        continue;
      }
      ready_.emplace_back(it->c, run_blocking(*it));
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
      short ev = (o.kind == op_kind::write || o.kind == op_kind::send || o.kind == op_kind::sendmsg) ? POLLOUT : POLLIN;
      fds.push_back({o.fd, ev, 0});
      which.push_back(i);
    }
    size_t socket_fds = fds.size();
    // Workers finishing a job make this eventfd readable, which ends the wait below.
    if (pool_.outstanding() > 0) fds.push_back({pool_.wake_fd(), POLLIN, 0});
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
    pool_.collect(ready_);

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

  static bool is_blocking_op(const op& o) {
    switch (o.kind) {
      case op_kind::read:
      case op_kind::write: return o.off >= 0;  // at the current position: a pipe or tty, polled
      case op_kind::readv:
      case op_kind::writev:
      case op_kind::fsync:
      case op_kind::fallocate:
      case op_kind::call: return true;
      default: return false;
    }
  }

  void complete_soon(completion* c, int res) override { ready_.emplace_back(c, res); }
  void push(op o) override {
    // Handed to the workers at the next turn, one lock for the whole batch.
    if (is_blocking_op(o) && pool_.start()) return pool_.stage(std::move(o));
    pending_.push_back(std::move(o));
  }

  static int attempt(op& o) {
    ssize_t n = 0;
    switch (o.kind) {
      case op_kind::read: n = ::read(o.fd, o.buf, o.len); break;
      case op_kind::write: n = ::write(o.fd, o.buf, o.len); break;
      case op_kind::recv: n = ::recv(o.fd, o.buf, o.len, MSG_DONTWAIT); break;
      case op_kind::send: n = ::send(o.fd, o.buf, o.len, MSG_DONTWAIT | MSG_NOSIGNAL); break;
      case op_kind::sendmsg:
        n = ::sendmsg(o.fd, static_cast<const msghdr*>(o.addr), MSG_DONTWAIT | MSG_NOSIGNAL);
        break;
      case op_kind::accept: n = ::accept4(o.fd, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK); break;
      default: return -EINVAL;
    }
    if (n < 0) return errno == EWOULDBLOCK ? -EAGAIN : -errno;
    return static_cast<int>(n);
  }

  std::vector<op> pending_;                         // socket/pipe operations and timers
  std::vector<std::pair<completion*, int>> ready_;  // results to deliver at the end of this turn
  std::vector<pollfd> poll_fds_;                    // poll_ready()'s scratch list
  worker_pool pool_;                                // destroyed first: joins the workers
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

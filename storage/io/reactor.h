// Asynchronous I/O reactor of one iothread: io_uring when the kernel allows it, poll(2) otherwise; home thread only.
#pragma once
#include <sched.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

struct iovec;
struct msghdr;

namespace blockd::io {

// The continuation of one queued operation. The reactor calls complete() exactly once, on the loop
// thread, never from inside the call that queued the operation (no synchronous completion).
struct completion {
  virtual ~completion() = default;
  virtual void complete(int res) = 0;  // res >= 0: byte count or new fd; res < 0: -errno
};

// Size bounds of a reactor's worker pool (offload() and the poll backend's file I/O): at least `min`
// threads stay alive once started, never more than `max` run at once; a thread above `min` that
// has had nothing to do for `idle_timeout_ns` exits.
struct pool_limits {
  unsigned min = 0;
  unsigned max = 64;
  uint64_t idle_timeout_ns = 10'000'000'000;  // QEMU's thread pool also lets idle threads go after 10 s
};

// Counters of one reactor, for tests and diagnostics; read on the loop thread.
struct reactor_stats {
  uint64_t submit_calls = 0;     // io_uring_submit / io_uring_submit_and_wait calls that entered with SQEs
  uint64_t sqes_submitted = 0;   // SQEs those calls handed to the kernel
  unsigned max_sqes_per_submit = 0;
  unsigned pool_threads = 0;     // worker threads alive now
  unsigned pool_threads_peak = 0;
  std::vector<int> pool_tids;    // kernel thread ids of the live workers
};

// One instance per iothread. Every method must be called on that iothread. Queueing never fails:
// when the submission queue is full, operations wait in an overflow list and go out on the next turn.
class reactor {
 public:
  virtual ~reactor() = default;

  // Creates the io_uring backend, or the poll backend if io_uring cannot be set up (seccomp in
  // containers, old kernels, io_uring_disabled). `note` receives the reason for a fallback.
  static std::unique_ptr<reactor> create(unsigned entries, std::string* note);
  // The poll backend waits for sockets and pipes with poll(2) and runs positioned file I/O, fsync and
  // fallocate on a few worker threads of its own (started on first use), so a slow disk does not
  // stop the loop. Completions still run on the loop thread, inside run_once().
  static std::unique_ptr<reactor> create_poll();

  virtual const char* kind() const = 0;

  // off < 0 means "at the current position" (pipes, ttys, eventfds).
  virtual void read(int fd, void* buf, size_t len, int64_t off, completion* c) = 0;
  virtual void write(int fd, const void* buf, size_t len, int64_t off, completion* c) = 0;
  // Vectored positioned I/O and file control for block drivers; `iov` must stay alive until completion.
  // With run_here the call is made on this thread and completes on the next turn: for files whose
  // I/O is a memory copy (tmpfs), where io_uring would hand a buffered write to a worker thread.
  virtual void readv(int fd, const struct iovec* iov, int iovcnt, int64_t off, completion* c, bool run_here = false) = 0;
  virtual void writev(int fd, const struct iovec* iov, int iovcnt, int64_t off, completion* c, bool run_here = false) = 0;
  virtual void fsync(int fd, bool datasync, completion* c) = 0;
  virtual void fallocate(int fd, int mode, int64_t off, int64_t len, completion* c) = 0;
  virtual void recv(int fd, void* buf, size_t len, completion* c) = 0;
  virtual void send(int fd, const void* buf, size_t len, completion* c) = 0;  // never raises SIGPIPE
  // Gathered send (never raises SIGPIPE); `msg`, its iovecs and their bytes stay alive until completion.
  virtual void sendmsg(int fd, const struct msghdr* msg, completion* c) = 0;
  virtual void accept(int fd, completion* c) = 0;                               // res: new fd, CLOEXEC
  virtual void connect(int fd, const void* addr, unsigned addrlen, completion* c) = 0;
  virtual void timeout(uint64_t nanoseconds, completion* c) = 0;              // res: 0 or -ECANCELED
  // Runs `fn` (a blocking call io_uring has no operation for: block-device ioctls, ...) on one of the
  // reactor's worker threads; `c` completes on the loop with what fn returned (>= 0 or -errno).
  virtual void offload(std::function<int()> fn, completion* c) = 0;
  // Best effort: the target still completes exactly once, with -ECANCELED if it was stopped.
  virtual void cancel(completion* c) = 0;

  // One turn of the loop: submit what is queued, wait for at least one completion when `block`,
  // then run every completion that is ready. Returns the number of completions run.
  virtual unsigned run_once(bool block) = 0;

  // Operations queued and not yet completed.
  virtual size_t in_flight() const = 0;

  // ---- tunables (the iothread object's properties) and busy polling -------------------------
  // Whether a run_once(false) now would complete something: a CQE waiting (or kernel task work
  // that will produce one), a result known in advance, a worker's finished job, a ready socket
  // (poll backend). Cheap and without waiting: the iothread spins on it before it sleeps.
  virtual bool poll_ready() = 0;
  // aio-max-batch: at most `n` SQEs go to the kernel per io_uring_submit; a turn that queues more
  // submits every `n` as they are queued, so the first ones start earlier. 0: no cap (one submit a
  // turn, bounded by the ring size). The poll backend has no submission step and ignores it.
  virtual void set_max_batch(unsigned n) = 0;
  // thread-pool-min/-max. Raising min starts threads now; lowering max lets busy threads above it
  // finish their current job and exit.
  virtual void set_pool_limits(const pool_limits& l) = 0;
  // The CPUs the worker threads run on, now and when started later (nullptr: the CPUs of the
  // thread that starts them). 0 or -errno from sched_setaffinity.
  virtual int set_worker_affinity(const cpu_set_t* cpus) = 0;
  virtual reactor_stats stats() const = 0;
};

}  // namespace blockd::io

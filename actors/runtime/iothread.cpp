// iothread loop: remote queue -> ready actors -> posted functions -> one submit -> reap; runs on its own thread.
#include "actors/runtime/iothread.h"

#include <pthread.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <cerrno>
#include <condition_variable>
#include <future>
#include <stdexcept>

namespace blockd {
namespace {
// A resumable that keeps running past this many messages goes to the back of the queue, so one busy
// actor cannot starve the ring or its neighbours.
constexpr size_t max_throughput = 64;
constexpr unsigned ring_entries = 256;
// QEMU's first window when polling starts from 0.
constexpr int64_t first_poll_window_ns = 4000;

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

unsigned clamp_u(int64_t v) { return v <= 0 ? 0u : v > 0xffffffffLL ? 0xffffffffu : static_cast<unsigned>(v); }
}  // namespace

int64_t iothread::next_poll_window(int64_t window, int64_t block_ns, int64_t max_ns, int64_t grow, int64_t shrink) {
  if (max_ns <= 0) return 0;
  if (block_ns <= window) return window;  // the event came while polling: keep the window
  if (block_ns > max_ns) return shrink > 0 ? window / shrink : 0;  // even max would have missed it
  if (window >= max_ns) return window;
  // The event came after the window but within max: a longer window would have caught it.
  int64_t next = window == 0 ? first_poll_window_ns : window * (grow > 0 ? grow : 2);
  if (next < window) next = max_ns;  // overflow
  return std::min(next, max_ns);
}

iothread::iothread(caf::actor_system& sys, std::string id, iothread_params params)
    : caf::execution_unit(&sys), id_(std::move(id)), params_(params) {
  const char* forced = std::getenv("BLOCKD_REACTOR");
  if (forced && std::strcmp(forced, "poll") == 0)
    reactor_ = io::reactor::create_poll();
  else
    reactor_ = io::reactor::create(ring_entries, &backend_note_);
  wake_fd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (wake_fd_ < 0) throw std::runtime_error(std::string("eventfd: ") + std::strerror(errno));
  wake_c_.self = this;
  // Before the thread exists this constructor is the loop's only user.
  apply(params_, true);
  std::promise<void> started;
  auto ready = started.get_future();
  thread_ = std::thread([this, &started] {
    thread_id_ = std::this_thread::get_id();
    tid_ = static_cast<int64_t>(::syscall(SYS_gettid));
    std::string name = "io:" + id_;
    name.resize(std::min<size_t>(name.size(), 15));
    pthread_setname_np(pthread_self(), name.c_str());
    started.set_value();
    run();
  });
  ready.wait();
}

iothread::~iothread() {
  stop();
  if (thread_.joinable()) thread_.join();
  if (wake_fd_ >= 0) ::close(wake_fd_);
}

void iothread::stop() {
  stop_ = true;
  wake();
}

void iothread::wake() {
  uint64_t one = 1;
  (void)!::write(wake_fd_, &one, sizeof one);
}

void iothread::exec_later(caf::resumable* job) {
  if (is_current()) {
    local_jobs_.push_back(job);
    return;
  }
  bool first;
  {
    std::lock_guard<std::mutex> g(mx_);
    first = remote_jobs_.empty() && remote_fns_.empty();
    remote_jobs_.push_back(job);
    remote_pending_.store(true, std::memory_order_release);
  }
  if (first) wake();
}

void iothread::post(std::function<void()> fn) {
  if (is_current()) {
    local_fns_.push_back(std::move(fn));
    return;
  }
  bool first;
  {
    std::lock_guard<std::mutex> g(mx_);
    first = remote_jobs_.empty() && remote_fns_.empty();
    remote_fns_.push_back(std::move(fn));
    remote_pending_.store(true, std::memory_order_release);
  }
  if (first) wake();
}

void iothread::wake_completion::complete(int) {
  self->wake_armed_ = false;
  if (!self->stop_) self->arm_wake();
}

void iothread::arm_wake() {
  if (wake_armed_.exchange(true)) return;
  reactor_->read(wake_fd_, &wake_buf_, sizeof wake_buf_, -1, &wake_c_);
}

void iothread::drain_remote() {
  std::lock_guard<std::mutex> g(mx_);
  for (auto* j : remote_jobs_) local_jobs_.push_back(j);
  remote_jobs_.clear();
  for (auto& f : remote_fns_) local_fns_.push_back(std::move(f));
  remote_fns_.clear();
  remote_pending_.store(false, std::memory_order_relaxed);
}

iothread_params iothread::params() const {
  std::lock_guard<std::mutex> g(params_mx_);
  return params_;
}

void iothread::apply(const iothread_params& p, bool poll_too) {
  if (poll_too) {
    poll_max_ns_ = p.poll_max_ns;
    poll_grow_ = p.poll_grow;
    poll_shrink_ = p.poll_shrink;
    window_ns_ = 0;
    st_window_.store(0, std::memory_order_relaxed);
  }
  reactor_->set_max_batch(clamp_u(p.aio_max_batch));
  io::pool_limits l;
  l.min = clamp_u(p.thread_pool_min);
  l.max = std::max(1u, clamp_u(p.thread_pool_max));
  reactor_->set_pool_limits(l);
}

void iothread::set_params(const iothread_params& p) {
  {
    std::lock_guard<std::mutex> g(params_mx_);
    params_ = p;
  }
  post([this, p] { apply(p, true); });
}

void iothread::set_event_loop_base_params(const iothread_params& p) {
  {
    std::lock_guard<std::mutex> g(params_mx_);
    params_.aio_max_batch = p.aio_max_batch;
    params_.thread_pool_min = p.thread_pool_min;
    params_.thread_pool_max = p.thread_pool_max;
  }
  post([this, p] { apply(p, false); });
}

poll_stats iothread::polling() const {
  poll_stats s;
  s.window_ns = st_window_.load(std::memory_order_relaxed);
  s.polls = st_polls_.load(std::memory_order_relaxed);
  s.poll_hits = st_hits_.load(std::memory_order_relaxed);
  s.grows = st_grows_.load(std::memory_order_relaxed);
  s.shrinks = st_shrinks_.load(std::memory_order_relaxed);
  return s;
}

int iothread::set_affinity(const cpu_set_t& cpus) {
  auto pin = [this, cpus]() -> int {
    if (::sched_setaffinity(0, sizeof cpus, &cpus) != 0) return -errno;
    return reactor_->set_worker_affinity(&cpus);
  };
  if (is_current()) return pin();
  return block_on([pin](std::function<void(int)> done) { done(pin()); });
}

cpu_set_t iothread::affinity() const {
  cpu_set_t s;
  CPU_ZERO(&s);
  ::sched_getaffinity(static_cast<pid_t>(tid_.load()), sizeof s, &s);
  return s;
}

// The loop has nothing to run. With a poll window it first spins for up to that long on the
// ring, the worker pool and the remote queue, since waking from a sleep costs more than a short
// spin when the next event is close (QEMU's AioContext polling); then it sleeps in the ring. How
// long the whole wait took moves the window (next_poll_window).
void iothread::wait_adaptive() {
  int64_t start = now_ns();
  bool hit = false;
  if (window_ns_ > 0) {
    st_polls_.fetch_add(1, std::memory_order_relaxed);
    // What this turn queued must reach the kernel before there is anything to poll for.
    if (reactor_->run_once(false) > 0) {
      hit = true;
    } else {
      for (;;) {
        if (remote_pending_.load(std::memory_order_acquire) || reactor_->poll_ready()) {
          hit = true;
          break;
        }
        if (now_ns() - start >= window_ns_) break;
        cpu_relax();
      }
      if (hit) reactor_->run_once(false);
    }
    if (hit) st_hits_.fetch_add(1, std::memory_order_relaxed);
  }
  if (!hit) reactor_->run_once(!stop_);
  int64_t next = next_poll_window(window_ns_, now_ns() - start, poll_max_ns_, poll_grow_, poll_shrink_);
  if (next != window_ns_) {
    (next > window_ns_ ? st_grows_ : st_shrinks_).fetch_add(1, std::memory_order_relaxed);
    window_ns_ = next;
    st_window_.store(next, std::memory_order_relaxed);
  }
}

bool iothread::wait_until(const std::function<bool()>& done) {
  while (!done() && !stop_) {
    drain_remote();
    for (size_t n = local_fns_.size(); n > 0 && !local_fns_.empty() && !done(); --n) {
      auto fn = std::move(local_fns_.front());
      local_fns_.pop_front();
      fn();
    }
    if (done()) break;
    bool idle = local_fns_.empty();
    if (idle) {
      std::lock_guard<std::mutex> g(mx_);
      idle = remote_fns_.empty();
    }
    // Actors made ready meanwhile (local_jobs_) run when the outer loop gets back; sleeping is fine.
    reactor_->run_once(idle && !stop_);
  }
  return done();
}

int iothread::block_on(const std::function<void(std::function<void(int)>)>& start) {
  if (is_current()) {
    bool fin = false;
    int res = -ESHUTDOWN;
    start([&](int r) {
      res = r;
      fin = true;
    });
    return wait_until([&] { return fin; }) ? res : -ESHUTDOWN;
  }
  struct shared_state {
    std::mutex mx;
    std::condition_variable cv;
    bool fin = false;
    int res = -ESHUTDOWN;
  };
  auto st = std::make_shared<shared_state>();
  post([st, start] {
    start([st](int r) {
      std::lock_guard<std::mutex> g(st->mx);
      st->res = r;
      st->fin = true;
      st->cv.notify_all();
    });
  });
  std::unique_lock<std::mutex> g(st->mx);
  // A loop that stops drops what was posted to it: look again now and then rather than hang.
  while (!st->fin) {
    if (stop_) return -ESHUTDOWN;
    st->cv.wait_for(g, std::chrono::milliseconds(200));
  }
  return st->res;
}

void iothread::run() {
  arm_wake();
  while (!stop_) {
    drain_remote();
    // Run the actors that were ready at the start of this turn; what they make ready runs next turn
    // after the ring has been serviced.
    for (size_t n = local_jobs_.size(); n > 0 && !local_jobs_.empty(); --n) {
      auto* job = local_jobs_.front();
      local_jobs_.pop_front();
      switch (job->resume(this, max_throughput)) {
        case caf::resumable::resume_later: local_jobs_.push_back(job); break;
        case caf::resumable::done:
        case caf::resumable::awaiting_message: intrusive_ptr_release(job); break;
        case caf::resumable::shutdown_execution_unit: break;
      }
    }
    for (size_t n = local_fns_.size(); n > 0 && !local_fns_.empty(); --n) {
      auto fn = std::move(local_fns_.front());
      local_fns_.pop_front();
      fn();
    }
    // Nothing runnable: sleep in the ring until a completion or a remote wake-up (eventfd read).
    // A post that lands after this check also writes the eventfd, so the sleep ends at once.
    bool idle = local_jobs_.empty() && local_fns_.empty() && !remote_pending_.load(std::memory_order_acquire);
    if (idle && !stop_ && poll_max_ns_ > 0)
      wait_adaptive();
    else
      reactor_->run_once(idle && !stop_);
  }
  // Actors still queued are dropped: their system is shutting down.
  drain_remote();
  for (auto* j : local_jobs_) intrusive_ptr_release(j);
  local_jobs_.clear();
  local_fns_.clear();
  // Let the pending wake read finish so the reactor can be destroyed with nothing in flight.
  if (wake_armed_) {
    wake();
    for (int i = 0; i < 100 && wake_armed_; ++i) reactor_->run_once(false);
  }
}

}  // namespace blockd

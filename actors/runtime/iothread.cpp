// iothread loop: remote queue -> ready actors -> posted functions -> one submit -> reap; runs on its own thread.
#include "actors/runtime/iothread.h"

#include <pthread.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <unistd.h>

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
}  // namespace

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
    bool idle = local_jobs_.empty() && local_fns_.empty();
    if (idle) {
      // Nothing runnable: sleep in the ring until a completion or a remote wake-up (eventfd read).
      std::lock_guard<std::mutex> g(mx_);
      idle = remote_jobs_.empty() && remote_fns_.empty();
    }
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

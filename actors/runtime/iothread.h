// An iothread: one OS thread = one reactor (io_uring) = one CAF execution unit; created by the supervisor, runs itself.
#pragma once
#include "config/objects/event_loop.h"
#include <caf/actor_system.hpp>
#include <caf/execution_unit.hpp>
#include <caf/resumable.hpp>
#include <sched.h>

#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "storage/io/reactor.h"

namespace blockd {

// The tunables of an iothread object (QSD's IothreadProperties) and of the main-loop object (the
// event-loop-base part). What they mean for blockd:
//  - poll-max-ns / poll-grow / poll-shrink: adaptive busy polling before the loop sleeps, with
//    QEMU's rules (see next_poll_window); 0 turns polling off.
//  - aio-max-batch: at most that many SQEs per io_uring_submit; a turn that queues more submits
//    every aio-max-batch as they are queued (0: one submit per turn, at most the ring's size).
//  - thread-pool-min / thread-pool-max: bounds of the reactor's worker pool (offload(), and file
//    I/O of the poll backend).
//  - thread_context is not read here: the QOM object resolves it and calls set_affinity().
using iothread_params = qom::event_loop_params;  // one definition, shared with the QOM object

// Busy-polling figures of one loop; any thread may read them (relaxed counters).
struct poll_stats {
  int64_t window_ns = 0;   // how long the loop polls before its next sleep
  uint64_t polls = 0;      // idle turns that polled (window > 0)
  uint64_t poll_hits = 0;  // ... and found work within the window, so did not sleep
  uint64_t grows = 0, shrinks = 0;
};

class iothread final : public caf::execution_unit {
 public:
  iothread(caf::actor_system& sys, std::string id, iothread_params params);
  ~iothread() override;  // stops and joins

  iothread(const iothread&) = delete;
  iothread& operator=(const iothread&) = delete;

  // CAF entry point: schedule an actor on this loop. Safe from any thread.
  void exec_later(caf::resumable* job) override;

  // Run `fn` on this loop at the next turn. Safe from any thread.
  void post(std::function<void()> fn);

  // The reactor may only be touched from this iothread.
  io::reactor& reactor() { return *reactor_; }
  bool is_current() const { return std::this_thread::get_id() == thread_id_; }
  const std::string& id() const { return id_; }
  iothread_params params() const;
  const char* backend() const { return reactor_->kind(); }
  const std::string& backend_note() const { return backend_note_; }
  int64_t thread_id() const { return tid_.load(); }

  // Only on this iothread: turns the loop (posted functions and ring completions; actors stay queued)
  // until `done` holds or the loop is stopping; returns done(). For control calls that must wait for
  // their own I/O on this loop (driver_env::block_on).
  bool wait_until(const std::function<bool()>& done);
  bool stopping() const { return stop_; }
  // driver_env::block_on for nodes homed here: from this thread a nested wait_until, from any other
  // a post and a blocking wait (-ESHUTDOWN if the loop stops first).
  int block_on(const std::function<void(std::function<void(int)>)>& start);

  // Asks the loop to finish; resumables still queued are released without running.
  void stop();

  // ---- tunables (qom-set on /objects/<id>) -------------------------------------------------
  // Safe from any thread; applied on the loop at its next turn, in the order of the calls. As in
  // QEMU, new poll parameters restart the poll window at 0.
  void set_params(const iothread_params& p);
  // The main-loop object's part only (aio-max-batch, thread-pool-min/-max): the poll settings stay.
  void set_event_loop_base_params(const iothread_params& p);
  poll_stats polling() const;
  // QEMU's adaptation of the poll window after one idle wait that lasted block_ns: unchanged when
  // the event came within the window; shrunk (/shrink, or reset to 0 when shrink is 0) when the
  // wait was longer than max_ns; else grown (x grow, 2 when 0; from 0 it starts at 4 us), at most max_ns.
  static int64_t next_poll_window(int64_t window, int64_t block_ns, int64_t max_ns, int64_t grow, int64_t shrink);

  // ---- CPU affinity (blockd's thread-context extension of the iothread object) -------------
  // Moves the loop thread and its worker pool threads (present and future) to `cpus`. Any thread:
  // from another thread it waits for the loop to apply it (control path only). 0 or -errno
  // (sched_setaffinity's EINVAL: no allowed CPU in the set; -ESHUTDOWN: the loop stopped).
  int set_affinity(const cpu_set_t& cpus);
  // The loop thread's CPU set as the kernel reports it now (sched_getaffinity of its tid).
  cpu_set_t affinity() const;

 private:
  struct wake_completion final : io::completion {
    iothread* self;
    void complete(int res) override;
  };

  void run();
  void arm_wake();
  void wake();
  void drain_remote();
  void apply(const iothread_params& p, bool poll_too);  // loop thread
  void wait_adaptive();                                  // loop thread: poll, then sleep

  std::string id_;
  mutable std::mutex params_mx_;
  iothread_params params_;  // the last values asked for (params()); guarded by params_mx_
  std::unique_ptr<io::reactor> reactor_;
  std::string backend_note_;
  int wake_fd_ = -1;
  uint64_t wake_buf_ = 0;
  wake_completion wake_c_;
  std::atomic<bool> wake_armed_{false};

  std::mutex mx_;
  std::vector<caf::resumable*> remote_jobs_;
  std::vector<std::function<void()>> remote_fns_;
  // Set with remote_jobs_/remote_fns_ under mx_, cleared when drained: the lock-free "work came
  // from another thread" check of the idle test and of busy polling.
  std::atomic<bool> remote_pending_{false};

  // Busy polling, loop thread only (mirrored into the atomics below for polling()).
  int64_t poll_max_ns_ = 0, poll_grow_ = 0, poll_shrink_ = 0, window_ns_ = 0;
  std::atomic<int64_t> st_window_{0};
  std::atomic<uint64_t> st_polls_{0}, st_hits_{0}, st_grows_{0}, st_shrinks_{0};

  std::deque<caf::resumable*> local_jobs_;
  std::deque<std::function<void()>> local_fns_;

  std::atomic<bool> stop_{false};
  std::atomic<int64_t> tid_{0};
  std::thread::id thread_id_;
  std::thread thread_;
};

}  // namespace blockd

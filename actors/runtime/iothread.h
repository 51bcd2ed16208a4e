// An iothread: one OS thread = one reactor (io_uring) = one CAF execution unit; created by the supervisor, runs itself.
#pragma once
#include "config/objects/event_loop.h"
#include <caf/actor_system.hpp>
#include <caf/execution_unit.hpp>
#include <caf/resumable.hpp>

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

// The tunables QSD accepts for an iothread object. blockd's loop does not busy-poll, so the poll-*
// values are recorded and reported but change nothing; so is aio-max-batch (the reactor already
// submits once per loop turn, and QEMU uses it only for Linux AIO).
using iothread_params = qom::event_loop_params;  // one definition, shared with the QOM object

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
  const iothread_params& params() const { return params_; }
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

 private:
  struct wake_completion final : io::completion {
    iothread* self;
    void complete(int res) override;
  };

  void run();
  void arm_wake();
  void wake();
  void drain_remote();

  std::string id_;
  iothread_params params_;
  std::unique_ptr<io::reactor> reactor_;
  std::string backend_note_;
  int wake_fd_ = -1;
  uint64_t wake_buf_ = 0;
  wake_completion wake_c_;
  std::atomic<bool> wake_armed_{false};

  std::mutex mx_;
  std::vector<caf::resumable*> remote_jobs_;
  std::vector<std::function<void()>> remote_fns_;
  std::atomic<bool> sleeping_{false};

  std::deque<caf::resumable*> local_jobs_;
  std::deque<std::function<void()>> local_fns_;

  std::atomic<bool> stop_{false};
  std::atomic<int64_t> tid_{0};
  std::thread::id thread_id_;
  std::thread thread_;
};

}  // namespace blockd

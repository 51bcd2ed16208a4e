// The write hook of a mirror (and active commit) on its source: marks what guests write for the copy engine, and in copy-mode write-blocking sends each write to the target before the guest hears of it; home iothread only.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <unordered_map>
#include <vector>

#include "storage/block/copy_engine.h"
#include "storage/block/write_hook.h"

namespace blockd::block {

class node;

// Background mode (QEMU's copy-mode background): a completed write marks its range dirty and the
// engine copies it later. Write-blocking mode (active mirror): each write and write-zeroes locks
// its chunks in the engine (copy_engine::lock_range: no background copy of them runs meanwhile, and
// another guest write to them waits), goes to the source and to the target at the same time, and
// completes to the guest once both are done (hold_completion). Both sides done: the chunks it
// covered whole are clean. The target failed: the guest still gets the source's result (as in
// QEMU), the chunks stay dirty and on_target_error decides what the job does. Discards are not
// sent to the target (a discarded range reads back differently per driver): they mark their range
// dirty, and the engine copies what the source reads there now.
class mirror_hook final : public write_hook {
 public:
  struct callbacks {
    // A write reached both sides (the job's progress grows by it, as QEMU counts active writes).
    std::function<void(int64_t bytes)> synced;
    // A write of the target failed (positive errno): the job's on-target-error applies.
    std::function<void(int err)> target_failed;
    // Marked dirty in background mode (the job's total grows).
    std::function<void()> dirtied;
    // Nothing in flight any more after stop() (the host may drop the engine now).
    std::function<void()> drained;
  };
  mirror_hook(node& source, node& target, copy_engine& engine, callbacks cb);
  ~mirror_hook();  // only when drained() (nothing in flight)

  // Switches to write-blocking (block-job-change, or copy-mode at the start); never back.
  void set_write_blocking() { blocking_ = true; }
  bool write_blocking() const { return blocking_; }
  // No write of the old copy mode is still in flight (the switch is complete).
  bool settled() const { return untracked_ == 0; }
  // The job is over: later writes only pass by; drained() once the ones in flight are done.
  void stop();
  bool idle() const { return writes_.empty() && untracked_ == 0; }

  bool before_write(io_request& r) override;
  void after_write(const io_request& r) override;
  bool hold_completion(io_request& r) override;

 private:
  struct active_write;
  void go(active_write& w, bool immediate);
  void target_done(active_write& w);
  void end(active_write& w);
  void check_drained();

  node& source_;
  node& target_;
  copy_engine& engine_;
  callbacks cb_;
  bool blocking_ = false;
  bool stopped_ = false;
  size_t untracked_ = 0;  // background-mode writes between before_write and after_write
  std::unordered_map<io_request*, std::unique_ptr<active_write>> writes_;
  std::vector<std::unique_ptr<active_write>> spare_;
};

}  // namespace blockd::block

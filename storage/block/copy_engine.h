// The block-copy engine shared by backup, copy-before-write, mirror, stream and commit: copies the dirty chunks of a work map from a source node to a target; home iothread only.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "storage/block/dirty_bitmap.h"
#include "storage/block/io_request.h"
#include "storage/block/rate_limit.h"

namespace blockd::block {

class node;

// How the data of a copied range reaches the target.
enum class copy_mode : uint8_t {
  write,     // read the source, write the target
  compress,  // the same, with io_compress writes (backup compress=on; granularity = the target's cluster size)
  copy_up,   // no target: a read with io_copy_up on the source (a top node with backing files) copies
             // what it finds below into the source itself (stream)
};

// What to do with one range, decided from the source's block status.
enum class copy_action : uint8_t {
  copy,  // read + write (copy_up: the copy-up read)
  zero,  // the range reads as zeroes: write_zeroes on the target (nothing when the target reads zeroes already)
  skip,  // leave the target alone (sync=top: not allocated in the top; commit: below the base)
};

// The source's block status of one range, as the policy sees it: bs_* flags and the allocation
// depth (1 = the source node itself, 2 = its first backing file, ...; 0 = nowhere: reads zeroes).
struct copy_extent {
  int64_t offset = 0, length = 0;
  uint32_t status = 0;
  int depth = 0;
};
using copy_policy = std::function<copy_action(const copy_extent&)>;

// The usual policies. Zero ranges (bs_zero) become copy_action::zero.
// full: everything (sync=full, mirror sync=full, backup sync=full).
copy_policy copy_policy_full();
// top: only what is allocated in the source node itself (depth 1): sync=top.
copy_policy copy_policy_top();
// above base: what is allocated at depth 1..n (commit: the layers above the base; n = their count).
// skip_top: leave depth 1 out too (stream: what the top holds already needs no copy-up).
copy_policy copy_policy_above(int n, bool skip_top = false);

// A failed operation, as the error callback sees it.
struct copy_error {
  int64_t offset = 0, length = 0;
  bool is_read = false;  // the source side (block status or read) failed; else the target side
  int err = 0;           // positive errno
};

// What the engine does after a failed operation (the job maps on-source-error / on-target-error to
// this; see the table in copy_engine.cpp for QEMU's meaning of report/ignore/stop/enospc per job).
enum class copy_error_action : uint8_t {
  retry,   // the range stays dirty and is copied again later (mirror and backup "ignore")
  stop,    // the range stays dirty and the engine pauses (on_paused once drained): "stop", "enospc"
  skip,    // the range is given up as done (stream "ignore": the job ends with the error later)
  report,  // the range stays dirty; the engine stops for good and calls on_finished(-err) once drained
};

// Tests inject a clock; the default is node::now_ns and the source's reactor timeout().
struct copy_clock {
  std::function<int64_t()> now{};
  // Calls `fire` on the home thread no earlier than `ns` from now (never inside the call).
  std::function<void(int64_t ns, std::function<void()> fire)> sleep{};
};

struct copy_settings {
  node* source = nullptr;
  node* target = nullptr;  // null in copy_up mode
  copy_mode mode = copy_mode::write;
  int64_t granularity = 65536;   // work-map chunk (power of two, >= 512)
  int64_t max_chunk = 1 << 20;   // largest copy request (x-perf max-chunk); rounded down to chunks
  int64_t buf_size = 16 << 20;   // all buffers together (mirror buf-size); rounded up to one max_chunk
  int max_workers = 64;          // operations in flight (x-perf max-workers)
  uint64_t speed = 0;            // bytes per second, 0 = unlimited
  copy_policy policy{};          // empty = copy_policy_full()
  bool block_status = true;      // false: every range is data (no probing; for sources without block status)
  bool target_zeroed = false;    // the target reads zeroes already (fresh image, target-is-zero): zeroes need no write
  bool may_unmap = false;        // zero writes carry io_may_unmap (mirror unmap=true, backup's discard-source)
  bool discard_source = false;   // backup discard-source: each range copied is then discarded on the source
  // Whether zero writes count against the speed limit. QEMU's block-copy (backup) charges every
  // dispatched range, zeroes included; mirror charges zero and discard ranges nothing. Skipped
  // ranges never count. Either way they count as progress.
  bool zeroes_charged = true;
  copy_clock clock{};            // empty members = the real clock
};

// Callbacks, all called on the home thread and never from inside an engine call. They may call
// back into the engine (set_speed, pause, cancel, mark_dirty, copy_now). on_idle, on_paused,
// on_finished and on_cancelled may destroy it (nothing is in flight then, and the engine touches
// nothing after them); on_progress, on_error and copy_now's done must not.
struct copy_callbacks {
  // Bytes done (copied or zeroed) and bytes skipped by the policy since the last call. A job adds
  // `done` to its current progress; backup sync=top lowers its total by `skipped` (QEMU does).
  std::function<void(int64_t done, int64_t skipped)> on_progress{};
  // The work map is empty and nothing is in flight (mirror: READY; backup: all copied). Called
  // every time that becomes true; mark_dirty() may start the engine again.
  std::function<void()> on_idle{};
  std::function<copy_error_action(const copy_error&)> on_error{};  // empty = report
  std::function<void()> on_paused{};                 // pause() or a stop action drained
  std::function<void(int err)> on_finished{};        // a report action (negative errno) drained
  std::function<void()> on_cancelled{};              // cancel() drained
  // The speed limit parks the engine (true) until its timer fires (false). Called from inside engine
  // calls too: it may only record or post the fact (a job's busy flag), never call the engine.
  std::function<void(bool sleeping)> on_sleep{};
};

// One copy between two nodes of the same home. Usage: construct, fill work_map() (set all, merge a
// user bitmap, or scan()), start(); writers that must be copied again call mark_dirty() after
// their write completed (a write hook's after_write: set before completion, a copy could read
// the old data and clear the bit). A chunk's bit clears when its copy starts, so a write during
// the copy dirties it again and it is copied again after the running copy finished: two copies of
// one chunk never overlap, so an older write never lands after a newer one.
//
// How each job uses it (QEMU's behaviour):
// - backup: granularity = max(64 KiB, target cluster size); work map all (sync=full/top) or the
//   user bitmap merged in (incremental/bitmap); policy full or top; compress -> copy_mode::compress;
//   zeroes_charged = true; progress total = remaining() at start, lowered by `skipped`. Its
//   copy-before-write filter calls copy_now(range) from a gating write hook's before_write and
//   releases the guest write in done (done(-errno): on-cbw-error decides).
// - mirror: granularity option (default: target cluster size clamped to 4K..64K); work map from
//   scan() with the sync policy (or all); a write hook on the source calls mark_dirty() in
//   after_write; READY when on_idle fires; zeroes_charged = false; may_unmap from `unmap`;
//   target_zeroed when the target is known to read zeroes.
// - stream: source = the top, copy_mode::copy_up, policy copy_policy_above(n, true) with n = the
//   depth of the base's child (the last layer streamed), work map all.
// - commit: source = the top, target = the base, policy copy_policy_above(n) with n = layers above
//   the base, work map all.
// The caller keeps both nodes open, and their home loop turning, until the engine is idle.
class copy_engine {
 public:
  copy_engine(copy_settings s, copy_callbacks cb);
  ~copy_engine();  // only with nothing in flight and no scan() running (from or after on_idle, on_paused, on_finished, on_cancelled)
  copy_engine(const copy_engine&) = delete;
  copy_engine& operator=(const copy_engine&) = delete;

  // The chunks still to copy (granularity = settings().granularity, size = the source's length).
  dirty_bitmap& work_map() { return map_; }
  const copy_settings& settings() const { return s_; }

  // Fills the work map from the source's block status: a chunk becomes dirty where the policy says
  // copy or zero (zero: unless target_zeroed). done(0 or -errno) on the home thread. Before start().
  void scan(std::function<void(int)> done);

  void start();
  // Marks a range to copy (again) and wakes the engine.
  void mark_dirty(int64_t offset, int64_t length);
  // Copies the dirty chunks of [offset, offset+length) now, ahead of the background order, past
  // the speed limit and a pause, and calls done(0) once the whole range is on the target, or
  // done(-errno) if a copy of it failed (the range stays dirty; the error callback is not asked).
  // Chunks already in flight are waited for, not copied twice. Copy-before-write holds a guest
  // write on this. After cancel() or a report: done(-ECANCELED) for what still needs copying.
  // Its requests, and those of the copies it waits for, carry io_control: they pass a quiesce of
  // either node, since a drain waits for the guest write that waits for them. Background copies
  // wait out a quiesce like any request; a job pauses the engine while its nodes are drained.
  void copy_now(int64_t offset, int64_t length, std::function<void(int)> done);

  // Active mirror (copy-mode write-blocking): a guest write that goes to both sides locks the
  // chunks it touches against background copies and other locked writes, so no chunk has two
  // writers to the target at once and an older copy never lands after a newer guest write.
  // lock_range answers true when it got the lock at once; otherwise false, and granted() is called
  // once every operation and lock overlapping the range is gone (from inside the completion or
  // unlock that freed it; waiting locks in arrival order). granted() must not call into the engine.
  bool lock_range(int64_t offset, int64_t length, std::function<void()> granted);
  // Ends a lock. synced: the write reached both sides, so the chunks it covered whole need no copy
  // (their dirty bits clear). Otherwise the chunks it touched are marked to copy again.
  void unlock_range(int64_t offset, int64_t length, bool synced);
  size_t locked_ranges() const { return locks_held_; }
  // A failure outside the engine's own operations (an active mirror's write to the target), with
  // the action the job decided: stop pauses the engine, report stops it for good with `err`
  // (positive errno); retry and skip change nothing (the caller marked the range dirty).
  void external_error(copy_error_action a, int err);

  void set_speed(uint64_t bytes_per_sec);
  // A copy-before-write filter makes its engine at open and a backup job that inserted it takes it
  // over: the job's callbacks, sync policy (top), copy mode (compress) and background limits. Home
  // thread, before start(); operations already running keep what they started with.
  void set_callbacks(copy_callbacks cb) { cb_ = std::move(cb); }
  void set_policy(copy_policy p) {
    partial_policy_ = bool(p);
    s_.policy = p ? std::move(p) : copy_policy_full();
  }
  // False once set_policy gave a policy that may skip ranges (backup sync=top): a range it marks
  // done was then not necessarily copied, so a point-in-time view cannot read it from the target.
  bool copies_everything() const { return !partial_policy_; }
  void set_mode(copy_mode m) { s_.mode = m; }
  void set_max_workers(int n) { s_.max_workers = n < 1 ? 1 : n; }
  void set_discard_source(bool on) {
    s_.discard_source = on;
    s_.may_unmap = s_.may_unmap || on;
  }
  void set_max_chunk(int64_t bytes);
  // Stops starting operations; on_paused once nothing is in flight. copy_now still works.
  void pause();
  void resume();
  // Stops for good; on_cancelled once nothing is in flight (what is in flight completes).
  void cancel();

  // A finished (a report drained) or cancelled engine takes copy_now again, paused: a
  // copy-before-write filter outlives the backup job that ran its background copy, and guest writes
  // still need their old data copied until the filter is gone.
  void rearm() {
    if (state_ == state::finished || state_ == state::cancelled) state_ = state::paused;
  }
  bool pausing() const { return state_ == state::pausing; }
  bool stopping() const { return state_ == state::stopping; }  // a report drains
  // State for the job.
  bool running() const { return state_ == state::running; }
  bool paused() const { return state_ == state::paused || state_ == state::pausing; }
  size_t in_flight() const { return ops_busy_; }
  int64_t in_flight_bytes() const { return bytes_in_flight_; }
  // Bytes still to copy: dirty chunks plus what is in flight (the job's remaining progress).
  int64_t remaining() const { return map_.dirty_bytes() + bytes_in_flight_; }
  bool idle() const { return map_.dirty_granules() == 0 && ops_busy_ == 0; }
  // Figures for tests and the benchmark.
  int64_t buffer_bytes_peak() const { return buf_peak_; }
  int64_t buffer_bytes_in_use() const { return buf_used_; }
  size_t in_flight_peak() const { return ops_peak_; }
  int64_t largest_request() const { return largest_req_; }

 private:
  struct op;
  struct now_waiter;
  struct timer;
  enum class state : uint8_t { created, running, pausing, paused, stopping, cancelling, finished, cancelled };

  struct scanner;

  // Scheduling.
  void pump();  // starts what may start now (never completes anything)
  bool start_one(int64_t from, int64_t limit, bool priority, now_waiter* w);
  int64_t next_start(int64_t from, int64_t limit) const;  // first chunk dirty and not busy, or -1
  bool terminal_or_stopping() const;
  void arm_timer(int64_t ns);
  void timer_fired();
  void after_change();  // schedules notify() on a later turn
  void notify();        // copy_now answers, paused / finished / cancelled / idle callbacks
  void check_waiters();
  void defer(std::function<void()> fn);
  int64_t now() const;

  // Chunk state beside the work map: in flight (one operation at a time per chunk); 1 = a copy
  // operation, 2 = a locked guest write (lock_range).
  bool busy(int64_t chunk) const { return busy_[size_t(chunk)]; }
  struct lock_waiter {
    int64_t lo = 0, hi = 0;  // chunk indexes
    std::function<void()> granted;
  };
  void chunk_span(int64_t offset, int64_t length, int64_t& lo, int64_t& hi) const;
  bool span_free(int64_t lo, int64_t hi) const;
  void grant_locks();
  void set_busy(int64_t first, int64_t count, bool v);

  // Buffers: one arena of buf_size bytes, carved in slots of `slot_` bytes.
  bool take_slots(int64_t want_slots, int64_t& first, int64_t& got);
  void give_slots(int64_t first, int64_t count);

  // Operations.
  op* get_op();
  void put_op(op* o);
  static uint32_t ctl(const op& o);
  void op_step(op& o);  // next extent of an operation: its block status, or the end
  void run_action(op& o, copy_action act);
  void op_io_done(op& o);
  void op_done(op& o);
  void op_failed(op& o, bool is_read, int err, int64_t failed_len);
  void scan_step(scanner& sc, bool first);
  void scan_end(int res);

  copy_settings s_;
  bool partial_policy_ = false;  // set_policy gave a policy of its own
  copy_callbacks cb_;
  dirty_bitmap map_;
  int64_t chunks_ = 0;
  std::vector<uint8_t> busy_;
  state state_ = state::created;
  rate_limit limit_;
  bool timer_armed_ = false;
  timer* timer_ = nullptr;
  int64_t cursor_ = 0;  // background order: ascending from here, then around
  int finish_err_ = 0;

  int64_t align_ = 4096, slot_ = 4096, slots_ = 0;
  std::vector<uint8_t> slot_used_;
  std::unique_ptr<char, void (*)(void*)> arena_{nullptr, nullptr};
  int64_t buf_used_ = 0, buf_peak_ = 0;

  std::vector<std::unique_ptr<op>> ops_;  // every operation object made (reused)
  std::vector<op*> free_ops_;
  size_t ops_busy_ = 0, ops_peak_ = 0;
  int64_t bytes_in_flight_ = 0, largest_req_ = 0;

  std::vector<std::unique_ptr<now_waiter>> waiters_;
  std::vector<lock_waiter> lock_waiters_;
  size_t locks_held_ = 0;
  std::unique_ptr<scanner> scanner_;
  bool notify_pending_ = false;
  bool was_idle_ = false;
  std::shared_ptr<bool> alive_ = std::make_shared<bool>(true);
};

}  // namespace blockd::block

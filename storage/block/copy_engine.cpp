// The block-copy engine: work map, chunk locks, buffer arena, rate limit and the per-operation state machine; home iothread only.
#include "storage/block/copy_engine.h"

#include <algorithm>
#include <cerrno>
#include <cstdlib>

#include "storage/block/node.h"
#include "storage/io/reactor.h"

namespace blockd::block {

// Error actions per job, as QEMU behaves (mirror.c, backup.c/block-copy.c, stream.c, commit.c):
//   on-error   mirror         backup         stream             commit
//   report     report         report         report             report
//   ignore     retry          retry          skip (job fails    retry
//                                            with it at the end)
//   stop       stop           stop           stop               stop
//   enospc     stop if ENOSPC, else report (block_job_error_action), for every job
// Mirror and backup put a failed range back into their dirty bitmap whatever the action, which is
// what retry/stop/report do here; only stream's ignore moves past the range.

copy_policy copy_policy_full() {
  return [](const copy_extent& e) { return (e.status & bs_zero) ? copy_action::zero : copy_action::copy; };
}

copy_policy copy_policy_top() {
  return [](const copy_extent& e) {
    if (e.depth != 1) return copy_action::skip;
    return (e.status & bs_zero) ? copy_action::zero : copy_action::copy;
  };
}

copy_policy copy_policy_above(int n, bool skip_top) {
  return [n, skip_top](const copy_extent& e) {
    if (e.depth < 1 || e.depth > n || (skip_top && e.depth == 1)) return copy_action::skip;
    return (e.status & bs_zero) ? copy_action::zero : copy_action::copy;
  };
}

// One operation: a run of chunks, worked through extent by extent (block status, then copy, zero
// or skip of what that status covers). Reused from a free list.
struct copy_engine::op final : io_waiter {
  enum class phase : uint8_t { status, read, write, zero, discard };
  copy_engine* e = nullptr;
  io_request req;
  int64_t off = 0, len = 0, pos = 0, sub = 0;
  int64_t slot_first = 0, slot_count = 0;
  char* buf = nullptr;
  phase ph = phase::status;
  bool priority = false;
  bool urgent = false;  // a copy_now waits for it
  bool in_use = false;
  now_waiter* owner = nullptr;
  void io_done(io_request&) override { e->op_io_done(*this); }
};

// A copy_now() call waiting for its range.
struct copy_engine::now_waiter {
  int64_t off = 0, end = 0;
  std::function<void(int)> done;
  int own_ops = 0;
  int err = 0;
};

// The real clock's timer: a reactor timeout that outlives the engine if it must (the engine
// clears `e` when it goes first).
struct copy_engine::timer final : io::completion {
  copy_engine* e = nullptr;
  void complete(int) override {
    if (e) {
      e->timer_ = nullptr;
      e->timer_fired();
    }
    delete this;
  }
};

// The allocation scan (scan()): block status from 0 to the end, one extent at a time.
struct copy_engine::scanner final : io_waiter {
  copy_engine* e = nullptr;
  io_request req;
  int64_t pos = 0;
  std::function<void(int)> done;
  bool in_flight = false;
  void io_done(io_request&) override {
    in_flight = false;
    // An engine destroyed with this request out left the scanner to free itself here.
    if (!e) return delete this;
    e->scan_step(*this, false);
  }
};

copy_engine::copy_engine(copy_settings s, copy_callbacks cb)
    : s_(std::move(s)), cb_(std::move(cb)), map_("", uint64_t(s_.granularity), s_.source->length()) {
  if (!s_.policy) s_.policy = copy_policy_full();
  chunks_ = int64_t(map_.bits());
  busy_.assign(size_t(chunks_), 0);
  const int64_t g = s_.granularity;
  // Buffers go to O_DIRECT files as they are: aligned to the strictest node and at least a page.
  int64_t align = 4096;
  int64_t max_xfer = 0;
  for (node* n : {s_.source, s_.target}) {
    if (!n) continue;
    auto l = n->driver().limits();
    align = std::max<int64_t>(align, l.request_alignment);
    if (l.max_transfer > 0) max_xfer = max_xfer ? std::min(max_xfer, l.max_transfer) : l.max_transfer;
  }
  align_ = align;
  slot_ = std::max(g, align);
  // buf_size bounds everything: at least one slot (one chunk), and no request larger than it.
  s_.buf_size = std::max(s_.buf_size / slot_ * slot_, slot_);
  int64_t mc = std::min(s_.max_chunk, s_.buf_size);
  if (max_xfer > 0) mc = std::min(mc, max_xfer);
  s_.max_chunk = std::max(g, mc / g * g);
  slots_ = s_.buf_size / slot_;
  slot_used_.assign(size_t(slots_), 0);
  if (s_.max_workers < 1) s_.max_workers = 1;
  limit_.set_speed(s_.speed);
}

copy_engine::~copy_engine() {
  *alive_ = false;
  if (timer_) {
    timer_->e = nullptr;
    s_.source->env().reactor->cancel(timer_);
  }
  if (scanner_) {
    // A scan still running is a caller's bug, but not a crash: its request is out on the source, so the
    // scanner outlives us and frees itself when that completes.
    scanner_->e = nullptr;
    if (scanner_->in_flight) (void)scanner_.release();
  }
}

int64_t copy_engine::now() const { return s_.clock.now ? s_.clock.now() : node::now_ns(); }

void copy_engine::defer(std::function<void()> fn) {
  std::weak_ptr<bool> alive = alive_;
  s_.source->env().defer([alive, fn = std::move(fn)] {
    if (auto a = alive.lock(); a && *a) fn();
  });
}

// ---- public control --------------------------------------------------------------------------

void copy_engine::start() {
  if (state_ != state::created) return;
  state_ = state::running;
  pump();
  after_change();
}

void copy_engine::mark_dirty(int64_t offset, int64_t length) {
  map_.set(offset, length);
  was_idle_ = false;
  pump();
}

// ---- locked guest writes (active mirror) ----------------------------------------------------

void copy_engine::chunk_span(int64_t offset, int64_t length, int64_t& lo, int64_t& hi) const {
  const int64_t g = s_.granularity;
  int64_t size = s_.source->length();
  int64_t off = std::clamp<int64_t>(offset, 0, size);
  int64_t end = std::clamp<int64_t>(offset + std::max<int64_t>(length, 0), off, size);
  lo = off / g;
  hi = std::min<int64_t>((end + g - 1) / g, chunks_);
  if (hi <= lo && lo < chunks_) hi = lo + 1;  // an empty write at offset still orders with its chunk
}

bool copy_engine::span_free(int64_t lo, int64_t hi) const {
  return std::none_of(busy_.begin() + lo, busy_.begin() + hi, [](uint8_t b) { return b != 0; });
}

bool copy_engine::lock_range(int64_t offset, int64_t length, std::function<void()> granted) {
  int64_t lo, hi;
  chunk_span(offset, length, lo, hi);
  // A waiting lock on the same chunks goes first: two guest writes to one chunk reach the target
  // in the order they got here.
  bool queued_before = std::any_of(lock_waiters_.begin(), lock_waiters_.end(),
                                   [&](const lock_waiter& w) { return w.lo < hi && lo < w.hi; });
  if (!queued_before && span_free(lo, hi)) {
    std::fill(busy_.begin() + lo, busy_.begin() + hi, uint8_t(2));
    ++locks_held_;
    return true;
  }
  // The copies it waits for must finish even while the source is drained: the drain waits for this
  // guest write (as with copy_now).
  const int64_t g = s_.granularity;
  for (auto& o : ops_)
    if (o->in_use && o->off < hi * g && lo * g < o->off + o->len) o->urgent = true;
  lock_waiters_.push_back(lock_waiter{lo, hi, std::move(granted)});
  return false;
}

void copy_engine::grant_locks() {
  if (lock_waiters_.empty()) return;
  std::vector<std::function<void()>> go;
  std::vector<std::pair<int64_t, int64_t>> passed;  // spans of waiters left waiting (later ones queue behind them)
  for (size_t i = 0; i < lock_waiters_.size();) {
    lock_waiter& w = lock_waiters_[i];
    bool behind = std::any_of(passed.begin(), passed.end(), [&](auto& p) { return p.first < w.hi && w.lo < p.second; });
    if (behind || !span_free(w.lo, w.hi)) {
      passed.emplace_back(w.lo, w.hi);
      ++i;
      continue;
    }
    std::fill(busy_.begin() + w.lo, busy_.begin() + w.hi, uint8_t(2));
    ++locks_held_;
    go.push_back(std::move(w.granted));
    lock_waiters_.erase(lock_waiters_.begin() + ptrdiff_t(i));
  }
  for (auto& fn : go) fn();
}

void copy_engine::unlock_range(int64_t offset, int64_t length, bool synced) {
  const int64_t g = s_.granularity;
  int64_t lo, hi;
  chunk_span(offset, length, lo, hi);
  std::fill(busy_.begin() + lo, busy_.begin() + hi, uint8_t(0));
  if (locks_held_) --locks_held_;
  if (synced) {
    map_.reset(offset, length);  // whole chunks the write covered hold the same bytes on both sides now
  } else if (hi > lo) {
    map_.set(lo * g, std::min(hi * g, s_.source->length()) - lo * g);
    was_idle_ = false;
  }
  grant_locks();
  pump();
  after_change();
}

void copy_engine::external_error(copy_error_action a, int err) {
  if (a == copy_error_action::stop && state_ == state::running) {
    state_ = state::pausing;
    after_change();
  } else if (a == copy_error_action::report && !terminal_or_stopping()) {
    if (!finish_err_) finish_err_ = -err;
    state_ = state::stopping;
    after_change();
  }
}

void copy_engine::set_speed(uint64_t bytes_per_sec) {
  s_.speed = bytes_per_sec;
  limit_.set_speed(bytes_per_sec);
  // A sleep armed for the old speed is kept; pump() now decides with the new quota. A faster
  // speed starts at once rather than after the old sleep.
  pump();
}

void copy_engine::set_max_chunk(int64_t bytes) {
  const int64_t g = s_.granularity;
  // Only ever lower: the constructor's value already respects the buffer and the nodes' max transfer.
  if (bytes <= 0) return;
  s_.max_chunk = std::max(g, std::min(bytes, s_.max_chunk) / g * g);
}

void copy_engine::pause() {
  if (state_ != state::running) return;
  state_ = state::pausing;
  after_change();
}

void copy_engine::resume() {
  if (state_ != state::pausing && state_ != state::paused) return;
  state_ = state::running;
  was_idle_ = false;
  pump();
  after_change();
}

void copy_engine::cancel() {
  if (state_ == state::cancelling || state_ == state::cancelled) return;
  // From any state (a finished engine too): on_cancelled follows once nothing is in flight.
  state_ = state::cancelling;
  after_change();
}

void copy_engine::copy_now(int64_t offset, int64_t length, std::function<void(int)> done) {
  auto w = std::make_unique<now_waiter>();
  int64_t size = s_.source->length();
  w->off = std::clamp<int64_t>(offset, 0, size);
  w->end = std::clamp<int64_t>(offset + std::max<int64_t>(length, 0), w->off, size);
  w->done = std::move(done);
  for (auto& o : ops_)
    if (o->in_use && o->off < w->end && w->off < o->off + o->len) o->urgent = true;
  waiters_.push_back(std::move(w));
  pump();
  after_change();  // a range with nothing to copy is answered on a later turn
}

// ---- scheduling ------------------------------------------------------------------------------

bool copy_engine::terminal_or_stopping() const {
  return state_ == state::stopping || state_ == state::cancelling || state_ == state::finished ||
         state_ == state::cancelled;
}

int64_t copy_engine::next_start(int64_t from, int64_t limit) const {
  const int64_t g = s_.granularity;
  int64_t pos = from * g;
  while (from < limit) {
    int64_t d = map_.next_dirty(pos);
    if (d < 0) return -1;
    int64_t c = d / g;
    if (c >= limit) return -1;
    if (!busy(c)) return c;
    from = c + 1;
    pos = from * g;
  }
  return -1;
}

void copy_engine::set_busy(int64_t first, int64_t count, bool v) {
  std::fill(busy_.begin() + first, busy_.begin() + first + count, uint8_t(v));
}

bool copy_engine::take_slots(int64_t want, int64_t& first, int64_t& got) {
  // First fit of `want` free slots; failing that, the longest free run (the operation shrinks).
  int64_t best = -1, best_len = 0;
  for (int64_t i = 0; i < slots_;) {
    if (slot_used_[size_t(i)]) {
      ++i;
      continue;
    }
    int64_t j = i;
    while (j < slots_ && !slot_used_[size_t(j)] && j - i < want) ++j;
    if (j - i == want) {
      best = i;
      best_len = want;
      break;
    }
    if (j - i > best_len) {
      best = i;
      best_len = j - i;
    }
    i = j;
  }
  if (best < 0) return false;
  if (!arena_) {
    // Allocated once, on first use; its pages are touched only as operations use them.
    void* p = std::aligned_alloc(size_t(align_), size_t(s_.buf_size));
    if (!p) return false;
    arena_ = std::unique_ptr<char, void (*)(void*)>(static_cast<char*>(p), std::free);
  }
  first = best;
  got = best_len;
  std::fill(slot_used_.begin() + first, slot_used_.begin() + first + got, uint8_t(1));
  buf_used_ += got * slot_;
  buf_peak_ = std::max(buf_peak_, buf_used_);
  return true;
}

void copy_engine::give_slots(int64_t first, int64_t count) {
  std::fill(slot_used_.begin() + first, slot_used_.begin() + first + count, uint8_t(0));
  buf_used_ -= count * slot_;
}

copy_engine::op* copy_engine::get_op() {
  if (free_ops_.empty()) {
    ops_.push_back(std::make_unique<op>());
    ops_.back()->e = this;
    free_ops_.push_back(ops_.back().get());
  }
  op* o = free_ops_.back();
  free_ops_.pop_back();
  return o;
}

void copy_engine::put_op(op* o) { free_ops_.push_back(o); }

// Starts one operation on the first startable chunk in [from, limit) (chunk indexes): false when
// there is none, or no buffer is free.
bool copy_engine::start_one(int64_t from, int64_t limit, bool priority, now_waiter* w) {
  const int64_t g = s_.granularity;
  int64_t c = next_start(from, limit);
  if (c < 0) return false;
  int64_t max_chunks = s_.max_chunk / g;
  int64_t n = 1;
  // Consecutive dirty, idle chunks merge into one request. A copy_now run stays in its range: a
  // guest write waits on it, and copy-before-write must not fill its target with chunks nobody
  // overwrote (sync=none fleecing keeps only what the guest changed).
  const int64_t end_chunk = priority ? std::min(limit, chunks_) : chunks_;
  while (n < max_chunks && c + n < end_chunk && !busy(c + n) && map_.get((c + n) * g)) ++n;
  int64_t size = s_.source->length();
  int64_t off = c * g;
  int64_t len = std::min(n * g, size - off);
  int64_t first = 0, got = 0;
  if (!take_slots((len + slot_ - 1) / slot_, first, got)) return false;
  if (got * slot_ < len) {  // shrunk to the free run
    n = std::max<int64_t>(1, got * slot_ / g);
    len = std::min(n * g, size - off);
  }
  map_.reset(off, len);  // clear when the copy starts: a write from now on dirties it again
  set_busy(c, n, true);
  op* o = get_op();
  o->off = o->pos = off;
  o->len = len;
  o->sub = 0;
  o->slot_first = first;
  o->slot_count = got;
  o->buf = arena_.get() + first * slot_;
  o->priority = priority;
  o->urgent = false;
  o->in_use = true;
  o->owner = w;
  if (w) ++w->own_ops;
  ++ops_busy_;
  ops_peak_ = std::max(ops_peak_, ops_busy_);
  bytes_in_flight_ += len;
  was_idle_ = false;
  // Charged in advance (many operations start before any block status is back); what turns out
  // not to count is refunded once known.
  if (!priority && limit_.speed()) limit_.dispatched(uint64_t(len));
  if (!priority) cursor_ = c + n < chunks_ ? c + n : 0;
  op_step(*o);
  return true;
}

void copy_engine::pump() {
  if (state_ == state::cancelled || state_ == state::finished) return;
  // copy_now first (before start() too: copy-before-write may be asked before the job runs), in arrival order: a guest write waits on it.
  // A report's drain (stopping) still serves them: a copy-before-write filter's guest writes must not
  // fail because its backup job's background copy failed.
  if (state_ != state::cancelling) {
    const int64_t g = s_.granularity;
    for (size_t i = 0; i < waiters_.size(); ++i) {
      now_waiter* w = waiters_[i].get();
      int64_t lo = w->off / g, hi = (w->end + g - 1) / g;
      while (true) {
        if (start_one(lo, hi, true, w)) continue;
        if (next_start(lo, hi) >= 0) return;  // no buffer: the background waits too
        break;
      }
    }
  }
  if (state_ != state::running) return;
  while (ops_busy_ < size_t(s_.max_workers)) {
    if (limit_.speed()) {
      int64_t d = limit_.delay(now());
      if (d > 0) {
        arm_timer(d);
        return;
      }
    }
    if (!start_one(cursor_, chunks_, false, nullptr) && !(cursor_ > 0 && start_one(0, cursor_, false, nullptr)))
      return;
  }
}

void copy_engine::arm_timer(int64_t ns) {
  if (timer_armed_) return;
  timer_armed_ = true;
  if (cb_.on_sleep) cb_.on_sleep(true);
  if (s_.clock.sleep) {
    std::weak_ptr<bool> alive = alive_;
    s_.clock.sleep(ns, [this, alive] {
      if (auto a = alive.lock(); a && *a) timer_fired();
    });
    return;
  }
  timer_ = new timer;
  timer_->e = this;
  s_.source->env().reactor->timeout(uint64_t(ns), timer_);
}

void copy_engine::timer_fired() {
  timer_armed_ = false;
  if (cb_.on_sleep) cb_.on_sleep(false);
  pump();
  after_change();
}

// Notifications run on a later turn, never inside the call that caused them.
void copy_engine::after_change() {
  if (notify_pending_) return;
  notify_pending_ = true;
  defer([this] {
    notify_pending_ = false;
    notify();
  });
}

void copy_engine::notify() {
  check_waiters();
  if (ops_busy_ == 0) {
    switch (state_) {
      case state::pausing:
        state_ = state::paused;
        if (cb_.on_paused) cb_.on_paused();
        return;
      case state::stopping:
        state_ = state::finished;
        check_waiters();
        if (cb_.on_finished) cb_.on_finished(finish_err_);
        return;
      case state::cancelling:
        state_ = state::cancelled;
        check_waiters();
        if (cb_.on_cancelled) cb_.on_cancelled();
        return;
      default:
        break;
    }
  }
  if (state_ == state::running && idle() && !was_idle_) {
    was_idle_ = true;
    if (cb_.on_idle) cb_.on_idle();
  }
}

// Answers every copy_now whose range is settled: all its chunks clean and idle (0), one of its own
// copies failed (-errno), or the engine stopped with some still dirty (-ECANCELED).
void copy_engine::check_waiters() {
  const int64_t g = s_.granularity;
  std::vector<std::pair<std::function<void(int)>, int>> ready;
  for (size_t i = 0; i < waiters_.size();) {
    now_waiter* w = waiters_[i].get();
    int res = 1;  // 1 = still waiting
    if (w->own_ops == 0) {
      int64_t lo = w->off / g, hi = (w->end + g - 1) / g;
      bool any_busy = std::any_of(busy_.begin() + lo, busy_.begin() + hi, [](uint8_t b) { return b != 0; });
      int64_t d = w->end > w->off ? map_.next_dirty(w->off) : -1;
      bool any_dirty = d >= 0 && d < w->end;
      if (w->err)
        res = w->err;
      else if (!any_busy && !any_dirty)
        res = 0;
      else if (!any_busy && terminal_or_stopping() && state_ != state::stopping)
        res = -ECANCELED;
    }
    if (res == 1) {
      ++i;
      continue;
    }
    ready.emplace_back(std::move(w->done), res);
    waiters_.erase(waiters_.begin() + ptrdiff_t(i));
  }
  for (auto& [fn, res] : ready)
    if (fn) fn(res);
}

// ---- operations ------------------------------------------------------------------------------

void copy_engine::op_step(op& o) {
  const int64_t end = o.off + o.len;
  if (o.pos >= end) return op_done(o);
  if (!o.priority && state_ != state::running) {
    // Pausing or stopping: what this operation has not reached yet waits, dirty, so the drain is quick.
    map_.set(o.pos, end - o.pos);
    return op_done(o);
  }
  o.req.reset();
  o.req.waiter = &o;
  o.req.flags = ctl(o);
  if (s_.block_status) {
    o.ph = op::phase::status;
    o.req.op = io_op::block_status;
    o.req.offset = o.pos;
    o.req.length = end - o.pos;
    s_.source->submit(o.req);
    return;
  }
  o.sub = end - o.pos;
  run_action(o, copy_action::copy);
}

// copy_now's requests bypass a quiesce of either node (io_control): copy-before-write holds a
// guest write, which a drain waits for, until they are done, so holding them would deadlock.
// A background operation a copy_now waits for is urgent from then on, for the same reason.
// Other requests wait out a quiesce (a job pauses the engine while its nodes are drained).
uint32_t copy_engine::ctl(const op& o) { return o.priority || o.urgent ? uint32_t(io_control) : 0u; }

// Status known for [o.pos, o.pos + o.sub): copy, zero or skip it.
void copy_engine::run_action(op& o, copy_action act) {
  if (act == copy_action::zero && s_.mode == copy_mode::copy_up) act = copy_action::copy;  // the top must hold the zeroes
  if (act == copy_action::zero && s_.target_zeroed) act = copy_action::skip;
  bool charged = act == copy_action::copy || (act == copy_action::zero && s_.zeroes_charged);
  if (!charged && !o.priority && limit_.speed()) {
    limit_.refund(uint64_t(o.sub));
    pump();  // the refund may let more start now (zero ranges of a mirror are not limited)
  }
  o.req.reset();
  o.req.waiter = &o;
  o.req.flags = ctl(o);
  o.req.offset = o.pos;
  switch (act) {
    case copy_action::skip:
      if (cb_.on_progress) cb_.on_progress(0, o.sub);
      o.pos += o.sub;
      return op_step(o);
    case copy_action::zero:
      o.ph = op::phase::zero;
      o.req.op = io_op::write_zeroes;
      o.req.length = o.sub;
      if (s_.may_unmap) o.req.flags |= io_may_unmap;
      s_.target->submit(o.req);
      return;
    case copy_action::copy:
      o.ph = op::phase::read;
      o.req.op = io_op::read;
      o.req.set_buffer(o.buf + (o.pos - o.off), o.sub);
      if (s_.mode == copy_mode::copy_up) o.req.flags |= io_copy_up;
      largest_req_ = std::max(largest_req_, o.sub);
      s_.source->submit(o.req);
      return;
  }
}

void copy_engine::op_io_done(op& o) {
  const int64_t g = s_.granularity;
  const int64_t end = o.off + o.len;
  int res = o.req.result;
  switch (o.ph) {
    case op::phase::status: {
      if (res < 0) return op_failed(o, true, -res, end - o.pos);
      int64_t n = o.req.status_length > 0 ? std::min(o.req.status_length, end - o.pos) : end - o.pos;
      copy_extent x{o.pos, n, o.req.status, o.req.depth};
      copy_action act;
      if (o.pos + n < end && n < g) {
        // Mixed within one chunk: copied as data (safe for every policy: it is what the source reads).
        x.length = n = std::min(g, end - o.pos);
        act = copy_action::copy;
      } else {
        if (o.pos + n < end) x.length = n = n / g * g;  // whole chunks; the rest gets its own status
        act = s_.policy(x);
      }
      o.sub = n;
      return run_action(o, act);
    }
    case op::phase::read:
      if (res < 0) return op_failed(o, true, -res, o.sub);
      if (s_.mode == copy_mode::copy_up) break;
      o.ph = op::phase::write;
      o.req.reset();
      o.req.waiter = &o;
      o.req.flags = ctl(o);
      o.req.op = io_op::write;
      o.req.offset = o.pos;
      o.req.set_buffer(o.buf + (o.pos - o.off), o.sub);
      if (s_.mode == copy_mode::compress) o.req.flags |= io_compress;
      s_.target->submit(o.req);
      return;
    case op::phase::write:
    case op::phase::zero:
      if (res < 0) return op_failed(o, false, -res, o.sub);
      if (s_.discard_source) {
        // backup discard-source: what is on the target now may go from the source (a fleecing
        // image, through its snapshot-access view). Its failure is no copy error: the data is safe.
        o.ph = op::phase::discard;
        o.req.reset();
        o.req.waiter = &o;
        o.req.flags = ctl(o);
        o.req.op = io_op::discard;
        o.req.offset = o.pos;
        o.req.length = o.sub;
        s_.source->submit(o.req);
        return;
      }
      break;
    case op::phase::discard:
      break;
  }
  if (cb_.on_progress) cb_.on_progress(o.sub, 0);
  o.pos += o.sub;
  op_step(o);
}

void copy_engine::op_failed(op& o, bool is_read, int err, int64_t failed_len) {
  const int64_t end = o.off + o.len;
  copy_error e{o.pos, failed_len, is_read, err};
  // What this operation had not reached yet is simply still to copy.
  if (o.pos + failed_len < end) map_.set(o.pos + failed_len, end - o.pos - failed_len);
  if (o.owner) {
    // copy_now's own copy: its caller hears of it; the range stays dirty for the background.
    map_.set(e.offset, e.length);
    if (!o.owner->err) o.owner->err = -err;
    return op_done(o);
  }
  copy_error_action a = cb_.on_error ? cb_.on_error(e) : copy_error_action::report;
  if (a == copy_error_action::skip) {
    if (cb_.on_progress) cb_.on_progress(e.length, 0);
  } else {
    map_.set(e.offset, e.length);
  }
  if (a == copy_error_action::stop && state_ == state::running) {
    state_ = state::pausing;
    after_change();
  } else if (a == copy_error_action::report && !terminal_or_stopping()) {
    if (!finish_err_) finish_err_ = -err;
    state_ = state::stopping;
    after_change();
  }
  op_done(o);
}

void copy_engine::op_done(op& o) {
  const int64_t g = s_.granularity;
  set_busy(o.off / g, (o.len + g - 1) / g, false);
  give_slots(o.slot_first, o.slot_count);
  --ops_busy_;
  bytes_in_flight_ -= o.len;
  if (o.owner) --o.owner->own_ops;
  o.owner = nullptr;
  o.in_use = false;
  put_op(&o);
  grant_locks();  // before pump(): a guest write waiting for these chunks goes ahead of a new copy
  check_waiters();
  pump();
  after_change();
}

// ---- allocation scan -------------------------------------------------------------------------

void copy_engine::scan(std::function<void(int)> done) {
  scanner_ = std::make_unique<scanner>();
  scanner_->e = this;
  scanner_->done = std::move(done);
  scan_step(*scanner_, true);
}

void copy_engine::scan_step(scanner& sc, bool first) {
  int64_t size = s_.source->length();
  if (!first) {
    if (sc.req.result < 0) return scan_end(sc.req.result);
    int64_t n = sc.req.status_length > 0 ? std::min(sc.req.status_length, size - sc.pos) : size - sc.pos;
    copy_action act = s_.policy(copy_extent{sc.pos, n, sc.req.status, sc.req.depth});
    if (act == copy_action::zero && s_.target_zeroed && s_.mode != copy_mode::copy_up) act = copy_action::skip;
    if (act != copy_action::skip) map_.set(sc.pos, n);  // a partly covered chunk becomes dirty as a whole
    sc.pos += n;
  }
  if (sc.pos >= size) {
    if (first) return defer([this] { scan_end(0); });
    return scan_end(0);
  }
  sc.req.reset();
  sc.req.waiter = &sc;
  sc.req.op = io_op::block_status;
  sc.req.offset = sc.pos;
  sc.req.length = size - sc.pos;
  sc.in_flight = true;
  s_.source->submit(sc.req);
}

void copy_engine::scan_end(int res) {
  auto done = std::move(scanner_->done);
  // The scanner is freed on a later turn: this may run inside its own io_done.
  std::shared_ptr<scanner> keep(scanner_.release());
  s_.source->env().defer([keep] {});
  if (done) done(res);
}

}  // namespace blockd::block

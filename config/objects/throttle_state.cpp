// The shared state of a throttle group: QEMU's leaky buckets and throttle-groups.c's round-robin turn between members; any thread (one mutex).
#include <algorithm>
#include <cmath>

#include "config/objects/throttle_group.h"

namespace blockd::qom {
namespace {

using k = throttle_bucket;
constexpr double ns_per_s = 1e9;

// The buckets a request of one direction touches: total plus its own, for bytes and for operations.
std::array<k, 4> touched(bool is_write) {
  return {k::bps_total, is_write ? k::bps_write : k::bps_read, k::iops_total, is_write ? k::iops_write : k::iops_read};
}
bool is_bytes(k t) { return t <= k::bps_write; }

}  // namespace

throttle_config throttle_state::config() const {
  std::lock_guard g(mu_);
  return cfg_;
}

void throttle_state::set_config(const throttle_config& c) {
  std::lock_guard g(mu_);
  cfg_ = c;
  level_.fill({});  // QEMU's throttle_config restarts the buckets
  // Waiting requests re-evaluate against the new limits: every member with a queue gets its turn
  // (QEMU's throttle_group_restart_tgm); the timers armed for the old limits are superseded.
  for (bool w : {false, true}) {
    timer_armed_[w] = false;
    for (throttle_member* m : members_)
      if (m->pending_[w]) m->schedule_wake(w, 0);
  }
}

void throttle_state::attach(throttle_member* m) {
  std::lock_guard g(mu_);
  members_.push_back(m);
}

void throttle_state::detach(throttle_member* m) {
  std::lock_guard g(mu_);
  auto it = std::find(members_.begin(), members_.end(), m);
  if (it == members_.end()) return;
  for (bool w : {false, true}) {
    if (tokens_[w] != m) continue;
    // The member held the turn (and maybe the group's timer): it passes to the next one waiting.
    throttle_member* next = members_.size() > 1 ? next_token(m, w) : nullptr;
    tokens_[w] = next == m ? nullptr : next;
    if (timer_armed_[w]) {
      timer_armed_[w] = false;
      if (tokens_[w] && tokens_[w]->pending_[w] && !schedule_timer(tokens_[w], w, last_ns_))
        tokens_[w]->schedule_wake(w, 0);
    }
  }
  members_.erase(std::find(members_.begin(), members_.end(), m));
}

void throttle_state::leak(uint64_t now_ns) {
  if (!started_) {
    started_ = true;
    last_ns_ = now_ns;
    return;
  }
  if (now_ns <= last_ns_) return;
  double delta = static_cast<double>(now_ns - last_ns_);
  last_ns_ = now_ns;
  for (size_t i = 0; i < throttle_buckets; ++i) {
    auto& l = cfg_.b[i];
    auto& b = level_[i];
    b.level = std::max(0.0, b.level - static_cast<double>(l.avg) * delta / ns_per_s);
    if (l.burst_length > 1) b.burst_level = std::max(0.0, b.burst_level - static_cast<double>(l.max) * delta / ns_per_s);
  }
}

// QEMU's throttle_compute_wait over the direction's buckets: a request may start while a bucket is
// not over its size (it may then overfill it); the size is avg/10 without a burst rate, else
// max*burst_length, and a burst longer than a second is also held to `max` by a bucket of max/10.
uint64_t throttle_state::compute_wait(bool is_write) const {
  double wait = 0;
  for (k t : touched(is_write)) {
    auto& l = cfg_[t];
    if (!l.avg) continue;
    auto& b = level_[static_cast<size_t>(t)];
    double size = l.max ? static_cast<double>(l.max) * static_cast<double>(l.burst_length) : l.avg / 10.0;
    double extra = b.level - size;
    if (extra > 0) {
      wait = std::max(wait, extra * ns_per_s / static_cast<double>(l.avg));
      continue;
    }
    if (l.burst_length > 1) {
      extra = b.burst_level - static_cast<double>(l.max) / 10.0;
      if (extra > 0) wait = std::max(wait, extra * ns_per_s / static_cast<double>(l.max));
    }
  }
  return wait > 0 ? std::max<uint64_t>(1, static_cast<uint64_t>(wait)) : 0;
}

void throttle_state::account(bool is_write, uint64_t bytes) {
  // iops-size: a larger request counts as bytes/iops-size operations (a fraction, as in QEMU).
  double ops = cfg_.op_size > 0 && bytes > static_cast<uint64_t>(cfg_.op_size)
                   ? static_cast<double>(bytes) / static_cast<double>(cfg_.op_size)
                   : 1.0;
  for (k t : touched(is_write)) {
    auto& l = cfg_[t];
    if (!l.avg) continue;
    double units = is_bytes(t) ? static_cast<double>(bytes) : ops;
    auto& b = level_[static_cast<size_t>(t)];
    b.level += units;
    if (l.burst_length > 1) b.burst_level += units;
  }
}

// QEMU's next_throttle_token: after the member holding the turn, the next one (round robin) with
// queued requests; `m` itself when nobody else waits.
throttle_member* throttle_state::next_token(throttle_member* m, bool w) const {
  throttle_member* start = tokens_[w];
  auto it = std::find(members_.begin(), members_.end(), start);
  if (!start || it == members_.end()) return m;
  size_t i = static_cast<size_t>(it - members_.begin());
  size_t n = members_.size();
  for (size_t step = 1; step <= n; ++step) {
    throttle_member* c = members_[(i + step) % n];
    if (c->pending_[w]) return c;
  }
  return m;
}

// QEMU's throttle_group_schedule_timer: whether `m` must wait; if so, it takes the group's timer.
bool throttle_state::schedule_timer(throttle_member* m, bool w, uint64_t now_ns) {
  if (timer_armed_[w]) return true;
  uint64_t wait = compute_wait(w);
  if (!wait) return false;
  tokens_[w] = m;
  timer_armed_[w] = true;
  m->schedule_wake(w, now_ns + wait);
  return true;
}

// QEMU's schedule_next_request: the turn goes to the next member with queued requests, woken at once
// when the limits allow, else through its timer.
void throttle_state::schedule_next(throttle_member* m, bool w, uint64_t now_ns) {
  throttle_member* token = next_token(m, w);
  if (!token->pending_[w]) return;
  if (!schedule_timer(token, w, now_ns)) {
    // Woken on its own loop (never run here): it holds the timer until its wake-up runs.
    token->schedule_wake(w, 0);
    timer_armed_[w] = true;
    tokens_[w] = token;
  }
}

bool throttle_state::intercept(throttle_member* m, bool w, uint64_t bytes, uint64_t now_ns) {
  std::lock_guard g(mu_);
  leak(now_ns);
  throttle_member* token = next_token(m, w);
  bool must_wait = schedule_timer(token, w, now_ns);
  // FIFO: a request never overtakes one of its own direction already waiting.
  if (must_wait || m->pending_[w]) {
    ++m->pending_[w];
    return false;
  }
  account(w, bytes);
  schedule_next(m, w, now_ns);
  return true;
}

bool throttle_state::on_wake(throttle_member* m, bool w, bool has_head, uint64_t bytes, uint64_t now_ns) {
  std::lock_guard g(mu_);
  leak(now_ns);
  // The wake-up is the group's timer firing (QEMU's timer_cb): the group's timer is free again.
  timer_armed_[w] = false;
  if (!has_head || !m->pending_[w]) {
    schedule_next(m, w, now_ns);
    return false;
  }
  --m->pending_[w];
  account(w, bytes);
  schedule_next(m, w, now_ns);
  return true;
}

uint64_t throttle_state::reserve(bool is_write, uint64_t bytes, uint64_t now_ns) {
  std::lock_guard g(mu_);
  leak(now_ns);
  if (uint64_t wait = compute_wait(is_write)) return wait;
  account(is_write, bytes);
  return 0;
}

}  // namespace blockd::qom

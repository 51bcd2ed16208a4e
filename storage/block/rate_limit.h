// A block job's speed limit: QEMU's slice-based rate limit (bytes per slice, the excess pushes the next slice out); one thread at a time, no clock of its own.
#pragma once
#include <algorithm>
#include <cstdint>

namespace blockd::block {

// QEMU limits job speed in slices of 100 ms: each slice may dispatch speed * 100 ms bytes; once
// a slice is over its quota, the caller waits until the slice (stretched to cover the excess)
// ends, and accounting starts again. The caller passes its clock (monotonic ns), so tests drive
// it with a fake one. speed 0 = unlimited.
class rate_limit {
 public:
  static constexpr int64_t default_slice_ns = 100'000'000;

  void set_speed(uint64_t bytes_per_sec, int64_t slice_ns = default_slice_ns) {
    speed_ = bytes_per_sec;
    slice_ns_ = slice_ns;
    // At least one byte per slice, so a tiny speed still moves.
    quota_ = speed_ ? std::max<uint64_t>(uint64_t(double(speed_) * double(slice_ns_) / 1e9), 1) : 0;
  }
  uint64_t speed() const { return speed_; }
  uint64_t quota() const { return quota_; }
  int64_t slice_ns() const { return slice_ns_; }

  // How long to wait (ns) before dispatching more at `now`; 0 = go now.
  int64_t delay(int64_t now) {
    if (!quota_) return 0;
    if (now >= slice_end_) {  // the (possibly stretched) slice is over: a fresh one starts now
      slice_start_ = now;
      slice_end_ = now + slice_ns_;
      dispatched_ = 0;
    }
    if (dispatched_ < quota_) return 0;
    // Over quota: the slice is stretched to the time the bytes dispatched need at this speed
    // (fractions of a slice included, so the average rate is the speed exactly).
    double slices = double(dispatched_) / double(quota_);
    slice_end_ = slice_start_ + int64_t(slices * double(slice_ns_));
    return std::max<int64_t>(slice_end_ - now, 1);
  }
  // Accounts bytes just dispatched (after delay() said 0).
  void dispatched(uint64_t n) { dispatched_ += n; }
  // Gives back bytes charged in advance that turned out not to count (a skipped range).
  void refund(uint64_t n) { dispatched_ -= std::min(n, dispatched_); }

 private:
  uint64_t speed_ = 0, quota_ = 0, dispatched_ = 0;
  int64_t slice_ns_ = default_slice_ns;
  int64_t slice_start_ = 0, slice_end_ = 0;
};

}  // namespace blockd::block

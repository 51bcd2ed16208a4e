// A block job's speed limit (bytes per second over 100 ms slices, as QEMU's job ratelimit counts): plain arithmetic, one owner thread.
#pragma once
#include <cstdint>

namespace blockd::block {

// Work is admitted until the bytes of the current slice reach the slice's quota; the next piece
// then waits until the slice (stretched by how far the quota was overshot) is over. One large
// request may overshoot, but the average stays at the limit.
class rate_limit {
 public:
  static constexpr int64_t slice_ns = 100'000'000;
  void set_speed(int64_t bytes_per_s) {
    quota_ = bytes_per_s > 0 ? (bytes_per_s * slice_ns + 999'999'999) / 1'000'000'000 : 0;
    if (bytes_per_s > 0 && quota_ == 0) quota_ = 1;
  }
  bool limited() const { return quota_ > 0; }
  // Bytes just done (copied, not skipped), at monotonic time `now`.
  void account(int64_t bytes, int64_t now) {
    if (!quota_) return;
    roll(now);
    done_ += bytes;
    if (done_ >= quota_)
      end_ = start_ + int64_t(double(done_) / double(quota_) * double(slice_ns));
  }
  // How long the next piece of work must wait (0: go now).
  int64_t delay(int64_t now) {
    if (!quota_) return 0;
    roll(now);
    return done_ >= quota_ ? end_ - now : 0;
  }

 private:
  void roll(int64_t now) {
    if (end_ > now) return;
    start_ = now;
    end_ = now + slice_ns;
    done_ = 0;
  }
  int64_t quota_ = 0, start_ = 0, end_ = 0, done_ = 0;
};

}  // namespace blockd::block

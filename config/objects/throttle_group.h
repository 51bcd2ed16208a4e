// throttle-group objects: ThrottleLimits with QSD's validation, and a thread-safe leaky-bucket state that throttle filters on any iothread share; config on the model's thread, the state from any thread.
#pragma once
#include <array>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "config/qom/object.h"

namespace blockd::qom {

// QEMU's six buckets, in QEMU's order.
enum class throttle_bucket { bps_total, bps_read, bps_write, iops_total, iops_read, iops_write };
constexpr size_t throttle_buckets = 6;
constexpr int64_t throttle_value_max = 1000000000000000;  // QEMU's THROTTLE_VALUE_MAX

struct throttle_limit {
  int64_t avg = 0;           // units per second (0: unlimited)
  int64_t max = 0;           // burst rate (0: none)
  int64_t burst_length = 1;  // seconds the burst rate may last
};

struct throttle_config {
  std::array<throttle_limit, throttle_buckets> b{};
  int64_t op_size = 0;  // iops-size: an I/O counts as ceil(bytes / op_size) operations
  throttle_limit& operator[](throttle_bucket k) { return b[static_cast<size_t>(k)]; }
  const throttle_limit& operator[](throttle_bucket k) const { return b[static_cast<size_t>(k)]; }
  bool operator==(const throttle_config&) const = default;
};

// QEMU's throttle_is_valid checks and texts.
result<void> throttle_validate(const throttle_config& c);
// Applies a ThrottleLimits object onto `c` (missing members keep their value), with QSD's texts.
result<void> throttle_apply_limits(throttle_config& c, const boost::json::object& limits);
// The ThrottleLimits view of `c`, as qom-get of "limits" returns it.
boost::json::object throttle_limits_json(const throttle_config& c);

class throttle_state;

// One throttle node's membership in a group (QEMU's ThrottleGroupMember). The state calls
// schedule_wake() with its lock held, from whatever thread is serving a request: the member must
// only note the wake-up and post it to its own loop (never run its own code there), and must not
// call back into the state from inside it.
class throttle_member {
 public:
  virtual ~throttle_member() = default;
  // Run on_wake(is_write) on the member's own loop once the monotonic clock reaches `deadline_ns`
  // (at once when it has passed). A newer call replaces an older one (QEMU's timer_mod).
  virtual void schedule_wake(bool is_write, uint64_t deadline_ns) = 0;

 private:
  friend class throttle_state;
  uint32_t pending_[2] = {0, 0};  // requests queued in the member, per direction (state's lock)
};

// The state a throttle group's members share across threads: QEMU's leaky buckets and
// throttle-groups.c's round-robin scheduler.
//
// Thread safety: every call locks one mutex; hold times are a few arithmetic operations.
// Scheduling (per direction): at most one member holds the group's timer (any_timer_armed);
// while it is armed every new request of that direction queues. When a request starts, the next
// member in round-robin order that has queued requests gets the token: it is woken at once if
// the limits allow, else its timer is armed for the time the buckets need.
class throttle_state {
 public:
  throttle_config config() const;
  // New limits: the buckets restart (as in QEMU), every member with queued requests is woken so
  // they re-evaluate against the new limits.
  void set_config(const throttle_config& c);

  void attach(throttle_member* m);
  // The member must have nothing queued; its token passes on.
  void detach(throttle_member* m);

  // A member got a request (write covers zeroes and discards). True: start it now (charged).
  // False: the member queues it at the tail of its FIFO and waits for on_wake.
  bool intercept(throttle_member* m, bool is_write, uint64_t bytes, uint64_t now_ns);
  // The member's wake-up ran on its loop. With `has_head`, true means its FIFO head (`bytes`)
  // starts now (charged); the scheduler then hands the turn on. False: nothing to start.
  bool on_wake(throttle_member* m, bool is_write, bool has_head, uint64_t bytes, uint64_t now_ns);

  // Single-caller form without members (no queue): 0 = charged and may go, else nanoseconds to
  // wait before asking again.
  uint64_t reserve(bool is_write, uint64_t bytes, uint64_t now_ns);

 private:
  struct bucket_level {
    double level = 0, burst_level = 0;
  };
  void leak(uint64_t now_ns);
  uint64_t compute_wait(bool is_write) const;  // ns; 0: may start now
  void account(bool is_write, uint64_t bytes);
  throttle_member* next_token(throttle_member* m, bool w) const;
  bool schedule_timer(throttle_member* m, bool w, uint64_t now_ns);
  void schedule_next(throttle_member* m, bool w, uint64_t now_ns);

  mutable std::mutex mu_;
  throttle_config cfg_;
  std::array<bucket_level, throttle_buckets> level_{};
  uint64_t last_ns_ = 0;
  bool started_ = false;
  std::vector<throttle_member*> members_;
  throttle_member* tokens_[2] = {nullptr, nullptr};
  bool timer_armed_[2] = {false, false};
};

class throttle_group_object final : public object {
 public:
  static result<std::unique_ptr<object>> make(const std::string& id, const boost::json::object& props);
  // Shared with the nodes of the group; lives as long as the last of them.
  std::shared_ptr<throttle_state> state() const { return state_; }

  result<boost::json::value> get(const std::string& prop) const override;
  result<void> set(const std::string& prop, const boost::json::value& v) override;
  result<void> complete(model& m) override;

 private:
  std::shared_ptr<throttle_state> state_ = std::make_shared<throttle_state>();
  throttle_config pending_;  // collected while creating
  bool initialized_ = false;
};

}  // namespace blockd::qom

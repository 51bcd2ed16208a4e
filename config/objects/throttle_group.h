// throttle-group objects: ThrottleLimits with QSD's validation, and a thread-safe leaky-bucket state that throttle filters on any iothread share; config on the model's thread, the state from any thread.
#pragma once
#include <array>
#include <cstdint>
#include <memory>
#include <mutex>

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

// The state a throttle group's members share across threads.
//
// Thread safety: every member locks one mutex; hold times are a few arithmetic operations.
// Use: a throttle filter calls reserve() before starting a request; 0 means go now (the units
// are charged), otherwise it waits that many nanoseconds (a timer on its own loop) and calls
// reserve() again. config() returns a copy, so readers never see a half-updated configuration.
class throttle_state {
 public:
  throttle_config config() const;
  void set_config(const throttle_config& c);
  // Charges a read or write of `bytes` at monotonic time `now_ns`, or says how long to wait.
  // Each bucket leaks `avg` units per second; it holds max*burst_length units when a burst rate
  // is set, else avg/10 (QEMU's default bucket size); a request may start when every bucket it
  // touches (total plus its direction, for bytes and for operations) has room for it.
  uint64_t reserve(bool is_write, uint64_t bytes, uint64_t now_ns);

 private:
  void leak(uint64_t now_ns);
  mutable std::mutex mu_;
  throttle_config cfg_;
  std::array<double, throttle_buckets> level_{};
  uint64_t last_ns_ = 0;
  bool started_ = false;
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

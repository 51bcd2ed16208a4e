// blkdebug's rules: parsing (QEMU's config-file syntax and blockdev-add's arrays) and the state machine that fires them; pure code, the node's home iothread once built.
#pragma once
#include <boost/json.hpp>

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "protocol/error.h"
#include "storage/block/debug_event.h"
#include "storage/block/io_request.h"

namespace blockd::block {

// BlkdebugIOType, as bits of an inject rule's mask (QEMU's order).
enum blkdebug_iotype : uint32_t {
  iot_read = 1u << 0,
  iot_write = 1u << 1,
  iot_write_zeroes = 1u << 2,
  iot_discard = 1u << 3,
  iot_flush = 1u << 4,
  iot_block_status = 1u << 5,
};
// A rule that names no iotype: every type but block-status (QEMU's default).
inline constexpr uint32_t iot_default = iot_read | iot_write | iot_write_zeroes | iot_discard | iot_flush;
uint32_t iotype_of(io_op op);

struct inject_rule {
  blkdebug_event event = blkdebug_event::none;
  int64_t state = 0;        // 0: any state
  uint32_t iotypes = iot_default;
  int64_t error = 5;        // errno to fail with (EIO); 0 or less injects nothing
  int64_t offset = -1;      // byte offset (sector * 512) the request must cover; -1: any
  bool once = false;        // removed after failing one request
  bool immediately = false; // fail at submit, without waiting a loop turn first
  uint64_t id = 0;          // the engine's own numbering (removal of `once` rules)
};

struct set_state_rule {
  blkdebug_event event = blkdebug_event::none;
  int64_t state = 0;  // 0: any state
  int64_t new_state = 0;
};

struct rule_set {
  std::vector<inject_rule> inject;
  std::vector<set_state_rule> set_state;
};

// QEMU's config file syntax: "[inject-error]" / "[set-state]" groups (optionally [group "id"]) and
// `key = "value"` lines, '#' comments at the start of a line. Errors carry QEMU's texts. Rules are
// appended to `out` (the file's first, as QEMU reads the file before the options).
result<void> parse_blkdebug_config(std::string_view text, rule_set& out);
// Reads and parses the file `path` ("Could not read blkdebug config file: ..." when it cannot).
result<void> read_blkdebug_config(const std::string& path, rule_set& out);
// blockdev-add's inject-error[] and set-state[] (already validated against the schema).
result<void> parse_blkdebug_options(const boost::json::object& options, rule_set& out);

// The rule engine of one blkdebug node. State 1 initially. An event makes the set-state rules of
// the current state choose the next state, and, when inject rules of that event match the
// current state, those rules become the active set (replacing the previous one); active rules fail
// the requests they match until an event activates others (or, `once`, after one failure).
class blkdebug_engine {
 public:
  explicit blkdebug_engine(rule_set rules);
  void event(blkdebug_event e);
  struct verdict {
    int error = 0;  // negative errno, 0: pass the request on
    bool immediately = false;
  };
  verdict check(io_op op, int64_t offset, int64_t length);
  int64_t state() const { return state_; }
  size_t active() const { return active_.size(); }

 private:
  rule_set rules_;
  std::vector<uint64_t> active_;  // ids of inject rules, in the order they were defined
  int64_t state_ = 1;
};

}  // namespace blockd::block

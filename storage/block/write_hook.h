// Write hooks: observers and gatekeepers of every write, write-zeroes and discard a node sends to its driver; home iothread only.
#pragma once
#include "storage/block/io_request.h"

namespace blockd::block {

// Dirty bitmaps, copy-before-write, active mirror and the write threshold all need to see the
// writes of a node. A hook registers on the node (node::add_write_hook) and sees each write-type
// request that reaches the driver (discard=ignore and invalid requests never do): before, where it
// may hold the request, and after it completed. A node without hooks pays one branch per request.
struct write_hook {
  // Before the driver sees `r` (its final op: a detected zero write is write_zeroes here). Return
  // true to let it go on. A hook that must act first (copy the old data out) returns false and
  // later calls node::release_write(r) on the home thread; the node then asks the next hook.
  // Only hooks with `gates` set are asked.
  virtual bool before_write(io_request& r) { (void)r; return true; }
  // Once `r` completed, before its submitter hears of it; r.result tells how it went.
  virtual void after_write(const io_request& r) { (void)r; }
  // After every hook's after_write: a gating hook that must finish something first (active
  // mirror: the same write to the target) returns true to hold the completion, and later calls
  // node::release_completion(r) on the home thread; the node then asks the next hook. The held
  // request still counts as in flight, so a drain of the node waits for it.
  virtual bool hold_completion(io_request& r) { (void)r; return false; }
  bool gates = false;

 protected:
  ~write_hook() = default;
};

inline bool is_write_op(io_op op) { return op == io_op::write || op == io_op::write_zeroes || op == io_op::discard; }

}  // namespace blockd::block

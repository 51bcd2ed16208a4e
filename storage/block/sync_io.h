// Blocking I/O on a node for control paths (a format's open/close, image creation); any thread but never the data path.
#pragma once
#include <cstdint>

#include "protocol/error.h"
#include "storage/block/io_request.h"

namespace blockd::block {

class node;

// Each call submits one request to `n` on the node's home loop (through driver_env::block_on) and
// waits for it: on the home itself (a node task, a driver's open) by turning that loop, nested; on
// a worker thread (a create job) by blocking that thread. The main loop never calls it for a node
// living elsewhere: the supervisor sends such work home as a node task. Requests carry io_control, so they pass a quiesce the caller itself holds. Results
// are 0 or -errno; short transfers do not exist at this level (the node layer completes whole requests).
class sync_io {
 public:
  explicit sync_io(node& n) : n_(n) {}
  int read(void* buf, int64_t len, int64_t offset);
  int write(const void* buf, int64_t len, int64_t offset, uint32_t flags = 0);
  int write_zeroes(int64_t offset, int64_t len, uint32_t flags = 0);
  int discard(int64_t offset, int64_t len);
  int flush();
  // Block status of [offset, offset+len): the first extent's flags and length.
  int block_status(int64_t offset, int64_t len, uint32_t& status, int64_t& status_length);
  // The node's driver truncate, run on its home loop (the node must be idle, e.g. a creation target).
  result<void> truncate(int64_t size);
  int64_t length();
  node& target() { return n_; }

 private:
  int run(io_request& r);
  node& n_;
};

}  // namespace blockd::block

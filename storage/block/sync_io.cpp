// Blocking node I/O for control paths: one request, submitted on the node's home, waited for by the caller.
#include "storage/block/sync_io.h"

#include <cerrno>

#include "storage/block/node.h"

namespace blockd::block {
namespace {
struct callback_waiter final : io_waiter {
  std::function<void(int)> done;
  void io_done(io_request& r) override { done(r.result); }
};
}  // namespace

int sync_io::run(io_request& r) {
  const auto& env = n_.env();
  if (!env.block_on) return -ENOTSUP;
  r.flags |= io_control;
  callback_waiter w;
  r.waiter = &w;
  return env.block_on([&](std::function<void(int)> done) {
    w.done = std::move(done);
    n_.submit(r);
  });
}

int sync_io::read(void* buf, int64_t len, int64_t offset) {
  io_request r;
  r.op = io_op::read;
  r.offset = offset;
  r.set_buffer(buf, len);
  return run(r);
}

int sync_io::write(const void* buf, int64_t len, int64_t offset, uint32_t flags) {
  io_request r;
  r.op = io_op::write;
  r.flags = flags;
  r.offset = offset;
  r.set_buffer(const_cast<void*>(buf), len);
  return run(r);
}

int sync_io::write_zeroes(int64_t offset, int64_t len, uint32_t flags) {
  io_request r;
  r.op = io_op::write_zeroes;
  r.flags = flags;
  r.offset = offset;
  r.length = len;
  return run(r);
}

int sync_io::discard(int64_t offset, int64_t len) {
  io_request r;
  r.op = io_op::discard;
  r.offset = offset;
  r.length = len;
  return run(r);
}

int sync_io::flush() {
  io_request r;
  r.op = io_op::flush;
  return run(r);
}

int sync_io::block_status(int64_t offset, int64_t len, uint32_t& status, int64_t& status_length) {
  io_request r;
  r.op = io_op::block_status;
  r.offset = offset;
  r.length = len;
  int res = run(r);
  status = r.status;
  status_length = r.status_length;
  return res;
}

result<void> sync_io::truncate(int64_t size) {
  const auto& env = n_.env();
  if (!env.block_on) return n_.driver().truncate(size);
  result<void> out;
  env.block_on([&](std::function<void(int)> done) {
    out = n_.driver().truncate(size);
    done(0);
  });
  return out;
}

int64_t sync_io::length() {
  const auto& env = n_.env();
  if (!env.block_on) return n_.length();
  int64_t len = 0;
  env.block_on([&](std::function<void(int)> done) {
    len = n_.length();
    done(0);
  });
  return len;
}

}  // namespace blockd::block

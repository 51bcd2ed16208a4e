// The base of filter drivers (one child; everything not overridden goes to it unchanged, nbdkit's rule) and of pass-through layers; home iothread only.
#pragma once
#include "storage/block/driver.h"
#include "storage/block/node.h"

namespace blockd::block {

// A driver over one child that forwards what it does not override: length, limits, caps, facts,
// truncate, permissions, and every request. A request passes down as the same object: the filter
// pushes a layer onto it (io_request::push_layer), may change offset, flags or op for the child,
// and gets it back in completed() with the layer above's values restored. Only when the
// request's layer stack is full does the filter copy it (one pooled request, never per layer).
class filter_driver : public block_driver, protected io_waiter {
 public:
  explicit filter_driver(child_ref child) : child_(child) {}

  uint32_t caps() const override {
    return child_->driver().caps() &
           (cap_write_zeroes | cap_discard | cap_fua | cap_block_status | cap_resize | cap_copy_on_read);
  }
  driver_limits limits() const override { return child_->driver().limits(); }
  int64_t length() const override { return child_->length(); }
  image_facts facts() const override {
    // The child's published facts, not its driver: during a move the child may briefly live on
    // another thread (a reopen that takes it from another iothread commits before it moves).
    auto f = child_->facts();
    return {.virtual_size = length(), .actual_size = f->actual_size, .has_dirty_flag = f->has_dirty_flag,
            .cluster_size = f->cluster_size};
  }
  void submit(io_request& r) override { pass_down(r, 0); }
  void debug_event(blkdebug_event e) override { child_->driver().debug_event(e); }
  result<void> truncate(int64_t size) override { return child_->driver().truncate(size); }
  void child_perm(const std::string&, bool, uint32_t node_perm, uint32_t node_shared, uint32_t& perm,
                  uint32_t& shared) const override {
    perm = node_perm;
    shared = node_shared;
  }

 protected:
  // Sends `r` to the child, `shift` bytes further into it.
  void pass_down(io_request& r, int64_t shift, uint32_t add_flags = 0);
  // The child finished `r` (this layer's entry already removed, so `r` is as the layer above sent
  // it, with the child's results); the default tells the layer above.
  virtual void completed(io_request& r) { r.waiter->io_done(r); }

  child_ref child_;

 private:
  void io_done(io_request& r) override;
  request_pool copies_;  // for requests whose layer stack is full
};

}  // namespace blockd::block

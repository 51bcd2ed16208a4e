// Filter drivers' pass-through of requests (one object down the chain, a copy only when its layer stack is full); home iothread only.
#include "storage/block/filter.h"

namespace blockd::block {

namespace {
// Marks a layer entry as this filter's own (a copy is told apart by its user word instead).
char passed_marker;
}  // namespace

void filter_driver::pass_down(io_request& r, int64_t shift, uint32_t add_flags) {
  if (r.layer_room()) {
    io_request::layer& l = r.push_layer(this);
    l.user = &passed_marker;
    r.offset += shift;
    r.flags |= add_flags;
    child_->submit(r);
    return;
  }
  // A chain deeper than the stack: this layer's child gets a request of its own, once.
  io_request* c = copies_.get();
  c->op = r.op;
  c->flags = r.flags | add_flags;
  c->offset = r.offset + shift;
  c->length = r.length;
  c->iov = r.iov;
  c->iovcnt = r.iovcnt;
  c->user = &r;
  c->waiter = this;
  child_->submit(*c);
}

void filter_driver::io_done(io_request& r) {
  if (r.nlayers > 0 && r.top_layer().user == &passed_marker && r.waiter == this) {
    r.pop_layer();
    return completed(r);
  }
  auto& orig = *static_cast<io_request*>(r.user);
  orig.result = r.result;
  orig.status = r.status;
  orig.status_length = r.status_length;
  orig.depth = r.depth;
  copies_.put(&r);
  completed(orig);
}

}  // namespace blockd::block

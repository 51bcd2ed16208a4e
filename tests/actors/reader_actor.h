// Test support: an actor that reads through a node actor by pointer and checks every completion arrives on its own iothread; runs on that iothread.
#pragma once
#include <caf/all.hpp>

#include <future>
#include <vector>

#include "actors/node/node_actor.h"
#include "actors/runtime/iothread.h"
#include "storage/block/io_request.h"

namespace blockd::test {

// Submits `count` 4 KiB reads through `node` at start; `done` gets true once all are back without
// error and each on this actor's home iothread (where the node must live), false otherwise.
class reader_actor : public caf::event_based_actor, private block::io_waiter {
 public:
  reader_actor(caf::actor_config& cfg, iothread* home, caf::actor node, int count, std::promise<bool>* done)
      : caf::event_based_actor(cfg), home_(home), node_(std::move(node)), left_(count), done_(done),
        bufs_(size_t(count), std::vector<char>(4096)) {}
  caf::behavior make_behavior() override {
    for (size_t i = 0; i < bufs_.size(); ++i) {
      block::io_request* r = pool_.get();
      r->op = block::io_op::read;
      r->offset = int64_t(i) * 4096;
      r->set_buffer(bufs_[i].data(), 4096);
      r->waiter = this;
      send(node_, io_atom::value, io_request_ref{r});
    }
    return {[](int) {}};
  }

 private:
  void io_done(block::io_request& r) override {
    if (!home_->is_current() || r.result != 0) ok_ = false;
    pool_.put(&r);
    // Completions arrive from the node (outside this actor's message handling): report only; the
    // test stops the actor with an exit message.
    if (--left_ == 0) done_->set_value(ok_);
  }
  iothread* home_;
  caf::actor node_;
  int left_;
  std::promise<bool>* done_;
  std::vector<std::vector<char>> bufs_;
  block::request_pool pool_;
  bool ok_ = true;
};

}  // namespace blockd::test

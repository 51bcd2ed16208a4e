// Node actor behaviour: submit requests, quiesce/resume, run control tasks; runs only on the node's home iothread.
#include "actors/node/node_actor.h"

#include <caf/all.hpp>

#include <cassert>

namespace blockd {

node_actor::node_actor(caf::actor_config& cfg, iothread* home, block::node* n)
    : caf::event_based_actor(cfg), home_(home), node_(n) {}

caf::behavior node_actor::make_behavior() {
  return {
      [this](io_atom, io_request_ref ref) {
        assert(home_->is_current());  // the data path never leaves the node's iothread
        node_->submit(*ref.r);
      },
      [this](quiesce_atom) -> caf::result<bool> {
        auto rp = make_response_promise<bool>();
        node_->quiesce([rp]() mutable { rp.deliver(true); });
        return rp;
      },
      [this](resume_atom) { node_->resume(); },
      [this](run_atom, node_task& t) -> command_outcome { return t.fn(*node_); },
  };
}

}  // namespace blockd

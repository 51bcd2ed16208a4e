// Node actor and home task actor behaviours: submit requests, quiesce/resume, run control tasks; runs only on the actor's home iothread.
#include "actors/node/node_actor.h"

#include <caf/all.hpp>

#include <cassert>
#include <cerrno>

namespace blockd {

node_actor::node_actor(caf::actor_config& cfg, iothread* home, block::node* n)
    : caf::event_based_actor(cfg), home_(home), node_(n), life_(n->life()), name_(n->name()) {}

error node_actor::gone_error() const {
  return error("node '" + name_ + "' was closed before this request reached it; look the node up again");
}

caf::behavior node_actor::make_behavior() {
  return {
      [this](io_atom, io_request_ref ref) {
        assert(home_->is_current());  // the data path never leaves the node's iothread
        if (gone()) {
          // Completions are never synchronous: the submitter hears of it on a later turn.
          block::io_request* r = ref.r;
          home_->post([r] { r->complete(-ENODEV); });
          return;
        }
        node_->submit(*ref.r);
      },
      [this](quiesce_atom) -> caf::result<bool> {
        if (gone()) return true;  // nothing can be in flight in a node that no longer exists
        auto rp = make_response_promise<bool>();
        node_->quiesce([rp]() mutable { rp.deliver(true); });
        return rp;
      },
      [this](resume_atom) {
        if (!gone()) node_->resume();
      },
      [this](run_atom, node_task& t) -> command_outcome {
        assert(home_->is_current());
        if (gone()) return command_outcome::failure(gone_error());
        command_outcome out = t.fn(*node_);
        // The task may have closed the node itself (it ran the last step of a delete).
        if (!gone()) node_->publish_facts();
        return out;
      },
  };
}

home_task_actor::home_task_actor(caf::actor_config& cfg, iothread* home) : caf::event_based_actor(cfg), home_(home) {}

caf::behavior home_task_actor::make_behavior() {
  return {
      [this](run_atom, home_task& t) -> caf::result<command_outcome> {
        assert(home_->is_current());
        auto rp = make_response_promise<command_outcome>();
        rp.deliver(t.fn());
        quit();  // one task per actor
        return rp;
      },
  };
}

}  // namespace blockd

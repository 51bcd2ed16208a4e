// The node actor: the message entry of one block node (data path and control), pinned to the node's home iothread.
#pragma once
#include <caf/event_based_actor.hpp>

#include <functional>

#include "actors/messages.h"
#include "actors/runtime/iothread.h"
#include "storage/block/node.h"

namespace blockd {

// A request handed over by pointer: the submitter owns it (pooled) and is told through its waiter,
// on this same iothread, when it completes. No copy of the payload, no reply message.
struct io_request_ref {
  block::io_request* r = nullptr;
};

// Control work that must run where the node lives (truncate, reopen commit, a stats snapshot).
struct node_task {
  std::function<command_outcome(block::node&)> fn;
};

using quiesce_atom = caf::atom_constant<caf::atom("quiesce")>;  // -> bool once nothing is in flight
using resume_atom = caf::atom_constant<caf::atom("resume")>;
using run_atom = caf::atom_constant<caf::atom("run")>;          // node_task -> command_outcome
using node_lookup_atom = caf::atom_constant<caf::atom("nodelookup")>;  // supervisor: node name -> its actor

// Exports, jobs and the supervisor reach a node only through this actor. The graph (owned by the
// supervisor) owns the node object; the supervisor stops the actor before the node is destroyed.
class node_actor : public caf::event_based_actor {
 public:
  node_actor(caf::actor_config& cfg, iothread* home, block::node* n);
  caf::behavior make_behavior() override;

 private:
  iothread* home_;
  block::node* node_;
};

}  // namespace blockd

CAF_ALLOW_UNSAFE_MESSAGE_TYPE(blockd::io_request_ref)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(blockd::node_task)

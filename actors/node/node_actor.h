// The node actor: the message entry of one block node (data path and control tasks), pinned to the node's home iothread.
#pragma once
#include <caf/event_based_actor.hpp>

#include <functional>
#include <memory>
#include <string>

#include "actors/messages.h"
#include "actors/runtime/iothread.h"
#include "storage/block/node.h"

namespace blockd {

// A request handed over by pointer: the submitter owns it (pooled) and is told through its waiter,
// on this same iothread, when it completes. No copy of the payload, no reply message.
struct io_request_ref {
  block::io_request* r = nullptr;
};

// Control work that must run where the node lives (truncate, snapshots, reopen commit, activation,
// a facts refresh). The supervisor sends it and goes on turning its own loop; the outcome comes
// back as the reply. On the home, a driver's block_on is a nested turn of this same loop, never a
// wait on another thread. After `fn` the actor publishes the node's facts, so queries see what
// the task changed.
struct node_task {
  std::function<command_outcome(block::node&)> fn;
};

// Control work on an iothread that no node actor serves yet or any more: opening the nodes of a
// blockdev-add there, closing nodes that left the graph. Run by a one-shot home_task_actor.
struct home_task {
  std::function<command_outcome()> fn;
};

using quiesce_atom = caf::atom_constant<caf::atom("quiesce")>;  // -> bool once nothing is in flight
using resume_atom = caf::atom_constant<caf::atom("resume")>;
using run_atom = caf::atom_constant<caf::atom("run")>;          // node_task / home_task -> command_outcome
using node_lookup_atom = caf::atom_constant<caf::atom("nodelookup")>;  // supervisor: node name -> its actor

// Exports, jobs and the supervisor reach a node only through this actor. The graph (owned by the
// supervisor) owns the node object, and nodes are destroyed on their home; a message that finds
// its node gone (closed by a task on this home while the message was queued) is answered with an
// error instead of touching it.
class node_actor : public caf::event_based_actor {
 public:
  node_actor(caf::actor_config& cfg, iothread* home, block::node* n);
  caf::behavior make_behavior() override;

 private:
  bool gone() const { return !*life_; }
  error gone_error() const;

  iothread* home_;
  block::node* node_;
  std::shared_ptr<const bool> life_;
  std::string name_;  // for errors once the node is gone
};

// Runs one home_task on `home` and quits; `run_atom, home_task` is its only message.
class home_task_actor : public caf::event_based_actor {
 public:
  home_task_actor(caf::actor_config& cfg, iothread* home);
  caf::behavior make_behavior() override;

 private:
  iothread* home_;
};

}  // namespace blockd

CAF_ALLOW_UNSAFE_MESSAGE_TYPE(blockd::io_request_ref)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(blockd::node_task)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(blockd::home_task)

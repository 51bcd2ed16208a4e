// Placement: every node's home iothread, moving components, quiescing nodes, node actors, node tasks and closing nodes at home; main iothread only.
#include <caf/all.hpp>

#include <algorithm>
#include <future>
#include <unordered_set>

#include "actors/node/node_actor.h"
#include "actors/runtime/pinned.h"
#include "actors/supervisor/supervisor.h"

namespace blockd {

// ---- placement ------------------------------------------------------------------------------
//
// Every node has a home iothread and a connected component (a node, its children and parents,
// transitively) shares one, so a request never crosses threads inside the graph. Control calls
// from the supervisor reach a node's driver as node tasks run on its home (run_on_node), with the
// node quiesced where requests must not run meanwhile; the supervisor itself only touches what the
// data path does not (file locks, counters read as relaxed atomics, facts the home published).

iothread* supervisor_actor::home_of(const block::node* n) const {
  auto it = homes_.find(n);
  return it == homes_.end() ? home_ : it->second;
}

block::driver_env supervisor_actor::env_for(iothread* t) const {
  block::driver_env e{&t->reactor(), [t](std::function<void()> fn) { t->post(std::move(fn)); },
                      [t] { return t->is_current(); },
                      [t](block::driver_env::start_fn start) { return t->block_on(start); }};
  // Drivers emit from their iothread: the event goes to the bus as a message to this actor.
  caf::actor self = caf::actor_cast<caf::actor>(const_cast<supervisor_actor*>(this));
  e.emit = [self](std::string name, boost::json::object data) {
    caf::anon_send(self, event_atom::value, std::move(name), json_args{std::move(data)});
  };
  return e;
}

std::vector<block::node*> supervisor_actor::components(const std::vector<block::node*>& seeds) const {
  std::vector<block::node*> out;
  std::unordered_set<const block::node*> seen;
  std::vector<block::node*> pending(seeds.begin(), seeds.end());
  while (!pending.empty()) {
    block::node* n = pending.back();
    pending.pop_back();
    if (!seen.insert(n).second) continue;
    out.push_back(n);
    for (block::child_edge* e : n->children()) pending.push_back(e->child);
    for (block::child_edge* e : n->parents) pending.push_back(e->parent);
  }
  return out;
}

void supervisor_actor::rehome(const std::vector<block::node*>& nodes, iothread* to) {
  for (block::node* n : nodes) {
    if (home_of(n) == to) continue;
    n->rehome(env_for(to));
    homes_[n] = to;
  }
}

std::unique_ptr<block::action> supervisor_actor::rehome_action(std::vector<block::node*> nodes, iothread* to) {
  // Nothing to check or take: the nodes are drained and the component moves whole, so prepare
  // cannot fail; the move happens at commit, after every other action of the list prepared.
  auto a = std::make_unique<block::lambda_action>();
  a->on_commit = [this, nodes = std::move(nodes), to] {
    for (block::node* n : nodes)
      if (graph_->alive(n)) rehome({n}, to);
  };
  return a;
}

result<void> supervisor_actor::check_bitmaps_not_split(const std::vector<block::node*>& moving) const {
  for (const auto& e : exports_) {
    size_t in = 0, still = 0;
    for (const auto& name : e.bitmap_graph) {
      if (!graph_->find(name)) continue;  // deleted since: nothing of it to read
      ++still;
      in += std::any_of(moving.begin(), moving.end(), [&](const block::node* x) { return x->name() == name; });
    }
    if (in && in != still)
      return fail("Cannot move these nodes to another iothread: export '" + e.id +
                  "' reads dirty bitmaps of nodes that would stay behind; delete the export first");
  }
  return {};
}

void supervisor_actor::move_components(const std::vector<block::node*>& seeds, iothread* to,
                                       std::function<command_outcome()> then, reply_fn reply) {
  auto nodes = components(seeds);
  bool there = std::all_of(nodes.begin(), nodes.end(), [&](const block::node* n) { return home_of(n) == to; });
  if (there) return reply(then());
  // An export created with fixed-iothread holds its node (QEMU's text).
  if (pinning_export(nodes)) return reply(command_outcome::failure(error("Cannot change iothread of active block backend")));
  // An export's bitmaps are read where its node lives: its nodes move together or not at all.
  if (auto r = check_bitmaps_not_split(nodes); !r) return reply(command_outcome::failure(r.error()));
  // Exported nodes take their NBD clients along (QEMU moves an export with its node).
  park_clients(nodes, [this, nodes, to, then, reply = std::move(reply)]() mutable {
    with_quiesced(
        nodes,
        [this, nodes, to, then] {
          // The move is an action like any other graph change, so a transaction can hold it.
          std::vector<std::unique_ptr<block::action>> list;
          list.push_back(rehome_action(nodes, to));
          if (auto r = graph_->run(std::move(list)); !r) return command_outcome::failure(r.error());
          return then();
        },
        [this, reply = std::move(reply)](command_outcome o) mutable {
          unpark_clients();
          reply(std::move(o));
        });
  });
}

void supervisor_actor::sync_node_actors() {
  // Stale actors go first: those of deleted nodes and of nodes that moved. An actor is stopped on
  // its old loop; before this returns, every other loop that stopped one has run past the stop, so
  // the caller may delete that iothread right after.
  std::vector<iothread*> stopped_on;
  for (auto it = node_actors_.begin(); it != node_actors_.end();) {
    block::node* n = graph_ ? graph_->find(it->first) : nullptr;
    if (n == it->second.n && home_of(n) == it->second.home) {
      ++it;
      continue;
    }
    send_exit(it->second.actor, caf::exit_reason::user_shutdown);
    if (it->second.home != home_ &&
        std::find(stopped_on.begin(), stopped_on.end(), it->second.home) == stopped_on.end())
      stopped_on.push_back(it->second.home);
    it = node_actors_.erase(it);
  }
  for (iothread* t : stopped_on) {
    // The stop was queued before this barrier, and a loop runs its actors before posted functions.
    std::promise<void> passed;
    t->post([&passed] { passed.set_value(); });
    passed.get_future().wait();
  }
  // Homes of nodes that are gone (a later node may get the same address).
  std::unordered_set<const block::node*> live;
  if (graph_)
    for (block::node* n : graph_->nodes_newest_first()) live.insert(n);
  for (auto it = homes_.begin(); it != homes_.end();) it = live.count(it->first) ? std::next(it) : homes_.erase(it);
  if (!graph_) return;
  for (block::node* n : graph_->nodes_newest_first())
    if (!node_actors_.count(n->name())) {
      iothread* h = home_of(n);
      node_actors_.emplace(n->name(), node_entry{n, h, spawn_pinned<node_actor>(h->system(), *h, n)});
    }
}

// ---- node tasks --------------------------------------------------------------------------------

void supervisor_actor::run_on_node(block::node* n, node_fn fn, reply_fn then) {
  std::string name = n->name();
  auto it = node_actors_.find(name);
  if (it == node_actors_.end() || it->second.n != n)
    return then(command_outcome::failure(error("internal error: node '" + name + "' has no actor on its home")));
  ++tasks_in_flight_;
  request(it->second.actor, caf::infinite, run_atom::value, node_task{std::move(fn)})
      .then(
          [this, then](command_outcome& o) {
            then(std::move(o));
            task_done();
          },
          [this, then, name](const caf::error& e) {
            then(command_outcome::failure(error("node '" + name + "' went away before its task ran (" + to_string(e) +
                                                "); repeat the command if the node still exists")));
            task_done();
          });
}

void supervisor_actor::run_at(iothread* t, std::function<command_outcome()> fn, reply_fn then) {
  ++tasks_in_flight_;
  auto runner = spawn_pinned<home_task_actor>(t->system(), *t);
  request(runner, caf::infinite, run_atom::value, home_task{std::move(fn)})
      .then(
          [this, then](command_outcome& o) {
            then(std::move(o));
            task_done();
          },
          [this, then, id = t->id()](const caf::error& e) {
            then(command_outcome::failure(error("iothread '" + id + "' stopped before a task ran on it (" +
                                                to_string(e) + ")")));
            task_done();
          });
}

void supervisor_actor::task_done() {
  // Decremented after `then`: a step that sends the next task keeps the count above zero, so
  // deferred graph work never runs between two tasks of one change.
  if (--tasks_in_flight_ > 0) return;
  while (tasks_in_flight_ == 0 && !after_tasks_.empty()) {
    auto fn = std::move(after_tasks_.front());
    after_tasks_.pop_front();
    fn();
  }
}

void supervisor_actor::when_no_tasks(std::function<void()> fn) {
  if (tasks_in_flight_ == 0) return fn();
  after_tasks_.push_back(std::move(fn));
}

void supervisor_actor::close_detached(std::vector<std::unique_ptr<block::node>> nodes) {
  // Each list is parents first; a component lives on one iothread, so per home the order holds.
  std::vector<std::pair<iothread*, std::shared_ptr<std::vector<std::unique_ptr<block::node>>>>> by_home;
  for (auto& n : nodes) {
    iothread* h = home_of(n.get());
    auto it = std::find_if(by_home.begin(), by_home.end(), [&](auto& p) { return p.first == h; });
    if (it == by_home.end()) {
      by_home.emplace_back(h, std::make_shared<std::vector<std::unique_ptr<block::node>>>());
      it = std::prev(by_home.end());
    }
    it->second->push_back(std::move(n));
  }
  for (auto& [h, list] : by_home) {
    if (h == home_) {
      for (auto& n : *list) n.reset();  // this loop is their home: close now
      continue;
    }
    ++closing_;
    run_at(
        h,
        [list] {
          for (auto& n : *list) n.reset();
          return command_outcome::success();
        },
        [this](command_outcome) {
          if (--closing_ > 0) return;
          auto waiting = std::move(after_closes_);
          after_closes_.clear();
          for (auto& fn : waiting) fn();
          if (graph_) pump();  // the next command may start now (none at shutdown)
        });
  }
}

void supervisor_actor::when_closed(std::function<void()> fn) {
  if (closing_ == 0) return fn();
  after_closes_.push_back(std::move(fn));
}

// ---- block graph commands -------------------------------------------------------------------

void supervisor_actor::with_quiesced(std::vector<block::node*> nodes, std::function<command_outcome()> fn,
                                     reply_fn reply) {
  with_quiesced_steps(std::move(nodes), [fn = std::move(fn)](reply_fn done) { done(fn()); }, std::move(reply));
}

void supervisor_actor::with_quiesced_steps(std::vector<block::node*> nodes, step_fn step, reply_fn reply) {
  std::vector<std::string> names;
  for (auto* n : nodes) names.push_back(n->name());
  // Quiescing goes through each node's actor, so it works wherever the node lives.
  quiesce_nodes(nodes, [this, names, step = std::move(step), reply = std::move(reply)] {
    if (!graph_) return reply(command_outcome::failure(error("blockd is shutting down")));
    // All drained: run the change, put the actors where their nodes now live, let held requests go
    // (a node may be gone after a delete).
    step([this, names, reply](command_outcome out) {
      resume_nodes(names);
      reply(std::move(out));
    });
  });
}

}  // namespace blockd

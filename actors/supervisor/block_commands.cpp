// Block graph commands: blockdev-add/-del/-reopen/-set-active, x-blockdev-set-iothread, block_resize, write thresholds, graph queries (driver steps sent home as node tasks); main iothread only.
#include <caf/all.hpp>

#include <algorithm>
#include <unordered_set>

#include "actors/node/node_actor.h"
#include "actors/supervisor/supervisor.h"
#include "storage/block/query.h"

namespace blockd {

void supervisor_actor::register_block_commands() {
  using args_t = boost::json::object;
  commands_.add("blockdev-add", [this](args_t& a, reply_fn r) { blockdev_add_async(a, std::move(r)); });
  commands_.add("blockdev-del", [this](args_t& a, reply_fn reply) {
    std::string node(a.at("node-name").as_string());
    // A node with a user outside the graph that QEMU gives a block backend (an export) is refused
    // before any other check but existence, as in QEMU.
    if (block::node* n = graph_->find(node))
      for (const block::root* r : n->roots)
        if (r->block_backend && r->key.starts_with("export:"))
          return reply(command_outcome::failure(error("Node " + node + " is in use")));
    if (auto r = check_del_held(node); !r) return reply(command_outcome::failure(r.error()));
    blockdev_del(node, std::move(reply));
  });
  commands_.add("block_resize", [this](args_t& a, reply_fn r) { block_resize(a, std::move(r)); });
  txn_kinds_["blockdev-snapshot-internal-sync"].build = [this](const args_t& d) { return internal_snapshot_action(d); };
  commands_.add("blockdev-snapshot-internal-sync",
                [this](args_t& a, reply_fn r) { run_one("blockdev-snapshot-internal-sync", a, std::move(r)); });
  commands_.add("blockdev-snapshot-delete-internal-sync",
                [this](args_t& a, reply_fn r) { snapshot_delete_internal(a, std::move(r)); });
  commands_.add("blockdev-reopen", [this](args_t& a, reply_fn r) { blockdev_reopen(a, std::move(r)); });
  commands_.add("blockdev-set-active", [this](args_t& a, reply_fn r) { blockdev_set_active(a, std::move(r)); });
  commands_.add("x-blockdev-set-iothread", [this](args_t& a, reply_fn r) { set_iothread(a, std::move(r)); });
  commands_.add("x-blockdev-change", [this](args_t& a, reply_fn r) { blockdev_change(a, std::move(r)); });
  commands_.add_now("block-set-write-threshold", [this](args_t& a) { return set_write_threshold(a); });
  commands_.add("query-named-block-nodes", [this](args_t& a, reply_fn reply) {
    auto* f = a.if_contains("flat");
    bool flat = f && f->as_bool();
    // Actual sizes and dirty flags move with the data path: each home publishes its nodes' facts
    // anew, and the reply reads those copies.
    refresh_facts([this, flat, reply] {
      if (!graph_) return reply(command_outcome::failure(error("blockd is shutting down")));
      reply(command_outcome::success(block::named_block_nodes(*graph_, flat)));
    });
  });
  // No guest devices, as in QSD.
  commands_.add_now("query-block", [](args_t&) { return command_outcome::success(boost::json::array()); });
  commands_.add_now("query-blockstats", [this](args_t& a) {
    // Only nodes have statistics in blockd; without query-nodes QSD lists block backends, of which
    // blockd has none (exports will add theirs).
    auto* qn = a.if_contains("query-nodes");
    if (qn && qn->as_bool()) return command_outcome::success(block::node_blockstats(*graph_));
    return command_outcome::success(boost::json::array());
  });
  commands_.add_now("x-debug-query-block-graph",
                    [this](args_t&) { return command_outcome::success(block::block_graph_dump(*graph_)); });
}

void supervisor_actor::blockdev_reopen(const boost::json::object& args, reply_fn reply) {
  auto plan = graph_->reopen_prepare(args.at("options").as_array());
  if (!plan) return reply(command_outcome::failure(plan.error()));
  auto shared = std::make_shared<block::graph::reopen_plan>(std::move(*plan));
  // Each driver readies its new state on its home, without disturbing the current one (no quiesce
  // yet); then the graph checks what the drivers did not take.
  reopen_prepare_next(shared, 0, [this, shared, reply = std::move(reply)](command_outcome o) mutable {
    if (!o.ok) return reply(std::move(o));
    // A child taken from another iothread's component joins its new parent's: that component is
    // quiesced with the reopened nodes and moved after the commit (QEMU moves the child likewise).
    std::vector<block::node*> quiesce = shared->nodes();
    std::vector<std::pair<block::node*, block::node*>> joins;  // (parent, new child)
    for (auto& [p, c] : shared->new_children())
      if (home_of(c) != home_of(p)) joins.emplace_back(p, c);
    for (auto& [p, c] : joins)
      for (block::node* x : components({c}))
        if (std::find(quiesce.begin(), quiesce.end(), x) == quiesce.end()) quiesce.push_back(x);
    std::vector<block::node*> moving;
    for (auto& [p, c] : joins)
      for (block::node* x : components({c})) moving.push_back(x);
    if (pinning_export(moving))
      return reopen_abort_all(shared, command_outcome::failure(error("Cannot change iothread of active block backend")),
                              std::move(reply));
    if (auto r = check_bitmaps_not_split(moving); !r)
      return reopen_abort_all(shared, command_outcome::failure(r.error()), std::move(reply));
    park_clients(moving, [this, quiesce, shared, joins, reply = std::move(reply)]() mutable {
      with_quiesced_steps(
          quiesce,
          [this, shared, joins](reply_fn done) {
            // Children and settings change, permissions follow for the whole affected subgraph;
            // a refused permission (another process's lock) puts every node back as it was.
            if (auto r = graph_->reopen_apply(*shared); !r)
              return reopen_abort_all(shared, command_outcome::failure(r.error()), std::move(done));
            reopen_commit_next(shared, 0, [this, shared, joins, done](command_outcome) {
              graph_->reopen_finish(*shared);
              for (auto& [p, c] : joins)
                if (graph_->alive(c) && graph_->alive(p)) rehome(components({c}), home_of(p));
              when_closed([done] { done(command_outcome::success()); });
            });
          },
          [this, reply = std::move(reply)](command_outcome o) mutable {
            unpark_clients();
            reply(std::move(o));
          });
    });
  });
}

void supervisor_actor::reopen_prepare_next(std::shared_ptr<block::graph::reopen_plan> plan, size_t i, reply_fn done) {
  if (i == plan->entries.size()) {
    if (auto r = graph_->reopen_check_writers(*plan); !r)
      return reopen_abort_all(plan, command_outcome::failure(r.error()), std::move(done));
    return done(command_outcome::success());
  }
  auto* e = &plan->entries[i];
  run_on_node(e->n,
              [e](block::node&) {
                auto r = block::graph::prepare_driver(*e);
                return r ? command_outcome::success() : command_outcome::failure(r.error());
              },
              [this, plan, i, e, done](command_outcome o) mutable {
                if (o.ok)
                  if (auto r = graph_->reopen_check(*e); !r) o = command_outcome::failure(r.error());
                if (!o.ok) return reopen_abort_all(plan, std::move(o), std::move(done));
                reopen_prepare_next(plan, i + 1, std::move(done));
              });
}

void supervisor_actor::reopen_commit_next(std::shared_ptr<block::graph::reopen_plan> plan, size_t i, reply_fn done) {
  // In plan order, one at a time: a parent going read-only writes its tables back through a child
  // whose own settings change only at its commit, after the parent's.
  if (i == plan->entries.size()) return done(command_outcome::success());
  auto* e = &plan->entries[i];
  run_on_node(e->n,
              [e](block::node&) {
                block::graph::commit_driver(*e);
                return command_outcome::success();
              },
              [this, plan, i, done](command_outcome) { reopen_commit_next(plan, i + 1, done); });
}

void supervisor_actor::reopen_abort_all(std::shared_ptr<block::graph::reopen_plan> plan, command_outcome why,
                                        reply_fn done) {
  // Every prepared state gets its abort at home, newest first; then the first error is the reply.
  std::shared_ptr<std::function<void(size_t)>> next = std::make_shared<std::function<void(size_t)>>();
  *next = [this, plan, why, done, next](size_t left) {
    while (left > 0 && !plan->entries[left - 1].state) --left;
    if (left == 0) {
      done(why);
      *next = nullptr;  // breaks the cycle through the capture
      return;
    }
    auto* e = &plan->entries[left - 1];
    run_on_node(e->n,
                [e](block::node&) {
                  block::graph::abort_driver(*e);
                  return command_outcome::success();
                },
                [next, left](command_outcome) { (*next)(left - 1); });
  };
  (*next)(plan->entries.size());
}

void supervisor_actor::blockdev_set_active(const boost::json::object& args, reply_fn reply) {
  bool active = args.at("active").as_bool();
  block::node* n = nullptr;
  if (auto* v = args.if_contains("node-name")) {
    std::string name(v->as_string());
    n = graph_->find(name);
    if (!n) return reply(command_outcome::failure(error("Failed to find node with node-name='" + name + "'")));
  }
  // Nothing may be in flight while a node gives up or takes back its image.
  std::vector<block::node*> affected = n ? std::vector<block::node*>{n} : graph_->nodes_newest_first();
  with_quiesced_steps(
      affected, [this, n, active](reply_fn done) { set_active_steps(n, active, std::move(done)); }, std::move(reply));
}

void supervisor_actor::set_active_steps(block::node* n, bool active, reply_fn done) {
  if (active) return activate_next(std::make_shared<std::vector<block::node*>>(graph_->activation_order(n)), 0, done);
  auto tops = graph_->inactivation_tops(n);
  return inactivate_next(std::make_shared<std::deque<block::node*>>(tops.begin(), tops.end()), done);
}

void supervisor_actor::activate_next(std::shared_ptr<std::vector<block::node*>> order, size_t i, reply_fn done) {
  if (i == order->size()) return done(command_outcome::success());
  block::node* m = (*order)[i];
  // Locks first (here), then the driver takes the image back (at home); a failure there gives
  // the locks up again.
  if (auto r = graph_->begin_activate(*m); !r) return done(command_outcome::failure(r.error()));
  run_on_node(m,
              [](block::node& x) {
                auto r = block::graph::activate_driver(x);
                return r ? command_outcome::success() : command_outcome::failure(r.error());
              },
              [this, order, i, m, done](command_outcome o) {
                graph_->end_activate(*m, o.ok);
                if (!o.ok) return done(std::move(o));
                activate_next(order, i + 1, done);
              });
}

void supervisor_actor::inactivate_next(std::shared_ptr<std::deque<block::node*>> stack, reply_fn done) {
  // Depth first, parents before children: a child follows once nothing active uses it.
  while (!stack->empty() && !stack->front()->settings().active) stack->pop_front();
  if (stack->empty()) return done(command_outcome::success());
  block::node* m = stack->front();
  stack->pop_front();
  if (auto r = graph_->check_inactivate(*m); !r) return done(command_outcome::failure(r.error()));
  run_on_node(m,
              [](block::node& x) {
                block::graph::inactivate_driver(x);
                return command_outcome::success();
              },
              [this, stack, m, done](command_outcome o) {
                if (!o.ok) return done(std::move(o));
                auto follow = graph_->end_inactivate(*m);
                stack->insert(stack->begin(), follow.begin(), follow.end());
                inactivate_next(stack, done);
              });
}

void supervisor_actor::set_iothread(const boost::json::object& args, reply_fn reply) {
  std::string name(args.at("node-name").as_string());
  block::node* n = graph_->find(name);
  if (!n) return reply(command_outcome::failure(error("Failed to find node with node-name='" + name + "'")));
  auto* force = args.if_contains("force");
  // A node with a user outside the graph (an export) may be serving requests from its home; moving
  // it needs force, as QEMU's check for a BlockBackend parent.
  bool has_backend = std::any_of(n->roots.begin(), n->roots.end(), [](const block::root* r) { return r->block_backend; });
  if (has_backend && !(force && force->as_bool()))
    return reply(command_outcome::failure(error("Node " + name +
                                                " is associated with a BlockBackend and could be in use (use "
                                                "force=true to override this check)")));
  // A block job's loop runs on the home of its nodes; QEMU moves the job along, blockd refuses
  // until the job is over (the loop would have to be stopped and restarted on the new home).
  for (block::node* m : components({n}))
    if (auto r = check_job_blockers(*m); !r)
      return reply(command_outcome::failure(
          error(r.error().desc + "; blockd moves no node of a running block job: wait for the job to end")));
  iothread* to = home_;
  const auto& which = args.at("iothread");
  if (which.is_string()) {
    std::string id(which.as_string());
    to = find_iothread(id);
    if (!to) return reply(command_outcome::failure(error("Cannot find iothread " + id)));
  }
  move_components({n}, to, [] { return command_outcome::success(); }, std::move(reply));
}

command_outcome supervisor_actor::blockdev_add(const boost::json::object& args) {
  // Opens on this thread: only for nodes whose home is the main loop (blockdev_add_async sends
  // the others' opens home).
  iothread* where = new_node_home_ ? new_node_home_ : home_;
  auto n = graph_->add(args);
  new_node_home_ = nullptr;
  if (!n) return command_outcome::failure(n.error());
  adopt_new_nodes(where);
  return command_outcome::success();
}

void supervisor_actor::adopt_new_nodes(iothread* where) {
  auto self = caf::actor_cast<caf::actor>(this);
  for (block::node* x : graph_->nodes_newest_first()) {
    if (homes_.count(x)) continue;
    homes_[x] = where;
    // Write-threshold crossings happen on the node's home; the event bus stamps and sends them.
    std::string name = x->name();
    x->on_threshold = [self, name](uint64_t exceeded, uint64_t threshold) {
      caf::anon_send(self, event_atom::value, std::string("BLOCK_WRITE_THRESHOLD"),
                     json_args{boost::json::object{
                         {"node-name", name}, {"amount-exceeded", exceeded}, {"write-threshold", threshold}}});
    };
  }
  sync_node_actors();
}

void supervisor_actor::blockdev_add_async(const boost::json::object& args, reply_fn reply) {
  // A new node lives where the nodes it references live. If they live on different iothreads they
  // first join the main loop, where QEMU opens every new node and moves its children.
  auto refs = graph_->referenced_nodes(args);
  std::vector<iothread*> homes;
  for (block::node* r : refs)
    if (std::find(homes.begin(), homes.end(), home_of(r)) == homes.end()) homes.push_back(home_of(r));
  if (homes.size() > 1) {
    boost::json::object copy = args;
    return move_components(
        refs, home_,
        [this, copy] {
          new_node_home_ = home_;
          return blockdev_add(copy);
        },
        std::move(reply));
  }
  iothread* where = homes.empty() ? home_ : homes.front();
  if (where == home_) {
    new_node_home_ = home_;
    return reply(blockdev_add(args));
  }
  // The drivers open on their home, where their children live, so their header reads are turns
  // of that loop; the graph takes the nodes in afterwards, here.
  auto staged = graph_->begin_add(args, env_for(where));
  block::graph* g = graph_.get();  // alive: shutdown waits for tasks
  run_at(
      where,
      [g, staged] {
        auto r = g->open_staged(*staged);
        return r ? command_outcome::success() : command_outcome::failure(r.error());
      },
      [this, staged, where, reply = std::move(reply)](command_outcome o) {
        if (!o.ok) return reply(std::move(o));
        // Homes first: a refused commit hands the nodes to the closer, which closes them there.
        for (block::node* x : staged->created) homes_[x] = where;
        auto n = graph_->commit_staged(*staged);
        if (!n) return when_closed([reply, e = n.error()] { reply(command_outcome::failure(e)); });
        adopt_new_nodes(where);
        reply(command_outcome::success());
      });
}

void supervisor_actor::blockdev_del(const std::string& name, reply_fn reply) {
  if (auto r = graph_->check_del(name); !r) return reply(command_outcome::failure(r.error()));
  with_quiesced_steps(
      {graph_->find(name)},
      [this, name](reply_fn done) {
        // The node leaves the graph here and closes on its home (the closer); the reply waits for
        // it, so the image is clean when the client hears back.
        graph_->del(name);
        when_closed([done] { done(command_outcome::success()); });
      },
      std::move(reply));
}

void supervisor_actor::block_resize(const boost::json::object& args, reply_fn reply) {
  std::string device, node_name;
  const std::string* dp = nullptr;
  const std::string* np = nullptr;
  if (auto* v = args.if_contains("device")) dp = &(device = std::string(v->as_string()));
  if (auto* v = args.if_contains("node-name")) np = &(node_name = std::string(v->as_string()));
  auto found = graph_->lookup(dp, np);
  if (!found) return reply(command_outcome::failure(found.error()));
  int64_t size = args.at("size").as_int64();
  if (size < 0) return reply(command_outcome::failure(error("Parameter 'size' expects a >0 size")));
  block::node* n = *found;
  if (n->settings().read_only) return reply(command_outcome::failure(error("Device '" + n->name() + "' is read only")));
  // The resize is a user of the node for its duration, as QEMU's temporary block backend is.
  block::perm_user u{"an unnamed block device (uses node '" + n->name() + "' as 'root' child)",
                     block::perm_resize, block::perm_all};
  if (auto r = graph_->attach_user(*n, "command:block_resize", u); !r)
    return reply(command_outcome::failure(r.error()));
  with_quiesced_steps(
      {n},
      [this, n, size](reply_fn done) {
        run_on_node(
            n,
            [size](block::node& x) {
              auto r = x.driver().truncate(size);
              return r ? command_outcome::success() : command_outcome::failure(r.error());
            },
            [this, n, done](command_outcome o) {
              graph_->detach_user(*n, "command:block_resize");
              done(std::move(o));
            });
      },
      std::move(reply));
}

command_outcome supervisor_actor::set_write_threshold(const boost::json::object& args) {
  std::string name(args.at("node-name").as_string());
  block::node* n = graph_->find(name);
  if (!n) return command_outcome::failure(error("Device '" + name + "' not found"));
  const auto& v = args.at("write-threshold");
  n->set_write_threshold(v.is_uint64() ? v.as_uint64() : uint64_t(v.as_int64()));
  return command_outcome::success();
}

}  // namespace blockd

namespace blockd {

void supervisor_actor::refresh_facts(std::function<void()> then) {
  // Children before parents, since a format's facts include its file's (read from what the file
  // published); one task per home publishes that home's nodes in this order.
  std::vector<block::node*> order;
  std::unordered_set<const block::node*> seen;
  std::function<void(block::node*)> visit = [&](block::node* n) {
    if (!seen.insert(n).second) return;
    for (block::child_edge* e : n->children()) visit(e->child);
    order.push_back(n);
  };
  for (block::node* n : graph_->nodes_newest_first()) visit(n);
  std::vector<std::pair<iothread*, std::vector<block::node*>>> by_home;
  for (block::node* n : order) {
    iothread* h = home_of(n);
    auto it = std::find_if(by_home.begin(), by_home.end(), [&](auto& p) { return p.first == h; });
    if (it == by_home.end()) it = by_home.insert(by_home.end(), {h, {}});
    it->second.push_back(n);
  }
  auto left = std::make_shared<size_t>(1);
  auto one_done = [left, then] {
    if (--*left == 0) then();
  };
  for (auto& [h, nodes] : by_home) {
    auto publish = [nodes] {
      for (block::node* n : nodes) n->publish_facts();
      return command_outcome::success();
    };
    if (h == home_) {
      publish();  // this loop is their home
      continue;
    }
    ++*left;
    run_at(h, publish, [one_done](command_outcome) { one_done(); });
  }
  one_done();
}

}  // namespace blockd

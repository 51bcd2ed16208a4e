// Block graph commands: blockdev-add/-del/-reopen/-set-active, x-blockdev-set-iothread, block_resize, write thresholds, graph queries; main iothread only.
#include <caf/all.hpp>

#include <algorithm>

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
  commands_.add("blockdev-snapshot-internal-sync", [this](args_t& a, reply_fn r) { snapshot_internal(a, std::move(r)); });
  commands_.add("blockdev-snapshot-delete-internal-sync",
                [this](args_t& a, reply_fn r) { snapshot_delete_internal(a, std::move(r)); });
  commands_.add("blockdev-reopen", [this](args_t& a, reply_fn r) { blockdev_reopen(a, std::move(r)); });
  commands_.add("blockdev-set-active", [this](args_t& a, reply_fn r) { blockdev_set_active(a, std::move(r)); });
  commands_.add("x-blockdev-set-iothread", [this](args_t& a, reply_fn r) { set_iothread(a, std::move(r)); });
  commands_.add_now("block-set-write-threshold", [this](args_t& a) { return set_write_threshold(a); });
  commands_.add_now("query-named-block-nodes", [this](args_t& a) {
    auto* flat = a.if_contains("flat");
    return command_outcome::success(block::named_block_nodes(*graph_, flat && flat->as_bool()));
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
  if (pinning_export(moving)) return reply(command_outcome::failure(error("Cannot change iothread of active block backend")));
  park_clients(moving, [this, quiesce, shared, joins, reply = std::move(reply)]() mutable {
    with_quiesced(
        quiesce,
        [this, shared, joins] {
          // Children and settings change, permissions follow for the whole affected subgraph;
          // a refused permission (another process's lock) puts every node back as it was.
          std::vector<std::unique_ptr<block::action>> list;
          list.push_back(graph_->reopen_action(std::move(*shared)));
          if (auto r = graph_->run(std::move(list)); !r) return command_outcome::failure(r.error());
          for (auto& [p, c] : joins)
            if (graph_->alive(c) && graph_->alive(p)) rehome(components({c}), home_of(p));
          return command_outcome::success();
        },
        [this, reply = std::move(reply)](command_outcome o) mutable {
          unpark_clients();
          reply(std::move(o));
        });
  });
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
  with_quiesced(
      affected,
      [this, n, active] {
        auto r = graph_->set_active(n, active);
        if (!r) return command_outcome::failure(r.error());
        return command_outcome::success();
      },
      std::move(reply));
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
  iothread* where = new_node_home_ ? new_node_home_ : home_;
  auto n = graph_->add(args);
  new_node_home_ = nullptr;
  if (!n) return command_outcome::failure(n.error());
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
  return command_outcome::success();
}

void supervisor_actor::blockdev_add_async(const boost::json::object& args, reply_fn reply) {
  // A new node lives where the nodes it references live. If they live on different iothreads they
  // first join the main loop, where QEMU opens every new node and moves its children.
  auto refs = graph_->referenced_nodes(args);
  std::vector<iothread*> homes;
  for (block::node* r : refs)
    if (std::find(homes.begin(), homes.end(), home_of(r)) == homes.end()) homes.push_back(home_of(r));
  if (homes.size() <= 1) {
    new_node_home_ = homes.empty() ? home_ : homes.front();
    return reply(blockdev_add(args));
  }
  boost::json::object copy = args;
  move_components(
      refs, home_,
      [this, copy] {
        new_node_home_ = home_;
        return blockdev_add(copy);
      },
      std::move(reply));
}

void supervisor_actor::blockdev_del(const std::string& name, reply_fn reply) {
  if (auto r = graph_->check_del(name); !r) return reply(command_outcome::failure(r.error()));
  with_quiesced(
      {graph_->find(name)},
      [this, name] {
        graph_->del(name);
        return command_outcome::success();
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
  with_quiesced(
      {n},
      [this, n, size] {
        auto r = n->driver().truncate(size);
        graph_->detach_user(*n, "command:block_resize");
        if (!r) return command_outcome::failure(r.error());
        return command_outcome::success();
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

// Supervisor: runs state-changing QMP commands, owns objects/chardevs/monitors, broadcasts events; main iothread only.
#include "actors/supervisor/supervisor.h"

#include <caf/all.hpp>
#include <sys/time.h>

#include <algorithm>
#include <chrono>

#include "actors/monitor/monitor.h"
#include "actors/node/node_actor.h"
#include "actors/runtime/pinned.h"
#include "config/chardev_spec.h"
#include "storage/block/query.h"

namespace blockd {
namespace {

// Object types QSD links in and blockd has not built yet: object-add names them as unavailable.
bool qsd_links_type(const std::string& t) {
  static const char* linked[] = {"authz-list",     "authz-listfile", "authz-pam",      "authz-simple",
                                 "pr-manager-helper", "secret",      "secret_keyring", "thread-context",
                                 "throttle-group", "tls-cipher-suites", "tls-creds-anon", "tls-creds-psk",
                                 "tls-creds-x509"};
  return std::any_of(std::begin(linked), std::end(linked), [&](const char* n) { return t == n; });
}

// Reads a non-negative int64 property the way QEMU's iothread setters check it.
result<void> read_param(const boost::json::object& args, const char* name, int64_t& out) {
  auto* v = args.if_contains(name);
  if (!v) return {};
  int64_t n = v->is_int64() ? v->as_int64() : static_cast<int64_t>(v->to_number<double>());
  if (n < 0) return fail(std::string(name) + " value must be in range [0, 9223372036854775807]");
  out = n;
  return {};
}

}  // namespace

supervisor_actor::supervisor_actor(caf::actor_config& cfg, iothread* home, supervisor_hooks hooks)
    : caf::event_based_actor(cfg), home_(home), hooks_(std::move(hooks)) {
  // Every node lives on the main iothread for now (no export or x-blockdev-set-iothread moves one yet),
  // which is also the supervisor's home: control calls into nodes never cross threads.
  graph_ = std::make_unique<block::graph>([home] {
    return block::driver_env{&home->reactor(), [home](std::function<void()> fn) { home->post(std::move(fn)); },
                             [home] { return home->is_current(); }};
  });
}

supervisor_actor::~supervisor_actor() = default;

void supervisor_actor::emit(std::string name, boost::json::object data) {
  timeval tv{};
  ::gettimeofday(&tv, nullptr);
  qmp_event ev{std::move(name), std::move(data), tv.tv_sec, tv.tv_usec};
  for (auto& s : subscribers_) send(s, event_atom::value, ev);
}

caf::behavior supervisor_actor::make_behavior() {
  return {
      [this](command_atom, const std::string& name, json_args& args) -> caf::result<command_outcome> {
        if (shutting_down_) return command_outcome::failure(error("blockd is shutting down"));
        return run_command(name, args.v);
      },
      [this](chardev_atom, const chardev_spec& spec, const std::string& note_prefix) -> command_outcome {
        return add_chardev(spec, note_prefix);
      },
      [this](monitor_atom, const std::string& chardev_id, bool pretty, const std::string& id) -> command_outcome {
        return add_monitor(chardev_id, pretty, id);
      },
      [this](subscribe_atom, const caf::actor& who) { subscribers_.push_back(who); },
      // Components (nodes, jobs, exports) raise events here; the bus stamps and broadcasts them.
      [this](event_atom, std::string& name, json_args& data) { emit(std::move(name), std::move(data.v)); },
      [this](unsubscribe_atom, const caf::actor& who) {
        subscribers_.erase(std::remove(subscribers_.begin(), subscribers_.end(), who), subscribers_.end());
      },
      [this](shutdown_atom) -> caf::result<bool> {
        shutting_down_ = true;
        auto rp = make_response_promise();
        auto left = std::make_shared<size_t>(monitors_.size());
        auto finish = [this, rp]() mutable {
          // Monitors are gone; stop every iothread object (joins its thread) and close chardevs.
          graph_.reset();
          sync_node_actors();
          objects_.clear();
          chardevs_.clear();
          rp.deliver(true);
        };
        if (*left == 0) {
          finish();
          return rp;
        }
        for (auto& m : monitors_) {
          // A client that does not read its last replies cannot hold the shutdown forever.
          request(m, std::chrono::seconds(3), close_atom::value)
              .then([left, finish](bool) mutable { if (--*left == 0) finish(); },
                    [left, finish](const caf::error&) mutable { if (--*left == 0) finish(); });
        }
        monitors_.clear();
        return rp;
      },
  };
}

caf::result<command_outcome> supervisor_actor::run_command(const std::string& name, boost::json::object& args) {
  if (name == "object-add") return object_add(args);
  if (name == "blockdev-add") return blockdev_add(args);
  if (name == "blockdev-del") return blockdev_del(std::string(args.at("node-name").as_string()));
  if (name == "block_resize") return block_resize(args);
  if (name == "blockdev-reopen") return blockdev_reopen(args);
  if (name == "blockdev-set-active") return blockdev_set_active(args);
  if (name == "block-set-write-threshold") return set_write_threshold(args);
  if (name == "object-del") return object_del(std::string(args.at("id").as_string()));
  if (name == "query-named-block-nodes") {
    auto* flat = args.if_contains("flat");
    return command_outcome::success(block::named_block_nodes(*graph_, flat && flat->as_bool()));
  }
  if (name == "query-block") return command_outcome::success(boost::json::array());  // no guest devices, as QSD
  if (name == "query-blockstats") {
    // Only nodes have statistics in blockd; without query-nodes QSD lists block backends, of which
    // blockd has none (exports will add theirs).
    auto* qn = args.if_contains("query-nodes");
    if (qn && qn->as_bool()) return command_outcome::success(block::node_blockstats(*graph_));
    return command_outcome::success(boost::json::array());
  }
  if (name == "x-debug-query-block-graph") return command_outcome::success(block::block_graph_dump(*graph_));
  if (name == "quit") {
    if (hooks_.quit_requested) hooks_.quit_requested();
    return command_outcome::success();
  }
  return command_outcome::failure(error(error_class::command_not_found, "The command " + name + " has not been found"));
}

supervisor_actor::object_entry* supervisor_actor::find_object(const std::string& id) {
  for (auto& o : objects_)
    if (o.id == id) return &o;
  return nullptr;
}

command_outcome supervisor_actor::object_add(boost::json::object& args) {
  std::string type(args.at("qom-type").as_string());
  std::string id(args.at("id").as_string());
  // Checks run in QSD's order: identifier, type, property values, duplicate id, completion.
  if (!id_wellformed(id)) return command_outcome::failure(identifier_error());
  if (type != "iothread" && type != "main-loop") {
    if (qsd_links_type(type))
      return command_outcome::failure(error("invalid object type: " + type + " (not available in blockd yet)"));
    return command_outcome::failure(error("invalid object type: " + type));
  }
  iothread_params p;
  const char* names[] = {"poll-max-ns", "poll-grow", "poll-shrink", "aio-max-batch", "thread-pool-min", "thread-pool-max"};
  int64_t* slots[] = {&p.poll_max_ns, &p.poll_grow, &p.poll_shrink, &p.aio_max_batch, &p.thread_pool_min, &p.thread_pool_max};
  for (size_t i = 0; i < std::size(names); ++i)
    if (auto r = read_param(args, names[i], *slots[i]); !r) return command_outcome::failure(r.error());
  if (find_object(id))
    return command_outcome::failure(
        error("attempt to add duplicate property '" + id + "' to object (type 'container')"));
  if (p.thread_pool_min > p.thread_pool_max || p.thread_pool_max == 0)
    return command_outcome::failure(error("bad thread-pool-min/thread-pool-max values"));
  object_entry e{id, type, p, nullptr};
  if (type == "main-loop") {
    bool exists = std::any_of(objects_.begin(), objects_.end(), [](auto& o) { return o.type == "main-loop"; });
    if (exists) return command_outcome::failure(error("only one main-loop instance allowed"));
  } else {
    try {
      e.thread = std::make_unique<iothread>(home_->system(), id, p);
    } catch (const std::exception& ex) {
      return command_outcome::failure(error("cannot start iothread '" + id + "': " + ex.what()));
    }
  }
  objects_.push_back(std::move(e));
  return command_outcome::success();
}

command_outcome supervisor_actor::object_del(const std::string& id) {
  auto* o = find_object(id);
  if (!o) return command_outcome::failure(error("object '" + id + "' not found"));
  // The main loop cannot go away while the daemon runs, as in QSD.
  if (o->type == "main-loop") return command_outcome::failure(error("object '" + id + "' is in use, can not be deleted"));
  objects_.erase(objects_.begin() + (o - objects_.data()));
  return command_outcome::success();
}

command_outcome supervisor_actor::add_chardev(const chardev_spec& spec, const std::string& note_prefix) {
  for (auto& c : chardevs_)
    if (c->id() == spec.id)
      return command_outcome::failure(
          error("attempt to add duplicate property '" + spec.id + "' to object (type 'container')"));
  auto dev = chardev::open(spec, note_prefix);
  if (!dev) return command_outcome::failure(dev.error());
  chardevs_.push_back(std::move(*dev));
  return command_outcome::success();
}

command_outcome supervisor_actor::add_monitor(const std::string& chardev_id, bool pretty, const std::string& id) {
  chardev* dev = nullptr;
  for (auto& c : chardevs_)
    if (c->id() == chardev_id) dev = c.get();
  if (!dev) return command_outcome::failure(error("chardev \"" + chardev_id + "\" not found"));
  if (dev->has_frontend()) return command_outcome::failure(error("Device '" + chardev_id + "' is in use"));
  dev->set_frontend(true);
  auto m = spawn_pinned<monitor_actor>(home_->system(), *home_, caf::actor_cast<caf::actor>(this), dev,
                                       monitor_options{id, pretty});
  monitors_.push_back(m);
  return command_outcome::success();
}

// ---- block graph commands -------------------------------------------------------------------

caf::result<command_outcome> supervisor_actor::with_quiesced(block::node& n, std::function<command_outcome()> fn) {
  return with_quiesced(std::vector<block::node*>{&n}, std::move(fn));
}

caf::result<command_outcome> supervisor_actor::with_quiesced(const std::vector<block::node*>& nodes,
                                                             std::function<command_outcome()> fn) {
  auto rp = make_response_promise<command_outcome>();
  std::vector<std::string> names;
  for (auto* n : nodes) names.push_back(n->name());
  auto left = std::make_shared<size_t>(nodes.size());
  auto run = [this, rp, names, fn]() mutable {
    // All drained: run the change, then let held requests go (a node may be gone after a delete).
    command_outcome out = fn();
    sync_node_actors();
    for (auto& name : names)
      if (auto it = node_actors_.find(name); it != node_actors_.end()) send(it->second.actor, resume_atom::value);
    rp.deliver(std::move(out));
  };
  if (nodes.empty()) {
    run();
    return rp;
  }
  // Quiescing goes through each node's actor, so it works wherever the node lives.
  for (auto* n : nodes)
    request(node_actors_.at(n->name()).actor, caf::infinite, quiesce_atom::value)
        .then([left, run](bool) mutable {
          if (--*left == 0) run();
        });
  return rp;
}

void supervisor_actor::sync_node_actors() {
  // One actor per node, on the node's home (the main iothread until exports and
  // x-blockdev-set-iothread place components elsewhere). Stale entries go first.
  for (auto it = node_actors_.begin(); it != node_actors_.end();) {
    block::node* n = graph_ ? graph_->find(it->first) : nullptr;
    if (n == it->second.n) {
      ++it;
      continue;
    }
    send_exit(it->second.actor, caf::exit_reason::user_shutdown);
    it = node_actors_.erase(it);
  }
  if (!graph_) return;
  for (block::node* n : graph_->nodes_newest_first())
    if (!node_actors_.count(n->name()))
      node_actors_.emplace(n->name(), node_entry{n, spawn_pinned<node_actor>(home_->system(), *home_, n)});
}

caf::result<command_outcome> supervisor_actor::blockdev_reopen(const boost::json::object& args) {
  auto plan = graph_->reopen_prepare(args.at("options").as_array());
  if (!plan) return command_outcome::failure(plan.error());
  auto shared = std::make_shared<block::graph::reopen_plan>(std::move(*plan));
  return with_quiesced(shared->nodes(), [this, shared] {
    graph_->reopen_commit(*shared);
    return command_outcome::success();
  });
}

caf::result<command_outcome> supervisor_actor::blockdev_set_active(const boost::json::object& args) {
  bool active = args.at("active").as_bool();
  block::node* n = nullptr;
  if (auto* v = args.if_contains("node-name")) {
    std::string name(v->as_string());
    n = graph_->find(name);
    if (!n) return command_outcome::failure(error("Failed to find node with node-name='" + name + "'"));
  }
  // Nothing may be in flight while a node gives up or takes back its image.
  std::vector<block::node*> affected = n ? std::vector<block::node*>{n} : graph_->nodes_newest_first();
  return with_quiesced(affected, [this, n, active] {
    auto r = graph_->set_active(n, active);
    if (!r) return command_outcome::failure(r.error());
    return command_outcome::success();
  });
}

command_outcome supervisor_actor::blockdev_add(const boost::json::object& args) {
  auto n = graph_->add(args);
  if (!n) return command_outcome::failure(n.error());
  sync_node_actors();
  std::string name = (*n)->name();
  // Write-threshold crossings arrive on the node's home thread; the event bus stamps and sends them.
  (*n)->on_threshold = [this, name](uint64_t exceeded, uint64_t threshold) {
    emit("BLOCK_WRITE_THRESHOLD",
         boost::json::object{{"node-name", name}, {"amount-exceeded", exceeded}, {"write-threshold", threshold}});
  };
  return command_outcome::success();
}

caf::result<command_outcome> supervisor_actor::blockdev_del(const std::string& name) {
  if (auto r = graph_->check_del(name); !r) return command_outcome::failure(r.error());
  return with_quiesced(*graph_->find(name), [this, name] {
    graph_->del(name);
    return command_outcome::success();
  });
}

caf::result<command_outcome> supervisor_actor::block_resize(const boost::json::object& args) {
  std::string device, node_name;
  const std::string* dp = nullptr;
  const std::string* np = nullptr;
  if (auto* v = args.if_contains("device")) dp = &(device = std::string(v->as_string()));
  if (auto* v = args.if_contains("node-name")) np = &(node_name = std::string(v->as_string()));
  auto found = graph_->lookup(dp, np);
  if (!found) return command_outcome::failure(found.error());
  int64_t size = args.at("size").as_int64();
  if (size < 0) return command_outcome::failure(error("Parameter 'size' expects a >0 size"));
  block::node& n = **found;
  if (n.settings().read_only) return command_outcome::failure(error("Device '" + n.name() + "' is read only"));
  // The resize is a user of the node for its duration, as QEMU's temporary block backend is.
  block::perm_user u{"an unnamed block device (uses node '" + n.name() + "' as 'root' child)",
                     block::perm_resize, block::perm_all};
  if (auto r = graph_->attach_user(n, "command:block_resize", u); !r) return command_outcome::failure(r.error());
  return with_quiesced(n, [this, &n, size] {
    auto r = n.driver().truncate(size);
    graph_->detach_user(n, "command:block_resize");
    if (!r) return command_outcome::failure(r.error());
    return command_outcome::success();
  });
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

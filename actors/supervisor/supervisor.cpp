// Supervisor: runs state-changing QMP commands, owns objects/chardevs/monitors, broadcasts events; main iothread only.
#include "actors/supervisor/supervisor.h"

#include <caf/all.hpp>
#include <sys/time.h>

#include <algorithm>
#include <chrono>
#include <future>
#include <unordered_set>

#include "actors/export/nbd_connection.h"
#include "actors/job/create_job.h"
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
  // A new node opens on the home blockdev-add chose for it (see blockdev_add_async).
  graph_ = std::make_unique<block::graph>([this] { return env_for(new_node_home_ ? new_node_home_ : home_); });
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
        auto rp = make_response_promise<command_outcome>();
        queue_.push_back({name, std::move(args.v), rp});
        pump();
        return rp;
      },
      // Exports and jobs reach a node through its actor; they ask for it here.
      [this](node_lookup_atom, const std::string& name) -> caf::result<caf::actor> {
        auto it = node_actors_.find(name);
        if (it == node_actors_.end()) return caf::make_error(caf::sec::invalid_argument, "no node " + name);
        return it->second.actor;
      },
      [this](chardev_atom, const chardev_spec& spec, const std::string& note_prefix) -> command_outcome {
        return add_chardev(spec, note_prefix);
      },
      [this](monitor_atom, const std::string& chardev_id, bool pretty, const std::string& id) -> command_outcome {
        return add_monitor(chardev_id, pretty, id);
      },
      [this](subscribe_atom, const caf::actor& who) { subscribers_.push_back(who); },
      // main(): every command-line item is applied; clients may come in now.
      [this](ready_atom) {
        if (!starting_) return;
        starting_ = false;
        for (auto& m : monitors_) send(m, start_atom::value);
        if (nbd_) nbd_->accept_clients();
      },
      // Components (nodes, jobs, exports) raise events here; the bus stamps and broadcasts them.
      [this](event_atom, std::string& name, json_args& data) { emit(std::move(name), std::move(data.v)); },
      // Job bodies ask for graph work; jobs report that they reached null (jobs.cpp).
      [this](job_graph_atom, job_graph_request& r) { job_graph(std::move(r)); },
      [this](job_gone_atom, const std::string& id) { job_gone(id); },
      // An NBD client closed (its socket is shut and nothing of it is in flight).
      [this](nbd_gone_atom, const std::string& export_id, uint64_t client_id) { nbd_client_gone(export_id, client_id); },
      [this](unsubscribe_atom, const caf::actor& who) {
        subscribers_.erase(std::remove(subscribers_.begin(), subscribers_.end(), who), subscribers_.end());
      },
      [this](shutdown_atom) -> caf::result<bool> {
        shutting_down_ = true;
        auto rp = make_response_promise();
        // Exports close first (their clients finish what is in flight), then jobs end (cancelled,
        // their workers done with the graph) while monitors still see their events; QSD cancels its
        // jobs at exit the same way.
        stop_exports(true, [this, rp]() mutable { stop_jobs([this, rp]() mutable {
          auto left = std::make_shared<size_t>(monitors_.size());
          auto finish = [this, rp]() mutable {
            // Monitors are gone; stop every iothread object (joins its thread) and close chardevs.
            // Node actors stop first, on their homes, while those loops still run; then the nodes go.
            auto g = std::move(graph_);
            sync_node_actors();
            g.reset();
            objects_.clear();
            chardevs_.clear();
            rp.deliver(true);
          };
          if (*left == 0) return finish();
          for (auto& m : monitors_) {
            // A client that does not read its last replies cannot hold the shutdown forever.
            request(m, std::chrono::seconds(3), close_atom::value)
                .then([left, finish](bool) mutable { if (--*left == 0) finish(); },
                      [left, finish](const caf::error&) mutable { if (--*left == 0) finish(); });
          }
          monitors_.clear();
        }); });
        return rp;
      },
  };
}

void supervisor_actor::pump() {
  if (pumping_) return;  // a reply delivered inside run_command: the loop below picks up the next one
  pumping_ = true;
  while (true) {
    if ((!busy_ || !jobs_hold_queue_) && !job_graph_work_.empty()) {
      auto work = std::move(job_graph_work_.front());
      job_graph_work_.pop_front();
      work();
      continue;
    }
    if (busy_ || queue_.empty()) break;
    auto p = std::move(queue_.front());
    queue_.pop_front();
    busy_ = true;
    auto rp = p.rp;
    auto done = std::make_shared<bool>(false);
    reply_fn reply = [this, rp, done](command_outcome o) mutable {
      if (*done) return;
      *done = true;
      rp.deliver(std::move(o));
      busy_ = false;
      pump();
    };
    // No handler may take the daemon down: a failure thrown inside a command ends as its error
    // reply, and the supervisor goes on with the next command.
    try {
      run_command(p.name, p.args, reply);
    } catch (const std::exception& ex) {
      reply(command_outcome::failure(error("internal error in '" + p.name + "': " + ex.what())));
    } catch (...) {
      reply(command_outcome::failure(error("internal error in '" + p.name + "'")));
    }
  }
  pumping_ = false;
}

void supervisor_actor::run_command(const std::string& name, boost::json::object& args, reply_fn reply) {
  if (name == "object-add") return reply(object_add(args));
  if (name == "blockdev-add") return blockdev_add_async(args, std::move(reply));
  if (name == "blockdev-del") {
    std::string node(args.at("node-name").as_string());
    // An exported node has a block backend in QEMU: refused before any other check but existence.
    if (graph_->find(node))
      for (auto& e : exports_)
        if (e.node_name == node) return reply(command_outcome::failure(error("Node " + node + " is in use")));
    if (auto r = check_del_held(node); !r) return reply(command_outcome::failure(r.error()));
    return blockdev_del(node, std::move(reply));
  }
  if (job_command(name, args, reply)) return;
  if (export_command(name, args, reply)) return;
  if (name == "block_resize") return block_resize(args, std::move(reply));
  if (name == "blockdev-snapshot-internal-sync") return snapshot_internal(args, std::move(reply));
  if (name == "blockdev-snapshot-delete-internal-sync") return snapshot_delete_internal(args, std::move(reply));
  if (name == "blockdev-reopen") return blockdev_reopen(args, std::move(reply));
  if (name == "blockdev-set-active") return blockdev_set_active(args, std::move(reply));
  if (name == "x-blockdev-set-iothread") return set_iothread(args, std::move(reply));
  if (name == "block-set-write-threshold") return reply(set_write_threshold(args));
  if (name == "object-del") return object_del(std::string(args.at("id").as_string()), std::move(reply));
  if (name == "query-named-block-nodes") {
    auto* flat = args.if_contains("flat");
    return reply(command_outcome::success(block::named_block_nodes(*graph_, flat && flat->as_bool())));
  }
  if (name == "query-block") return reply(command_outcome::success(boost::json::array()));  // no guest devices, as QSD
  if (name == "query-blockstats") {
    // Only nodes have statistics in blockd; without query-nodes QSD lists block backends, of which
    // blockd has none (exports will add theirs).
    auto* qn = args.if_contains("query-nodes");
    if (qn && qn->as_bool()) return reply(command_outcome::success(block::node_blockstats(*graph_)));
    return reply(command_outcome::success(boost::json::array()));
  }
  if (name == "x-debug-query-block-graph") return reply(command_outcome::success(block::block_graph_dump(*graph_)));
  if (name == "quit") {
    // QSD cancels and dismisses its jobs before it answers (their events come first). Waiting for
    // them changes no graph, so their bodies' graph work may run meanwhile.
    jobs_hold_queue_ = false;
    return stop_jobs([this, reply = std::move(reply)] {
      jobs_hold_queue_ = true;
      if (hooks_.quit_requested) hooks_.quit_requested();
      reply(command_outcome::success());
    });
  }
  reply(command_outcome::failure(error(error_class::command_not_found, "The command " + name + " has not been found")));
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
  if (type.starts_with("tls-creds-") || type == "authz-simple" || type == "authz-list")
    return tls_object_add(type, id, args);
  if (type == "authz-listfile")
    // QSD's own enum/type-name mismatch makes this type impossible to create (inventory T92).
    return command_outcome::failure(error("invalid object type: " + type));
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
  object_entry e{id, type, p, nullptr, nullptr, nullptr};
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

command_outcome supervisor_actor::tls_object_add(const std::string& type, const std::string& id,
                                                 const boost::json::object& args) {
  auto str = [&](const char* k) {
    auto* v = args.if_contains(k);
    return v && v->is_string() ? std::string(v->as_string()) : std::string();
  };
  auto flag = [&](const char* k, bool dflt) {
    auto* v = args.if_contains(k);
    return v && v->is_bool() ? v->as_bool() : dflt;
  };
  object_entry e{id, type, {}, nullptr, nullptr, nullptr};
  if (type.starts_with("tls-creds-")) {
    tls::creds_options o;
    o.type = type == "tls-creds-psk" ? tls::kind::psk : type == "tls-creds-anon" ? tls::kind::anon : tls::kind::x509;
    o.dir = str("dir");
    o.server = str("endpoint") == "server";
    o.verify_peer = flag("verify-peer", true);
    o.priority = str("priority");
    o.sanity_check = flag("sanity-check", true);
    o.username = str("username");
    if (find_object(id))
      return command_outcome::failure(
          error("attempt to add duplicate property '" + id + "' to object (type 'container')"));
    if (args.contains("passwordid"))
      return command_outcome::failure(error("tls-creds-x509 'passwordid' (an encrypted private key) is not "
                                            "supported by blockd; decrypt the key file instead"));
    auto c = tls::credentials::load(o);
    if (!c) return command_outcome::failure(c.error());
    e.creds = std::move(*c);
  } else {
    auto p = std::make_shared<tls::authz_policy>();
    if (type == "authz-simple") {
      p->rules.push_back({str("identity"), true, false});
    } else {
      p->default_allow = str("policy") == "allow";
      if (auto* rs = args.if_contains("rules"); rs && rs->is_array())
        for (auto& r : rs->as_array()) {
          const auto& ro = r.as_object();
          auto* f = ro.if_contains("format");
          p->rules.push_back({std::string(ro.at("match").as_string()), ro.at("policy").as_string() == "allow",
                              f && f->is_string() && f->as_string() == "glob"});
        }
    }
    if (find_object(id))
      return command_outcome::failure(
          error("attempt to add duplicate property '" + id + "' to object (type 'container')"));
    e.authz = std::move(p);
  }
  objects_.push_back(std::move(e));
  return command_outcome::success();
}

result<bool> supervisor_actor::authorize(const std::string& authz_id, const std::string& identity) {
  auto* o = find_object(authz_id);
  if (!o) return fail("Cannot find QAuthZ object ID " + authz_id);
  if (!o->authz) return fail("Object '" + authz_id + "' is not a QAuthZ subclass");
  return o->authz->allows(identity);
}

void supervisor_actor::object_del(const std::string& id, reply_fn reply) {
  auto* o = find_object(id);
  if (!o) return reply(command_outcome::failure(error("object '" + id + "' not found")));
  // The main loop cannot go away while the daemon runs, as in QSD.
  if (o->type == "main-loop") return reply(command_outcome::failure(error("object '" + id + "' is in use, can not be deleted")));
  if (!o->thread) {
    // TLS credentials and authz objects: an NBD server that uses credentials keeps its own
    // reference, so deleting them succeeds, as in QSD; authz is looked up again per client.
    objects_.erase(objects_.begin() + (o - objects_.data()));
    return reply(command_outcome::success());
  }
  iothread* t = o->thread.get();
  std::vector<block::node*> living;
  for (auto& [n, h] : homes_)
    if (h == t) living.push_back(const_cast<block::node*>(n));
  auto erase = [this, id] {
    // Stops and joins the thread; no node and no node actor is left on it.
    if (auto* o = find_object(id)) objects_.erase(objects_.begin() + (o - objects_.data()));
  };
  if (living.empty()) {
    erase();
    return reply(command_outcome::success());
  }
  // An export with fixed-iothread keeps its node on this iothread: the thread cannot go.
  if (const export_entry* e = pinning_export(components(living)))
    return reply(command_outcome::failure(
        error("iothread '" + id + "' runs node '" + e->node_name + "', which export '" + e->id +
              "' keeps there (fixed-iothread); delete the export first")));
  // QSD deletes the iothread under its nodes (and crashes on their next request); blockd first
  // moves them to the main loop, so the deletion succeeds as in QSD and the nodes keep working.
  move_components(living, home_, [] { return command_outcome::success(); },
                  [erase, reply = std::move(reply)](command_outcome out) {
                    if (out.ok) erase();  // nodes still live there when the move failed
                    reply(std::move(out));
                  });
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
  if (!starting_) send(m, start_atom::value);
  return command_outcome::success();
}

// ---- block graph commands -------------------------------------------------------------------

// ---- placement ------------------------------------------------------------------------------
//
// Every node has a home iothread and a connected component (a node, its children and parents,
// transitively) shares one, so a request never crosses threads inside the graph. Control calls
// from the supervisor reach a node's driver either with the node quiesced (nothing in the driver,
// new requests held; the quiesce reply and the resume message order them against the home's data
// path) or only touch what the data path does not (file locks, counters read as relaxed atomics).

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

void supervisor_actor::move_components(const std::vector<block::node*>& seeds, iothread* to,
                                       std::function<command_outcome()> then, reply_fn reply) {
  auto nodes = components(seeds);
  bool there = std::all_of(nodes.begin(), nodes.end(), [&](const block::node* n) { return home_of(n) == to; });
  if (there) return reply(then());
  // An export created with fixed-iothread holds its node (QEMU's text).
  if (pinning_export(nodes)) return reply(command_outcome::failure(error("Cannot change iothread of active block backend")));
  // Exported nodes take their NBD clients along (QEMU moves an export with its node).
  park_clients(nodes, [this, nodes, to, then, reply = std::move(reply)]() mutable {
    with_quiesced(
        nodes,
        [this, nodes, to, then] {
          rehome(nodes, to);
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

// ---- block graph commands -------------------------------------------------------------------

void supervisor_actor::with_quiesced(std::vector<block::node*> nodes, std::function<command_outcome()> fn,
                                     reply_fn reply) {
  std::vector<std::string> names;
  for (auto* n : nodes) names.push_back(n->name());
  auto run = std::make_shared<std::function<void()>>([this, names, fn = std::move(fn), reply = std::move(reply)] {
    if (!graph_) return reply(command_outcome::failure(error("blockd is shutting down")));
    // All drained: run the change, put the actors where their nodes now live, let held requests go
    // (a node may be gone after a delete).
    command_outcome out = fn();
    sync_node_actors();
    for (auto& name : names)
      if (auto it = node_actors_.find(name); it != node_actors_.end()) send(it->second.actor, resume_atom::value);
    reply(std::move(out));
  });
  if (nodes.empty()) return (*run)();
  // Quiescing goes through each node's actor, so it works wherever the node lives.
  auto left = std::make_shared<size_t>(nodes.size());
  auto one_done = [left, run] {
    if (--*left == 0) (*run)();
  };
  for (auto* n : nodes)
    request(node_actors_.at(n->name()).actor, caf::infinite, quiesce_atom::value)
        .then([one_done](bool) { one_done(); }, [one_done](const caf::error&) { one_done(); });
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
    auto* o = find_object(id);
    if (!o || o->type != "iothread") return reply(command_outcome::failure(error("Cannot find iothread " + id)));
    to = o->thread.get();
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

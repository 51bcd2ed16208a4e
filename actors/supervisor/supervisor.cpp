// Supervisor: the command queue and table, the event bus, start-up and shutdown (each responsibility's commands live in their own file); main iothread only.
#include "actors/supervisor/supervisor.h"

#include <caf/all.hpp>
#include <sys/time.h>

#include <algorithm>
#include <chrono>
#include <future>
#include <unordered_set>

#include "actors/export/nbd_connection.h"
#include "actors/job/block_job.h"
#include "actors/job/create_job.h"
#include "actors/monitor/monitor.h"
#include "actors/node/node_actor.h"
#include "actors/runtime/pinned.h"
#include "config/chardev_spec.h"
#include "storage/block/query.h"

namespace blockd {

supervisor_actor::supervisor_actor(caf::actor_config& cfg, iothread* home, supervisor_hooks hooks)
    : caf::event_based_actor(cfg), home_(home), hooks_(std::move(hooks)), commands_(qmp::qsd_schema()) {
  // A new node opens on the home blockdev-add chose for it (see blockdev_add_async).
  graph_ = std::make_unique<block::graph>([this] { return env_for(new_node_home_ ? new_node_home_ : home_); });
  // Nodes leaving the graph close on their home (placement.cpp).
  graph_->set_closer([this](std::vector<std::unique_ptr<block::node>> v) { close_detached(std::move(v)); });
  init_objects();
  register_commands();
}

supervisor_actor::~supervisor_actor() = default;

void supervisor_actor::emit(std::string name, boost::json::object data) {
  timeval tv{};
  ::gettimeofday(&tv, nullptr);
  auto key = qmp::event_throttle::key_of(name, data);
  qmp_event ev{std::move(name), std::move(data), tv.tv_sec, tv.tv_usec};
  if (!key) return broadcast(ev);
  // QEMU's monitor: the first event of a key goes out now, later ones within the second are held
  // (only the newest), and the held one goes out when the second is up.
  if (!throttle_.offer(*key, ev, throttled_)) return;
  broadcast(ev);
  delayed_send(this, std::chrono::milliseconds(qmp::event_throttle::period_ms), event_atom::value, *key);
}

void supervisor_actor::broadcast(const qmp_event& ev) {
  for (auto& s : subscribers_) send(s, event_atom::value, ev);
}

void supervisor_actor::throttle_expired(const std::string& key) {
  auto held = throttle_.expire(key, throttled_);
  if (!held) return;
  broadcast(*held);
  delayed_send(this, std::chrono::milliseconds(qmp::event_throttle::period_ms), event_atom::value, key);
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
      [this](job_edit_atom, job_edit& e) {
        auto then = std::move(e.then);
        queue_job_edit([work = std::move(e.work), then](reply_fn reply) {
          work([reply, then](command_outcome o) {
            if (then) then(o);
            reply(std::move(o));
          });
        });
      },
      [this](repoint_atom, const std::string& export_id, const std::string& node) -> caf::result<command_outcome> {
        if (shutting_down_) return command_outcome::failure(error("blockd is shutting down"));
        auto rp = make_response_promise<command_outcome>();
        queue_.push_back({"repoint", {}, rp, [this, export_id, node](reply_fn reply) {
                            block::node* to = graph_->find(node);
                            if (!to) return reply(command_outcome::failure(error("Cannot find node '" + node + "'")));
                            repoint_export(export_id, to, std::move(reply));
                          }});
        pump();
        return rp;
      },
      // Exports and jobs reach a node through its actor; they ask for it here.
      [this](node_lookup_atom, const std::string& name) -> caf::result<caf::actor> {
        auto it = node_actors_.find(name);
        if (it == node_actors_.end()) return caf::make_error(caf::sec::invalid_argument, "no node " + name);
        return it->second.actor;
      },
      [this](chardev_atom, const chardev_spec& spec, const std::string& note_prefix) -> caf::result<command_outcome> {
        auto rp = make_response_promise<command_outcome>();
        add_chardev(spec, note_prefix, [rp](command_outcome o) mutable { rp.deliver(std::move(o)); });
        return rp;
      },
      // A chardev finished opening (a server's first client, a client's first connection).
      [this](chr_ready_atom, uint64_t token, bool ok, const std::string& err) {
        auto it = chardev_waits_.find(token);
        if (it == chardev_waits_.end()) return;
        auto cb = std::move(it->second);
        chardev_waits_.erase(it);
        cb(ok ? result<void>{} : result<void>(std::unexpected(error(err))));
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
      [this](event_atom, const std::string& throttle_key) { throttle_expired(throttle_key); },
      // Job bodies ask for graph work; jobs report that they reached null (jobs.cpp).
      [this](job_graph_atom, job_graph_request& r) { job_graph(std::move(r)); },
      // Both release nodes, which edits the graph: not while a home task may be reading it.
      [this](job_gone_atom, const std::string& id) { when_no_tasks([this, id] { job_gone(id); }); },
      // An NBD client closed (its socket is shut and nothing of it is in flight).
      [this](nbd_gone_atom, const std::string& export_id, uint64_t client_id) {
        when_no_tasks([this, export_id, client_id] { nbd_client_gone(export_id, client_id); });
      },
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
            // Monitors are gone. A command's task still running at home ends first; then every
            // node leaves the graph, its actor stops and it closes on its home while those loops
            // still run; then the iothread objects stop (joining their threads) and chardevs close.
            when_no_tasks([this, rp]() mutable {
              std::vector<std::unique_ptr<block::node>> all;
              if (graph_) all = graph_->detach_all();
              auto g = std::move(graph_);
              close_detached(std::move(all));  // homes_ still knows them until the sync below
              sync_node_actors();
              when_closed([this, rp, g = std::shared_ptr<block::graph>(std::move(g))]() mutable {
                g.reset();
                // Muxes before the chardevs under them: newest first. Then the QOM tree goes.
                for (auto it = chardevs_.rbegin(); it != chardevs_.rend(); ++it) (*it)->close();
                qom_.reset();
                chardevs_.clear();
                rp.deliver(true);
              });
            });
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
    // Nodes still closing at home (after a delete) hold back the next graph change.
    if ((!busy_ || !jobs_hold_queue_) && closing_ == 0 && !job_graph_work_.empty()) {
      auto work = std::move(job_graph_work_.front());
      job_graph_work_.pop_front();
      work();
      continue;
    }
    // A finishing job's graph work: it may go while the running command only waits for a job
    // (job-finalize waits for the very finalize that asked for this edit).
    if (!editing_ && closing_ == 0 && !job_edits_.empty() && (!busy_ || yields_to_jobs_ || !jobs_hold_queue_)) {
      auto work = std::move(job_edits_.front());
      job_edits_.pop_front();
      editing_ = true;
      auto done = std::make_shared<bool>(false);
      work([this, done](command_outcome) {
        if (*done) return;
        *done = true;
        editing_ = false;
        pump();
      });
      continue;
    }
    if (busy_ || editing_ || closing_ > 0 || queue_.empty()) break;
    auto p = std::move(queue_.front());
    queue_.pop_front();
    busy_ = true;
    yields_to_jobs_ = p.name.starts_with("job-") || p.name.starts_with("block-job-");
    auto rp = p.rp;
    auto done = std::make_shared<bool>(false);
    reply_fn reply = [this, rp, done](command_outcome o) mutable {
      if (*done) return;
      *done = true;
      rp.deliver(std::move(o));
      busy_ = false;
      yields_to_jobs_ = false;
      pump();
    };
    // No handler may take the daemon down: a failure thrown inside a command ends as its error
    // reply, and the supervisor goes on with the next command.
    try {
      if (p.internal) p.internal(reply);
      else run_command(p.name, p.args, reply);
    } catch (const std::exception& ex) {
      reply(command_outcome::failure(error("internal error in '" + p.name + "': " + ex.what())));
    } catch (...) {
      reply(command_outcome::failure(error("internal error in '" + p.name + "'")));
    }
  }
  pumping_ = false;
}

void supervisor_actor::run_command(const std::string& name, boost::json::object& args, reply_fn reply) {
  if (const command_handler* h = commands_.find(name)) return (*h)(args, std::move(reply));
  // The monitor checks names against the schema, and verify() ties the schema to this table, so
  // this is reached only by a command the monitor runs itself being sent here.
  reply(command_outcome::failure(error(error_class::command_not_found, "The command " + name + " has not been found")));
}

void supervisor_actor::register_commands() {
  register_block_commands();   // block_commands.cpp
  register_job_commands();     // jobs.cpp
  register_block_job_commands();  // block_jobs.cpp
  register_export_commands();  // exports.cpp
  register_object_commands();  // objects.cpp
  register_chardev_commands(); // chardevs.cpp
  register_bitmap_commands();  // bitmaps.cpp
  register_snapshot_commands();  // external_snapshots.cpp, snapshots.cpp
  register_export_actions();     // export_actions.cpp
  register_transaction_commands();  // transaction.cpp (last: checks every action kind has a builder)
  commands_.add("quit", [this](boost::json::object&, reply_fn reply) {
    // QSD cancels and dismisses its jobs before it answers (their events come first). Waiting for
    // them changes no graph, so their bodies' graph work may run meanwhile.
    jobs_hold_queue_ = false;
    stop_jobs([this, reply = std::move(reply)] {
      jobs_hold_queue_ = true;
      if (hooks_.quit_requested) hooks_.quit_requested();
      reply(command_outcome::success());
    });
  });
  // The monitor answers these itself, without the supervisor (monitor.cpp).
  commands_.verify({"qmp_capabilities", "query-version", "query-commands", "query-qmp-schema"});
}

}  // namespace blockd

// Objects and QOM: object-add/-del and qom-* through the QOM model; iothread objects own their loops; main iothread only.
#include <caf/all.hpp>

#include <algorithm>
#include <cstring>

#include "actors/supervisor/supervisor.h"
#include "config/objects/authz.h"
#include "config/objects/event_loop.h"
#include "config/objects/secret.h"
#include "config/objects/throttle_group.h"
#include "config/objects/tls_creds.h"

namespace blockd {
namespace {

// An iothread object: its loop starts when object-add completes (after QSD's checks and the id
// claim) and stops, joined, when the object leaves the tree.
class iothread_object final : public qom::event_loop_object {
 public:
  iothread_object(caf::actor_system& sys, qom::event_loop_params p) : event_loop_object(false, p), sys_(sys) {}

  result<void> complete(qom::model& m) override {
    if (auto r = event_loop_object::complete(m); !r) return r;
    try {
      thread_ = std::make_unique<iothread>(sys_, id(), params());
    } catch (const std::exception& ex) {
      return fail("cannot start iothread '" + id() + "': " + ex.what());
    }
    return thread_context() ? pin() : result<void>{};
  }
  void on_delete() override { thread_.reset(); }
  iothread* thread() const { return thread_.get(); }

 protected:
  // qom-set of a tunable: the loop applies it at its next turn.
  void params_changed() override {
    if (thread_) thread_->set_params(params());
  }
  result<void> thread_context_changed() override { return pin(); }

 private:
  // Puts the loop (and its worker pool) on the CPUs of its thread-context, when it names one.
  result<void> pin() {
    if (!thread_) return {};
    const qom::thread_context_object* tc = thread_context();
    cpu_set_t cpus;
    if (tc) {
      cpus = tc->cpu_set();
    } else {
      // Unpinned again: the CPUs the process may use (those of the thread creating the object).
      CPU_ZERO(&cpus);
      if (::sched_getaffinity(0, sizeof cpus, &cpus) != 0) return {};
    }
    if (int r = thread_->set_affinity(cpus); r < 0)
      return fail("iothread '" + id() + "': Setting CPU affinity failed: " + std::strerror(-r) +
                  (tc ? "; give thread-context '" + tc->id() + "' CPUs this process may use" : std::string()));
    return {};
  }


  caf::actor_system& sys_;
  std::unique_ptr<iothread> thread_;
};

// The main-loop object: its values apply to the main iothread when it completes and when set.
class main_loop_object final : public qom::event_loop_object {
 public:
  main_loop_object(iothread& main, qom::event_loop_params p) : event_loop_object(true, p), main_(main) {}
  result<void> complete(qom::model& m) override {
    if (auto r = event_loop_object::complete(m); !r) return r;
    main_.set_event_loop_base_params(params());
    return {};
  }

 protected:
  void params_changed() override { main_.set_event_loop_base_params(params()); }

 private:
  iothread& main_;
};

command_outcome outcome(result<boost::json::value> r) {
  if (!r) return command_outcome::failure(r.error());
  return command_outcome::success(std::move(*r));
}

}  // namespace

void supervisor_actor::init_objects() {
  // This supervisor's registry: the built-in types, with factories that make live objects.
  types_ = qom::type_registry::global();
  types_.install_factory("iothread", [this](const std::string&, const boost::json::object& props)
                                         -> result<std::unique_ptr<qom::object>> {
    auto p = qom::event_loop_object::parse(false, props);
    if (!p) return std::unexpected(p.error());
    return std::make_unique<iothread_object>(home_->system(), *p);
  });
  // The main-loop object tunes the main iothread (its pool and batch size; QEMU's main loop does
  // not poll).
  types_.install_factory("main-loop", [this](const std::string&, const boost::json::object& props)
                                          -> result<std::unique_ptr<qom::object>> {
    auto p = qom::event_loop_object::parse(true, props);
    if (!p) return std::unexpected(p.error());
    return std::make_unique<main_loop_object>(*home_, *p);
  });
  qom_ = std::make_unique<qom::model>(types_);
  // Drivers name secrets and throttle groups in their options; each open gets the objects as
  // they are now (the open may run on another iothread, which must not read the model).
  graph_->set_object_source([this] {
    auto refs = std::make_shared<block::object_refs>();
    if (!qom_) return std::shared_ptr<const block::object_refs>(refs);
    for (qom::object* o : qom_->objects()) {
      block::object_refs::entry e;
      if (auto* s = dynamic_cast<qom::secret_common*>(o)) {
        e.is_secret = true;
        e.secret = s->bytes();
      }
      if (auto* t = dynamic_cast<qom::throttle_group_object*>(o)) e.throttle = t->state();
      refs->by_id.emplace(o->id(), std::move(e));
    }
    return std::shared_ptr<const block::object_refs>(refs);
  });
}

void supervisor_actor::register_object_commands() {
  commands_.add_now("object-add", [this](boost::json::object& a) { return outcome(qom_->object_add(a)); });
  commands_.add("object-del", [this](boost::json::object& a, reply_fn r) {
    object_del(std::string(a.at("id").as_string()), std::move(r));
  });
  for (const char* name : {"qom-list", "qom-get", "qom-set", "qom-list-types", "qom-list-properties", "qom-list-get"})
    commands_.add_now(name, [this, name = std::string(name)](boost::json::object& a) {
      auto r = qom_->run(name, a);
      return outcome(r ? std::move(*r) : fail("internal error: the QOM model does not run '" + name + "'"));
    });
}

iothread* supervisor_actor::find_iothread(const std::string& id) {
  auto* o = qom_ ? qom_->find_as<iothread_object>(id) : nullptr;
  return o ? o->thread() : nullptr;
}

result<std::shared_ptr<const tls::credentials>> supervisor_actor::tls_server_creds(const std::string& id) {
  return qom::tls_credentials(*qom_, id, true);
}

result<bool> supervisor_actor::authorize(const std::string& authz_id, const std::string& identity) {
  if (!qom_) return fail("blockd is shutting down");
  return qom::authorize(*qom_, authz_id, identity);
}

void supervisor_actor::object_del(const std::string& id, reply_fn reply) {
  // QSD's checks first (existence, users, the type's own refusal, e.g. main-loop).
  auto o = qom_->prepare_delete(id);
  if (!o) return reply(command_outcome::failure(o.error()));
  // A throttle group stays while a throttle node is in it (QSD's text; blockd adds who and the way out).
  if (dynamic_cast<qom::throttle_group_object*>(*o)) {
    std::string who;
    size_t users = 0;
    for (block::node* n : graph_->nodes_newest_first()) {
      const auto& st = n->settings();
      auto* g = st.options.if_contains("throttle-group");
      if (st.driver != "throttle" || !g || !g->is_string() || g->as_string() != id) continue;
      who += (users++ ? ", node '" : "node '") + st.name + "'";
    }
    if (users)
      return reply(command_outcome::failure(error("object '" + id + "' is in use, can not be deleted (used by " + who +
                                                  "; delete " + (users == 1 ? "that" : "those") + " first)")));
  }
  auto* io = dynamic_cast<iothread_object*>(*o);
  // TLS credentials stay alive in an NBD server that uses them (a shared reference, as QEMU
  // holds one), so deleting them succeeds as in QSD; authz is looked up again per client.
  if (!io) {
    qom_->finish_delete(id);
    return reply(command_outcome::success());
  }
  iothread* t = io->thread();
  std::vector<block::node*> living;
  for (auto& [n, h] : homes_)
    if (h == t) living.push_back(const_cast<block::node*>(n));
  // Stops and joins the thread; no node and no node actor is left on it.
  auto erase = [this, id] { qom_->finish_delete(id); };
  if (living.empty()) {
    erase();
    return reply(command_outcome::success());
  }
  // An export with fixed-iothread keeps its node on this iothread: the thread cannot go.
  if (const export_entry* e = pinning_export(components(living)))
    return reply(command_outcome::failure(
        error("iothread '" + id + "' runs node '" + export_node_name(*e) + "', which export '" + e->id +
              "' keeps there (fixed-iothread); delete the export first")));
  // QSD deletes the iothread under its nodes (and crashes on their next request); blockd first
  // moves them to the main loop, so the deletion succeeds as in QSD and the nodes keep working.
  move_components(living, home_, [] { return command_outcome::success(); },
                  [erase, reply = std::move(reply)](command_outcome out) {
                    if (out.ok) erase();  // nodes still live there when the move failed
                    reply(std::move(out));
                  });
}

}  // namespace blockd

// Supervisor: the job registry and the job commands (job-*, query-jobs, blockdev-create, x-blockdev-amend), node holds of jobs; main iothread only.
#include <caf/all.hpp>

#include <algorithm>
#include <memory>

#include "actors/job/create_job.h"
#include "actors/job/job_actor.h"
#include "actors/runtime/pinned.h"
#include "actors/supervisor/supervisor.h"
#include "config/chardev_spec.h"

namespace blockd {
namespace {

// QSD's BlockdevCreateOptions branches: the drivers QEMU can create images with.
bool qsd_can_create(const std::string& d) {
  static const char* creatable[] = {"file", "gluster", "luks", "nfs", "parallels", "qcow", "qcow2",
                                    "qed",  "rbd",     "ssh",  "vdi", "vhdx",      "vmdk", "vpc"};
  return std::any_of(std::begin(creatable), std::end(creatable), [&](const char* c) { return d == c; });
}

// BlockdevDriver values QSD's binary does not link (system-emulator only): bdrv_find_format fails.
bool qsd_lacks_driver(const std::string& d) { return d == "blkreplay"; }

// The drivers this build can create images with, for the refusal of the others.
std::string blockd_creatable() {
  std::string out;
  for (const char* d : {"file", "qcow2", "luks", "qcow", "qed", "vdi", "vhdx", "vmdk", "vpc", "parallels"}) {
    auto* e = block::find_driver(d);
    if (!e || !e->create) continue;
    if (!out.empty()) out += ", ";
    out += d;
  }
  return out;
}

std::string user_key(const std::string& job_id) { return "job:" + job_id; }

result<void> check_new_job_id(const std::string& id, bool taken) {
  // QEMU's job_create: the id follows the identifier rule (as node names), then must be free.
  if (!id_wellformed(id)) return fail("Invalid job ID '" + id + "'");
  if (taken) return fail("Job ID '" + id + "' already in use");
  return {};
}

}  // namespace

supervisor_actor::job_entry* supervisor_actor::find_job(const std::string& id) {
  for (auto& j : jobs_)
    if (j.id == id) return &j;
  return nullptr;
}

void supervisor_actor::register_job_commands() {
  static const char* verbs[][2] = {{"job-pause", "pause"},       {"job-resume", "resume"},
                                   {"job-cancel", "cancel"},     {"job-complete", "complete"},
                                   {"job-dismiss", "dismiss"},   {"job-finalize", "finalize"}};
  for (auto& [cmd, verb] : verbs)
    commands_.add(cmd, [this, verb = std::string(verb)](boost::json::object& args, reply_fn reply) {
      std::string id(args.at("id").as_string());
      auto* j = find_job(id);
      if (!j) return reply(command_outcome::failure(error("Job not found")));
      // job-cancel is always a force cancel (QEMU's qmp_job_cancel).
      request(j->actor, caf::infinite, job_verb_atom::value, verb, true)
          .then([reply](const command_outcome& out) { reply(out); },
                // The job left between the lookup and the request: it is null, i.e. not found.
                [reply](const caf::error&) { reply(command_outcome::failure(error("Job not found"))); });
    });
  commands_.add("query-jobs", [this](boost::json::object&, reply_fn r) { query_jobs(std::move(r)); });
  commands_.add("blockdev-create", [this](boost::json::object& a, reply_fn r) { blockdev_create(a, std::move(r)); });
  commands_.add("x-blockdev-amend", [this](boost::json::object& a, reply_fn r) { blockdev_amend(a, std::move(r)); });
}

void supervisor_actor::start_job(job::options o, std::shared_ptr<job_runner> runner,
                                 std::function<void(job_entry&)> hold, reply_fn reply, bool staged) {
  auto self = caf::actor_cast<caf::actor>(this);
  std::string id = o.id;
  auto a = spawn_pinned<job_actor>(home_->system(), *home_, self, std::move(o), std::move(runner));
  jobs_.push_front(job_entry{id, a, {}, {}});
  if (hold) hold(jobs_.front());
  // The job emits created and running (and, for a job that finishes at once, the rest) before it
  // answers, so those events precede the command's return, as in QSD.
  auto started = staged ? request(a, caf::infinite, job_create_atom::value) : request(a, caf::infinite, job_start_atom::value);
  started
      .then([reply](const command_outcome& out) { reply(out); },
            [reply](const caf::error& e) {
              reply(command_outcome::failure(error("internal error: the job did not start: " + to_string(e))));
            });
}

void supervisor_actor::blockdev_create(const boost::json::object& args, reply_fn reply) {
  std::string id(args.at("job-id").as_string());
  const auto& options = args.at("options").as_object();
  std::string drv(options.at("driver").as_string());
  // Checks in QEMU's order: the options of a driver without a create branch (QSD rejects their
  // members while it parses), the driver, its create support, then the job id.
  if (!qsd_can_create(drv))
    for (auto& kv : options)
      if (kv.key() != "driver")
        return reply(command_outcome::failure(error("Parameter 'options." + std::string(kv.key()) + "' is unexpected")));
  if (qsd_lacks_driver(drv))
    return reply(command_outcome::failure(error("Block driver '" + drv + "' not found or not supported")));
  const block::driver_entry* e = block::find_driver(drv);
  if (!e || !e->create) {
    if (!qsd_can_create(drv)) return reply(command_outcome::failure(error("Driver does not support blockdev-create")));
    return reply(command_outcome::failure(
        error("Driver '" + drv + "' cannot create images in this blockd version (QSD can); use one of: " +
              blockd_creatable())));
  }
  if (auto r = check_new_job_id(id, find_job(id) != nullptr); !r) return reply(command_outcome::failure(r.error()));
  auto runner = std::make_shared<create_runner>(e, options, id);
  if (graph_) runner->set_objects(graph_->objects_now());
  // QEMU's create opens the nodes its options name before its first yield, so they are held when the
  // command returns (a blockdev-del right after must be refused). The driver's resolve() gets these
  // answers, errors included, when it asks, in its own order; other references go to job_graph.
  auto hold = [this, runner, options](job_entry& j) {
    std::vector<std::pair<boost::json::value, result<block::node*>>> known;
    for (const char* member : {"file", "data-file", "header"})
      if (auto* ref = options.if_contains(member); ref && (ref->is_string() || ref->is_object()))
        known.emplace_back(*ref, job_hold(j, *ref));
    runner->preresolve(std::move(known));
  };
  // create and amend jobs always finalize on their own and wait for job-dismiss (JOB_MANUAL_DISMISS).
  start_job(job::options{id, job::type::create, true, false}, runner, hold, std::move(reply));
}

void supervisor_actor::blockdev_amend(const boost::json::object& args, reply_fn reply) {
  std::string id(args.at("job-id").as_string());
  std::string node(args.at("node-name").as_string());
  const auto& options = args.at("options").as_object();
  std::string drv(options.at("driver").as_string());
  // QEMU's order: the node, the driver, the driver of the node, amend support, the job id.
  block::node* n = graph_->find(node);
  if (!n) return reply(command_outcome::failure(error("Cannot find device='' nor node-name='" + node + "'")));
  if (qsd_lacks_driver(drv))
    return reply(command_outcome::failure(error("Block driver '" + drv + "' not found or not supported")));
  if (n->settings().driver != drv)
    return reply(command_outcome::failure(error("x-blockdev-amend doesn't support changing the block driver")));
  // QEMU amends luks and qcow2 (only its encryption).
  if (drv != "qcow2" && drv != "luks")
    return reply(command_outcome::failure(error("Driver does not support x-blockdev-amend")));
  if (auto r = check_new_job_id(id, find_job(id) != nullptr); !r) return reply(command_outcome::failure(r.error()));
  // The job holds the node (no permissions, as QEMU's bdrv_ref) until it is dismissed, so the node
  // cannot be deleted under a job that still reports on it.
  auto hold = [this, n, node, id](job_entry& j) {
    block::perm_user u{"an unnamed block device (uses node '" + node + "' as 'root' child)", 0, block::perm_all};
    if (graph_->attach_user(*n, user_key(id), u)) j.held.push_back(node);  // taking nothing cannot conflict
  };
  // An encrypted qcow2's keyslots change in its driver, as luks's do.
  if (drv == "luks" || (drv == "qcow2" && options.contains("encrypt"))) {
    // The keyslot change runs on the node's home with the node quiesced; the job then reports its
    // outcome (QSD's amend job concludes with the driver's error text, the command itself succeeds).
    bool force = args.contains("force") && args.at("force").is_bool() && args.at("force").as_bool();
    auto objs = graph_->objects_now();
    boost::json::object opts = options;
    with_quiesced_steps({n}, [this, n, opts, force, objs](reply_fn done) {
      run_on_node(n, [opts, force, objs](block::node& x) {
        auto r = x.driver().amend(opts, force, *objs);
        x.publish_facts();
        return r ? command_outcome::success() : command_outcome::failure(r.error());
      }, std::move(done));
    }, [this, id, opts, hold, reply](command_outcome o) mutable {
      if (find_job(id)) return reply(command_outcome::failure(error("Job ID '" + id + "' already in use")));
      result<void> r;
      if (!o.ok) r = std::unexpected(o.err);
      start_job(job::options{id, job::type::amend, true, false}, std::make_shared<amend_runner>(opts, std::move(r)),
                hold, std::move(reply));
    });
    return;
  }
  start_job(job::options{id, job::type::amend, true, false}, std::make_shared<amend_runner>(options), hold,
            std::move(reply));
}

void supervisor_actor::query_jobs(reply_fn reply) {
  if (jobs_.empty()) return reply(command_outcome::success(boost::json::array()));
  auto infos = std::make_shared<std::vector<boost::json::value>>(jobs_.size(), nullptr);
  auto left = std::make_shared<size_t>(jobs_.size());
  auto finish = [infos, reply] {
    boost::json::array out;
    for (auto& v : *infos)
      if (!v.is_null()) out.push_back(std::move(v));
    reply(command_outcome::success(std::move(out)));
  };
  for (size_t i = 0; i < jobs_.size(); ++i)
    request(jobs_[i].actor, caf::infinite, job_info_atom::value)
        .then(
            [infos, left, finish, i](const json_args& a) {
              (*infos)[i] = a.v;
              if (--*left == 0) finish();
            },
            // A job that just reached null is no longer listed.
            [left, finish](const caf::error&) {
              if (--*left == 0) finish();
            });
}

void supervisor_actor::job_graph(job_graph_request r) {
  job_graph_work_.push_back([this, r]() mutable {
    if (r.what == job_graph_request::op::resolve) {
      job_entry* j = find_job(r.job_id);
      r.reply->set_value(j ? job_hold(*j, r.ref) : fail("Job not found"));
    } else {
      job_release(r.job_id);
      r.reply->set_value(nullptr);
    }
  });
  pump();
}

result<block::node*> supervisor_actor::job_hold(job_entry& j, const boost::json::value& ref) {
  if (!graph_ || shutting_down_ || !jobs_hold_queue_) return fail("blockd is shutting down");
  const std::string id = j.id;
  block::node* n = nullptr;
  std::string opened;
  if (ref.is_string()) {
    std::string name(ref.as_string());
    n = graph_->find(name);
    if (!n) return fail("Cannot find device='" + name + "' nor node-name='" + name + "'");
  } else if (ref.is_object()) {
    // Inline options open a node for the job alone (QEMU gives it an automatic name; blockd needs a
    // valid node name, so it makes one up when none is given). It is closed when the job lets go.
    boost::json::object o = ref.as_object();
    // The new node opens on the main loop; a component spans one iothread, so it may only refer to
    // nodes living there (blockdev-add moves components for that; a job's inline node does not).
    for (block::node* r : graph_->referenced_nodes(o))
      if (iothread* h = home_of(r); h != home_)
        return fail("Inline node options of job '" + id + "' refer to node '" + r->name() + "' on iothread '" +
                    h->id() + "'; add that node with blockdev-add and name it in the job's options instead");
    if (!o.contains("node-name")) {
      std::string name;
      do name = "blockd-job-node" + std::to_string(++job_node_counter_);
      while (graph_->find(name));
      o["node-name"] = name;
    }
    opened = std::string(o.at("node-name").as_string());
    auto out = blockdev_add(o);
    if (!out.ok) return std::unexpected(out.err);
    n = graph_->find(opened);
  } else {
    return fail("internal error: a node reference must be a name or options");
  }
  // What QEMU's creation asks of the node through its temporary block backend: write and resize,
  // sharing everything.
  if (std::find(j.held.begin(), j.held.end(), n->name()) == j.held.end()) {
    block::perm_user u{"an unnamed block device (uses node '" + n->name() + "' as 'root' child)",
                       block::perm_write | block::perm_resize, block::perm_all};
    // One root per held node: a luks creation with a detached header holds two nodes.
    std::string key = j.held.empty() ? user_key(id) : user_key(id) + "/" + n->name();
    if (auto r = graph_->attach_user(*n, key, u); !r) {
      if (!opened.empty()) {
        graph_->del(opened);
        sync_node_actors();
      }
      return std::unexpected(r.error());
    }
    j.held.push_back(n->name());
  }
  if (!opened.empty()) j.opened.push_back(opened);
  return n;
}

void supervisor_actor::job_release(const std::string& id) {
  job_entry* j = find_job(id);
  if (!j || !graph_) return;
  for (size_t i = 0; i < j->held.size(); ++i)
    if (block::node* n = graph_->find(j->held[i]))
      graph_->detach_user(*n, i == 0 ? user_key(id) : user_key(id) + "/" + j->held[i]);
  j->held.clear();
  // The job's own nodes go now. Nothing can be in flight on them: the job was their only user and
  // its body has returned; a node someone else started to use meanwhile stays.
  bool deleted = false;
  for (auto& name : j->opened)
    if (block::node* n = graph_->find(name); n && !n->has_users()) {
      graph_->del(name);
      deleted = true;
    }
  j->opened.clear();
  if (deleted) sync_node_actors();
}

void supervisor_actor::job_gone(const std::string& id) {
  job_release(id);
  auto it = std::find_if(jobs_.begin(), jobs_.end(), [&](const job_entry& j) { return j.id == id; });
  if (it != jobs_.end()) jobs_.erase(it);
}

result<void> supervisor_actor::check_del_held(const std::string& node) const {
  // QEMU looks the node up and checks that the monitor owns it first; those errors stay graph's.
  block::node* n = graph_ ? graph_->find(node) : nullptr;
  if (!n || !n->monitor_owned) return {};
  if (auto r = check_job_blockers(*n); !r) return r;
  for (auto& j : jobs_)
    if (j.target_of_job == node) return fail("Node " + node + " is in use");
  for (auto& j : jobs_)
    if (std::find(j.held.begin(), j.held.end(), node) != j.held.end())
      return fail("Block device " + node + " is in use by job '" + j.id +
                  "'; wait for the job to conclude and dismiss it (job-dismiss), or cancel it (job-cancel)");
  return {};
}

void supervisor_actor::stop_jobs(std::function<void()> then) {
  // One at a time, newest first, as QEMU's job_cancel_sync_all walks its list: a concluded job is
  // dismissed at once, a working one is cancelled and answers once its body has ended and it
  // reached null (by then job_gone has taken it out of jobs_).
  if (jobs_.empty()) return then();
  request(jobs_.front().actor, caf::infinite, job_stop_atom::value)
      .then([this, then, id = jobs_.front().id](bool) { stop_next_job(id, then); },
            [this, then, id = jobs_.front().id](const caf::error&) { stop_next_job(id, then); });
}

void supervisor_actor::stop_next_job(const std::string& stopped, std::function<void()> then) {
  // A job actor that failed never sent job_gone: drop it here so the walk always moves on.
  if (!jobs_.empty() && jobs_.front().id == stopped) job_gone(stopped);
  stop_jobs(std::move(then));
}

}  // namespace blockd

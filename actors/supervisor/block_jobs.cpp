// Supervisor: the block-job commands (block-job-*, query-block-jobs, block-stream, block-commit), their op blockers and the graph work of their finalization (rebase, pivot); main iothread only.
#include <caf/all.hpp>

#include <algorithm>
#include <cstring>
#include <memory>

#include "actors/job/engine_job.h"
#include "actors/supervisor/supervisor.h"

namespace blockd {
namespace {

// A prepare step of a job that does not follow writes (stream, intermediate commit).
auto without_sync(std::function<void(std::function<void(result<void>)>)> step) {
  return [step = std::move(step)](engine_job_plan::home_sync, std::function<void(result<void>)> done) {
    step(std::move(done));
  };
}

// QEMU's op blocker on a backing file (an overlay keeps its backing file as it is).
result<void> not_backing(const block::node& n) {
  for (const block::child_edge* e : n.parents)
    if (e->role == "backing")
      return fail("Node '" + n.name() + "' is busy: node is used as backing hd of '" + e->parent->name() + "'");
  return {};
}

std::string user_key(const std::string& job_id) { return "job:" + job_id; }

std::optional<std::string> str_arg(const boost::json::object& a, const char* k) {
  auto* v = a.if_contains(k);
  if (!v || !v->is_string()) return std::nullopt;
  return std::string(v->as_string());
}

bool is_filter_node(const block::node& n) {
  auto* e = block::find_driver(n.settings().driver);
  return e && e->is_filter;
}

// The next node down the chain: a filter's child, an image's backing file (QEMU's
// bdrv_filter_or_cow_bs).
block::node* below(const block::node& n) {
  if (is_filter_node(n)) {
    auto kids = n.children();
    return kids.empty() ? nullptr : kids.front()->child;
  }
  auto* b = n.slot("backing");
  return b ? b->child : nullptr;
}

}  // namespace

result<void> supervisor_actor::check_job_blockers(const block::node& n) const {
  for (auto& j : jobs_)
    if (j.block_kind && std::find(j.blocked.begin(), j.blocked.end(), n.name()) != j.blocked.end())
      return fail("Node '" + n.name() + "' is busy: block device is in use by block job: " + job::name(*j.block_kind));
  return {};
}

void supervisor_actor::register_block_job_commands() {
  // The block-job-* verbs: the job is looked up among block jobs (DeviceNotActive otherwise).
  struct verb_cmd {
    const char* cmd;
    const char* verb;
    const char* key;
  };
  static const verb_cmd verbs[] = {{"block-job-set-speed", "set-speed", "device"}, {"block-job-cancel", "cancel", "device"},
                                   {"block-job-pause", "pause", "device"},         {"block-job-resume", "resume", "device"},
                                   {"block-job-complete", "complete", "device"},   {"block-job-dismiss", "dismiss", "id"},
                                   {"block-job-finalize", "finalize", "id"}};
  for (auto& v : verbs)
    commands_.add(v.cmd, [this, verb = std::string(v.verb), key = std::string(v.key)](boost::json::object& args,
                                                                                     reply_fn reply) {
      std::string id(args.at(key).as_string());
      auto not_found = [id] {
        return command_outcome::failure(error(error_class::device_not_active, "Block job '" + id + "' not found"));
      };
      auto* j = find_job(id);
      if (!j || !j->block_kind) return reply(not_found());
      request(j->actor, caf::infinite, block_verb_atom::value, verb, json_args{args})
          .then([reply](const command_outcome& out) { reply(out); },
                [reply, not_found](const caf::error&) { reply(not_found()); });
    });
  commands_.add("query-block-jobs", [this](boost::json::object&, reply_fn reply) {
    std::vector<caf::actor> actors;
    for (auto& j : jobs_)
      if (j.block_kind) actors.push_back(j.actor);
    if (actors.empty()) return reply(command_outcome::success(boost::json::array()));
    auto infos = std::make_shared<std::vector<boost::json::value>>(actors.size(), nullptr);
    auto left = std::make_shared<size_t>(actors.size());
    auto finish = [infos, reply] {
      boost::json::array out;
      for (auto& v : *infos)
        if (!v.is_null()) out.push_back(std::move(v));
      reply(command_outcome::success(std::move(out)));
    };
    for (size_t i = 0; i < actors.size(); ++i)
      request(actors[i], caf::infinite, block_info_atom::value)
          .then([infos, left, finish, i](const json_args& a) {
                  if (!a.v.empty()) (*infos)[i] = a.v;
                  if (--*left == 0) finish();
                },
                [left, finish](const caf::error&) {
                  if (--*left == 0) finish();
                });
  });
  commands_.add("block-stream", [this](boost::json::object& a, reply_fn r) { block_stream(a, std::move(r)); });
  commands_.add("block-commit", [this](boost::json::object& a, reply_fn r) { block_commit(a, std::move(r)); });
  register_mirror_commands();
  register_backup_commands();
}

void supervisor_actor::queue_job_edit(std::function<void(reply_fn)> work) {
  // A finishing job's graph work queues like a command: no command sees it half done.
  job_edits_.push_back(std::move(work));
  pump();
}

void supervisor_actor::block_stream(const boost::json::object& args, reply_fn reply) {
  auto failed = [&reply](std::string text) { reply(command_outcome::failure(error(std::move(text)))); };
  std::string device(args.at("device").as_string());
  std::string id = str_arg(args, "job-id").value_or("");
  auto base = str_arg(args, "base"), base_node = str_arg(args, "base-node"), bottom = str_arg(args, "bottom");
  auto backing_file = str_arg(args, "backing-file"), filter_name = str_arg(args, "filter-node-name");
  bool mask = args.contains("backing-mask-protocol") && args.at("backing-mask-protocol").as_bool();
  block::node* top = graph_->find(device);
  if (!top) return failed("Cannot find device='" + device + "' nor node-name='" + device + "'");
  if (base && base_node) return failed("'base' and 'base-node' cannot be specified at the same time");
  if (base && bottom) return failed("'base' and 'bottom' cannot be specified at the same time");
  if (bottom && base_node) return failed("'bottom' and 'base-node' cannot be specified at the same time");
  auto in_chain = [top](const block::node* x) {
    for (block::node* n = below(*top); n; n = below(*n))
      if (n == x) return true;
    return false;
  };
  block::node* base_bs = nullptr;
  if (base) {
    for (block::node* n = below(*top); n && !base_bs; n = below(*n))
      if (!is_filter_node(*n) && graph_->filename(*n) == *base) base_bs = n;
    if (!base_bs) return failed("Can't find '" + *base + "' in the backing chain");
  }
  if (base_node) {
    base_bs = graph_->find(*base_node);
    if (!base_bs) return failed("Cannot find device='' nor node-name='" + *base_node + "'");
    if (base_bs == top || !in_chain(base_bs))
      return failed("Node '" + *base_node + "' is not a backing image of '" + device + "'");
  }
  block::node* bottom_bs = nullptr;
  if (bottom) {
    bottom_bs = graph_->find(*bottom);
    if (!bottom_bs) return failed("Cannot find device='' nor node-name='" + *bottom + "'");
    if (is_filter_node(*bottom_bs)) return failed("Node '" + *bottom + "' is a filter, use a non-filter node as 'bottom'");
    if (bottom_bs != top && !in_chain(bottom_bs))
      return failed("Node '" + *bottom + "' is not in a chain starting from '" + device + "'");
    base_bs = below(*bottom_bs);
  }
  // Every node from the top down to the base is checked for another job's blocker.
  for (block::node* n = top; n && n != base_bs; n = below(*n))
    if (auto r = check_job_blockers(*n); !r) return reply(command_outcome::failure(r.error()));
  if (!base_bs && backing_file) return failed("backing file specified, but streaming the entire chain");
  if (filter_name && !block::node_name_valid(*filter_name))
    return failed("Could not create node: Invalid node-name: '" + *filter_name + "'");
  if (filter_name && graph_->find(*filter_name))
    return failed("Could not create node: Duplicate nodes with node-name='" + *filter_name + "'");
  if (!id_wellformed(id)) return failed("Invalid job ID '" + id + "'");
  if (find_job(id)) return failed("Job ID '" + id + "' already in use");

  // The images between the top and the base: their data is copied, and they are blocked meanwhile.
  std::vector<block::node*> between;
  int images = 0;
  for (block::node* n = below(*top); n && n != base_bs; n = below(*n)) {
    between.push_back(n);
    if (!is_filter_node(*n)) ++images;
  }
  auto speed = args.contains("speed") ? args.at("speed").to_number<int64_t>() : 0;
  auto on_error = parse_on_error(str_arg(args, "on-error").value_or("report")).value_or(on_error_policy::report);
  bool auto_finalize = !args.contains("auto-finalize") || args.at("auto-finalize").as_bool();
  bool auto_dismiss = !args.contains("auto-dismiss") || args.at("auto-dismiss").as_bool();

  // The copy-on-read filter the job reads through goes above the top (QEMU names it when the user
  // does not); with a base it copies only what lies above it.
  std::string fname = filter_name.value_or("");
  if (fname.empty()) {
    do fname = "blockd-stream-filter" + std::to_string(++job_node_counter_);
    while (graph_->find(fname));
  }
  boost::json::object fopts{{"driver", "copy-on-read"}, {"node-name", fname}, {"file", device}};
  if (base_bs && !between.empty()) {
    block::node* lowest = nullptr;
    for (auto* n : between)
      if (!is_filter_node(*n)) lowest = n;
    if (lowest) fopts["bottom"] = lowest->name();
  }
  std::string top_name = device;
  std::string base_name = base_bs ? base_bs->name() : "";
  std::vector<std::string> between_names;
  for (auto* n : between) between_names.push_back(n->name());

  with_quiesced_steps({top}, [this, fopts, fname, top_name](reply_fn done) {
    // The filter opens where the top lives (blockdev_add_async sends the open home).
    blockdev_add_async(fopts, [this, fname, top_name, done](command_outcome out) {
    if (!out.ok) return done(out);
    block::node* f = graph_->find(fname);
    block::node* t = graph_->find(top_name);
    if (!f || !t) return done(command_outcome::failure(error("internal error: the stream filter is gone")));
    f->monitor_owned = false;  // the job's own node: it goes with the job
    if (auto r = graph_->insert_filter(*f, *t); !r) {
      graph_->del(fname);
      sync_node_actors();
      return done(command_outcome::failure(r.error()));
    }
    sync_node_actors();
    done(command_outcome::success());
    });
  }, [=, this](command_outcome added) mutable {
    if (!added.ok) return reply(added);
    block::node* f = graph_->find(fname);
    block::node* t = graph_->find(top_name);
    if (!f || !t) return reply(command_outcome::failure(error("internal error: the stream filter is gone")));
    engine_job_plan plan;
    plan.home = home_of(t);
    // The engine reads the top with copy-up (the filter serves the guest's reads); what lies in
    // the top already, or in the base and below, is skipped.
    int last = base_name.empty() ? 1 << 30 : images + 1;
    plan.settings = [t, last] {
      block::copy_settings s;
      s.source = t;
      s.mode = block::copy_mode::copy_up;
      s.granularity = 512 * 1024;  // QEMU streams in 512 KiB steps
      s.max_chunk = 512 * 1024;
      s.max_workers = 8;           // QEMU streams one step at a time; blockd keeps several in flight
      s.policy = block::copy_policy_above(last, true);
      return s;
    };
    plan.on_source_error = plan.on_target_error = on_error;
    plan.ignore_skips = true;
    plan.nothing_to_do = images == 0;
    auto bf = backing_file;
    // With nothing above the base the chain stays as it is, and the job ends within the command.
    if (images > 0)
      plan.finish = without_sync(
          edit_step([this, top_name, base_name, bf, mask](reply_fn r) { rebase(top_name, base_name, bf, mask, std::move(r)); }));
    plan.clean = [edit = edit_step([this, fname, id, between_names](reply_fn r) {
                    drop_job_filter(fname, id, between_names, std::move(r));
                  })] { edit([](result<void>) {}); };
    auto runner = std::make_shared<engine_job_runner>(job::type::stream, std::move(plan));
    runner->initial_speed(speed);
    auto hold = [this, f, t, between, id](job_entry& j) {
      j.block_kind = job::type::stream;
      j.blocked.push_back(f->name());
      j.blocked.push_back(t->name());
      for (auto* n : between) j.blocked.push_back(n->name());
      // The job reads through the filter and lets everyone else write (QEMU's stream takes
      // consistent-read and write-unchanged, sharing all).
      block::perm_user u{"block job '" + id + "'", block::perm_consistent_read | block::perm_write_unchanged,
                         block::perm_all};
      (void)graph_->attach_user(*f, user_key(id) + "/stream", u);
    };
    start_job(job::options{id, job::type::stream, auto_finalize, auto_dismiss}, runner, hold, std::move(reply));
  });
}

void supervisor_actor::block_commit(const boost::json::object& args, reply_fn reply) {
  auto failed = [&reply](std::string text) { reply(command_outcome::failure(error(std::move(text)))); };
  std::string device(args.at("device").as_string());
  std::string id = str_arg(args, "job-id").value_or("");
  auto top = str_arg(args, "top"), top_node = str_arg(args, "top-node");
  auto base = str_arg(args, "base"), base_node = str_arg(args, "base-node");
  auto backing_file = str_arg(args, "backing-file");
  // QEMU's order: the device (looked up first, DeviceNotFound), its blocker, top, base, then the chain.
  block::node* bs = graph_->find(device);
  if (!bs)
    return reply(command_outcome::failure(error(error_class::device_not_found, "Device '" + device + "' not found")));
  if (auto r = check_job_blockers(*bs); !r) return reply(command_outcome::failure(r.error()));
  auto chain_has = [](block::node* from, const block::node* x) {
    for (block::node* n = from; n; n = below(*n))
      if (n == x) return true;
    return false;
  };
  auto find_file = [this](block::node* from, const std::string& f) -> block::node* {
    for (block::node* n = below(*from); n; n = below(*n))
      if (!is_filter_node(*n) && graph_->filename(*n) == f) return n;
    return nullptr;
  };
  block::node* top_bs = bs;
  if (top_node && top) return failed("'top-node' and 'top' are mutually exclusive");
  if (top_node) {
    top_bs = graph_->find(*top_node);
    if (!top_bs) return failed("Cannot find device='' nor node-name='" + *top_node + "'");
    if (!chain_has(bs, top_bs)) return failed("'" + *top_node + "' is not in this backing file chain");
  } else if (top && !top->empty()) {
    top_bs = find_file(bs, *top);
    if (!top_bs) return failed("Top image file " + *top + " not found");
  }
  block::node* base_bs = nullptr;
  if (base_node && base) return failed("'base-node' and 'base' are mutually exclusive");
  if (base_node) {
    base_bs = graph_->find(*base_node);
    if (!base_bs) return failed("Cannot find device='' nor node-name='" + *base_node + "'");
    if (!chain_has(top_bs, base_bs)) return failed("'" + *base_node + "' is not in this backing file chain");
  } else if (base && !base->empty()) {
    base_bs = find_file(top_bs, *base);
    if (!base_bs) return failed("Can't find '" + *base + "' in the backing chain");
  } else {
    base_bs = top_bs;  // the bottom of the chain
    while (block::node* n = below(*base_bs)) base_bs = n;
  }
  if (top_bs == base_bs) return failed("cannot commit an image into itself");
  for (block::node* n = top_bs; n && n != base_bs; n = below(*n))
    if (auto r = check_job_blockers(*n); !r) return reply(command_outcome::failure(r.error()));
  if (auto r = check_job_blockers(*base_bs); !r) return reply(command_outcome::failure(r.error()));
  bool active = top_bs == bs;
  if (active && backing_file) return failed("'backing-file' specified, but 'top' is the active layer");
  // The image whose backing file the commit changes (QEMU's overlay of top).
  block::node* overlay = nullptr;
  if (!active)
    for (block::node* n = bs; n && !overlay; n = below(*n))
      if (below(*n) == top_bs) overlay = n;
  if (!active && overlay)
    if (auto r = check_job_blockers(*overlay); !r) return reply(command_outcome::failure(r.error()));
  if (auto fn = str_arg(args, "filter-node-name"); fn && !block::node_name_valid(*fn))
    return failed("Could not create node: Invalid node-name: '" + *fn + "'");
  if (!id_wellformed(id)) return failed("Invalid job ID '" + id + "'");
  if (find_job(id)) return failed("Job ID '" + id + "' already in use");
  if (base_bs->settings().read_only)
    return failed("Base image '" + base_bs->name() + "' is read-only; reopen it read-write (blockdev-reopen) to commit into it");
  if (base_bs->length() < top_bs->length()) {
    // QEMU's commit grows a smaller base to the top's length first; here that happens before the
    // job starts (quiesced, as block_resize), and the command then runs again on the grown chain.
    std::string bname = base_bs->name();
    int64_t len = top_bs->length();
    block::perm_user u{"block job '" + id + "'", block::perm_resize, block::perm_all};
    if (auto r = graph_->attach_user(*base_bs, "command:commit-grow", u); !r)
      return reply(command_outcome::failure(r.error()));
    return with_quiesced_steps({base_bs}, [this, bname, len](reply_fn done) {
      block::node* b = graph_->find(bname);
      if (!b) return done(command_outcome::failure(error("Base image '" + bname + "' went away")));
      run_on_node(b, [len, bname](block::node& x) {
        auto r = x.driver().truncate(len);
        if (!r) return command_outcome::failure(error("Could not grow base image '" + bname + "' to the size of the top: " + r.error().desc));
        return command_outcome::success();
      }, [this, bname, done](command_outcome o) {
        if (block::node* b = graph_->find(bname)) graph_->detach_user(*b, "command:commit-grow");
        done(std::move(o));
      });
    }, [this, again = args, reply](command_outcome grown) mutable {
      if (!grown.ok) return reply(grown);
      block_commit(again, std::move(reply));
    });
  }

  std::vector<block::node*> between;  // top .. above base: dropped from the chain afterwards
  int images = 0;
  for (block::node* n = top_bs; n && n != base_bs; n = below(*n)) {
    between.push_back(n);
    if (!is_filter_node(*n)) ++images;
  }
  auto speed = args.contains("speed") ? args.at("speed").to_number<int64_t>() : 0;
  auto on_error = parse_on_error(str_arg(args, "on-error").value_or("report")).value_or(on_error_policy::report);
  bool auto_finalize = !args.contains("auto-finalize") || args.at("auto-finalize").as_bool();
  bool auto_dismiss = !args.contains("auto-dismiss") || args.at("auto-dismiss").as_bool();
  if (active) return commit_active(id, bs, base_bs, speed, on_error, auto_finalize, auto_dismiss, std::move(reply));

  engine_job_plan plan;
  plan.home = home_of(top_bs);
  plan.settings = [top_bs, base_bs, images] {
    block::copy_settings s;
    s.source = top_bs;
    s.target = base_bs;
    s.granularity = 512 * 1024;  // QEMU's commit steps
    s.max_chunk = 512 * 1024;
    s.max_workers = 8;
    s.policy = block::copy_policy_above(images);
    return s;
  };
  plan.on_source_error = plan.on_target_error = on_error;
  // QEMU's commit retries a failed step under "ignore" (its loop goes on at the same offset); only stream
  // skips it and ends with the error.
  plan.ignore_skips = false;
  std::string ov = overlay ? overlay->name() : "", bname = base_bs->name();
  bool mask = args.contains("backing-mask-protocol") && args.at("backing-mask-protocol").as_bool();
  std::vector<std::string> dropped;
  for (auto* n : between) dropped.push_back(n->name());
  plan.finish =
      without_sync(edit_step([this, ov, bname, backing_file, mask](reply_fn r) {
        rebase(ov, bname, backing_file, mask, std::move(r));
      }));
  plan.clean = [edit = edit_step([this, dropped](reply_fn r) {
                  std::vector<block::node*> gone;
                  for (auto& n : dropped)
                    if (block::node* x = graph_->find(n)) gone.push_back(x);
                  graph_->release_unused(gone);
                  sync_node_actors();
                  r(command_outcome::success());
                })] { edit([](result<void>) {}); };
  auto runner = std::make_shared<engine_job_runner>(job::type::commit, std::move(plan));
  runner->initial_speed(speed);
  auto hold = [this, between, base_bs, overlay, id](job_entry& j) {
    j.block_kind = job::type::commit;
    for (auto* n : between) j.blocked.push_back(n->name());
    j.blocked.push_back(base_bs->name());
    if (overlay) j.blocked.push_back(overlay->name());
    // The job writes into the base what reads of the layers above already show (QEMU's commit
    // takes write there and lets the guest go on).
    block::perm_user u{"block job '" + id + "'", block::perm_write | block::perm_consistent_read, block::perm_all};
    if (graph_->attach_user(*base_bs, user_key(id), u)) j.held.push_back(base_bs->name());
  };
  start_job(job::options{id, job::type::commit, auto_finalize, auto_dismiss}, runner, hold, std::move(reply));
}

void supervisor_actor::commit_active(const std::string& id, block::node* top, block::node* base, int64_t speed,
                                     on_error_policy on_error, bool auto_finalize, bool auto_dismiss, reply_fn reply) {
  int images = 0;
  std::vector<block::node*> between;
  for (block::node* n = top; n && n != base; n = below(*n)) {
    between.push_back(n);
    if (!is_filter_node(*n)) ++images;
  }
  engine_job_plan plan;
  plan.home = home_of(top);
  plan.ready_when_idle = true;
  plan.skipped_is_progress = false;  // READY's len is what had to be copied, as QEMU's
  plan.settings = [top, base, images] {
    block::copy_settings s;
    s.source = top;
    s.target = base;
    s.granularity = 65536;
    s.policy = block::copy_policy_above(images);
    s.zeroes_charged = false;
    return s;
  };
  // The work map starts with what lies above the base (QEMU's mirror scans the allocation first).
  plan.fill = [](block::copy_engine& e, std::function<void(int)> ready) { e.scan(std::move(ready)); };
  plan.on_source_error = plan.on_target_error = on_error;
  std::string tname = top->name(), bname = base->name();
  plan.finish = [this, tname, bname](engine_job_plan::home_sync sync, std::function<void(result<void>)> done) {
    edit_step([this, tname, bname, sync](reply_fn r) { pivot(tname, bname, sync, std::move(r)); })(std::move(done));
  };
  auto runner = std::make_shared<engine_job_runner>(job::type::commit, std::move(plan));
  runner->initial_speed(speed);
  auto hold = [this, between, base, id](job_entry& j) {
    j.block_kind = job::type::commit;
    for (auto* n : between) j.blocked.push_back(n->name());
    j.blocked.push_back(base->name());
    block::perm_user u{"block job '" + id + "'", block::perm_write | block::perm_consistent_read, block::perm_all};
    if (graph_->attach_user(*base, user_key(id), u)) j.held.push_back(base->name());
  };
  start_job(job::options{id, job::type::commit, auto_finalize, auto_dismiss}, runner, hold, std::move(reply));
}

void supervisor_actor::pivot(const std::string& from_name, const std::string& to_name, engine_job_plan::home_sync sync,
                             reply_fn reply, std::string to_backing) {
  block::node* from = graph_->find(from_name);
  block::node* to = graph_->find(to_name);
  if (!from || !to) return reply(command_outcome::failure(error("Node '" + from_name + "' went away before the pivot")));
  // Writers stop (their requests complete), the engine copies what they dirtied last, then every
  // user of `from` moves to `to` with both drained, and the writers go on there.
  park_clients({from}, [this, from_name, to_name, sync, reply, to_backing]() mutable {
    block::node* f = graph_->find(from_name);
    if (!f) {
      unpark_clients();
      return reply(command_outcome::failure(error("Node '" + from_name + "' went away before the pivot")));
    }
    run_on_node(f, [sync](block::node& x) {
      int rc = x.env().block_on([&](std::function<void(int)> d) { sync(std::move(d)); });
      if (rc < 0) return command_outcome::failure(error(std::string("The last copy before the pivot failed: ") + std::strerror(-rc)));
      return command_outcome::success();
    }, [this, from_name, to_name, reply, to_backing](command_outcome synced) mutable {
      if (!synced.ok) {
        unpark_clients();
        return reply(synced);
      }
      block::node* f = graph_->find(from_name);
      block::node* t = graph_->find(to_name);
      if (!f || !t) {
        unpark_clients();
        return reply(command_outcome::failure(error("Node '" + from_name + "' went away before the pivot")));
      }
      with_quiesced({f, t}, [this, from_name, to_name, to_backing] {
        block::node* f = graph_->find(from_name);
        block::node* t = graph_->find(to_name);
        if (!f || !t) return command_outcome::failure(error("Node '" + from_name + "' went away before the pivot"));
        if (auto r = graph_->replace_node(*f, *t); !r) return command_outcome::failure(r.error());
        // drive-mirror's new image gets its backing node now (QEMU's MIRROR_SOURCE_BACKING_CHAIN:
        // the source's backing for sync=top, the source itself for sync=none); after the replace,
        // so the source's writers have left it.
        if (!to_backing.empty()) {
          block::node* b = graph_->find(to_backing);
          block::child_edge* slot = t->slot("backing");
          if (b && slot && slot->child != b) {
            if (auto r = graph_->set_child(*slot, b); !r) return command_outcome::failure(r.error());
            sync_node_actors();
          }
        }
        return command_outcome::success();
      }, [this, reply](command_outcome o) mutable {
        unpark_clients();
        reply(std::move(o));
      });
    });
  });
}

std::function<void(std::function<void(result<void>)>)> supervisor_actor::edit_step(std::function<void(reply_fn)> work) {
  // Called by a job (its own actor): the work reaches this actor as a message and runs here.
  return [self = caf::actor_cast<caf::actor>(this), work = std::move(work)](std::function<void(result<void>)> done) {
    caf::anon_send(self, job_edit_atom::value,
                   job_edit{work, [done = std::move(done)](command_outcome o) { done(o.as_result()); }});
  };
}

void supervisor_actor::rebase(const std::string& top_name, const std::string& base_name,
                                     std::optional<std::string> backing_file, bool mask_protocol, reply_fn reply) {
  block::node* t = graph_->find(top_name);
  block::node* b = base_name.empty() ? nullptr : graph_->find(base_name);
  if (!t || (!base_name.empty() && !b)) return reply(command_outcome::failure(error("Could not change backing file: the chain changed")));
  std::string file = b ? backing_file.value_or(graph_->filename(*b)) : "";
  std::string fmt = b ? b->settings().driver : "";
  // backing-mask-protocol (9.0): a protocol node as the new backing file is recorded as "raw" data,
  // not by its protocol's name, so tools that do not know that name can still open the chain.
  if (mask_protocol && b)
    if (auto* e = block::find_driver(fmt); e && e->protocol) fmt = "raw";
  with_quiesced_steps({t}, [this, t, b, file, fmt](reply_fn done) {
    if (auto* slot = t->slot("backing")) {
      if (auto r = graph_->set_child(*slot, b); !r) return done(command_outcome::failure(r.error()));
    }
    sync_node_actors();
    run_on_node(t, [file, fmt](block::node& x) {
      auto r = x.driver().change_backing_file(file, fmt);
      if (!r) return command_outcome::failure(error("Could not change backing file: " + r.error().desc));
      return command_outcome::success();
    }, std::move(done));
  }, std::move(reply));
}

void supervisor_actor::drop_job_filter(const std::string& filter, const std::string& id,
                                       std::vector<std::string> released, reply_fn reply) {
  block::node* f = graph_->find(filter);
  if (!f) return reply(command_outcome::success());
  graph_->detach_user(*f, user_key(id) + "/stream");
  // The export clients on the filter stop first (what they have in flight completes) and start
  // again on the node below once it is gone: a request held in the drained filter would be lost
  // with it.
  park_clients({f}, [this, filter, released, reply]() mutable {
  block::node* f = graph_->find(filter);
  if (!f) {
    unpark_clients();
    return reply(command_outcome::success());
  }
  std::vector<block::node*> q{f};
  auto kids = f->children();
  if (!kids.empty() && kids.front()->child) q.push_back(kids.front()->child);
  with_quiesced_steps(q, [this, filter, released](reply_fn done) {
    block::node* f = graph_->find(filter);
    if (f) {
      if (auto r = graph_->remove_filter(*f); !r) return done(command_outcome::failure(r.error()));
    }
    // Images the stream took out of the chain go unless someone else holds them.
    std::vector<block::node*> gone;
    for (auto& n : released)
      if (block::node* x = graph_->find(n)) gone.push_back(x);
    graph_->release_unused(gone);
    sync_node_actors();
    done(command_outcome::success());
  }, [this, reply](command_outcome o) {
    unpark_clients();
    reply(std::move(o));
  });
  });
}

}  // namespace blockd

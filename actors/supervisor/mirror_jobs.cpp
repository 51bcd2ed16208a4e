// Supervisor: the mirror commands (blockdev-mirror, drive-mirror with its target image creation) and block-job-change; main iothread only.
#include <caf/all.hpp>

#include <algorithm>
#include <cstring>
#include <memory>

#include "actors/job/engine_job.h"
#include "actors/supervisor/supervisor.h"
#include "storage/block/image_create.h"

namespace blockd {
namespace {

std::optional<std::string> str_arg(const boost::json::object& a, const char* k) {
  auto* v = a.if_contains(k);
  if (!v || !v->is_string()) return std::nullopt;
  return std::string(v->as_string());
}

std::string user_key(const std::string& job_id) { return "job:" + job_id; }

// QEMU's op blocker on a backing file (an overlay keeps its backing file as it is).
result<void> not_backing(const block::node& n) {
  for (const block::child_edge* e : n.parents)
    if (e->role == "backing")
      return fail("Node '" + n.name() + "' is busy: node is used as backing hd of '" + e->parent->name() + "'");
  return {};
}

bool is_filter_node(const block::node& n) {
  auto* e = block::find_driver(n.settings().driver);
  return e && e->is_filter;
}

}  // namespace

// QEMU's mirror runs from a root node (it puts its filter above): a node under another one, or
// under a running mirror's or active commit's filter, is not one.
bool supervisor_actor::mirror_root(const block::node& n) const {
  for (auto& j : jobs_)
    if (j.block_kind && (*j.block_kind == job::type::mirror || *j.block_kind == job::type::commit) &&
        !j.blocked.empty() && j.blocked.front() == n.name())
      return false;
  return n.parents.empty();
}

void supervisor_actor::register_mirror_commands() {
  commands_.add("blockdev-mirror", [this](boost::json::object& a, reply_fn r) { blockdev_mirror(a, std::move(r)); });
  commands_.add("drive-mirror", [this](boost::json::object& a, reply_fn r) { drive_mirror(a, std::move(r)); });
  commands_.add("block-job-change", [this](boost::json::object& a, reply_fn r) { block_job_change(a, std::move(r)); });
}

void supervisor_actor::block_job_change(const boost::json::object& args, reply_fn reply) {
  // As the other block-job verbs: looked up among block jobs (DeviceNotActive), then the job checks
  // the type, the verb and the kind's change (block_job_runner::change).
  std::string id(args.at("id").as_string());
  auto not_found = [id] {
    return command_outcome::failure(error(error_class::device_not_active, "Block job '" + id + "' not found"));
  };
  auto* j = find_job(id);
  if (!j || !j->block_kind) return reply(not_found());
  request(j->actor, caf::infinite, block_verb_atom::value, std::string("change"), json_args{args})
      .then([reply](const command_outcome& out) { reply(out); },
            [reply, not_found](const caf::error&) { reply(not_found()); });
}

void supervisor_actor::blockdev_mirror(const boost::json::object& args, reply_fn reply, mirror_extra extra) {
  auto failed = [&reply](std::string text) { reply(command_outcome::failure(error(std::move(text)))); };
  std::string device(args.at("device").as_string()), target(args.at("target").as_string());
  std::string id = str_arg(args, "job-id").value_or("");
  std::string sync(args.at("sync").as_string());
  block::node* src = graph_->find(device);
  if (!src) return failed("Cannot find device='" + device + "' nor node-name='" + device + "'");
  block::node* tgt = graph_->find(target);
  if (!tgt) return failed("Cannot find device='" + target + "' nor node-name='" + target + "'");
  if (!mirror_root(*src)) return failed("Need a root block node");
  if (auto r = check_job_blockers(*src); !r) return reply(command_outcome::failure(r.error()));
  if (src == tgt) return failed("Can't mirror node into itself");
  if (auto r = not_backing(*tgt); !r) return reply(command_outcome::failure(r.error()));
  if (auto r = check_job_blockers(*tgt); !r) return reply(command_outcome::failure(r.error()));
  if (sync == "incremental" || sync == "bitmap") return failed("Sync mode '" + sync + "' not supported");
  int64_t gran = 0;
  if (auto* g = args.if_contains("granularity")) {
    gran = g->to_number<int64_t>();
    if (gran < 512 || gran > (64 << 20)) return failed("Parameter 'granularity' expects a value in range [512B, 64MB]");
    if (gran & (gran - 1)) return failed("Parameter 'granularity' expects a power of 2");
  }
  int64_t buf_size = 16 << 20;
  if (auto* b = args.if_contains("buf-size")) {
    buf_size = b->to_number<int64_t>();
    if (buf_size < 0) return failed("Invalid parameter 'buf-size'");
    if (buf_size == 0) buf_size = 16 << 20;
  }
  block::node* replaces = nullptr;
  if (auto r = str_arg(args, "replaces")) {
    replaces = graph_->find(*r);
    if (!replaces) return failed("Failed to find node with node-name='" + *r + "'");
    if (auto nb = not_backing(*replaces); !nb) return reply(command_outcome::failure(nb.error()));
  }
  bool write_blocking = str_arg(args, "copy-mode").value_or("background") == "write-blocking";
  if (auto fn = str_arg(args, "filter-node-name"); fn && !block::node_name_valid(*fn))
    return failed("Could not create node: Invalid node-name: '" + *fn + "'");
  if (!id_wellformed(id)) return failed("Invalid job ID '" + id + "'");
  if (find_job(id)) return failed("Job ID '" + id + "' already in use");
  if (home_of(src) != home_of(tgt))
    return failed("Node '" + target + "' lives on another iothread than '" + device +
                  "'; move it there first (x-blockdev-set-iothread)");
  auto speed = args.contains("speed") ? args.at("speed").to_number<int64_t>() : 0;
  auto src_err = parse_on_error(str_arg(args, "on-source-error").value_or("report")).value_or(on_error_policy::report);
  auto tgt_err = parse_on_error(str_arg(args, "on-target-error").value_or("report")).value_or(on_error_policy::report);
  bool auto_finalize = !args.contains("auto-finalize") || args.at("auto-finalize").as_bool();
  bool auto_dismiss = !args.contains("auto-dismiss") || args.at("auto-dismiss").as_bool();
  bool target_zero = (args.contains("target-is-zero") && args.at("target-is-zero").as_bool());
  // A target that gets its backing file only at the pivot must not deallocate zero ranges now: the
  // backing file's data would show through them afterwards.
  bool unmap = extra.unmap && extra.target_backing.empty();
  bool allocated_only = extra.allocated_only;
  bool size_ok = src->length() == tgt->length();
  if (gran == 0) {
    // QEMU: the target's cluster size, within 4 KiB .. 64 KiB.
    int64_t c = tgt->facts() ? tgt->facts()->cluster_size : 0;
    gran = std::clamp<int64_t>(c > 0 ? c : 65536, 4096, 65536);
  }

  engine_job_plan plan;
  plan.home = home_of(src);
  plan.ready_when_idle = true;
  plan.skipped_is_progress = false;
  plan.nothing_to_do = false;
  plan.mirror = std::make_shared<mirror_state>();
  plan.mirror->write_blocking = write_blocking;
  plan.settings = [src, tgt, sync, gran, buf_size, target_zero, unmap, allocated_only] {
    block::copy_settings s;
    s.source = src;
    s.target = tgt;
    s.granularity = gran;
    s.buf_size = std::max<int64_t>(buf_size, gran);
    s.max_chunk = std::min<int64_t>(std::max<int64_t>(gran, 1 << 20), s.buf_size);
    s.policy = sync == "top" ? block::copy_policy_top() : block::copy_policy_full();
    if (allocated_only)
      s.policy = [full = s.policy](const block::copy_extent& e) { return e.depth == 0 ? block::copy_action::skip : full(e); };
    s.target_zeroed = target_zero;
    s.zeroes_charged = false;
    s.may_unmap = unmap;  // QEMU's mirror unmaps zero ranges of the target unless unmap=false (drive-mirror)
    return s;
  };
  // sync=none copies only what the guest writes from now on.
  plan.fill = [sync, size_ok](block::copy_engine& e, std::function<void(int)> ready) {
    if (!size_ok) return ready(-EINVAL);
    if (sync == "none") return ready(0);
    e.scan(std::move(ready));
  };
  plan.failure_text = size_ok ? "" : "Source and target image have different sizes";
  plan.on_source_error = src_err;
  plan.on_target_error = tgt_err;
  std::string from = replaces ? replaces->name() : device;
  std::string tb = extra.target_backing;
  plan.finish = [this, from, target, tb](engine_job_plan::home_sync s, std::function<void(result<void>)> done) {
    edit_step([this, from, target, s, tb](reply_fn r) { pivot(from, target, s, std::move(r), tb); })(std::move(done));
  };
  auto runner = std::make_shared<engine_job_runner>(job::type::mirror, std::move(plan));
  runner->initial_speed(speed);
  bool drive = extra.drive;
  auto hold = [this, src, tgt, id, drive](job_entry& j) {
    j.block_kind = job::type::mirror;
    if (drive) j.opened.push_back(tgt->name());  // drive-mirror's own target: closed with the job unless in use
    j.blocked.push_back(src->name());
    j.target_of_job = tgt->name();
    block::perm_user u{"block job '" + id + "'", block::perm_write, block::perm_all};
    if (graph_->attach_user(*tgt, user_key(id), u)) j.held.push_back(tgt->name());
  };
  start_job(job::options{id, job::type::mirror, auto_finalize, auto_dismiss}, runner, hold, std::move(reply));
}


// drive-mirror (QEMU 7.2's qmp_drive_mirror): the source's checks, the target image created (or
// opened, mode=existing) and opened as the job's own node, then blockdev-mirror's checks and start.
void supervisor_actor::drive_mirror(const boost::json::object& args, reply_fn reply) {
  auto failed = [&reply](std::string text) { reply(command_outcome::failure(error(std::move(text)))); };
  std::string device(args.at("device").as_string()), file(args.at("target").as_string());
  std::string sync(args.at("sync").as_string());
  auto format = str_arg(args, "format"), node_name = str_arg(args, "node-name");
  bool existing = str_arg(args, "mode").value_or("absolute-paths") == "existing";
  block::node* src = graph_->find(device);
  if (!src) return failed("Cannot find device='" + device + "' nor node-name='" + device + "'");
  if (!mirror_root(*src)) return failed("Need a root block node");
  if (auto r = check_job_blockers(*src); !r) return reply(command_outcome::failure(r.error()));
  // The new image's format is the source's unless given; an existing one is probed.
  std::string fmt = format.value_or(existing ? probe_format(file) : src->settings().driver);
  block::node* backing = cow_backing(src);
  if (!backing && sync == "top") sync = "full";
  if (sync == "none") backing = src;
  if (args.contains("replaces") && !node_name)
    return failed("a node-name must be provided when replacing a named node of the graph");

  mirror_extra extra;
  extra.drive = true;
  extra.unmap = !args.contains("unmap") || args.at("unmap").as_bool();
  // A new image without a backing file reads zeroes: sync=full copies only what is allocated
  // somewhere in the source's chain (QEMU's zero_target=false), zeroes that are allocated included.
  extra.allocated_only = sync == "full" && !existing;
  block::overlay_image img;
  img.filename = file;
  img.format = fmt;
  img.size = src->length();
  if (!existing && sync != "full" && backing) {
    // absolute-paths: the new image names the backing node's file; the job links that node under
    // it at the pivot (the image opens without it meanwhile, as QEMU's BDRV_O_NO_BACKING).
    img.backing_file = graph_->filename(*backing);
    img.backing_format = backing->settings().driver;
    extra.target_backing = backing->name();
  }
  if (!existing) {
    if (auto r = block::check_image_format(fmt, !img.backing_file.empty()); !r)
      return reply(command_outcome::failure(r.error()));
  }
  iothread* home = home_of(src);
  boost::json::object margs = args;
  for (const char* k : {"format", "node-name", "mode", "unmap"}) margs.erase(k);
  margs["sync"] = sync;
  std::string early_backing = sync == "top" ? extra.target_backing : "";
  auto open_target = [this, home, file, fmt, node_name, existing, margs, extra, early_backing,
                      reply](command_outcome created) mutable {
    if (!created.ok) return reply(created);
    boost::json::object opts{{"driver", fmt}, {"file", boost::json::object{{"driver", "file"}, {"filename", file}}}};
    // QEMU opens the new image without its backing file and links it at the pivot. For sync=top
    // blockd links the source's backing node from the start: the target's zero writes must then
    // leave zero clusters (a qcow2 without a backing file skips zeroing what reads zeroes anyway,
    // and the backing file's data would show through after the pivot). sync=none links the source
    // itself at the pivot (what shows through there is what the source reads).
    if (fmt == "qcow2")
      opts["backing"] = early_backing.empty() ? boost::json::value(nullptr) : boost::json::value(early_backing);
    if (node_name) opts["node-name"] = *node_name;
    open_job_target(home, opts, reply, [this, margs, extra, existing, reply](block::node& n) mutable {
      std::string tname = n.name();
      if (existing) {
        // QEMU opens an existing image's backing chain (the file its header names) at the pivot.
        // blockd links the node of the source's chain that has that file, from the start (as for
        // sync=top above); a header naming a file outside the source's chain is left unlinked.
        std::string want = n.facts() ? n.facts()->backing_filename : "";
        block::child_edge* slot = n.slot("backing");
        block::node* src = graph_->find(std::string(margs.at("device").as_string()));
        for (block::node* c = src; c && !want.empty() && slot; c = cow_backing(c))
          if (graph_->filename(*c) == want) {
            if (graph_->set_child(*slot, c)) {
              extra.target_backing = c->name();
              sync_node_actors();
            }
            break;
          }
      }
      margs["target"] = tname;
      blockdev_mirror(margs, drop_target_if_refused(tname, reply), extra);
    });
  };
  create_job_image(existing, src, img, std::move(open_target));
}

}  // namespace blockd

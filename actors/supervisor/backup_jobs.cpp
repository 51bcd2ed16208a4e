// Supervisor: the backup commands (blockdev-backup, drive-backup): QEMU's checks, the copy-before-write filter the job puts above its source, the bitmap's successor and its sync at the end; main iothread only (home steps marked).
#include <caf/all.hpp>

#include <algorithm>
#include <climits>
#include <memory>

#include "actors/job/engine_job.h"
#include "actors/supervisor/supervisor.h"
#include "config/chardev_spec.h"
#include "formats/filters/copy_before_write.h"
#include "storage/block/bitmap_ops.h"
#include "storage/block/image_create.h"

namespace blockd {
namespace {

std::optional<std::string> str_arg(const boost::json::object& a, const char* k) {
  auto* v = a.if_contains(k);
  if (!v || !v->is_string()) return std::nullopt;
  return std::string(v->as_string());
}

bool bool_arg(const boost::json::object& a, const char* k, bool dflt) {
  auto* v = a.if_contains(k);
  return v && v->is_bool() ? v->as_bool() : dflt;
}

std::string user_key(const std::string& job_id) { return "job:" + job_id; }

// What the guest writes to the source while the job runs (QEMU's successor bitmap of the job's
// sync bitmap): at the end it becomes the bitmap (sync) or is forgotten (the bitmap kept
// recording all along, so nothing needs merging back). Home iothread.
struct successor_hook final : block::write_hook {
  block::dirty_bitmap bits;
  bool recording;
  successor_hook(uint64_t gran, int64_t size, bool rec) : bits("", gran, size), recording(rec) {}
  void after_write(const block::io_request& r) override {
    if (recording) bits.set(r.offset, r.length);
  }
};

// The job's sync bitmap, between the filter's insertion and the job's end. Home iothread.
struct sync_bitmap {
  block::node* src = nullptr;
  std::string name;
  std::string mode;  // on-success, never, always
  std::shared_ptr<successor_hook> succ;
};

// QEMU's backup_cleanup_sync_bitmap, on the home: the bitmap is synced (made the successor: what
// was written since the job started) on success or with mode=always, never with mode=never; a
// failed always-sync gets back what the job did not copy.
void end_sync_bitmap(const std::shared_ptr<sync_bitmap>& st, block::copy_engine* e, int rc) {
  if (!st || !st->succ) return;
  block::node* src = st->src;
  src->remove_write_hook(st->succ.get());
  block::dirty_bitmap* bm = src->bitmaps().find(st->name);
  if (bm) {
    bool sync = (rc == 0 || st->mode == "always") && st->mode != "never";
    if (sync) bm->copy_bits_from(st->succ->bits);
    if (sync && rc < 0 && e) bm->merge_from(e->work_map());
    bm->busy = false;
  }
  // Freed on a later turn: the node may be walking its hook list right now.
  std::shared_ptr<successor_hook> old = std::move(st->succ);
  src->env().defer([old] {});
  src->publish_facts();
}

}  // namespace

void supervisor_actor::register_backup_commands() {
  commands_.add("blockdev-backup", [this](boost::json::object& a, reply_fn r) { blockdev_backup(a, std::move(r), {}); });
  commands_.add("drive-backup", [this](boost::json::object& a, reply_fn r) { drive_backup(a, std::move(r)); });
  // As transaction actions: prepare starts the job (with every check of the command), in the
  // transaction's group for completion-mode grouped; an abort force-cancels what started.
  for (const char* kind : {"blockdev-backup", "drive-backup"}) {
    txn_kinds_[kind].grouped = true;
    txn_kinds_[kind].build = [this, drive = std::string(kind) == "drive-backup"](const boost::json::object& d) {
      auto group = building_group_;
      auto held = building_held_;
      auto started = std::make_shared<bool>(false);
      auto a = std::make_unique<block::step_lambda_action>();
      // Prepare creates the job (filter in, every check made), commit starts it under the drain.
      a->on_prepare = [this, d, group, drive, started](block::action::prepared_fn done) {
        auto out = [started, done](command_outcome o) {
          if (!o.ok) return done(std::unexpected(o.err));
          *started = true;
          done({});
        };
        if (drive) return drive_backup(d, out, group, true);
        backup_extra extra;
        extra.group = group;
        extra.staged = true;
        blockdev_backup(d, out, extra);
      };
      a->on_commit = [this, d, held](std::function<void()> done) {
        std::string id = d.contains("job-id") ? std::string(d.at("job-id").as_string()) : "";
        auto* j = find_job(id);
        if (!j) return done();
        caf::actor actor = j->actor;
        request(actor, caf::infinite, job_start_held_atom::value)
            .then([held, actor, done](const command_outcome&) {
                    if (held) held->push_back(actor);
                    done();
                  },
                  [done](const caf::error&) { done(); });
      };
      a->on_abort = [this, d, started](std::function<void()> done) {
        std::string id = d.contains("job-id") ? std::string(d.at("job-id").as_string()) : "";
        auto* j = *started ? find_job(id) : nullptr;
        if (!j) return done();
        request(j->actor, caf::infinite, job_verb_atom::value, std::string("cancel"), true)
            .then([done](const command_outcome&) { done(); }, [done](const caf::error&) { done(); });
      };
      return std::unique_ptr<block::action>(std::move(a));
    };
  }
}

// QEMU 7.2's qmp_blockdev_backup -> do_backup_common -> backup_job_create, in its order of checks.
void supervisor_actor::blockdev_backup(const boost::json::object& args, reply_fn reply, backup_extra extra) {
  auto failed = [&reply](std::string text) { reply(command_outcome::failure(error(std::move(text)))); };
  std::string device(args.at("device").as_string()), target(args.at("target").as_string());
  block::node* src = graph_->find(device);
  if (!src) return failed("Cannot find device='" + device + "' nor node-name='" + device + "'");
  block::node* tgt = graph_->find(target);
  if (!tgt) return failed("Cannot find device='" + target + "' nor node-name='" + target + "'");
  std::string sync(args.at("sync").as_string());
  auto bitmap = str_arg(args, "bitmap");
  auto bitmap_mode = str_arg(args, "bitmap-mode");
  if ((sync == "bitmap" || sync == "incremental") && !bitmap)
    return failed("must provide a valid bitmap name for '" + sync + "' sync mode");
  if (sync == "incremental") {
    if (bitmap_mode && *bitmap_mode != "on-success")
      return failed("Bitmap sync mode must be 'on-success' when using sync mode 'incremental'");
    sync = "bitmap";
    bitmap_mode = "on-success";
  }
  // The bitmap lives on the source's home: its checks run there, then the rest continues here.
  auto rest = [this, args, extra, sync, bitmap, bitmap_mode, reply](command_outcome bm_ok) mutable {
    if (!bm_ok.ok) return reply(bm_ok);
    backup_checked(args, std::move(reply), std::move(extra), sync, bitmap, bitmap_mode);
  };
  if (!bitmap) return rest(command_outcome::success());
  std::string name = *bitmap;
  run_on_node(src, [name, sync, bitmap_mode](block::node& x) {
    block::dirty_bitmap* bm = x.bitmaps().find(name);
    if (!bm) return command_outcome::failure(error("Bitmap '" + name + "' could not be found"));
    if (!bitmap_mode) return command_outcome::failure(error("Bitmap sync mode must be given when providing a bitmap"));
    if (auto r = block::check_bitmap(*bm, block::need_allow_ro); !r) return command_outcome::failure(r.error());
    if (sync == "none") return command_outcome::failure(error("sync mode 'none' does not produce meaningful bitmap outputs"));
    if (*bitmap_mode == "never" && sync != "bitmap")
      return command_outcome::failure(
          error("Bitmap sync mode 'never' has no meaningful effect when combined with sync mode '" + sync + "'"));
    return command_outcome::success();
  }, std::move(rest));
}

void supervisor_actor::backup_checked(const boost::json::object& args, reply_fn reply, backup_extra extra, std::string sync,
                                      std::optional<std::string> bitmap, std::optional<std::string> bitmap_mode) {
  auto failed = [&reply](std::string text) { reply(command_outcome::failure(error(std::move(text)))); };
  std::string device(args.at("device").as_string()), target(args.at("target").as_string());
  block::node* src = graph_->find(device);
  block::node* tgt = graph_->find(target);
  if (!src || !tgt) return failed("Cannot find device='" + device + "' nor node-name='" + device + "'");
  if (!bitmap && bitmap_mode) return failed("Cannot specify bitmap sync mode without a bitmap");
  int64_t max_workers = 64, max_chunk = 0, min_cluster = 0;
  if (auto* p = args.if_contains("x-perf"); p && p->is_object()) {
    auto& o = p->as_object();
    if (auto* v = o.if_contains("max-workers")) max_workers = v->to_number<int64_t>();
    if (auto* v = o.if_contains("max-chunk")) max_chunk = v->to_number<int64_t>();
    if (auto* v = o.if_contains("min-cluster-size")) min_cluster = v->to_number<int64_t>();
  }
  std::string id = str_arg(args, "job-id").value_or("");
  bool compress = bool_arg(args, "compress", false);
  if (src == tgt) return failed("Source and target cannot be the same");
  if (compress && !(tgt->driver().caps() & block::cap_compress))
    return failed("Compression is not supported for this drive ");  // QEMU names the BlockBackend: none for a node
  if (auto r = check_job_blockers(*src); !r) return reply(command_outcome::failure(r.error()));
  if (auto r = check_job_blockers(*tgt); !r) return reply(command_outcome::failure(r.error()));
  if (max_workers < 1 || max_workers > INT_MAX) return failed("max-workers must be between 1 and " + std::to_string(INT_MAX));
  if (max_chunk < 0) return failed("max-chunk must be zero (which means no limit) or positive");
  if (min_cluster && (min_cluster & (min_cluster - 1))) return failed("min-cluster-size needs to be a power of 2");
  if (src->length() != tgt->length()) return failed("Source and target image have different sizes");
  auto fname = str_arg(args, "filter-node-name");
  if (fname && !block::node_name_valid(*fname)) return failed("Invalid node-name: '" + *fname + "'");
  if (fname && graph_->find(*fname)) return failed("Duplicate nodes with node-name='" + *fname + "'");
  int64_t tc = tgt->facts() ? tgt->facts()->cluster_size : 0;
  int64_t cluster = std::max<int64_t>({65536, tc, min_cluster});
  if (max_chunk && max_chunk < cluster)
    return failed("Required max-chunk (" + std::to_string(max_chunk) + ") is less than backup cluster size (" +
                  std::to_string(cluster) + ")");
  if (!id_wellformed(id)) return failed("Invalid job ID '" + id + "'");
  if (find_job(id)) return failed("Job ID '" + id + "' already in use");
  if (home_of(src) != home_of(tgt))
    return failed("Node '" + target + "' lives on another iothread than '" + device +
                  "'; move it there first (x-blockdev-set-iothread)");

  std::string filter = fname.value_or("");
  if (filter.empty()) {
    do filter = "blockd-backup-filter" + std::to_string(++job_node_counter_);
    while (graph_->find(filter));
  }
  boost::json::object fopts{{"driver", "copy-before-write"}, {"node-name", filter}, {"file", device}, {"target", target}};
  if (auto m = str_arg(args, "on-cbw-error")) fopts["on-cbw-error"] = *m;
  if (min_cluster) fopts["min-cluster-size"] = min_cluster;
  // Bitmap sync: only the bitmap's dirty chunks are copied, by the filter and by the job.
  if (sync == "bitmap") fopts["bitmap"] = boost::json::object{{"node", device}, {"name", *bitmap}};
  auto sb = bitmap ? std::make_shared<sync_bitmap>() : nullptr;
  if (sb) {
    sb->name = *bitmap;
    sb->mode = *bitmap_mode;
  }

  // Export clients of the source stop and start again on the filter: one that went on writing
  // the source directly would change the backup's point in time under it.
  park_clients({src}, [=, this]() mutable {
  if (!graph_->find(device)) {
    unpark_clients();
    return reply(command_outcome::failure(error("Cannot find device='" + device + "' nor node-name='" + device + "'")));
  }
  with_quiesced_steps({graph_->find(device)}, [this, fopts, filter, device, sb](reply_fn done) {
    blockdev_add_async(fopts, [this, filter, device, sb, done](command_outcome out) {
      if (!out.ok) return done(out);
      block::node* f = graph_->find(filter);
      block::node* s = graph_->find(device);
      if (!f || !s) return done(command_outcome::failure(error("internal error: the backup filter is gone")));
      f->monitor_owned = false;  // the job's own node: it goes with the job
      if (auto r = graph_->insert_filter(*f, *s); !r) {
        graph_->del(filter);
        sync_node_actors();
        return done(command_outcome::failure(r.error()));
      }
      sync_node_actors();
      if (!sb) return done(command_outcome::success());
      // Still drained: from the filter's first chunk map on, every guest write lands in the successor.
      run_on_node(s, [sb](block::node& x) {
        block::dirty_bitmap* bm = x.bitmaps().find(sb->name);
        if (!bm) return command_outcome::failure(error("Bitmap '" + sb->name + "' could not be found"));
        sb->src = &x;
        sb->succ = std::make_shared<successor_hook>(bm->granularity(), bm->size(), bm->enabled);
        bm->busy = true;
        x.add_write_hook(sb->succ.get());
        x.publish_facts();
        return command_outcome::success();
      }, done);
    });
  }, [=, this](command_outcome added) mutable {
    unpark_clients();
    if (!added.ok) {
      // The filter may be in (the successor failed): it goes again.
      if (graph_->find(filter)) drop_job_filter(filter, id, {}, [](command_outcome) {});
      return reply(added);
    }
    block::node* f = graph_->find(filter);
    block::node* s = graph_->find(device);
    block::node* t = graph_->find(target);
    if (!f || !s || !t) {
      // Something took a node away meanwhile: a filter still in the graph goes again, or it would go on
      // copying to the target with no job.
      if (f) drop_job_filter(filter, id, {}, [](command_outcome) {});
      return reply(command_outcome::failure(error("internal error: the backup filter is gone")));
    }
    engine_job_plan plan;
    plan.home = home_of(s);
    plan.background = sync != "none";
    plan.starts_drained = true;
    plan.skipped_is_progress = false;
    plan.skip_lowers_total = true;
    bool discard_source = bool_arg(args, "discard-source", false);
    plan.borrow = [f, sync, compress, max_workers, max_chunk, discard_source]() -> block::copy_engine* {
      auto* c = static_cast<block::cbw_state*>(f->driver().driver_extension(block::cbw_state::id));
      if (!c) return nullptr;
      block::copy_engine& e = c->engine();
      // sync=top: what the source's own layer does not hold is neither copied nor waited for.
      if (sync == "top") e.set_policy(block::copy_policy_top());
      if (compress) {
        e.set_mode(block::copy_mode::compress);
        e.set_max_chunk(c->cluster_size());  // one compressed cluster run per write
      }
      e.set_max_workers(int(max_workers));
      if (max_chunk) e.set_max_chunk(max_chunk);
      if (discard_source) e.set_discard_source(true);
      return &e;
    };
    plan.on_source_error =
        parse_on_error(str_arg(args, "on-source-error").value_or("report")).value_or(on_error_policy::report);
    plan.on_target_error =
        parse_on_error(str_arg(args, "on-target-error").value_or("report")).value_or(on_error_policy::report);
    if (sb) plan.at_end = [sb](block::copy_engine* e, int rc) { end_sync_bitmap(sb, e, rc); };
    std::vector<std::string> opened = extra.opened;
    plan.clean = [edit = edit_step([this, filter, id](reply_fn r) { drop_job_filter(filter, id, {}, std::move(r)); })] {
      edit([](result<void>) {});
    };
    auto runner = std::make_shared<engine_job_runner>(job::type::backup, std::move(plan));
    runner->initial_speed(args.contains("speed") ? args.at("speed").to_number<int64_t>() : 0);
    auto hold = [this, f, t, id, opened](job_entry& j) {
      j.block_kind = job::type::backup;
      // QEMU's backup blocks its filter and its target (the source stays free: another backup of
      // it puts its own filter above this one).
      j.blocked.push_back(f->name());
      j.blocked.push_back(t->name());
      for (auto& o : opened) j.opened.push_back(o);
      block::perm_user u{"block job '" + id + "'", 0, block::perm_all};
      if (graph_->attach_user(*t, user_key(id), u)) j.held.push_back(t->name());
    };
    bool auto_finalize = bool_arg(args, "auto-finalize", true), auto_dismiss = bool_arg(args, "auto-dismiss", true);
    start_job(job::options{id, job::type::backup, auto_finalize, auto_dismiss, extra.group}, runner, hold, std::move(reply),
              extra.staged);
  });
  });
}

// drive-backup (QEMU 7.2's drive_backup_prepare): the source's checks, the target image created
// (mode=absolute-paths) or probed (existing) and opened as the job's own node, then blockdev-backup.
void supervisor_actor::drive_backup(const boost::json::object& args, reply_fn reply, std::shared_ptr<job::txn> group,
                                    bool job_staged) {
  auto failed = [&reply](std::string text) { reply(command_outcome::failure(error(std::move(text)))); };
  std::string device(args.at("device").as_string()), file(args.at("target").as_string());
  std::string sync(args.at("sync").as_string());
  bool existing = str_arg(args, "mode").value_or("absolute-paths") == "existing";
  block::node* src = graph_->find(device);
  if (!src) return failed("Cannot find device='" + device + "' nor node-name='" + device + "'");
  if (auto r = check_job_blockers(*src); !r) return reply(command_outcome::failure(r.error()));
  auto format = str_arg(args, "format");
  std::string fmt = format.value_or("");
  if (fmt.empty()) {
    fmt = existing ? probe_format(file) : src->settings().driver;
  }
  // The new image's backing file: the source's backing for sync=top (none: full), the source
  // itself for sync=none (linked once opened).
  block::node* backing = nullptr;
  if (sync == "top") {
    backing = cow_backing(src);
    if (!backing) sync = "full";
  }
  if (sync == "none") backing = src;
  block::overlay_image img;
  img.filename = file;
  img.format = fmt;
  img.size = src->length();
  if (backing) {
    img.backing_file = graph_->filename(*backing);
    img.backing_format = backing->settings().driver;
  }
  if (!existing)
    if (auto r = block::check_image_format(fmt, !img.backing_file.empty()); !r) return reply(command_outcome::failure(r.error()));
  iothread* home = home_of(src);
  std::string backing_name = backing ? backing->name() : "";
  boost::json::object bargs = args;
  for (const char* k : {"format", "mode"}) bargs.erase(k);
  bargs["sync"] = args.at("sync");
  auto open_target = [this, home, file, fmt, backing_name, bargs, reply, group, job_staged](command_outcome created) mutable {
    if (!created.ok) return reply(created);
    // QEMU opens the target with discard=unmap and detect-zeroes=unmap.
    boost::json::object opts{{"driver", fmt},
                             {"discard", "unmap"},
                             {"detect-zeroes", "unmap"},
                             {"file", boost::json::object{{"driver", "file"}, {"filename", file}}}};
    if (fmt == "qcow2") opts["backing"] = backing_name.empty() ? boost::json::value(nullptr) : boost::json::value(backing_name);
    open_job_target(home, opts, reply, [this, bargs, reply, group, job_staged](block::node& n) mutable {
      std::string tname = n.name();
      bargs["target"] = tname;
      backup_extra extra;
      extra.opened.push_back(tname);
      extra.group = group;
      extra.staged = job_staged;
      blockdev_backup(bargs, drop_target_if_refused(tname, reply), extra);
    });
  };
  create_job_image(existing, src, img, std::move(open_target));
}

}  // namespace blockd

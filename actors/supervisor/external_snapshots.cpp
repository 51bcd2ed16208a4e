// External snapshots (blockdev-snapshot, blockdev-snapshot-sync as transaction actions) and change-backing-file: checks and graph edits here, driver work as node tasks on the node's home; main iothread only.
#include "actors/supervisor/supervisor.h"
#include "storage/block/image_create.h"
#include "storage/block/sync_io.h"

namespace blockd {
namespace {

using block::node;

const std::string* opt_str(const boost::json::object& o, const char* key, std::string& store) {
  auto* v = o.if_contains(key);
  if (!v || !v->is_string()) return nullptr;
  store = std::string(v->as_string());
  return &store;
}

block::child_edge* slot(block::node& n, const std::string& role) {
  for (auto& s : n.slots)
    if (s->role == role) return s.get();
  return nullptr;
}

// What QEMU's op blocker on a backing file says (an overlay keeps its backing file as it is).
result<void> check_not_backing(const block::node& n) {
  for (const block::child_edge* e : n.parents)
    if (e->role == "backing")
      return fail("Node '" + n.name() + "' is busy: node is used as backing hd of '" + e->parent->name() + "'");
  return {};
}

// A node's users that expect to read a valid image: an overlay may only be put in place when
// it has none (a mirror target's write-only use is allowed, QEMU's allow-write-only-overlay).
bool read_by_users(const block::node& n) {
  for (const block::child_edge* e : n.parents)
    if (e->perm & block::perm_consistent_read) return true;
  for (const block::root* r : n.roots)
    if (r->perm & block::perm_consistent_read) return true;
  return false;
}

// One external snapshot's state, shared by its steps.
struct snapshot_state {
  bool sync = false;                 // blockdev-snapshot-sync (opens the overlay itself)
  std::string device, node_name;     // how the snapshotted node is named
  bool has_device = false, has_node = false;
  std::string overlay_ref;           // blockdev-snapshot: the overlay's name
  std::string file, format = "qcow2", snapshot_node_name;
  bool has_snapshot_node_name = false;
  bool existing = false;             // mode=existing
  block::node* old = nullptr;
  block::node* overlay = nullptr;
  bool opened = false;               // the overlay was opened by this action (abort closes it)
  bool quiesced = false;
  bool parked = false;
  bool linked = false;               // overlay's backing is old, and old's users hold the overlay
  iothread* overlay_home = nullptr;  // where the overlay lived before it joined old's home
  std::vector<std::string> held;     // names of the quiesced nodes
  // The users of the old node the overlay took over (abort gives exactly these back).
  std::vector<block::child_edge*> moved_edges;
  std::vector<block::root*> moved_roots;
};

}  // namespace

// The options that reopen `n` with everything as it is but read-only = `ro`: its children named
// as they are now, an empty slot as null.
boost::json::object supervisor_actor::reopen_options(const block::node& n, bool ro) const {
  boost::json::object o = n.settings().options;
  for (const auto& s : n.slots) {
    if (s->child) o[s->role] = s->child->name();
    else if (o.contains(s->role)) o[s->role] = nullptr;
  }
  o["node-name"] = n.name();
  o["driver"] = n.settings().driver;
  o["read-only"] = ro;
  return o;
}

void supervisor_actor::reopen_read_only(block::node* n, bool ro, reply_fn done) {
  if (!graph_ || !graph_->alive(n) || n->settings().read_only == ro) return done(command_outcome::success());
  boost::json::object args{{"options", boost::json::array{reopen_options(*n, ro)}}};
  blockdev_reopen(args, std::move(done));
}

void supervisor_actor::register_snapshot_commands() {
  using block::step_lambda_action;
  using prepared_fn = block::action::prepared_fn;
  using done_fn = std::function<void()>;

  auto build = [this](bool sync, const boost::json::object& d) {
    auto st = std::make_shared<snapshot_state>();
    st->sync = sync;
    std::string tmp;
    if (sync) {
      st->has_device = opt_str(d, "device", st->device) != nullptr;
      st->has_node = opt_str(d, "node-name", st->node_name) != nullptr;
      opt_str(d, "snapshot-file", st->file);
      st->has_snapshot_node_name = opt_str(d, "snapshot-node-name", st->snapshot_node_name) != nullptr;
      opt_str(d, "format", st->format);
      if (opt_str(d, "mode", tmp)) st->existing = tmp == "existing";
    } else {
      opt_str(d, "node", st->device);
      st->node_name = st->device;
      st->has_device = st->has_node = true;
      opt_str(d, "overlay", st->overlay_ref);
    }
    auto a = std::make_unique<step_lambda_action>();
    a->on_prepare = [this, st](prepared_fn done) { snapshot_prepare(st, std::move(done)); };
    a->on_commit = [this, st](done_fn done) { snapshot_commit(st, std::move(done)); };
    a->on_abort = [this, st](done_fn done) { snapshot_abort(st, std::move(done)); };
    return std::unique_ptr<block::action>(std::move(a));
  };
  txn_kinds_["blockdev-snapshot"].build = [build](const boost::json::object& d) { return build(false, d); };
  txn_kinds_["blockdev-snapshot-sync"].build = [build](const boost::json::object& d) { return build(true, d); };
  commands_.add("blockdev-snapshot", [this](boost::json::object& a, reply_fn r) {
    run_one("blockdev-snapshot", a, std::move(r));
  });
  commands_.add("blockdev-snapshot-sync", [this](boost::json::object& a, reply_fn r) {
    run_one("blockdev-snapshot-sync", a, std::move(r));
  });
  commands_.add("change-backing-file", [this](boost::json::object& a, reply_fn r) { change_backing_file(a, std::move(r)); });
}

// ---- prepare: the checks in QEMU's order, the overlay opened (-sync), then the graph edit -------

void supervisor_actor::snapshot_prepare(std::shared_ptr<void> state, block::action::prepared_fn done) {
  auto st = std::static_pointer_cast<snapshot_state>(state);
  auto found = graph_->lookup(st->has_device ? &st->device : nullptr, st->has_node ? &st->node_name : nullptr);
  if (!found) return done(std::unexpected(found.error()));
  st->old = *found;
  if (auto r = check_not_backing(*st->old); !r) return done(r);
  // What the overlay will hide is made durable first.
  block::node* old = st->old;
  auto after_flush = [this, st, done](command_outcome o) mutable {
    if (!o.ok) return done(o.as_result());
    if (!graph_->alive(st->old)) return done(fail("Node '" + st->node_name + "' went away"));
    if (!st->sync) {
      auto ov = graph_->lookup(&st->overlay_ref, &st->overlay_ref);
      if (!ov) return done(std::unexpected(ov.error()));
      st->overlay = *ov;
      return snapshot_link(st, std::move(done));
    }
    if (st->has_node && !st->has_snapshot_node_name) return done(fail("New overlay node-name missing"));
    if (st->has_snapshot_node_name && graph_->find(st->snapshot_node_name))
      return done(fail("New overlay node-name already in use"));
    if (!graph_->alive(st->old)) return done(fail("Node '" + st->node_name + "' went away"));
    iothread* home = home_of(st->old);
    auto open_overlay = [this, st, home, done](command_outcome o) mutable {
      if (!o.ok) return done(o.as_result());
      if (!graph_->alive(st->old)) return done(fail("Node '" + st->node_name + "' went away"));
      boost::json::object opts{{"driver", st->format},
                               {"file", boost::json::object{{"driver", "file"}, {"filename", st->file}}},
                               {"backing", nullptr}};
      if (st->has_snapshot_node_name) opts["node-name"] = st->snapshot_node_name;
      if (st->old->settings().read_only) opts["read-only"] = true;
      auto staged = graph_->begin_add(opts, env_for(home));
      block::graph* g = graph_.get();
      run_at(home, [g, staged] {
        auto r = g->open_staged(*staged);
        return r ? command_outcome::success() : command_outcome::failure(r.error());
      }, [this, st, staged, home, done](command_outcome o) mutable {
        if (!o.ok) return done(o.as_result());
        for (block::node* x : staged->created) homes_[x] = home;
        auto n = graph_->commit_staged(*staged);
        if (!n) return when_closed([done, e = n.error()] { done(std::unexpected(e)); });
        adopt_new_nodes(home);
        // Opened for the snapshot, not by the monitor: it lives as long as something uses it.
        (*n)->monitor_owned = false;
        st->overlay = *n;
        st->opened = true;
        snapshot_link(st, std::move(done));
      });
    };
    if (st->existing) return open_overlay(command_outcome::success());
    if (auto r = block::check_overlay_format(st->format); !r) return done(r);
    block::overlay_image img;
    img.filename = st->file;
    img.format = st->format;
    img.backing_file = graph_->filename(*st->old);
    img.backing_format = st->old->settings().driver;
    block::driver_env env = env_for(home);
    run_on_node(st->old, [img, env](block::node& x) mutable {
      img.size = x.driver().length();
      auto r = block::create_overlay_image(img, env);
      return r ? command_outcome::success() : command_outcome::failure(r.error());
    }, std::move(open_overlay));
  };
  if (old->settings().read_only) return after_flush(command_outcome::success());
  run_on_node(old, [](block::node& x) {
    if (block::sync_io(x).flush() < 0) return command_outcome::failure(error("An IO error has occurred"));
    return command_outcome::success();
  }, std::move(after_flush));
}

void supervisor_actor::snapshot_link(std::shared_ptr<void> state, block::action::prepared_fn done) {
  auto st = std::static_pointer_cast<snapshot_state>(state);
  block::node* ov = st->overlay;
  // A failure from here on closes an overlay this action opened.
  auto failed = [this, st, done](error e) mutable {
    if (st->opened && graph_->alive(st->overlay)) {
      graph_->del(st->overlay->name());
      sync_node_actors();
      st->opened = false;
      return when_closed([done, e] { done(std::unexpected(e)); });
    }
    done(std::unexpected(e));
  };
  if (read_by_users(*ov)) return failed(error("The overlay is already in use"));
  block::child_edge* backing = slot(*ov, "backing");
  if (backing && backing->child) return failed(error("The overlay already has a backing image"));
  if (!backing) return failed(error("The overlay does not support backing images"));
  // The overlay joins the home of the node it goes over (a backing edge never crosses threads).
  std::vector<block::node*> moving;
  if (home_of(ov) != home_of(st->old)) {
    moving = components({ov});
    if (pinning_export(moving)) return failed(error("Cannot change iothread of active block backend"));
    if (auto r = check_bitmaps_not_split(moving); !r) return failed(r.error());
  }
  // Clients of exports on the old node and on its parents (whose slots change) leave their
  // connection actors (they resume on the overlay), then all of them drain; they stay drained
  // until commit or abort.
  std::vector<block::node*> touched{st->old};
  for (block::child_edge* e : st->old->parents)
    if (std::find(touched.begin(), touched.end(), e->parent) == touched.end()) touched.push_back(e->parent);
  st->parked = true;
  park_clients(touched, [this, st, touched, moving, failed, done]() mutable {
    if (!graph_->alive(st->old) || !graph_->alive(st->overlay)) {
      snapshot_release(st);
      return failed(error("Node '" + st->node_name + "' went away"));
    }
    std::vector<block::node*> q = touched;
    for (block::node* m : moving)
      if (std::find(q.begin(), q.end(), m) == q.end()) q.push_back(m);
    if (std::find(q.begin(), q.end(), st->overlay) == q.end()) q.push_back(st->overlay);
    for (block::node* m : q) st->held.push_back(m->name());
    quiesce_nodes(q, [this, st, moving, failed, done]() mutable {
      st->quiesced = true;
      if (!graph_->alive(st->old) || !graph_->alive(st->overlay)) {
        snapshot_release(st);
        return failed(error("Node '" + st->node_name + "' went away"));
      }
      if (!moving.empty()) {
        st->overlay_home = home_of(st->overlay);
        rehome(moving, home_of(st->old));
        sync_node_actors();  // later actions of the list reach the overlay on its new home
      }
      std::vector<block::child_edge*> edges(st->old->parents.begin(), st->old->parents.end());
      std::vector<block::root*> roots(st->old->roots.begin(), st->old->roots.end());
      block::child_edge* backing = slot(*st->overlay, "backing");
      auto r = graph_->set_child(*backing, st->old);
      if (r) {
        r = graph_->replace_node(*st->old, *st->overlay);
        if (!r) (void)graph_->set_child(*backing, nullptr);
      }
      if (!r) {
        if (st->overlay_home) {
          rehome(components({st->overlay}), st->overlay_home);
          sync_node_actors();
        }
        snapshot_release(st);
        return failed(r.error());
      }
      for (block::child_edge* e : edges)
        if (e->child == st->overlay) st->moved_edges.push_back(e);
      for (block::root* x : roots)
        if (x->target == st->overlay) st->moved_roots.push_back(x);
      st->linked = true;
      done({});
    });
  });
}

// Lets the drained nodes go and the parked clients continue (on whatever node their export's
// root holds now).
void supervisor_actor::snapshot_release(std::shared_ptr<void> state) {
  auto st = std::static_pointer_cast<snapshot_state>(state);
  if (st->quiesced) resume_nodes(st->held);
  st->quiesced = false;
  if (st->parked) unpark_clients();
  st->parked = false;
}

// ---- commit: the old node becomes read-only (as QEMU, a failure there is not the snapshot's) -----

void supervisor_actor::snapshot_commit(std::shared_ptr<void> state, std::function<void()> done) {
  auto st = std::static_pointer_cast<snapshot_state>(state);
  snapshot_release(st);
  block::node* old = st->old;
  reopen_read_only(old, true, [this, st, done](command_outcome) {
    // An overlay over a node nobody used has no user either: it goes, as in QEMU, where only
    // the snapshot's own reference kept it.
    if (st->opened && graph_->alive(st->overlay) && !st->overlay->has_users()) {
      graph_->release_unused({st->overlay});
      sync_node_actors();
      return when_closed(done);
    }
    done();
  });
}

void supervisor_actor::snapshot_abort(std::shared_ptr<void> state, std::function<void()> done) {
  auto st = std::static_pointer_cast<snapshot_state>(state);
  if (st->linked && graph_->alive(st->old) && graph_->alive(st->overlay)) {
    // Exactly the users the overlay took over go back to the old node (the overlay's own users
    // from before stay), then the backing link goes; permissions only shrink.
    for (block::child_edge* e : st->moved_edges)
      if (graph_->alive(e->parent) && e->child == st->overlay) (void)graph_->set_child(*e, st->old);
    for (block::root* x : st->moved_roots)
      if (x->target == st->overlay) (void)graph_->repoint_root(*x, *st->old);
    // Moving its last user away may have closed an overlay nobody else held.
    if (graph_->alive(st->overlay)) {
      if (block::child_edge* b = slot(*st->overlay, "backing")) (void)graph_->set_child(*b, nullptr);
      if (st->overlay_home) rehome(components({st->overlay}), st->overlay_home);
    }
    sync_node_actors();
  }
  st->linked = false;
  snapshot_release(st);
  if (st->opened && graph_->alive(st->overlay)) {
    graph_->del(st->overlay->name());
    sync_node_actors();
    st->opened = false;
    return when_closed(done);
  }
  done();
}

// ---- change-backing-file --------------------------------------------------------------------

void supervisor_actor::change_backing_file(const boost::json::object& args, reply_fn reply) {
  std::string device(args.at("device").as_string());
  std::string image_name(args.at("image-node-name").as_string());
  std::string file(args.at("backing-file").as_string());
  auto top = graph_->lookup(&device, &device);
  if (!top) return reply(command_outcome::failure(top.error()));
  if (!(*top)->parents.empty()) return reply(command_outcome::failure(error("Need a root block node")));
  auto img = graph_->lookup(nullptr, &image_name);
  if (!img) return reply(command_outcome::failure(img.error()));
  block::node* image = *img;
  block::child_edge* backing = slot(*image, "backing");
  if (!backing || !backing->child)
    return reply(command_outcome::failure(
        error("not allowing backing file change on an image without a backing file")));
  // The image must be in the chain below the device (its overlays, through their backing files).
  bool in_chain = false;
  for (block::node* n = *top; n && !in_chain; n = slot(*n, "backing") ? slot(*n, "backing")->child : nullptr)
    in_chain = n == image;
  if (!in_chain)
    return reply(command_outcome::failure(error("'" + device + "' and image file are not in the same chain")));
  // A read-only image is made writable for the header change and read-only again after.
  bool ro = image->settings().read_only;
  std::string fmt = image->settings().driver;
  reopen_read_only(image, false, [this, image, image_name, ro, file, fmt, reply](command_outcome o) mutable {
    if (!o.ok) return reply(std::move(o));
    if (!graph_->alive(image)) return reply(command_outcome::failure(error("Node '" + image_name + "' went away")));
    with_quiesced_steps({image}, [this, image, file, fmt](reply_fn done) {
      run_on_node(image, [file, fmt](block::node& x) {
        auto r = x.driver().change_backing_file(file, fmt);
        x.publish_facts();
        if (!r) return command_outcome::failure(error("Could not change backing file to '" + file + "': " + r.error().desc));
        return command_outcome::success();
      }, std::move(done));
    }, [this, image, ro, reply](command_outcome changed) mutable {
      if (!ro) return reply(std::move(changed));
      reopen_read_only(image, true, [changed, reply](command_outcome back) mutable {
        reply(changed.ok ? std::move(back) : std::move(changed));
      });
    });
  });
}

}  // namespace blockd

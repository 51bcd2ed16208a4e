// Supervisor: the NBD server and block exports (nbd-server-*, block-export-*, BLOCK_EXPORT_DELETED); main iothread only.
#include <caf/all.hpp>

#include <algorithm>
#include <memory>
#include <unistd.h>

#include "actors/export/nbd_connection.h"
#include "actors/runtime/pinned.h"
#include "actors/supervisor/supervisor.h"
#include "config/chardev_spec.h"
#include "protocol/nbd/wire.h"
#include "storage/block/bitmap_ops.h"

namespace blockd {
namespace {

const std::string* str_arg(const boost::json::object& a, const char* k, std::string& store) {
  auto* v = a.if_contains(k);
  if (!v || !v->is_string()) return nullptr;
  store = std::string(v->as_string());
  return &store;
}
bool bool_arg(const boost::json::object& a, const char* k, bool dflt = false) {
  auto* v = a.if_contains(k);
  return v && v->is_bool() ? v->as_bool() : dflt;
}
int64_t int_arg(const boost::json::object& a, const char* k, int64_t dflt) {
  auto* v = a.if_contains(k);
  if (!v) return dflt;
  if (v->is_int64()) return v->as_int64();
  if (v->is_uint64()) return int64_t(v->as_uint64());
  return dflt;
}

}  // namespace

const nbd::export_view* supervisor_actor::export_catalog::find(const std::string& name) const {
  for (auto& e : self->exports_)
    if (!e.shutting_down && e.view.name == name) return &e.view;
  return nullptr;
}

std::vector<const nbd::export_view*> supervisor_actor::export_catalog::all() const {
  // NBD_OPT_LIST in creation order, as QEMU walks its export list.
  std::vector<const nbd::export_view*> out;
  for (auto it = self->exports_.rbegin(); it != self->exports_.rend(); ++it)
    if (!it->shutting_down) out.push_back(&it->view);
  return out;
}

supervisor_actor::export_entry* supervisor_actor::find_export(const std::string& id) {
  for (auto& e : exports_)
    if (e.id == id) return &e;
  return nullptr;
}

void supervisor_actor::register_export_types() {
  export_type nbd_type;
  nbd_type.check = [this](const boost::json::object& args, block::node& n) {
    // QEMU's nbd_export_create, after the checks every export shares.
    std::string s;
    if (!nbd_) return command_outcome::failure(error("NBD server not running"));
    std::string name = str_arg(args, "name", s) ? s : n.name();
    if (name.size() > nbd::max_string_size)
      return command_outcome::failure(error("export name '" + name + "' too long"));
    std::string description = str_arg(args, "description", s) ? s : std::string();
    if (description.size() > nbd::max_string_size)
      return command_outcome::failure(error("description '" + description + "' too long"));
    if (catalog_.find(name))
      return command_outcome::failure(error("NBD server already has export named '" + name + "'"));
    // The bitmaps are checked where they live (export_add_final), after everything here.
    return command_outcome::success();
  };
  nbd_type.describe = [this](const boost::json::object& args, block::node& n, export_entry& e) {
    // What an NBD client learns at NBD_OPT_GO, fixed for the export's lifetime.
    std::string s;
    e.view.name = str_arg(args, "name", s) ? s : n.name();
    e.view.description = str_arg(args, "description", s) ? s : std::string();
    e.view.size = uint64_t(n.length()) & ~uint64_t(511);
    uint16_t f = nbd::tf_has_flags | nbd::tf_send_flush | nbd::tf_send_fua | nbd::tf_send_cache;
    if (nbd_->settings().max_connections != 1) f |= nbd::tf_can_multi_conn;
    if (!e.writable) f |= nbd::tf_read_only;
    else f |= nbd::tf_send_trim | nbd::tf_send_write_zeroes | nbd::tf_send_fast_zero;
    e.view.flags = f;
    auto lim = n.driver().limits();
    e.view.min_block = std::max<uint32_t>(1, lim.request_alignment);
    e.view.max_block = lim.max_transfer > 0 ? uint32_t(std::min<int64_t>(lim.max_transfer, nbd::max_buffer_size))
                                            : nbd::max_buffer_size;
    e.view.allocation_depth = bool_arg(args, "allocation-depth");
    // Each bitmap's context is named after the bitmap, whichever node it was found on.
    if (auto* bm = args.if_contains("bitmaps"); bm && bm->is_array())
      for (auto& b : bm->as_array())
        e.view.bitmaps.push_back(b.is_string() ? std::string(b.as_string())
                                               : std::string(b.as_object().at("name").as_string()));
    e.sparse_reads = n.driver().caps() & block::cap_block_status;
  };
  export_types_.emplace("nbd", std::move(nbd_type));
}

void supervisor_actor::register_export_commands() {
  register_export_types();
  using args_t = boost::json::object;
  commands_.add("nbd-server-start", [this](args_t& a, reply_fn r) { nbd_server_start(a, std::move(r)); });
  commands_.add("nbd-server-stop", [this](args_t&, reply_fn r) { nbd_server_stop(std::move(r)); });
  commands_.add("block-export-add", [this](args_t& a, reply_fn r) { block_export_add_async(a, std::move(r)); });
  commands_.add("block-export-del", [this](args_t& a, reply_fn reply) {
    std::string s;
    std::string mode = str_arg(a, "mode", s) ? s : "safe";
    block_export_del(std::string(a.at("id").as_string()), mode, std::move(reply));
  });
  commands_.add("nbd-server-remove", [this](args_t& a, reply_fn reply) {
    std::string s;
    std::string id(a.at("name").as_string());
    std::string mode = str_arg(a, "mode", s) ? s : "safe";
    if (auto* e = find_export(id); e && e->type != "nbd")
      return reply(command_outcome::failure(error("Block export '" + id + "' is not an NBD export")));
    block_export_del(id, mode, std::move(reply));
  });
  commands_.add("nbd-server-add", [this](args_t& a, reply_fn reply) {
    // The deprecated form: the export id and name default to the device, looked up as QEMU does.
    std::string s;
    std::string device(a.at("device").as_string());
    if (!graph_->find(device))
      return reply(
          command_outcome::failure(error("Cannot find device='" + device + "' nor node-name='" + device + "'")));
    if (!nbd_) return reply(command_outcome::failure(error("NBD server not running")));
    boost::json::object o{{"type", "nbd"}, {"node-name", device}};
    std::string n = str_arg(a, "name", s) ? s : device;
    o["id"] = n;
    o["name"] = n;
    if (auto* d = a.if_contains("description")) o["description"] = *d;
    if (auto* w = a.if_contains("writable")) o["writable"] = *w;
    if (auto* b = a.if_contains("bitmap")) o["bitmaps"] = boost::json::array{*b};
    block_export_add_async(o, std::move(reply));
  });
  commands_.add_now("query-block-exports", [this](args_t&) {
    boost::json::array out;
    for (auto& e : exports_)
      out.push_back(boost::json::object{
          {"id", e.id}, {"type", e.type}, {"node-name", export_node_name(e)}, {"shutting-down", e.shutting_down}});
    return command_outcome::success(std::move(out));
  });
}

void supervisor_actor::nbd_server_start(const boost::json::object& args, reply_fn reply) {
  // Over QMP, as in QSD, no descriptor is taken by number (QEMU's fd passing is not available);
  // command-line items may name descriptors blockd inherited (see inherited_fds.h).
  if (!starting_)
    if (auto* addr = args.if_contains("addr"); addr && addr->is_object())
      if (auto* t = addr->as_object().if_contains("type"); t && t->is_string() && t->as_string() == "fd")
        return reply(command_outcome::failure(error("only QEMU supports file descriptor passing")));
  if (nbd_) return reply(command_outcome::failure(error("NBD server already running")));
  std::string s;
  nbd_server::hooks h;
  if (str_arg(args, "tls-creds", s)) {
    // QEMU's nbd_get_tls_creds, texts verbatim. The server holds the credentials from here on.
    auto c = tls_server_creds(s);
    if (!c) return reply(command_outcome::failure(c.error()));
    h.tls_creds = std::move(*c);
  }
  if (str_arg(args, "tls-authz", s) && h.tls_creds) {
    // Resolved per client, so the object may be replaced while the server runs. Without
    // tls-creds QSD accepts tls-authz and never consults it; so does blockd.
    h.tls_authz = [this, id = s](const std::string& identity) { return authorize(id, identity); };
  }
  nbd_server_settings st;
  // nbd-server-start takes SocketAddressLegacy ({type, data: {...}}); --nbd-server the flat form.
  const auto& addr = args.at("addr").as_object();
  if (auto* data = addr.if_contains("data"); data && data->is_object()) {
    st.addr = data->as_object();
    st.addr["type"] = addr.at("type");
  } else {
    st.addr = addr;
  }
  st.max_connections = uint32_t(int_arg(args, "max-connections", 100));
  st.handshake_max_seconds = uint32_t(int_arg(args, "handshake-max-seconds", 10));
  catalog_.self = this;
  h.catalog = &catalog_;
  h.negotiated = [this](nbd_negotiated n) { nbd_negotiated_client(std::move(n)); };
  auto srv = nbd_server::start(*home_, std::move(st), std::move(h), starting_);
  if (!srv) return reply(command_outcome::failure(srv.error()));
  nbd_ = std::move(*srv);
  reply(command_outcome::success());
}

void supervisor_actor::nbd_server_stop(reply_fn reply) {
  if (!nbd_) return reply(command_outcome::failure(error("NBD server not running")));
  stop_exports(true, [reply = std::move(reply)] { reply(command_outcome::success()); });
}

void supervisor_actor::stop_exports(bool server_too, std::function<void()> then) {
  std::vector<std::string> ids;
  for (auto& e : exports_) ids.push_back(e.id);
  auto left = std::make_shared<size_t>(ids.size() + 1);
  auto one = [this, left, server_too, then = std::move(then)]() mutable {
    if (--*left > 0) return;
    if (!server_too || !nbd_) return then();
    nbd_->stop([this, then]() mutable {
      // Destroyed on a later turn: stop() may call back from inside the server's own completion.
      home_->post([this, then] {
        nbd_.reset();
        then();
      });
    });
  };
  for (auto& id : ids) {
    auto* e = find_export(id);
    if (e && e->shutting_down) e->on_gone.push_back(one);
    else shutdown_export(id, one);
  }
  one();
}

command_outcome supervisor_actor::export_add_checks(const boost::json::object& args) {
  std::string type(args.at("type").as_string());
  std::string id(args.at("id").as_string());
  std::string node_name(args.at("node-name").as_string());
  std::string s;
  auto ty = export_types_.find(type);
  if (ty == export_types_.end()) {
    std::string built;
    for (auto& [name, t] : export_types_) built += (built.empty() ? "'" : ", '") + name + "'";
    return command_outcome::failure(
        error("export type '" + type + "' is not available in this blockd version yet; use type " + built));
  }
  // The checks every export type shares, in QEMU's order (blk_exp_add), then the type's own.
  if (!id_wellformed(id)) return command_outcome::failure(error("Invalid block export id"));
  if (find_export(id)) return command_outcome::failure(error("Block export id '" + id + "' is already in use"));
  block::node* n = graph_->find(node_name);
  if (!n) return command_outcome::failure(error("Cannot find device='' nor node-name='" + node_name + "'"));
  bool writable = bool_arg(args, "writable");
  if (str_arg(args, "iothread", s)) {
    // block_export_add_async has moved the node there when it could (or left it, without
    // fixed-iothread, where an export pins it).
    if (!find_iothread(s)) return command_outcome::failure(error("iothread \"" + s + "\" not found"));
  }
  if (writable && n->settings().read_only)
    return command_outcome::failure(error("Cannot export read-only node as writable"));
  return ty->second.check(args, *n);
}

command_outcome supervisor_actor::block_export_add(const boost::json::object& args) {
  if (auto r = export_add_checks(args); !r.ok) return r;
  std::string type(args.at("type").as_string());
  std::string id(args.at("id").as_string());
  std::string node_name(args.at("node-name").as_string());
  auto ty = export_types_.find(type);
  block::node* n = graph_->find(node_name);
  bool writable = bool_arg(args, "writable");
  export_entry e;
  e.id = id;
  e.type = type;
  e.writable = writable;
  // Without allow-inactive an export activates its node (an image handed over by migration is
  // taken back) and later keeps it active; with it, the node stays as it is and may be inactivated
  // under the export (QEMU 10's rules). The caller has quiesced the node when it is inactive.
  bool allow_inactive = bool_arg(args, "allow-inactive");
  if (!allow_inactive && !n->settings().active)
    if (auto r = graph_->set_active(n, true); !r) return command_outcome::failure(r.error());
  uint32_t perm = block::perm_consistent_read | (writable ? uint32_t(block::perm_write) : 0u);
  // Exports do not let the node be resized under their clients (QEMU's NBD export does the same).
  block::perm_user u{"block export '" + id + "' (uses node '" + node_name + "' as 'root' child)", perm,
                     block::perm_all & ~uint32_t(block::perm_resize), allow_inactive};
  // Export add is an action list: the root (prepare takes it, the permission check covers the
  // list, abort drops it) and the export's registration at commit, so a refused permission leaves
  // neither a root nor an export behind.
  std::vector<std::unique_ptr<block::action>> list;
  list.push_back(graph_->attach_user_action(*n, "export:" + id, u));
  e.root_key = "export:" + id;
  e.writethrough = bool_arg(args, "writethrough");
  e.fixed_iothread = bool_arg(args, "fixed-iothread");
  ty->second.describe(args, *n, e);
  auto reg = std::make_unique<block::lambda_action>();
  reg->on_commit = [this, n, e = std::move(e)]() mutable {
    e.bitmaps = std::move(adding_bitmaps_);  // held for it by export_add_final
    adding_bitmaps_.clear();
    if (!e.bitmaps.empty()) {
      e.bitmap_graph = std::move(adding_bitmap_owners_);
      e.bitmap_graph.push_back(n->name());
    }
    adding_bitmap_owners_.clear();
    exports_.push_front(std::move(e));
  };
  list.push_back(std::move(reg));
  if (auto r = graph_->run(std::move(list)); !r) return command_outcome::failure(r.error());
  return command_outcome::success();
}

// An export given an iothread runs there: its node (with its component) moves first, as QEMU's
// blk_exp_add does after the id and node checks. If an export with fixed-iothread keeps the node
// where it is, the new export stays with it, unless it asks for fixed-iothread itself (QEMU's rules
// and text).
void supervisor_actor::block_export_add_async(const boost::json::object& args, reply_fn reply) {
  std::string s, id(args.at("id").as_string()), node_name(args.at("node-name").as_string());
  block::node* n = graph_->find(node_name);
  bool early_error =
      !export_types_.count(std::string(args.at("type").as_string())) || !id_wellformed(id) || find_export(id) || !n;
  if (early_error) return reply(block_export_add(args));
  // Activating a node reloads its image: nothing may be in flight meanwhile.
  bool activates = !n->settings().active && !bool_arg(args, "allow-inactive");
  auto add_here = [&] {
    if (!activates) return export_add_final(args, std::move(reply));
    // Bitmaps are judged on the active node (an enabled bitmap of a writable node cannot go to a
    // read-only export): with them, activation comes first wherever the node lives.
    auto* bm = args.if_contains("bitmaps");
    bool with_bitmaps = bm && bm->is_array() && !bm->as_array().empty();
    if (home_of(n) == home_ && !with_bitmaps)
      return with_quiesced_steps({n}, [this, args](reply_fn done) { export_add_final(args, std::move(done)); },
                                 std::move(reply));
    // A node living on another iothread is activated there first (its driver reloads the image at
    // home), as QEMU's blk_exp_add activates before the export type's own checks.
    with_quiesced_steps(
        {n},
        [this, n, args](reply_fn done) {
          set_active_steps(n, true, [this, args, done](command_outcome o) {
            if (!o.ok) return done(std::move(o));
            export_add_final(args, done);
          });
        },
        std::move(reply));
  };
  if (!str_arg(args, "iothread", s)) return add_here();
  iothread* to = find_iothread(s);
  if (!to) return reply(block_export_add(args));
  if (home_of(n) == to) return add_here();
  if (pinning_export(components({n}))) {
    if (bool_arg(args, "fixed-iothread"))
      return reply(command_outcome::failure(error("Cannot change iothread of active block backend")));
    return add_here();
  }
  // The export is added once its node is there (and its clients of other exports resumed).
  move_components({n}, to, [] { return command_outcome::success(); },
                  [this, args, reply = std::move(reply)](command_outcome o) mutable {
                    if (!o.ok) return reply(std::move(o));
                    export_add_final(args, std::move(reply));
                  });
}

// QEMU's nbd_export_create looks the bitmaps up last, each in order: a plain name on the exported
// node and down its backing chain, {node, name} on that node. Nodes are resolved here (the graph is
// this actor's); the bitmaps themselves are looked at, checked and held on the node's home.
void supervisor_actor::export_add_final(const boost::json::object& args, reply_fn reply) {
  auto* bm = args.if_contains("bitmaps");
  if (!bm || !bm->is_array() || bm->as_array().empty()) return reply(block_export_add(args));
  if (auto r = export_add_checks(args); !r.ok) return reply(std::move(r));
  block::node* n = graph_->find(std::string(args.at("node-name").as_string()));
  auto comp = components({n});
  std::vector<block::export_bitmap_ref> refs;
  for (auto& v : bm->as_array()) {
    block::export_bitmap_ref r;
    if (v.is_string()) {
      r.name = std::string(v.as_string());
      for (block::node* x = n; x;) {
        r.chain.push_back(x);
        block::child_edge* b = x->slot("backing");
        x = b ? b->child : nullptr;
      }
    } else {
      const auto& o = v.as_object();
      r.name = std::string(o.at("name").as_string());
      std::string owner(o.at("node").as_string());
      r.owner = graph_->find(owner);
      if (!r.owner) {
        r.error = "Node '" + owner + "' not found";
      } else if (std::find(comp.begin(), comp.end(), r.owner) == comp.end()) {
        // Connections read their bitmaps on the exported node's home, without locks; a node outside
        // its graph may live (or later move) elsewhere.
        r.error = "Bitmap '" + r.name + "' of node '" + owner + "' cannot be exported with node '" + n->name() +
                  "': the bitmap's node must be in the exported node's graph (its file, backing chain or parents)";
        r.owner = nullptr;
      }
    }
    refs.push_back(std::move(r));
  }
  bool readonly = !bool_arg(args, "writable");
  auto held = std::make_shared<std::vector<std::shared_ptr<block::dirty_bitmap>>>();
  auto owners = std::make_shared<std::vector<std::string>>();
  run_on_node(
      n,
      [refs = std::move(refs), readonly, held, owners](block::node&) {
        auto r = block::hold_export_bitmaps(refs, readonly);
        if (!r) return command_outcome::failure(r.error());
        *held = std::move(*r);
        // The nodes the bitmaps live on (read here, at home, where the sets change).
        for (auto& ref : refs) {
          if (ref.owner) {
            owners->push_back(ref.owner->name());
            continue;
          }
          for (block::node* x : ref.chain)
            if (x->bitmaps().find(ref.name)) {
              owners->push_back(x->name());
              break;
            }
        }
        return command_outcome::success();
      },
      [this, args, n, held, owners, reply = std::move(reply)](command_outcome o) mutable {
        if (!o.ok) return reply(std::move(o));
        adding_bitmaps_ = std::move(*held);
        adding_bitmap_owners_ = std::move(*owners);
        command_outcome added = block_export_add(args);
        if (added.ok || adding_bitmaps_.empty()) return reply(std::move(added));
        // The registration failed after the hold (a refused permission): the bitmaps are let go
        // before the error is answered, so the next command finds them free.
        auto list = std::move(adding_bitmaps_);
        adding_bitmaps_.clear();
        if (!graph_->alive(n)) return reply(std::move(added));
        run_on_node(
            n,
            [list = std::move(list)](block::node&) {
              block::release_export_bitmaps(list);
              return command_outcome::success();
            },
            [added = std::move(added), reply = std::move(reply)](command_outcome) mutable { reply(std::move(added)); });
      });
}

const supervisor_actor::export_entry* supervisor_actor::pinning_export(const std::vector<block::node*>& nodes) const {
  for (auto& e : exports_) {
    if (!e.fixed_iothread || e.shutting_down) continue;
    block::node* n = export_node(e);
    if (n && std::find(nodes.begin(), nodes.end(), n) != nodes.end()) return &e;
  }
  return nullptr;
}

void supervisor_actor::block_export_del(const std::string& id, const std::string& mode, reply_fn reply) {
  auto* e = find_export(id);
  if (!e) return reply(command_outcome::failure(error("Export '" + id + "' is not found")));
  if (e->shutting_down) return reply(command_outcome::failure(error("Export '" + id + "' is already shutting down")));
  if (mode != "hard" && !e->clients.empty()) {
    error err("export '" + id + "' still in use");
    err.hint = "Use mode='hard' to force client disconnect";
    return reply(command_outcome::failure(err));
  }
  // Clients close at once (in-flight requests finish first), so the reply waits for the deletion
  // and BLOCK_EXPORT_DELETED comes before it, as QSD shows.
  shutdown_export(id, [reply = std::move(reply)] { reply(command_outcome::success()); });
}

block::node* supervisor_actor::export_node(const export_entry& e) const {
  block::root* r = graph_ ? graph_->find_root(e.root_key) : nullptr;
  return r ? r->target : nullptr;
}

std::string supervisor_actor::export_node_name(const export_entry& e) const {
  block::node* n = export_node(e);
  return n ? n->name() : std::string();
}

void supervisor_actor::repoint_export(const std::string& id, block::node* to, reply_fn reply) {
  export_entry* e = find_export(id);
  if (!e) return reply(command_outcome::failure(error("Export '" + id + "' not found")));
  block::node* from = export_node(*e);
  if (!from || !to || from == to) return reply(command_outcome::success());
  if (e->fixed_iothread && home_of(to) != home_of(from))
    return reply(command_outcome::failure(error("export '" + id + "' is fixed to its iothread and node '" +
                                                to->name() + "' lives on another one; move the node first")));
  // Clients leave their connection actors first (their requests complete), then both nodes are
  // quiesced while the root moves, then the clients continue on the new node.
  park_clients({from}, [this, id, from, to, reply = std::move(reply)]() mutable {
    with_quiesced(
        {from, to},
        [this, id, to] {
          export_entry* x = find_export(id);
          block::root* r = x ? graph_->find_root(x->root_key) : nullptr;
          if (!r || !graph_->alive(to)) return command_outcome::failure(error("Export '" + id + "' went away"));
          if (auto res = graph_->repoint_root(*r, *to); !res) return command_outcome::failure(res.error());
          return command_outcome::success();
        },
        [this, reply = std::move(reply)](command_outcome o) mutable {
          unpark_clients();
          reply(std::move(o));
        });
  });
}

void supervisor_actor::shutdown_export(const std::string& id, std::function<void()> then) {
  auto* e = find_export(id);
  if (!e) return then();
  e->shutting_down = true;
  e->on_gone.push_back(std::move(then));
  if (e->clients.empty()) return finish_export(id);
  for (auto& [cid, a] : e->clients) send(a, close_atom::value);
}

void supervisor_actor::finish_export(const std::string& id_ref) {
  const std::string id = id_ref;  // the caller's string may live in the entry erased below
  auto* e = find_export(id);
  if (!e || e->finishing) return;
  if (!e->bitmaps.empty()) {
    // Its bitmaps are free again before the export is gone (QEMU clears busy in the export's
    // delete, before BLOCK_EXPORT_DELETED), on the home where its clients read them.
    auto list = std::move(e->bitmaps);
    e->bitmaps.clear();
    block::node* n = export_node(*e);
    if (n && graph_ && graph_->alive(n)) {
      e->finishing = true;
      run_on_node(
          n,
          [list = std::move(list)](block::node&) {
            block::release_export_bitmaps(list);
            return command_outcome::success();
          },
          [this, id](command_outcome) {
            // The rest edits the graph: not while a task of another change may be reading it.
            when_no_tasks([this, id] {
              if (auto* x = find_export(id)) {
                x->finishing = false;
                finish_export(id);
              }
            });
          });
      return;
    }
  }
  // Export del as an action list: the root goes (its permissions with it), then the entry.
  std::vector<std::unique_ptr<block::action>> list;
  if (block::node* n = export_node(*e)) list.push_back(graph_->detach_user_action(*n, e->root_key));
  if (graph_) (void)graph_->run(std::move(list));  // giving permissions up cannot conflict
  auto gone = std::move(e->on_gone);
  // A deque is not contiguous: the entry is found by its id, not by pointer arithmetic.
  exports_.erase(std::find_if(exports_.begin(), exports_.end(), [&](const export_entry& x) { return x.id == id; }));
  emit("BLOCK_EXPORT_DELETED", boost::json::object{{"id", id}});
  for (auto& f : gone) f();
}

void supervisor_actor::nbd_negotiated_client(nbd_negotiated n) {
  export_entry* e = nullptr;
  for (auto& x : exports_)
    if (!x.shutting_down && x.view.name == n.export_name) e = &x;
  nbd_client_setup s;
  s.fd = n.fd;
  s.client_id = ++nbd_client_counter_;
  if (e) {
    s.export_id = e->id;
    s.xs.size = e->view.size;
    s.xs.read_only = !e->writable;
    s.writethrough = e->writethrough;
    s.sparse_reads = e->sparse_reads;
  }
  s.xs.mode = n.mode;
  s.contexts = n.contexts;
  s.pending_out = std::move(n.pending_out);
  s.leftover_in = std::move(n.leftover_in);
  s.tls = std::move(n.tls);
  s.supervisor = caf::actor_cast<caf::actor>(this);
  if (parking_ && e) {
    // Its node is (perhaps) about to move: the client starts once the move is done.
    parked_.push_back(std::move(s));
    return;
  }
  start_client(std::move(s));
}

// A client's connection actor starts on its export node's home, with that node's actor. If the
// export or its node went away meanwhile (between GO and now, or during a move), the client is
// disconnected.
void supervisor_actor::start_client(nbd_client_setup s) {
  auto* e = s.export_id.empty() ? nullptr : find_export(s.export_id);
  block::node* node = e ? export_node(*e) : nullptr;
  auto actor_it = node ? node_actors_.find(node->name()) : node_actors_.end();
  if (!e || e->shutting_down || !node || actor_it == node_actors_.end()) {
    ::close(s.fd);
    if (nbd_) nbd_->client_gone();
    return;
  }
  s.node = actor_it->second.actor;
  s.bitmaps.assign(e->bitmaps.begin(), e->bitmaps.end());
  e->serving = node;
  iothread* h = home_of(node);
  uint64_t cid = s.client_id;
  e->clients.emplace(cid, spawn_pinned<nbd_connection>(h->system(), *h, std::move(s)));
}

// Before nodes move to another iothread, the clients of exports on them leave their connection
// actors (pinned to the old home, holding the old node actor): each finishes what it has in flight
// and hands back its socket and unparsed input. A client that does not finish in time (it stopped
// reading its replies, or sends a payload too slowly) is disconnected instead. `then` runs once
// every client is parked or closing.
void supervisor_actor::park_clients(const std::vector<block::node*>& nodes, std::function<void()> then) {
  std::vector<std::pair<std::string, std::pair<uint64_t, caf::actor>>> waiting;
  for (auto& e : exports_) {
    // Clients run on the node they were started on, which differs from the root's target
    // right after a re-point.
    block::node* n = e.serving ? e.serving : export_node(e);
    if (!n || std::find(nodes.begin(), nodes.end(), n) == nodes.end()) continue;
    for (auto& [cid, a] : e.clients) waiting.push_back({e.id, {cid, a}});
  }
  ++parking_;
  auto left = std::make_shared<size_t>(waiting.size() + 1);
  auto one = [left, then = std::move(then)] {
    if (--*left == 0) then();
  };
  for (auto& [eid, c] : waiting) {
    auto [cid, a] = c;
    request(a, std::chrono::seconds(5), handoff_atom::value)
        .then(
            [this, eid = eid, cid = cid, one](nbd_client_setup& s) mutable {
              if (auto* e = find_export(eid)) e->clients.erase(cid);
              parked_.push_back(std::move(s));
              one();
            },
            [this, a = a, one](const caf::error&) mutable {
              // Closing already, or too slow: it goes away through nbd_gone like any client.
              send(a, close_atom::value);
              one();
            });
  }
  one();
}

// After the move: every parked client continues on its export node's (new) home, with the node's
// new actor; the bytes it had received and not parsed come along.
void supervisor_actor::unpark_clients() {
  if (parking_ > 0 && --parking_ > 0) return;  // an enclosing move still holds them
  auto parked = std::move(parked_);
  parked_.clear();
  for (auto& s : parked) start_client(std::move(s));
}

void supervisor_actor::nbd_client_gone(const std::string& export_id, uint64_t client_id) {
  if (nbd_) nbd_->client_gone();
  auto* e = find_export(export_id);
  if (!e) return;
  e->clients.erase(client_id);
  if (e->clients.empty()) e->serving = nullptr;  // it may be deleted now; no client uses it
  if (e->shutting_down && e->clients.empty()) finish_export(export_id);
}

}  // namespace blockd

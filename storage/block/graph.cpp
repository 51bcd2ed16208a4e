// Block graph operations: open with inline children, delete, lookup, users and permission propagation; supervisor's thread.
#include "storage/block/graph.h"

#include <algorithm>
#include <cctype>
#include <cstdio>

#include "protocol/qmp/json_writer.h"

namespace blockd::block {

namespace {
// Members every node has (BlockdevOptions' base); they never reach the driver's own option view
// and never appear in a "json:" filename.
const char* const common_keys[] = {"driver", "node-name", "discard", "cache", "active", "read-only",
                                   "auto-read-only", "force-share", "detect-zeroes"};

bool is_common(std::string_view k) {
  return std::any_of(std::begin(common_keys), std::end(common_keys), [&](const char* c) { return k == c; });
}

bool get_bool(const boost::json::object& o, const char* k, bool dflt) {
  auto* v = o.if_contains(k);
  return v ? v->as_bool() : dflt;
}

std::string user_key(const node& parent, const std::string& role) { return "node:" + parent.name() + "/" + role; }

// An inline child takes what it does not set itself from its parent, as QEMU's option inheritance
// does: read-only, auto-read-only, force-share and the cache flags; discard defaults to unmap below
// the top (the parent already applied its own discard policy).
boost::json::object inherited_options(const boost::json::object& child, const boost::json::object& parent) {
  boost::json::object o = child;
  for (const char* k : {"read-only", "auto-read-only", "force-share"})
    if (!o.contains(k))
      if (auto* v = parent.if_contains(k)) o[k] = *v;
  if (auto* pc = parent.if_contains("cache")) {
    boost::json::object cache = o.contains("cache") ? o["cache"].as_object() : boost::json::object();
    for (auto& kv : pc->as_object())
      if (!cache.contains(kv.key())) cache[kv.key()] = kv.value();
    o["cache"] = std::move(cache);
  }
  if (!o.contains("discard")) o["discard"] = "unmap";
  // An inactive parent opens its inline children inactive too (QEMU passes the flag down).
  if (auto* v = parent.if_contains("active"); v && !o.contains("active")) o["active"] = *v;
  return o;
}
}  // namespace

bool node_name_valid(const std::string& name) {
  if (name.empty() || !std::isalpha(static_cast<unsigned char>(name[0]))) return false;
  return std::all_of(name.begin(), name.end(), [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '.' || c == '_';
  });
}

graph::graph(std::function<driver_env()> env_for_new_node) : env_for_new_node_(std::move(env_for_new_node)) {}

graph::~graph() {
  // Parents first, so no node is destroyed while a parent still points at it.
  by_name_.clear();
  while (!nodes_.empty()) nodes_.pop_back();
}

std::vector<node*> graph::referenced_nodes(const boost::json::object& options) const {
  std::vector<node*> out;
  auto* drv = options.if_contains("driver");
  const driver_entry* e = drv && drv->is_string() ? find_driver(std::string(drv->as_string())) : nullptr;
  if (!e) return out;
  for (auto& role : e->child_roles) {
    auto* v = options.if_contains(role);
    if (!v || v->is_null()) continue;  // null: explicitly none (a qcow2 image without its backing file)
    if (v->is_string()) {
      if (node* n = find(std::string(v->as_string()))) out.push_back(n);
    } else if (v->is_object()) {
      for (node* n : referenced_nodes(v->as_object())) out.push_back(n);
    }
  }
  return out;
}

node* graph::find(const std::string& name) const {
  auto it = by_name_.find(name);
  return it == by_name_.end() ? nullptr : it->second;
}

result<node*> graph::lookup(const std::string* device, const std::string* node_name) const {
  // blockd has no named block backends (as QSD, which has no guest devices), so `device` never matches.
  if (node_name)
    if (node* n = find(*node_name)) return n;
  return fail("Cannot find device='" + (device ? *device : std::string()) + "' nor node-name='" +
              (node_name ? *node_name : std::string()) + "'");
}

std::vector<node*> graph::nodes_newest_first() const {
  std::vector<node*> out;
  for (auto it = nodes_.rbegin(); it != nodes_.rend(); ++it) out.push_back(it->get());
  return out;
}

result<node*> graph::add(const boost::json::object& options) {
  std::vector<node*> created;
  auto r = open_node(options, true, created);
  if (!r) {
    // All or nothing: close what this call opened, newest first.
    for (auto it = created.rbegin(); it != created.rend(); ++it) destroy(*it);
    return r;
  }
  (*r)->monitor_owned = true;
  return r;
}

result<node*> graph::open_node(const boost::json::object& options, bool top_level, std::vector<node*>& created,
                               const boost::json::object* given) {
  std::string driver(options.at("driver").as_string());
  const driver_entry* e = find_driver(driver);
  std::string name;
  bool auto_named = false;
  if (auto* v = options.if_contains("node-name")) {
    name = std::string(v->as_string());
    if (!node_name_valid(name)) return fail("Invalid node-name: '" + name + "'");
    if (find(name)) return fail("Duplicate nodes with node-name='" + name + "'");
    if (name.size() > 31) return fail("Node name too long");
  } else if (top_level) {
    return fail("'node-name' must be specified for the root node");
  } else {
    char buf[32];
    std::snprintf(buf, sizeof buf, "#block%03u", ++auto_name_counter_ % 1000);
    name = buf;
    auto_named = true;
  }
  if (!e)
    return fail("Driver '" + driver + "' is not available in this blockd version yet; available drivers: "
                "file, host_device, null-aio, null-co, qcow2, raw");

  node_settings s;
  s.name = name;
  s.auto_named = auto_named;
  s.driver = driver;
  s.read_only = get_bool(options, "read-only", false);
  s.auto_read_only = get_bool(options, "auto-read-only", false);
  s.force_share = get_bool(options, "force-share", false);
  if (auto* c = options.if_contains("cache")) {
    s.direct = get_bool(c->as_object(), "direct", false);
    s.no_flush = get_bool(c->as_object(), "no-flush", false);
  }
  if (auto* v = options.if_contains("discard")) s.discard_unmap = v->as_string() == "unmap";
  if (auto* v = options.if_contains("detect-zeroes")) {
    std::string dz(v->as_string());
    s.detect_zeroes = dz == "on" ? detect_zeroes_mode::on : dz == "unmap" ? detect_zeroes_mode::unmap
                                                                          : detect_zeroes_mode::off;
    if (dz == "unmap" && !s.discard_unmap)
      return fail("setting detect-zeroes to unmap is not allowed without setting discard operation to unmap");
  }
  if (s.force_share && !s.read_only) return fail("force-share=on can only be used with read-only images");
  if (auto* v = options.if_contains("active"); v && !v->as_bool()) s.active = false;
  s.options = options;
  s.given = given ? *given : options;

  // Children: a reference names an existing node; an inline definition opens one now.
  boost::json::object own;  // the driver's view: its own members, children resolved away
  for (auto& kv : options)
    if (!is_common(kv.key())) own[kv.key()] = kv.value();
  open_args a{own, {}, env_for_new_node_()};
  a.read_only = s.read_only;
  a.auto_read_only = s.auto_read_only;
  a.direct = s.direct;
  a.no_flush = s.no_flush;
  a.node_name = name;
  a.discard_unmap = s.discard_unmap;
  a.filename_of = [this](const node& n) { return filename(n); };
  a.open_child = [&, this](const std::string& role, const boost::json::object& child_opts) -> result<node*> {
    // Images name their backing files themselves: a loop (A -> B -> A) or an absurd chain must end
    // in an error, not in a stack overflow.
    if (implicit_depth_ >= max_implicit_depth)
      return fail("Backing chain of node '" + name + "' is longer than " + std::to_string(max_implicit_depth) +
                  " images (does it loop?)");
    ++implicit_depth_;
    auto r = open_node(child_opts, false, created);
    --implicit_depth_;
    if (r) a.children.emplace_back(role, *r);
    return r;
  };
  size_t slot = nodes_.size();  // where this node goes in the creation order: after its file child
  for (auto& role : e->child_roles) {
    auto* v = options.if_contains(role);
    if (!v || v->is_null()) continue;  // null: explicitly none (a qcow2 image without its backing file)
    node* child = nullptr;
    if (v->is_string()) {
      child = find(std::string(v->as_string()));
      std::string ref(v->as_string());
      if (!child) {
        std::string msg = "Cannot find device='" + ref + "' nor node-name='" + ref + "'";
        return fail(role == "backing" ? "Could not open backing file: " + msg : msg);
      }
    } else {
      auto child_opts = inherited_options(v->as_object(), options);
      // A backing file is only read: read-only unless its own options say otherwise (QEMU's default).
      if (role == "backing" && !v->as_object().contains("read-only")) {
        child_opts["read-only"] = true;
        child_opts["auto-read-only"] = false;
      }
      auto r = open_node(child_opts, false, created, &v->as_object());
      if (!r) return r;
      child = *r;
    }
    a.children.emplace_back(role, child);
    if (role == e->child_roles.front()) slot = nodes_.size();
  }
  auto drv = e->open(a);
  if (!drv) return std::unexpected(drv.error());
  s.read_only = a.read_only;  // auto-read-only may have fallen back
  auto n = std::make_unique<node>(std::move(s), std::move(*drv), env_for_new_node_());
  node* np = n.get();
  // Children attach in the driver's role order (file, data-file, backing), whether the options
  // named them or the image did, as QEMU attaches them.
  auto rank = [e](const std::string& role) {
    return std::find(e->child_roles.begin(), e->child_roles.end(), role) - e->child_roles.begin();
  };
  std::stable_sort(a.children.begin(), a.children.end(), [&](auto& x, auto& y) { return rank(x.first) < rank(y.first); });
  for (auto& [role, child] : a.children) np->children.push_back({role, child});
  // QEMU registers a node right after its file child, before the rest of its chain (listing order).
  by_name_[np->name()] = np;
  nodes_.insert(nodes_.begin() + std::ptrdiff_t(std::min(slot, nodes_.size())), std::move(n));
  created.push_back(np);
  if (!np->settings().active) np->driver().inactivate();
  // Take the edges' permissions on the children (a window forbids resizing under it, ...).
  if (auto r = refresh_perms(*np); !r) return std::unexpected(r.error());
  return np;
}

result<void> graph::refresh_perms(node& n) {
  uint32_t perm = 0, shared = perm_all;
  for (auto& u : n.users) {
    perm |= u.p.perm;
    shared &= u.p.shared;
  }
  if (n.settings().force_share) shared = perm_all;
  // An inactive node holds nothing: its image may be in another process's hands (migration handover).
  if (!n.settings().active) {
    perm = 0;
    shared = perm_all;
  }
  if (auto r = n.driver().set_perm(perm, shared); !r) return r;
  n.cum_perm = perm;
  n.cum_shared = shared;
  for (auto& edge : n.children) {
    uint32_t cp = 0, cs = perm_all;
    n.driver().child_perm(edge.role, perm, shared, cp, cs);
    edge.perm = cp;
    edge.shared = cs;
    node& c = *edge.child;
    std::string key = user_key(n, edge.role);
    perm_user u{"node '" + n.name() + "' (uses node '" + c.name() + "' as '" + edge.role + "' child)", cp, cs};
    std::vector<perm_user> others;
    for (auto& x : c.users)
      if (x.key != key) others.push_back(x.p);
    if (auto r = check_conflict(c.name(), others, u); !r) return r;
    auto it = std::find_if(c.users.begin(), c.users.end(), [&](auto& x) { return x.key == key; });
    if (it == c.users.end()) c.users.push_back({key, u});
    else it->p = u;
    if (auto r = refresh_perms(c); !r) return r;
  }
  return {};
}

result<void> graph::attach_user(node& n, const std::string& key, perm_user u) {
  std::vector<perm_user> others;
  for (auto& x : n.users) others.push_back(x.p);
  if (auto r = check_conflict(n.name(), others, u); !r) return r;
  n.users.push_back({key, std::move(u)});
  if (auto r = refresh_perms(n); !r) {
    detach_user(n, key);
    return r;
  }
  return {};
}

void graph::detach_user(node& n, const std::string& key) {
  std::erase_if(n.users, [&](auto& x) { return x.key == key; });
  (void)refresh_perms(n);  // dropping permissions cannot conflict
}

result<void> graph::check_del(const std::string& name) {
  node* n = find(name);
  if (!n) return fail("Failed to find node with node-name='" + name + "'");
  // A backing file is blocked for deletion by its overlay first (QEMU's op blocker).
  for (auto& p : nodes_)
    for (auto& edge : p->children)
      if (edge.child == n && edge.role == "backing")
        return fail("Node '" + name + "' is busy: node is used as backing hd of '" + p->name() + "'");
  if (!n->monitor_owned) return fail("Node " + name + " is not owned by the monitor");
  if (!n->users.empty()) return fail("Block device " + name + " is in use");
  return {};
}

void graph::del(const std::string& name) {
  if (node* n = find(name)) destroy(n);
}

void graph::destroy(node* n) {
  auto children = n->children;
  for (auto& edge : children) {
    std::erase_if(edge.child->users, [&](auto& x) { return x.key == user_key(*n, edge.role); });
  }
  by_name_.erase(n->name());
  std::erase_if(nodes_, [&](auto& p) { return p.get() == n; });
  for (auto& edge : children) {
    node* c = edge.child;
    if (!find(c->name())) continue;
    if (!c->monitor_owned && c->users.empty()) destroy(c);  // an inline child goes with its parent
    else (void)refresh_perms(*c);
  }
}

boost::json::object graph::full_options(const node& n) const {
  boost::json::object o;
  o["driver"] = n.settings().driver;
  for (auto& kv : n.settings().options) {
    if (is_common(kv.key())) continue;
    bool child = false;
    for (auto& edge : n.children)
      if (edge.role == kv.key()) {
        o[kv.key()] = full_options(*edge.child);
        child = true;
      }
    if (!child) o[kv.key()] = kv.value();
  }
  return o;
}

std::string graph::filename(const node& n) const {
  const driver_entry* e = find_driver(n.settings().driver);
  boost::json::object own;
  for (auto& kv : n.settings().options)
    if (!is_common(kv.key())) own[kv.key()] = kv.value();
  if (e && e->plain_filename) {
    std::string plain = e->plain_filename(own);
    if (!plain.empty()) return plain;
  }
  // A format node whose own options only tune it (no window, no other backing than its image
  // names) over a protocol node is named after that node's file; a format over another format is
  // not (its image could not be probed from the plain name).
  const node* file = nullptr;
  for (auto& edge : n.children)
    if (e && !e->child_roles.empty() && edge.role == e->child_roles.front()) file = edge.child;
  const driver_entry* fe = file ? find_driver(file->settings().driver) : nullptr;
  bool plain = e && fe && fe->protocol;
  for (auto& kv : own) {
    if (!plain) break;
    std::string_view k = kv.key();
    if (k == e->child_roles.front()) continue;
    if (std::find(e->runtime_options.begin(), e->runtime_options.end(), k) != e->runtime_options.end()) continue;
    if (k == "backing" && e->backing_from_image) {
      // An explicit backing keeps the plain name only when it is what the image names anyway.
      image_facts f = n.driver().facts();
      if (kv.value().is_null()) {
        plain = f.backing_filename.empty();
        continue;
      }
      const node* b = nullptr;
      for (auto& edge : n.children)
        if (edge.role == "backing") b = edge.child;
      // Compared as the image spells it: a relative name never equals a node's full filename.
      plain = b && !f.backing_filename.empty() && filename(*b) == f.backing_filename;
      continue;
    }
    plain = false;
  }
  if (plain) {
    std::string child = filename(*file);
    if (child.rfind("json:", 0) != 0) return child;
  }
  return "json:" + qmp::to_json(boost::json::value(full_options(n)), false);
}

}  // namespace blockd::block

// ---- blockdev-reopen -------------------------------------------------------------------------

namespace blockd::block {
namespace {
// The options every node's reopen handles itself; a driver option left out must be resettable.
bool reset_common(std::string_view k) {
  return k == "node-name" || k == "driver" || k == "discard" || k == "cache" || k == "read-only" ||
         k == "auto-read-only" || k == "detect-zeroes";
}

bool contains(const std::vector<std::string>& v, std::string_view k) {
  return std::find(v.begin(), v.end(), k) != v.end();
}

bool writes(uint32_t perm) { return perm & (perm_write | perm_write_unchanged); }
}  // namespace

bool graph::reaches(const node& from, const node& to) const {
  if (&from == &to) return true;
  for (auto& e : from.children)
    if (reaches(*e.child, to)) return true;
  return false;
}

result<graph::reopen_plan> graph::reopen_prepare(const boost::json::array& list) {
  // Every entry names an existing node; entries for the same node merge, later members winning.
  std::vector<std::pair<node*, boost::json::object>> queue;
  for (auto& v : list) {
    const auto& o = v.as_object();
    auto* nn = o.if_contains("node-name");
    if (!nn) return fail("node-name not specified");
    std::string name(nn->as_string());
    node* n = find(name);
    if (!n) return fail("Failed to find node with node-name='" + name + "'");
    auto it = std::find_if(queue.begin(), queue.end(), [&](auto& q) { return q.first == n; });
    if (it == queue.end()) {
      queue.emplace_back(n, o);
    } else {
      for (auto& kv : o) it->second[kv.key()] = kv.value();
    }
  }
  reopen_plan plan;
  for (auto& [n, o] : queue) {
    if (auto r = reopen_queue(plan, *n, o); !r) {
      reopen_abort(plan);
      return std::unexpected(r.error());
    }
  }
  // Read-only needs that nobody writes through the node any more, unless that writer is a parent
  // becoming read-only in the same reopen.
  for (auto& e : plan.entries) {
    if (!e.next.read_only || e.n->settings().read_only) continue;
    for (auto& u : e.n->users) {
      if (!writes(u.p.perm)) continue;
      bool parent_goes_ro = std::any_of(plan.entries.begin(), plan.entries.end(), [&](auto& p) {
        return p.next.read_only && u.key.rfind("node:" + p.n->name() + "/", 0) == 0;
      });
      if (!parent_goes_ro) {
        reopen_abort(plan);
        return fail("Cannot make block node read-only, there is a writer on it");
      }
    }
  }
  return plan;
}

result<void> graph::reopen_queue(reopen_plan& plan, node& n, boost::json::object options,
                                 const boost::json::object* given) {
  for (auto& e : plan.entries)
    if (e.n == &n) return {};  // an inline child already queued through its parent
  const node_settings& cur = n.settings();
  const driver_entry* de = find_driver(cur.driver);
  node_settings next = cur;
  next.read_only = get_bool(options, "read-only", false);
  next.auto_read_only = get_bool(options, "auto-read-only", false);
  next.direct = next.no_flush = false;
  if (auto* c = options.if_contains("cache")) {
    next.direct = get_bool(c->as_object(), "direct", false);
    next.no_flush = get_bool(c->as_object(), "no-flush", false);
  }
  next.discard_unmap = false;
  if (auto* v = options.if_contains("discard")) next.discard_unmap = v->as_string() == "unmap";
  next.detect_zeroes = detect_zeroes_mode::off;
  if (auto* v = options.if_contains("detect-zeroes")) {
    std::string dz(v->as_string());
    next.detect_zeroes = dz == "on" ? detect_zeroes_mode::on : dz == "unmap" ? detect_zeroes_mode::unmap
                                                                             : detect_zeroes_mode::off;
    if (dz == "unmap" && !next.discard_unmap)
      return fail("setting detect-zeroes to unmap is not allowed without setting discard operation to unmap");
  }
  // A driver option that was set and is now left out would reset to its default: only some may.
  std::vector<std::string> resettable = n.driver().reopen_resettable();
  for (auto& kv : cur.options) {
    std::string_view k = kv.key();
    if (options.contains(k) || reset_common(k) || contains(resettable, k)) continue;
    if (de && contains(de->child_roles, k)) continue;
    return fail("Option '" + std::string(k) + "' cannot be reset to its default value");
  }

  // Children: the same node (an inline one is reopened with what it inherits), another node (the
  // child is replaced), or an inline definition of the current inline child.
  std::vector<node::child_edge> children = n.children;
  struct inline_reopen {
    node* child;
    boost::json::object options;  // with what it inherits from the new parent options
    boost::json::object given;    // its own options, as the user gave them
  };
  std::vector<inline_reopen> inline_reopens;
  for (auto& edge : children) {
    node* current = edge.child;
    auto* v = options.if_contains(edge.role);
    bool inline_child = !current->monitor_owned;
    if (!v) {
      if (inline_child)
        inline_reopens.push_back({current, inherited_options(current->settings().given, options), current->settings().given});
      continue;
    }
    if (v->is_string()) {
      std::string ref(v->as_string());
      node* target = find(ref);
      if (!target) return fail("Cannot find device='' nor node-name='" + ref + "'");
      if (target == current) {
        if (inline_child)
          inline_reopens.push_back({current, inherited_options(current->settings().given, options), current->settings().given});
        continue;
      }
      if (reaches(*target, n))
        return fail("Making '" + ref + "' a " + edge.role + " child of '" + n.name() + "' would create a cycle");
      edge.child = target;
      continue;
    }
    const auto& dict = v->as_object();
    if (!inline_child) {
      std::string first = dict.empty() ? std::string() : std::string(dict.begin()->key());
      return fail("Cannot change the option '" + edge.role + "." + first + "'");
    }
    if (auto* nn = dict.if_contains("node-name"); nn && nn->as_string() != current->name())
      return fail("Cannot change the option 'node-name'");
    inline_reopens.push_back({current, inherited_options(dict, options), dict});
  }

  // The driver sees its own members and the children it will have.
  boost::json::object own;
  for (auto& kv : options)
    if (!is_common(kv.key()) && !(de && contains(de->child_roles, kv.key()))) own[kv.key()] = kv.value();
  reopen_args a{own, {}, next.read_only, next.direct, next.no_flush};
  for (auto& edge : children) a.children.emplace_back(edge.role, edge.child);
  std::vector<std::string> consumed;
  auto st = n.driver().reopen_prepare(a, consumed);
  if (!st) return std::unexpected(st.error());
  reopen_plan::entry entry{&n, {}, children, std::move(*st)};

  // Whatever the driver did not take must be as it was.
  auto unchanged = [&](std::string_view k) -> result<void> {
    auto* old = cur.options.if_contains(k);
    if (!old || *old != options.at(k)) return fail("Cannot change the option '" + std::string(k) + "'");
    return {};
  };
  auto bail = [&](error e) -> result<void> {
    entry.state->abort();
    return std::unexpected(std::move(e));
  };
  for (const char* k : {"driver", "force-share", "active"})
    if (options.contains(k))
      if (auto r = unchanged(k); !r) return bail(r.error());
  for (auto& kv : own)
    if (!contains(consumed, kv.key()))
      if (auto r = unchanged(kv.key()); !r) return bail(r.error());

  next.options = options;
  next.given = given ? *given : options;
  entry.next = std::move(next);
  plan.entries.push_back(std::move(entry));
  for (auto& ir : inline_reopens)
    if (auto r = reopen_queue(plan, *ir.child, std::move(ir.options), &ir.given); !r) return r;
  return {};
}

void graph::reopen_commit(reopen_plan& plan) {
  std::vector<node*> dropped;
  for (auto& e : plan.entries) {
    e.state->commit();
    for (auto& old : e.n->children) {
      bool kept = std::any_of(e.children.begin(), e.children.end(),
                              [&](auto& c) { return c.role == old.role && c.child == old.child; });
      if (kept) continue;
      std::erase_if(old.child->users, [&](auto& x) { return x.key == user_key(*e.n, old.role); });
      dropped.push_back(old.child);
    }
    e.n->children = e.children;
    e.n->update_settings(std::move(e.next));
  }
  // Permissions follow the new flags and edges (file locks included); parents first.
  for (auto& e : plan.entries) (void)refresh_perms(*e.n);
  for (node* c : dropped) {
    if (!find(c->name())) continue;
    if (!c->monitor_owned && c->users.empty()) destroy(c);  // a replaced inline child goes away
    else (void)refresh_perms(*c);
  }
  plan.entries.clear();
}

void graph::reopen_abort(reopen_plan& plan) {
  for (auto it = plan.entries.rbegin(); it != plan.entries.rend(); ++it) it->state->abort();
  plan.entries.clear();
}

// ---- blockdev-set-active ---------------------------------------------------------------------

result<void> graph::set_active(node* n, bool active) {
  if (n) return active ? activate(*n) : inactivate(*n);
  if (active) {
    for (auto& p : nodes_)  // oldest first: children before their parents
      if (auto r = activate(*p); !r) return r;
    return {};
  }
  // Every root (a node no other node uses); inactivating it takes its children along.
  for (node* p : nodes_newest_first()) {
    bool root = std::none_of(p->users.begin(), p->users.end(), [](auto& u) { return u.key.rfind("node:", 0) == 0; });
    if (root)
      if (auto r = inactivate(*p); !r) return r;
  }
  return {};
}

result<void> graph::activate(node& n) {
  if (n.settings().active) return {};
  for (auto& e : n.children)
    if (auto r = activate(*e.child); !r) return r;
  node_settings s = n.settings();
  s.active = true;
  n.update_settings(s);
  if (auto r = n.driver().activate(); !r) {
    s.active = false;
    n.update_settings(s);
    return r;
  }
  if (auto r = refresh_perms(n); !r) {
    s.active = false;
    n.update_settings(s);
    (void)refresh_perms(n);
    n.driver().inactivate();
    return r;
  }
  return {};
}

result<void> graph::inactivate(node& n) {
  if (!n.settings().active) return {};
  for (auto& u : n.users) {
    if (u.key.rfind("node:", 0) == 0) {
      std::string parent = u.key.substr(5, u.key.find('/') - 5);
      if (node* p = find(parent); p && p->settings().active) return fail("Node has active parent node");
    } else if (writes(u.p.perm) && !u.p.allows_inactive) {
      return fail("node '" + n.name() + "' is in use by " + u.p.description + " with write permission; "
                  "remove that user first");
    }
  }
  node_settings s = n.settings();
  s.active = false;
  n.update_settings(s);
  (void)refresh_perms(n);  // drops every permission, so the file locks go
  n.driver().inactivate();
  // Children nobody active uses any more follow.
  for (auto& e : n.children) {
    node& c = *e.child;
    bool used = std::any_of(c.users.begin(), c.users.end(), [&](auto& u) {
      if (u.key.rfind("node:", 0) != 0) return true;
      node* p = find(u.key.substr(5, u.key.find('/') - 5));
      return p && p->settings().active;
    });
    if (!used)
      if (auto r = inactivate(c); !r) return r;
  }
  return {};
}

}  // namespace blockd::block

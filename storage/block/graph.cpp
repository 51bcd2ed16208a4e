// Block graph operations: open with inline children, delete, lookup, roots, users and permission propagation (reopen: graph_reopen.cpp, staged add: graph_steps.cpp); supervisor's thread.
#include "storage/block/graph.h"

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <unordered_set>

#include "protocol/qmp/json_writer.h"
#include "storage/block/graph_options.h"

namespace blockd::block {

bool node_name_valid(const std::string& name) {
  if (name.empty() || !std::isalpha(static_cast<unsigned char>(name[0]))) return false;
  return std::all_of(name.begin(), name.end(), [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '.' || c == '_';
  });
}

graph::graph(std::function<driver_env()> env_for_new_node) : env_for_new_node_(std::move(env_for_new_node)) {}

graph::~graph() {
  // Parents first, so no node is destroyed while a parent still points at it. Creation order is
  // not enough: a reopen may have given an old node a newer child. Closed here and now: whoever
  // set a closer may be going away too (an owner closes on the homes first, with detach_all).
  closer_ = nullptr;
  auto all = detach_all();
  for (auto& p : all) p.reset();
}

std::vector<node*> graph::referenced_nodes(const boost::json::object& options) const {
  std::vector<node*> out;
  auto* drv = options.if_contains("driver");
  const driver_entry* e = drv && drv->is_string() ? find_driver(std::string(drv->as_string())) : nullptr;
  if (!e) return out;
  auto ref = [&](const boost::json::value& v) {
    if (v.is_string()) {
      if (node* n = find(std::string(v.as_string()))) out.push_back(n);
    } else if (v.is_object()) {
      for (node* n : referenced_nodes(v.as_object())) out.push_back(n);
    }
  };
  for (auto& role : e->child_roles) {
    auto* v = options.if_contains(role);
    if (!v || v->is_null()) continue;  // null: explicitly none (a qcow2 image without its backing file)
    ref(*v);
  }
  for (auto& member : e->child_list_roles)
    if (auto* v = options.if_contains(member); v && v->is_array())
      for (auto& el : v->as_array()) ref(el);
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

// ---- blockdev-add -------------------------------------------------------------------------------

namespace {
// blockdev-add as an action: prepare opens the node with its inline children (permissions are
// taken by the transaction), abort closes what it opened, newest first.
class add_action final : public action {
 public:
  add_action(graph& g, boost::json::object options, std::function<result<node*>(std::vector<node*>&)> open,
             std::function<void(node*)> destroy, node** out)
      : g_(g), options_(std::move(options)), open_(std::move(open)), destroy_(std::move(destroy)), out_(out) {}
  result<void> prepare() override {
    auto r = open_(created_);
    if (!r) {
      for (auto it = created_.rbegin(); it != created_.rend(); ++it) destroy_(*it);
      created_.clear();
      return std::unexpected(r.error());
    }
    top_ = *r;
    perm_seeds = {top_};
    return {};
  }
  void commit() override {
    top_->monitor_owned = true;
    if (out_) *out_ = top_;
  }
  void abort() override {
    for (auto it = created_.rbegin(); it != created_.rend(); ++it) destroy_(*it);
    created_.clear();
  }

 private:
  graph& g_;
  boost::json::object options_;
  std::function<result<node*>(std::vector<node*>&)> open_;
  std::function<void(node*)> destroy_;
  node** out_;
  std::vector<node*> created_;
  node* top_ = nullptr;
};
}  // namespace

std::unique_ptr<action> graph::add_action(const boost::json::object& options, node** out) {
  return std::make_unique<block::add_action>(
      *this, options, [this, options](std::vector<node*>& created) { return open_node(options, true, created); },
      [this](node* n) {
        if (alive(n)) destroy(n);  // an inline child may have gone with its parent already
      },
      out);
}

result<node*> graph::add(const boost::json::object& options) {
  node* out = nullptr;
  std::vector<std::unique_ptr<action>> list;
  list.push_back(add_action(options, &out));
  if (auto r = run(std::move(list)); !r) return std::unexpected(r.error());
  return out;
}

node* graph::lookup_for_open(const std::string& name, const staged_add* staged) const {
  if (staged)
    if (auto it = staged->names.find(name); it != staged->names.end()) return it->second;
  return find(name);
}

void graph::insert_node(std::unique_ptr<node> n, size_t slot) {
  node* np = n.get();
  for (auto& sl : np->slots) {
    node* c = sl->child;
    sl->child = nullptr;
    link(*sl, c);
  }
  by_name_[np->name()] = np;
  alive_.insert(np);
  nodes_.insert(nodes_.begin() + std::ptrdiff_t(std::min(slot, nodes_.size())), std::move(n));
}

result<node*> graph::open_node(const boost::json::object& options, bool top_level, std::vector<node*>& created,
                               const boost::json::object* given, staged_add* staged) {
  // A staged open runs on the new nodes' home: it reads the graph (the supervisor waits meanwhile)
  // and keeps what it opens in `staged`, counting positions as if those nodes were listed already.
  auto listed = [&] { return staged ? staged->base + staged->listing.size() : nodes_.size(); };
  std::string driver(options.at("driver").as_string());
  const driver_entry* e = find_driver(driver);
  std::string name;
  bool auto_named = false;
  if (auto* v = options.if_contains("node-name")) {
    name = std::string(v->as_string());
    if (!node_name_valid(name)) return fail("Invalid node-name: '" + name + "'");
    if (lookup_for_open(name, staged)) return fail("Duplicate nodes with node-name='" + name + "'");
    if (name.size() > 31) return fail("Node name too long");
  } else if (top_level) {
    return fail("'node-name' must be specified for the root node");
  } else {
    char buf[32];
    std::snprintf(buf, sizeof buf, "#block%03u", ++auto_name_counter_ % 1000);
    name = buf;
    auto_named = true;
  }
  if (!e) {
    std::vector<std::string> names;
    for (const driver_entry* d : registered_drivers()) names.push_back(d->name);
    std::sort(names.begin(), names.end());
    std::string list;
    for (auto& n : names) list += (list.empty() ? "" : ", ") + n;
    return fail("Driver '" + driver + "' is not available in this blockd version yet; available drivers: " + list);
  }

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
  open_args a{own, {}, staged ? staged->env : env_for_new_node_()};
  a.read_only = s.read_only;
  a.auto_read_only = s.auto_read_only;
  a.direct = s.direct;
  a.no_flush = s.no_flush;
  a.node_name = name;
  a.discard_unmap = s.discard_unmap;
  a.inactive = !s.active;
  a.filename_of = [this](const node& n) { return filename(n); };
  a.find_node = [this, staged](const std::string& n) { return lookup_for_open(n, staged); };
  if (staged)
    a.objects = staged->objects;
  else if (objects_source_)
    a.objects = objects_source_();
  // A slot for every role the driver has, in its order (file, data-file, backing), filled or not:
  // the driver keeps handles on them, and the graph may fill, replace or empty them later.
  for (auto& role : e->child_roles) a.set_child(role, nullptr);
  a.open_child = [&, this](const std::string& role, const boost::json::object& child_opts) -> result<node*> {
    // Images name their backing files themselves: a loop (A -> B -> A) or an absurd chain must end
    // in an error, not in a stack overflow.
    if (implicit_depth_ >= max_implicit_depth)
      return fail("Backing chain of node '" + name + "' is longer than " + std::to_string(max_implicit_depth) +
                  " images (does it loop?)");
    ++implicit_depth_;
    auto r = open_node(child_opts, false, created, nullptr, staged);
    --implicit_depth_;
    if (r) a.set_child(role, *r);
    return r;
  };
  size_t slot = listed();  // where this node goes in the creation order: after its file child
  auto open_ref = [&](const std::string& role, const boost::json::value* v) -> result<node*> {
    if (v->is_string()) {
      node* child = lookup_for_open(std::string(v->as_string()), staged);
      std::string ref(v->as_string());
      if (!child) {
        std::string msg = "Cannot find device='" + ref + "' nor node-name='" + ref + "'";
        return fail(role == "backing" ? "Could not open backing file: " + msg : msg);
      }
      return child;
    }
    auto child_opts = inherited_options(v->as_object(), options);
    // A backing file is only read: read-only unless its own options say otherwise (QEMU's default).
    if (role == "backing" && !v->as_object().contains("read-only")) {
      child_opts["read-only"] = true;
      child_opts["auto-read-only"] = false;
    }
    return open_node(child_opts, false, created, &v->as_object(), staged);
  };
  for (auto& role : e->child_roles) {
    auto* v = options.if_contains(role);
    if (!v || v->is_null()) continue;  // null: explicitly none (a qcow2 image without its backing file)
    auto child = open_ref(role, v);
    if (!child) return child;
    a.set_child(role, *child);
    if (role == e->child_roles.front()) slot = listed();
  }
  // List members (quorum's children): one slot per element, "children.0", "children.1", ... A
  // driver with only list children is listed before them, as QEMU registers a quorum node.
  for (auto& member : e->child_list_roles) {
    auto* v = options.if_contains(member);
    if (!v || !v->is_array()) continue;
    size_t i = 0;
    for (auto& el : v->as_array()) {
      std::string role = member + "." + std::to_string(i++);
      auto child = open_ref(role, &el);
      if (!child) return child;
      a.set_child(role, *child);
    }
  }
  auto drv = e->open(a);
  if (!drv) return std::unexpected(drv.error());
  s.read_only = a.read_only;  // auto-read-only may have fallen back
  auto n = std::make_unique<node>(std::move(s), std::move(*drv), a.env, a.bitmaps);
  node* np = n.get();
  // Children attach in the driver's role order (file, data-file, backing), whether the options
  // named them or the image did, as QEMU attaches them.
  np->slots = std::move(a.edges);
  for (auto& sl : np->slots) sl->parent = np;
  if (!np->settings().active) np->driver().inactivate();
  np->publish_facts();  // this runs on the node's home
  // QEMU registers a node right after its file child, before the rest of its chain (listing order).
  if (staged) {
    staged->names[np->name()] = np;
    size_t at = std::min(slot - staged->base, staged->listing.size());
    staged->listing.insert(staged->listing.begin() + std::ptrdiff_t(at), np);
    staged->owned.push_back(std::move(n));
  } else {
    insert_node(std::move(n), slot);
  }
  created.push_back(np);
  return np;
}

// ---- edges, roots and permissions ---------------------------------------------------------------

namespace {
std::string parent_description(const child_edge& e) {
  return "node '" + e.parent->name() + "' (uses node '" + e.child->name() + "' as '" + e.role + "' child)";
}
}  // namespace

void graph::link(child_edge& e, node* to) {
  if (e.child) std::erase(e.child->parents, &e);
  e.child = to;
  if (to) {
    to->parents.push_back(&e);
    e.attached_seq = ++attach_seq_;
  } else {
    e.perm = 0;
    e.shared = perm_all;
  }
}

result<void> graph::update_perms(const std::vector<node*>& seeds) {
  // The affected subgraph: the seeds that still exist and everything below them, parents before
  // children (reverse post-order of a depth-first walk; the graph has no cycles).
  std::vector<node*> order;
  std::unordered_set<node*> seen;
  std::function<void(node*)> visit = [&](node* n) {
    if (!seen.insert(n).second) return;
    for (child_edge* e : n->children()) visit(e->child);
    order.push_back(n);
  };
  for (node* n : seeds)
    if (alive(n)) visit(n);
  std::reverse(order.begin(), order.end());

  struct perms {
    uint32_t perm, shared;
  };
  std::unordered_map<const child_edge*, perms> edge_next;
  std::unordered_map<const node*, perms> node_next;
  for (node* n : order) {
    struct user {
      uint64_t seq;
      uint32_t perm, shared;
      std::string description;
    };
    std::vector<user> users;
    for (child_edge* e : n->parents) {
      auto it = edge_next.find(e);
      perms p = it != edge_next.end() ? it->second : perms{e->perm, e->shared};
      users.push_back({e->attached_seq, p.perm, p.shared, parent_description(*e)});
    }
    for (root* r : n->roots) users.push_back({r->attached_seq, r->perm, r->shared, r->description});
    // Every pair of users must agree. The newest user is checked first, against the others oldest
    // first, so a refused new user is the one the text names (QEMU's wording and order).
    std::sort(users.begin(), users.end(), [](auto& a, auto& b) { return a.seq > b.seq; });
    for (size_t i = 0; i < users.size(); ++i)
      for (size_t j = users.size(); j-- > i + 1;) {
        const user& a = users[i];
        const user& b = users[j];
        auto conflict = [&](uint32_t bits, const user& needs, const user& refuses) {
          return fail("Permission conflict on node '" + n->name() + "': permissions '" + perm_names(bits) +
                      "' are both required by " + needs.description + " and unshared by " + refuses.description +
                      ".");
        };
        if (uint32_t bad = a.perm & ~b.shared) return conflict(bad, a, b);
        if (uint32_t bad = b.perm & ~a.shared) return conflict(bad, b, a);
      }
    uint32_t perm = 0, shared = perm_all;
    for (auto& u : users) {
      perm |= u.perm;
      shared &= u.shared;
    }
    if (n->settings().force_share) shared = perm_all;
    // An inactive node holds nothing: its image may be in another process's hands (migration handover).
    if (!n->settings().active && !activating_.count(n)) {
      perm = 0;
      shared = perm_all;
    }
    node_next[n] = {perm, shared};
    // Nobody may write through a read-only node (as it will be once a pending reopen commits).
    bool ro_next = n->settings().read_only;
    if (auto pr = pending_.find(n); pr != pending_.end()) ro_next = pr->second.read_only;
    if (ro_next && (perm & (perm_write | perm_write_unchanged))) return fail("Block node is read-only");
    for (child_edge* e : n->children()) {
      uint32_t cp = 0, cs = perm_all;
      bool ro = n->settings().read_only;
      if (auto pr = pending_.find(n); pr != pending_.end())
        pr->second.state->child_perm(n->driver(), e->role, pr->second.read_only, perm, shared, cp, cs);
      else
        n->driver().child_perm(e->role, ro, perm, shared, cp, cs);
      edge_next[e] = {cp, cs};
    }
  }
  // Every driver whose permissions change must be able to take them (file locks of other processes).
  for (node* n : order) {
    perms p = node_next[n];
    if (p.perm == n->cum_perm && p.shared == n->cum_shared) continue;
    if (auto r = n->driver().check_perm(p.perm, p.shared); !r) return r;
  }
  // All agree: take them.
  for (node* n : order) {
    perms p = node_next[n];
    if (p.perm != n->cum_perm || p.shared != n->cum_shared) n->driver().set_perm(p.perm, p.shared);
    n->cum_perm = p.perm;
    n->cum_shared = p.shared;
    for (child_edge* e : n->children()) {
      e->perm = edge_next[e].perm;
      e->shared = edge_next[e].shared;
    }
  }
  return {};
}

result<void> graph::run(std::vector<std::unique_ptr<action>> actions) {
  size_t prepared = 0;
  result<void> res;
  for (auto& a : actions) {
    res = a->prepare();
    if (!res) break;
    ++prepared;
  }
  if (res) {
    std::vector<node*> seeds;
    for (auto& a : actions) seeds.insert(seeds.end(), a->perm_seeds.begin(), a->perm_seeds.end());
    res = update_perms(seeds);
  }
  if (res) {
    for (auto& a : actions) a->commit();
  } else {
    while (prepared > 0) actions[--prepared]->abort();
  }
  for (auto& a : actions) a->clean();
  return res;
}

result<void> graph::attach_root(root& r, node& n) {
  r.target = &n;
  r.attached_seq = ++attach_seq_;
  n.roots.push_back(&r);
  if (auto res = update_perms({&n}); !res) {
    std::erase(n.roots, &r);
    r.target = nullptr;
    return res;
  }
  return {};
}

void graph::detach_root(root& r) {
  node* n = r.target;
  if (!n) return;
  std::erase(n->roots, &r);
  r.target = nullptr;
  (void)update_perms({n});  // giving permissions up cannot conflict
}

result<void> graph::repoint_root(root& r, node& to) {
  node* from = r.target;
  if (from == &to) return {};
  uint64_t seq = r.attached_seq;
  if (from) std::erase(from->roots, &r);
  r.target = &to;
  to.roots.push_back(&r);
  if (auto res = update_perms({from, &to}); !res) {
    std::erase(to.roots, &r);
    r.target = from;
    r.attached_seq = seq;
    if (from) from->roots.push_back(&r);
    return res;
  }
  return {};
}

result<void> graph::attach_user(node& n, const std::string& key, perm_user u) {
  std::vector<std::unique_ptr<action>> list;
  list.push_back(attach_user_action(n, key, std::move(u)));
  return run(std::move(list));
}

std::unique_ptr<action> graph::attach_user_action(node& n, const std::string& key, perm_user u) {
  // The root joins the node at prepare without permissions being checked: run() checks the whole
  // list at once, and abort takes the root out again (nothing was applied to undo).
  auto a = std::make_unique<lambda_action>();
  a->perm_seeds = {&n};
  a->on_prepare = [this, &n, key, u]() -> result<void> {
    if (owned_roots_.count(key)) return fail("internal error: user '" + key + "' is already attached");
    if (!alive(&n)) return fail("internal error: user '" + key + "' attaches to a node that is gone");
    auto r = std::make_unique<root>();
    r->key = key;
    r->description = u.description;
    r->perm = u.perm;
    r->shared = u.shared;
    r->allows_inactive = u.allows_inactive;
    r->target = &n;
    r->attached_seq = ++attach_seq_;
    n.roots.push_back(r.get());
    owned_roots_[key] = std::move(r);
    return {};
  };
  a->on_abort = [this, &n, key] {
    auto it = owned_roots_.find(key);
    if (it == owned_roots_.end()) return;
    std::erase(n.roots, it->second.get());
    owned_roots_.erase(it);
  };
  return a;
}

void graph::detach_user(node& n, const std::string& key) {
  std::vector<std::unique_ptr<action>> list;
  list.push_back(detach_user_action(n, key));
  (void)run(std::move(list));  // giving permissions up cannot conflict
}

std::unique_ptr<action> graph::detach_user_action(node& n, const std::string& key) {
  // prepare takes the root off its node (the permission update of the list then no longer counts
  // it), abort puts it back, commit lets it go.
  auto a = std::make_unique<lambda_action>();
  a->perm_seeds = {&n};
  a->on_prepare = [this, &n, key]() -> result<void> {
    auto it = owned_roots_.find(key);
    if (it == owned_roots_.end() || it->second->target != &n) return {};
    std::erase(n.roots, it->second.get());
    return {};
  };
  a->on_abort = [this, &n, key] {
    auto it = owned_roots_.find(key);
    if (it != owned_roots_.end() && it->second->target == &n) n.roots.push_back(it->second.get());
  };
  a->on_commit = [this, &n, key] {
    auto it = owned_roots_.find(key);
    if (it != owned_roots_.end() && it->second->target == &n) owned_roots_.erase(it);
  };
  return a;
}

root* graph::find_root(const std::string& key) const {
  auto it = owned_roots_.find(key);
  return it == owned_roots_.end() ? nullptr : it->second.get();
}

result<void> graph::set_child(child_edge& e, node* to) {
  node* old = e.child;
  if (old == to) return {};
  if (to && reaches(*to, *e.parent))
    return fail("Making '" + to->name() + "' a " + e.role + " child of '" + e.parent->name() +
                "' would create a cycle");
  uint64_t seq = e.attached_seq;
  uint32_t perm = e.perm, shared = e.shared;
  link(e, to);
  if (auto r = update_perms({e.parent, old}); !r) {
    link(e, old);
    e.attached_seq = seq;
    e.perm = perm;
    e.shared = shared;
    return r;
  }
  if (old) collect({old});
  return {};
}

result<void> graph::replace_node(node& from, node& to) {
  if (&from == &to) return {};
  // Users below `to` keep `from` (a filter inserted above `from` holds it as its own child).
  struct moved_edge {
    child_edge* e;
    uint64_t seq;
  };
  std::vector<moved_edge> edges;
  for (child_edge* e : std::vector<child_edge*>(from.parents))
    if (!reaches(to, *e->parent)) edges.push_back({e, e->attached_seq});
  std::vector<root*> roots = from.roots;
  for (auto& m : edges) link(*m.e, &to);
  for (root* r : roots) {
    std::erase(from.roots, r);
    r->target = &to;
    to.roots.push_back(r);
  }
  if (auto res = update_perms({&from, &to}); !res) {
    for (auto& m : edges) {
      link(*m.e, &from);
      m.e->attached_seq = m.seq;
    }
    for (root* r : roots) {
      std::erase(to.roots, r);
      r->target = &from;
      from.roots.push_back(r);
    }
    return res;
  }
  return {};
}

result<void> graph::insert_filter(node& filter, node& below) {
  auto kids = filter.children();
  if (kids.empty() || kids.front()->child != &below)
    return fail("node '" + filter.name() + "' cannot be inserted above node '" + below.name() +
                "': its first child must be that node");
  return replace_node(below, filter);
}

result<child_edge*> graph::add_slot(node& parent, const std::string& role, node& child) {
  if (parent.slot(role)) return fail("Node '" + parent.name() + "' already has a child '" + role + "'");
  if (reaches(child, parent))
    return fail("Making '" + child.name() + "' a " + role + " child of '" + parent.name() + "' would create a cycle");
  parent.slots.push_back(std::make_unique<child_edge>());
  child_edge* e = parent.slots.back().get();
  e->parent = &parent;
  e->role = role;
  link(*e, &child);
  if (auto r = update_perms({&parent}); !r) {
    link(*e, nullptr);
    parent.slots.pop_back();
    return std::unexpected(r.error());
  }
  return e;
}

void graph::remove_slot(node& parent, child_edge& e) {
  node* old = e.child;
  link(e, nullptr);
  std::erase_if(parent.slots, [&](const std::unique_ptr<child_edge>& p) { return p.get() == &e; });
  (void)update_perms({&parent});  // giving permissions up cannot conflict
  if (old) collect({old});
}

result<void> graph::remove_filter(node& filter) {
  auto kids = filter.children();
  if (kids.empty()) return fail("node '" + filter.name() + "' has no child to give its users back to");
  node& child = *kids.front()->child;
  if (auto r = replace_node(filter, child); !r) return r;
  collect({&filter});
  return {};
}

void graph::collect(std::vector<node*> candidates) {
  std::vector<std::unique_ptr<node>> doomed;
  for (node* c : candidates) {
    if (!alive(c)) continue;
    if (!c->monitor_owned && !c->has_users()) detach(c, doomed);  // an inline child goes with its last parent
    else (void)update_perms({c});
  }
  close_nodes(std::move(doomed));
}

result<void> graph::check_del(const std::string& name) {
  node* n = find(name);
  if (!n) return fail("Failed to find node with node-name='" + name + "'");
  // A backing file is blocked for deletion by its overlay first (QEMU's op blocker).
  for (child_edge* e : n->parents)
    if (e->role == "backing")
      return fail("Node '" + name + "' is busy: node is used as backing hd of '" + e->parent->name() + "'");
  if (!n->monitor_owned) return fail("Node " + name + " is not owned by the monitor");
  if (n->has_users()) return fail("Block device " + name + " is in use");
  return {};
}

void graph::del(const std::string& name) {
  if (node* n = find(name)) destroy(n);
}

void graph::destroy(node* n) {
  std::vector<std::unique_ptr<node>> doomed;
  detach(n, doomed);
  close_nodes(std::move(doomed));
}

void graph::detach(node* n, std::vector<std::unique_ptr<node>>& out) {
  std::vector<node*> children;
  for (child_edge* e : n->children()) {
    children.push_back(e->child);
    std::erase(e->child->parents, e);
  }
  for (root* r : n->roots) r->target = nullptr;  // their owners are gone or going (shutdown)
  by_name_.erase(n->name());
  alive_.erase(n);
  // The node closes later, before its children (they come after it in `out`): a format writes
  // its metadata back through them. Its slots still point at them for that.
  auto it = std::find_if(nodes_.begin(), nodes_.end(), [&](auto& p) { return p.get() == n; });
  out.push_back(std::move(*it));
  nodes_.erase(it);
  // Children that keep other users give up what this node took (so their locks may loosen before
  // it has closed: the close only writes what this node owned).
  for (node* c : children) {
    if (!alive(c)) continue;
    if (!c->monitor_owned && !c->has_users()) detach(c, out);
    else (void)update_perms({c});
  }
}

void graph::close_nodes(std::vector<std::unique_ptr<node>> nodes) {
  if (nodes.empty()) return;
  if (closer_) return closer_(std::move(nodes));
  for (auto& p : nodes) p.reset();  // in order: parents first
}

std::vector<std::unique_ptr<node>> graph::detach_all() {
  std::vector<std::unique_ptr<node>> out;
  while (!nodes_.empty()) {
    node* top = nullptr;
    for (auto it = nodes_.rbegin(); it != nodes_.rend() && !top; ++it)
      if ((*it)->parents.empty()) top = it->get();
    if (!top) top = nodes_.back().get();  // cannot happen: the graph has no cycles
    detach(top, out);
  }
  return out;
}

namespace {
// QEMU keeps a node's options as a flat dictionary ("inject-error.0.event"), so a json: filename shows
// a structured option (a list of rules, a server address) in dotted keys; only children nest.
void flatten_option(boost::json::object& o, const std::string& key, const boost::json::value& v) {
  if (v.is_object()) {
    for (auto& kv : v.as_object()) flatten_option(o, key + "." + std::string(kv.key()), kv.value());
    return;
  }
  if (v.is_array()) {
    size_t i = 0;
    for (auto& e : v.as_array()) flatten_option(o, key + "." + std::to_string(i++), e);
    return;
  }
  o[key] = v;
}
}  // namespace

boost::json::object graph::full_options(const node& n) const {
  boost::json::object o;
  o["driver"] = n.settings().driver;
  const driver_entry* de = find_driver(n.settings().driver);
  for (auto& kv : n.settings().options) {
    if (is_common(kv.key())) continue;
    if (de && std::find(de->weak_options.begin(), de->weak_options.end(), kv.key()) != de->weak_options.end()) continue;
    if (de && std::find(de->child_list_roles.begin(), de->child_list_roles.end(), kv.key()) !=
                  de->child_list_roles.end()) {
      // The list as the node has it now (x-blockdev-change may have changed it), in slot order.
      boost::json::array list;
      for (child_edge* edge : n.children())
        if (list_member_of(*de, edge->role) == kv.key()) list.push_back(full_options(*edge->child));
      o[kv.key()] = std::move(list);
      continue;
    }
    bool child = false;
    for (child_edge* edge : n.children())
      if (edge->role == kv.key()) {
        o[kv.key()] = full_options(*edge->child);
        child = true;
      }
    if (!child) flatten_option(o, std::string(kv.key()), kv.value());
  }
  // A child the options do not name: a backing file an external snapshot attached to an image
  // that names none (one opened from the image's own name is not an override, as in QEMU).
  for (child_edge* edge : n.children())
    if (!o.contains(edge->role) && (!de || list_member_of(*de, edge->role).empty()) &&
        (edge->role != "backing" || n.facts()->backing_filename.empty()))
      o[edge->role] = full_options(*edge->child);
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
  if (e && e->composite_filename) {
    std::string c = e->composite_filename(own, [&](const std::string& role) {
      for (child_edge* edge : n.children())
        if (edge->role == role) return filename(*edge->child);
      return std::string();
    });
    if (!c.empty()) return c;
  }
  // A format node whose own options only tune it (no window, no other backing than its image
  // names) over a protocol node is named after that node's file; a format over another format is
  // not (its image could not be probed from the plain name).
  const node* file = nullptr;
  for (child_edge* edge : n.children())
    if (e && !e->child_roles.empty() && edge->role == e->child_roles.front()) file = edge->child;
  const driver_entry* fe = file ? find_driver(file->settings().driver) : nullptr;
  // blkdebug and blkverify count as protocol nodes here (QEMU opens them as files: bdrv_file_open).
  bool plain = e && fe && (fe->protocol || fe->composite_filename) && !e->is_filter;
  for (auto& kv : own) {
    if (!plain) break;
    std::string_view k = kv.key();
    if (k == e->child_roles.front()) continue;
    if (std::find(e->runtime_options.begin(), e->runtime_options.end(), k) != e->runtime_options.end()) continue;
    if (k == "backing" && e->backing_from_image) continue;  // judged below, from the graph
    plain = false;
  }
  if (plain && e->backing_from_image) {
    // The backing the node has now (an explicit one, or one a snapshot attached) keeps the plain
    // name only when it is what the image names; no backing only when the image names none. The
    // facts are those the node's home published: this may run on another thread.
    auto published = n.facts();
    const image_facts& f = *published;
    const node* b = nullptr;
    for (child_edge* edge : n.children())
      if (edge->role == "backing") b = edge->child;
    auto* given = own.if_contains("backing");
    // Compared as the image spells it: a relative name never equals a node's full filename.
    bool matches = b && !f.backing_filename.empty() && filename(*b) == f.backing_filename;
    if (!given) {
      // The image's own backing file (opened from its name), unless a snapshot attached one to an
      // image that names none.
      plain = !(b && f.backing_filename.empty());
    } else if (given->is_null()) {
      plain = b ? matches : f.backing_filename.empty();
    } else {
      plain = matches;
    }
  }
  if (plain) {
    std::string child = filename(*file);
    if (child.rfind("json:", 0) != 0) return child;
  }
  return "json:" + qmp::to_json(boost::json::value(full_options(n)), false);
}

}  // namespace blockd::block

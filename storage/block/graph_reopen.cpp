// blockdev-reopen on the block graph: the plan (options checked, children resolved), its permissions, and the drivers' prepare/commit/abort; supervisor's thread (driver steps on each node's home).
#include <algorithm>
#include <unordered_set>

#include "storage/block/graph.h"
#include "storage/block/graph_options.h"

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
  for (child_edge* e : from.children())
    if (reaches(*e->child, to)) return true;
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
  for (auto& [n, o] : queue)
    if (auto r = reopen_queue(plan, *n, o); !r) return std::unexpected(r.error());
  // The objects the new options may name (a throttle node's group), seen here on the graph's thread.
  auto objects = objects_source_ ? objects_source_() : std::make_shared<const object_refs>();
  for (auto& e : plan.entries) e.objects = objects;
  return plan;
}

result<void> graph::reopen_check_writers(const reopen_plan& plan) {
  // Read-only needs that nobody writes through the node any more, unless that writer is a parent
  // becoming read-only in the same reopen.
  for (auto& e : plan.entries) {
    if (!e.next.read_only || e.n->settings().read_only) continue;
    bool root_writes = std::any_of(e.n->roots.begin(), e.n->roots.end(), [](root* r) { return writes(r->perm); });
    bool parent_writes = std::any_of(e.n->parents.begin(), e.n->parents.end(), [&](child_edge* pe) {
      if (!writes(pe->perm)) return false;
      return !std::any_of(plan.entries.begin(), plan.entries.end(),
                          [&](auto& p) { return p.next.read_only && p.n == pe->parent; });
    });
    if (root_writes || parent_writes) return fail("Cannot make block node read-only, there is a writer on it");
  }
  return {};
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
  // (A fixed list per driver, not state: asking from the graph's thread reads nothing that moves.)
  std::vector<std::string> resettable = n.driver().reopen_resettable();
  for (auto& kv : cur.options) {
    std::string_view k = kv.key();
    if (options.contains(k) || reset_common(k) || contains(resettable, k)) continue;
    if (de && (contains(de->child_roles, k) || contains(de->child_list_roles, k))) continue;
    return fail("Option '" + std::string(k) + "' cannot be reset to its default value");
  }

  // Children: the same node (an inline one is reopened with what it inherits), another node (the
  // child is replaced), null (a backing file dropped), or an inline definition of the current
  // inline child. Only the file and backing children can change (QEMU's rule); any other role,
  // such as a qcow2 data-file, must stay as it is.
  std::vector<std::pair<child_edge*, node*>> children;  // every slot, with its node after the reopen
  struct inline_reopen {
    node* child;
    boost::json::object options;  // with what it inherits from the new parent options
    boost::json::object given;    // its own options, as the user gave them
  };
  std::vector<inline_reopen> inline_reopens;
  for (auto& sl : n.slots) {
    child_edge& edge = *sl;
    node* current = edge.child;
    children.emplace_back(&edge, current);
    auto* v = options.if_contains(edge.role);
    bool inline_child = current && !current->monitor_owned;
    auto keep_inline = [&] {
      if (inline_child)
        inline_reopens.push_back({current, inherited_options(current->settings().given, options), current->settings().given});
    };
    if (!v) {
      keep_inline();
      continue;
    }
    bool changeable = edge.role == "file" || edge.role == "backing";
    if (v->is_null()) {
      if (!current) continue;
      if (!changeable) return fail("Cannot change the option '" + edge.role + "'");
      children.back().second = nullptr;
      continue;
    }
    if (v->is_string()) {
      std::string ref(v->as_string());
      node* target = find(ref);
      if (!target) return fail("Cannot find device='' nor node-name='" + ref + "'");
      if (target == current) {
        keep_inline();
        continue;
      }
      if (!changeable) return fail("Cannot change the option '" + edge.role + "'");
      if (reaches(*target, n))
        return fail("Making '" + ref + "' a " + edge.role + " child of '" + n.name() + "' would create a cycle");
      children.back().second = target;
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

  // The driver sees its own members and the children it will have (prepare_driver, on its home).
  reopen_plan::entry entry;
  entry.n = &n;
  for (auto& kv : options)
    if (!is_common(kv.key()) && !(de && (contains(de->child_roles, kv.key()) || contains(de->child_list_roles, kv.key()))))
      entry.own[kv.key()] = kv.value();
  for (auto& [edge, child] : children) {
    entry.roles.emplace_back(edge->role, child);
    entry.prev_children.emplace_back(edge, edge->child);
    if (edge->child != child) entry.children.emplace_back(edge, child);
  }
  entry.options = options;
  next.options = options;
  next.given = given ? *given : options;
  entry.next = std::move(next);
  plan.entries.push_back(std::move(entry));
  for (auto& ir : inline_reopens)
    if (auto r = reopen_queue(plan, *ir.child, std::move(ir.options), &ir.given); !r) return r;
  return {};
}

result<void> graph::prepare_driver(reopen_plan::entry& e) {
  reopen_args a{e.own, e.roles, e.next.read_only, e.next.direct, e.next.no_flush, e.objects};
  e.consumed.clear();
  auto st = e.n->driver().reopen_prepare(a, e.consumed);
  if (!st) return std::unexpected(st.error());
  e.state = std::move(*st);
  return {};
}

result<void> graph::reopen_check(reopen_plan::entry& e) {
  // Whatever the driver did not take must be as it was.
  const node_settings& cur = e.n->settings();
  auto unchanged = [&](std::string_view k) -> result<void> {
    auto* old = cur.options.if_contains(k);
    if (!old || *old != e.options.at(k)) return fail("Cannot change the option '" + std::string(k) + "'");
    return {};
  };
  for (const char* k : {"driver", "force-share", "active"})
    if (e.options.contains(k))
      if (auto r = unchanged(k); !r) return r;
  for (auto& kv : e.own)
    if (!contains(e.consumed, kv.key()))
      if (auto r = unchanged(kv.key()); !r) return r;
  return {};
}

std::vector<std::pair<node*, node*>> graph::reopen_plan::new_children() const {
  std::vector<std::pair<node*, node*>> out;
  for (auto& e : entries)
    for (auto& [edge, child] : e.children)
      if (child) out.emplace_back(e.n, child);
  return out;
}

result<void> graph::reopen_apply(reopen_plan& plan) {
  // The new children go in and the permissions are taken for the state after the reopen (the
  // drivers readied it; settings change at commit, after each driver's own commit: a format going
  // read-only writes its tables back through children that are still writable then). A refusal
  // puts every slot back.
  std::vector<node*> seeds;
  plan.dropped.clear();
  for (auto& e : plan.entries) {
    seeds.push_back(e.n);
    for (auto& [edge, child] : e.children) {
      if (edge->child) {
        plan.dropped.push_back(edge->child);
        seeds.push_back(edge->child);
      }
      link(*edge, child);
    }
    pending_[e.n] = {e.state.get(), e.next.read_only};
  }
  auto r = update_perms(seeds);
  // The permissions are taken (or refused): nothing asks the pending states any more, and the
  // commits that follow may free them.
  for (auto& e : plan.entries) pending_.erase(e.n);
  if (!r) {
    for (auto it = plan.entries.rbegin(); it != plan.entries.rend(); ++it)
      for (auto& [edge, child] : it->prev_children)
        if (edge->child != child) link(*edge, child);
    plan.dropped.clear();
    return r;
  }
  return {};
}

void graph::commit_driver(reopen_plan::entry& e) {
  e.state->commit();
  e.state.reset();
  e.n->update_settings(std::move(e.next));
  e.n->sync_bitmap_hook();  // a reopen may have made the node's stored bitmaps read-only or writable
}

void graph::abort_driver(reopen_plan::entry& e) {
  if (!e.state) return;
  e.state->abort();
  e.state.reset();
}

void graph::reopen_finish(reopen_plan& plan) {
  collect(std::move(plan.dropped));  // a replaced inline child goes away
  plan.dropped.clear();
}

result<void> graph::reopen(const boost::json::array& list) {
  auto plan = reopen_prepare(list);
  if (!plan) return std::unexpected(plan.error());
  auto abort_all = [&] {
    for (auto it = plan->entries.rbegin(); it != plan->entries.rend(); ++it) abort_driver(*it);
  };
  for (auto& e : plan->entries) {
    result<void> r = prepare_driver(e);
    if (r) r = reopen_check(e);
    if (!r) {
      abort_all();
      return r;
    }
  }
  if (auto r = reopen_check_writers(*plan); !r) {
    abort_all();
    return r;
  }
  if (auto r = reopen_apply(*plan); !r) {
    abort_all();
    return r;
  }
  for (auto& e : plan->entries) commit_driver(e);
  reopen_finish(*plan);
  return {};
}

}  // namespace blockd::block

// Graph changes in steps, so that driver calls run on the nodes' home while the graph changes on its own thread: a staged blockdev-add, blockdev-set-active; each function says its thread.
#include <algorithm>
#include <functional>
#include <unordered_set>

#include "storage/block/graph.h"

namespace blockd::block {
namespace {
bool writes(uint32_t perm) { return perm & (perm_write | perm_write_unchanged); }
}  // namespace

// ---- staged blockdev-add ------------------------------------------------------------------------

std::shared_ptr<graph::staged_add> graph::begin_add(const boost::json::object& options, driver_env env) {
  auto s = std::make_shared<staged_add>();
  s->options = options;
  s->env = std::move(env);
  s->objects = objects_source_ ? objects_source_() : std::make_shared<object_refs>();
  s->base = nodes_.size();
  return s;
}

result<void> graph::open_staged(staged_add& s) {
  auto r = open_node(s.options, !s.auto_name, s.created, nullptr, &s);
  if (!r) {
    // Newest first: a parent closes while the children it writes back through are still open.
    s.listing.clear();
    s.names.clear();
    s.created.clear();
    while (!s.owned.empty()) s.owned.pop_back();
    return std::unexpected(r.error());
  }
  s.top = *r;
  return {};
}

result<node*> graph::commit_staged(staged_add& s) {
  if (!s.top) return fail("internal error: blockdev-add committed before its nodes were opened");
  for (node* np : s.listing) {
    auto it = std::find_if(s.owned.begin(), s.owned.end(), [&](auto& p) { return p.get() == np; });
    by_name_[np->name()] = np;
    alive_.insert(np);
    nodes_.push_back(std::move(*it));
    s.owned.erase(it);
  }
  // Edges in creation order, as open_node links them, so the attachment order (QEMU's listing of
  // children) is the same either way.
  for (node* np : s.created)
    for (auto& sl : np->slots) {
      node* c = sl->child;
      sl->child = nullptr;
      link(*sl, c);
    }
  if (auto r = update_perms({s.top}); !r) {
    std::vector<std::unique_ptr<node>> doomed;
    for (auto it = s.created.rbegin(); it != s.created.rend(); ++it)
      if (alive(*it)) detach(*it, doomed);
    s.created.clear();
    close_nodes(std::move(doomed));
    return std::unexpected(r.error());
  }
  s.top->monitor_owned = true;
  return s.top;
}

// ---- blockdev-set-active ---------------------------------------------------------------------

result<void> graph::set_active(node* n, bool active) {
  if (active) {
    for (node* m : activation_order(n)) {
      if (auto r = begin_activate(*m); !r) return r;
      auto r = activate_driver(*m);
      end_activate(*m, bool(r));
      if (!r) return r;
    }
    return {};
  }
  // Depth first from each top, as the walk runs asynchronously too (supervisor).
  std::function<result<void>(node&)> down = [&](node& m) -> result<void> {
    if (!m.settings().active) return {};
    if (auto r = check_inactivate(m); !r) return r;
    inactivate_driver(m);
    for (node* c : end_inactivate(m))
      if (auto r = down(*c); !r) return r;
    return {};
  };
  for (node* t : inactivation_tops(n))
    if (auto r = down(*t); !r) return r;
  return {};
}

std::vector<node*> graph::activation_order(node* n) const {
  // Children before their parents; for the whole graph, oldest first (children mostly are older).
  std::vector<node*> out;
  std::unordered_set<const node*> seen;
  std::function<void(node*)> visit = [&](node* m) {
    if (m->settings().active || !seen.insert(m).second) return;
    for (child_edge* e : m->children()) visit(e->child);
    out.push_back(m);
  };
  if (n) {
    visit(n);
  } else {
    for (auto& p : nodes_) visit(p.get());
  }
  return out;
}

result<void> graph::begin_activate(node& m) {
  // The locks come first, so the image is not read back while another process still holds it.
  activating_.insert(&m);
  if (auto r = update_perms({&m}); !r) {
    activating_.erase(&m);
    return r;
  }
  return {};
}

result<void> graph::activate_driver(node& m) {
  node_settings s = m.settings();
  s.active = true;
  m.update_settings(s);
  if (auto r = m.driver().activate(); !r) {
    s.active = false;
    m.update_settings(s);
    return r;
  }
  m.sync_bitmap_hook();  // a format loaded its stored bitmaps again
  return {};
}

void graph::end_activate(node& m, bool ok) {
  activating_.erase(&m);
  if (!ok) (void)update_perms({&m});  // giving the permissions back cannot conflict
}

std::vector<node*> graph::inactivation_tops(node* n) const {
  if (n) return {n};
  // Every top node (one no other node uses); inactivating it takes its children along.
  std::vector<node*> out;
  for (node* p : nodes_newest_first())
    if (p->parents.empty()) out.push_back(p);
  return out;
}

result<void> graph::check_inactivate(node& m) const {
  for (child_edge* e : m.parents)
    if (e->parent->settings().active) return fail("Node has active parent node");
  for (root* r : m.roots)
    if (writes(r->perm) && !r->allows_inactive)
      return fail("node '" + m.name() + "' is in use by " + r->description + " with write permission; "
                  "remove that user first");
  return {};
}

void graph::inactivate_driver(node& m) {
  // The driver writes back and marks its image clean while it may still write (QEMU's order).
  m.driver().inactivate();
  m.sync_bitmap_hook();  // a format took the bitmaps it stored out of the set
  node_settings s = m.settings();
  s.active = false;
  m.update_settings(s);
}

std::vector<node*> graph::end_inactivate(node& m) {
  (void)update_perms({&m});  // drops every permission, so the file locks go
  // Children nobody active uses any more follow.
  std::vector<node*> follow;
  for (child_edge* e : m.children()) {
    node& c = *e->child;
    bool used = !c.roots.empty() ||
                std::any_of(c.parents.begin(), c.parents.end(), [](child_edge* pe) { return pe->parent->settings().active; });
    if (!used && c.settings().active) follow.push_back(&c);
  }
  return follow;
}

}  // namespace blockd::block

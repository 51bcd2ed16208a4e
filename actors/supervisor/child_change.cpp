// x-blockdev-change: adding a node as a new child of a quorum or removing one of its children (graph edit here, the driver told on its home); main iothread only.
#include <caf/all.hpp>

#include "actors/supervisor/supervisor.h"

namespace blockd {

void supervisor_actor::blockdev_change(const boost::json::object& args, reply_fn reply) {
  auto refuse = [&](std::string text) { reply(command_outcome::failure(error(std::move(text)))); };
  std::string parent(args.at("parent").as_string());
  auto* child_arg = args.if_contains("child");
  auto* node_arg = args.if_contains("node");
  auto p = graph_->lookup(&parent, &parent);
  if (!p) return reply(command_outcome::failure(p.error()));
  block::node* pn = *p;
  if (!child_arg == !node_arg)
    return refuse(child_arg ? "The parameters child and node are in conflict" : "Either child or node must be specified");

  if (child_arg) {
    std::string role(child_arg->as_string());
    block::child_edge* edge = nullptr;
    for (block::child_edge* e : pn->children())
      if (e->role == role) edge = e;
    if (!edge) return refuse("Node '" + parent + "' does not have child '" + role + "'");
    if (!pn->driver().has_child_list()) return refuse("The node " + parent + " does not support removing a child");
    // The driver agrees and lets the child go on its home (quiesced), then the slot goes here.
    with_quiesced_steps({pn}, [this, pn, role, edge](reply_fn done) {
      run_on_node(pn, [role, edge](block::node& x) {
        if (auto r = x.driver().child_del_check(role); !r) return command_outcome::failure(r.error());
        x.driver().child_deleted(edge);
        return command_outcome::success();
      }, [this, pn, edge, done](command_outcome o) {
        if (!o.ok) return done(std::move(o));
        if (graph_->alive(pn)) graph_->remove_slot(*pn, *edge);
        done(command_outcome::success());
      });
    }, std::move(reply));
    return;
  }

  std::string name(node_arg->as_string());
  block::node* child = graph_->find(name);
  if (!child) return refuse("Node '" + name + "' not found");
  if (!pn->driver().has_child_list()) return refuse("The node " + parent + " does not support adding a child");
  if (child->has_users()) return refuse("The node " + name + " already has a parent");
  if (home_of(child) != home_of(pn))
    return refuse("Node '" + name + "' is in another iothread than node '" + parent +
                  "'; move it there first (x-blockdev-set-iothread)");
  // The driver names the new slot (or refuses, blkverify), the graph attaches it with its
  // permissions, and the driver takes the child on its home; all with the parent quiesced.
  with_quiesced_steps({pn}, [this, pn, child](reply_fn done) {
    auto role = std::make_shared<std::string>();
    run_on_node(pn, [role](block::node& x) {
      auto r = x.driver().child_add_role();
      if (!r) return command_outcome::failure(r.error());
      *role = *r;
      return command_outcome::success();
    }, [this, pn, child, role, done](command_outcome o) {
      if (!o.ok) return done(std::move(o));
      if (!graph_->alive(pn) || !graph_->alive(child)) return done(command_outcome::failure(error("the node went away")));
      auto e = graph_->add_slot(*pn, *role, *child);
      if (!e) return done(command_outcome::failure(e.error()));
      block::child_edge* edge = *e;
      run_on_node(pn, [edge](block::node& x) {
        x.driver().child_added(block::child_ref(edge));
        x.publish_facts();
        return command_outcome::success();
      }, done);
    });
  }, std::move(reply));
}

}  // namespace blockd

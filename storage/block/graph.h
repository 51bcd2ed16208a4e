// The block graph: nodes by name, their edges and users, and the permission bookkeeping; owned by the supervisor.
#pragma once
#include <boost/json.hpp>

#include <functional>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "protocol/error.h"
#include "storage/block/node.h"

namespace blockd::block {

class graph {
 public:
  // `env_for_new_node` gives a new node its home's reactor and defer function.
  explicit graph(std::function<driver_env()> env_for_new_node);
  ~graph();

  // blockdev-add: opens the node and its inline children (validated BlockdevOptions). All or nothing.
  result<node*> add(const boost::json::object& options);
  // blockdev-del: the node must be monitor-owned and unused; inline children go with it.
  result<void> check_del(const std::string& name);
  void del(const std::string& name);

  // blockdev-reopen in two phases. prepare checks the whole list (validated BlockdevOptions) and
  // readies every driver; the caller quiesces plan.nodes, then commits (or aborts) the plan.
  struct reopen_plan {
    struct entry {
      node* n = nullptr;
      node_settings next;
      std::vector<node::child_edge> children;  // after the reopen
      std::unique_ptr<block_driver::reopen_state> state;
    };
    std::vector<entry> entries;
    std::vector<node*> nodes() const {
      std::vector<node*> v;
      for (auto& e : entries) v.push_back(e.n);
      return v;
    }
  };
  result<reopen_plan> reopen_prepare(const boost::json::array& list);
  void reopen_commit(reopen_plan& plan);
  void reopen_abort(reopen_plan& plan);

  // blockdev-set-active for one node (with its children) or, with n == nullptr, every node.
  result<void> set_active(node* n, bool active);

  node* find(const std::string& name) const;
  // The existing nodes a blockdev-add's options refer to by name (at any depth of inline children).
  std::vector<node*> referenced_nodes(const boost::json::object& options) const;
  // QEMU's lookup for commands taking device/node-name.
  result<node*> lookup(const std::string* device, const std::string* node_name) const;

  // A temporary or lasting user of a node (a command, an export, a job). Checks and takes the
  // permissions down the chain; returns an error naming the conflicting user.
  result<void> attach_user(node& n, const std::string& key, perm_user u);
  void detach_user(node& n, const std::string& key);

  // Nodes, newest first (QSD's listing order).
  std::vector<node*> nodes_newest_first() const;
  // The filename QEMU shows for a node: plain for protocol nodes, "json:{...}" otherwise.
  std::string filename(const node& n) const;
  boost::json::object full_options(const node& n) const;

 private:
  result<node*> open_node(const boost::json::object& options, bool top_level, std::vector<node*>& created,
                          const boost::json::object* given = nullptr);
  result<void> refresh_perms(node& n);
  result<void> reopen_queue(reopen_plan& plan, node& n, boost::json::object options,
                            const boost::json::object* given = nullptr);
  result<void> activate(node& n);
  result<void> inactivate(node& n);
  bool reaches(const node& from, const node& to) const;
  void destroy(node* n);

  std::function<driver_env()> env_for_new_node_;
  static constexpr int max_implicit_depth = 64;  // nested opens of children an image names itself
  int implicit_depth_ = 0;
  std::vector<std::unique_ptr<node>> nodes_;  // creation order
  std::unordered_map<std::string, node*> by_name_;  // the same nodes, for find() (graphs of thousands)
  unsigned auto_name_counter_ = 0;
};

// Node-name rule: an identifier (the length limit of 31 is checked separately, after duplicates).
bool node_name_valid(const std::string& name);

}  // namespace blockd::block

// The block graph: nodes by name, their edges and users, and the permission bookkeeping; owned by the supervisor.
#pragma once
#include <boost/json.hpp>

#include <functional>
#include <memory>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "protocol/error.h"
#include "storage/block/action.h"
#include "storage/block/node.h"

namespace blockd::block {

class graph {
 public:
  // `env_for_new_node` gives a new node its home's reactor and defer function.
  explicit graph(std::function<driver_env()> env_for_new_node);
  ~graph();

  // blockdev-add: opens the node and its inline children (validated BlockdevOptions). All or nothing.
  result<node*> add(const boost::json::object& options);
  // The same as an action for a transaction; `out` gets the new node on commit.
  std::unique_ptr<action> add_action(const boost::json::object& options, node** out);
  // blockdev-del: the node must be monitor-owned and unused; inline children go with it.
  result<void> check_del(const std::string& name);
  void del(const std::string& name);

  // blockdev-reopen in two phases. prepare checks the whole list (validated BlockdevOptions) and
  // readies every driver; the caller quiesces plan.nodes(), then applies the plan as an action
  // (reopen_action) inside a transaction, which commits or aborts it.
  struct pending_reopen {
    const block_driver::reopen_state* state;
    bool read_only;
  };
  struct reopen_plan {
    struct entry {
      node* n = nullptr;
      node_settings next;
      // Each child slot's node after the reopen (null: emptied), and before it.
      std::vector<std::pair<child_edge*, node*>> children, prev_children;
      std::unique_ptr<block_driver::reopen_state> state;
    };
    std::vector<entry> entries;
    std::vector<node*> nodes() const {
      std::vector<node*> v;
      for (auto& e : entries) v.push_back(e.n);
      return v;
    }
    // Nodes that become children through the reopen (they may live on another iothread).
    std::vector<std::pair<node*, node*>> new_children() const;  // (parent, child)
  };
  result<reopen_plan> reopen_prepare(const boost::json::array& list);
  std::unique_ptr<action> reopen_action(reopen_plan plan);
  // prepare and run in one (the caller has quiesced what the list names, or nothing runs I/O).
  result<void> reopen(const boost::json::array& list);
  void reopen_abort(reopen_plan& plan);

  // blockdev-set-active for one node (with its children) or, with n == nullptr, every node.
  result<void> set_active(node* n, bool active);

  node* find(const std::string& name) const;
  // Whether `n` is a node of this graph (safe on a pointer to a node that is gone).
  bool alive(const node* n) const { return n && alive_.count(n); }
  // The existing nodes a blockdev-add's options refer to by name (at any depth of inline children).
  std::vector<node*> referenced_nodes(const boost::json::object& options) const;
  // QEMU's lookup for commands taking device/node-name.
  result<node*> lookup(const std::string* device, const std::string* node_name) const;

  // ---- users that are not nodes ---------------------------------------------------------------
  // A root takes its permissions on `n` (refused: nothing changes); the caller owns the root.
  result<void> attach_root(root& r, node& n);
  void detach_root(root& r);
  // Moves a root to another node, permissions included, all or nothing (the caller quiesces both).
  result<void> repoint_root(root& r, node& to);
  // Graph-owned roots by key, for users that need nothing but the hold (jobs, a command's duration).
  result<void> attach_user(node& n, const std::string& key, perm_user u);
  // The same as an action (export add, job start in a transaction).
  std::unique_ptr<action> attach_user_action(node& n, const std::string& key, perm_user u);
  void detach_user(node& n, const std::string& key);
  root* find_root(const std::string& key) const;

  // ---- edits (callers quiesce the nodes they touch) -----------------------------------------
  // Puts `to` into the slot (attach, replace, or empty it with nullptr), refusing cycles and
  // permission conflicts with QEMU's texts; a refused edit changes nothing. An inline child that
  // loses its last user is closed.
  result<void> set_child(child_edge& e, node* to);
  // Every parent slot and root holding `from` holds `to` instead, except those of nodes below
  // `to` (a filter above `from` keeps its own file child): QEMU's bdrv_replace_node.
  result<void> replace_node(node& from, node& to);
  // A filter opened over `below` (its first child slot holds it) takes every other user of
  // `below`; removing it gives them back to its child and closes it if nothing else holds it.
  result<void> insert_filter(node& filter, node& below);
  result<void> remove_filter(node& filter);

  // Permissions, two-phase over the affected subgraph (the seeds and everything below them):
  // compute what every node and edge would take, check every pair of users of every node and ask
  // every driver (check_perm), and only when all agree take them (set_perm). A refusal leaves
  // every permission and file lock as it was.
  result<void> update_perms(const std::vector<node*>& seeds);

  // Runs `actions` as one transaction: prepare each in order; once all are prepared, one
  // permission update over every node they touched; then commit all, or abort the prepared ones
  // in reverse; clean runs last either way.
  result<void> run(std::vector<std::unique_ptr<action>> actions);

  // Nodes, newest first (QSD's listing order).
  std::vector<node*> nodes_newest_first() const;
  // The filename QEMU shows for a node: plain for protocol nodes, "json:{...}" otherwise.
  std::string filename(const node& n) const;
  boost::json::object full_options(const node& n) const;

 private:
  result<node*> open_node(const boost::json::object& options, bool top_level, std::vector<node*>& created,
                          const boost::json::object* given = nullptr);
  // Fills or empties a slot with no checks and no permission change (the edit primitives use it,
  // and undo with it).
  void link(child_edge& e, node* to);
  // Closes nodes nobody holds any more that the monitor does not own (inline children).
  void collect(std::vector<node*> candidates);
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
  std::unordered_set<const node*> alive_;
  // Reopen states between prepare and commit: permissions are computed for the state after them.
  std::unordered_map<const node*, pending_reopen> pending_;
  std::unordered_map<std::string, std::unique_ptr<root>> owned_roots_;  // attach_user's
  unsigned auto_name_counter_ = 0;
  uint64_t attach_seq_ = 0;  // orders edges and roots by age (conflict texts, QEMU's listing order)
};

// Node-name rule: an identifier (the length limit of 31 is checked separately, after duplicates).
bool node_name_valid(const std::string& name);

}  // namespace blockd::block

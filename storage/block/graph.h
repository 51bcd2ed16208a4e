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
  // Where opens find the objects their options name (the supervisor's QOM model); called on the
  // graph's thread when an add begins. Unset: no objects (tests).
  void set_object_source(std::function<std::shared_ptr<const object_refs>()> f) { objects_source_ = std::move(f); }
  // The objects as they are now (blockdev-create's secrets); the graph's thread only.
  std::shared_ptr<const object_refs> objects_now() const {
    return objects_source_ ? objects_source_() : std::make_shared<const object_refs>();
  }
  ~graph();

  // blockdev-add: opens the node and its inline children (validated BlockdevOptions). All or nothing.
  // The caller runs on the new node's home (the drivers open here and now).
  result<node*> add(const boost::json::object& options);
  // The same as an action for a transaction; `out` gets the new node on commit.
  std::unique_ptr<action> add_action(const boost::json::object& options, node** out);

  // blockdev-add of nodes whose home is another thread, in three parts. The supervisor begins it
  // (begin_add: nothing happens yet); the home opens the drivers (open_staged): the checks and
  // the opens run there, the graph is only read and the new nodes stay outside it, so nothing
  // else sees them; then the supervisor links them (commit_staged: permissions taken, or refused
  // and the nodes handed to the closer). A failed open_staged has closed what it opened.
  struct staged_add {
    // Between the home's open and the supervisor's commit the new nodes live here: owned, named
    // and ordered among themselves, but not in the graph, so no other code can reach them.
    boost::json::object options;
    driver_env env;
    std::shared_ptr<const object_refs> objects;  // taken at begin_add, on the graph's thread
    size_t base = 0;                           // the graph's node count when the add began
    std::vector<node*> created;                // creation order (children before parents)
    std::vector<std::unique_ptr<node>> owned;  // the same nodes
    std::vector<node*> listing;                // their order in the graph's creation list
    std::unordered_map<std::string, node*> names;
    node* top = nullptr;
    bool auto_name = false;  // the top may go unnamed (drive-mirror's target: "#blockNNN", as QEMU names it)
  };
  std::shared_ptr<staged_add> begin_add(const boost::json::object& options, driver_env env);
  result<void> open_staged(staged_add& s);
  result<node*> commit_staged(staged_add& s);

  // blockdev-del: the node must be monitor-owned and unused; inline children go with it.
  result<void> check_del(const std::string& name);
  void del(const std::string& name);

  // Nodes leave the graph here and are closed by the closer (parents first, each list one
  // component, so one home): a format writes its metadata back at close, which is I/O on its home.
  // Without a closer they are closed at once on the calling thread.
  using closer_fn = std::function<void(std::vector<std::unique_ptr<node>>)>;
  void set_closer(closer_fn c) { closer_ = std::move(c); }
  // Every node, parents first, out of the graph (shutdown closes them on their homes).
  std::vector<std::unique_ptr<node>> detach_all();

  // blockdev-reopen in steps, so that each driver call runs on its node's home while the graph
  // and the permissions change only on the graph's thread:
  //   reopen_prepare(list)      graph: checks the list; one entry per node, drivers not asked yet
  //   prepare_driver(entry)     home, each entry: the driver readies its new state
  //   reopen_check(entry)       graph: options the driver did not take must be unchanged
  //   reopen_check_writers(plan) graph: read-only only without writers (after the last entry)
  //   reopen_apply(plan)        graph, nodes quiesced: the new children and their permissions;
  //                             refused: all as it was, and abort_driver goes to every prepared entry
  //   commit_driver(entry)      home, each entry in order: the driver switches, the settings follow
  //   reopen_finish(plan)       graph: inline children nobody holds any more are closed
  // reopen() runs them all in one, for callers on the nodes' home.
  struct reopen_plan {
    struct entry {
      node* n = nullptr;
      node_settings next;
      boost::json::object options;  // as asked, with what an inline child inherits
      boost::json::object own;      // the driver's own members (common options and children removed)
      // Each child slot's node after the reopen (null: emptied), and before it.
      std::vector<std::pair<child_edge*, node*>> children, prev_children;
      std::vector<std::pair<std::string, node*>> roles;  // every role with its node after the reopen
      std::vector<std::string> consumed;                 // options the driver applies
      std::unique_ptr<block_driver::reopen_state> state;
      std::shared_ptr<const object_refs> objects;  // what the options may name (taken on the graph's thread)
    };
    std::vector<entry> entries;
    std::vector<node*> nodes() const {
      std::vector<node*> v;
      for (auto& e : entries) v.push_back(e.n);
      return v;
    }
    // Nodes that become children through the reopen (they may live on another iothread).
    std::vector<std::pair<node*, node*>> new_children() const;  // (parent, child)
    std::vector<node*> dropped;  // children the applied reopen let go of (reopen_finish collects them)
  };
  result<reopen_plan> reopen_prepare(const boost::json::array& list);
  static result<void> prepare_driver(reopen_plan::entry& e);
  result<void> reopen_check(reopen_plan::entry& e);
  result<void> reopen_check_writers(const reopen_plan& plan);
  result<void> reopen_apply(reopen_plan& plan);
  static void commit_driver(reopen_plan::entry& e);
  static void abort_driver(reopen_plan::entry& e);
  void reopen_finish(reopen_plan& plan);
  // All steps in one (the caller has quiesced what the list names, or nothing runs I/O).
  result<void> reopen(const boost::json::array& list);

  // blockdev-set-active for one node (with its children) or, with n == nullptr, every node; the
  // caller runs on the nodes' home. The same in steps, for nodes living elsewhere:
  //   activation_order(n)       the inactive nodes to activate, children before parents
  //   begin_activate(m)         graph: m takes the permissions of an active node (refused: nothing changed)
  //   activate_driver(m)        home: m becomes active and its driver takes the image back
  //   end_activate(m, ok)       graph: done; after a failed activate_driver, the permissions go again
  // and, parents before children:
  //   inactivation_tops(n)      the nodes to start from
  //   check_inactivate(m)       graph: refused while an active parent or a writing user needs m
  //   inactivate_driver(m)      home: the driver writes back and lets go; m becomes inactive
  //   end_inactivate(m)         graph: m's permissions (file locks) go; returns the children to follow
  result<void> set_active(node* n, bool active);
  std::vector<node*> activation_order(node* n) const;
  result<void> begin_activate(node& m);
  static result<void> activate_driver(node& m);
  void end_activate(node& m, bool ok);
  std::vector<node*> inactivation_tops(node* n) const;
  result<void> check_inactivate(node& m) const;
  static void inactivate_driver(node& m);
  std::vector<node*> end_inactivate(node& m);

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
  std::unique_ptr<action> detach_user_action(node& n, const std::string& key);  // export del, job end
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
  // x-blockdev-change: a new slot `role` on `parent` holding `child` (a cycle or a permission
  // conflict refuses it and changes nothing), and the removal of a slot with what it held (closed
  // when nothing else holds it). The parent's driver is told by the caller (child_added/deleted).
  result<child_edge*> add_slot(node& parent, const std::string& role, node& child);
  void remove_slot(node& parent, child_edge& e);
  result<void> remove_filter(node& filter);
  // Closes those of `candidates` that nothing uses and the monitor did not add (the overlay a
  // blockdev-snapshot-sync opened over a node nobody used), with the inline children only they held.
  void release_unused(std::vector<node*> candidates) { collect(std::move(candidates)); }

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
                          const boost::json::object* given = nullptr, staged_add* staged = nullptr);
  // Puts a newly opened node into the graph (by name, in QEMU's listing order at `slot`) and
  // links its slots; open_node does it at once, commit_staged later for a staged add.
  void insert_node(std::unique_ptr<node> n, size_t slot);
  node* lookup_for_open(const std::string& name, const staged_add* staged) const;
  // Takes `n` out of the graph with the inline children only it held, parents first.
  void detach(node* n, std::vector<std::unique_ptr<node>>& out);
  void close_nodes(std::vector<std::unique_ptr<node>> nodes);
  // Fills or empties a slot with no checks and no permission change (the edit primitives use it,
  // and undo with it).
  void link(child_edge& e, node* to);
  // Closes nodes nobody holds any more that the monitor does not own (inline children).
  void collect(std::vector<node*> candidates);
  result<void> reopen_queue(reopen_plan& plan, node& n, boost::json::object options,
                            const boost::json::object* given = nullptr);
  bool reaches(const node& from, const node& to) const;
  void destroy(node* n);  // detach + close_nodes

  std::function<driver_env()> env_for_new_node_;
  std::function<std::shared_ptr<const object_refs>()> objects_source_;
  static constexpr int max_implicit_depth = 64;  // nested opens of children an image names itself
  int implicit_depth_ = 0;
  std::vector<std::unique_ptr<node>> nodes_;  // creation order
  std::unordered_map<std::string, node*> by_name_;  // the same nodes, for find() (graphs of thousands)
  std::unordered_set<const node*> alive_;
  // Reopen states between apply and commit: permissions are computed for the state after them.
  struct pending_reopen {
    const block_driver::reopen_state* state;
    bool read_only;
  };
  std::unordered_map<const node*, pending_reopen> pending_;
  std::unordered_set<const node*> activating_;  // between begin_activate and end_activate: count as active
  closer_fn closer_;
  std::unordered_map<std::string, std::unique_ptr<root>> owned_roots_;  // attach_user's
  // Also advanced by open_staged on a home thread, while the graph's own thread waits for it.
  unsigned auto_name_counter_ = 0;
  uint64_t attach_seq_ = 0;  // orders edges and roots by age (conflict texts, QEMU's listing order)
};

// Node-name rule: an identifier (the length limit of 31 is checked separately, after duplicates).
bool node_name_valid(const std::string& name);

}  // namespace blockd::block

// The supervisor actor: sole writer of the block graph, owner of the QOM model, chardevs, monitors, exports and jobs, and the event bus; pinned to the main iothread.
#pragma once
#include <caf/event_based_actor.hpp>

#include <functional>
#include <deque>
#include <map>
#include <optional>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "actors/export/nbd_connection.h"
#include "actors/export/nbd_server.h"
#include "actors/job/block_job.h"
#include "actors/job/engine_job.h"
#include "actors/job/job_core.h"
#include "actors/messages.h"
#include "actors/chardev/chardev.h"
#include "config/qom/glib_order.h"
#include "actors/runtime/iothread.h"
#include "actors/supervisor/command_table.h"
#include "config/qom/model.h"
#include "storage/block/graph.h"
#include "protocol/qmp/event_throttle.h"

namespace blockd {

class job_runner;
namespace block { struct overlay_image; }

// The backing node of the first image below `n`'s filters (QEMU's bdrv_cow_bs(bdrv_skip_filters())).
block::node* cow_backing(block::node* n);
// An existing image's format as the drive-* commands probe it: qcow2 by its magic, else raw.
std::string probe_format(const std::string& file);
struct job_graph_request;

// Re-points an export to another node (export id, node name) -> command_outcome. Not a QMP
// command: the graph edits that move exports (external snapshots, mirror pivot) use
// repoint_export through their actions; actor tests drive it with this message.
using repoint_atom = caf::atom_constant<caf::atom("repoint")>;

struct supervisor_hooks {
  std::function<void()> quit_requested;  // called on the main iothread when a client sends quit
  std::string cli_note_prefix;           // prefix for start-up notes ("blockd: --chardev ...: ")
  bool daemonized = false;               // --daemonize: stdio chardevs are refused, as in QSD
};

// What drive-mirror adds to blockdev-mirror's start (the target node it opened itself).
struct mirror_extra {
  bool drive = false;
  bool allocated_only = false;  // a fresh image of sync=full: copy what is allocated in the chain (it reads zeroes elsewhere)
  bool unmap = true;
  std::string target_backing;  // set as the target's backing at the pivot (empty: none)
};

// What drive-backup adds to blockdev-backup: the target node it opened for the job.
struct backup_extra {
  std::vector<std::string> opened;
  std::shared_ptr<job::txn> group = nullptr;  // transaction completion-mode grouped
  bool staged = false;  // a transaction action: the job is only created (started at commit)
};

class supervisor_actor : public caf::event_based_actor {
 public:
  supervisor_actor(caf::actor_config& cfg, iothread* home, supervisor_hooks hooks);
  ~supervisor_actor() override;
  caf::behavior make_behavior() override;

  // Emits a QMP event to every subscribed monitor, stamped now.
  void emit(std::string name, boost::json::object data);

 private:
  // Commands run one at a time, in arrival order across monitors: a command that waits (for nodes
  // to drain) holds the next one back, so no change ever sees a graph another change left halfway.
  struct pending_command {
    std::string name;
    boost::json::object args;
    caf::response_promise rp;
    // Set for control messages that are not QMP commands (repoint_atom): they queue like one.
    std::function<void(reply_fn)> internal;
  };
  // Graph work of job bodies (resolving and releasing nodes) runs between commands, never inside
  // one; `jobs_hold_queue_` is false only while quit waits for jobs, which changes no graph.
  std::deque<std::function<void()>> job_graph_work_;
  bool jobs_hold_queue_ = true;
  // Graph work of finishing block jobs (block_jobs.cpp): one at a time, between commands, or
  // while the running command only waits for a job (yields_to_jobs_: job-*, block-job-*).
  std::deque<std::function<void(reply_fn)>> job_edits_;
  bool editing_ = false;
  bool yields_to_jobs_ = false;
  void pump();
  void run_command(const std::string& name, boost::json::object& args, reply_fn reply);
  // The command table, filled once by each responsibility's register_* (one file each).
  command_table commands_;
  void register_commands();
  void register_block_commands();   // block_commands.cpp
  void register_job_commands();     // jobs.cpp
  void register_export_commands();  // exports.cpp
  void register_object_commands();  // objects.cpp
  command_outcome blockdev_add(const boost::json::object& args);
  void blockdev_add_async(const boost::json::object& args, reply_fn reply);
  void blockdev_del(const std::string& name, reply_fn reply);
  void block_resize(const boost::json::object& args, reply_fn reply);
  std::unique_ptr<block::action> internal_snapshot_action(const boost::json::object& args);  // snapshots.cpp
  void snapshot_delete_internal(const boost::json::object& args, reply_fn reply);  // snapshots.cpp
  command_outcome set_write_threshold(const boost::json::object& args);
  // Runs `fn` with `nodes` quiesced (nothing in flight, new requests held), then resumes them (on
  // their homes as they are after `fn`) and replies.
  void with_quiesced(std::vector<block::node*> nodes, std::function<command_outcome()> fn, reply_fn reply);
  // The same for a change made of steps (node tasks): `step` calls `done` once, now or later.
  using step_fn = std::function<void(reply_fn done)>;
  void with_quiesced_steps(std::vector<block::node*> nodes, step_fn step, reply_fn reply);

  // ---- node tasks (placement.cpp): driver work runs on the node's home ------------------------
  // The command that sends a task holds the queue (busy_) until `then` has run, so nothing else
  // changes the graph meanwhile, while this loop keeps serving monitors and NBD handshakes.
  // `then` runs here, with the outcome or with an error naming the node when it went away first.
  using node_fn = std::function<command_outcome(block::node&)>;
  void run_on_node(block::node* n, node_fn fn, reply_fn then);
  // Control work on `t` where no node actor serves (opening new nodes, closing detached ones).
  void run_at(iothread* t, std::function<command_outcome()> fn, reply_fn then);
  size_t tasks_in_flight_ = 0;
  // Work from messages that edit the graph outside a command (a job or an NBD client gone): it
  // waits while a task runs, when a home may be reading the graph.
  std::deque<std::function<void()>> after_tasks_;
  void when_no_tasks(std::function<void()> fn);
  void task_done();
  // The graph's closer: nodes that left the graph close on their home (at once on this loop).
  // Commands wait for closes before the next one starts, and blockdev-del replies after its own.
  size_t closing_ = 0;
  std::vector<std::function<void()>> after_closes_;
  void close_detached(std::vector<std::unique_ptr<block::node>> nodes);
  void when_closed(std::function<void()> fn);
  // blockdev-set-active in steps (graph bookkeeping here, each driver call on its node's home).
  void set_active_steps(block::node* n, bool active, reply_fn done);
  void activate_next(std::shared_ptr<std::vector<block::node*>> order, size_t i, reply_fn done);
  void inactivate_next(std::shared_ptr<std::deque<block::node*>> stack, reply_fn done);
  // blockdev-reopen's driver steps: prepare each entry at home, then (quiesced) apply and commit.
  void reopen_prepare_next(std::shared_ptr<block::graph::reopen_plan> plan, size_t i, reply_fn done);
  void reopen_commit_next(std::shared_ptr<block::graph::reopen_plan> plan, size_t i, reply_fn done);
  void reopen_abort_all(std::shared_ptr<block::graph::reopen_plan> plan, command_outcome why, reply_fn done);
  // Nodes of a finished blockdev-add get their home, their events and their actors.
  void adopt_new_nodes(iothread* where);
  // Before a query shows image facts: every node's home publishes fresh ones, then `then` runs.
  void refresh_facts(std::function<void()> then);
  void blockdev_reopen(const boost::json::object& args, reply_fn reply);
  void blockdev_set_active(const boost::json::object& args, reply_fn reply);
  void set_iothread(const boost::json::object& args, reply_fn reply);
  // ---- transactions (transaction.cpp) ---------------------------------------------------------
  // A transaction action kind: makes the action from its `data` (checked by the schema). The
  // action does its lookups in prepare, so the first failing action of a list names the error,
  // as in QEMU. `grouped`: the kind supports completion-mode grouped (backup jobs only).
  struct txn_kind {
    std::function<std::unique_ptr<block::action>(const boost::json::object& data)> build;
    bool grouped = false;
  };
  std::map<std::string, txn_kind> txn_kinds_;
  void register_transaction_commands();
  // Runs `list` as one transaction (block::run_steps with the graph's permission update) and
  // replies success or the first failure.
  void run_actions(std::vector<std::unique_ptr<block::action>> list, reply_fn reply);
  // Runs one kind's action alone: what the plain command of a transactionable action does.
  void run_one(const std::string& kind, const boost::json::object& data, reply_fn reply);
  // For actions that keep nodes drained from prepare to clean: quiesce through the node actors,
  // then `then`; resume_nodes lets the held requests go (nodes gone meanwhile are skipped).
  void quiesce_nodes(const std::vector<block::node*>& nodes, std::function<void()> then);
  void resume_nodes(const std::vector<std::string>& names);
  // An action step that runs `fn` on the home of the node `name` names (gone: the step fails
  // with `gone`); `then` gets the outcome here.
  void node_step(const std::string& name, node_fn fn, std::function<void(command_outcome)> then);
  // ---- dirty bitmaps (bitmaps.cpp) ------------------------------------------------------------
  void register_bitmap_commands();
  // ---- external snapshots (external_snapshots.cpp) --------------------------------------------
  // blockdev-snapshot(-sync) as actions: prepare checks, opens an overlay (-sync), parks the old
  // node's export clients and drains both nodes, then links the overlay above the old node; the
  // nodes stay drained until commit (old reopened read-only) or abort (everything back). The
  // action's state is private to the file, hence the opaque pointer.
  void register_snapshot_commands();
  void register_export_actions();  // export_actions.cpp: x-block-export-add in transactions
  void snapshot_prepare(std::shared_ptr<void> st, block::action::prepared_fn done);
  void snapshot_link(std::shared_ptr<void> st, block::action::prepared_fn done);
  void snapshot_release(std::shared_ptr<void> st);
  void snapshot_commit(std::shared_ptr<void> st, std::function<void()> done);
  void snapshot_abort(std::shared_ptr<void> st, std::function<void()> done);
  void change_backing_file(const boost::json::object& args, reply_fn reply);
  // A blockdev-reopen of `n` that changes read-only and nothing else.
  boost::json::object reopen_options(const block::node& n, bool ro) const;
  void reopen_read_only(block::node* n, bool ro, reply_fn done);

  // ---- objects and QOM (objects.cpp) ----------------------------------------------------------
  qom::type_registry types_;          // the built-in types with this supervisor's live factories
  std::unique_ptr<qom::model> qom_;   // /objects, /chardevs; reset at shutdown (joins iothreads)
  void init_objects();
  void object_del(const std::string& id, reply_fn reply);
  iothread* find_iothread(const std::string& id);  // the loop of iothread object `id`, or null
  result<std::shared_ptr<const tls::credentials>> tls_server_creds(const std::string& id);
  // tls-authz, resolved by id each time a client presents its identity (as QEMU does).
  result<bool> authorize(const std::string& authz_id, const std::string& identity);
  // ---- chardevs and monitors (chardevs.cpp) ----------------------------------------------------
  std::vector<std::shared_ptr<chr::chardev>> chardevs_;  // creation order
  qom::glib_order chardev_order_;  // QSD lists /chardevs (and query-chardev) in its table order
  std::map<uint64_t, std::function<void(result<void>)>> chardev_waits_;  // creations not yet ready
  uint64_t chardev_wait_counter_ = 0;
  void register_chardev_commands();
  chr::env chardev_env(const std::string& note_prefix);
  std::shared_ptr<chr::chardev> find_chardev(const std::string& id) const;
  // Opens `spec` (and its mux for mux=on) and registers it once ready; `reply` gets ChardevReturn.
  void add_chardev(const chardev_spec& spec, const std::string& note_prefix, reply_fn reply);
  void open_chardev(const chardev_spec& spec, const std::string& note_prefix, reply_fn reply);
  void remove_chardev(const std::string& id);
  void publish_chardev_qom(const std::shared_ptr<chr::chardev>& dev);  // /chardevs/<id>
  void unpublish_chardev_qom(const std::string& id);
  command_outcome add_monitor(const std::string& chardev_id, bool pretty, const std::string& id);

  // ---- jobs (jobs.cpp): the registry, job-* commands, blockdev-create, x-blockdev-amend ---------
  struct job_entry {
    std::string id;
    caf::actor actor;
    std::vector<std::string> held;    // nodes the job holds as user "job:<id>"
    std::vector<std::string> opened;  // nodes opened for it from inline options, closed when released
    // Block jobs: the kind (query-block-jobs, op blocker texts) and the nodes other jobs and
    // blockdev-del must leave alone while it runs (QEMU's op blockers).
    std::optional<job::type> block_kind;
    std::vector<std::string> blocked;
    std::string target_of_job;  // a mirror's target: blockdev-del says "Node X is in use"
  };
  std::deque<job_entry> jobs_;  // newest first, as query-jobs lists them
  unsigned job_node_counter_ = 0;
  job_entry* find_job(const std::string& id);
  // Registers and starts a job; `hold` takes the job's nodes first (so they are held when the command
  // returns, as in QEMU, where the job takes them before its first yield).
  void start_job(job::options o, std::shared_ptr<job_runner> runner, std::function<void(job_entry&)> hold,
                 reply_fn reply, bool staged = false);  // staged: only created (a transaction starts it at commit)
  void blockdev_create(const boost::json::object& args, reply_fn reply);
  void blockdev_amend(const boost::json::object& args, reply_fn reply);
  void query_jobs(reply_fn reply);
  void job_graph(job_graph_request r);
  // ---- block jobs (block_jobs.cpp) ----------------------------------------------------------
  void register_block_job_commands();
  // QEMU's op blocker of a block job on `n`: "Node 'x' is busy: block device is in use by block job: stream".
  result<void> check_job_blockers(const block::node& n) const;
  void queue_job_edit(std::function<void(reply_fn)> work);
  void block_stream(const boost::json::object& args, reply_fn reply);
  void block_commit(const boost::json::object& args, reply_fn reply);
  // ---- the images drive-mirror and drive-backup make (job_targets.cpp) ---------------------
  // Creates `img` on the source's home unless `existing`, then `then`.
  void create_job_image(bool existing, block::node* src, const block::overlay_image& img, reply_fn then);
  // Opens `opts` on `home` as a job's own node (closed with the job unless it gains users).
  void open_job_target(iothread* home, const boost::json::object& opts, reply_fn failed,
                       std::function<void(block::node&)> opened);
  // `reply`, closing the job's target node first when the job was refused.
  reply_fn drop_target_if_refused(std::string target, reply_fn reply);
  // ---- mirror (mirror_jobs.cpp) -------------------------------------------------------------
  void register_mirror_commands();
  bool mirror_root(const block::node& n) const;  // QEMU's "Need a root block node" check
  void blockdev_mirror(const boost::json::object& args, reply_fn reply) { blockdev_mirror(args, std::move(reply), mirror_extra{}); }
  void blockdev_mirror(const boost::json::object& args, reply_fn reply, mirror_extra extra);
  void drive_mirror(const boost::json::object& args, reply_fn reply);
  void block_job_change(const boost::json::object& args, reply_fn reply);
  // ---- backup (backup_jobs.cpp) -------------------------------------------------------------
  void register_backup_commands();
  void blockdev_backup(const boost::json::object& args, reply_fn reply, backup_extra extra);
  // The checks after the bitmap's (which run on the source's home), then the filter and the job.
  void backup_checked(const boost::json::object& args, reply_fn reply, backup_extra extra, std::string sync,
                      std::optional<std::string> bitmap, std::optional<std::string> bitmap_mode);
  void drive_backup(const boost::json::object& args, reply_fn reply, std::shared_ptr<job::txn> group = nullptr,
                    bool staged = false);
  // The jobs' group of the transaction being built (completion-mode grouped), else null.
  std::shared_ptr<job::txn> building_group_;
  // The jobs the transaction being built started under its drain, in start order: let go in reverse
  // once every action committed (QEMU's drains end as the actions clean up: the node's last one last).
  std::shared_ptr<std::vector<caf::actor>> building_held_;
  void commit_active(const std::string& id, block::node* top, block::node* base, int64_t speed, on_error_policy on_error,
                     bool auto_finalize, bool auto_dismiss, reply_fn reply);
  // A mirror's or active commit's pivot: writers of `from` stop, `sync` copies their last writes
  // on the home, then every user of `from` moves to `to`.
  void pivot(const std::string& from, const std::string& to, engine_job_plan::home_sync sync, reply_fn reply,
             std::string to_backing = {});
  // A job's graph step: `work` runs here as a job edit when the job calls the returned function.
  std::function<void(std::function<void(result<void>)>)> edit_step(std::function<void(reply_fn)> work);
  // `top`'s backing becomes `base` (none if empty), and its image header says so.
  void rebase(const std::string& top, const std::string& base, std::optional<std::string> backing_file, bool mask_protocol,
              reply_fn reply);
  void drop_job_filter(const std::string& filter, const std::string& id, std::vector<std::string> released,
                       reply_fn reply);
  result<block::node*> job_hold(job_entry& j, const boost::json::value& ref);
  void job_release(const std::string& id);
  void job_gone(const std::string& id);
  // blockdev-del of a node a job holds: refused naming the job (after QEMU's own earlier checks).
  result<void> check_del_held(const std::string& node) const;
  // Cancels every job and dismisses it (QEMU's job_cancel_sync_all), then calls `then`.
  void stop_jobs(std::function<void()> then);
  void stop_next_job(const std::string& stopped, std::function<void()> then);

  // ---- exports (exports.cpp): the NBD server, block-export-*, nbd-server-* -------------------
  struct export_entry {
    std::string id;
    // The export reaches its node through a root in the graph ("export:<id>"), never by name: a
    // graph edit that replaces the node (a snapshot, a mirror pivot) re-points the root, and
    // the clients move with it (repoint_export).
    std::string root_key;
    std::string type;  // the export type ("nbd")
    block::node* serving = nullptr;  // the node the export's connection actors were started on
    nbd::export_view view;
    bool writable = false;
    bool writethrough = false;
    bool sparse_reads = false;
    bool fixed_iothread = false;  // its node may not move while the export exists
    bool shutting_down = false;
    bool finishing = false;  // its bitmaps are being released; then it goes
    // The dirty bitmaps it exports (busy meanwhile), in context order; they live on the exported
    // node's home and are touched only there.
    std::vector<std::shared_ptr<block::dirty_bitmap>> bitmaps;
    // With bitmaps: the exported node and the nodes the bitmaps live on. None of them may move to
    // another iothread without the rest, or a connection would read a bitmap that another thread
    // dirties (check_bitmaps_not_split refuses a move that would part them).
    std::vector<std::string> bitmap_graph;
    std::map<uint64_t, caf::actor> clients;
    std::vector<std::function<void()>> on_gone;  // run once the export is deleted
  };
  // An export type: block-export-add's checks and setup of its own, after the shared ones (id,
  // node, iothread, writable). Adding vhost-user-blk or fuse is one more registration.
  struct export_type {
    std::function<command_outcome(const boost::json::object& args, block::node& n)> check;
    std::function<void(const boost::json::object& args, block::node& n, export_entry& e)> describe;
  };
  std::map<std::string, export_type> export_types_;
  void register_export_types();
  struct export_catalog final : nbd::export_catalog {
    supervisor_actor* self = nullptr;
    const nbd::export_view* find(const std::string& name) const override;
    std::vector<const nbd::export_view*> all() const override;
  };
  std::deque<export_entry> exports_;  // newest first, as query-block-exports lists them
  // NBD clients between two homes while their export's node moves (exports.cpp).
  std::vector<nbd_client_setup> parked_;
  // Moves under way (parks not yet unparked; they nest inside one transaction): while any is,
  // new clients wait in parked_ too, and the parked clients start only when the last one ends.
  int parking_ = 0;
  void park_clients(const std::vector<block::node*>& nodes, std::function<void()> then);
  void unpark_clients();
  void start_client(nbd_client_setup s);
  export_catalog catalog_;
  std::unique_ptr<nbd_server> nbd_;
  uint64_t nbd_client_counter_ = 0;
  void nbd_server_start(const boost::json::object& args, reply_fn reply);
  void nbd_server_stop(reply_fn reply);
  // The checks of block-export-add that change nothing (shared ones, then the type's own).
  command_outcome export_add_checks(const boost::json::object& args);
  command_outcome block_export_add(const boost::json::object& args);
  void block_export_add_async(const boost::json::object& args, reply_fn reply);
  // The last step of an add, once the node is where the export runs: with `bitmaps`, they are
  // looked up, checked and held at the node's home first, and released again if the add fails.
  void export_add_final(const boost::json::object& args, reply_fn reply);
  // Bitmaps held for the export being added; its registration takes them.
  std::vector<std::shared_ptr<block::dirty_bitmap>> adding_bitmaps_;
  std::vector<std::string> adding_bitmap_owners_;  // the nodes those bitmaps live on
  // The export (fixed-iothread) that keeps one of `nodes` where it is, or nullptr.
  const export_entry* pinning_export(const std::vector<block::node*>& nodes) const;
  // Refuses a move of `moving` to another iothread that would part an export's bitmap nodes.
  result<void> check_bitmaps_not_split(const std::vector<block::node*>& moving) const;
  void block_export_del(const std::string& id, const std::string& mode, reply_fn reply);
  export_entry* find_export(const std::string& id);
  // The node an export's root points at now (null once the graph is gone).
  block::node* export_node(const export_entry& e) const;
  std::string export_node_name(const export_entry& e) const;
  // Re-points export `id` to node `to`: its clients are parked (each finishes what is in flight),
  // the root moves with its permissions (all or nothing), and the clients continue on `to`'s
  // actor and home. Graph edits that replace an exported node (external snapshots, mirror pivot)
  // park the clients of the exports they move the same way before quiescing.
  void repoint_export(const std::string& id, block::node* to, reply_fn reply);
  void nbd_negotiated_client(nbd_negotiated n);
  void nbd_client_gone(const std::string& export_id, uint64_t client_id);
  // Starts the export's shutdown (clients told to close); `then` runs once it is deleted.
  void shutdown_export(const std::string& id, std::function<void()> then);
  void finish_export(const std::string& id);
  // Closes every export and the NBD server (quit, nbd-server-stop), then calls `then`.
  void stop_exports(bool server_too, std::function<void()> then);

  // ---- placement: every node has a home iothread; a connected component shares one -----------
  iothread* home_of(const block::node* n) const;
  block::driver_env env_for(iothread* t) const;
  // Moves `nodes` (drained, inside with_quiesced) to `to`; their actors follow at the next sync.
  void rehome(const std::vector<block::node*>& nodes, iothread* to);
  // The same as an action (x-blockdev-set-iothread, object-del of an iothread, export iothread).
  std::unique_ptr<block::action> rehome_action(std::vector<block::node*> nodes, iothread* to);
  // Moves the components of `seeds` to `to` (quiesced around the move), then replies.
  void move_components(const std::vector<block::node*>& seeds, iothread* to, std::function<command_outcome()> then,
                       reply_fn reply);
  std::vector<block::node*> components(const std::vector<block::node*>& seeds) const;

  iothread* home_;
  supervisor_hooks hooks_;
  std::vector<caf::actor> monitors_;
  std::vector<caf::actor> subscribers_;
  // Rate-limited events (QUORUM_*): per key, the event held back while its second runs.
  qmp::event_throttle throttle_;
  std::map<std::string, std::optional<qmp_event>> throttled_;
  void broadcast(const qmp_event& ev);
  void throttle_expired(const std::string& key);
  // x-blockdev-change (child_change.cpp): a quorum's children added or removed.
  void blockdev_change(const boost::json::object& args, reply_fn reply);
  bool shutting_down_ = false;
  // Until main() reports the command line applied, monitors and the NBD server hold their clients
  // (QSD serves nobody before its main loop runs, so no client sees a half-built configuration).
  bool starting_ = true;
  std::deque<pending_command> queue_;
  bool busy_ = false;
  bool pumping_ = false;
  std::unique_ptr<block::graph> graph_;
  iothread* new_node_home_ = nullptr;  // where graph_->add opens nodes (the main iothread if null)
  std::unordered_map<const block::node*, iothread*> homes_;
  struct node_entry {
    block::node* n;
    iothread* home;
    caf::actor actor;
  };
  std::map<std::string, node_entry> node_actors_;  // by node name
  // Keeps one actor per node on the node's home: stops those of deleted or moved nodes (waiting
  // until their old loop has processed the stop) and spawns the missing ones.
  void sync_node_actors();
};

}  // namespace blockd

CAF_ALLOW_UNSAFE_MESSAGE_TYPE(blockd::chardev_spec)

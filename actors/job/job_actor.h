// The job actor: one per job, owning the job's core (state machine) and its runner (the work); pinned to the main iothread.
#pragma once
#include <caf/event_based_actor.hpp>

#include <atomic>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "actors/job/job_core.h"
#include "actors/messages.h"
#include "actors/runtime/iothread.h"

namespace blockd {

// One step a job body hands to its job: runs on the job actor's thread, with the core.
struct job_step {
  std::function<void(job::core&)> fn;
};

using job_start_atom = caf::atom_constant<caf::atom("jobstart")>;  // -> command_outcome (created, running)
// A job of a transaction action (QEMU's backup): created in the action's prepare, started at its
// commit while its source is still drained (running, paused), and let go once the transaction's
// drains end (running).
using job_create_atom = caf::atom_constant<caf::atom("jobcreate")>;    // -> command_outcome (created)
using job_start_held_atom = caf::atom_constant<caf::atom("jobstarth")>;  // -> command_outcome (running, paused)
using job_undrain_atom = caf::atom_constant<caf::atom("jobundrain")>;    // -> bool (running)
using job_verb_atom = caf::atom_constant<caf::atom("jobverb")>;    // (verb, force) -> command_outcome
using job_info_atom = caf::atom_constant<caf::atom("jobinfo")>;    // -> json_args (JobInfo)
using job_post_atom = caf::atom_constant<caf::atom("jobpost")>;    // job_step from the body, any thread
using job_stop_atom = caf::atom_constant<caf::atom("jobstop")>;    // shutdown: cancel, dismiss; -> bool at null
using job_gone_atom = caf::atom_constant<caf::atom("jobgone")>;    // job -> supervisor: (id) reached null
// Block jobs only: (verb name, arguments) -> command_outcome for the block-job-* commands that need
// more than job-*'s (set-speed, change, cancel's paused check, resume's io-status reset).
using block_verb_atom = caf::atom_constant<caf::atom("blkverb")>;
using block_info_atom = caf::atom_constant<caf::atom("blkinfo")>;  // -> json_args (BlockJobInfo, null if none)

// How a body reaches its job from any thread (a worker thread, a copy loop on a node's iothread):
// each call is a message to the job actor, handled in order on its thread.
// The port holds the job weakly: it lives in the job's runner, which the job actor owns, and a strong
// handle would close a cycle (actor -> runner -> port -> actor) that kept every job actor, its core and
// its runner alive forever after the job left (about 2 KiB per job). A post to a job that is gone is
// dropped.
class job_port {
 public:
  job_port() = default;
  explicit job_port(const caf::actor& job) : job_(caf::actor_cast<caf::actor_addr>(job)) {}
  void post(std::function<void(job::core&)> fn) const;
  // The work ended: rc 0, or a negative errno with QEMU's message for the failure.
  void done(int rc, std::string text) const;
  void progress(int64_t done) const;

 private:
  caf::actor_addr job_;
};

// A kind of job as the job actor runs it: the core's driver hooks plus how the body reports. Block
// jobs (mirror, backup, stream, commit) derive from this too: their run() starts a copy loop actor on
// the node's iothread, their enter/pause/cancel hooks message it, and the loop reports through port().
class block_job_runner;

class job_runner : public job::driver, public std::enable_shared_from_this<job_runner> {
 public:
  // Block jobs (commit, stream, mirror, backup) answer the block-job-* verbs and query-block-jobs.
  virtual block_job_runner* as_block_job() { return nullptr; }
  // Right after the job was created, before it starts: a failure ends it at once (created -> null),
  // as a block job whose initial speed is refused does in QEMU.
  virtual result<void> created(job::core& j) { (void)j; return {}; }
  // QEMU creates a backup job while its source is drained (the transaction of one action that
  // qmp_blockdev_backup runs), so the job pauses at its first pause point and resumes when the
  // drain ends, before the command returns: created, running, paused, running.
  virtual bool starts_drained() const { return false; }
  job_runner();  // counted (job_actor::live_runners)
  job_runner(const job_runner&) = delete;
  job_runner& operator=(const job_runner&) = delete;
  ~job_runner() override;
  // Called once, before run(): the job's own actor and the supervisor (graph work, events).
  void attach(job_port port, caf::actor supervisor) {
    port_ = std::move(port);
    supervisor_ = std::move(supervisor);
  }
  // The job actor goes away while the work may still run (the daemon is torn down hard): the body
  // must stop as soon as it can; what it holds of the runner stays alive (shared) until it does.
  virtual void abandon() {}
  // The job reached null: its last chance to release what it holds (the supervisor also drops every
  // node hold of the job then).
  virtual void dismissed() {}

 protected:
  const job_port& port() const { return port_; }
  const caf::actor& supervisor() const { return supervisor_; }

 private:
  job_port port_;
  caf::actor supervisor_;
};

// A body that blocks (image creation): work() runs on a thread of its own and polls `cancelled`;
// its result comes back to the job as work_done. QEMU's create has no .cancel: a cancel is a force
// cancel, and the flag is the body's only way to stop early.
class worker_runner : public job_runner {
 public:
  ~worker_runner() override;
  void run(job::core& j) override;
  bool cancel(job::core& j, bool force) override;
  void enter(job::core& j) override;
  void abandon() override;

 protected:
  // On the worker thread. Never touches the core; progress goes through port().
  virtual result<void> work(const std::atomic<bool>& cancelled) = 0;
  // On the job's thread, before work_done (QEMU's run() updates progress at its end).
  virtual void finished(job::core& j) { (void)j; }

 private:
  std::shared_ptr<std::atomic<bool>> cancelled_ = std::make_shared<std::atomic<bool>>(false);
  std::thread thread_;
};

class job_actor : public caf::event_based_actor {
 public:
  job_actor(caf::actor_config& cfg, iothread* home, caf::actor supervisor, job::options opts,
            std::shared_ptr<job_runner> runner);
  ~job_actor() override;
  caf::behavior make_behavior() override;
  // Takes the job's monitor off the supervisor. CAF keeps a monitor (with a weak handle to this
  // actor, which holds the actor's whole allocation) on the observed actor until it is removed or the
  // observed actor exits: without this, every job ever run stayed in the supervisor (~1.4 KiB each).
  void on_exit() override;
  // Job actors and runners in existence (constructed, not yet destroyed), any thread: a job that
  // left must not stay behind (tests check both return to their count before the job).
  static long live_actors();
  static long live_runners();

 private:
  command_outcome verb(const std::string& name, bool force);
  command_outcome block_verb(const std::string& name, const boost::json::object& args);
  // Verbs that arrive while the job's transaction waits for an asynchronous prepare wait here and
  // run once it is over (QEMU's finalize is one step no command can come between).
  struct held_verb {
    std::function<command_outcome()> run;
    caf::response_promise rp;
    bool answered = false;  // the verb ran already; only its reply waited
  };
  std::deque<held_verb> held_;
  bool holding() const;
  caf::result<command_outcome> run_or_hold(std::function<command_outcome()> fn);
  void release_held();
  boost::json::object info() const;
  // After every message: drive a requested stop, and leave once the job reached null.
  void settle();

  iothread* home_;
  caf::actor supervisor_;
  std::shared_ptr<job_runner> runner_;  // shared: an abandoned worker thread keeps its runner alive
  job::core core_;
  bool stopping_ = false;
  bool created_ = false;  // job_create_atom ran (a later job_start_atom only starts)
  bool held_drain_ = false;  // started under the transaction's drain: job_undrain_atom ends it
  bool stop_cancelled_ = false;
  caf::response_promise stop_rp_;
  // Set once the job reached null and the supervisor was told; shared with the exit hook, which
  // tells the supervisor when the actor fails instead (so the job's nodes are released).
  std::shared_ptr<bool> gone_ = std::make_shared<bool>(false);
};

}  // namespace blockd

CAF_ALLOW_UNSAFE_MESSAGE_TYPE(blockd::job_step)

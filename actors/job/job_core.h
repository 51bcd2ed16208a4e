// The job lifecycle of QEMU's job.c (create, start, pause points, cancel, completion, transactions, finalize, dismiss); plain C++, run only on the job's owner thread.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "actors/job/job_state.h"
#include "protocol/error.h"

namespace blockd::job {

class core;
class txn;

// What a kind of job plugs into the core: QEMU's JobDriver plus its notifier lists. Every call comes
// on the owner's thread. A body that runs elsewhere (a worker thread, a copy loop on a node's
// iothread) reports back through its owner, which then calls core::work_done on that thread.
class driver {
 public:
  virtual ~driver() = default;

  // Starts the work. It ends, however it ends, with exactly one core::work_done (maybe inside run).
  virtual void run(core& j) = 0;

  // A cancel was asked for; returns whether it is a force cancel after all. QEMU's default (no
  // .cancel) is force; a READY mirror turns a soft cancel into a completion without pivot.
  virtual bool cancel(core& j, bool force) { (void)j; (void)force; return true; }
  // Something the body waits for changed (a cancel, the last resume): QEMU's job_enter. A body
  // parked at a pause point is resumed by the core itself; others re-check cancel_requested().
  virtual void enter(core& j) { (void)j; }
  // Around a pause at a pause point (QEMU's .pause/.resume), and when the user resumes.
  virtual void pause(core& j) { (void)j; }
  virtual void resume(core& j) { (void)j; }
  virtual void user_resume(core& j) { (void)j; }
  // job-complete (mirror and active commit): only jobs that can be completed override both.
  virtual bool can_complete() const { return false; }
  virtual result<void> complete(core& j) { (void)j; return {}; }

  // The finalize phase, run for every job of a transaction together: prepare all (a failure aborts
  // the whole transaction), then commit or abort each, then clean each.
  virtual result<void> prepare(core& j) { (void)j; return {}; }
  // The same for a prepare that must wait for other threads (a graph edit by the supervisor, a
  // header write on a node's home): `done` runs once, on the owner's thread, now or later. While a
  // transaction prepares, its jobs take no verbs (txn::finalizing; the owner holds them back).
  virtual void prepare_async(core& j, std::function<void(result<void>)> done) { done(prepare(j)); }
  virtual void commit(core& j) { (void)j; }
  virtual void abort(core& j) { (void)j; }
  virtual void clean(core& j) { (void)j; }

  // Notifiers, right after the transition they belong to (block jobs raise their BLOCK_JOB_*
  // events here): ready after ->ready, pending after ->pending (only with auto-finalize off), and
  // completed/cancelled after clean and before ->concluded, only for a job that had started.
  virtual void on_ready(core& j) { (void)j; }
  virtual void on_pending(core& j) { (void)j; }
  virtual void on_completed(core& j) { (void)j; }
  virtual void on_cancelled(core& j) { (void)j; }
};

struct options {
  std::string id;        // empty for an internal job: no events, no verbs
  type kind = type::create;
  bool auto_finalize = true;
  bool auto_dismiss = true;
  // The transaction the job joins (QMP transaction, completion-mode grouped); null: one of its own.
  // Members call into each other, so their owners must share one thread.
  std::shared_ptr<txn> group = nullptr;
};

// One job. The owner keeps it alive until it reaches `null` (QEMU drops the job there); every
// transition with a change of state is reported to `on_status` before the call that made it returns.
class core {
 public:
  using status_fn = std::function<void(core&, status)>;
  core(options o, driver& d, status_fn on_status);
  ~core();
  core(const core&) = delete;
  core& operator=(const core&) = delete;

  const std::string& id() const { return o_.id; }
  type kind() const { return o_.kind; }
  status state() const { return status_; }
  bool auto_finalize() const { return o_.auto_finalize; }
  bool auto_dismiss() const { return o_.auto_dismiss; }
  bool started() const { return started_; }
  bool user_paused() const { return user_paused_; }
  bool paused() const { return paused_; }
  int pause_count() const { return pause_count_; }
  // QEMU's busy: the body runs, and is not sleeping (a speed limit's wait, a converged mirror's
  // wait for new writes: job_sleep_ns clears it there).
  bool busy() const { return busy_ && !sleeping_; }
  // The body sleeps (true) or works again (false); a pause or resume resets it.
  void set_sleeping(bool s) { sleeping_ = s && busy_; }
  bool should_pause() const { return pause_count_ > 0; }
  bool cancel_requested() const { return cancelled_; }
  bool is_cancelled() const { return force_cancel_; }
  bool work_finished() const { return deferred_; }
  int ret() const { return ret_; }
  // The failure text query-jobs shows ("error"); empty while the job has not failed.
  const std::string& error_text() const { return err_; }
  bool failed() const { return ret_ != 0; }

  // Progress (QEMU's ProgressMeter): work done moves current only; the remaining work sets total.
  int64_t current_progress() const { return current_; }
  int64_t total_progress() const { return total_; }
  void progress_update(int64_t done);
  void progress_set_remaining(int64_t remaining);
  void progress_increase_remaining(int64_t delta);

  // ---- lifecycle, driven by the owner --------------------------------------------------------
  // job_create: undefined -> created. The job holds one pause until start().
  void create();
  // job_start: created -> running, then the driver's run().
  void start();
  // job_early_fail: a job that could not be started goes created -> null.
  void early_fail();
  // The body finished: rc 0 or a negative errno with the message (QEMU's run() return and errp).
  void work_done(int rc, std::string error_text = {});
  // The body reached the point where the job may be completed (mirror, active commit).
  void transition_to_ready();
  // A pause point for bodies that run in steps on the owner's thread: returns false to go on at
  // once; true when the job is now paused (paused/standby) and `cont` runs once it may go on.
  bool pause_point(std::function<void()> cont);

  // Internal pause and resume (a drain): counted, not visible as user_paused.
  void pause();
  void resume();
  // Cancels at once, as job_cancel: a concluded job is dismissed, a job not started completes
  // as aborted, a finished one (waiting/pending) is aborted with its transaction.
  void cancel(bool force);

  // ---- QMP verbs, with QEMU's checks and texts, in QEMU's order ------------------------------
  result<void> user_pause();
  result<void> user_resume();
  result<void> user_cancel(bool force);
  result<void> user_complete();
  result<void> user_finalize();
  result<void> user_dismiss();
  result<void> check_verb(verb v) const { return apply_verb(o_.id, status_, v); }

  txn& transaction() { return *txn_; }

 private:
  friend class txn;
  void transition(status s1);
  void enter();
  void cancel_async(bool force);
  void update_rc();
  void completed();
  void completed_txn_success();
  void do_finalize();
  void prepare(std::function<void(bool ok)> done);
  void finalize_single();
  void conclude();
  void do_dismiss();

  options o_;
  driver& d_;
  status_fn on_status_;
  status status_ = status::undefined;
  std::shared_ptr<txn> txn_;
  bool started_ = false;
  bool busy_ = false;
  bool sleeping_ = false;
  bool paused_ = true;   // a created job is paused until it starts (QEMU's job_create)
  int pause_count_ = 0;
  bool user_paused_ = false;
  bool cancelled_ = false;
  bool force_cancel_ = false;
  bool deferred_ = false;  // the body returned (QEMU's deferred_to_main_loop)
  int ret_ = 0;
  std::string err_;
  int64_t current_ = 0, total_ = 0;
  std::function<void()> parked_;  // the body's continuation while it waits at a pause point
  status parked_from_ = status::running;
};

// A group of jobs that finish together (QMP transaction with completion-mode grouped). Every job
// starts in a transaction of its own; join() moves a job into a shared one before it starts.
class txn : public std::enable_shared_from_this<txn> {
 public:
  static void join(core& j, const std::shared_ptr<txn>& t);
  static std::shared_ptr<txn> make() { return std::shared_ptr<txn>(new txn()); }
  const std::vector<core*>& jobs() const { return jobs_; }
  bool aborting() const { return aborting_; }
  // A finalize is waiting for a member's asynchronous prepare: verbs to any member wait too.
  bool finalizing() const { return finalizing_; }

 private:
  friend class core;
  txn() = default;
  void add(core& j);
  void remove(core& j);
  // job_txn_apply: runs fn on every job (a snapshot: fn may take jobs out); stops at the first failure.
  result<void> apply(const std::function<result<void>(core&)>& fn);
  void abort(core& cause);
  void continue_abort();
  // do_finalize's walk: prepares jobs[i..] one after the other, then finalizes or aborts all.
  void prepare_from(core& cause, std::vector<core*> jobs, size_t i);

  std::vector<core*> jobs_;
  bool finalizing_ = false;
  bool aborting_ = false;
  bool in_abort_loop_ = false;
  bool abort_again_ = false;
};

}  // namespace blockd::job

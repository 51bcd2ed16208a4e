// A block job whose work is one run of the copy engine (stream, commit; mirror and backup build on it): the runner on the job actor's thread, the engine's host on the nodes' home iothread.
#pragma once
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>

#include "actors/job/block_job.h"
#include "storage/block/copy_engine.h"

namespace blockd {

class engine_host;

// A mirror's copy mode and BlockJobInfoMirror's actively-synced, shared by the runner (job thread:
// block-job-change, query-block-jobs) and the host (home thread: every write asks the mode).
struct mirror_state {
  std::atomic<bool> write_blocking{false};
  std::atomic<bool> actively_synced{false};  // converged in write-blocking mode, no target error since
};

struct engine_job_plan {
  iothread* home = nullptr;  // where the engine's nodes live (and the engine runs)
  // On the home: the engine's settings (the nodes are read there). Speed comes from the job.
  std::function<block::copy_settings()> settings;
  // On the home, before the engine starts: fills the work map and calls ready(0 or -errno).
  // Empty: every chunk is to be copied.
  std::function<void(block::copy_engine& e, std::function<void(int)> ready)> fill;
  on_error_policy on_source_error = on_error_policy::report;
  on_error_policy on_target_error = on_error_policy::report;
  // What "ignore" means: stream goes on past the range and ends with the first error; mirror and
  // backup copy the range again later.
  bool ignore_skips = false;
  // Ranges the policy skipped count as progress (stream, commit: the whole length is the total).
  bool skipped_is_progress = true;
  // Ranges the policy skipped leave the total instead (backup sync=top: QEMU's len is what it copied).
  bool skip_lowers_total = false;
  // Mirror and active commit: READY once converged; guest writes to the source are copied again
  // (a write hook) until the job is cleaned up; job-complete ends the work once converged, and the
  // prepare's pivot first stops the writers and runs `sync` (see finish).
  bool ready_when_idle = false;
  // Mirror only: its copy mode (write-blocking: guest writes reach the target before they complete).
  std::shared_ptr<mirror_state> mirror;
  // Nothing to copy (a stream whose top sits right on the base): the job ends within its start,
  // as QEMU's does when its body returns without yielding.
  bool nothing_to_do = false;
  // The job's error text when `fill` fails (QEMU's message for a check its body makes first).
  std::string failure_text;
  // The job's prepare and clean (graph work through the supervisor); empty = nothing to do.
  // `sync`, for jobs with ready_when_idle, is called on the home thread once the writers are
  // stopped: it copies what they dirtied last and calls back with 0 or -errno, so the pivot that
  // follows loses no write.
  using home_sync = std::function<void(std::function<void(int)> done)>;
  std::function<void(home_sync sync, std::function<void(result<void>)> done)> finish;
  std::function<void()> clean;
  // Backup: the engine belongs to the copy-before-write filter the job inserted (its copy_now
  // serves guest writes before, during and after the job). `borrow`, on the home, returns it with
  // the job's policy set (null: the filter is gone); the job sets its callbacks, and a cancel only
  // pauses it. Empty: the job makes its own engine from `settings`.
  std::function<block::copy_engine*()> borrow;
  // False: no background copy (backup sync=none): the job only follows what guest writes make the
  // filter copy, until it is cancelled.
  bool background = true;
  // The job starts under a drain of its source, as QEMU's backup (job_runner::starts_drained).
  bool starts_drained = false;
  // On the home, once the work is over (rc: 0, the job's error, or -ECANCELED), with the engine
  // still there: backup's bitmap-mode handling (what is left dirty is what was not copied).
  std::function<void(block::copy_engine* e, int rc)> at_end;
};

class engine_job_runner : public block_job_runner {
 public:
  engine_job_runner(job::type kind, engine_job_plan p) : block_job_runner(kind), plan_(std::move(p)) {}
  ~engine_job_runner() override;

  void prepare_async(job::core& j, std::function<void(result<void>)> done) override;
  void clean(job::core& j) override;
  void abandon() override;
  bool can_complete() const override { return plan_.ready_when_idle; }
  bool starts_drained() const override { return plan_.starts_drained; }
  result<void> complete(job::core& j) override;
  // A READY mirror's soft cancel completes the job without a pivot (QEMU's mirror_cancel).
  bool cancel(job::core& j, bool force) override;

 protected:
  // Mirror: block-job-change's copy-mode, and actively-synced in query-block-jobs.
  result<void> change_kind(job::core& j, const boost::json::object& opts) override;
  void info_extra(boost::json::object& o) const override;

  void body_start(job::core& j) override;
  void body_pause(std::function<void()> parked) override;
  void body_resume() override;
  void body_cancel() override;
  void speed_changed(int64_t speed) override;

  // Runs `fn` on the home with the host (dropped when the host is gone).
  void to_host(std::function<void(engine_host&)> fn);
  const engine_job_plan& plan() const { return plan_; }

 private:
  engine_job_plan plan_;
  std::shared_ptr<engine_host> host_;
  bool cleaned_ = false;
};

}  // namespace blockd

// The block-job layer (QEMU's blockjob.c over job.c): speed, error policies and io-status, the BLOCK_JOB_* events, BlockJobInfo, and the pause/cancel handshake with a body on a node's home; job actor's thread (main iothread) unless marked.
#pragma once
#include <boost/json.hpp>

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include "actors/job/job_actor.h"

namespace blockd {

// BlockdevOnError. For jobs "auto" acts as enospc (stop on ENOSPC, report anything else), as in QEMU.
enum class on_error_policy { report, ignore, enospc, stop, auto_ };
std::optional<on_error_policy> parse_on_error(std::string_view s);

// BlockDeviceIoStatus of a job (query-block-jobs "io-status").
enum class job_io_status { ok, failed, nospace };

// What a block job does about one failed request (BlockErrorAction).
enum class job_error_action { report, ignore, stop };

// A block job as the job actor runs it. The work happens elsewhere (a copy loop on the node's home
// iothread), so the layer drives it through four body calls and the body reports through port():
//   body_start   the work begins (after the core's first pause point);
//   body_pause   stop starting new work and call `parked` (from any thread) once nothing is in
//                flight: the core then parks the job at a pause point (paused/standby events);
//   body_resume  go on after a pause;
//   body_cancel  stop for good; the body then ends with port().done(...) as always.
// The layer turns the core's enter() calls (a pause, a resume, a cancel) into these, one at a time.
class block_job_runner : public job_runner {
 public:
  explicit block_job_runner(job::type kind) : kind_(kind) {}
  block_job_runner* as_block_job() override { return this; }
  job::type kind() const { return kind_; }

  // The speed the job starts with (block_job_create's set_speed, after created): refused < 0.
  void initial_speed(int64_t s) { initial_speed_ = s; }
  result<void> created(job::core& j) override;
  // block-job-set-speed, with QEMU's checks in QEMU's order (the verb, then the value).
  result<void> set_speed(job::core& j, int64_t speed);
  int64_t speed() const { return speed_; }
  // block-job-change: the verb check, then the job kind's own change (none by default).
  result<void> change(job::core& j, const boost::json::object& opts);
  // block-job-resume and job-resume clear the io-status (QEMU's block_job_user_resume).
  void user_resume(job::core& j) override;

  // QEMU's block_job_error_action in two halves: the policy's answer (any thread, so a body
  // decides at once), and its effects (the event; for stop, io-status and a user pause) here.
  static job_error_action decide(on_error_policy p, int err);
  // A body's failed request, decided on its own thread (decide): the effects happen here.
  void report_error(job::core& j, job_error_action a, bool is_read, int err) { error_effects(j, a, is_read, err); }

  // BlockJobInfo for query-block-jobs.
  boost::json::object info(const job::core& j) const;

  // The BLOCK_JOB_* events, from the core's notifiers.
  void on_ready(job::core& j) override;
  void on_pending(job::core& j) override;
  void on_completed(job::core& j) override;
  void on_cancelled(job::core& j) override;

  // The pause/cancel handshake (see above).
  void run(job::core& j) override;
  void enter(job::core& j) override;

 protected:
  virtual void body_start(job::core& j) = 0;
  virtual void body_pause(std::function<void()> parked) = 0;
  virtual void body_resume() = 0;
  virtual void body_cancel() = 0;
  // The limit changed (0 = none); called on the job's thread.
  virtual void speed_changed(int64_t speed) { (void)speed; }
  // The kind's block-job-change (mirror's copy-mode).
  virtual result<void> change_kind(job::core& j, const boost::json::object& opts);
  // Kind-specific members of BlockJobInfo (mirror: actively-synced).
  virtual void info_extra(boost::json::object& o) const { (void)o; }

  // BLOCK_JOB_ERROR (always), and for stop the io-status and a user pause (the job parks once
  // the body drained; job-resume retries the request).
  void error_effects(job::core& j, job_error_action a, bool is_read, int err);

  // Events go to the bus through the supervisor, stamped there.
  void emit(std::string name, boost::json::object data) const;
  boost::json::object event_data(const job::core& j) const;  // type, device, len, offset, speed

  // Whether the body was told to stop for good.
  bool cancel_sent() const { return cancel_sent_; }
  job::core* core() const { return core_; }

 private:
  void kick(job::core& j);

  job::type kind_;
  int64_t initial_speed_ = 0;
  int64_t speed_ = 0;
  job_io_status io_status_ = job_io_status::ok;
  job::core* core_ = nullptr;
  bool started_ = false;
  bool pausing_ = false;   // body_pause sent, its `parked` not yet back
  bool parked_ = false;    // the core holds the job at a pause point
  bool cancel_sent_ = false;
};

// Graph work a finishing block job asks of the supervisor (a prepare's backing change, a clean's
// filter removal): `work` runs there like a queued command; `then` gets its outcome there and is
// expected to post it back to the job (a port message), so it may run after the job is gone.
struct job_edit {
  std::function<void(std::function<void(command_outcome)>)> work;
  std::function<void(command_outcome)> then;
};
using job_edit_atom = caf::atom_constant<caf::atom("jobedit")>;  // job -> supervisor: job_edit

}  // namespace blockd

CAF_ALLOW_UNSAFE_MESSAGE_TYPE(blockd::job_edit)

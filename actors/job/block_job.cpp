// The block-job layer's behaviour: speed, error actions, BLOCK_JOB_* events, BlockJobInfo, and the body handshake; job actor's thread (main iothread).
#include "actors/job/block_job.h"

#include <caf/all.hpp>

#include <cerrno>

namespace blockd {

std::optional<on_error_policy> parse_on_error(std::string_view s) {
  if (s == "report") return on_error_policy::report;
  if (s == "ignore") return on_error_policy::ignore;
  if (s == "enospc") return on_error_policy::enospc;
  if (s == "stop") return on_error_policy::stop;
  if (s == "auto") return on_error_policy::auto_;
  return std::nullopt;
}

namespace {
const char* io_status_name(job_io_status s) {
  switch (s) {
    case job_io_status::ok: return "ok";
    case job_io_status::failed: return "failed";
    case job_io_status::nospace: return "nospace";
  }
  return "ok";
}
const char* action_name(job_error_action a) {
  switch (a) {
    case job_error_action::report: return "report";
    case job_error_action::ignore: return "ignore";
    case job_error_action::stop: return "stop";
  }
  return "report";
}
}  // namespace

result<void> block_job_runner::created(job::core& j) {
  core_ = &j;
  return set_speed(j, initial_speed_);
}

result<void> block_job_runner::set_speed(job::core& j, int64_t speed) {
  if (auto r = j.check_verb(job::verb::set_speed); !r) return r;
  if (speed < 0) return fail("Parameter 'speed' expects a non-negative value");
  speed_ = speed;
  speed_changed(speed);
  return {};
}

// QEMU 10.2's block_job_change_locked, as we know it (block-job-change is newer than the 7.2
// oracle, so these texts and their order could not be checked against a running QSD): the type
// given must be the job's, then the verb, then the kind's own change.
result<void> block_job_runner::change(job::core& j, const boost::json::object& opts) {
  auto* t = opts.if_contains("type");
  std::string type = t && t->is_string() ? std::string(t->as_string()) : "";
  if (type != job::name(kind_))
    return fail("Job '" + j.id() + "' is '" + job::name(kind_) + "' job, not '" + type + "'");
  if (auto r = j.check_verb(job::verb::change); !r) return r;
  return change_kind(j, opts);
}

result<void> block_job_runner::change_kind(job::core& j, const boost::json::object& opts) {
  (void)j;
  (void)opts;
  return fail("Job type does not support change");
}

void block_job_runner::user_resume(job::core& j) {
  (void)j;
  io_status_ = job_io_status::ok;
}

boost::json::object block_job_runner::info(const job::core& j) const {
  boost::json::object o{{"type", job::name(kind_)},
                        {"device", j.id()},
                        {"len", j.total_progress()},
                        {"offset", j.current_progress()},
                        {"busy", j.busy()},
                        {"paused", j.pause_count() > 0},
                        {"speed", speed_},
                        {"io-status", io_status_name(io_status_)},
                        {"ready", j.state() == job::status::ready || j.state() == job::status::standby},
                        {"status", job::name(j.state())},
                        {"auto-finalize", j.auto_finalize()},
                        {"auto-dismiss", j.auto_dismiss()}};
  if (j.failed()) o["error"] = j.error_text();
  info_extra(o);
  return o;
}

boost::json::object block_job_runner::event_data(const job::core& j) const {
  return boost::json::object{{"type", job::name(kind_)},
                             {"device", j.id()},
                             {"len", j.total_progress()},
                             {"offset", j.current_progress()},
                             {"speed", speed_}};
}

void block_job_runner::emit(std::string name, boost::json::object data) const {
  if (supervisor()) caf::anon_send(supervisor(), event_atom::value, std::move(name), json_args{std::move(data)});
}

void block_job_runner::on_ready(job::core& j) { emit("BLOCK_JOB_READY", event_data(j)); }

void block_job_runner::on_pending(job::core& j) {
  emit("BLOCK_JOB_PENDING", boost::json::object{{"type", job::name(kind_)}, {"id", j.id()}});
}

void block_job_runner::on_completed(job::core& j) {
  auto d = event_data(j);
  if (j.failed()) d["error"] = j.error_text();
  emit("BLOCK_JOB_COMPLETED", std::move(d));
}

void block_job_runner::on_cancelled(job::core& j) { emit("BLOCK_JOB_CANCELLED", event_data(j)); }

job_error_action block_job_runner::decide(on_error_policy p, int err) {
  switch (p) {
    case on_error_policy::enospc:
    case on_error_policy::auto_: return err == -ENOSPC ? job_error_action::stop : job_error_action::report;
    case on_error_policy::stop: return job_error_action::stop;
    case on_error_policy::ignore: return job_error_action::ignore;
    case on_error_policy::report: return job_error_action::report;
  }
  return job_error_action::report;
}

void block_job_runner::error_effects(job::core& j, job_error_action a, bool is_read, int err) {
  emit("BLOCK_JOB_ERROR", boost::json::object{{"device", j.id()},
                                              {"operation", is_read ? "read" : "write"},
                                              {"action", action_name(a)}});
  if (a == job_error_action::stop) {
    // The job is user-paused (so job-resume is what lets it go on), and says why in io-status.
    if (!j.user_paused()) (void)j.user_pause();
    io_status_ = err == -ENOSPC ? job_io_status::nospace : job_io_status::failed;
  }
}

void block_job_runner::run(job::core& j) {
  core_ = &j;
  started_ = true;
  body_start(j);
  kick(j);  // a cancel or pause that came while the body was being started
}

void block_job_runner::enter(job::core& j) { kick(j); }

void block_job_runner::kick(job::core& j) {
  if (!started_ || j.work_finished() || cancel_sent_) return;
  if (j.cancel_requested()) {
    cancel_sent_ = true;
    // A parked body is woken by the core before it sees the cancel; one still pausing drains first.
    body_cancel();
    return;
  }
  if (!j.should_pause() || pausing_ || parked_) return;
  pausing_ = true;
  std::weak_ptr<job_runner> weak = shared_from_this();
  auto on_parked = [this, weak] {
    // On the job's thread: the body has nothing in flight now.
    auto self = weak.lock();
    if (!self || !core_) return;
    pausing_ = false;
    job::core& c = *core_;
    if (c.work_finished()) return;
    bool parked = c.pause_point([this] {
      // The core resumed the job (or a cancel woke it): the body goes on, then sees the cancel.
      parked_ = false;
      body_resume();
      kick(*core_);
    });
    if (parked) {
      parked_ = true;
      return;
    }
    body_resume();
    kick(c);
  };
  // The body calls it from its own thread; the port brings it here.
  body_pause([port = port(), on_parked] { port.post([on_parked](job::core&) { on_parked(); }); });
}

}  // namespace blockd

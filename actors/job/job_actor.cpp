// Job actor behaviour: verbs, queries and body reports applied to the job's core, JOB_STATUS_CHANGE to the bus; main iothread only (the worker helper's thread excepted, as marked).
#include "actors/job/job_actor.h"

#include <caf/all.hpp>

#include <cerrno>

namespace blockd {
namespace {
std::atomic<long> live_job_actors{0};
std::atomic<long> live_job_runners{0};
}  // namespace

long job_actor::live_actors() { return live_job_actors.load(); }
long job_actor::live_runners() { return live_job_runners.load(); }

job_runner::job_runner() { ++live_job_runners; }
job_runner::~job_runner() { --live_job_runners; }

// ---- job_port: any thread ------------------------------------------------------------------

void job_port::post(std::function<void(job::core&)> fn) const {
  // A message to a job that is already gone is dropped: the job no longer cares.
  if (auto job = caf::actor_cast<caf::actor>(job_)) caf::anon_send(job, job_post_atom::value, job_step{std::move(fn)});
}

void job_port::done(int rc, std::string text) const {
  post([rc, text = std::move(text)](job::core& j) mutable { j.work_done(rc, std::move(text)); });
}

void job_port::progress(int64_t done) const {
  post([done](job::core& j) { j.progress_update(done); });
}

// ---- worker_runner ---------------------------------------------------------------------------

worker_runner::~worker_runner() {
  // The thread has posted its result as its last act before the job can end, so this join is
  // short; abandon() detached it if the job actor had to go first. The last reference may also be
  // the worker's own (its job actor failed and left): a thread cannot join itself.
  if (!thread_.joinable()) return;
  if (thread_.get_id() == std::this_thread::get_id())
    thread_.detach();
  else
    thread_.join();
}

void worker_runner::run(job::core& j) {
  (void)j;
  auto self = std::static_pointer_cast<worker_runner>(shared_from_this());
  thread_ = std::thread([self] {
    // Worker thread: only work() and the port (a message) from here.
    auto r = self->work(*self->cancelled_);
    int rc = r ? 0 : -EIO;
    std::string text = r ? std::string() : r.error().desc;
    self->port().post([self, rc, text](job::core& j) mutable {
      if (self->thread_.joinable()) self->thread_.join();
      self->finished(j);
      j.work_done(rc, std::move(text));
    });
  });
}

bool worker_runner::cancel(job::core& j, bool force) {
  (void)j;
  (void)force;
  cancelled_->store(true);
  return true;
}

void worker_runner::enter(job::core& j) {
  if (j.cancel_requested()) cancelled_->store(true);
}

void worker_runner::abandon() {
  cancelled_->store(true);
  // Last resort while the daemon is torn down: the job actor cannot wait on a thread that may be
  // waiting for this very loop. The flag stays valid (shared); the thread ends on its own.
  if (thread_.joinable()) thread_.detach();
}

// ---- job_actor: main iothread ----------------------------------------------------------------

job_actor::job_actor(caf::actor_config& cfg, iothread* home, caf::actor supervisor, job::options opts,
                     std::shared_ptr<job_runner> runner)
    : caf::event_based_actor(cfg),
      home_(home),
      supervisor_(std::move(supervisor)),
      runner_(std::move(runner)),
      core_(std::move(opts), *runner_, [this](job::core& j, job::status s) {
        // Every change of state is an event, sent to the bus in the order the core makes them.
        send(supervisor_, event_atom::value, std::string("JOB_STATUS_CHANGE"),
             json_args{boost::json::object{{"id", j.id()}, {"status", job::name(s)}}});
        // A transaction peer may have finished this job from its own handler: settle here later.
        if (s == job::status::null) send(caf::actor_cast<caf::actor>(this), job_post_atom::value, job_step{});
      }) {
  runner_->attach(job_port(caf::actor_cast<caf::actor>(this)), supervisor_);
  ++live_job_actors;
}

job_actor::~job_actor() { --live_job_actors; }

void job_actor::on_exit() {
  // (A no-op when the supervisor is the one that went down: its monitors went with it.)
  demonitor(supervisor_);
}

caf::behavior job_actor::make_behavior() {
  // If the supervisor goes down hard, the job goes with it (the graph it works on is gone). A
  // monitor, not a link: a job that fails must not take the supervisor along.
  monitor(supervisor_);
  set_down_handler([this](caf::down_msg&) {
    if (!*gone_) runner_->abandon();
    quit();
  });
  // A job actor that fails (a bug the core reports by throwing) still leaves the registry, so its
  // id and nodes are free again.
  attach_functor([sup = supervisor_, id = core_.id(), gone = gone_, runner = runner_](const caf::error&) {
    if (*gone) return;
    runner->abandon();
    caf::anon_send(sup, job_gone_atom::value, id);
  });
  return {
      [this](job_start_atom) -> command_outcome {
        core_.create();
        core_.start();
        settle();
        return command_outcome::success();
      },
      [this](job_verb_atom, const std::string& name, bool force) -> command_outcome {
        auto out = verb(name, force);
        settle();
        return out;
      },
      [this](job_info_atom) -> json_args { return json_args{info()}; },
      [this](job_post_atom, job_step& step) {
        if (step.fn && core_.state() != job::status::null) step.fn(core_);
        settle();
      },
      [this](job_stop_atom) -> caf::result<bool> {
        stopping_ = true;
        stop_rp_ = make_response_promise();
        settle();
        return stop_rp_;
      },
  };
}

command_outcome job_actor::verb(const std::string& name, bool force) {
  auto v = job::parse_verb(name);
  result<void> r = fail("internal error: unknown job verb '" + name + "'");
  if (v) switch (*v) {
      case job::verb::pause: r = core_.user_pause(); break;
      case job::verb::resume: r = core_.user_resume(); break;
      case job::verb::cancel: r = core_.user_cancel(force); break;
      case job::verb::complete: r = core_.user_complete(); break;
      case job::verb::finalize: r = core_.user_finalize(); break;
      case job::verb::dismiss: r = core_.user_dismiss(); break;
      case job::verb::set_speed:
      case job::verb::change: r = core_.check_verb(*v); break;  // block jobs answer these themselves
    }
  if (!r) return command_outcome::failure(r.error());
  return command_outcome::success();
}

boost::json::object job_actor::info() const {
  boost::json::object o{{"id", core_.id()},
                        {"type", job::name(core_.kind())},
                        {"status", job::name(core_.state())},
                        {"current-progress", core_.current_progress()},
                        {"total-progress", core_.total_progress()}};
  if (core_.failed()) o["error"] = core_.error_text();
  return o;
}

void job_actor::settle() {
  if (stopping_ && !*gone_) {
    // QEMU's job_cancel_sync_all: force-cancel a job still working, dismiss a concluded one; a job
    // between the two (its body still winding down, or a transaction settling) is waited for.
    auto s = core_.state();
    if (s == job::status::concluded) {
      core_.cancel(true);
    } else if (!stop_cancelled_ && job::verb_allowed(job::verb::cancel, s)) {
      stop_cancelled_ = true;
      core_.cancel(true);
      if (core_.state() == job::status::concluded) core_.cancel(true);
    }
  }
  if (core_.state() != job::status::null || *gone_) return;
  *gone_ = true;
  runner_->dismissed();
  send(supervisor_, job_gone_atom::value, core_.id());
  if (stop_rp_.pending()) stop_rp_.deliver(true);
  quit();
}

}  // namespace blockd

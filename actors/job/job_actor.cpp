// Job actor behaviour: verbs, queries and body reports applied to the job's core, JOB_STATUS_CHANGE to the bus; main iothread only (the worker helper's thread excepted, as marked).
#include "actors/job/job_actor.h"

#include "actors/job/block_job.h"

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
      [this](job_create_atom) -> command_outcome {
        core_.create();
        if (auto r = runner_->created(core_); !r) {
          core_.early_fail();
          settle();
          return command_outcome::failure(r.error());
        }
        created_ = true;
        settle();
        return command_outcome::success();
      },
      [this](job_start_held_atom) -> command_outcome {
        // A transaction's abort may have cancelled it meanwhile: then there is nothing to start.
        if (!created_ || core_.state() != job::status::created) return command_outcome::success();
        core_.pause();
        held_drain_ = true;
        core_.start();
        settle();
        return command_outcome::success();
      },
      [this](job_undrain_atom) -> bool {
        if (held_drain_) {
          held_drain_ = false;
          core_.resume();
          settle();
        }
        return true;
      },
      [this](job_start_atom) -> command_outcome {
        core_.create();
        if (auto r = runner_->created(core_); !r) {
          core_.early_fail();
          settle();
          return command_outcome::failure(r.error());
        }
        bool drained = runner_->starts_drained();
        if (drained) core_.pause();
        core_.start();
        if (drained) core_.resume();
        settle();
        return command_outcome::success();
      },
      [this](job_verb_atom, const std::string& name, bool force) -> caf::result<command_outcome> {
        return run_or_hold([this, name, force] { return verb(name, force); });
      },
      [this](block_verb_atom, const std::string& name, const json_args& args) -> caf::result<command_outcome> {
        boost::json::object a = args.v;
        return run_or_hold([this, name, a] { return block_verb(name, a); });
      },
      [this](job_info_atom) -> json_args { return json_args{info()}; },
      [this](block_info_atom) -> json_args {
        if (auto* b = runner_->as_block_job()) return json_args{b->info(core_)};
        return json_args{};  // not a block job: nothing to list
      },
      [this](job_post_atom, job_step& step) {
        if (!step.fn) release_held();  // also the retry tick of held verbs
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

command_outcome job_actor::block_verb(const std::string& name, const boost::json::object& args) {
  auto* b = runner_->as_block_job();
  if (!b) return command_outcome::failure(error(error_class::device_not_active, "Block job '" + core_.id() + "' not found"));
  result<void> r;
  if (name == "set-speed") {
    r = b->set_speed(core_, args.at("speed").to_number<int64_t>());
  } else if (name == "change") {
    r = b->change(core_, args);
  } else if (name == "cancel") {
    bool force = args.contains("force") && args.at("force").as_bool();
    // QEMU's block-job-cancel: a user-paused job is only cancelled by force.
    if (core_.user_paused() && !force)
      r = fail("The block job for device '" + core_.id() + "' is currently paused");
    else
      r = core_.user_cancel(force);
  } else {
    return verb(name, false);
  }
  if (!r) return command_outcome::failure(r.error());
  return command_outcome::success();
}

bool job_actor::holding() const {
  return core_.state() != job::status::null && const_cast<job::core&>(core_).transaction().finalizing();
}

caf::result<command_outcome> job_actor::run_or_hold(std::function<command_outcome()> fn) {
  if (!holding()) {
    auto out = fn();
    if (!holding()) {
      settle();
      return out;
    }
    // The verb started a finalize that waits for other threads (job-finalize, or a cancel that
    // finishes a transaction): the reply follows its events, as QEMU's synchronous finalize does.
    auto rp = make_response_promise<command_outcome>();
    held_.push_back(held_verb{[out] { return out; }, rp, true});
    delayed_send(this, std::chrono::milliseconds(1), job_post_atom::value, job_step{});
    return rp;
  }
  auto rp = make_response_promise<command_outcome>();
  held_.push_back(held_verb{std::move(fn), rp});
  // The finalize that holds them ends in another member's handler (or a reply to this one); a
  // short tick re-checks, since nothing tells this actor when a peer's prepare is over.
  delayed_send(this, std::chrono::milliseconds(1), job_post_atom::value, job_step{});
  return rp;
}

void job_actor::release_held() {
  if (holding()) {
    if (!held_.empty()) delayed_send(this, std::chrono::milliseconds(1), job_post_atom::value, job_step{});
    return;
  }
  while (!held_.empty()) {
    auto h = std::move(held_.front());
    held_.pop_front();
    if (core_.state() == job::status::null && !h.answered) {
      h.rp.deliver(command_outcome::failure(error("Job not found")));
      continue;
    }
    h.rp.deliver(h.run());
  }
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
  if (holding()) return;  // a finalize in progress: nothing may cut in (held verbs wait too)
  release_held();
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

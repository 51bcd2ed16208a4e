// QEMU's job lifecycle (job.c) step by step, so blockd's jobs move through the same states with the same events; owner thread only.
#include "actors/job/job_core.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <stdexcept>

namespace blockd::job {

core::core(options o, driver& d, status_fn on_status) : o_(std::move(o)), d_(d), on_status_(std::move(on_status)) {
  txn_ = o_.group ? o_.group : txn::make();
  txn_->add(*this);
}

core::~core() {
  if (txn_) txn_->remove(*this);
}

void core::transition(status s1) {
  status s0 = status_;
  // QEMU asserts here: a disallowed transition is a bug in blockd, never the client's doing (verbs
  // are checked against the verb table first), so it must not pass silently.
  if (!transition_allowed(s0, s1))
    throw std::logic_error(std::string("job '") + o_.id + "': transition " + name(s0) + " -> " + name(s1) +
                           " is not in QEMU's table");
  status_ = s1;
  if (!o_.id.empty() && s1 != s0 && on_status_) on_status_(*this, s1);
}

void core::progress_update(int64_t done) { current_ += done; }
void core::progress_set_remaining(int64_t remaining) { total_ = current_ + remaining; }
void core::progress_increase_remaining(int64_t delta) { total_ += delta; }

void core::create() {
  // job_create: the job is paused (count 1) until job_start lifts that pause.
  pause_count_ = 1;
  paused_ = true;
  transition(status::created);
}

void core::start() {
  if (started_ || status_ != status::created) throw std::logic_error("job '" + o_.id + "' started twice");
  started_ = true;
  --pause_count_;
  busy_ = true;
  paused_ = false;
  transition(status::running);
  // job_co_entry begins with a pause point: a job paused while it was created pauses right away.
  if (!pause_point([this] { d_.run(*this); })) d_.run(*this);
}

void core::early_fail() {
  if (started_) throw std::logic_error("job '" + o_.id + "' failed early after it started");
  do_dismiss();
}

void core::work_done(int rc, std::string error_text) {
  if (deferred_) throw std::logic_error("job '" + o_.id + "' finished twice");
  ret_ = rc;
  if (!error_text.empty()) err_ = std::move(error_text);
  deferred_ = true;
  busy_ = false;
  completed();
}

void core::transition_to_ready() {
  transition(status::ready);
  d_.on_ready(*this);
}

bool core::pause_point(std::function<void()> cont) {
  if (!should_pause() || is_cancelled()) return false;
  d_.pause(*this);
  if (should_pause() && !is_cancelled()) {
    parked_from_ = status_;
    transition(status_ == status::ready ? status::standby : status::paused);
    paused_ = true;
    busy_ = false;
    sleeping_ = false;
    parked_ = std::move(cont);
    return true;
  }
  d_.resume(*this);
  return false;
}

void core::enter() {
  // job_enter_cond: only a started body that has not finished can be woken.
  if (!started_ || deferred_) return;
  if (parked_) {
    if (should_pause() && !is_cancelled()) return;
    auto cont = std::move(parked_);
    parked_ = nullptr;
    paused_ = false;
    busy_ = true;
    transition(parked_from_);
    d_.resume(*this);
    cont();
    return;
  }
  d_.enter(*this);
}

void core::pause() {
  ++pause_count_;
  if (!paused_) enter();
}

void core::resume() {
  if (pause_count_ <= 0) throw std::logic_error("job '" + o_.id + "' resumed more often than paused");
  if (--pause_count_) return;
  enter();
}

void core::cancel_async(bool force) {
  force = d_.cancel(*this, force);
  if (user_paused_) {
    // A cancelled job must be able to run to its end, so the user's pause goes (the caller enters it).
    d_.user_resume(*this);
    user_paused_ = false;
    --pause_count_;
  }
  // A soft cancel of a job that already finished its work changes nothing.
  if (force || !deferred_) {
    cancelled_ = true;
    force_cancel_ = force_cancel_ || force;
  }
}

void core::cancel(bool force) {
  if (status_ == status::concluded) {
    do_dismiss();
    return;
  }
  cancel_async(force);
  if (!started_) {
    completed();
  } else if (deferred_) {
    if (is_cancelled()) txn_->abort(*this);
  } else {
    enter();
  }
}

void core::update_rc() {
  if (!ret_ && is_cancelled()) ret_ = -ECANCELED;
  if (ret_) {
    if (err_.empty()) err_ = std::strerror(-ret_);
    transition(status::aborting);
  }
}

void core::completed() {
  if (is_completed(status_)) throw std::logic_error("job '" + o_.id + "' completed twice");
  update_rc();
  if (ret_)
    txn_->abort(*this);
  else
    completed_txn_success();
}

void core::completed_txn_success() {
  transition(status::waiting);
  // The transaction goes on once every member has finished its work.
  for (core* o : txn_->jobs())
    if (!is_completed(o->status_)) return;
  (void)txn_->apply([](core& j) -> result<void> {
    j.transition(status::pending);
    if (!j.o_.auto_finalize) j.d_.on_pending(j);
    return {};
  });
  bool manual = std::any_of(txn_->jobs().begin(), txn_->jobs().end(), [](core* j) { return !j->o_.auto_finalize; });
  if (!manual) do_finalize();
}

void core::prepare(std::function<void(bool ok)> done) {
  if (ret_ != 0) return done(false);
  d_.prepare_async(*this, [this, done = std::move(done)](result<void> r) {
    if (!r) {
      ret_ = -EIO;
      err_ = r.error().desc;
    }
    update_rc();
    done(ret_ == 0);
  });
}

void core::do_finalize() {
  auto t = txn_;  // finalizing takes jobs out of the transaction
  t->finalizing_ = true;
  t->prepare_from(*this, t->jobs_, 0);
}

void core::finalize_single() {
  // A late failure (a peer's prepare) still gets the abort path.
  update_rc();
  if (!ret_)
    d_.commit(*this);
  else
    d_.abort(*this);
  d_.clean(*this);
  if (started_) {
    if (is_cancelled())
      d_.on_cancelled(*this);
    else
      d_.on_completed(*this);
  }
  txn_->remove(*this);
  conclude();
}

void core::conclude() {
  transition(status::concluded);
  if (o_.auto_dismiss || !started_) do_dismiss();
}

void core::do_dismiss() {
  busy_ = false;
  paused_ = false;
  deferred_ = true;
  parked_ = nullptr;
  txn_->remove(*this);
  transition(status::null);
}

result<void> core::user_pause() {
  if (auto r = check_verb(verb::pause); !r) return r;
  if (user_paused_) return fail("Job is already paused");
  user_paused_ = true;
  pause();
  return {};
}

result<void> core::user_resume() {
  // QEMU checks this before the verb table, so a concluded job that was never paused says so.
  if (!user_paused_ || pause_count_ <= 0) return fail("Can't resume a job that was not paused");
  if (auto r = check_verb(verb::resume); !r) return r;
  d_.user_resume(*this);
  user_paused_ = false;
  resume();
  return {};
}

result<void> core::user_cancel(bool force) {
  if (auto r = check_verb(verb::cancel); !r) return r;
  cancel(force);
  return {};
}

result<void> core::user_complete() {
  if (auto r = check_verb(verb::complete); !r) return r;
  if (cancelled_ || !d_.can_complete()) return fail("The active block job '" + o_.id + "' cannot be completed");
  return d_.complete(*this);
}

result<void> core::user_finalize() {
  if (auto r = check_verb(verb::finalize); !r) return r;
  do_finalize();
  return {};
}

result<void> core::user_dismiss() {
  if (auto r = check_verb(verb::dismiss); !r) return r;
  do_dismiss();
  return {};
}

// ---- transactions -----------------------------------------------------------------------------

void txn::join(core& j, const std::shared_ptr<txn>& t) {
  if (j.started_) throw std::logic_error("job '" + j.id() + "' joins a transaction after it started");
  j.txn_->remove(j);
  j.txn_ = t;
  t->add(j);
}

void txn::add(core& j) { jobs_.push_back(&j); }

void txn::remove(core& j) { std::erase(jobs_, &j); }

result<void> txn::apply(const std::function<result<void>(core&)>& fn) {
  auto self = shared_from_this();
  std::vector<core*> snapshot = jobs_;
  for (core* j : snapshot) {
    if (std::find(jobs_.begin(), jobs_.end(), j) == jobs_.end()) continue;  // already finalized
    if (auto r = fn(*j); !r) return r;
  }
  return {};
}

void txn::prepare_from(core& cause, std::vector<core*> jobs, size_t i) {
  auto self = shared_from_this();
  // Members finalized meanwhile are skipped, as job_txn_apply's snapshot walk does.
  while (i < jobs.size() && std::find(jobs_.begin(), jobs_.end(), jobs[i]) == jobs_.end()) ++i;
  if (i == jobs.size()) {
    finalizing_ = false;
    (void)apply([](core& j) -> result<void> {
      j.finalize_single();
      return {};
    });
    return;
  }
  core* j = jobs[i];
  j->prepare([self, &cause, jobs = std::move(jobs), i](bool ok) mutable {
    if (ok) return self->prepare_from(cause, std::move(jobs), i + 1);
    // The first failure stops the walk and aborts everyone (QEMU's job_do_finalize).
    self->finalizing_ = false;
    self->abort(cause);
  });
}

void txn::abort(core& cause) {
  if (aborting_) {
    // Another member started the abort and waits for this one to finish its work: go on with it.
    continue_abort();
    return;
  }
  aborting_ = true;
  auto self = shared_from_this();
  // One failure decides the outcome for all: the others are force-cancelled to end quickly.
  std::vector<core*> snapshot = jobs_;
  for (core* j : snapshot)
    if (j != &cause) j->cancel_async(true);
  continue_abort();
}

void txn::continue_abort() {
  if (in_abort_loop_) return;  // the loop below is already walking the members
  auto self = shared_from_this();
  in_abort_loop_ = true;
  while (!jobs_.empty()) {
    core* j = jobs_.front();
    if (!is_completed(j->status_)) {
      // QEMU waits here in a nested event loop (job_finish_sync). blockd returns instead: the
      // cancelled member's work_done comes back through abort() and resumes this loop.
      in_abort_loop_ = false;
      if (!j->started_)
        j->completed();
      else
        j->enter();
      return;
    }
    j->finalize_single();
  }
  in_abort_loop_ = false;
}

}  // namespace blockd::job

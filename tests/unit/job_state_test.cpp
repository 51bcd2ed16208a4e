// Unit tests for the pure job state machine: QEMU's tables cell by cell, and the lifecycle with a scripted driver.
#include <gtest/gtest.h>

#include <cerrno>
#include <set>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "actors/job/job_core.h"
#include "actors/job/job_state.h"

using namespace blockd;
using job::status;
using job::verb;

namespace {

const status all_states[] = {status::undefined, status::created, status::running, status::paused,
                             status::ready,     status::standby, status::waiting, status::pending,
                             status::aborting,  status::concluded, status::null};
const verb all_verbs[] = {verb::cancel,   verb::pause,   verb::resume,   verb::set_speed,
                          verb::complete, verb::dismiss, verb::finalize, verb::change};

// ---- tables ---------------------------------------------------------------------------------

TEST(JobTables, NamesAreQapisAndRoundTrip) {
  std::vector<std::string> names;
  for (auto s : all_states) names.push_back(job::name(s));
  EXPECT_EQ((std::vector<std::string>{"undefined", "created", "running", "paused", "ready", "standby", "waiting",
                                      "pending", "aborting", "concluded", "null"}),
            names);
  for (auto s : all_states) EXPECT_EQ(s, job::parse_status(job::name(s)));
  names.clear();
  for (auto v : all_verbs) names.push_back(job::name(v));
  EXPECT_EQ((std::vector<std::string>{"cancel", "pause", "resume", "set-speed", "complete", "dismiss", "finalize",
                                      "change"}),
            names);
  for (auto v : all_verbs) EXPECT_EQ(v, job::parse_verb(job::name(v)));
  EXPECT_EQ("snapshot-delete", std::string(job::name(job::type::snapshot_delete)));
  EXPECT_EQ(job::type::create, job::parse_type("create"));
  EXPECT_FALSE(job::parse_status("Running"));
  EXPECT_FALSE(job::parse_verb("set_speed"));
}

// Every cell of JobSTT: the allowed transitions are exactly these (job.c, 7.2 and 10.2 alike).
TEST(JobTables, TransitionTableIsQemusCellByCell) {
  std::set<std::pair<status, status>> allowed = {
      {status::undefined, status::created}, {status::created, status::running},  {status::created, status::aborting},
      {status::created, status::null},      {status::running, status::paused},   {status::running, status::ready},
      {status::running, status::waiting},   {status::running, status::aborting}, {status::paused, status::running},
      {status::ready, status::standby},     {status::ready, status::waiting},    {status::ready, status::aborting},
      {status::standby, status::ready},     {status::waiting, status::pending},  {status::waiting, status::aborting},
      {status::pending, status::aborting},  {status::pending, status::concluded}, {status::aborting, status::aborting},
      {status::aborting, status::concluded}, {status::concluded, status::null}};
  int cells = 0;
  for (auto from : all_states)
    for (auto to : all_states) {
      EXPECT_EQ(allowed.count({from, to}) == 1, job::transition_allowed(from, to))
          << job::name(from) << " -> " << job::name(to);
      ++cells;
    }
  EXPECT_EQ(121, cells);
}

// Every cell of JobVerbTable, and the refusal text QSD sends (T76, T78, T82).
TEST(JobTables, VerbTableIsQemusCellByCell) {
  std::set<std::pair<verb, status>> allowed;
  for (auto s : {status::created, status::running, status::paused, status::ready, status::standby}) {
    for (auto v : {verb::cancel, verb::pause, verb::resume, verb::set_speed, verb::change}) allowed.insert({v, s});
  }
  allowed.insert({verb::cancel, status::waiting});
  allowed.insert({verb::cancel, status::pending});
  allowed.insert({verb::complete, status::ready});
  allowed.insert({verb::complete, status::standby});
  allowed.insert({verb::finalize, status::pending});
  allowed.insert({verb::dismiss, status::concluded});
  for (auto v : all_verbs)
    for (auto s : all_states) {
      bool want = allowed.count({v, s}) == 1;
      EXPECT_EQ(want, job::verb_allowed(v, s)) << job::name(v) << " in " << job::name(s);
      auto r = job::apply_verb("j1", s, v);
      EXPECT_EQ(want, r.has_value());
      if (!want) {
        EXPECT_EQ(std::string("Job 'j1' in state '") + job::name(s) + "' cannot accept command verb '" + job::name(v) +
                      "'",
                  r.error().desc);
      }
    }
}

TEST(JobTables, CompletedMeansTheWorkIsOver) {
  std::set<status> done = {status::waiting, status::pending, status::aborting, status::concluded, status::null};
  for (auto s : all_states) EXPECT_EQ(done.count(s) == 1, job::is_completed(s)) << job::name(s);
}

// ---- lifecycle --------------------------------------------------------------------------------

// A driver whose body the test finishes by hand; it logs every hook next to the status events.
struct scripted : job::driver {
  std::vector<std::string>& log;
  bool completable = false;
  bool soft_cancel = false;  // cancel() turns a soft cancel into "not forced" (a READY mirror)
  bool fail_prepare = false;
  bool finish_in_run = false;
  int run_rc = 0;
  explicit scripted(std::vector<std::string>& l) : log(l) {}
  void run(job::core& j) override {
    log.push_back("run");
    if (finish_in_run) j.work_done(run_rc, run_rc ? "boom" : "");
  }
  bool cancel(job::core&, bool force) override {
    log.push_back(force ? "cancel(force)" : "cancel(soft)");
    return soft_cancel ? force : true;
  }
  void enter(job::core&) override { log.push_back("enter"); }
  void pause(job::core&) override { log.push_back("pause"); }
  void resume(job::core&) override { log.push_back("resume"); }
  void user_resume(job::core&) override { log.push_back("user_resume"); }
  bool can_complete() const override { return completable; }
  result<void> complete(job::core&) override {
    log.push_back("complete");
    return {};
  }
  result<void> prepare(job::core&) override {
    log.push_back("prepare");
    if (fail_prepare) return fail("prepare failed");
    return {};
  }
  void commit(job::core&) override { log.push_back("commit"); }
  void abort(job::core&) override { log.push_back("abort"); }
  void clean(job::core&) override { log.push_back("clean"); }
  void on_ready(job::core&) override { log.push_back("READY"); }
  void on_pending(job::core&) override { log.push_back("PENDING"); }
  void on_completed(job::core&) override { log.push_back("COMPLETED"); }
  void on_cancelled(job::core&) override { log.push_back("CANCELLED"); }
};

struct tracked {
  std::vector<std::string> log;
  scripted d{log};
  job::core j;
  // Status events go to `events` when given (a transaction's members share one), else to `log`.
  explicit tracked(std::string id = "j1", bool auto_finalize = true, bool auto_dismiss = true,
                   job::type t = job::type::backup, std::vector<std::string>* events = nullptr)
      : j(job::options{std::move(id), t, auto_finalize, auto_dismiss}, d, [this, events](job::core& c, status s) {
          (events ? *events : log).push_back(c.id() + ":" + job::name(s));
        }) {}
  std::vector<std::string> take() { return std::exchange(log, {}); }
};

using lines = std::vector<std::string>;

TEST(JobCore, SuccessWithAutoFinalizeAndDismissFollowsT77) {
  tracked t;
  t.j.create();
  t.j.start();
  EXPECT_EQ((lines{"j1:created", "j1:running", "run"}), t.take());
  EXPECT_TRUE(t.j.started());
  t.j.work_done(0);
  EXPECT_EQ((lines{"j1:waiting", "j1:pending", "prepare", "commit", "clean", "COMPLETED", "j1:concluded", "j1:null"}),
            t.take());
  EXPECT_FALSE(t.j.failed());
  EXPECT_EQ("", t.j.error_text());
}

TEST(JobCore, CreateJobWaitsForDismissAndRefusesOtherVerbsT75T76) {
  tracked t("c1", true, false, job::type::create);
  t.j.create();
  t.j.start();
  t.j.work_done(0);
  EXPECT_EQ(status::concluded, t.j.state());
  t.take();
  for (auto v : {verb::pause, verb::cancel, verb::complete, verb::finalize}) {
    result<void> r;
    if (v == verb::pause) r = t.j.user_pause();
    if (v == verb::cancel) r = t.j.user_cancel(true);
    if (v == verb::complete) r = t.j.user_complete();
    if (v == verb::finalize) r = t.j.user_finalize();
    ASSERT_FALSE(r);
    EXPECT_EQ(std::string("Job 'c1' in state 'concluded' cannot accept command verb '") + job::name(v) + "'",
              r.error().desc);
  }
  // resume checks "was it paused" before the verb table.
  EXPECT_EQ("Can't resume a job that was not paused", t.j.user_resume().error().desc);
  EXPECT_TRUE(t.take().empty());
  ASSERT_TRUE(t.j.user_dismiss());
  EXPECT_EQ((lines{"c1:null"}), t.take());
}

TEST(JobCore, FailureGoesAbortingThenConcludedWithTheBodysText) {
  tracked t("c3", true, false, job::type::create);
  t.j.create();
  t.j.start();
  t.take();
  t.j.work_done(-ENOENT, "Could not create '/nonexistent/dir/x.img': No such file or directory");
  EXPECT_EQ((lines{"c3:aborting", "abort", "clean", "COMPLETED", "c3:concluded"}), t.take());
  EXPECT_TRUE(t.j.failed());
  EXPECT_EQ("Could not create '/nonexistent/dir/x.img': No such file or directory", t.j.error_text());
}

TEST(JobCore, FailureWithoutTextGetsStrerror) {
  tracked t;
  t.j.create();
  t.j.start();
  t.j.work_done(-EIO);
  EXPECT_EQ("Input/output error", t.j.error_text());
}

TEST(JobCore, CancelWhileRunningWaitsForTheBodyThenReportsOperationCanceled) {
  tracked t("c1", true, false, job::type::create);
  t.j.create();
  t.j.start();
  t.take();
  ASSERT_TRUE(t.j.user_cancel(true));
  EXPECT_EQ((lines{"cancel(force)", "enter"}), t.take());
  EXPECT_EQ(status::running, t.j.state());  // QSD too: the create job stays running until it returns
  EXPECT_TRUE(t.j.is_cancelled());
  t.j.work_done(0);  // the body did not notice; the cancel still wins
  EXPECT_EQ((lines{"c1:aborting", "abort", "clean", "CANCELLED", "c1:concluded"}), t.take());
  EXPECT_EQ("Operation canceled", t.j.error_text());
}

TEST(JobCore, CancelledBodyKeepsItsOwnErrorText) {
  tracked t;
  t.j.create();
  t.j.start();
  t.j.user_cancel(true);
  t.j.work_done(-EIO, "Could not write zeros for preallocation: No space left on device");
  EXPECT_EQ("Could not write zeros for preallocation: No space left on device", t.j.error_text());
}

TEST(JobCore, UserPauseOfARunningBodyIsCountedUntilItsPausePoint) {
  tracked t;
  t.j.create();
  t.j.start();
  t.take();
  ASSERT_TRUE(t.j.user_pause());
  EXPECT_EQ((lines{"enter"}), t.take());  // no event: the body has not reached a pause point
  EXPECT_EQ("Job is already paused", t.j.user_pause().error().desc);
  int continued = 0;
  EXPECT_TRUE(t.j.pause_point([&] { ++continued; }));
  EXPECT_EQ((lines{"pause", "j1:paused"}), t.take());
  EXPECT_TRUE(t.j.paused());
  ASSERT_TRUE(t.j.user_resume());
  EXPECT_EQ((lines{"user_resume", "j1:running", "resume"}), t.take());
  EXPECT_EQ(1, continued);
  EXPECT_EQ("Can't resume a job that was not paused", t.j.user_resume().error().desc);
  EXPECT_FALSE(t.j.pause_point([&] { ++continued; }));  // nothing asks for a pause any more
}

TEST(JobCore, ResumeBeforeThePausePointLeavesNoTrace) {
  tracked t;
  t.j.create();
  t.j.start();
  ASSERT_TRUE(t.j.user_pause());
  ASSERT_TRUE(t.j.user_resume());
  t.take();
  EXPECT_FALSE(t.j.pause_point([] {}));
  EXPECT_TRUE(t.take().empty());
}

TEST(JobCore, PauseWhileCreatedPausesAtTheFirstPausePoint) {
  tracked t;
  t.j.create();
  ASSERT_TRUE(t.j.user_pause());  // allowed in created
  t.j.start();
  EXPECT_EQ((lines{"j1:created", "j1:running", "pause", "j1:paused"}), t.take());
  ASSERT_TRUE(t.j.user_resume());
  EXPECT_EQ((lines{"user_resume", "j1:running", "resume", "run"}), t.take());
}

TEST(JobCore, ReadyJobPausesToStandbyAndCompletes) {
  tracked t("m4");
  t.d.completable = true;
  t.j.create();
  t.j.start();
  t.j.transition_to_ready();
  EXPECT_EQ((lines{"m4:created", "m4:running", "run", "m4:ready", "READY"}), t.take());
  ASSERT_TRUE(t.j.user_pause());
  EXPECT_TRUE(t.j.pause_point([] {}));
  EXPECT_EQ((lines{"enter", "pause", "m4:standby"}), t.take());
  EXPECT_EQ("Job is already paused", t.j.user_pause().error().desc);
  ASSERT_TRUE(t.j.user_complete());  // complete is allowed in standby
  ASSERT_TRUE(t.j.user_resume());
  EXPECT_EQ((lines{"complete", "user_resume", "m4:ready", "resume"}), t.take());
  EXPECT_EQ("Job 'm4' in state 'ready' cannot accept command verb 'dismiss'", t.j.user_dismiss().error().desc);
  t.j.work_done(0);
  EXPECT_EQ((lines{"m4:waiting", "m4:pending", "prepare", "commit", "clean", "COMPLETED", "m4:concluded", "m4:null"}),
            t.take());
}

TEST(JobCore, CompleteNeedsAJobThatCanBeCompleted) {
  tracked t("b1");
  t.j.create();
  t.j.start();
  EXPECT_EQ("Job 'b1' in state 'running' cannot accept command verb 'complete'", t.j.user_complete().error().desc);
  t.j.transition_to_ready();
  EXPECT_EQ("The active block job 'b1' cannot be completed", t.j.user_complete().error().desc);
}

TEST(JobCore, CancelledReadyJobCannotBeCompleted) {
  tracked t("m2");
  t.d.completable = true;
  t.d.soft_cancel = true;
  t.j.create();
  t.j.start();
  t.j.transition_to_ready();
  t.take();
  ASSERT_TRUE(t.j.user_cancel(false));  // soft: the driver keeps it unforced (mirror completes without pivot)
  EXPECT_TRUE(t.j.cancel_requested());
  EXPECT_FALSE(t.j.is_cancelled());
  EXPECT_EQ("The active block job 'm2' cannot be completed", t.j.user_complete().error().desc);
  t.j.work_done(0);
  EXPECT_EQ((lines{"cancel(soft)", "enter", "m2:waiting", "m2:pending", "prepare", "commit", "clean", "COMPLETED",
                   "m2:concluded", "m2:null"}),
            t.take());  // T80: a soft cancel of a READY mirror is a success
}

TEST(JobCore, ManualFinalizeWaitsInPendingT78) {
  tracked t("b2", false, false);
  t.j.create();
  t.j.start();
  t.j.work_done(0);
  EXPECT_EQ((lines{"b2:created", "b2:running", "run", "b2:waiting", "b2:pending", "PENDING"}), t.take());
  EXPECT_EQ("Job 'b2' in state 'pending' cannot accept command verb 'dismiss'", t.j.user_dismiss().error().desc);
  ASSERT_TRUE(t.j.user_finalize());
  EXPECT_EQ((lines{"prepare", "commit", "clean", "COMPLETED", "b2:concluded"}), t.take());
  ASSERT_TRUE(t.j.user_dismiss());
  EXPECT_EQ((lines{"b2:null"}), t.take());
}

TEST(JobCore, CancelInPendingAborts) {
  tracked t("b2", false, true);
  t.j.create();
  t.j.start();
  t.j.work_done(0);
  t.take();
  ASSERT_TRUE(t.j.user_cancel(true));
  EXPECT_EQ((lines{"cancel(force)", "b2:aborting", "abort", "clean", "CANCELLED", "b2:concluded", "b2:null"}),
            t.take());
}

TEST(JobCore, PrepareFailureTakesTheAbortPath) {
  tracked t;
  t.d.fail_prepare = true;
  t.j.create();
  t.j.start();
  t.take();
  t.j.work_done(0);
  EXPECT_EQ((lines{"j1:waiting", "j1:pending", "prepare", "j1:aborting", "abort", "clean", "COMPLETED",
                   "j1:concluded", "j1:null"}),
            t.take());
  EXPECT_EQ("prepare failed", t.j.error_text());
}

TEST(JobCore, CancelBeforeStartEndsWithoutNotifiers) {
  tracked t;
  t.j.create();
  t.take();
  t.j.cancel(true);
  EXPECT_EQ((lines{"cancel(force)", "j1:aborting", "abort", "clean", "j1:concluded", "j1:null"}), t.take());
}

TEST(JobCore, EarlyFailGoesCreatedToNull) {
  tracked t;
  t.j.create();
  t.j.early_fail();
  EXPECT_EQ((lines{"j1:created", "j1:null"}), t.take());
}

TEST(JobCore, CancelOfAUserPausedJobResumesIt) {
  tracked t;
  t.j.create();
  t.j.start();
  ASSERT_TRUE(t.j.user_pause());
  EXPECT_TRUE(t.j.pause_point([&] { t.log.push_back("continued"); }));
  t.take();
  ASSERT_TRUE(t.j.user_cancel(true));
  EXPECT_FALSE(t.j.user_paused());
  EXPECT_EQ(0, t.j.pause_count());
  EXPECT_EQ((lines{"cancel(force)", "user_resume", "j1:running", "resume", "continued"}), t.take());
  EXPECT_FALSE(t.j.pause_point([] {}));  // a cancelled job does not pause again
}

TEST(JobCore, InternalCancelOfAConcludedJobDismissesIt) {
  tracked t("c1", true, false);
  t.j.create();
  t.j.start();
  t.j.work_done(0);
  t.take();
  t.j.cancel(true);  // QEMU's job_cancel_sync_all at shutdown; over QMP the verb table refuses it
  EXPECT_EQ((lines{"c1:null"}), t.take());
}

TEST(JobCore, BodyFinishingInsideRunEmitsEverythingBeforeStartReturns) {
  tracked t("a1", true, false, job::type::amend);
  t.d.finish_in_run = true;
  t.j.create();
  t.j.start();
  EXPECT_EQ((lines{"a1:created", "a1:running", "run", "a1:waiting", "a1:pending", "prepare", "commit", "clean",
                   "COMPLETED", "a1:concluded"}),
            t.take());
}

TEST(JobCore, InternalPausesNestWithTheUsersPause) {
  tracked t;
  t.j.create();
  t.j.start();
  t.j.pause();  // a drain
  ASSERT_TRUE(t.j.user_pause());
  EXPECT_EQ(2, t.j.pause_count());
  EXPECT_TRUE(t.j.pause_point([] {}));
  t.j.resume();  // the drain ends; the user's pause holds
  EXPECT_EQ(status::paused, t.j.state());
  ASSERT_TRUE(t.j.user_resume());
  EXPECT_EQ(status::running, t.j.state());
}

TEST(JobCore, InternalJobsEmitNothing) {
  tracked t("");
  t.j.create();
  t.j.start();
  t.j.work_done(0);
  EXPECT_EQ((lines{"run", "prepare", "commit", "clean", "COMPLETED"}), t.take());
  EXPECT_EQ(status::null, t.j.state());
}

TEST(JobCore, ProgressMovesCurrentAndTotalAsQemusMeter) {
  tracked t;
  EXPECT_EQ(0, t.j.current_progress());
  EXPECT_EQ(0, t.j.total_progress());
  t.j.progress_set_remaining(1);
  EXPECT_EQ(1, t.j.total_progress());
  t.j.progress_update(1);
  EXPECT_EQ(1, t.j.current_progress());
  EXPECT_EQ(1, t.j.total_progress());
  t.j.progress_increase_remaining(10);
  t.j.progress_update(4);
  EXPECT_EQ(5, t.j.current_progress());
  EXPECT_EQ(11, t.j.total_progress());
}

TEST(JobCore, ImpossibleTransitionsAreBugsNotSilence) {
  tracked t;
  t.j.create();
  t.j.start();
  t.j.work_done(0);
  EXPECT_THROW(t.j.work_done(0), std::logic_error);
  tracked u;
  u.j.create();
  EXPECT_THROW(u.j.transition_to_ready(), std::logic_error);  // created -> ready is not in JobSTT
}

// ---- transactions -----------------------------------------------------------------------------

struct pair_in_txn {
  std::vector<std::string> events;
  tracked a, b;
  explicit pair_in_txn(bool auto_finalize = true)
      : a("j1", auto_finalize, true, job::type::backup, &events), b("j2", auto_finalize, true, job::type::backup, &events) {
    auto t = job::txn::make();
    job::txn::join(a.j, t);
    job::txn::join(b.j, t);
    a.j.create();
    b.j.create();
    a.j.start();
    b.j.start();
    events.clear();
  }
};

TEST(JobTxn, GroupedSuccessConvergesThenFinalizesEveryMemberT96) {
  pair_in_txn p;
  p.b.j.work_done(0);
  EXPECT_EQ((lines{"j2:waiting"}), p.events);
  p.a.j.work_done(0);
  EXPECT_EQ((lines{"j2:waiting", "j1:waiting", "j1:pending", "j2:pending", "j1:concluded", "j1:null", "j2:concluded",
                   "j2:null"}),
            p.events);
}

TEST(JobTxn, GroupedManualFinalizeFinalizesTheWholeTransaction) {
  pair_in_txn p(false);
  p.a.j.work_done(0);
  p.b.j.work_done(0);
  EXPECT_EQ((lines{"j1:waiting", "j2:waiting", "j1:pending", "j2:pending"}), p.events);
  EXPECT_EQ((lines{"run", "PENDING"}), p.a.take());
  p.events.clear();
  ASSERT_TRUE(p.b.j.user_finalize());
  EXPECT_EQ((lines{"j1:concluded", "j1:null", "j2:concluded", "j2:null"}), p.events);
}

TEST(JobTxn, OneFailureCancelsThePeersWhichReportCancelled) {
  pair_in_txn p;
  p.a.take();
  p.b.take();
  p.a.j.work_done(-EIO, "read error");
  // j1 is finalized at once; j2 was force-cancelled and the abort waits for its body.
  EXPECT_EQ((lines{"j1:aborting", "j1:concluded", "j1:null"}), p.events);
  EXPECT_EQ((lines{"cancel(force)", "enter"}), p.b.take());
  EXPECT_EQ((lines{"abort", "clean", "COMPLETED"}), p.a.take());
  EXPECT_EQ(status::running, p.b.j.state());
  p.b.j.work_done(0);
  EXPECT_EQ((lines{"j1:aborting", "j1:concluded", "j1:null", "j2:aborting", "j2:concluded", "j2:null"}), p.events);
  EXPECT_EQ((lines{"abort", "clean", "CANCELLED"}), p.b.take());
  EXPECT_EQ("Operation canceled", p.b.j.error_text());
}

TEST(JobTxn, MembersJoinThroughTheirOptions) {
  auto group = job::txn::make();
  std::vector<std::string> events;
  std::vector<std::string> la, lb;
  scripted da(la), db(lb);
  auto log = [&](job::core& c, status s) { events.push_back(c.id() + ":" + job::name(s)); };
  job::core a(job::options{"j1", job::type::backup, true, true, group}, da, log);
  job::core b(job::options{"j2", job::type::backup, true, true, group}, db, log);
  EXPECT_EQ(2u, group->jobs().size());
  for (auto* j : {&a, &b}) {
    j->create();
    j->start();
  }
  events.clear();
  a.work_done(0);
  EXPECT_EQ((lines{"j1:waiting"}), events);
  b.work_done(0);
  EXPECT_EQ(status::null, a.state());
  EXPECT_EQ(status::null, b.state());
  EXPECT_TRUE(group->jobs().empty());
}

TEST(JobTxn, FailureOfTheLastMemberAbortsAWaitingPeer) {
  pair_in_txn p;
  p.a.j.work_done(0);
  p.b.j.work_done(-EIO, "write error");
  EXPECT_EQ((lines{"j1:waiting", "j2:aborting", "j1:aborting", "j1:concluded", "j1:null", "j2:concluded", "j2:null"}),
            p.events);
  EXPECT_EQ("Operation canceled", p.a.j.error_text());
  EXPECT_EQ("write error", p.b.j.error_text());
}

}  // namespace

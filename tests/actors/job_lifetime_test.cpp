// Actor-tier tests that jobs leave nothing behind: after blockdev-create and x-blockdev-amend jobs are dismissed, every job actor and runner is destroyed (live counters back to where they were) and the heap in use does not grow with the number of jobs; test thread.
#include <caf/all.hpp>
#include <gtest/gtest.h>
#include <malloc.h>

#include <chrono>
#include <cstdlib>
#include <string>
#include <thread>

#include "actors/job/job_actor.h"
#include "actors/runtime/pinned.h"
#include "actors/supervisor/supervisor.h"
#include "tests/actors/supervisor_harness.h"

using namespace blockd;

namespace {

struct job_lifetime : ::testing::Test {
  caf::actor_system_config cfg;
  std::unique_ptr<caf::actor_system> sys;
  std::unique_ptr<iothread> main_io;
  caf::actor sup;
  std::unique_ptr<caf::scoped_actor> events;  // subscribed to the bus: JOB_STATUS_CHANGE arrives here
  std::string dir;

  void SetUp() override {
    cfg.set("scheduler.max-threads", size_t(1));
    sys = std::make_unique<caf::actor_system>(cfg);
    main_io = std::make_unique<iothread>(*sys, "main", iothread_params{});
    sup = spawn_pinned<supervisor_actor>(*sys, *main_io, supervisor_hooks{});
    events = std::make_unique<caf::scoped_actor>(*sys);
    (*events)->send(sup, subscribe_atom::value, caf::actor_cast<caf::actor>(*events));
    char tmpl[] = "/dev/shm/blockd-joblife-XXXXXX";
    dir = mkdtemp(tmpl);
  }
  void TearDown() override {
    (*events)->send(sup, unsubscribe_atom::value, caf::actor_cast<caf::actor>(*events));
    events.reset();
    test::stop_supervisor(*sys, sup);
    main_io.reset();
    sys.reset();
    std::string cmd = "rm -rf " + dir;
    EXPECT_EQ(0, system(cmd.c_str()));
  }

  command_outcome cmd(const std::string& name, boost::json::object args) {
    return test::sup_command(*sys, sup, name, std::move(args));
  }

  // Waits for the job's concluded event (other events are skipped).
  void wait_concluded(const std::string& id) {
    bool seen = false;
    auto end = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (!seen && std::chrono::steady_clock::now() < end)
      (*events)->receive(
          [&](event_atom, const qmp_event& ev) {
            if (ev.name == "JOB_STATUS_CHANGE" && ev.data.at("id").as_string() == id &&
                ev.data.at("status").as_string() == "concluded")
              seen = true;
          },
          caf::after(std::chrono::seconds(10)) >> [] {});
    ASSERT_TRUE(seen) << "job " << id << " did not conclude";
  }

  void run_job(const std::string& command, boost::json::object args) {
    std::string id(args.at("job-id").as_string());
    auto out = cmd(command, args);
    ASSERT_TRUE(out.ok) << out.err.desc;
    wait_concluded(id);
    out = cmd("job-dismiss", {{"id", id}});
    ASSERT_TRUE(out.ok) << out.err.desc;
  }

  // A job actor is destroyed once the last handle to it is gone, which may be a moment after the
  // dismiss answered (a message still queued somewhere): the counts are awaited, with a deadline.
  static bool back_to(long actors, long runners) {
    auto end = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    while (std::chrono::steady_clock::now() < end) {
      if (job_actor::live_actors() == actors && job_actor::live_runners() == runners) return true;
      std::this_thread::yield();
    }
    return false;
  }

  // One cycle: a worker-thread job without nodes, one that holds a node, and a one-step amend job.
  void cycle() {
    std::string img = dir + "/a.qcow2";
    run_job("blockdev-create", {{"job-id", "c"}, {"options", {{"driver", "file"}, {"filename", img}, {"size", 0}}}});
    ASSERT_TRUE(cmd("blockdev-add", {{"driver", "file"}, {"filename", img}, {"node-name", "f"}}).ok);
    run_job("blockdev-create",
            {{"job-id", "q"}, {"options", {{"driver", "qcow2"}, {"file", "f"}, {"size", 1 << 20}}}});
    ASSERT_TRUE(cmd("blockdev-add", {{"driver", "qcow2"}, {"file", "f"}, {"node-name", "q0"}}).ok);
    run_job("x-blockdev-amend", {{"job-id", "a"}, {"node-name", "q0"}, {"options", {{"driver", "qcow2"}}}});
    ASSERT_TRUE(cmd("blockdev-del", {{"node-name", "q0"}}).ok);
    ASSERT_TRUE(cmd("blockdev-del", {{"node-name", "f"}}).ok);
    // The events after each concluded (pending, null) would pile up in this test's own mailbox.
    for (bool more = true; more;)
      (*events)->receive([](event_atom, const qmp_event&) {}, caf::after(std::chrono::seconds(0)) >> [&] { more = false; });
  }
};

TEST_F(job_lifetime, dismissed_jobs_destroy_their_actor_and_runner) {
  long actors = job_actor::live_actors(), runners = job_actor::live_runners();
  for (int i = 0; i < 10; ++i) {
    cycle();
    if (HasFatalFailure()) return;
  }
  EXPECT_TRUE(back_to(actors, runners)) << "job actors alive: " << job_actor::live_actors() << " (before: " << actors
                                        << "), runners alive: " << job_actor::live_runners() << " (before: " << runners
                                        << ")";
}

// What a destroyed actor may still hold: CAF frees an actor's memory only when its last weak handle
// goes (a monitor left on the supervisor was one, ~1.4 KiB per job). The heap in use, counted in
// bytes (no page rounding), must not grow with the number of jobs.
TEST_F(job_lifetime, the_heap_does_not_grow_with_the_number_of_jobs) {
  for (int i = 0; i < 20; ++i) {
    cycle();
    if (HasFatalFailure()) return;
  }
  ASSERT_TRUE(back_to(0, 0));
  size_t before = mallinfo2().uordblks;
  constexpr int n = 100;  // 300 jobs
  for (int i = 0; i < n; ++i) {
    cycle();
    if (HasFatalFailure()) return;
  }
  ASSERT_TRUE(back_to(0, 0));
  size_t after = mallinfo2().uordblks;
  long grown = long(after) - long(before);
  // The leaks seen kept 1.4-2.2 KiB a job (400-650 KiB here); what else moves the count (caches and
  // queues of the runtime, a container's capacity doubling) stayed under 30 KiB in repeated runs.
  EXPECT_LT(grown, 128 * 1024) << "heap in use grew by " << grown << " bytes over " << 3 * n << " jobs";
}

}  // namespace

// Actor-tier tests of the node actor: requests by pointer on the home iothread, quiescing from another iothread.
#include <caf/all.hpp>
#include <gtest/gtest.h>

#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <future>
#include <vector>

#include "actors/node/node_actor.h"
#include "actors/runtime/pinned.h"
#include "tests/actors/reader_actor.h"
#include "storage/block/driver.h"

using namespace blockd;

namespace {

struct node_fixture : ::testing::Test {
  caf::actor_system_config cfg;
  std::unique_ptr<caf::actor_system> sys;
  std::unique_ptr<iothread> a, b;
  std::unique_ptr<block::node> n;
  void SetUp() override {
    cfg.set("scheduler.max-threads", size_t(1));
    sys = std::make_unique<caf::actor_system>(cfg);
    a = std::make_unique<iothread>(*sys, "a", iothread_params{});
    b = std::make_unique<iothread>(*sys, "b", iothread_params{});
    block::register_builtin_drivers();
    // A null node with latency, so requests really are in flight while the test quiesces.
    boost::json::object opts{{"size", 1 << 20}, {"latency-ns", 2000000}};
    block::driver_env env{&a->reactor(), [this](std::function<void()> fn) { a->post(std::move(fn)); }};
    block::open_args args{opts, {}, env};
    auto drv = block::find_driver("null-aio")->open(args);
    ASSERT_TRUE(drv.has_value());
    block::node_settings s;
    s.name = "n0";
    s.driver = "null-aio";
    n = std::make_unique<block::node>(s, std::move(*drv), env);
  }
  void TearDown() override {
    sys->await_all_actors_done();
    a.reset();  // joins the loop before the node goes
    b.reset();
    n.reset();
    sys.reset();
  }
};

TEST_F(node_fixture, RequestsByPointerCompleteOnTheHomeIothread) {
  auto na = spawn_pinned<node_actor>(*sys, *a, n.get());
  std::promise<bool> done;
  auto fut = done.get_future();
  auto reader = spawn_pinned<test::reader_actor>(*sys, *a, na, 64, &done);
  EXPECT_TRUE(fut.get());
  caf::anon_send_exit(reader, caf::exit_reason::user_shutdown);
  std::promise<uint64_t> ops;
  a->post([&] { ops.set_value(n->stats().rd.operations); });  // counters belong to the home thread
  EXPECT_EQ(64u, ops.get_future().get());
  caf::anon_send_exit(na, caf::exit_reason::user_shutdown);
}

TEST_F(node_fixture, QuiesceFromAnotherIothreadWaitsForInFlightRequests) {
  auto na = spawn_pinned<node_actor>(*sys, *a, n.get());
  std::promise<bool> done;
  auto fut = done.get_future();
  auto reader = spawn_pinned<test::reader_actor>(*sys, *a, na, 32, &done);
  // The scoped actor runs on this test thread, as a supervisor on another iothread would.
  caf::scoped_actor self{*sys};
  std::atomic<size_t> in_flight_at_drain{999};
  self->request(na, caf::infinite, quiesce_atom::value)
      .receive([&](bool) {
        std::promise<size_t> p;
        a->post([&] { p.set_value(n->in_driver()); });  // requests arriving now are held
        in_flight_at_drain = p.get_future().get();
      },
               [](const caf::error& e) { FAIL() << caf::to_string(e); });
  EXPECT_EQ(0u, in_flight_at_drain.load());
  // Control tasks run at the node's home and answer with their outcome.
  self->request(na, caf::infinite, run_atom::value, node_task{[this](block::node& x) {
                  return command_outcome::success(boost::json::value(a->is_current() && &x == n.get()));
                }})
      .receive([](const command_outcome& o) { EXPECT_EQ(boost::json::value(true), o.ret); },
               [](const caf::error& e) { FAIL() << caf::to_string(e); });
  self->send(na, resume_atom::value);
  EXPECT_TRUE(fut.get());
  self->send_exit(reader, caf::exit_reason::user_shutdown);
  self->send_exit(na, caf::exit_reason::user_shutdown);
}

// ---- node tasks -----------------------------------------------------------------------------

TEST_F(node_fixture, ATaskRunsOnTheNodesHomeThread) {
  auto na = spawn_pinned<node_actor>(*sys, *a, n.get());
  caf::scoped_actor self{*sys};
  int64_t ran_on = 0;
  self->request(na, caf::infinite, run_atom::value, node_task{[](block::node&) {
                  return command_outcome::success(boost::json::value(int64_t(::syscall(SYS_gettid))));
                }})
      .receive([&](const command_outcome& o) { ran_on = o.ret.as_int64(); },
               [](const caf::error& e) { FAIL() << caf::to_string(e); });
  EXPECT_EQ(a->thread_id(), ran_on);  // the node's home, not the sender's thread nor another loop
  EXPECT_NE(b->thread_id(), ran_on);
  EXPECT_NE(int64_t(::syscall(SYS_gettid)), ran_on);
  self->send_exit(na, caf::exit_reason::user_shutdown);
}

TEST_F(node_fixture, AFailingTasksErrorReachesTheReply) {
  auto na = spawn_pinned<node_actor>(*sys, *a, n.get());
  caf::scoped_actor self{*sys};
  self->request(na, caf::infinite, run_atom::value, node_task{[](block::node& x) {
                  return command_outcome::failure(error("node '" + x.name() + "' refused the change; try another size"));
                }})
      .receive(
          [](const command_outcome& o) {
            EXPECT_FALSE(o.ok);
            EXPECT_EQ("node 'n0' refused the change; try another size", o.err.desc);
          },
          [](const caf::error& e) { FAIL() << caf::to_string(e); });
  self->send_exit(na, caf::exit_reason::user_shutdown);
}

TEST_F(node_fixture, ATaskRunsAfterItsNodeWasPublishedAndSeesFreshFacts) {
  auto na = spawn_pinned<node_actor>(*sys, *a, n.get());
  caf::scoped_actor self{*sys};
  EXPECT_EQ(0, n->facts()->virtual_size);  // nothing published yet
  self->request(na, caf::infinite, run_atom::value, node_task{[](block::node&) { return command_outcome::success(); }})
      .receive([](const command_outcome& o) { EXPECT_TRUE(o.ok); }, [](const caf::error& e) { FAIL() << caf::to_string(e); });
  EXPECT_EQ(1 << 20, n->facts()->virtual_size);  // the home published after the task
  self->send_exit(na, caf::exit_reason::user_shutdown);
}

namespace {
struct promise_waiter final : block::io_waiter {
  std::promise<int> done;
  void io_done(block::io_request& r) override { done.set_value(r.result); }
};
}  // namespace

TEST_F(node_fixture, ANodeClosedWhileATaskIsQueuedAnswersInsteadOfCrashing) {
  auto na = spawn_pinned<node_actor>(*sys, *a, n.get());
  caf::scoped_actor self{*sys};
  // Hold the home loop so the messages below queue up behind each other.
  std::promise<void> release;
  auto held = release.get_future().share();
  a->post([held] { held.wait(); });
  // First in the queue: a task that closes the node (as the closer does with a deleted node).
  auto closed = self->request(na, caf::infinite, run_atom::value, node_task{[this](block::node&) {
    n.reset();
    return command_outcome::success();
  }});
  // Then a task, a request and a quiesce that all find the node gone.
  auto late = self->request(na, caf::infinite, run_atom::value, node_task{[](block::node&) {
    ADD_FAILURE() << "a task ran on a closed node";
    return command_outcome::success();
  }});
  promise_waiter w;
  auto result = w.done.get_future();
  block::io_request r;
  r.op = block::io_op::flush;
  r.waiter = &w;
  self->send(na, io_atom::value, io_request_ref{&r});
  auto quiesced = self->request(na, caf::infinite, quiesce_atom::value);
  release.set_value();
  closed.receive([](const command_outcome& o) { EXPECT_TRUE(o.ok); },
                 [](const caf::error& e) { FAIL() << caf::to_string(e); });
  late.receive(
      [](const command_outcome& o) {
        EXPECT_FALSE(o.ok);
        EXPECT_NE(std::string::npos, o.err.desc.find("node 'n0' was closed")) << o.err.desc;
      },
      [](const caf::error& e) { FAIL() << caf::to_string(e); });
  EXPECT_EQ(-ENODEV, result.get());
  quiesced.receive([](bool b) { EXPECT_TRUE(b); }, [](const caf::error& e) { FAIL() << caf::to_string(e); });
  EXPECT_EQ(nullptr, n.get());
  self->send_exit(na, caf::exit_reason::user_shutdown);
}

TEST_F(node_fixture, AHomeTaskRunsOnItsIothreadOnceAndStops) {
  auto t = spawn_pinned<home_task_actor>(*sys, *b);
  caf::scoped_actor self{*sys};
  bool on_b = false;
  self->request(t, caf::infinite, run_atom::value, home_task{[&] {
                  on_b = b->is_current();
                  return command_outcome::success();
                }})
      .receive([](const command_outcome& o) { EXPECT_TRUE(o.ok); }, [](const caf::error& e) { FAIL() << caf::to_string(e); });
  EXPECT_TRUE(on_b);
  // It quit after its one task: a second one is refused by CAF, not run.
  bool refused = false;
  self->request(t, std::chrono::seconds(5), run_atom::value, home_task{[] {
                  ADD_FAILURE() << "a second task ran";
                  return command_outcome::success();
                }})
      .receive([](const command_outcome&) {}, [&](const caf::error&) { refused = true; });
  EXPECT_TRUE(refused);
}

}  // namespace

// Actor-tier tests of the runtime: pinned actors stay on their home iothread; the loop services its reactor.
#include <caf/all.hpp>
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <future>
#include <thread>

#include "actors/messages.h"
#include "actors/runtime/iothread.h"
#include "actors/runtime/pinned.h"

using namespace blockd;

namespace {

using ping_atom = caf::atom_constant<caf::atom("ping")>;
using where_atom = caf::atom_constant<caf::atom("where")>;

struct runtime_fixture : ::testing::Test {
  caf::actor_system_config cfg;
  std::unique_ptr<caf::actor_system> sys;
  std::unique_ptr<iothread> a, b;
  void SetUp() override {
    cfg.set("scheduler.max-threads", size_t(1));
    sys = std::make_unique<caf::actor_system>(cfg);
    a = std::make_unique<iothread>(*sys, "a", iothread_params{});
    b = std::make_unique<iothread>(*sys, "b", iothread_params{});
  }
  void TearDown() override {
    sys->await_all_actors_done();
    a.reset();
    b.reset();
    sys.reset();
  }
};

// Answers with the id of the iothread it ran on, and checks every message arrives at home.
class echo_actor : public caf::event_based_actor {
 public:
  echo_actor(caf::actor_config& cfg, iothread* home) : caf::event_based_actor(cfg), home_(home) {}
  caf::behavior make_behavior() override {
    return {
        [this](where_atom) { return home_->is_current() ? home_->id() : std::string("elsewhere"); },
        [this](ping_atom, int n) { return home_->is_current() ? n + 1 : -1; },
    };
  }

 private:
  iothread* home_;
};

// Sends `count` requests to a peer, one after the other, checking it always runs at home.
class driver_actor : public caf::event_based_actor {
 public:
  driver_actor(caf::actor_config& cfg, iothread* home, caf::actor peer, int count, std::promise<int>* done)
      : caf::event_based_actor(cfg), home_(home), peer_(std::move(peer)), left_(count), done_(done) {}
  caf::behavior make_behavior() override {
    step();
    return {[](int) {}};
  }

 private:
  void step() {
    request(peer_, caf::infinite, ping_atom::value, left_).then([this](int r) {
      if (!home_->is_current() || r != left_ + 1) {
        done_->set_value(-1);
        quit();
        return;
      }
      if (--left_ == 0) {
        done_->set_value(0);
        quit();
      } else {
        step();
      }
    });
  }
  iothread* home_;
  caf::actor peer_;
  int left_;
  std::promise<int>* done_;
};

TEST_F(runtime_fixture, PinnedActorRunsOnItsHomeIothread) {
  auto e = spawn_pinned<echo_actor>(*sys, *b);
  caf::scoped_actor self{*sys};
  self->request(e, caf::infinite, where_atom::value)
      .receive([](const std::string& where) { EXPECT_EQ("b", where); },
               [](const caf::error& err) { FAIL() << caf::to_string(err); });
  self->send_exit(e, caf::exit_reason::user_shutdown);
}

TEST_F(runtime_fixture, SameThreadRequestResponseStaysHome) {
  auto e = spawn_pinned<echo_actor>(*sys, *a);
  std::promise<int> done;
  auto fut = done.get_future();
  spawn_pinned<driver_actor>(*sys, *a, e, 1000, &done);
  EXPECT_EQ(0, fut.get());
  caf::anon_send_exit(e, caf::exit_reason::user_shutdown);
}

TEST_F(runtime_fixture, CrossThreadRequestsReturnHome) {
  auto e = spawn_pinned<echo_actor>(*sys, *b);
  std::promise<int> done;
  auto fut = done.get_future();
  spawn_pinned<driver_actor>(*sys, *a, e, 200, &done);
  EXPECT_EQ(0, fut.get());
  caf::anon_send_exit(e, caf::exit_reason::user_shutdown);
}

TEST_F(runtime_fixture, PostedFunctionsRunOnTheLoopInOrder) {
  std::promise<std::string> p;
  auto f = p.get_future();
  auto order = std::make_shared<std::string>();
  for (char c : std::string("abc"))
    a->post([this, c, order] { *order += a->is_current() ? c : '?'; });
  a->post([order, &p] { p.set_value(*order); });
  EXPECT_EQ("abc", f.get());
}

struct flag_completion final : io::completion {
  std::promise<int>* p;
  void complete(int res) override { p->set_value(res); }
};

TEST_F(runtime_fixture, ReactorOperationsCompleteOnTheLoop) {
  int sv[2];
  ASSERT_EQ(0, ::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv));
  std::promise<int> p;
  auto f = p.get_future();
  flag_completion c;
  c.p = &p;
  char buf[8];
  a->post([&] { a->reactor().recv(sv[0], buf, sizeof buf, &c); });
  ASSERT_EQ(3, ::write(sv[1], "abc", 3));
  EXPECT_EQ(3, f.get());
  ::close(sv[0]);
  ::close(sv[1]);
}

}  // namespace

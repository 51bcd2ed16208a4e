// Tests of the throttle filter on real loops: queued requests, quiesce while they wait, new limits, and one group shared by nodes on two threads; test threads.
#include <gtest/gtest.h>

#include <atomic>
#include <mutex>
#include <thread>
#include <vector>

#include "config/objects/throttle_group.h"
#include "storage/block/driver.h"
#include "storage/block/local_loop.h"
#include "storage/block/node.h"
#include "storage/io/reactor.h"

namespace blockd::block {
namespace {

using qom::throttle_bucket;

// A loop other threads may post to (an iothread's shape, without sleeping: it spins for the test).
struct shared_loop {
  std::unique_ptr<io::reactor> reactor = io::reactor::create(64, nullptr);
  std::mutex mu;
  std::vector<std::function<void()>> posted;
  std::thread::id owner = std::this_thread::get_id();
  driver_env env() {
    return {reactor.get(),
            [this](std::function<void()> fn) {
              std::lock_guard g(mu);
              posted.push_back(std::move(fn));
            },
            [this] { return std::this_thread::get_id() == owner; }};
  }
  void turn() {
    std::vector<std::function<void()>> batch;
    {
      std::lock_guard g(mu);
      batch.swap(posted);
    }
    for (auto& fn : batch) fn();
    reactor->run_once(false);
  }
};

struct counter final : io_waiter {
  int done = 0;
  void io_done(io_request&) override { ++done; }
};

// A throttle node over a null-co node, both on `loop`.
struct throttled {
  std::vector<std::unique_ptr<node>> nodes;
  node* top() { return nodes.back().get(); }
  throttled(driver_env env, std::shared_ptr<qom::throttle_state> st) {
    auto objs = std::make_shared<object_refs>();
    objs->by_id["tg"].throttle = std::move(st);
    boost::json::object nopts{{"size", 1 << 30}};
    open_args na{nopts, {}, env};
    nodes.push_back(std::make_unique<node>(node_settings{.name = "null", .driver = "null-co"},
                                           std::move(*find_driver("null-co")->open(na)), env));
    boost::json::object topts{{"throttle-group", "tg"}};
    open_args ta{topts, {}, env};
    ta.objects = objs;
    ta.set_child("file", nodes[0].get());
    auto d = find_driver("throttle")->open(ta);
    EXPECT_TRUE(d.has_value()) << (d ? "" : d.error().desc);
    nodes.push_back(std::make_unique<node>(node_settings{.name = "thr", .driver = "throttle"}, std::move(*d), env));
    nodes.back()->slots = std::move(ta.edges);
  }
  ~throttled() {
    nodes.back()->driver().close();
    while (!nodes.empty()) nodes.pop_back();
  }
};

qom::throttle_config iops(int64_t avg) {
  qom::throttle_config c;
  c[throttle_bucket::iops_total].avg = avg;
  return c;
}

TEST(ThrottleFilter, MissingGroupHasQsdText) {
  local_loop loop(io::reactor::create(16, nullptr));
  boost::json::object topts{{"throttle-group", "tg9"}};
  open_args ta{topts, {}, loop.env()};
  boost::json::object nopts{{"size", 4096}};
  open_args na{nopts, {}, loop.env()};
  node n(node_settings{.name = "null", .driver = "null-co"}, std::move(*find_driver("null-co")->open(na)), loop.env());
  ta.set_child("file", &n);
  auto d = find_driver("throttle")->open(ta);
  ASSERT_FALSE(d.has_value());
  EXPECT_EQ(d.error().desc, "Throttle group 'tg9' does not exist");
}

TEST(ThrottleFilter, BucketThenQueueAndQuiesceReleasesWaitingRequests) {
  local_loop loop(io::reactor::create(64, nullptr));
  auto st = std::make_shared<qom::throttle_state>();
  st->set_config(iops(1000));  // a bucket of 100 at once, then one per millisecond
  throttled t(loop.env(), st);
  std::vector<char> buf(4096);
  std::vector<io_request> reqs(150);
  counter c;
  auto start = node::now_ns();
  for (auto& r : reqs) {
    r.op = io_op::read;
    r.set_buffer(buf.data(), 4096);
    r.waiter = &c;
    t.top()->submit(r);
  }
  for (int i = 0; i < 100 && c.done < 101; ++i) loop.turn();
  EXPECT_EQ(c.done, 101);  // the bucket, not the rest
  bool drained = false;
  t.top()->quiesce([&] { drained = true; });
  while (!drained) loop.turn();
  auto took = node::now_ns() - start;
  EXPECT_EQ(c.done, 150);
  EXPECT_LT(took, 40'000'000);  // the drain let the 49 waiting go at once (QEMU disables limits while draining)
  EXPECT_LT(took, 500'000'000);
  t.top()->resume();
}

TEST(ThrottleFilter, NewLimitsReleaseWaitingRequests) {
  local_loop loop(io::reactor::create(64, nullptr));
  auto st = std::make_shared<qom::throttle_state>();
  st->set_config(iops(1));  // the second request would wait most of a second
  throttled t(loop.env(), st);
  std::vector<char> buf(4096);
  std::vector<io_request> reqs(20);
  counter c;
  for (auto& r : reqs) {
    r.op = io_op::write;
    r.set_buffer(buf.data(), 4096);
    r.waiter = &c;
    t.top()->submit(r);
  }
  // Turns that never sleep (a plain turn would wait out the 1 s timer and let the next one go).
  for (int i = 0; i < 20; ++i) {
    auto batch = std::move(loop.deferred);
    loop.deferred.clear();
    for (auto& fn : batch) fn();
    loop.reactor->run_once(false);
  }
  EXPECT_EQ(c.done, 1);
  auto start = node::now_ns();
  st->set_config(qom::throttle_config{});  // qom-set limits: no limit any more
  // Non-sleeping turns again: the timer armed for the old limit stays in the reactor (it fires
  // later and finds nothing to do), and a sleeping turn would wait it out after the last completion.
  while (c.done < 20 && node::now_ns() - start < 2'000'000'000) {
    auto batch = std::move(loop.deferred);
    loop.deferred.clear();
    for (auto& fn : batch) fn();
    loop.reactor->run_once(false);
  }
  EXPECT_EQ(c.done, 20);
  EXPECT_LT(node::now_ns() - start, 200'000'000);
}

TEST(ThrottleFilter, GroupSharedAcrossThreadsIsFairAndHoldsTheRate) {
  auto st = std::make_shared<qom::throttle_state>();
  st->set_config(iops(2000));
  std::atomic<bool> stop{false};
  std::atomic<int> ready{0};
  int done[2] = {0, 0};
  auto member = [&](int idx) {
    shared_loop loop;
    throttled t(loop.env(), st);
    std::vector<char> buf(4096);
    std::vector<io_request> reqs(16);
    struct refill final : io_waiter {
      node* top;
      int* done;
      std::atomic<bool>* stop;
      void io_done(io_request& r) override {
        ++*done;
        if (!stop->load()) top->submit(r);
      }
    } w;
    w.top = t.top();
    w.done = &done[idx];
    w.stop = &stop;
    ++ready;
    while (ready.load() < 2) {}
    for (auto& r : reqs) {
      r.op = io_op::read;
      r.set_buffer(buf.data(), 4096);
      r.waiter = &w;
      t.top()->submit(r);
    }
    bool drained = false;
    while (!stop.load()) loop.turn();
    t.top()->quiesce([&] { drained = true; });
    while (!drained) loop.turn();
  };
  auto start = node::now_ns();
  std::thread a(member, 0), b(member, 1);
  std::this_thread::sleep_for(std::chrono::milliseconds(1000));
  stop = true;
  a.join();
  b.join();
  double secs = double(node::now_ns() - start) / 1e9;
  double total = done[0] + done[1];
  // 2000/s plus the first bucket (200) and the requests in flight at the end (32).
  EXPECT_LE(total, 2000 * secs + 200 + 32 + 20);
  // No lower bound here: how much of the rate two threads reach depends on what else the machine
  // runs (a unit test must not time the machine); bench/throttle-accuracy measures the rate.
  EXPECT_GT(total, 0);
  // Round robin: each member gets about half.
  EXPECT_NEAR(done[0], total / 2, total * 0.15) << done[0] << " / " << done[1];
}

}  // namespace
}  // namespace blockd::block

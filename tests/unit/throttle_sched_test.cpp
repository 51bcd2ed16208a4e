// Unit tests of the throttle group scheduler (rates, bursts, iops-size, round robin, reconfiguration) on simulated time; test thread.
#include <gtest/gtest.h>

#include <algorithm>
#include <deque>
#include <memory>
#include <vector>

#include "config/objects/throttle_group.h"

namespace blockd::qom {
namespace {

using k = throttle_bucket;
constexpr uint64_t sec = 1'000'000'000;

// A member whose "loop" is the simulator: schedule_wake only records (as the real one posts).
struct sim_member final : throttle_member {
  struct wake {
    bool armed = false;
    uint64_t deadline = 0;
  } wakes[2];
  std::deque<uint64_t> queue[2];  // queued request sizes
  uint64_t started[2] = {0, 0};
  uint64_t started_bytes = 0;
  int depth = 32;        // requests the client keeps in flight (completion is immediate)
  uint64_t size = 4096;  // bytes per request
  bool writes = false;
  bool active = true;
  void schedule_wake(bool w, uint64_t deadline) override { wakes[w] = {true, deadline}; }
};

// Runs the members against `s` until simulated time `end`; requests complete the moment they
// start, so each member's client refills at once (a saturating client of depth `depth`).
struct simulator {
  throttle_state& s;
  std::vector<sim_member*> members;
  uint64_t now = sec;
  void fill(sim_member& m) {
    bool w = m.writes;
    // Start (or queue) until the client has `depth` requests waiting; started ones finish at once.
    while (m.active && int(m.queue[w].size()) < m.depth) {
      if (s.intercept(&m, w, m.size, now)) {
        ++m.started[w];
        m.started_bytes += m.size;
      } else {
        m.queue[w].push_back(m.size);
      }
    }
  }
  void run_until(uint64_t end) {
    for (auto* m : members) fill(*m);
    for (;;) {
      sim_member* next = nullptr;
      bool nw = false;
      for (auto* m : members)
        for (bool w : {false, true})
          if (m->wakes[w].armed && (!next || m->wakes[w].deadline < next->wakes[nw].deadline)) {
            next = m;
            nw = w;
          }
      if (!next) return;
      uint64_t at = std::max(now, next->wakes[nw].deadline);
      if (at >= end) {
        now = end;
        return;
      }
      now = at;
      next->wakes[nw].armed = false;
      bool has = !next->queue[nw].empty();
      if (s.on_wake(next, nw, has, has ? next->queue[nw].front() : 0, now)) {
        next->queue[nw].pop_front();
        ++next->started[nw];
        next->started_bytes += next->size;
      }
      fill(*next);
    }
  }
};

throttle_config limits(k b, int64_t avg, int64_t max = 0, int64_t len = 1) {
  throttle_config c;
  c[b] = {avg, max, len};
  return c;
}

TEST(ThrottleSched, IopsRateHeldOverTime) {
  throttle_state s;
  s.set_config(limits(k::iops_total, 1000));
  sim_member m;
  s.attach(&m);
  simulator sim{s, {&m}};
  sim.run_until(sec + 10 * sec);
  // 10 s at 1000/s, plus the bucket QEMU lets through at once (avg/10) and one overfilling request.
  EXPECT_NEAR(double(m.started[0]), 10000 + 100, 3);
  s.detach(&m);
}

TEST(ThrottleSched, BpsRateAndDirections) {
  throttle_state s;
  s.set_config(limits(k::bps_write, 10 << 20));
  sim_member r, w;
  r.depth = 4;
  r.active = true;
  w.writes = true;
  w.size = 64 << 10;
  s.attach(&r);
  s.attach(&w);
  simulator sim{s, {&w}};
  sim.run_until(sec + 5 * sec);
  EXPECT_NEAR(double(w.started_bytes), 5.0 * (10 << 20) + (1 << 20), 64 << 10);
  // Reads are not limited by a write limit: they all go at once.
  EXPECT_TRUE(s.intercept(&r, false, 1 << 20, sim.now));
  s.detach(&r);
  s.detach(&w);
}

TEST(ThrottleSched, BurstThenAverage) {
  throttle_state s;
  s.set_config(limits(k::iops_read, 100, 400, 2));
  sim_member m;
  s.attach(&m);
  simulator sim{s, {&m}};
  sim.run_until(sec + 2 * sec);
  // Two seconds at the burst rate (plus the burst bucket's max/10 at once).
  EXPECT_NEAR(double(m.started[0]), 800 + 40, 3);
  sim.run_until(sec + 10 * sec);
  // Then the average: the main bucket holds max*length, so by time T the total is avg*T + max*length.
  EXPECT_NEAR(double(m.started[0]), 100 * 10 + 800, 5);
  uint64_t before = m.started[0];
  sim.run_until(sec + 15 * sec);
  EXPECT_NEAR(double(m.started[0] - before), 500, 2);
  s.detach(&m);
}

TEST(ThrottleSched, IopsSizeCountsLargeRequestsAsSeveral) {
  throttle_state s;
  auto c = limits(k::iops_total, 100);
  c.op_size = 4096;
  s.set_config(c);
  sim_member m;
  m.size = 16384;  // four operations each
  s.attach(&m);
  simulator sim{s, {&m}};
  sim.run_until(sec + 10 * sec);
  EXPECT_NEAR(double(m.started[0]), 1000 / 4 + 10 / 4 + 1, 2);
  s.detach(&m);
}

TEST(ThrottleSched, RoundRobinIsFairBetweenMembers) {
  throttle_state s;
  s.set_config(limits(k::iops_total, 1000));
  sim_member a, b, c;
  b.depth = 1;  // a shallow client gets the same share as deep ones
  s.attach(&a);
  s.attach(&b);
  s.attach(&c);
  simulator sim{s, {&a, &b, &c}};
  sim.run_until(sec + 6 * sec);
  uint64_t total = a.started[0] + b.started[0] + c.started[0];
  EXPECT_NEAR(double(total), 6000 + 100, 5);
  // a filled first and took the bucket QEMU lets through at once (101); after that, equal turns.
  EXPECT_NEAR(double(a.started[0]) - 101, double(b.started[0]), 3);
  EXPECT_NEAR(double(b.started[0]), double(c.started[0]), 3);
  s.detach(&a);
  s.detach(&b);
  s.detach(&c);
}

TEST(ThrottleSched, OneDirectionDoesNotStallTheOther) {
  throttle_state s;
  throttle_config c;
  c[k::iops_read].avg = 10;
  c[k::iops_write].avg = 1000;
  s.set_config(c);
  sim_member r, w;
  w.writes = true;
  s.attach(&r);
  s.attach(&w);
  simulator sim{s, {&r, &w}};
  sim.run_until(sec + 2 * sec);
  EXPECT_NEAR(double(r.started[0]), 20 + 1 + 1, 2);
  EXPECT_NEAR(double(w.started[1]), 2000 + 100, 3);
  s.detach(&r);
  s.detach(&w);
}

TEST(ThrottleSched, NewLimitsWakeWaitingRequests) {
  throttle_state s;
  s.set_config(limits(k::iops_total, 1));
  sim_member m;
  m.depth = 8;
  s.attach(&m);
  simulator sim{s, {&m}};
  sim.run_until(sec + sec / 2);
  ASSERT_EQ(m.queue[0].size(), 8u);  // waiting for a timer a second away
  uint64_t before = m.started[0];
  // qom-set of limits: the member is woken now, not when its old timer would fire.
  s.set_config(limits(k::iops_total, 100000));
  EXPECT_TRUE(m.wakes[0].armed);
  EXPECT_EQ(m.wakes[0].deadline, 0u);
  m.active = false;  // let the queue drain without refilling
  sim.run_until(sim.now + sec / 100);
  EXPECT_EQ(m.queue[0].size(), 0u);
  EXPECT_EQ(m.started[0] - before, 8u);
  // Removing every limit lets everything through.
  s.set_config(throttle_config{});
  for (int i = 0; i < 1000; ++i) EXPECT_TRUE(s.intercept(&m, true, 1 << 20, sim.now));
  s.detach(&m);
}

TEST(ThrottleSched, DetachPassesTheTurnOn) {
  throttle_state s;
  s.set_config(limits(k::iops_total, 10));
  sim_member a, b;
  s.attach(&a);
  s.attach(&b);
  uint64_t t = sec;
  while (s.intercept(&a, false, 4096, t)) {}
  // a holds the group's timer; b's request queues behind it.
  ASSERT_TRUE(a.wakes[0].armed);
  // a's queued request finishes (its wake-up), then a leaves: b must still be served.
  a.wakes[0].armed = false;
  EXPECT_FALSE(s.intercept(&b, false, 4096, t));
  EXPECT_TRUE(s.on_wake(&a, false, true, 4096, a.wakes[0].deadline));
  s.detach(&a);
  ASSERT_TRUE(b.wakes[0].armed);
  EXPECT_TRUE(s.on_wake(&b, false, true, 4096, b.wakes[0].deadline + sec));
  s.detach(&b);
}

}  // namespace
}  // namespace blockd::qom

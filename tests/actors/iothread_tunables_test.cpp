// Actor-tier tests of the iothread object's tunables (busy polling, aio-max-batch, worker pool bounds, set_params, CPU affinity); test thread plus the iothreads under test.
#include <caf/all.hpp>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sched.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <future>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "actors/runtime/iothread.h"

using namespace blockd;

namespace {

struct tunables_fixture : ::testing::Test {
  caf::actor_system_config cfg;
  std::unique_ptr<caf::actor_system> sys;
  std::vector<std::unique_ptr<iothread>> threads;
  void SetUp() override {
    cfg.set("scheduler.max-threads", size_t(1));
    sys = std::make_unique<caf::actor_system>(cfg);
  }
  void TearDown() override {
    threads.clear();
    sys.reset();
  }
  iothread& make(iothread_params p) {
    threads.push_back(std::make_unique<iothread>(*sys, "t" + std::to_string(threads.size()), p));
    return *threads.back();
  }
};

// Runs `f` on the loop and returns its result (the reactor may only be touched there).
template <class F>
auto on_loop(iothread& io, F f) {
  std::promise<decltype(f())> p;
  auto fut = p.get_future();
  io.post([&] { p.set_value(f()); });
  return fut.get();
}

io::reactor_stats stats_of(iothread& io) {
  return on_loop(io, [&] { return io.reactor().stats(); });
}

// `n` short idle waits in a row, all on the loop: a ring timeout of `ns` whose completion queues the
// next. Between them the loop has nothing to do, so it polls or sleeps; being driven by its own ring
// rather than by posts from this thread, the pattern does not depend on how the two threads are
// scheduled (a post that lands before the loop goes idle would never let it poll).
void idle_waits(iothread& io, int n, uint64_t ns = 50'000) {
  struct chain final : io::completion {
    iothread* io;
    int left;
    uint64_t ns;
    std::promise<void> done;
    void complete(int) override {
      if (--left == 0)
        done.set_value();
      else
        io->reactor().timeout(ns, this);
    }
  } c;
  c.io = &io;
  c.left = n;
  c.ns = ns;
  auto fin = c.done.get_future();
  io.post([&] { io.reactor().timeout(ns, &c); });
  fin.get();
}

// Waits (bounded) for a condition that only a timer inside the code under test can make true, such
// as an idle worker leaving; fails the test rather than hang.
template <class P>
bool eventually(P pred, std::chrono::milliseconds limit = std::chrono::milliseconds(5000)) {
  auto end = std::chrono::steady_clock::now() + limit;
  while (!pred()) {
    if (std::chrono::steady_clock::now() > end) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return true;
}

// Offloaded calls that block until the test lets them go, counting how many run at once.
struct gate {
  std::mutex mx;
  std::condition_variable cv;
  int running = 0, peak = 0, tokens = 0, finished = 0, completed = 0;

  std::function<int()> job() {
    return [this] {
      std::unique_lock<std::mutex> g(mx);
      ++running;
      peak = std::max(peak, running);
      cv.notify_all();
      cv.wait(g, [this] { return tokens > 0; });
      --tokens;
      --running;
      ++finished;
      cv.notify_all();
      return 7;
    };
  }
  template <class P>
  bool wait_for(P pred) {
    std::unique_lock<std::mutex> g(mx);
    return cv.wait_for(g, std::chrono::seconds(10), [&] { return pred(); });
  }
  void release(int n) {
    std::lock_guard<std::mutex> g(mx);
    tokens += n;
    cv.notify_all();
  }
};

struct gate_completion final : io::completion {
  gate* g = nullptr;
  int res = 0;
  void complete(int r) override {
    std::lock_guard<std::mutex> l(g->mx);
    res = r;
    ++g->completed;
    g->cv.notify_all();
  }
};

void offload_all(iothread& io, gate& g, std::vector<gate_completion>& cs) {
  on_loop(io, [&] {
    for (auto& c : cs) {
      c.g = &g;
      io.reactor().offload(g.job(), &c);
    }
    return 0;
  });
}

iothread_params pool(int64_t min, int64_t max) {
  iothread_params p;
  p.thread_pool_min = min;
  p.thread_pool_max = max;
  return p;
}

}  // namespace

// ---- busy polling -----------------------------------------------------------------------------

TEST(PollWindow, FollowsQemuRules) {
  const int64_t max = 32768;
  // Off.
  EXPECT_EQ(iothread::next_poll_window(0, 100, 0, 0, 0), 0);
  EXPECT_EQ(iothread::next_poll_window(8000, 100, 0, 0, 0), 0);
  // The event came after the window, within max: grow (from 0 to 4 us, then x2 by default).
  int64_t w = 0;
  std::vector<int64_t> seen;
  for (int i = 0; i < 5; ++i) seen.push_back(w = iothread::next_poll_window(w, w + 1, max, 0, 0));
  EXPECT_EQ(seen, (std::vector<int64_t>{4000, 8000, 16000, 32000, 32768}));
  EXPECT_EQ(iothread::next_poll_window(4000, 5000, max, 3, 0), 12000);
  // Max below the first step.
  EXPECT_EQ(iothread::next_poll_window(0, 10, 1000, 0, 0), 1000);
  // The event came within the window: keep it.
  EXPECT_EQ(iothread::next_poll_window(16000, 16000, max, 0, 0), 16000);
  EXPECT_EQ(iothread::next_poll_window(16000, 1, max, 0, 0), 16000);
  // Longer than max: shrink by poll-shrink, or back to 0 when it is 0 (QEMU's default).
  EXPECT_EQ(iothread::next_poll_window(16000, max + 1, max, 0, 0), 0);
  EXPECT_EQ(iothread::next_poll_window(16000, max + 1, max, 0, 2), 8000);
  EXPECT_EQ(iothread::next_poll_window(16000, max + 1, max, 0, 4), 4000);
  // Between window and max, already at max: unchanged.
  EXPECT_EQ(iothread::next_poll_window(max, max, max, 0, 0), max);
}

TEST_F(tunables_fixture, PollingOffNeverPolls) {
  iothread_params p;
  p.poll_max_ns = 0;
  auto& io = make(p);
  idle_waits(io, 100);
  auto s = io.polling();
  EXPECT_EQ(s.polls, 0u);
  EXPECT_EQ(s.window_ns, 0);
  EXPECT_EQ(s.grows, 0u);
}

TEST_F(tunables_fixture, WindowGrowsAndHitsThenShrinksAfterALongWait) {
  iothread_params p;
  p.poll_max_ns = 20'000'000;  // 20 ms: far above the 50 us waits below
  p.poll_shrink = 0;
  auto& io = make(p);
  idle_waits(io, 200);
  auto s = io.polling();
  EXPECT_GT(s.grows, 0u);
  EXPECT_GT(s.window_ns, 0);
  EXPECT_GT(s.polls, 0u);
  EXPECT_GT(s.poll_hits, 0u) << "once the window is longer than the waits, the timer fires while polling";
  EXPECT_LE(s.window_ns, p.poll_max_ns);

  // An idle wait of 100 ms (a ring timeout) is longer than poll-max-ns: with poll-shrink 0 the
  // window goes back to 0.
  uint64_t shrinks = s.shrinks;
  struct timer_done final : io::completion {
    std::promise<int> p;
    void complete(int r) override { p.set_value(r); }
  } t;
  auto fired = t.p.get_future();
  io.post([&] { io.reactor().timeout(100'000'000, &t); });
  EXPECT_EQ(fired.get(), 0);
  // The window is adjusted right after the wait that delivered the timer, on the loop.
  ASSERT_TRUE(eventually([&] { return io.polling().shrinks > shrinks; }));
  EXPECT_EQ(io.polling().window_ns, 0);
}

TEST_F(tunables_fixture, SetParamsTurnsPollingOnAndOff) {
  iothread_params p;
  p.poll_max_ns = 0;
  auto& io = make(p);
  idle_waits(io, 50);
  EXPECT_EQ(io.polling().polls, 0u);

  p.poll_max_ns = 20'000'000;
  io.set_params(p);
  idle_waits(io, 100);
  EXPECT_GT(io.polling().polls, 0u);
  EXPECT_EQ(io.params().poll_max_ns, 20'000'000);

  p.poll_max_ns = 0;
  io.set_params(p);
  on_loop(io, [] { return 0; });  // applied in order: it ran before this
  uint64_t polls = io.polling().polls;
  EXPECT_EQ(io.polling().window_ns, 0);
  idle_waits(io, 50);
  EXPECT_EQ(io.polling().polls, polls);
}

// ---- aio-max-batch ----------------------------------------------------------------------------

namespace {

struct count_completion final : io::completion {
  std::atomic<int>* n = nullptr;
  void complete(int) override { n->fetch_add(1); }
};

// Queues `count` file reads in one loop turn and runs the loop until they completed; returns the
// reactor's counters before and after.
std::pair<io::reactor_stats, io::reactor_stats> batch_of_reads(iothread& io, int fd, int count) {
  auto before = stats_of(io);
  std::atomic<int> done{0};
  std::vector<count_completion> cs(count);
  std::vector<char> buf(512 * count);
  on_loop(io, [&] {
    for (int i = 0; i < count; ++i) {
      cs[i].n = &done;
      io.reactor().read(fd, buf.data() + 512 * i, 512, 0, &cs[i]);
    }
    io.wait_until([&] { return done.load() == count; });
    return 0;
  });
  EXPECT_EQ(done.load(), count);
  return {before, stats_of(io)};
}

int temp_file() {
  char path[] = "/tmp/blockd-batch-XXXXXX";
  int fd = ::mkstemp(path);
  if (fd >= 0) {
    ::unlink(path);
    std::vector<char> data(4096, 'x');
    (void)!::write(fd, data.data(), data.size());
  }
  return fd;
}

}  // namespace

TEST_F(tunables_fixture, AioMaxBatchCapsSqesPerSubmit) {
  iothread_params capped;
  capped.poll_max_ns = 0;
  capped.aio_max_batch = 4;
  iothread_params uncapped = capped;
  uncapped.aio_max_batch = 0;
  auto& a = make(capped);
  auto& b = make(uncapped);
  if (std::string(a.backend()) != "io_uring") GTEST_SKIP() << "poll backend: " << a.backend_note();
  int fd = temp_file();
  ASSERT_GE(fd, 0);

  auto [a0, a1] = batch_of_reads(a, fd, 32);
  EXPECT_LE(a1.max_sqes_per_submit, 4u);
  EXPECT_GE(a1.submit_calls - a0.submit_calls, 8u);
  EXPECT_GE(a1.sqes_submitted - a0.sqes_submitted, 32u);

  auto [b0, b1] = batch_of_reads(b, fd, 32);
  EXPECT_GE(b1.max_sqes_per_submit, 32u) << "without a cap one submit carries the whole turn";

  // At run time: lift a's cap, then the same turn goes out in one submit.
  capped.aio_max_batch = 0;
  a.set_params(capped);
  auto [c0, c1] = batch_of_reads(a, fd, 32);
  EXPECT_GE(c1.max_sqes_per_submit, 32u);
  ::close(fd);
}

// ---- worker pool bounds -----------------------------------------------------------------------

TEST_F(tunables_fixture, PoolNeverRunsMoreThanMax) {
  auto& io = make(pool(0, 3));
  gate g;
  std::vector<gate_completion> cs(12);
  offload_all(io, g, cs);
  ASSERT_TRUE(g.wait_for([&] { return g.running == 3; }));
  // Nine calls wait for a thread; the pool must not have started more than three.
  auto s = stats_of(io);
  EXPECT_EQ(s.pool_threads, 3u);
  EXPECT_LE(s.pool_threads_peak, 3u);
  // Let them through one at a time: each finished call makes room for exactly one more.
  for (int i = 0; i < 12; ++i) {
    g.release(1);
    ASSERT_TRUE(g.wait_for([&] { return g.finished == i + 1; }));
  }
  ASSERT_TRUE(g.wait_for([&] { return g.completed == 12; }));
  EXPECT_EQ(g.peak, 3);
  for (auto& c : cs) EXPECT_EQ(c.res, 7);
  EXPECT_LE(stats_of(io).pool_threads_peak, 3u);
}

TEST_F(tunables_fixture, MinThreadsExistAfterStart) {
  auto& none = make(pool(0, 64));
  EXPECT_EQ(stats_of(none).pool_threads, 0u) << "no thread before first use when thread-pool-min is 0";
  auto& two = make(pool(2, 4));
  EXPECT_EQ(stats_of(two).pool_threads, 2u);
  EXPECT_TRUE(eventually([&] { return stats_of(two).pool_tids.size() == 2; }));
  // Raising min at run time starts the missing ones.
  two.set_params(pool(3, 4));
  EXPECT_EQ(stats_of(two).pool_threads, 3u);
}

TEST_F(tunables_fixture, SetParamsRaisesThePoolMax) {
  auto& io = make(pool(0, 1));
  gate g;
  std::vector<gate_completion> cs(4);
  offload_all(io, g, cs);
  ASSERT_TRUE(g.wait_for([&] { return g.running == 1; }));
  EXPECT_EQ(stats_of(io).pool_threads, 1u);
  // Three calls still wait. With a higher max the next hand-over starts threads for them.
  io.set_params(pool(0, 4));
  std::vector<gate_completion> more(1);
  offload_all(io, g, more);
  ASSERT_TRUE(g.wait_for([&] { return g.running == 4; }));
  g.release(5);
  ASSERT_TRUE(g.wait_for([&] { return g.completed == 5; }));
  EXPECT_EQ(g.peak, 4);
}

TEST_F(tunables_fixture, IdleThreadsAboveMinLeave) {
  auto& io = make(pool(1, 4));
  // A short idle timeout so the test need not wait QEMU's 10 s.
  on_loop(io, [&] {
    io.reactor().set_pool_limits({.min = 1, .max = 4, .idle_timeout_ns = 20'000'000});
    return 0;
  });
  gate g;
  std::vector<gate_completion> cs(4);
  offload_all(io, g, cs);
  ASSERT_TRUE(g.wait_for([&] { return g.running == 4; }));
  EXPECT_EQ(stats_of(io).pool_threads, 4u);
  g.release(4);
  ASSERT_TRUE(g.wait_for([&] { return g.completed == 4; }));
  EXPECT_TRUE(eventually([&] { return stats_of(io).pool_threads == 1; })) << stats_of(io).pool_threads;
  // The one left (min) still serves.
  std::vector<gate_completion> again(1);
  offload_all(io, g, again);
  g.release(1);
  ASSERT_TRUE(g.wait_for([&] { return g.completed == 5; }));
  EXPECT_EQ(again[0].res, 7);
}

// ---- CPU affinity -----------------------------------------------------------------------------

namespace {

cpu_set_t one_cpu(int c) {
  cpu_set_t s;
  CPU_ZERO(&s);
  CPU_SET(c, &s);
  return s;
}

bool affinity_is(int tid, const cpu_set_t& want) {
  cpu_set_t got;
  CPU_ZERO(&got);
  if (::sched_getaffinity(tid, sizeof got, &got) != 0) return false;
  return CPU_EQUAL(&got, &want);
}

}  // namespace

TEST_F(tunables_fixture, SetAffinityPinsTheLoopAndItsWorkers) {
  cpu_set_t allowed;
  ASSERT_EQ(::sched_getaffinity(0, sizeof allowed, &allowed), 0);
  std::vector<int> cpus;
  for (int c = 0; c < CPU_SETSIZE; ++c)
    if (CPU_ISSET(c, &allowed)) cpus.push_back(c);
  if (cpus.size() < 2) GTEST_SKIP() << "needs two CPUs to tell a pinning from no pinning";

  auto& io = make(pool(1, 4));
  ASSERT_EQ(io.set_affinity(one_cpu(cpus[0])), 0);
  EXPECT_TRUE(affinity_is(static_cast<int>(io.thread_id()), one_cpu(cpus[0])));
  cpu_set_t now = io.affinity();
  EXPECT_EQ(CPU_COUNT(&now), 1);
  EXPECT_TRUE(CPU_ISSET(cpus[0], &now));
  // A worker reports its tid once it runs; the pinning does not depend on it (a worker not yet
  // running applies the set itself when it starts).
  io::reactor_stats s;
  ASSERT_TRUE(eventually([&] { return (s = stats_of(io)).pool_tids.size() == 1; }));
  EXPECT_TRUE(affinity_is(s.pool_tids[0], one_cpu(cpus[0])));

  // Re-pin at run time; workers started afterwards get the new set too.
  ASSERT_EQ(io.set_affinity(one_cpu(cpus[1])), 0);
  EXPECT_TRUE(affinity_is(static_cast<int>(io.thread_id()), one_cpu(cpus[1])));
  io.set_params(pool(3, 4));
  ASSERT_TRUE(eventually([&] { return (s = stats_of(io)).pool_tids.size() == 3; }));
  for (int tid : s.pool_tids) EXPECT_TRUE(affinity_is(tid, one_cpu(cpus[1]))) << tid;

  // A set the process may not use is refused and changes nothing.
  int outside = -1;
  for (int c = CPU_SETSIZE - 1; c >= 0 && outside < 0; --c)
    if (!CPU_ISSET(c, &allowed)) outside = c;
  if (outside >= 0) {
    EXPECT_EQ(io.set_affinity(one_cpu(outside)), -EINVAL);
    EXPECT_TRUE(affinity_is(static_cast<int>(io.thread_id()), one_cpu(cpus[1])));
  }
  // From the loop itself it applies directly.
  EXPECT_EQ(on_loop(io, [&] { return io.set_affinity(allowed); }), 0);
  EXPECT_TRUE(affinity_is(static_cast<int>(io.thread_id()), allowed));
}

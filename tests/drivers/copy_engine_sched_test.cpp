// The block-copy engine's scheduling over real nodes: re-dirtying writers, copy_now, the memory bound, the speed limit on an injected clock, pause/resume/cancel and error actions (blkdebug); test thread.
#include "tests/drivers/copy_engine_fixture.h"

namespace blockd::block {
namespace {

// A clock the test turns: sleeps are recorded and fired in deadline order.
struct fake_clock {
  int64_t t = 0;
  std::multimap<int64_t, std::function<void()>> timers;
  copy_clock clock() {
    return {[this] { return t; }, [this](int64_t ns, std::function<void()> f) { timers.emplace(t + ns, std::move(f)); }};
  }
  bool fire_next() {
    if (timers.empty()) return false;
    auto it = timers.begin();
    t = std::max(t, it->first);
    auto fn = std::move(it->second);
    timers.erase(it);
    fn();
    return true;
  }
};

struct sched_fixture : copy_fixture {
  node *src = nullptr, *dst = nullptr;
  void make_files() {
    src = file(image(image_size));
    fill(src, 0, image_size, 11);
    dst = file(image(image_size));
  }
  // raw over blkdebug over a file whose rules fail some requests.
  node* failing(const std::string& path, boost::json::object rule) {
    node* f = file(path);
    node* d = s->open_with("blkdebug", {{"inject-error", boost::json::array{rule}}}, {{"image", f}});
    return s->open("raw", {}, d);
  }
};

// ---- writers during the copy ----------------------------------------------------------------------

TEST_F(sched_fixture, writes_during_the_copy_are_copied_again) {
  make_files();
  recorder rec(dst);  // checks that no two copies of one range reach the target at once
  rec.hold = true;    // target writes are slow: guest writes land while copies are in flight
  redirty hook(src);
  seen sn;
  copy_engine e({.source = src, .target = dst, .granularity = 64 * K, .max_chunk = 256 * K, .max_workers = 8},
                sn.cbs());
  hook.e = &e;
  e.work_map().set(0, image_size);
  e.start();
  std::mt19937 rng(7);
  constexpr int writes = 300;
  std::vector<std::vector<char>> bufs(writes);
  std::vector<io_request> reqs(writes);
  waiter w;
  for (int i = 0; i < writes; ++i) {
    int64_t len = int64_t(4 * K) << (rng() % 5);
    int64_t off = int64_t(rng() % uint32_t((image_size - len) / (4 * K))) * 4 * K;
    bufs[size_t(i)].assign(size_t(len), char(i | 1));
    io_request& r = reqs[size_t(i)];
    r.op = io_op::write;
    r.offset = off;
    r.set_buffer(bufs[size_t(i)].data(), len);
    r.waiter = &w;
    src->submit(r);
    s->loop.turn();
    if (i % 3 == 2) rec.release_held();
  }
  rec.release_all();
  run_until([&] { return w.calls == writes; });
  run_until([&] { return e.idle() && sn.idle > 0; });
  spin();  // a late idle notification must not come with work left
  EXPECT_TRUE(e.idle());
  EXPECT_EQ(read_all(dst), read_all(src));
  EXPECT_EQ(rec.overlaps, 0) << "two copies of one chunk overlapped on the target";
  EXPECT_GT(sn.done, image_size) << "re-dirtied chunks are copied again";
  EXPECT_EQ(e.remaining(), 0);
}

TEST_F(sched_fixture, a_chunk_dirtied_during_its_copy_waits_for_that_copy) {
  make_files();
  recorder rec(dst);
  rec.hold = true;
  seen sn;
  copy_engine e({.source = src, .target = dst, .granularity = 64 * K, .max_chunk = 64 * K, .max_workers = 4}, sn.cbs());
  e.work_map().set(0, 64 * K);
  e.start();
  run_until([&] { return rec.held.size() == 1; });
  e.mark_dirty(0, 4096);  // a write landed while the copy runs
  spin();
  EXPECT_EQ(rec.held.size(), 1u) << "no second copy while the first is in flight";
  EXPECT_EQ(e.in_flight(), 1u);
  EXPECT_EQ(e.remaining(), 2 * 64 * K) << "dirty again plus in flight";
  rec.release_all();
  run_until([&] { return sn.idle > 0; });
  EXPECT_EQ(rec.writes, 2);
  EXPECT_EQ(rec.overlaps, 0);
}

// ---- copy_now ---------------------------------------------------------------------------------

TEST_F(sched_fixture, copy_now_waits_for_the_copy_in_flight_and_jumps_the_queue) {
  make_files();
  recorder rec(dst);
  rec.hold = true;
  seen sn;
  copy_engine e({.source = src, .target = dst, .granularity = 64 * K, .max_chunk = 128 * K, .max_workers = 1}, sn.cbs());
  e.work_map().set(0, image_size);
  e.start();
  run_until([&] { return rec.held.size() == 1; });
  ASSERT_EQ(rec.held[0]->offset, 0);
  ASSERT_EQ(rec.held[0]->length, 128 * K);
  uint64_t reads = src->stats().rd.operations.get();
  int first = 1, second = 1, clean = 1;
  e.copy_now(0, 4096, [&](int r) { first = r; });
  e.copy_now(3 * M, 100 * K, [&](int r) { second = r; });  // two chunks, copied past max_workers
  run_until([&] { return rec.held.size() == 2; });
  spin();
  EXPECT_EQ(first, 1) << "the chunk is still being copied";
  EXPECT_EQ(second, 1);
  EXPECT_EQ(src->stats().rd.operations.get(), reads + 1) << "chunk 0 is not copied a second time";
  EXPECT_EQ(rec.held[1]->offset, 3 * M);
  EXPECT_EQ(rec.held[1]->length, 128 * K) << "copy_now merges its chunks into one request";
  rec.release_all();
  run_until([&] { return first != 1 && second != 1; });
  EXPECT_EQ(first, 0);
  EXPECT_EQ(second, 0);
  auto a = read_all(src);
  std::vector<char> b(128 * K);
  ASSERT_EQ(io(dst, io_op::read, 3 * M, 128 * K, b.data()), 0);
  EXPECT_TRUE(std::equal(b.begin(), b.end(), a.begin() + 3 * M)) << "done means the data is on the target";
  // A range with nothing left to copy is answered on a later turn, never inside the call.
  e.copy_now(3 * M, 4096, [&](int r) { clean = r; });
  EXPECT_EQ(clean, 1);
  run_until([&] { return clean != 1; });
  EXPECT_EQ(clean, 0);
  run_until([&] { return sn.idle > 0; });
  EXPECT_EQ(read_all(dst), a);
}

TEST_F(sched_fixture, copy_now_ignores_pause_and_speed_and_ends_with_cancel) {
  make_files();
  fake_clock fc;
  seen sn;
  copy_engine e({.source = src, .target = dst, .granularity = 64 * K, .max_chunk = 64 * K, .speed = 1, .clock = fc.clock()},
                sn.cbs());
  e.work_map().set(0, image_size);
  e.start();
  run_until([&] { return !fc.timers.empty() && e.in_flight() == 0; });  // over its quota: sleeping
  int64_t before = sn.done;
  e.pause();
  run_until([&] { return sn.paused == 1; });
  int r = 1;
  e.copy_now(2 * M, 128 * K, [&](int x) { r = x; });
  run_until([&] { return r != 1; });
  EXPECT_EQ(r, 0);
  EXPECT_EQ(sn.done, before + 128 * K);
  e.cancel();
  run_until([&] { return sn.cancelled == 1; });
  r = 1;
  e.copy_now(3 * M, 4096, [&](int x) { r = x; });
  run_until([&] { return r != 1; });
  EXPECT_EQ(r, -ECANCELED);
  EXPECT_EQ(sn.idle, 0);
}

TEST_F(sched_fixture, copy_now_failure_goes_to_its_caller) {
  src = file(image(image_size));
  fill(src, 0, image_size, 12);
  dst = failing(image(image_size), {{"event", "write_aio"}, {"iotype", "write"}, {"errno", ENOSPC}, {"sector", 2048}});
  seen sn;
  copy_engine e({.source = src, .target = dst}, sn.cbs());
  e.work_map().set(0, image_size);
  int r = 1;
  e.copy_now(1 * M, 4096, [&](int x) { r = x; });  // before start(): copy-before-write may come first
  run_until([&] { return r != 1; });
  EXPECT_EQ(r, -ENOSPC);
  EXPECT_TRUE(sn.errors.empty()) << "the job's error policy is not asked for copy_now";
  EXPECT_TRUE(e.work_map().get(1 * M)) << "the range stays to copy";
}

// A background copy's report drains the engine (stopping); a copy-before-write filter's guest writes keep
// their copies meanwhile: copy_now is served, not answered -ECANCELED, until the engine has finished.
TEST_F(sched_fixture, copy_now_is_served_while_a_report_drains) {
  src = file(image(image_size));
  fill(src, 0, image_size, 12);
  dst = failing(image(image_size), {{"event", "write_aio"}, {"iotype", "write"}, {"errno", ENOSPC}, {"sector", 0}});
  seen sn;
  // Two operations in flight: the last chunk is still dirty, and nobody copies it, when the first fails.
  copy_engine e({.source = src, .target = dst, .granularity = 64 * K, .max_chunk = 64 * K, .max_workers = 2},
                sn.cbs());
  e.work_map().set(0, image_size);
  e.start();
  run_until([&] { return !sn.errors.empty(); });
  ASSERT_TRUE(e.work_map().get(image_size - 64 * K));
  ASSERT_TRUE(e.stopping()) << "the other copies in flight keep the drain going";
  int r = 1;
  e.copy_now(image_size - 64 * K, 4096, [&](int x) { r = x; });
  run_until([&] { return r != 1; });
  EXPECT_EQ(r, 0);
  run_until([&] { return sn.finished == 1; });
  EXPECT_EQ(sn.fin_err, -ENOSPC);
}

// Copy-before-write as backup builds it: a gating hook on the source holds each guest write until
// copy_now() has put the old data on the target.
struct cbw_hook final : write_hook {
  node* n;
  copy_engine* e = nullptr;
  explicit cbw_hook(node* node_) : n(node_) {
    gates = true;
    n->add_write_hook(this);
  }
  ~cbw_hook() { n->remove_write_hook(this); }
  bool before_write(io_request& r) override {
    e->copy_now(r.offset, r.length, [this, &r](int rc) {
      EXPECT_EQ(rc, 0);
      n->release_write(r);
    });
    return false;
  }
};

TEST_F(sched_fixture, copy_before_write_keeps_the_old_data_even_while_the_source_drains) {
  make_files();
  auto old_data = read_all(src);
  seen sn;
  fake_clock fc;  // never fired: the background copy barely moves
  copy_engine e({.source = src, .target = dst, .granularity = 64 * K, .speed = 1, .clock = fc.clock()}, sn.cbs());
  cbw_hook cbw(src);
  cbw.e = &e;
  e.work_map().set(0, image_size);
  e.start();
  std::vector<char> data(4096, 'W');
  io_request w;
  w.op = io_op::write;
  w.offset = 1 * M + 8192;
  w.set_buffer(data.data(), 4096);
  waiter ww;
  w.waiter = &ww;
  src->submit(w);
  // A drain now waits for the guest write, which waits for its copy: the copy's requests must
  // pass the quiesce or neither ever finishes.
  bool drained = false;
  src->quiesce([&] { drained = true; });
  run_until([&] { return drained && ww.calls == 1; });
  EXPECT_EQ(w.result, 0);
  src->resume();
  std::vector<char> b(64 * K);
  ASSERT_EQ(io(dst, io_op::read, 1 * M, 64 * K, b.data()), 0);
  EXPECT_TRUE(std::equal(b.begin(), b.end(), old_data.begin() + 1 * M)) << "the target holds the data before the write";
  EXPECT_FALSE(e.work_map().get(1 * M));
  // A second write to the same chunk needs no copy.
  uint64_t reads = src->stats().rd.operations.get();
  w.reset();
  w.op = io_op::write;
  w.offset = 1 * M;
  w.set_buffer(data.data(), 4096);
  w.waiter = &ww;
  src->submit(w);
  run_until([&] { return ww.calls == 2; });
  EXPECT_EQ(src->stats().rd.operations.get(), reads);
  e.cancel();
  run_until([&] { return sn.cancelled == 1; });
}

// ---- memory bound -------------------------------------------------------------------------------

TEST_F(sched_fixture, buffers_never_exceed_buf_size) {
  make_files();
  recorder rec(dst);
  rec.hold = true;
  seen sn;
  copy_engine e({.source = src, .target = dst, .granularity = 64 * K, .max_chunk = 128 * K, .buf_size = 320 * K,
                 .max_workers = 64},
                sn.cbs());
  e.work_map().set(0, image_size);
  e.start();
  run_until([&] { return rec.held.size() == 3; });  // 128K + 128K + 64K (the rest of the arena)
  spin();
  EXPECT_EQ(rec.held.size(), 3u);
  EXPECT_EQ(e.buffer_bytes_in_use(), 320 * K);
  rec.release_all();
  run_until([&] { return sn.idle > 0; });
  EXPECT_LE(e.buffer_bytes_peak(), 320 * K);
  EXPECT_EQ(e.buffer_bytes_in_use(), 0);
  EXPECT_EQ(read_all(dst), read_all(src));
}

TEST_F(sched_fixture, small_granularity_shares_page_sized_buffers) {
  make_files();
  recorder rec(dst, false);
  seen sn;
  // mirror granularity=512: buffers stay page aligned, so one 4 KiB slot holds eight chunks.
  copy_engine e({.source = src, .target = dst, .granularity = 512, .buf_size = 8 * K}, sn.cbs());
  for (int i = 0; i < 64; ++i) e.work_map().set(int64_t(i) * 37 * K + 512 * (i % 5), 512 * (1 + i % 3));
  e.work_map().set(2 * M, 100 * K);
  int64_t want = e.work_map().dirty_bytes();
  e.start();
  run_until([&] { return sn.idle > 0; });
  EXPECT_EQ(sn.done, want);
  EXPECT_EQ(rec.write_bytes, want);
  EXPECT_LE(e.buffer_bytes_peak(), 8 * K);
  EXPECT_LE(e.largest_request(), 8 * K) << "no request larger than buf_size";
  auto a = read_all(src), b = read_all(dst);
  EXPECT_TRUE(std::equal(a.begin() + 2 * M, a.begin() + 2 * M + 100 * K, b.begin() + 2 * M));
  EXPECT_TRUE(std::equal(a.begin() + 37 * K + 512, a.begin() + 37 * K + 1536, b.begin() + 37 * K + 512));
}

TEST_F(sched_fixture, max_workers_bounds_operations) {
  make_files();
  seen sn;
  copy_engine e({.source = src, .target = dst, .granularity = 64 * K, .max_chunk = 64 * K, .max_workers = 3}, sn.cbs());
  e.work_map().set(0, image_size);
  e.start();
  run_until([&] { return sn.idle > 0; });
  EXPECT_EQ(e.in_flight_peak(), 3u);
  EXPECT_EQ(read_all(dst), read_all(src));
}

// ---- speed limit on an injected clock ---------------------------------------------------------------

TEST(rate_limit, slices) {
  rate_limit l;
  l.set_speed(10 * M);  // 1 MiB per 100 ms slice
  EXPECT_EQ(l.quota(), uint64_t(M));
  EXPECT_EQ(l.delay(0), 0);
  l.dispatched(uint64_t(M) / 2);
  EXPECT_EQ(l.delay(1000), 0);
  l.dispatched(uint64_t(M) * 2);  // 2.5 quotas: the slice stretches to 250 ms
  EXPECT_EQ(l.delay(2000), 250'000'000 - 2000);
  EXPECT_EQ(l.delay(250'000'000), 0);  // a fresh slice
  l.set_speed(0);
  l.dispatched(uint64_t(100) * M);
  EXPECT_EQ(l.delay(250'000'001), 0);
}

struct speed_fixture : sched_fixture {
  fake_clock fc;
  seen sn;
  // Runs the engine to idle on the fake clock, checking after every wake-up that what was done
  // stays within the limit (speed * time, plus one slice's quota and one request of slack).
  void run_limited(copy_engine& e, uint64_t speed, int64_t slack) {
    while (true) {
      run_until([&] { return sn.idle > 0 || (!fc.timers.empty() && e.in_flight() == 0); });
      if (sn.idle > 0) break;
      ASSERT_TRUE(fc.fire_next());
      double allowed = double(speed) * double(fc.t) / 1e9 + double(slack);
      ASSERT_LE(double(sn.done), allowed) << "at t=" << fc.t;
    }
  }
};

TEST_F(speed_fixture, data_is_copied_at_the_speed_limit) {
  make_files();
  uint64_t speed = 1 * M;  // quota: 100 KiB per slice
  copy_engine e({.source = src, .target = dst, .granularity = 64 * K, .max_chunk = 64 * K, .speed = speed,
                 .clock = fc.clock()},
                sn.cbs());
  e.work_map().set(0, image_size);
  e.start();
  run_limited(e, speed, 100 * K + 128 * K);
  EXPECT_EQ(read_all(dst), read_all(src));
  // 4 MiB at 1 MiB/s: about 4 s of (fake) time, less the first slice's burst.
  EXPECT_GE(fc.t, 3'700'000'000);
  EXPECT_LE(fc.t, 4'200'000'000);
}

TEST_F(speed_fixture, mirror_zeroes_are_not_limited_backup_zeroes_are) {
  src = file(image(image_size));  // all holes: every range reads as zeroes
  dst = file(image(image_size));
  copy_engine mirror({.source = src, .target = dst, .granularity = 64 * K, .max_chunk = 64 * K, .speed = 1 * M,
                      .zeroes_charged = false, .clock = fc.clock()},
                     sn.cbs());
  mirror.work_map().set(0, image_size);
  mirror.start();
  run_limited(mirror, 1 * M, image_size);  // no limit to check: zeroes are free
  EXPECT_LT(fc.t, 200'000'000) << "zero ranges do not count against a mirror's limit";
  EXPECT_EQ(sn.done, image_size);
  int64_t t0 = fc.t;
  sn = seen{};
  copy_engine backup({.source = src, .target = dst, .granularity = 64 * K, .max_chunk = 64 * K, .speed = 1 * M,
                      .zeroes_charged = true, .clock = fc.clock()},
                     sn.cbs());
  backup.work_map().set(0, image_size);
  backup.start();
  run_limited(backup, 1 * M, 100 * K + 128 * K + int64_t(double(t0) * 1e-9 * double(M)) + 1);
  EXPECT_GE(fc.t - t0, 3'700'000'000) << "block-copy charges zeroes too";
}

TEST_F(speed_fixture, set_speed_while_running) {
  make_files();
  copy_engine e({.source = src, .target = dst, .granularity = 64 * K, .max_chunk = 64 * K, .speed = 1 * M,
                 .clock = fc.clock()},
                sn.cbs());
  e.work_map().set(0, image_size);
  e.start();
  run_until([&] { return !fc.timers.empty() && e.in_flight() == 0; });
  ASSERT_TRUE(fc.fire_next());
  e.set_speed(0);  // block-job-set-speed speed=0: unlimited from now on
  run_until([&] { return sn.idle > 0; });
  EXPECT_LT(fc.t, 500'000'000);
  EXPECT_EQ(read_all(dst), read_all(src));
}

// ---- pause, resume, cancel ---------------------------------------------------------------------

TEST_F(sched_fixture, pause_drains_then_resume_finishes) {
  make_files();
  recorder rec(dst);
  rec.hold = true;
  seen sn;
  copy_engine e({.source = src, .target = dst, .granularity = 64 * K, .max_chunk = 64 * K, .max_workers = 4}, sn.cbs());
  e.work_map().set(0, image_size);
  e.start();
  run_until([&] { return rec.held.size() == 4; });
  e.pause();
  EXPECT_TRUE(e.paused());
  spin();
  EXPECT_EQ(sn.paused, 0) << "operations are still in flight";
  rec.release_all();
  run_until([&] { return sn.paused == 1; });
  EXPECT_EQ(e.in_flight(), 0u);
  int64_t writes = rec.writes;
  spin();
  EXPECT_EQ(rec.writes, writes) << "nothing starts while paused";
  EXPECT_GT(e.remaining(), 0);
  e.resume();
  run_until([&] { return sn.idle > 0; });
  EXPECT_EQ(read_all(dst), read_all(src));
}

TEST_F(sched_fixture, cancel_drains_and_stops) {
  make_files();
  recorder rec(dst);
  rec.hold = true;
  seen sn;
  copy_engine e({.source = src, .target = dst, .granularity = 64 * K, .max_chunk = 64 * K, .max_workers = 4}, sn.cbs());
  e.work_map().set(0, image_size);
  e.start();
  run_until([&] { return rec.held.size() == 4; });
  e.cancel();
  spin();
  EXPECT_EQ(sn.cancelled, 0);
  rec.release_all();
  run_until([&] { return sn.cancelled == 1; });
  spin();
  EXPECT_EQ(rec.writes, 4);
  EXPECT_EQ(e.remaining(), image_size - 4 * 64 * K);
  EXPECT_EQ(sn.idle, 0);
  e.resume();  // no effect once cancelled
  spin();
  EXPECT_EQ(rec.writes, 4);
}

// ---- errors -------------------------------------------------------------------------------------

struct error_fixture : sched_fixture {
  seen sn;
  std::unique_ptr<copy_engine> e;
  // A 64 KiB-chunk copy whose target fails one write at 1 MiB (once) with ENOSPC.
  void make(copy_error_action a, bool read_side = false) {
    sn.action = a;
    boost::json::object rule{{"event", read_side ? "read_aio" : "write_aio"}, {"iotype", read_side ? "read" : "write"},
                             {"errno", ENOSPC}, {"sector", 2048}, {"once", true}};
    std::string sp = image(image_size);
    if (read_side) {
      node* f = file(sp);
      fill(f, 0, image_size, 13);
      src = failing(sp, rule);
      dst = file(image(image_size));
    } else {
      src = file(sp);
      fill(src, 0, image_size, 13);
      dst = failing(image(image_size), rule);
    }
    e = std::make_unique<copy_engine>(
        copy_settings{.source = src, .target = dst, .granularity = 64 * K, .max_chunk = 64 * K, .max_workers = 4}, sn.cbs());
    e->work_map().set(0, image_size);
    e->start();
  }
};

TEST_F(error_fixture, retry_copies_the_range_again) {
  make(copy_error_action::retry);
  run_until([&] { return sn.idle > 0; });
  ASSERT_EQ(sn.errors.size(), 1u);
  EXPECT_EQ(sn.errors[0].offset, 1 * M);
  EXPECT_EQ(sn.errors[0].length, 64 * K);
  EXPECT_FALSE(sn.errors[0].is_read);
  EXPECT_EQ(sn.errors[0].err, ENOSPC);
  EXPECT_EQ(read_all(dst), read_all(src));
}

TEST_F(error_fixture, read_errors_say_so) {
  make(copy_error_action::retry, true);
  run_until([&] { return sn.idle > 0; });
  ASSERT_EQ(sn.errors.size(), 1u);
  EXPECT_TRUE(sn.errors[0].is_read);
  EXPECT_EQ(read_all(dst), read_all(src));
}

TEST_F(error_fixture, stop_pauses_with_the_range_dirty) {
  make(copy_error_action::stop);
  run_until([&] { return sn.paused == 1; });
  EXPECT_TRUE(e->paused());
  EXPECT_TRUE(e->work_map().get(1 * M));
  EXPECT_EQ(sn.idle, 0);
  e->resume();
  run_until([&] { return sn.idle > 0; });
  EXPECT_EQ(read_all(dst), read_all(src));
}

TEST_F(error_fixture, report_stops_with_the_error) {
  make(copy_error_action::report);
  run_until([&] { return sn.finished == 1; });
  EXPECT_EQ(sn.fin_err, -ENOSPC);
  EXPECT_EQ(sn.idle, 0);
  EXPECT_GT(e->remaining(), 0);
  EXPECT_EQ(e->in_flight(), 0u);
}

TEST_F(error_fixture, skip_gives_the_range_up) {
  make(copy_error_action::skip);
  run_until([&] { return sn.idle > 0; });
  EXPECT_EQ(sn.errors.size(), 1u);
  EXPECT_EQ(sn.done, image_size);
  auto d = read_all(dst);
  EXPECT_EQ(d[size_t(1 * M)], 0) << "the failed range was not copied";
  EXPECT_NE(d[0], 0);
}

}  // namespace
}  // namespace blockd::block

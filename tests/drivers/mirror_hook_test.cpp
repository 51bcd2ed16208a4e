// The active mirror's write hook over real nodes: a guest write completes only once the target has it, waits for a copy of its chunk, and never overlaps a copy or another write on the target; test thread.
#include <random>

#include "storage/block/mirror_hook.h"
#include "tests/drivers/copy_engine_fixture.h"

namespace blockd::block {
namespace {

struct mirror_fixture : copy_fixture {
  node *src = nullptr, *dst = nullptr;
  void make_files() {
    src = file(image(image_size));
    fill(src, 0, image_size, 3);
    dst = file(image(image_size));
  }
  // A guest write of `len` bytes of `byte` at `off`, submitted and left running.
  struct guest {
    std::vector<char> buf;
    io_request r;
    waiter w;
  };
  std::unique_ptr<guest> write(int64_t off, int64_t len, char byte) {
    auto g = std::make_unique<guest>();
    g->buf.assign(size_t(len), byte);
    g->r.op = io_op::write;
    g->r.offset = off;
    g->r.set_buffer(g->buf.data(), len);
    g->r.waiter = &g->w;
    src->submit(g->r);
    return g;
  }
  std::vector<char> read(node* n, int64_t off, int64_t len) {
    std::vector<char> b(static_cast<size_t>(len));
    EXPECT_EQ(io(n, io_op::read, off, len, b.data()), 0);
    return b;
  }
};

TEST_F(mirror_fixture, a_guest_write_completes_once_the_target_has_it) {
  make_files();
  seen sn;
  copy_engine e({.source = src, .target = dst, .granularity = 64 * K}, sn.cbs());
  int64_t synced = 0;
  mirror_hook h(*src, *dst, e, {.synced = [&](int64_t n) { synced += n; }});
  h.set_write_blocking();
  src->add_write_hook(&h);
  e.start();  // nothing to copy: only the guest's writes reach the target
  recorder rec(dst);
  rec.hold = true;
  auto g = write(128 * K, 64 * K, 0x5a);
  run_until([&] { return rec.held.size() == 1; });
  spin();
  EXPECT_EQ(g->w.calls, 0) << "completed before the target had the write";
  rec.release_all();
  run_until([&] { return g->w.calls == 1; });
  EXPECT_EQ(g->r.result, 0);
  EXPECT_EQ(read(dst, 128 * K, 64 * K), g->buf);
  EXPECT_EQ(synced, 64 * K);
  EXPECT_EQ(e.work_map().dirty_bytes(), 0) << "a chunk written whole to both sides needs no copy";
  h.stop();
  src->remove_write_hook(&h);
}

TEST_F(mirror_fixture, a_guest_write_waits_for_the_copy_of_its_chunk) {
  make_files();
  seen sn;
  copy_engine e({.source = src, .target = dst, .granularity = 64 * K, .max_chunk = 64 * K}, sn.cbs());
  mirror_hook h(*src, *dst, e, {});
  h.set_write_blocking();
  src->add_write_hook(&h);
  recorder src_seen(src, false);  // counts what reached the source's driver
  recorder rec(dst);
  rec.hold = true;
  e.work_map().set(0, 64 * K);
  e.start();
  run_until([&] { return rec.held.size() == 1; });  // the copy of chunk 0 is writing the target
  auto g = write(4 * K, 4 * K, 0x33);
  spin();
  EXPECT_EQ(src_seen.writes, 0) << "the guest write overtook the copy of its chunk";
  // The copy finishes; then the guest write goes to both sides (held on the target again).
  rec.release_held();
  run_until([&] { return rec.held.size() == 1; });
  EXPECT_EQ(rec.held[0]->offset, 4 * K);
  rec.release_all();
  run_until([&] { return g->w.calls == 1; });
  EXPECT_EQ(rec.overlaps, 0);
  EXPECT_EQ(read(dst, 0, 64 * K), read(src, 0, 64 * K)) << "an older copy landed over the newer write";
  h.stop();
  src->remove_write_hook(&h);
}

TEST_F(mirror_fixture, active_writes_and_copies_never_overlap_and_end_equal) {
  make_files();
  seen sn;
  copy_engine e({.source = src, .target = dst, .granularity = 64 * K, .max_chunk = 256 * K, .max_workers = 8},
                sn.cbs());
  bool drained = false;
  mirror_hook h(*src, *dst, e, {.drained = [&] { drained = true; }});
  h.set_write_blocking();
  src->add_write_hook(&h);
  recorder rec(dst);
  rec.hold = true;
  e.work_map().set(0, image_size);
  e.start();
  std::mt19937 rng(11);
  std::vector<std::unique_ptr<guest>> gs;
  for (int i = 0; i < 200; ++i) {
    int64_t len = int64_t(4 * K) << (rng() % 4);
    int64_t off = int64_t(rng() % uint32_t((image_size - len) / (4 * K))) * 4 * K;
    gs.push_back(write(off, len, char(i | 1)));
    s->loop.turn();
    if (i % 4 == 3) rec.release_held();
  }
  rec.release_all();
  run_until([&] {
    for (auto& g : gs)
      if (!g->w.calls) return false;
    return e.idle();
  });
  EXPECT_EQ(rec.overlaps, 0) << "two writers of one range on the target at once";
  EXPECT_EQ(read_all(dst), read_all(src));
  h.stop();
  EXPECT_TRUE(drained);
  src->remove_write_hook(&h);
}

TEST_F(mirror_fixture, a_failed_target_write_completes_on_the_source_and_stays_dirty) {
  src = file(image(image_size));
  node* f = file(image(image_size));
  node* d = s->open_with("blkdebug", {{"inject-error", boost::json::array{boost::json::object{
                                          {"event", "write_aio"}, {"iotype", "write"}, {"errno", EIO}}}}},
                         {{"image", f}});
  node* bad = s->open("raw", {}, d);
  dst = bad;
  seen sn;
  copy_engine e({.source = src, .target = dst, .granularity = 64 * K}, sn.cbs());
  int failed = 0;
  mirror_hook h(*src, *dst, e, {.target_failed = [&](int err) { failed = err; }});
  h.set_write_blocking();
  src->add_write_hook(&h);
  auto g = write(0, 64 * K, 0x44);
  run_until([&] { return g->w.calls == 1; });
  EXPECT_EQ(g->r.result, 0) << "the guest gets the source's result";
  EXPECT_EQ(failed, EIO);
  EXPECT_EQ(e.work_map().dirty_bytes(), 64 * K) << "the chunk is copied again later";
  EXPECT_EQ(read(src, 0, 64 * K), g->buf);
  h.stop();
  src->remove_write_hook(&h);
}

}  // namespace
}  // namespace blockd::block

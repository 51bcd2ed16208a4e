// Dirty bitmaps, the bitmap rules and write hooks on a node (null-co on a local loop); test thread.
#include <gtest/gtest.h>

#include <cstring>

#include "storage/block/bitmap_ops.h"
#include "storage/block/dirty_bitmap.h"
#include "storage/block/local_loop.h"
#include "storage/block/node.h"
#include "storage/io/reactor.h"

namespace blockd::block {
namespace {

TEST(dirty_bitmap, set_widens_to_granules_and_counts_bytes) {
  dirty_bitmap b("b", 65536, 10 * 65536 + 100);  // a partial last granule
  EXPECT_EQ(11u, b.bits());
  b.set(1, 1);
  EXPECT_EQ(65536, b.dirty_bytes());
  b.set(65535, 2);  // straddles two granules
  EXPECT_EQ(2u, b.dirty_granules());
  b.set(10 * 65536 + 50, 1);  // the last granule counts its real length
  EXPECT_EQ(2 * 65536 + 100, b.dirty_bytes());
  EXPECT_TRUE(b.get(65536));
  EXPECT_FALSE(b.get(2 * 65536));
}

TEST(dirty_bitmap, reset_cleans_only_whole_granules) {
  dirty_bitmap b("b", 4096, 64 * 4096);
  b.set(0, 64 * 4096);
  b.reset(100, 4096);  // covers no granule whole
  EXPECT_EQ(64u, b.dirty_granules());
  b.reset(4096, 3 * 4096);
  EXPECT_EQ(61u, b.dirty_granules());
  b.clear();
  EXPECT_EQ(0, b.dirty_bytes());
}

TEST(dirty_bitmap, runs_and_next_dirty) {
  dirty_bitmap b("b", 512, 1 << 20);
  b.set(200 * 512, 512 * 300);  // spans words
  bool dirty = true;
  EXPECT_EQ(200 * 512, b.run_end(0, 1 << 20, dirty));
  EXPECT_FALSE(dirty);
  EXPECT_EQ(500 * 512, b.run_end(200 * 512, 1 << 20, dirty));
  EXPECT_TRUE(dirty);
  EXPECT_EQ(300 * 512, b.run_end(250 * 512 + 7, 300 * 512, dirty));  // capped by the limit
  EXPECT_EQ(1 << 20, b.run_end(500 * 512, 1 << 20, dirty));
  EXPECT_FALSE(dirty);
  EXPECT_EQ(200 * 512, b.next_dirty(0));
  EXPECT_EQ(210 * 512 + 3, b.next_dirty(210 * 512 + 3));
  EXPECT_EQ(-1, b.next_dirty(500 * 512));
}

TEST(dirty_bitmap, merge_across_granularities_and_resize) {
  dirty_bitmap a("a", 65536, 1 << 22), b("b", 4096, 1 << 22);
  b.set(70000, 10);
  a.merge_from(b);
  EXPECT_TRUE(a.get(65536));
  EXPECT_EQ(1u, a.dirty_granules());
  dirty_bitmap c("c", 4096, 1 << 22);
  c.merge_from(a);  // a coarse granule dirties every fine one it covers
  EXPECT_EQ(16u, c.dirty_granules());
  c.resize(65536 + 4096);  // shrinking drops what lies beyond
  EXPECT_EQ(1u, c.dirty_granules());
  c.resize(1 << 22);  // growing adds clean granules
  EXPECT_EQ(1u, c.dirty_granules());
}

TEST(dirty_bitmap, bytes_round_trip_lsb_first) {
  dirty_bitmap a("a", 512, 512 * 20);
  a.set(0, 512);
  a.set(9 * 512, 512);
  auto bytes = a.to_bytes(0, 20);
  ASSERT_EQ(3u, bytes.size());
  EXPECT_EQ(0x01, bytes[0]);
  EXPECT_EQ(0x02, bytes[1]);
  dirty_bitmap b("b", 512, 512 * 20);
  b.load_bytes(0, bytes.data(), 20);
  EXPECT_TRUE(a.same_bits(b));
  b.fill(16, 4, true);
  EXPECT_EQ(6u, b.dirty_granules());
}

TEST(dirty_bitmap, digest_matches_qemus_for_an_empty_bitmap) {
  // QSD 7.2 answers this digest for an empty 64 KiB-granularity bitmap of a 64 MiB node: 16 zero
  // words hashed.
  dirty_bitmap b("b", 65536, 64 << 20);
  EXPECT_EQ("38723a2e5e8a17aa7950dc008209944e898f69a7bd10a23c839d341e935fd5ca", b.sha256());
  b.set(0, 1);
  EXPECT_NE("38723a2e5e8a17aa7950dc008209944e898f69a7bd10a23c839d341e935fd5ca", b.sha256());
}

// ---- on a node --------------------------------------------------------------------------------

struct done_count final : io_waiter {
  int calls = 0;
  void io_done(io_request&) override { ++calls; }
};

struct null_node {
  local_loop loop{io::reactor::create_poll()};
  std::unique_ptr<node> n;
  explicit null_node(bool discard_unmap = true) {
    boost::json::object opts{{"size", 1 << 20}};
    open_args a{opts, {}, loop.env()};
    auto drv = find_driver("null-co")->open(a);
    EXPECT_TRUE(drv.has_value());
    node_settings s;
    s.name = "n0";
    s.driver = "null-co";
    s.discard_unmap = discard_unmap;
    n = std::make_unique<node>(std::move(s), std::move(*drv), loop.env(), a.bitmaps);
    n->publish_facts();
  }
  int run(io_op op, int64_t off, int64_t len) {
    static char buf[1 << 16];
    done_count w;
    io_request r;
    r.op = op;
    r.offset = off;
    if (op == io_op::write || op == io_op::read)
      r.set_buffer(buf, len);
    else
      r.length = len;
    r.waiter = &w;
    n->submit(r);
    while (!w.calls) loop.turn();
    return r.result;
  }
};

TEST(bitmap_hook, every_write_kind_dirties_recording_bitmaps_only) {
  register_builtin_drivers();
  null_node t;
  auto on = add_bitmap(*t.n, {.name = "on", .granularity = 4096});
  auto off = add_bitmap(*t.n, {.name = "off", .granularity = 4096, .disabled = true});
  ASSERT_TRUE(on && off);
  EXPECT_EQ(65536u, default_granularity(*t.n));  // no clusters: 64 KiB
  EXPECT_EQ(0, t.run(io_op::write, 0, 512));
  EXPECT_EQ(0, t.run(io_op::write_zeroes, 8192, 4096));
  EXPECT_EQ(0, t.run(io_op::discard, 65536, 8192));
  EXPECT_EQ(0, t.run(io_op::read, 131072, 4096));  // reads never dirty
  EXPECT_EQ(4u, (*on)->dirty_granules());
  EXPECT_EQ(0u, (*off)->dirty_granules());
  // Newest first, as QEMU lists them.
  auto f = t.n->bitmaps().facts();
  ASSERT_EQ(2u, f.size());
  EXPECT_EQ("off", f[0].name);
  EXPECT_FALSE(f[0].recording);
  EXPECT_EQ(4 * 4096, f[1].count);
}

TEST(bitmap_hook, ignored_discards_and_invalid_requests_do_not_dirty) {
  register_builtin_drivers();
  null_node t(/*discard_unmap=*/false);
  auto b = add_bitmap(*t.n, {.name = "b"});
  ASSERT_TRUE(b);
  EXPECT_EQ(0, t.run(io_op::discard, 0, 65536));     // discard=ignore: storage never sees it
  EXPECT_NE(0, t.run(io_op::write, (1 << 20) - 512, 1024));  // past the end: refused
  EXPECT_EQ(0u, (*b)->dirty_granules());
}

TEST(bitmap_rules, qemus_texts) {
  register_builtin_drivers();
  null_node t;
  EXPECT_EQ("Granularity must be power of 2 and at least 512",
            add_bitmap(*t.n, {.name = "g", .granularity = 256}).error().desc);
  EXPECT_EQ("Granularity must be power of 2 and at least 512",
            add_bitmap(*t.n, {.name = "g", .granularity = 3000}).error().desc);
  EXPECT_EQ("Can't store persistent bitmaps to n0: Operation not supported",
            add_bitmap(*t.n, {.name = "p", .persistent = true}).error().desc);
  ASSERT_TRUE(add_bitmap(*t.n, {.name = "a"}));
  EXPECT_EQ("Bitmap already exists: a", add_bitmap(*t.n, {.name = "a"}).error().desc);
  EXPECT_EQ("Bitmap name too long: " + std::string(1024, 'x'),
            add_bitmap(*t.n, {.name = std::string(1024, 'x')}).error().desc);
  EXPECT_TRUE(add_bitmap(*t.n, {.name = std::string(1023, 'y')}));
  EXPECT_EQ("Dirty bitmap 'nope' not found", find_bitmap(*t.n, "nope").error().desc);
  dirty_bitmap* a = *find_bitmap(*t.n, "a");
  a->busy = true;
  EXPECT_EQ("Bitmap 'a' is currently in use by another operation and cannot be used",
            prepare_remove(*t.n, "a").error().desc);
  a->busy = false;
  a->readonly = true;
  EXPECT_EQ("Bitmap 'a' is readonly and cannot be modified", check_bitmap(*a, need_default).error().desc);
  EXPECT_TRUE(check_bitmap(*a, need_allow_ro));
  a->readonly = false;
  a->inconsistent = true;
  EXPECT_EQ("Bitmap 'a' is inconsistent and cannot be used", check_bitmap(*a, need_allow_ro).error().desc);
  EXPECT_TRUE(prepare_remove(*t.n, "a"));  // an inconsistent bitmap can still be removed
  release_bitmap(*t.n, "a");
  EXPECT_FALSE(t.n->bitmaps().find("a"));
}

// A gating hook holds writes until it lets them go (what copy-before-write will do).
struct holding_hook final : write_hook {
  std::vector<io_request*> held;
  int after = 0;
  holding_hook() { gates = true; }
  bool before_write(io_request& r) override {
    held.push_back(&r);
    return false;
  }
  void after_write(const io_request&) override { ++after; }
};

TEST(write_hook, a_gating_hook_holds_the_write_until_released) {
  register_builtin_drivers();
  null_node t;
  holding_hook h;
  t.n->add_write_hook(&h);
  static char buf[512];
  done_count w;
  io_request r;
  r.op = io_op::write;
  r.set_buffer(buf, 512);
  r.waiter = &w;
  t.n->submit(r);
  for (int i = 0; i < 10; ++i) t.loop.turn();
  ASSERT_EQ(1u, h.held.size());
  EXPECT_EQ(0, w.calls);
  t.n->release_write(*h.held[0]);
  while (!w.calls) t.loop.turn();
  EXPECT_EQ(1, h.after);
  t.n->remove_write_hook(&h);
  EXPECT_EQ(0, t.run(io_op::write, 0, 512));
  EXPECT_EQ(1, h.after);  // a removed hook sees nothing more
}

TEST(export_bitmaps, lookup_order_checks_and_busy_until_the_last_release) {
  register_builtin_drivers();
  null_node t;
  auto en = add_bitmap(*t.n, {.name = "en"});
  auto dis = add_bitmap(*t.n, {.name = "dis", .disabled = true});
  ASSERT_TRUE(en && dis);
  auto ref = [&](std::string name) {
    export_bitmap_ref r;
    r.name = std::move(name);
    r.chain = {t.n.get()};
    return r;
  };
  // The first entry that fails names the error; nothing is held then.
  auto r = hold_export_bitmaps({ref("dis"), ref("nope"), ref("en")}, true);
  ASSERT_FALSE(r);
  EXPECT_EQ("Bitmap 'nope' is not found", r.error().desc);
  EXPECT_FALSE((*dis)->busy);
  r = hold_export_bitmaps({ref("en")}, true);
  ASSERT_FALSE(r);
  EXPECT_EQ("Enabled bitmap 'en' incompatible with readonly export", r.error().desc);
  // {node, name}: no read-only rule; a missing bitmap has the command's text.
  export_bitmap_ref ext;
  ext.name = "en";
  ext.owner = t.n.get();
  EXPECT_TRUE(hold_export_bitmaps({ext}, true).has_value());
  EXPECT_TRUE((*en)->busy);
  ext.name = "gone";
  EXPECT_EQ("Dirty bitmap 'gone' not found", hold_export_bitmaps({ext}, true).error().desc);
  // Listed twice in one export: held twice, free after both releases.
  auto twice = hold_export_bitmaps({ref("dis"), ref("dis")}, true);
  ASSERT_TRUE(twice);
  EXPECT_EQ(2, (*dis)->export_users);
  EXPECT_EQ("Bitmap 'dis' is currently in use by another operation and cannot be used",
            hold_export_bitmaps({ref("dis")}, false).error().desc);
  EXPECT_FALSE(prepare_remove(*t.n, "dis").has_value());
  release_export_bitmaps({(*twice)[0]});
  EXPECT_TRUE((*dis)->busy);
  release_export_bitmaps({(*twice)[1]});
  EXPECT_FALSE((*dis)->busy);
  EXPECT_TRUE(prepare_remove(*t.n, "dis").has_value());
  (*en)->inconsistent = true;
  (*en)->busy = false;
  (*en)->export_users = 0;
  EXPECT_EQ("Bitmap 'en' is inconsistent and cannot be used", hold_export_bitmaps({ref("en")}, false).error().desc);
}

}  // namespace
}  // namespace blockd::block

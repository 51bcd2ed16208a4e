// blkdebug and blkverify through nodes on a local loop: rules firing where they should and nowhere else, limits, validation, mismatch detection; test thread.
#include <fcntl.h>
#include <unistd.h>

#include "tests/drivers/conformance_stacks.h"

namespace blockd::block {
namespace {

struct debug_fixture : ::testing::Test {
  std::unique_ptr<stack> s;
  node* file = nullptr;

  void make(bool checks = true) {
    s = std::make_unique<stack>(false, 256, checks);
    s->path = temp_image(image_size);
    file = s->open("file", {{"filename", s->path}});
  }
  // A stack whose file node holds a fresh qcow2 image; false when qemu-img is missing.
  bool make_qcow2() {
    s = std::make_unique<stack>(false, 256, true);
    s->path = temp_image(0);
    if (std::system(("qemu-img create -q -f qcow2 " + s->path + " 4M >/dev/null 2>&1").c_str()) != 0) return false;
    file = s->open("file", {{"filename", s->path}});
    return true;
  }
  // The same with qemu-img options (small clusters make refcount blocks fill up quickly).
  bool make_qcow2_with(const std::string& opts, const std::string& size) {
    s = std::make_unique<stack>(false, 256, true);
    s->path = temp_image(0);
    return std::system(("qemu-img create -q -f qcow2 -o " + opts + " " + s->path + " " + size + " >/dev/null 2>&1").c_str()) == 0 &&
           (file = s->open("file", {{"filename", s->path}})) != nullptr;
  }
  node* blkdebug(boost::json::object o) { return s->open_with("blkdebug", std::move(o), {{"image", file}}); }
  // raw over blkdebug: raw announces read_aio / write_aio on its child, as in QEMU.
  node* raw_over(boost::json::object o) {
    node* d = blkdebug(std::move(o));
    return s->open("raw", {}, d);
  }
  result<std::unique_ptr<block_driver>> try_open(const std::string& drv, boost::json::object o) {
    open_args a{o, {}, s->loop.env()};
    a.set_child("image", file);
    return find_driver(drv)->open(a);
  }

  int run(node* n, io_op op, int64_t off, int64_t len, bool* sync = nullptr) {
    std::vector<char> buf(size_t(std::max<int64_t>(len, 1)), 'x');
    io_request r;
    r.op = op;
    r.offset = off;
    r.length = len;
    if (op == io_op::read || op == io_op::write) r.set_buffer(buf.data(), len);
    waiter w;
    r.waiter = &w;
    n->submit(r);
    if (sync) *sync = w.calls > 0;
    EXPECT_EQ(w.calls, 0) << "completed synchronously";
    s->loop.until([&] { return w.calls > 0; });
    EXPECT_EQ(w.calls, 1);
    return r.result;
  }
  static boost::json::object rule(boost::json::object r) { return {{"inject-error", boost::json::array{r}}}; }
};

TEST_F(debug_fixture, rule_fires_on_its_event_only) {
  make();
  node* top = raw_over(rule({{"event", "read_aio"}, {"iotype", "read"}}));
  EXPECT_EQ(run(top, io_op::write, 0, 4096), 0);  // write_aio: not the rule's event
  EXPECT_EQ(run(top, io_op::read, 0, 4096), -EIO);
  EXPECT_EQ(run(top, io_op::read, 65536, 4096), -EIO);
  EXPECT_EQ(run(top, io_op::write, 0, 4096), 0);  // the rule is for reads
  EXPECT_EQ(file->stats().rd.operations.get(), 0u) << "a failed read must not reach the image";
}

TEST_F(debug_fixture, no_event_no_failure) {
  make();
  node* d = blkdebug(rule({{"event", "read_aio"}}));
  // Straight to blkdebug: nothing above raises read_aio.
  EXPECT_EQ(run(d, io_op::read, 0, 4096), 0);
  EXPECT_EQ(run(d, io_op::write, 0, 4096), 0);
  EXPECT_EQ(run(d, io_op::flush, 0, 0), 0);
}

TEST_F(debug_fixture, sector_errno_once_immediately) {
  make();
  node* top = raw_over(rule({{"event", "read_aio"}, {"sector", 8}, {"errno", ENOSPC}, {"once", true}}));
  EXPECT_EQ(run(top, io_op::read, 0, 4096), 0);       // sectors 0..7
  EXPECT_EQ(run(top, io_op::read, 8192, 4096), 0);    // sectors 16..23
  EXPECT_EQ(run(top, io_op::read, 4096, 512), -ENOSPC);
  EXPECT_EQ(run(top, io_op::read, 4096, 512), 0);     // once
  make();
  top = raw_over(rule({{"event", "write_aio"}, {"immediately", true}, {"errno", EROFS}}));
  bool sync = true;
  EXPECT_EQ(run(top, io_op::write, 0, 4096, &sync), -EROFS);
  EXPECT_FALSE(sync);
  EXPECT_EQ(file->stats().wr.operations.get(), 0u);
}

TEST_F(debug_fixture, iotypes_of_other_ops) {
  make();
  // The write_aio of one write activates rules for every other type of request that follows.
  node* top = raw_over({{"inject-error", boost::json::array{boost::json::object{{"event", "write_aio"}, {"iotype", "flush"}},
                                                            boost::json::object{{"event", "write_aio"}, {"iotype", "discard"}, {"errno", EPERM}}}}});
  EXPECT_EQ(run(top, io_op::flush, 0, 0), 0);
  EXPECT_EQ(run(top, io_op::write, 0, 4096), 0);
  EXPECT_EQ(run(top, io_op::flush, 0, 0), -EIO);
  EXPECT_EQ(run(top, io_op::discard, 0, 4096), -EPERM);
  EXPECT_EQ(run(top, io_op::write_zeroes, 0, 4096), 0);
  EXPECT_EQ(run(top, io_op::block_status, 0, 4096), 0);
}

TEST_F(debug_fixture, set_state_transitions) {
  make();
  boost::json::object o{{"inject-error", boost::json::array{boost::json::object{{"event", "read_aio"}, {"state", 3}}}},
                        {"set-state", boost::json::array{boost::json::object{{"event", "write_aio"}, {"state", 1}, {"new_state", 2}},
                                                         boost::json::object{{"event", "write_aio"}, {"state", 2}, {"new_state", 3}}}}};
  node* top = raw_over(o);
  EXPECT_EQ(run(top, io_op::read, 0, 512), 0);   // state 1
  EXPECT_EQ(run(top, io_op::write, 0, 512), 0);  // -> 2
  EXPECT_EQ(run(top, io_op::read, 0, 512), 0);
  EXPECT_EQ(run(top, io_op::write, 0, 512), 0);  // -> 3
  EXPECT_EQ(run(top, io_op::read, 0, 512), -EIO);
}

TEST_F(debug_fixture, config_file_rules) {
  make();
  std::string cfg = s->path + ".cfg";
  s->extra_paths.push_back(cfg);
  FILE* f = fopen(cfg.c_str(), "w");
  ASSERT_TRUE(f);
  fputs("[inject-error]\nevent = \"read_aio\"\nerrno = \"61\"\n", f);
  fclose(f);
  node* top = raw_over({{"config", cfg}});
  EXPECT_EQ(run(top, io_op::read, 0, 512), -61);
}

TEST_F(debug_fixture, qcow2_events_reach_blkdebug) {
  if (!make_qcow2()) GTEST_SKIP() << "qemu-img is not installed";
  // The first allocating write updates the L1 table: that write fails, once.
  node* d = blkdebug(rule({{"event", "l1_update"}, {"iotype", "write"}, {"once", true}, {"errno", ENOSPC}}));
  node* q = s->open("qcow2", {}, d);
  EXPECT_EQ(run(q, io_op::write, 0, 4096), -ENOSPC);
  EXPECT_EQ(run(q, io_op::write, 0, 4096), 0);
  EXPECT_EQ(run(q, io_op::read, 0, 4096), 0);
}

TEST_F(debug_fixture, qcow2_flush_to_disk) {
  if (!make_qcow2()) GTEST_SKIP() << "qemu-img is not installed";
  node* d = blkdebug(rule({{"event", "flush_to_disk"}, {"iotype", "flush"}, {"once", true}}));
  node* q = s->open("qcow2", {}, d);
  EXPECT_EQ(run(q, io_op::read, 0, 4096), 0);
  EXPECT_EQ(run(q, io_op::flush, 0, 0), -EIO);
  EXPECT_EQ(run(q, io_op::flush, 0, 0), 0);
}

// The block layer's events on the blkdebug node itself: pwritev before a write, pwritev_zero before a
// zero write, pwritev_done after either (QEMU's bdrv_aligned_pwritev); reads and flushes raise none.
TEST_F(debug_fixture, pwritev_events_on_the_node_itself) {
  make();
  node* d = blkdebug(rule({{"event", "pwritev"}, {"iotype", "write"}, {"errno", ENOSPC}}));
  EXPECT_EQ(run(d, io_op::read, 0, 4096), 0);
  EXPECT_EQ(run(d, io_op::write_zeroes, 0, 4096), 0);
  EXPECT_EQ(run(d, io_op::write, 0, 4096), -ENOSPC);
  make();
  d = blkdebug(rule({{"event", "pwritev_zero"}, {"iotype", "write-zeroes"}, {"once", true}}));
  EXPECT_EQ(run(d, io_op::write, 0, 4096), 0);
  EXPECT_EQ(run(d, io_op::write_zeroes, 0, 4096), -EIO);
  EXPECT_EQ(run(d, io_op::write_zeroes, 0, 4096), 0);
  make();
  d = blkdebug(rule({{"event", "pwritev_done"}, {"iotype", "read"}}));
  EXPECT_EQ(run(d, io_op::read, 0, 4096), 0);
  EXPECT_EQ(run(d, io_op::flush, 0, 0), 0);
  EXPECT_EQ(run(d, io_op::read, 0, 4096), 0);
  EXPECT_EQ(run(d, io_op::write, 0, 4096), 0) << "the rule comes into force after the write";
  EXPECT_EQ(run(d, io_op::read, 0, 4096), -EIO);
}

// blkdebug's zero and discard limits reach the node, which sends the pieces: a rule with a sector
// fails only the piece covering it, and a piece below the alignment is written as data instead.
TEST_F(debug_fixture, zero_write_pieces_meet_rules) {
  make();
  auto zrule = [](const char* iotype, int64_t sector) {
    return boost::json::object{{"opt-write-zero", 4096}, {"max-write-zero", 16384},
                               {"inject-error", boost::json::array{boost::json::object{
                                                    {"event", "pwritev_zero"}, {"iotype", iotype}, {"sector", sector}}}}};
  };
  EXPECT_EQ(run(blkdebug(zrule("write-zeroes", 2)), io_op::write_zeroes, 1000, 70000), 0) << "the head piece is data";
  EXPECT_EQ(run(blkdebug(zrule("write-zeroes", 8)), io_op::write_zeroes, 1000, 70000), -EIO);
  EXPECT_EQ(run(blkdebug(zrule("write", 2)), io_op::write_zeroes, 1000, 70000), -EIO);
  EXPECT_EQ(run(blkdebug(zrule("write", 40)), io_op::write_zeroes, 1000, 70000), 0) << "bulk pieces are zero writes";
  EXPECT_EQ(run(blkdebug(zrule("write", 137)), io_op::write_zeroes, 1000, 70000), -EIO) << "the tail is data";
}

TEST_F(debug_fixture, qcow2_cow_read) {
  if (!make_qcow2()) GTEST_SKIP() << "qemu-img is not installed";
  node* d = blkdebug(rule({{"event", "cow_read"}, {"iotype", "read"}, {"once", true}, {"errno", ENOSPC}}));
  node* q = s->open("qcow2", {}, d);
  EXPECT_EQ(run(q, io_op::write, 0, 65536), 0) << "a whole new cluster: nothing to copy";
  EXPECT_EQ(run(q, io_op::write, 65536, 4096), 0) << "a new cluster over nothing: nothing to copy";
  ASSERT_TRUE(q->driver().snapshot_create("s1", 0, 0));
  EXPECT_EQ(run(q, io_op::write, 0, 4096), -ENOSPC) << "a shared cluster: the rest is copied first";
  EXPECT_EQ(run(q, io_op::write, 0, 4096), 0);
}

TEST_F(debug_fixture, qcow2_compressed_write_events) {
  if (!make_qcow2()) GTEST_SKIP() << "qemu-img is not installed";
  for (const char* ev : {"write_compressed", "cluster_alloc_bytes", "l2_update_compressed"}) {
    make_qcow2();
    node* d = blkdebug(rule({{"event", ev}, {"once", true}, {"errno", ENOSPC}}));
    node* q = s->open("qcow2", {}, d);
    EXPECT_EQ(run(q, io_op::write, 0, 65536), 0) << ev << ": a plain write raises none";
    std::vector<char> buf(65536, 'c');
    io_request r;
    r.op = io_op::write;
    r.flags = io_compress;
    r.offset = 65536;
    r.set_buffer(buf.data(), 65536);
    waiter w;
    r.waiter = &w;
    q->submit(r);
    s->loop.until([&] { return w.calls > 0; });
    if (std::string(ev) == "l2_update_compressed") {
      // Raised after the data went out, before the L2 entry changes in the cache: the rule fails the
      // next request that reaches the image.
      EXPECT_EQ(r.result, 0) << ev;
      EXPECT_EQ(run(q, io_op::flush, 0, 0), -ENOSPC) << ev;
    } else {
      EXPECT_EQ(r.result, -ENOSPC) << ev;  // the compressed data write fails
    }
  }
}

TEST_F(debug_fixture, qcow2_reftable_load_at_open) {
  if (!make_qcow2()) GTEST_SKIP() << "qemu-img is not installed";
  node* d = blkdebug(rule({{"event", "reftable_load"}, {"iotype", "read"}, {"errno", ENOSPC}}));
  EXPECT_EQ(s->open_with("qcow2", {}, {{"file", d}}), nullptr);
  EXPECT_NE(s->open_error.find("refcount table"), std::string::npos) << s->open_error;
}

TEST_F(debug_fixture, qcow2_cluster_free_on_discard) {
  if (!make_qcow2()) GTEST_SKIP() << "qemu-img is not installed";
  node* d = blkdebug(rule({{"event", "cluster_free"}, {"errno", ENOSPC}}));
  node* q = s->open("qcow2", {{"discard", "unmap"}}, d);
  EXPECT_EQ(run(q, io_op::write, 0, 65536), 0);
  EXPECT_EQ(run(q, io_op::write, 65536, 65536), 0);
  EXPECT_EQ(run(q, io_op::flush, 0, 0), 0) << "nothing freed yet";
  EXPECT_EQ(run(q, io_op::read, 65536, 4096), 0);
  (void)run(q, io_op::discard, 0, 65536);
  (void)run(q, io_op::flush, 0, 0);  // the frees happen by the next metadata writeback at the latest
  EXPECT_EQ(run(q, io_op::read, 65536, 4096), -ENOSPC) << "the freeing activated the rule";
}

// Refcount block allocation and refcount table growth, step by step (QEMU's alloc_refcount_block and
// qcow2_refcount_area): with 512-byte clusters a refcount block covers 128 KiB of the file and the first
// table 64 blocks, so writing 12 MiB needs new blocks and, past 8 MiB, a bigger table. The rule fails
// the request right after the event once; every write before it, which allocates no such thing, passes.
TEST_F(debug_fixture, qcow2_refcount_allocation_events) {
  if (!make_qcow2_with("cluster_size=512", "16M")) GTEST_SKIP() << "qemu-img is not installed";
  for (const char* ev : {"refblock_alloc", "refblock_alloc_write", "refblock_alloc_hookup", "reftable_grow",
                         "refblock_alloc_write_blocks", "refblock_alloc_write_table", "refblock_alloc_switch_table"}) {
    ASSERT_TRUE(make_qcow2_with("cluster_size=512", "16M"));
    node* d = blkdebug(rule({{"event", ev}, {"once", true}, {"errno", ENOSPC}}));
    node* q = s->open("qcow2", {}, d);
    int failed_at = -1, res = 0;
    for (int i = 0; i < 192 && failed_at < 0; ++i) {
      res = run(q, io_op::write, int64_t(i) * 65536, 65536);
      if (res) failed_at = i;
    }
    EXPECT_EQ(res, -ENOSPC) << ev;
    EXPECT_GT(failed_at, 0) << ev << ": the first write allocates no refcount block";
  }
}

TEST_F(debug_fixture, align_is_enforced) {
  make();
  node* d = blkdebug({{"align", 4096}});
  EXPECT_EQ(d->driver().limits().request_alignment, 4096u);
  EXPECT_EQ(run(d, io_op::read, 512, 512), -EINVAL);
  EXPECT_EQ(run(d, io_op::read, 4096, 4096), 0);
}

TEST_F(debug_fixture, max_transfer_splits) {
  make(false);  // the contract checker would (rightly) refuse a request over the advertised limit
  node* d = blkdebug({{"max-transfer", 4096}, {"opt-discard", 8192}, {"max-discard", 65536},
                      {"opt-write-zero", 4096}, {"max-write-zero", 16384}});
  auto l = d->driver().limits();
  EXPECT_EQ(l.max_transfer, 4096);
  EXPECT_EQ(l.opt_discard, 8192);
  EXPECT_EQ(l.max_discard, 65536);
  EXPECT_EQ(l.opt_write_zeroes, 4096);
  EXPECT_EQ(l.max_write_zeroes, 16384);
  std::vector<char> data(16384);
  for (size_t i = 0; i < data.size(); ++i) data[i] = char(i * 7 + 3);
  io_request r;
  r.op = io_op::write;
  r.offset = 4096;
  r.set_buffer(data.data(), int64_t(data.size()));
  waiter w;
  r.waiter = &w;
  d->submit(r);
  s->loop.until([&] { return w.calls > 0; });
  EXPECT_EQ(r.result, 0);
  EXPECT_EQ(file->stats().wr.operations.get(), 4u) << "16 KiB in 4 KiB pieces";
  std::vector<char> back(16384);
  io_request rd;
  rd.op = io_op::read;
  rd.offset = 4096;
  rd.set_buffer(back.data(), int64_t(back.size()));
  waiter w2;
  rd.waiter = &w2;
  d->submit(rd);
  s->loop.until([&] { return w2.calls > 0; });
  EXPECT_EQ(rd.result, 0);
  EXPECT_EQ(back, data);
  EXPECT_EQ(file->stats().rd.operations.get(), 4u);
}

TEST_F(debug_fixture, validation_texts) {
  make();
  auto err = [&](boost::json::object o) {
    auto r = try_open("blkdebug", std::move(o));
    return r ? std::string() : r.error().desc;
  };
  EXPECT_EQ(err({{"align", 3}}), "Cannot meet constraints with align 3");
  EXPECT_EQ(err({{"align", int64_t(1) << 31}}), "Cannot meet constraints with align 2147483648");
  EXPECT_EQ(err({{"align", -1}}), "Parameter 'align' expects a non-negative number below 2^64");
  EXPECT_EQ(err({{"align", 4096}, {"max-transfer", 1000}}), "Cannot meet constraints with max-transfer 1000");
  EXPECT_EQ(err({{"align", 512}, {"opt-write-zero", 100}}), "Cannot meet constraints with opt-write-zero 100");
  EXPECT_EQ(err({{"opt-write-zero", 1024}, {"max-write-zero", 1536}}), "Cannot meet constraints with max-write-zero 1536");
  EXPECT_EQ(err({{"opt-discard", 1024}, {"max-discard", 1536}}), "Cannot meet constraints with max-discard 1536");
  EXPECT_EQ(err({{"max-discard", 100}, {"align", 512}}), "Cannot meet constraints with max-discard 100");
  EXPECT_EQ(err({{"config", ""}}), "Could not read blkdebug config file: No such file or directory");
  EXPECT_EQ(err({{"align", 0}, {"max-transfer", 100}}), "");
  EXPECT_EQ(err({{"align", 512}, {"max-transfer", 1536}}), "");
}

TEST_F(debug_fixture, child_permissions) {
  make();
  node* d = blkdebug({{"take-child-perms", boost::json::array{"resize"}},
                      {"unshare-child-perms", boost::json::array{"write"}}});
  uint32_t perm = 0, shared = 0;
  d->driver().child_perm("image", false, perm_consistent_read, perm_all, perm, shared);
  EXPECT_EQ(perm, uint32_t(perm_consistent_read | perm_resize));
  EXPECT_EQ(shared, uint32_t(perm_all & ~perm_write));
}

// ---- blkverify ----

struct verify_fixture : debug_fixture {
  node* v = nullptr;
  std::string raw_path;
  void make_verify() {
    make();
    raw_path = temp_image(image_size);
    s->extra_paths.push_back(raw_path);
    node* raw = s->open("file", {{"filename", raw_path}});
    v = s->open_with("blkverify", {}, {{"test", file}, {"raw", raw}});
  }
};

TEST_F(verify_fixture, equal_children_pass_and_writes_reach_both) {
  make_verify();
  EXPECT_EQ(run(v, io_op::write, 8192, 4096), 0);
  EXPECT_EQ(run(v, io_op::read, 0, 65536), 0);
  EXPECT_EQ(run(v, io_op::write_zeroes, 8192, 4096), 0);
  EXPECT_EQ(run(v, io_op::read, 8192, 4096), 0);
  EXPECT_EQ(run(v, io_op::flush, 0, 0), 0);
}

TEST_F(verify_fixture, mismatch_fails_the_read_and_names_the_offset) {
  make_verify();
  EXPECT_EQ(run(v, io_op::write, 0, 8192), 0);
  // Corrupt the reference behind blkverify's back.
  int fd = ::open(raw_path.c_str(), O_WRONLY);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(pwrite(fd, "Z", 1, 5000), 1);
  close(fd);
  EXPECT_EQ(run(v, io_op::read, 0, 4096), 0);  // the corruption lies elsewhere
  ::testing::internal::CaptureStderr();
  EXPECT_EQ(run(v, io_op::read, 4096, 4096), -EIO);
  std::string err = ::testing::internal::GetCapturedStderr();
  EXPECT_NE(err.find("blkverify: read offset=4096 bytes=4096 contents mismatch at offset 5000"), std::string::npos) << err;
  EXPECT_EQ(run(v, io_op::read, 0, 4096), 0);  // and the daemon goes on
}

}  // namespace
}  // namespace blockd::block

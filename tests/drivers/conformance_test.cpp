// Driver conformance: one typed suite run against every driver (through a node) on both reactor backends, plus O_DIRECT padding; test thread.
#include "tests/drivers/conformance_stacks.h"

namespace blockd::block {
namespace {

template <class T>
class conformance : public ::testing::Test {
 protected:
  void SetUp() override {
    T::build(s);
    // A stack that failed to build (rather than one this host cannot have) must not run its body:
    // gtest runs the body of a failed test that also skipped.
    if (!s.skip.empty() && HasFailure()) GTEST_FAIL() << s.skip;
    if (!s.skip.empty()) GTEST_SKIP() << s.skip;
  }

  int run(io_op op, int64_t off, int64_t len, void* buf = nullptr, uint32_t flags = 0, io_request* out = nullptr) {
    io_request r;
    r.op = op;
    r.offset = off;
    r.length = len;
    r.flags = flags;
    if (buf) r.set_buffer(buf, len);
    waiter w;
    r.waiter = &w;
    s.top()->submit(r);
    EXPECT_EQ(w.calls, 0) << "completed synchronously";
    s.loop.until([&] { return w.calls > 0; });
    EXPECT_EQ(w.calls, 1);
    if (out) *out = r;
    return r.result;
  }
  std::vector<char> read(int64_t off, int64_t len) {
    std::vector<char> b(size_t(len), 'X');
    EXPECT_EQ(run(io_op::read, off, len, b.data()), 0);
    return b;
  }
  void write(int64_t off, std::vector<char> data, uint32_t flags = 0) {
    EXPECT_EQ(run(io_op::write, off, int64_t(data.size()), data.data(), flags), 0);
  }
  static std::vector<char> pattern(size_t n, int seed) {
    std::vector<char> v(n);
    for (size_t i = 0; i < n; ++i) v[i] = char((i * 31 + size_t(seed) * 7 + 1) & 0xff);
    return v;
  }
  stack s{uses_poll<T>(), 256, checked<T>()};
};

using stacks = ::testing::Types<null_stack, null_aio_latency_stack, file_stack, raw_over_file_stack, raw_window_stack,
                                deep_raw_stack, unchecked<deep_raw_stack>, unchecked<raw_window_stack>,
                                on_poll<file_stack>, on_poll<raw_window_stack>, file_direct_stack,
                                on_poll<file_direct_stack>, raw_window_direct_stack, host_device_stack,
                                on_poll<host_device_stack>, qcow2_stack, on_poll<qcow2_stack>, cor_over_qcow2_stack,
                                qcow2_over_preallocate_stack, preallocate_stack, luks_stack, qcow2_luks_stack, quorum_stack,
                                blklogwrites_stack,
                                throttle_over_file_stack, throttle_over_qcow2_stack,
                                blkdebug_file_stack, blkdebug_qcow2_stack, blkverify_stack, cbw_over_file_stack>;
TYPED_TEST_SUITE(conformance, stacks);

TYPED_TEST(conformance, length_is_reported) { EXPECT_EQ(this->s.top()->length(), image_size); }

TYPED_TEST(conformance, read_after_write) {
  auto p = this->pattern(65536, 1);
  this->write(8192, p);
  auto got = this->read(8192, 65536);
  if (TypeParam::stores_data) {
    EXPECT_EQ(got, p);
  } else {
    EXPECT_EQ(got, std::vector<char>(65536, 0));
  }
}

TYPED_TEST(conformance, unaligned_and_boundary_requests) {
  auto p = this->pattern(1000, 2);
  this->write(image_size - 1000, p);  // ends exactly at the end
  this->write(3, this->pattern(5, 3));
  auto tail = this->read(image_size - 1000, 1000);
  if (TypeParam::stores_data) {
    EXPECT_EQ(tail, p);
    auto head = this->read(0, 10);
    EXPECT_EQ(std::vector<char>(head.begin() + 3, head.begin() + 8), this->pattern(5, 3));
    EXPECT_EQ(head[0], 0);
  }
  std::vector<char> b(4096);
  EXPECT_EQ(this->run(io_op::read, image_size - 1000, 4096, b.data()), -EINVAL);  // crosses the end
  EXPECT_EQ(this->run(io_op::read, -1, 1, b.data()), -EINVAL);
  EXPECT_EQ(this->run(io_op::read, image_size, 0, b.data()), 0);  // empty at the end is fine
  EXPECT_EQ(this->s.top()->stats().rd.invalid, 2u);
}

TYPED_TEST(conformance, write_zeroes_and_discard_read_back_zero) {
  this->write(0, this->pattern(131072, 4));
  EXPECT_EQ(this->run(io_op::write_zeroes, 4096, 8192), 0);
  EXPECT_EQ(this->run(io_op::write_zeroes, 65536, 4096, nullptr, io_may_unmap), 0);
  if (TypeParam::stores_data) {
    auto z = this->read(4096, 8192);
    EXPECT_EQ(z, std::vector<char>(8192, 0));
    EXPECT_EQ(this->read(65536, 4096), std::vector<char>(4096, 0));
    auto keep = this->read(0, 4096);
    auto want = this->pattern(131072, 4);
    want.resize(4096);
    EXPECT_EQ(keep, want);
  }
  EXPECT_EQ(this->run(io_op::discard, 0, 65536), 0);
  EXPECT_EQ(this->s.top()->stats().unmap.operations, 1u);
}

TYPED_TEST(conformance, fua_write_and_flush) {
  this->write(0, this->pattern(4096, 5), io_fua);
  EXPECT_EQ(this->run(io_op::flush, 0, 0), 0);
  EXPECT_EQ(this->s.top()->stats().flush.operations, 1u);
  if (TypeParam::stores_data) {
    EXPECT_EQ(this->read(0, 4096), this->pattern(4096, 5));
  }
}

TYPED_TEST(conformance, block_status_follows_writes_and_zeroing) {
  io_request r;
  EXPECT_EQ(this->run(io_op::block_status, 0, 1 << 20, nullptr, 0, &r), 0);
  EXPECT_GT(r.status_length, 0);
  EXPECT_LE(r.status_length, 1 << 20);
  EXPECT_EQ(bool(r.status & bs_allocated), owns_every_byte<TypeParam>());
  if (!TypeParam::stores_data || !sparse<TypeParam>()) return;
  EXPECT_TRUE(r.status & bs_zero) << "a fresh sparse file is a hole";
  if (!holes_follow_requests<TypeParam>()) return;
  this->write(1 << 20, this->pattern(65536, 6));
  EXPECT_EQ(this->run(io_op::block_status, 1 << 20, 65536, nullptr, 0, &r), 0);
  EXPECT_TRUE(r.status & bs_data);
  EXPECT_FALSE(r.status & bs_zero);
  EXPECT_EQ(this->run(io_op::write_zeroes, 1 << 20, 65536, nullptr, io_may_unmap), 0);
  EXPECT_EQ(this->run(io_op::block_status, 1 << 20, 65536, nullptr, 0, &r), 0);
  EXPECT_TRUE(r.status & bs_zero);
}

TYPED_TEST(conformance, many_concurrent_requests) {
  constexpr int n = 512;  // more than the ring holds: the reactor queues the rest
  std::vector<std::vector<char>> bufs(n);
  std::vector<io_request> reqs(n);
  waiter w;
  for (int i = 0; i < n; ++i) {
    bufs[i] = this->pattern(4096, i);
    reqs[i].op = io_op::write;
    reqs[i].offset = int64_t(i) * 4096;
    reqs[i].set_buffer(bufs[i].data(), 4096);
    reqs[i].waiter = &w;
    this->s.top()->submit(reqs[i]);
  }
  this->s.loop.until([&] { return w.calls == n; });
  for (auto& r : reqs) EXPECT_EQ(r.result, 0);
  if (TypeParam::stores_data) {
    std::mt19937 rng(7);
    for (int k = 0; k < 16; ++k) {
      int i = int(rng() % n);
      EXPECT_EQ(this->read(int64_t(i) * 4096, 4096), this->pattern(4096, i));
    }
  }
  EXPECT_EQ(this->s.top()->stats().wr.operations, uint64_t(n));
  EXPECT_EQ(this->s.top()->in_flight(), 0u);
}

TYPED_TEST(conformance, quiesce_holds_new_requests_until_resume) {
  node* top = this->s.top();
  std::vector<char> b(4096);
  io_request first;
  first.op = io_op::read;
  first.set_buffer(b.data(), 4096);
  waiter w1;
  first.waiter = &w1;
  top->submit(first);
  bool drained = false;
  top->quiesce([&] { drained = true; });
  EXPECT_FALSE(drained);
  io_request held;
  held.op = io_op::read;
  held.set_buffer(b.data(), 4096);
  waiter w2;
  held.waiter = &w2;
  top->submit(held);
  this->s.loop.until([&] { return drained; });
  EXPECT_EQ(w1.calls, 1);
  for (int i = 0; i < 50; ++i) this->s.loop.turn();
  EXPECT_EQ(w2.calls, 0) << "admitted while quiesced";
  top->resume();
  this->s.loop.until([&] { return w2.calls == 1; });
}

TYPED_TEST(conformance, write_threshold_fires_once) {
  node* top = this->s.top();
  int fired = 0;
  uint64_t exceeded = 0;
  top->on_threshold = [&](uint64_t e, uint64_t) {
    ++fired;
    exceeded = e;
  };
  top->set_write_threshold(10000);
  this->write(0, this->pattern(4096, 8));
  EXPECT_EQ(fired, 0);
  this->write(8192, this->pattern(4096, 9));
  EXPECT_EQ(fired, 1);
  EXPECT_EQ(exceeded, 12288u - 10000u);
  EXPECT_EQ(top->write_threshold(), 0u);
  this->write(65536, this->pattern(4096, 9));
  EXPECT_EQ(fired, 1);
}

// ---- injected ring faults (stacks that reach storage through the reactor) ------------------------

using fault_kind = io::fault_reactor::op_class;
using fault_effect = io::fault_reactor::effect;

TYPED_TEST(conformance, ring_errors_fail_the_request_and_are_counted) {
  if (!TypeParam::stores_data) GTEST_SKIP() << "no reactor I/O";
  if (redundant<TypeParam>()) GTEST_SKIP() << "one failing child is outvoted (quorum_test covers it)";
  auto before = this->pattern(8192, 11);
  this->write(16384, before);
  auto& f = this->s.loop.faults();
  // The next operation of the chosen kind fails; everything after it goes through.
  auto fail_next = [&](fault_kind k, int err) {
    auto left = std::make_shared<int>(1);
    f.rule = [k, err, left](fault_kind got, uint64_t) -> io::fault_reactor::decision {
      if (got != k || *left == 0) return {};
      --*left;
      return {fault_effect::fail, err};
    };
  };
  node* top = this->s.top();
  std::vector<char> b(8192);
  fail_next(fault_kind::readv, EIO);
  EXPECT_EQ(this->run(io_op::read, 16384, 8192, b.data()), -EIO);
  EXPECT_EQ(top->stats().rd.failed, 1u);
  EXPECT_EQ(this->read(16384, 8192), before) << "a failed read leaves nothing behind";

  fail_next(fault_kind::writev, ENOSPC);
  auto p = this->pattern(8192, 12);
  EXPECT_EQ(this->run(io_op::write, 16384, 8192, p.data()), -ENOSPC);
  EXPECT_EQ(top->stats().wr.failed, 1u);

  fail_next(fault_kind::fsync, EIO);
  EXPECT_EQ(this->run(io_op::flush, 0, 0), -EIO) << "a failed flush is never reported as durable";
  EXPECT_EQ(top->stats().flush.failed, 1u);
  EXPECT_EQ(this->run(io_op::flush, 0, 0), 0);
  EXPECT_GE(f.injected, 3u);
  EXPECT_EQ(top->in_flight(), 0u);
}

TYPED_TEST(conformance, short_transfers_still_move_every_byte) {
  if (!TypeParam::stores_data) GTEST_SKIP() << "no reactor I/O";
  auto& f = this->s.loop.faults();
  f.short_unit = 4096;  // O_DIRECT stacks stay aligned
  f.rule = [](fault_kind k, uint64_t) -> io::fault_reactor::decision {
    if (k == fault_kind::readv || k == fault_kind::writev) return {fault_effect::short_io};
    return {};
  };
  auto p = this->pattern(262144, 13);
  this->write(12288, p);
  EXPECT_EQ(this->read(12288, 262144), p);
  EXPECT_GT(f.injected, 2u);
}

TYPED_TEST(conformance, interrupted_operations_are_retried) {
  if (!TypeParam::stores_data) GTEST_SKIP() << "no reactor I/O";
  auto& f = this->s.loop.faults();
  // Every other read, write and flush is refused once with EAGAIN or EINTR, as io_uring may.
  f.rule = [](fault_kind k, uint64_t n) -> io::fault_reactor::decision {
    if (k == fault_kind::fallocate || k == fault_kind::offload || n % 2) return {};
    return {fault_effect::transient, n % 4 ? EINTR : EAGAIN};
  };
  auto p = this->pattern(65536, 14);
  this->write(4096, p);
  EXPECT_EQ(this->run(io_op::flush, 0, 0), 0);
  EXPECT_EQ(this->read(4096, 65536), p);
  EXPECT_GT(f.injected, 2u);
}

TYPED_TEST(conformance, a_tiny_ring_queues_instead_of_failing) {
  if (uses_poll<TypeParam>()) GTEST_SKIP() << "the poll backend has no ring";
  stack tiny(false, 4);  // 4 submission entries for 300 requests
  TypeParam::build(tiny);
  if (!tiny.skip.empty() && this->HasFailure()) GTEST_FAIL() << tiny.skip;
  if (!tiny.skip.empty()) GTEST_SKIP() << tiny.skip;
  constexpr int n = 300;
  std::vector<std::vector<char>> bufs(n);
  std::vector<io_request> reqs(n);
  waiter w;
  for (int i = 0; i < n; ++i) {
    bufs[i] = this->pattern(4096, i);
    reqs[i].op = i % 3 == 2 ? io_op::flush : io_op::write;
    reqs[i].offset = reqs[i].op == io_op::flush ? 0 : int64_t(i) * 4096;
    if (reqs[i].op == io_op::write) reqs[i].set_buffer(bufs[i].data(), 4096);
    reqs[i].waiter = &w;
    tiny.top()->submit(reqs[i]);
  }
  tiny.loop.until([&] { return w.calls == n; });
  for (auto& r : reqs) EXPECT_EQ(r.result, 0);
  EXPECT_EQ(tiny.top()->in_flight(), 0u);
}

TEST(conformance_host_device, zeroing_and_discard_run_on_the_reactor_workers) {
  for (bool poll : {false, true}) {
    stack s(poll);
    host_device_stack::build(s);
    if (!s.skip.empty()) GTEST_SKIP() << s.skip;
    int offloaded = 0;
    s.loop.faults().rule = [&](io::fault_reactor::op_class k, uint64_t) -> io::fault_reactor::decision {
      if (k == io::fault_reactor::op_class::offload) ++offloaded;
      return {};
    };
    waiter w;
    io_request z, d;
    z.op = io_op::write_zeroes;
    z.offset = 8192;
    z.length = 65536;
    z.waiter = &w;
    d.op = io_op::discard;
    d.offset = 1 << 20;
    d.length = 1 << 20;
    d.waiter = &w;
    s.top()->submit(z);
    s.top()->submit(d);
    EXPECT_EQ(w.calls, 0);
    s.loop.until([&] { return w.calls == 2; });
    EXPECT_EQ(z.result, 0);
    EXPECT_EQ(d.result, 0);
    EXPECT_EQ(offloaded, 2) << "BLKZEROOUT and BLKDISCARD never run on the loop";
  }
}

TEST(conformance_file, read_only_node_refuses_writes) {
  stack s;
  s.path = temp_image(1 << 20);
  node* f = s.open("file", {{"filename", s.path}});
  (void)f;
  // A read-only node on top.
  node_settings ro;
  ro.name = "ro";
  ro.driver = "raw";
  ro.read_only = true;
  boost::json::object none;
  open_args a{none, {}, s.loop.env()};
  a.set_child("file", f);
  auto drv = find_driver("raw")->open(a);
  ASSERT_TRUE(drv);
  node top(ro, std::move(*drv), s.loop.env());
  top.slots = std::move(a.edges);
  std::vector<char> b(512, 1);
  io_request r;
  r.op = io_op::write;
  r.set_buffer(b.data(), 512);
  waiter w;
  r.waiter = &w;
  top.submit(r);
  s.loop.until([&] { return w.calls == 1; });
  EXPECT_EQ(r.result, -EPERM);
}

TEST(conformance_file, open_errors_name_the_file) {
  test_loop loop;
  boost::json::object o{{"filename", "/nonexistent/x.img"}};
  open_args a{o, {}, loop.env()};
  auto r = find_driver("file")->open(a);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().desc, "Could not open '/nonexistent/x.img': No such file or directory");
}

// ---- cache.direct=on: padding of misaligned requests ---------------------------------------------
// Every result is checked against a buffered read of the file, i.e. what another process sees.

std::vector<char> on_disk(const std::string& path, int64_t off, int64_t len) {
  std::vector<char> b(size_t(len), 'X');
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  EXPECT_GE(fd, 0);
  EXPECT_EQ(pread(fd, b.data(), b.size(), off), ssize_t(len));
  close(fd);
  return b;
}

std::vector<char> bytes(size_t n, int seed) {
  std::vector<char> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = char((i * 13 + size_t(seed) * 101 + 7) & 0xff);
  return v;
}

class direct_io : public ::testing::TestWithParam<bool> {
 protected:
  void SetUp() override {
    std::string why, dir = direct_io_dir(&why);
    if (dir.empty()) GTEST_SKIP() << why;
    s.path = temp_image(size, dir);
    s.direct = true;
    f = s.open("file", {{"filename", s.path}});
    ASSERT_NE(f, nullptr);
  }
  // Starts a request; the caller waits for it (several may be in flight at once).
  struct pending {
    io_request r;
    waiter w;
  };
  std::unique_ptr<pending> start(io_op op, int64_t off, int64_t len, void* buf, uint32_t flags = 0) {
    auto p = std::make_unique<pending>();
    p->r.op = op;
    p->r.offset = off;
    p->r.length = len;
    p->r.flags = flags;
    if (buf) p->r.set_buffer(buf, len);
    p->r.waiter = &p->w;
    f->submit(p->r);
    EXPECT_EQ(p->w.calls, 0) << "completed synchronously";
    return p;
  }
  int run(io_op op, int64_t off, int64_t len, void* buf, uint32_t flags = 0) {
    auto p = start(op, off, len, buf, flags);
    s.loop.until([&] { return p->w.calls > 0; });
    EXPECT_EQ(p->w.calls, 1);
    return p->r.result;
  }
  void fill(char c) {
    std::vector<char> b(size_t(size), c);
    int fd = open(s.path.c_str(), O_WRONLY | O_CLOEXEC);
    ASSERT_EQ(pwrite(fd, b.data(), b.size(), 0), ssize_t(size));
    close(fd);
  }

  static constexpr int64_t size = 1 << 20;
  stack s{GetParam()};
  node* f = nullptr;
};

TEST_P(direct_io, misaligned_reads_and_writes_match_the_file) {
  fill('.');
  auto want = on_disk(s.path, 0, size);
  struct piece {
    int64_t off, len;
  };
  // Inside one block, across a block edge, aligned start with odd end, odd start with aligned end,
  // many blocks with odd ends, and the very last bytes of the file.
  for (auto [off, len] : {piece{3, 5}, piece{509, 7}, piece{4096, 1000}, piece{1000, 3096}, piece{12345, 70001},
                          piece{size - 77, 77}, piece{0, 1}}) {
    auto data = bytes(size_t(len), int(off));
    ASSERT_EQ(run(io_op::write, off, len, data.data()), 0) << off << "+" << len;
    std::copy(data.begin(), data.end(), want.begin() + off);
    ASSERT_EQ(on_disk(s.path, 0, size), want) << "after writing " << off << "+" << len;
  }
  for (auto [off, len] : {piece{1, 1}, piece{511, 2}, piece{12000, 90000}, piece{size - 3, 3}, piece{700, 4096}}) {
    std::vector<char> got(size_t(len), 'X');
    ASSERT_EQ(run(io_op::read, off, len, got.data()), 0) << off << "+" << len;
    EXPECT_EQ(got, std::vector<char>(want.begin() + off, want.begin() + off + len)) << off << "+" << len;
  }
  struct stat st {};
  ASSERT_EQ(stat(s.path.c_str(), &st), 0);
  EXPECT_EQ(st.st_size, size);
}

TEST_P(direct_io, aligned_range_with_misaligned_buffers_is_bounced) {
  fill('.');
  // An aligned range, but the buffers start at odd addresses and split blocks between them.
  std::vector<char> backing(8192 + 64);
  auto data = bytes(8192, 3);
  std::copy(data.begin(), data.end(), backing.begin() + 3);
  iovec iov[3] = {{backing.data() + 3, 1000}, {backing.data() + 1003, 5000}, {backing.data() + 6003, 2192}};
  io_request r;
  r.op = io_op::write;
  r.offset = 8192;
  r.length = 8192;
  r.iov = iov;
  r.iovcnt = 3;
  waiter w;
  r.waiter = &w;
  f->submit(r);
  s.loop.until([&] { return w.calls == 1; });
  ASSERT_EQ(r.result, 0);
  EXPECT_EQ(on_disk(s.path, 8192, 8192), data);
  std::vector<char> back(8192 + 1);
  ASSERT_EQ(run(io_op::read, 8192, 8192, back.data() + 1), 0);
  EXPECT_EQ(std::vector<char>(back.begin() + 1, back.end()), data);
}

TEST_P(direct_io, overlapping_misaligned_writes_in_flight_both_land) {
  fill('.');
  // Both read-modify-write the same block. Unordered, the second would read the block before the
  // first wrote it and put the old bytes back.
  std::vector<char> a(200, 'A'), b(500, 'B'), c(10, 'C'), d(10, 'D');
  auto p1 = start(io_op::write, 100, 200, a.data());
  auto p2 = start(io_op::write, 200, 500, b.data());
  // Different bytes of one block: no overlap, yet they must not undo each other either.
  auto p3 = start(io_op::write, 4096 + 1, 10, c.data());
  auto p4 = start(io_op::write, 4096 + 500, 10, d.data());
  s.loop.until([&] { return p1->w.calls + p2->w.calls + p3->w.calls + p4->w.calls == 4; });
  for (auto* p : {&p1, &p2, &p3, &p4}) EXPECT_EQ((*p)->r.result, 0);
  auto want = std::vector<char>(8192, '.');
  std::fill(want.begin() + 100, want.begin() + 300, 'A');
  std::fill(want.begin() + 200, want.begin() + 700, 'B');  // arrived later: wins where they overlap
  std::fill(want.begin() + 4097, want.begin() + 4107, 'C');
  std::fill(want.begin() + 4596, want.begin() + 4606, 'D');
  EXPECT_EQ(on_disk(s.path, 0, 8192), want);
}

TEST_P(direct_io, aligned_write_behind_a_padded_one_is_not_undone) {
  fill('.');
  // The aligned write needs no padding, but lands in the block the padded one is rewriting.
  std::vector<char> a(100, 'A'), b(512, 'B');
  auto p1 = start(io_op::write, 10, 100, a.data());
  std::vector<char> aligned(4096 + 512);
  char* bb = aligned.data() + (512 - reinterpret_cast<uintptr_t>(aligned.data()) % 512) % 512;
  std::copy(b.begin(), b.end(), bb);
  auto p2 = start(io_op::write, 0, 512, bb);
  s.loop.until([&] { return p1->w.calls + p2->w.calls == 2; });
  EXPECT_EQ(p1->r.result, 0);
  EXPECT_EQ(p2->r.result, 0);
  EXPECT_EQ(on_disk(s.path, 0, 512), b);
}

TEST_P(direct_io, many_concurrent_misaligned_writes_to_shared_blocks) {
  fill('.');
  constexpr int n = 300;  // 300 writes of 1000 bytes at a 700-byte stride: each overlaps its neighbours
  std::vector<std::vector<char>> data(n);
  std::vector<std::unique_ptr<pending>> ps;
  auto want = on_disk(s.path, 0, size);
  for (int i = 0; i < n; ++i) {
    data[i] = bytes(1000, i);
    ps.push_back(start(io_op::write, 33 + int64_t(i) * 700, 1000, data[i].data()));
    std::copy(data[i].begin(), data[i].end(), want.begin() + 33 + i * 700);
  }
  s.loop.until([&] {
    for (auto& p : ps)
      if (p->w.calls == 0) return false;
    return true;
  });
  for (auto& p : ps) EXPECT_EQ(p->r.result, 0);
  EXPECT_EQ(on_disk(s.path, 0, size), want) << "arrival order must decide overlapping bytes";
}

TEST_P(direct_io, large_misaligned_transfers_go_in_pieces) {
  fill('.');
  int64_t off = 777, len = 3 * (1 << 20) / 4 + 4099;  // several bounce pieces, odd at both ends
  auto data = bytes(size_t(len), 9);
  ASSERT_EQ(run(io_op::write, off, len, data.data()), 0);
  EXPECT_EQ(on_disk(s.path, off, len), data);
  EXPECT_EQ(on_disk(s.path, off - 1, 1), std::vector<char>(1, '.'));
  EXPECT_EQ(on_disk(s.path, off + len, 1), std::vector<char>(1, '.'));
  std::vector<char> got(static_cast<size_t>(len), 0);
  ASSERT_EQ(run(io_op::read, off, len, got.data()), 0);
  EXPECT_EQ(got, data);
}

TEST_P(direct_io, misaligned_write_zeroes_keeps_the_neighbours) {
  fill('.');
  for (uint32_t flags : {0u, uint32_t(io_may_unmap)}) {
    int64_t off = flags ? 70000 + 11 : 3, len = 9000;
    ASSERT_EQ(run(io_op::write_zeroes, off, len, nullptr, flags), 0);
    EXPECT_EQ(on_disk(s.path, off, len), std::vector<char>(size_t(len), 0));
    EXPECT_EQ(on_disk(s.path, off - 1, 1), std::vector<char>(1, '.'));
    EXPECT_EQ(on_disk(s.path, off + len, 1), std::vector<char>(1, '.'));
  }
  EXPECT_EQ(on_disk(s.path, 0, 3), std::vector<char>(3, '.'));
}

TEST_P(direct_io, file_length_off_the_alignment_stays_as_it_is) {
  // A file of 10000 bytes: its last block is partial, and a padded write there must not lengthen it.
  stack t{GetParam()};
  std::string why, dir = direct_io_dir(&why);
  t.path = temp_image(10000, dir);
  t.direct = true;
  node* g = t.open("file", {{"filename", t.path}});
  EXPECT_EQ(g->length(), 10000);
  auto data = bytes(300, 4);
  io_request r;
  r.op = io_op::write;
  r.offset = 10000 - 300;
  r.set_buffer(data.data(), 300);
  waiter w;
  r.waiter = &w;
  g->submit(r);
  EXPECT_EQ(g->length(), 10000) << "the image grew while the padded write was in flight";
  t.loop.until([&] { return w.calls == 1; });
  ASSERT_EQ(r.result, 0);
  struct stat st {};
  ASSERT_EQ(stat(t.path.c_str(), &st), 0);
  EXPECT_EQ(st.st_size, 10000);
  EXPECT_EQ(on_disk(t.path, 10000 - 300, 300), data);
  // Reading the tail: the aligned cover reads short at the end of the file.
  std::vector<char> got(1000, 'X');
  io_request rr;
  rr.op = io_op::read;
  rr.offset = 9000;
  rr.set_buffer(got.data(), 1000);
  waiter rw;
  rr.waiter = &rw;
  g->submit(rr);
  t.loop.until([&] { return rw.calls == 1; });
  ASSERT_EQ(rr.result, 0);
  EXPECT_EQ(got, on_disk(t.path, 9000, 1000));
}

TEST_P(direct_io, empty_misaligned_read_completes_later) {
  char c = 0;
  EXPECT_EQ(run(io_op::read, 5, 0, &c), 0);
  EXPECT_EQ(run(io_op::write, 5, 0, &c), 0);
}

INSTANTIATE_TEST_SUITE_P(reactors, direct_io, ::testing::Values(false, true),
                         [](const auto& info) { return info.param ? "poll" : "uring"; });

// ---- drop-cache: activating a node drops the host page cache of its file ---------------------------

bool any_page_cached(const std::string& path, int64_t len) {
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  void* m = mmap(nullptr, size_t(len), PROT_READ, MAP_SHARED, fd, 0);
  close(fd);
  if (m == MAP_FAILED) return true;
  std::vector<unsigned char> v(size_t(len) / size_t(sysconf(_SC_PAGESIZE)) + 1);
  mincore(m, size_t(len), v.data());
  munmap(m, size_t(len));
  for (auto x : v)
    if (x & 1) return true;
  return false;
}

TEST(file_drop_cache, activate_drops_the_page_cache_unless_told_not_to) {
  // tmpfs pages are the file itself and never drop: this needs a disk file system.
  std::string why, dir = direct_io_dir(&why);
  if (dir.empty()) GTEST_SKIP() << why;
  for (bool drop : {true, false}) {
    stack s;
    s.path = temp_image(1 << 20, dir);
    node* f = s.open("file", {{"filename", s.path}, {"drop-cache", drop}, {"x-check-cache-dropped", true}});
    auto data = bytes(1 << 20, 1);
    io_request r;
    r.op = io_op::write;
    r.set_buffer(data.data(), 1 << 20);
    waiter w;
    r.waiter = &w;
    f->submit(r);
    s.loop.until([&] { return w.calls == 1; });
    ASSERT_EQ(r.result, 0);
    ASSERT_TRUE(any_page_cached(s.path, 1 << 20)) << "a buffered write leaves pages in the cache";
    auto res = f->driver().activate();
    ASSERT_TRUE(res) << res.error().desc;
    EXPECT_EQ(any_page_cached(s.path, 1 << 20), !drop) << "drop-cache=" << drop;
    EXPECT_EQ(on_disk(s.path, 0, 1 << 20), data) << "dirty data must be written back, not dropped";
  }
}

// ---- blockdev-reopen of a file node -------------------------------------------------------------

// The open flags of this process's descriptors for `path` (from /proc/self/fdinfo), -1 if none.
long open_flags_of(const std::string& path) {
  for (int fd = 0; fd < 1024; ++fd) {
    char link[4096];
    ssize_t n = readlink(("/proc/self/fd/" + std::to_string(fd)).c_str(), link, sizeof link - 1);
    if (n <= 0 || std::string(link, size_t(n)) != path) continue;
    FILE* f = fopen(("/proc/self/fdinfo/" + std::to_string(fd)).c_str(), "r");
    if (!f) continue;
    char line[256];
    long flags = -1;
    while (fgets(line, sizeof line, f))
      if (sscanf(line, "flags: %lo", &flags) == 1) break;
    fclose(f);
    return flags;
  }
  return -1;
}

bool lock_byte_held(const std::string& path, off_t byte) {
  int fd = open(path.c_str(), O_RDWR | O_CLOEXEC);
  struct flock fl {};
  fl.l_type = F_WRLCK;
  fl.l_whence = SEEK_SET;
  fl.l_start = byte;
  fl.l_len = 1;
  fcntl(fd, F_OFD_GETLK, &fl);
  close(fd);
  return fl.l_type != F_UNLCK;
}

TEST(file_reopen, direct_and_read_only_change_the_descriptor_and_keep_the_locks) {
  std::string why, dir = direct_io_dir(&why);
  if (dir.empty()) GTEST_SKIP() << why;
  stack s;
  s.path = temp_image(1 << 20, dir);
  node* f = s.open("file", {{"filename", s.path}});
  auto& drv = f->driver();
  ASSERT_TRUE(drv.check_perm(perm_consistent_read | perm_write, perm_all & ~uint32_t(perm_write)));
  drv.set_perm(perm_consistent_read | perm_write, perm_all & ~uint32_t(perm_write));
  ASSERT_TRUE(lock_byte_held(s.path, 201)) << "write is not shared";
  EXPECT_EQ(open_flags_of(s.path) & O_DIRECT, 0);

  boost::json::object opts{{"filename", s.path}, {"drop-cache", false}};
  reopen_args a{opts, {}, false, true, false};
  std::vector<std::string> consumed;
  auto st = drv.reopen_prepare(a, consumed);
  ASSERT_TRUE(st) << st.error().desc;
  EXPECT_NE(std::find(consumed.begin(), consumed.end(), "drop-cache"), consumed.end());
  EXPECT_EQ(open_flags_of(s.path) & O_DIRECT, 0) << "prepare must not change the descriptor in use";
  (*st)->commit();
  st->reset();
  EXPECT_EQ(open_flags_of(s.path) & O_DIRECT, O_DIRECT);
  EXPECT_TRUE(lock_byte_held(s.path, 201)) << "the locks went with the old descriptor";
  EXPECT_TRUE(lock_byte_held(s.path, 101));

  // Now padded: a misaligned write goes through read-modify-write.
  std::vector<char> b(7, 'q');
  io_request r;
  r.op = io_op::write;
  r.offset = 3;
  r.set_buffer(b.data(), 7);
  waiter w;
  r.waiter = &w;
  f->submit(r);
  s.loop.until([&] { return w.calls == 1; });
  EXPECT_EQ(r.result, 0);
  EXPECT_EQ(on_disk(s.path, 3, 7), b);

  // Read-only, and back to buffered I/O.
  reopen_args ro{opts, {}, true, false, false};
  consumed.clear();
  auto st2 = drv.reopen_prepare(ro, consumed);
  ASSERT_TRUE(st2) << st2.error().desc;
  (*st2)->commit();
  st2->reset();
  long fl = open_flags_of(s.path);
  EXPECT_EQ(fl & O_ACCMODE, O_RDONLY);
  EXPECT_EQ(fl & O_DIRECT, 0);

  // An aborted prepare leaves everything as it was.
  reopen_args back{opts, {}, false, true, false};
  auto st3 = drv.reopen_prepare(back, consumed);
  ASSERT_TRUE(st3);
  (*st3)->abort();
  st3->reset();
  EXPECT_EQ(open_flags_of(s.path) & (O_ACCMODE | O_DIRECT), O_RDONLY);
}

}  // namespace
}  // namespace blockd::block

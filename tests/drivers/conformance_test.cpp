// Driver conformance: one typed suite run against every driver (through a node), on a test-thread reactor loop.
#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <deque>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "storage/block/driver.h"
#include "storage/block/node.h"
#include "storage/io/reactor.h"

namespace blockd::block {
namespace {

constexpr int64_t image_size = 4 << 20;

// A loop like an iothread's: deferred functions and reactor completions, on this thread only.
struct test_loop {
  std::unique_ptr<io::reactor> reactor = io::reactor::create(256, nullptr);
  std::deque<std::function<void()>> deferred;
  driver_env env() {
    return {reactor.get(), [this](std::function<void()> fn) { deferred.push_back(std::move(fn)); }};
  }
  void turn() {
    auto batch = std::move(deferred);
    deferred.clear();
    for (auto& fn : batch) fn();
    reactor->run_once(deferred.empty() && reactor->in_flight() > 0);
  }
  template <class Pred>
  void until(Pred done) {
    for (int i = 0; i < 1000000 && !done(); ++i) turn();
    ASSERT_TRUE(done());
  }
};

struct waiter final : io_waiter {
  int calls = 0;
  void io_done(io_request&) override { ++calls; }
};

// One stack of nodes under test; the top node is what requests go to.
struct stack {
  test_loop loop;
  std::string path;
  std::vector<std::unique_ptr<node>> nodes;
  node* top() { return nodes.back().get(); }

  node* open(const std::string& driver, boost::json::object opts, node* child = nullptr) {
    auto* e = find_driver(driver);
    EXPECT_NE(e, nullptr) << driver;
    open_args a{opts, {}, loop.env()};
    if (child) a.children.emplace_back("file", child);
    auto drv = e->open(a);
    EXPECT_TRUE(drv.has_value()) << (drv ? "" : drv.error().desc);
    node_settings s;
    s.name = "n" + std::to_string(nodes.size());
    s.driver = driver;
    s.discard_unmap = true;
    s.options = opts;
    nodes.push_back(std::make_unique<node>(std::move(s), std::move(*drv), loop.env()));
    return nodes.back().get();
  }
  ~stack() {
    nodes.clear();
    if (!path.empty()) unlink(path.c_str());
  }
};

std::string temp_image(int64_t size) {
  char tmpl[] = "/dev/shm/blockd-conf-XXXXXX";
  int fd = mkstemp(tmpl);
  EXPECT_GE(fd, 0);
  EXPECT_EQ(ftruncate(fd, size), 0);
  close(fd);
  return tmpl;
}

struct null_stack {
  static constexpr bool stores_data = false;
  static void build(stack& s) { s.open("null-co", {{"size", image_size}, {"read-zeroes", true}}); }
};
struct null_aio_latency_stack {
  static constexpr bool stores_data = false;
  static void build(stack& s) {
    s.open("null-aio", {{"size", image_size}, {"read-zeroes", true}, {"latency-ns", 20000}});
  }
};
struct file_stack {
  static constexpr bool stores_data = true;
  static void build(stack& s) {
    s.path = temp_image(image_size);
    s.open("file", {{"filename", s.path}});
  }
};
struct raw_over_file_stack {
  static constexpr bool stores_data = true;
  static void build(stack& s) {
    s.path = temp_image(image_size);
    node* f = s.open("file", {{"filename", s.path}});
    s.open("raw", {}, f);
  }
};
struct raw_window_stack {
  static constexpr bool stores_data = true;
  static void build(stack& s) {
    s.path = temp_image(image_size + 8192);
    node* f = s.open("file", {{"filename", s.path}});
    s.open("raw", {{"offset", 4096}, {"size", image_size}}, f);
  }
};

template <class T>
class conformance : public ::testing::Test {
 protected:
  void SetUp() override { T::build(s); }

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
  stack s;
};

using stacks = ::testing::Types<null_stack, null_aio_latency_stack, file_stack, raw_over_file_stack, raw_window_stack>;
TYPED_TEST_SUITE(conformance, stacks);

TYPED_TEST(conformance, length_is_reported) { EXPECT_EQ(this->s.top()->length(), image_size); }

TYPED_TEST(conformance, read_after_write) {
  auto p = this->pattern(65536, 1);
  this->write(8192, p);
  auto got = this->read(8192, 65536);
  if (TypeParam::stores_data) EXPECT_EQ(got, p);
  else EXPECT_EQ(got, std::vector<char>(65536, 0));
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
  if (TypeParam::stores_data) EXPECT_EQ(this->read(0, 4096), this->pattern(4096, 5));
}

TYPED_TEST(conformance, block_status_follows_writes_and_zeroing) {
  io_request r;
  EXPECT_EQ(this->run(io_op::block_status, 0, 1 << 20, nullptr, 0, &r), 0);
  EXPECT_GT(r.status_length, 0);
  EXPECT_LE(r.status_length, 1 << 20);
  EXPECT_TRUE(r.status & bs_allocated);
  if (!TypeParam::stores_data) return;
  EXPECT_TRUE(r.status & bs_zero) << "a fresh sparse file is a hole";
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

TEST(conformance_file, read_only_node_refuses_writes_and_ring_errors_surface) {
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
  open_args a{none, {{"file", f}}, s.loop.env()};
  auto drv = find_driver("raw")->open(a);
  ASSERT_TRUE(drv);
  node top(ro, std::move(*drv), s.loop.env());
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

}  // namespace
}  // namespace blockd::block

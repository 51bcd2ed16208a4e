// The node <-> driver contract checker catches broken drivers and broken callers; test thread.
#include <gtest/gtest.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "storage/block/contract.h"
#include "storage/block/local_loop.h"
#include "storage/block/node.h"

namespace blockd::block {
namespace {

// A driver whose completion behaviour each test chooses.
struct scripted_driver final : block_driver {
  std::function<void(io_request&)> on_submit;
  uint32_t align = 1;
  uint32_t cap = 0;
  int64_t length() const override { return 1 << 20; }
  uint32_t caps() const override { return cap; }
  driver_limits limits() const override { return {align, 0}; }
  void submit(io_request& r) override { on_submit(r); }
  result<void> truncate(int64_t) override { return {}; }
};

struct recorder final : io_waiter {
  std::atomic<int> calls{0};
  void io_done(io_request&) override { ++calls; }
};

class contract : public ::testing::Test {
 protected:
  void SetUp() override {
    set_contract_handler([this](const std::string& w) { seen.push_back(w); });
  }
  void TearDown() override {
    set_contract_handler(nullptr);
  }
  // The checked driver on its own, as a node would call it.
  std::unique_ptr<block_driver> checked(std::function<void(io_request&)> on_submit, uint32_t align = 1,
                                        uint32_t cap = 0) {
    auto d = std::make_unique<scripted_driver>();
    d->on_submit = std::move(on_submit);
    d->align = align;
    d->cap = cap;
    return check_contract(std::move(d), "n0", loop.env());
  }
  bool saw(const std::string& part) const {
    for (auto& w : seen)
      if (w.find(part) != std::string::npos) return true;
    return false;
  }
  void run() {
    for (int i = 0; i < 100; ++i) loop.turn();
  }
  local_loop loop{io::reactor::create_poll()};
  std::vector<std::string> seen;
};

TEST_F(contract, a_well_behaved_driver_raises_nothing) {
  auto d = checked([this](io_request& r) { loop.env().defer([&r] { r.complete(0); }); });
  std::vector<char> b(4096);
  io_request r;
  r.set_buffer(b.data(), 4096);
  recorder w;
  r.waiter = &w;
  d->submit(r);
  run();
  EXPECT_EQ(w.calls, 1);
  EXPECT_TRUE(seen.empty()) << seen.front();
}

TEST_F(contract, completing_inside_submit_is_reported) {
  auto d = checked([](io_request& r) { r.complete(0); });
  io_request r;
  r.op = io_op::flush;
  recorder w;
  r.waiter = &w;
  d->submit(r);
  EXPECT_TRUE(saw("completed inside submit()"));
}

TEST_F(contract, completing_twice_is_reported_and_the_submitter_hears_once) {
  auto d = checked([this](io_request& r) {
    loop.env().defer([&r] { r.complete(0); });
    loop.env().defer([&r] { r.complete(0); });
  });
  io_request r;
  r.op = io_op::flush;
  recorder w;
  r.waiter = &w;
  d->submit(r);
  run();
  EXPECT_EQ(w.calls, 1);
  EXPECT_TRUE(saw("completed twice"));
}

TEST_F(contract, completing_on_another_thread_is_reported) {
  auto d = checked([](io_request& r) { std::thread([&r] { r.complete(0); }).detach(); });
  io_request r;
  r.op = io_op::flush;
  recorder w;
  r.waiter = &w;
  d->submit(r);
  for (int i = 0; i < 1000 && w.calls == 0; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  EXPECT_TRUE(saw("completion off the node's home thread"));
}

TEST_F(contract, positive_results_and_bad_extents_are_reported) {
  auto d = checked([this](io_request& r) {
    r.status_length = r.length + 1;
    loop.env().defer([&r] { r.complete(r.op == io_op::flush ? 7 : 0); });
  });
  io_request f, s;
  f.op = io_op::flush;
  s.op = io_op::block_status;
  s.length = 4096;
  recorder w;
  f.waiter = s.waiter = &w;
  d->submit(f);
  d->submit(s);
  run();
  EXPECT_TRUE(saw("positive result 7"));
  EXPECT_TRUE(saw("block_status answered an extent of 4097 bytes"));
}

TEST_F(contract, malformed_requests_from_the_caller_are_reported) {
  auto d = checked([this](io_request& r) { loop.env().defer([&r] { r.complete(0); }); }, 512);
  std::vector<char> b(8192);
  recorder w;
  io_request mis, beyond, short_iov, flags, fua;
  mis.set_buffer(b.data(), 100);  // not a multiple of 512
  beyond.op = io_op::discard;
  beyond.offset = (1 << 20) - 512;
  beyond.length = 1024;
  short_iov.op = io_op::write;
  short_iov.set_buffer(b.data(), 4096);
  short_iov.length = 8192;
  flags.op = io_op::read;
  flags.flags = io_may_unmap;
  fua.op = io_op::write;
  fua.flags = io_fua;
  for (auto* r : {&mis, &beyond, &short_iov, &flags, &fua}) {
    r->waiter = &w;
    d->submit(*r);
  }
  run();
  EXPECT_TRUE(saw("not aligned to the driver's 512 bytes"));
  EXPECT_TRUE(saw("beyond the length 1048576"));
  EXPECT_TRUE(saw("scatter list covers 4096 of 8192 bytes"));
  EXPECT_TRUE(saw("flags it may not carry"));
  EXPECT_TRUE(saw("FUA to a driver without cap_fua"));
}

TEST_F(contract, control_calls_and_close_need_an_empty_driver) {
  std::vector<io_request*> held;
  auto d = checked([&](io_request& r) { held.push_back(&r); });
  io_request r;
  r.op = io_op::flush;
  recorder w;
  r.waiter = &w;
  d->submit(r);
  (void)d->truncate(4096);
  EXPECT_TRUE(saw("truncate with 1 request(s) in the driver"));
  d.reset();
  EXPECT_TRUE(saw("still in the driver when it was closed"));
}

TEST_F(contract, the_node_strips_fua_for_drivers_without_it_and_flushes_after) {
  set_contract_checks(true);
  std::vector<io_op> ops;
  auto drv = std::make_unique<scripted_driver>();
  drv->on_submit = [&](io_request& r) {
    ops.push_back(r.op);
    loop.env().defer([&r] { r.complete(0); });
  };
  node_settings s;
  s.name = "n0";
  node n(s, std::move(drv), loop.env());
  std::vector<char> b(4096);
  io_request r;
  r.op = io_op::write;
  r.flags = io_fua;
  r.set_buffer(b.data(), 4096);
  recorder w;
  r.waiter = &w;
  n.submit(r);
  run();
  EXPECT_EQ(w.calls, 1);
  EXPECT_EQ(ops, (std::vector<io_op>{io_op::write, io_op::flush}));
  EXPECT_EQ(r.flags, uint32_t(io_fua)) << "the submitter's flags are left as they were";
  EXPECT_TRUE(seen.empty()) << seen.front();
}

}  // namespace
}  // namespace blockd::block

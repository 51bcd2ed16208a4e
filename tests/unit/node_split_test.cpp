// The node cuts write_zeroes and discard to its driver's opt/max limits as QEMU's block layer does (pieces recorded by a fake driver); test thread.
#include <gtest/gtest.h>

#include <cerrno>
#include <functional>
#include <tuple>
#include <vector>

#include "storage/block/contract.h"
#include "storage/block/local_loop.h"
#include "storage/block/node.h"

namespace blockd::block {
namespace {

using piece = std::tuple<io_op, int64_t, int64_t>;  // op, offset, length

// Records every request it gets; answers each on a later loop turn with what `answer` says.
struct piece_driver final : block_driver {
  driver_env env;
  driver_limits lim;
  uint32_t cap = cap_write_zeroes | cap_discard;
  std::vector<piece> got;
  std::vector<bool> payload_zero;  // writes: whether the buffer held zeroes only
  std::function<int(const io_request&)> answer = [](const io_request&) { return 0; };
  int64_t length() const override { return 1 << 20; }
  uint32_t caps() const override { return cap; }
  driver_limits limits() const override { return lim; }
  void submit(io_request& r) override {
    got.emplace_back(r.op, r.offset, r.length);
    if (r.op == io_op::write) {
      bool z = true;
      for (int i = 0; i < r.iovcnt; ++i)
        for (size_t k = 0; k < r.iov[i].iov_len; ++k) z = z && static_cast<const char*>(r.iov[i].iov_base)[k] == 0;
      payload_zero.push_back(z);
    }
    int res = answer(r);
    env.defer([&r, res] { r.complete(res); });
  }
};

struct done_count final : io_waiter {
  int calls = 0;
  void io_done(io_request&) override { ++calls; }
};

struct split_fixture : ::testing::Test {
  local_loop loop{io::reactor::create_poll()};
  piece_driver* d = nullptr;
  std::unique_ptr<node> n;
  std::vector<std::string> contract_faults;

  void SetUp() override { set_contract_handler([this](const std::string& w) { contract_faults.push_back(w); }); }
  void TearDown() override {
    n.reset();
    set_contract_handler(nullptr);
    EXPECT_TRUE(contract_faults.empty()) << contract_faults.front();
  }
  void make(driver_limits l) {
    auto drv = std::make_unique<piece_driver>();
    drv->env = loop.env();
    drv->lim = l;
    d = drv.get();
    node_settings s;
    s.name = "n0";
    s.driver = "fake";
    s.discard_unmap = true;
    n = std::make_unique<node>(std::move(s), std::move(drv), loop.env());
    n->publish_facts();
  }
  int run(io_op op, int64_t off, int64_t len, uint32_t flags = 0) {
    done_count w;
    io_request r;
    r.op = op;
    r.offset = off;
    r.length = len;
    r.flags = flags;
    r.waiter = &w;
    n->submit(r);
    EXPECT_EQ(w.calls, 0) << "completed inside submit";
    while (!w.calls) loop.turn();
    for (int i = 0; i < 3; ++i) loop.turn();
    EXPECT_EQ(w.calls, 1);
    EXPECT_EQ(r.offset, off) << "the submitter gets its request back as it sent it";
    EXPECT_EQ(r.length, len);
    EXPECT_EQ(r.op, op);
    return r.result;
  }
  static driver_limits zl(int64_t opt, int64_t max, uint32_t ra = 1) {
    driver_limits l;
    l.request_alignment = ra;
    l.opt_write_zeroes = opt;
    l.max_write_zeroes = max;
    return l;
  }
  static driver_limits dl(int64_t opt, int64_t max, uint32_t ra = 1) {
    driver_limits l;
    l.request_alignment = ra;
    l.opt_discard = opt;
    l.max_discard = max;
    return l;
  }
};

constexpr io_op wz = io_op::write_zeroes, dc = io_op::discard, wr = io_op::write;

TEST_F(split_fixture, no_limits_one_request) {
  make({});
  EXPECT_EQ(run(wz, 1000, 70000), 0);
  EXPECT_EQ(run(dc, 1000, 70000), 0);
  EXPECT_EQ(d->got, (std::vector<piece>{{wz, 1000, 70000}, {dc, 1000, 70000}}));
}

// What QEMU 7.2 sends its file child for `write -z 1000 70000` through blkdebug with opt-write-zero 4096
// and max-write-zero 16384 (strace of qemu-io): head to the first boundary, 16 KiB bulk pieces, the tail.
TEST_F(split_fixture, write_zeroes_head_bulk_tail) {
  make(zl(4096, 16384));
  EXPECT_EQ(run(wz, 1000, 70000), 0);
  EXPECT_EQ(d->got, (std::vector<piece>{{wz, 1000, 3096},
                                        {wz, 4096, 16384},
                                        {wz, 20480, 16384},
                                        {wz, 36864, 16384},
                                        {wz, 53248, 16384},
                                        {wz, 69632, 1368}}));
}

TEST_F(split_fixture, write_zeroes_refused_pieces_become_zero_writes) {
  make(zl(4096, 16384));
  // As blkdebug does: a piece below the zero alignment is refused.
  d->answer = [](const io_request& r) { return r.op == wz && r.length < 4096 ? -ENOTSUP : 0; };
  EXPECT_EQ(run(wz, 1000, 70000), 0);
  EXPECT_EQ(d->got, (std::vector<piece>{{wz, 1000, 3096},
                                        {wr, 1000, 3096},
                                        {wz, 4096, 16384},
                                        {wz, 20480, 16384},
                                        {wz, 36864, 16384},
                                        {wz, 53248, 16384},
                                        {wz, 69632, 1368},
                                        {wr, 69632, 1368}}));
  EXPECT_EQ(d->payload_zero, (std::vector<bool>{true, true}));
  // io_no_fallback: the refusal is the answer.
  d->got.clear();
  EXPECT_EQ(run(wz, 1000, 70000, io_no_fallback), -ENOTSUP);
  EXPECT_EQ(d->got, (std::vector<piece>{{wz, 1000, 3096}}));
}

TEST_F(split_fixture, zero_fallback_respects_max_transfer) {
  driver_limits l = zl(0, 16384);
  l.max_transfer = 4096;
  make(l);
  d->answer = [](const io_request& r) { return r.op == wz ? -ENOTSUP : 0; };
  EXPECT_EQ(run(wz, 0, 12288), 0);
  // The refused 12 KiB piece is written 4 KiB at a time; each remainder is offered as zeroes again first.
  EXPECT_EQ(d->got, (std::vector<piece>{{wz, 0, 12288}, {wr, 0, 4096}, {wz, 4096, 8192}, {wr, 4096, 4096},
                                        {wz, 8192, 4096}, {wr, 8192, 4096}}));
}

TEST_F(split_fixture, first_error_wins_and_stops) {
  make(zl(4096, 16384));
  d->answer = [](const io_request& r) { return r.offset == 20480 ? -EIO : r.offset == 36864 ? -ENOSPC : 0; };
  EXPECT_EQ(run(wz, 1000, 70000), -EIO);
  EXPECT_EQ(d->got, (std::vector<piece>{{wz, 1000, 3096}, {wz, 4096, 16384}, {wz, 20480, 16384}}));
  EXPECT_EQ(n->stats().wr.failed.get(), 1u);
  EXPECT_EQ(n->in_flight(), 0u);
}

// QEMU 7.2 for `discard 0 70000` and `discard 4000 200` with opt-discard 4096, max-discard 16384.
TEST_F(split_fixture, discard_pieces) {
  make(dl(4096, 16384));
  EXPECT_EQ(run(dc, 0, 70000), 0);
  EXPECT_EQ(d->got, (std::vector<piece>{{dc, 0, 16384},
                                        {dc, 16384, 16384},
                                        {dc, 32768, 16384},
                                        {dc, 49152, 16384},
                                        {dc, 65536, 4096},
                                        {dc, 69632, 368}}));
  d->got.clear();
  EXPECT_EQ(run(dc, 4000, 200), 0);
  EXPECT_EQ(d->got, (std::vector<piece>{{dc, 4000, 96}, {dc, 4096, 104}}));
}

// With align 512 QEMU cuts the parts below the request alignment off the head and tail (blkdebug
// then refuses them and the discard skips them): `discard 1000 70000`.
TEST_F(split_fixture, discard_below_request_alignment_is_skipped) {
  make(dl(4096, 16384, 512));
  d->answer = [](const io_request& r) { return r.length < 512 ? -ENOTSUP : 0; };
  EXPECT_EQ(run(dc, 1000, 70000), 0);
  EXPECT_EQ(d->got, (std::vector<piece>{{dc, 1000, 24},
                                        {dc, 1024, 3072},
                                        {dc, 4096, 16384},
                                        {dc, 20480, 16384},
                                        {dc, 36864, 16384},
                                        {dc, 53248, 16384},
                                        {dc, 69632, 1024},
                                        {dc, 70656, 344}}));
  // An unaligned piece rejected with EINVAL is skipped too; an aligned one's error stands.
  d->got.clear();
  d->answer = [](const io_request& r) { return r.length % 4096 ? -EINVAL : r.offset == 4096 ? -EIO : 0; };
  EXPECT_EQ(run(dc, 1000, 70000), -EIO);
  EXPECT_EQ(d->got.size(), 3u);
}

TEST_F(split_fixture, emulated_fua_flushes_once_after_all_pieces) {
  make(zl(4096, 8192));
  EXPECT_EQ(run(wz, 0, 20000, io_fua), 0);
  EXPECT_EQ(d->got, (std::vector<piece>{{wz, 0, 8192}, {wz, 8192, 8192}, {wz, 16384, 3616}, {io_op::flush, 0, 0}}));
}

TEST_F(split_fixture, zero_length_and_other_ops_untouched) {
  make(zl(4096, 8192));
  EXPECT_EQ(run(wz, 4096, 0), 0);
  std::vector<char> b(65536);
  done_count w;
  io_request r;
  r.op = wr;
  r.set_buffer(b.data(), 65536);
  r.waiter = &w;
  n->submit(r);
  while (!w.calls) loop.turn();
  EXPECT_EQ(d->got, (std::vector<piece>{{wz, 4096, 0}, {wr, 0, 65536}}));
}

}  // namespace
}  // namespace blockd::block

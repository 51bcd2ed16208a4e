// quorum driver tests: voting (agreement, disagreement, failing children, thresholds), repair, fifo, writes, and the QUORUM_* events' data; test thread.
#include "formats/filters/quorum.h"
#include "tests/drivers/conformance_stacks.h"

namespace blockd::block {
namespace {

constexpr int64_t qsize = 1 << 20;

struct quorum_fixture {
  stack s;
  node* kids[3] = {};
  node* q = nullptr;

  explicit quorum_fixture(boost::json::object opts, int n = 3) {
    std::vector<std::pair<std::string, node*>> roles;
    for (int i = 0; i < n; ++i) {
      std::string p = temp_image(qsize);
      s.extra_paths.push_back(p);
      kids[i] = s.open("file", {{"filename", p}});
      roles.emplace_back("children." + std::to_string(i), kids[i]);
    }
    q = s.open_with("quorum", std::move(opts), roles);
  }

  int run(node* n, io_op op, int64_t off, int64_t len, void* buf = nullptr) {
    io_request r;
    r.op = op;
    r.offset = off;
    r.length = len;
    if (buf) r.set_buffer(buf, len);
    waiter w;
    r.waiter = &w;
    n->submit(r);
    EXPECT_EQ(w.calls, 0) << "completed synchronously";
    s.loop.until([&] { return w.calls > 0; });
    EXPECT_EQ(w.calls, 1);
    return r.result;
  }
  static std::vector<char> pattern(size_t n, int seed) {
    std::vector<char> v(n);
    for (size_t i = 0; i < n; ++i) v[i] = char((i * 13 + size_t(seed) * 5 + 3) & 0xff);
    return v;
  }
  void write(node* n, int64_t off, std::vector<char> d) { ASSERT_EQ(run(n, io_op::write, off, int64_t(d.size()), d.data()), 0); }
  std::vector<char> read(node* n, int64_t off, int64_t len, int expect = 0) {
    std::vector<char> b(size_t(len), 'X');
    EXPECT_EQ(run(n, io_op::read, off, len, b.data()), expect);
    return b;
  }
  // Only QUORUM_* events, as (name, data) pairs.
  std::vector<std::pair<std::string, boost::json::object>>& events() { return s.events; }
};

boost::json::object bad(const char* type, const char* node, int64_t sector, int64_t count, const char* error = nullptr) {
  boost::json::object d;
  d["type"] = type;
  if (error) d["error"] = error;
  d["node-name"] = node;
  d["sector-num"] = sector;
  d["sectors-count"] = count;
  return d;
}

TEST(quorum, two_of_three_agree_and_the_odd_one_is_reported) {
  quorum_fixture f({{"vote-threshold", 2}});
  ASSERT_NE(f.q, nullptr) << f.s.open_error;
  auto p = f.pattern(8192, 1);
  f.write(f.q, 4096, p);
  EXPECT_TRUE(f.events().empty());
  f.write(f.kids[2], 4096, f.pattern(8192, 2));  // behind the quorum's back
  EXPECT_EQ(f.read(f.q, 4096, 8192), p);
  ASSERT_EQ(f.events().size(), 1u);
  EXPECT_EQ(f.events()[0].first, "QUORUM_REPORT_BAD");
  EXPECT_EQ(f.events()[0].second, bad("read", "n2", 8, 16));
  // Unaligned ranges count the sectors they touch.
  f.events().clear();
  f.read(f.q, 4097, 600);
  ASSERT_EQ(f.events().size(), 1u);
  EXPECT_EQ(f.events()[0].second, bad("read", "n2", 8, 2));
}

TEST(quorum, no_majority_fails_with_eio_and_quorum_failure) {
  quorum_fixture f({{"vote-threshold", 2}});
  ASSERT_NE(f.q, nullptr);
  f.write(f.kids[0], 0, f.pattern(4096, 1));
  f.write(f.kids[1], 0, f.pattern(4096, 2));
  f.write(f.kids[2], 0, f.pattern(4096, 3));
  f.read(f.q, 0, 4096, -EIO);
  ASSERT_EQ(f.events().size(), 1u);
  EXPECT_EQ(f.events()[0].first, "QUORUM_FAILURE");
  boost::json::object want{{"reference", "n3"}, {"sector-num", 0}, {"sectors-count", 8}};
  EXPECT_EQ(f.events()[0].second, want);
}

TEST(quorum, threshold_one_takes_a_version_and_reports_the_rest) {
  quorum_fixture f({{"vote-threshold", 1}});
  ASSERT_NE(f.q, nullptr);
  for (int i = 0; i < 3; ++i) f.write(f.kids[i], 0, f.pattern(512, i + 1));
  // A three-way tie: QEMU's vote list keeps the newest version first, so the last child wins.
  EXPECT_EQ(f.read(f.q, 0, 512), f.pattern(512, 3));
  ASSERT_EQ(f.events().size(), 2u);
  EXPECT_EQ(f.events()[0].second, bad("read", "n1", 0, 1));
  EXPECT_EQ(f.events()[1].second, bad("read", "n0", 0, 1));
}

TEST(quorum, threshold_three_needs_every_child) {
  quorum_fixture f({{"vote-threshold", 3}});
  ASSERT_NE(f.q, nullptr);
  f.write(f.q, 0, f.pattern(4096, 1));
  EXPECT_EQ(f.read(f.q, 0, 4096), f.pattern(4096, 1));
  f.write(f.kids[1], 0, f.pattern(4096, 9));
  f.read(f.q, 0, 4096, -EIO);
  ASSERT_EQ(f.events().size(), 1u);
  EXPECT_EQ(f.events()[0].first, "QUORUM_FAILURE");
}

TEST(quorum, a_failing_child_is_outvoted_and_named_with_its_error) {
  quorum_fixture f({{"vote-threshold", 2}});
  ASSERT_NE(f.q, nullptr);
  auto p = f.pattern(4096, 4);
  f.write(f.q, 8192, p);
  auto left = std::make_shared<int>(1);
  f.s.loop.faults().rule = [left](io::fault_reactor::op_class k, uint64_t) -> io::fault_reactor::decision {
    if (k != io::fault_reactor::op_class::readv || *left == 0) return {};
    --*left;
    return {io::fault_reactor::effect::fail, EIO};
  };
  EXPECT_EQ(f.read(f.q, 8192, 4096), p);
  ASSERT_EQ(f.events().size(), 1u);
  EXPECT_EQ(f.events()[0].first, "QUORUM_REPORT_BAD");
  EXPECT_EQ(f.events()[0].second["error"], "Input/output error");
  EXPECT_EQ(f.events()[0].second["type"], "read");
}

TEST(quorum, writes_succeed_with_threshold_children_and_fail_below) {
  quorum_fixture f({{"vote-threshold", 2}});
  ASSERT_NE(f.q, nullptr);
  auto fail_writes = [&](int n) {
    auto left = std::make_shared<int>(n);
    f.s.loop.faults().rule = [left](io::fault_reactor::op_class k, uint64_t) -> io::fault_reactor::decision {
      if (k != io::fault_reactor::op_class::writev || *left == 0) return {};
      --*left;
      return {io::fault_reactor::effect::fail, ENOSPC};
    };
  };
  auto p = f.pattern(4096, 5);
  fail_writes(1);
  EXPECT_EQ(f.run(f.q, io_op::write, 0, 4096, p.data()), 0);
  ASSERT_EQ(f.events().size(), 1u);
  EXPECT_EQ(f.events()[0].second["type"], "write");
  EXPECT_EQ(f.events()[0].second["error"], "No space left on device");
  f.events().clear();
  fail_writes(2);
  EXPECT_EQ(f.run(f.q, io_op::write, 0, 4096, p.data()), -ENOSPC);
  ASSERT_EQ(f.events().size(), 3u);
  EXPECT_EQ(f.events()[2].first, "QUORUM_FAILURE");
}

TEST(quorum, flush_failures_report_the_child_length) {
  quorum_fixture f({{"vote-threshold", 3}});
  ASSERT_NE(f.q, nullptr);
  auto left = std::make_shared<int>(1);
  f.s.loop.faults().rule = [left](io::fault_reactor::op_class k, uint64_t) -> io::fault_reactor::decision {
    if (k != io::fault_reactor::op_class::fsync || *left == 0) return {};
    --*left;
    return {io::fault_reactor::effect::fail, EIO};
  };
  EXPECT_EQ(f.run(f.q, io_op::flush, 0, 0), -EIO);
  ASSERT_EQ(f.events().size(), 1u);
  EXPECT_EQ(f.events()[0].second["type"], "flush");
  EXPECT_EQ(f.events()[0].second["sector-num"], 0);
  EXPECT_EQ(f.events()[0].second["sectors-count"], qsize / 512);
  EXPECT_EQ(f.run(f.q, io_op::flush, 0, 0), 0);
}

TEST(quorum, rewrite_corrupted_repairs_the_losing_child) {
  quorum_fixture f({{"vote-threshold", 2}, {"rewrite-corrupted", true}});
  ASSERT_NE(f.q, nullptr);
  auto p = f.pattern(65536, 6);
  f.write(f.q, 0, p);
  f.write(f.kids[0], 4096, f.pattern(512, 7));
  EXPECT_NE(f.read(f.kids[0], 0, 65536), p);
  EXPECT_EQ(f.read(f.q, 0, 65536), p);
  EXPECT_EQ(f.read(f.kids[0], 0, 65536), p) << "the bad child holds the winning data again";
  f.events().clear();
  EXPECT_EQ(f.read(f.q, 0, 65536), p);
  EXPECT_TRUE(f.events().empty());
}

TEST(quorum, fifo_reads_the_first_child_and_falls_back_on_errors) {
  quorum_fixture f({{"vote-threshold", 1}, {"read-pattern", "fifo"}});
  ASSERT_NE(f.q, nullptr);
  auto p = f.pattern(4096, 8);
  f.write(f.q, 0, p);
  f.write(f.kids[1], 0, f.pattern(4096, 9));
  EXPECT_EQ(f.read(f.q, 0, 4096), p) << "fifo does not vote";
  EXPECT_TRUE(f.events().empty());
  auto left = std::make_shared<int>(1);
  f.s.loop.faults().rule = [left](io::fault_reactor::op_class k, uint64_t) -> io::fault_reactor::decision {
    if (k != io::fault_reactor::op_class::readv || *left == 0) return {};
    --*left;
    return {io::fault_reactor::effect::fail, EIO};
  };
  EXPECT_EQ(f.read(f.q, 0, 4096), f.pattern(4096, 9)) << "child 0 failed, child 1 answered";
  ASSERT_EQ(f.events().size(), 1u);
  EXPECT_EQ(f.events()[0].second, bad("read", "n0", 0, 8, "Input/output error"));
}

TEST(quorum, open_refuses_what_qemu_refuses) {
  auto check = [](quorum_settings s, int n) {
    auto r = check_quorum_settings(s, n);
    return r ? std::string() : r.error().desc;
  };
  EXPECT_EQ(check({.threshold = 3}, 2), "threshold may not exceed children count");
  EXPECT_EQ(check({.threshold = 0}, 2), "Parameter 'vote-threshold' expects a value >= 1");
  EXPECT_EQ(check({.threshold = 1}, 0), "Number of provided children must be 1 or more");
  EXPECT_EQ(check({.threshold = 2, .blkverify = true}, 3),
            "blkverify=on can only be set if there are exactly two files and vote-threshold is 2");
  EXPECT_EQ(check({.threshold = 1, .blkverify = true}, 2),
            "blkverify=on can only be set if there are exactly two files and vote-threshold is 2");
  EXPECT_EQ(check({.threshold = 2, .blkverify = true, .rewrite_corrupted = true}, 2),
            "rewrite-corrupted=on cannot be used with blkverify=on");
  EXPECT_EQ(check({.threshold = 1, .rewrite_corrupted = true, .fifo = true}, 2), "");
  EXPECT_EQ(check({.threshold = 2, .blkverify = true}, 2), "");
  quorum_fixture f({{"vote-threshold", 4}});
  EXPECT_EQ(f.q, nullptr);
  EXPECT_EQ(f.s.open_error, "threshold may not exceed children count");
}

TEST(quorum, blkverify_mismatch_fails_the_read) {
  quorum_fixture f({{"vote-threshold", 2}, {"blkverify", true}}, 2);
  ASSERT_NE(f.q, nullptr);
  f.write(f.q, 0, f.pattern(512, 1));
  EXPECT_EQ(f.read(f.q, 0, 512), f.pattern(512, 1));
  f.write(f.kids[1], 0, f.pattern(512, 2));
  f.read(f.q, 0, 512, -EIO);
}

TEST(quorum, discard_is_ignored_and_everything_is_data) {
  quorum_fixture f({{"vote-threshold", 2}});
  ASSERT_NE(f.q, nullptr);
  auto p = f.pattern(4096, 3);
  f.write(f.q, 0, p);
  EXPECT_EQ(f.run(f.q, io_op::discard, 0, 4096), 0);
  EXPECT_EQ(f.read(f.q, 0, 4096), p);
}

}  // namespace
}  // namespace blockd::block

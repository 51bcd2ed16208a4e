// blklogwrites driver tests: the log's entries and super block as dm-log-writes lays them out, log-append, and the refusals; test thread.
#include <fstream>
#include <iterator>

#include "formats/filters/blklogwrites.h"
#include "tests/drivers/conformance_stacks.h"

namespace blockd::block {
namespace {

uint64_t le64(const std::vector<unsigned char>& b, size_t at) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | b[at + size_t(i)];
  return v;
}

std::vector<unsigned char> slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

struct entry {
  uint64_t sector, nr, flags, data_len;
  std::vector<unsigned char> data;
};

// Our own reader of the format: the entries the super block counts.
std::vector<entry> parse(const std::vector<unsigned char>& log, uint32_t ss, uint64_t nr_entries) {
  std::vector<entry> out;
  size_t at = ss;
  for (uint64_t i = 0; i < nr_entries && at + 32 <= log.size(); ++i) {
    entry e{le64(log, at), le64(log, at + 8), le64(log, at + 16), le64(log, at + 24), {}};
    at += ss;
    if (!(e.flags & log_discard_flag)) {
      size_t n = size_t(e.nr * ss);
      e.data.assign(log.begin() + long(at), log.begin() + long(std::min(log.size(), at + n)));
      at += n;
    }
    out.push_back(std::move(e));
  }
  return out;
}

struct log_fixture {
  stack s;
  std::string log;
  node* top = nullptr;
  explicit log_fixture(boost::json::object opts, std::string log_path = "") {
    s.path = temp_image(1 << 20);
    log = log_path.empty() ? temp_image(0) : log_path;
    if (log_path.empty()) s.extra_paths.push_back(log);
    node* f = s.open("file", {{"filename", s.path}});
    node* l = s.open("file", {{"filename", log}});
    top = s.open_with("blklogwrites", std::move(opts), {{"file", f}, {"log", l}});
  }
  int run(io_op op, int64_t off, int64_t len, void* buf = nullptr, uint32_t flags = 0) {
    io_request r;
    r.op = op;
    r.offset = off;
    r.length = len;
    r.flags = flags;
    if (buf) r.set_buffer(buf, len);
    waiter w;
    r.waiter = &w;
    top->submit(r);
    s.loop.until([&] { return w.calls > 0; });
    return r.result;
  }
};

TEST(blklogwrites, writes_discards_and_flushes_become_entries) {
  log_fixture f({});
  ASSERT_NE(f.top, nullptr) << f.s.open_error;
  std::vector<char> a(4096, 'a'), b(1024, 'b');
  EXPECT_EQ(f.run(io_op::write, 8192, 4096, a.data()), 0);
  EXPECT_EQ(f.run(io_op::write, 512, 1024, b.data(), io_fua), 0);
  EXPECT_EQ(f.run(io_op::write_zeroes, 65536, 2048), 0);
  EXPECT_EQ(f.run(io_op::discard, 131072, 4096), 0);
  EXPECT_EQ(f.run(io_op::flush, 0, 0), 0);
  auto log = slurp(f.log);
  ASSERT_GE(log.size(), 512u);
  EXPECT_EQ(le64(log, 0), log_magic);
  EXPECT_EQ(le64(log, 8), 1u);
  EXPECT_EQ(le64(log, 16), 6u) << "the flush wrote the super block";
  EXPECT_EQ(log[24] | log[25] << 8, 512);
  auto e = parse(log, 512, 6);
  ASSERT_EQ(e.size(), 6u);
  EXPECT_EQ(e[0].sector, 16u);
  EXPECT_EQ(e[0].nr, 8u);
  EXPECT_EQ(e[0].flags, 0u);
  EXPECT_EQ(e[0].data_len, 0u);
  EXPECT_EQ(e[0].data, std::vector<unsigned char>(4096, 'a'));
  EXPECT_EQ(e[1].sector, 1u);
  EXPECT_EQ(e[1].nr, 2u);
  EXPECT_EQ(e[1].flags, 0u) << "FUA is emulated by a flush, as in QEMU";
  EXPECT_EQ(e[1].data, std::vector<unsigned char>(1024, 'b'));
  EXPECT_EQ(e[2].flags, log_flush_flag);
  EXPECT_EQ(e[3].sector, 128u);
  EXPECT_EQ(e[3].nr, 4u);
  EXPECT_EQ(e[3].data, std::vector<unsigned char>(2048, 0));
  EXPECT_EQ(e[4].flags, log_discard_flag);
  EXPECT_EQ(e[4].sector, 256u);
  EXPECT_EQ(e[4].nr, 8u);
  EXPECT_EQ(e[5].flags, log_flush_flag);
  EXPECT_EQ(e[5].nr, 0u);
  // 1 super + (1+8) + (1+2) + 1 + (1+4) + 1 + 1 sectors.
  EXPECT_EQ(log.size(), 21u * 512);
}

TEST(blklogwrites, unaligned_writes_are_logged_as_whole_sectors) {
  log_fixture f({});
  ASSERT_NE(f.top, nullptr);
  std::vector<char> a(1024, 'a'), b(10, 'b');
  EXPECT_EQ(f.run(io_op::write, 0, 1024, a.data()), 0);
  EXPECT_EQ(f.run(io_op::write, 100, 10, b.data()), 0);
  EXPECT_EQ(f.run(io_op::flush, 0, 0), 0);
  auto e = parse(slurp(f.log), 512, 3);
  ASSERT_EQ(e.size(), 3u);
  EXPECT_EQ(e[1].sector, 0u);
  EXPECT_EQ(e[1].nr, 1u);
  std::vector<unsigned char> want(512, 'a');
  std::fill(want.begin() + 100, want.begin() + 110, 'b');
  EXPECT_EQ(e[1].data, want);
}

TEST(blklogwrites, log_append_continues_and_bad_logs_are_refused) {
  std::string log = temp_image(0);
  {
    log_fixture f({}, log);
    ASSERT_NE(f.top, nullptr);
    std::vector<char> a(512, 'a');
    EXPECT_EQ(f.run(io_op::write, 0, 512, a.data()), 0);
    EXPECT_EQ(f.run(io_op::flush, 0, 0), 0);
  }
  {
    log_fixture f({{"log-append", true}}, log);
    ASSERT_NE(f.top, nullptr) << f.s.open_error;
    std::vector<char> c(512, 'c');
    EXPECT_EQ(f.run(io_op::write, 1024, 512, c.data()), 0);
    EXPECT_EQ(f.run(io_op::flush, 0, 0), 0);
    auto bytes = slurp(log);
    EXPECT_EQ(le64(bytes, 16), 4u);
    auto e = parse(bytes, 512, 4);
    ASSERT_EQ(e.size(), 4u);
    EXPECT_EQ(e[2].sector, 2u);
    EXPECT_EQ(e[2].data, std::vector<unsigned char>(512, 'c'));
  }
  {
    log_fixture f({{"log-append", true}, {"log-sector-size", 512}}, log);
    EXPECT_EQ(f.top, nullptr);
    EXPECT_EQ(f.s.open_error, "log-append and log-sector-size are mutually exclusive");
  }
  {
    std::ofstream(log, std::ios::binary | std::ios::trunc) << std::string(512, 'x');
    log_fixture f({{"log-append", true}}, log);
    EXPECT_EQ(f.top, nullptr);
    EXPECT_EQ(f.s.open_error, "Invalid log superblock magic");
  }
  {
    log_fixture f({{"log-sector-size", 1000}}, log);
    EXPECT_EQ(f.s.open_error, "Invalid log sector size 1000");
    log_fixture g({{"log-super-update-interval", 0}}, log);
    EXPECT_EQ(g.s.open_error, "Invalid log superblock update interval 0");
  }
  unlink(log.c_str());
}

TEST(blklogwrites, the_super_block_follows_the_update_interval) {
  log_fixture f({{"log-super-update-interval", 2}});
  ASSERT_NE(f.top, nullptr);
  std::vector<char> a(512, 'a');
  EXPECT_EQ(f.run(io_op::write, 0, 512, a.data()), 0);
  EXPECT_EQ(slurp(f.log).size() >= 8 ? le64(slurp(f.log), 0) : 0u, 0u) << "no super block after one entry";
  EXPECT_EQ(f.run(io_op::write, 512, 512, a.data()), 0);
  auto log = slurp(f.log);
  EXPECT_EQ(le64(log, 0), log_magic);
  EXPECT_EQ(le64(log, 16), 2u);
}

}  // namespace
}  // namespace blockd::block

// qcow2 driver tests against qemu-img/qemu-io: images they write read bit-exactly, images blockd writes check clean and compare equal, a randomized model test; test thread.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <boost/json.hpp>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "formats/qcow2/layout.h"
#include "storage/block/contract.h"
#include "storage/block/graph.h"
#include "storage/block/local_loop.h"
#include "storage/block/node.h"
#include "storage/block/sync_io.h"
#include "storage/io/reactor.h"
#include "tests/unit/qcow2_test_stack.h"

namespace blockd::block {
namespace {

namespace json = boost::json;
using namespace qcow2_test;

std::vector<uint8_t> slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::vector<uint8_t>((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

std::string qemu_img(const std::string& args, int* st = nullptr) { return run("qemu-img " + args, st); }

// The whole virtual disk as qemu-img sees it.
std::vector<uint8_t> qemu_content(const std::string& path, const scratch& s) {
  std::string raw = s.path("expect.raw");
  int st = 0;
  std::string out = qemu_img("convert -O raw " + path + " " + raw, &st);
  EXPECT_EQ(st, 0) << out;
  auto v = slurp(raw);
  unlink(raw.c_str());
  return v;
}

std::vector<uint8_t> blockd_content(node& n) {
  sync_io io(n);
  int64_t len = n.length();
  std::vector<uint8_t> out(static_cast<size_t>(len));
  void* buf = nullptr;
  EXPECT_EQ(posix_memalign(&buf, 4096, 1 << 20), 0);
  for (int64_t off = 0; off < len; off += 1 << 20) {
    int64_t l = std::min<int64_t>(1 << 20, len - off);
    EXPECT_EQ(io.read(buf, l, off), 0) << "read at " << off;
    std::memcpy(out.data() + off, buf, size_t(l));
  }
  free(buf);
  return out;
}

void write_pattern(node& n, int64_t off, int64_t len, uint8_t v) {
  void* buf = nullptr;
  ASSERT_EQ(posix_memalign(&buf, 4096, size_t(len)), 0);
  std::memset(buf, v, size_t(len));
  ASSERT_EQ(sync_io(n).write(buf, len, off), 0);
  free(buf);
}

void expect_same(const std::vector<uint8_t>& a, const std::vector<uint8_t>& b, const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  for (size_t i = 0; i < a.size(); ++i)
    if (a[i] != b[i]) {
      FAIL() << what << ": first difference at byte " << i << " (" << int(a[i]) << " vs " << int(b[i]) << ")";
    }
}

#define NEED_QEMU()                                                  \
  if (!have_tool("qemu-img") || !have_tool("qemu-io")) GTEST_SKIP() << "qemu-img/qemu-io not installed"

// qemu-io commands that leave data, zero clusters, discarded holes and partial clusters behind.
std::string pattern_cmds(int64_t size, uint64_t cs) {
  std::ostringstream c;
  c << " -c 'write -P 0x11 0 " << cs * 3 << "'";
  c << " -c 'write -P 0x22 " << cs * 5 + 512 << " 1536'";
  c << " -c 'write -P 0x33 " << size / 2 << " " << cs * 2 << "'";
  c << " -c 'write -z " << cs << " " << cs << "'";
  c << " -c 'discard " << size / 2 << " " << cs << "'";
  c << " -c 'write -P 0x44 " << size - 4096 << " 4096'";
  return c.str();
}

struct image_case {
  std::string name;
  std::string opts;
  uint64_t cs;
};

TEST(qcow2_read, images_qemu_wrote_read_bit_exactly) {
  NEED_QEMU();
  scratch s;
  std::vector<image_case> cases = {
      {"v3-64k", "cluster_size=65536", 65536},
      {"v2-64k", "compat=0.10", 65536},
      {"v3-512", "cluster_size=512", 512},
      {"v3-4k-rc1", "cluster_size=4096,refcount_bits=1", 4096},
      {"v3-2m", "cluster_size=2097152", 2097152},
      {"v3-64k-rc64", "refcount_bits=64", 65536},
      {"ext-l2", "extended_l2=on,cluster_size=65536", 65536},
      {"ext-l2-32k", "extended_l2=on,cluster_size=32768", 32768},
      {"lazy", "lazy_refcounts=on", 65536},
      {"zstd", "compression_type=zstd", 65536},
      {"prealloc-meta", "preallocation=metadata", 65536},
  };
  for (auto& c : cases) {
    SCOPED_TRACE(c.name);
    std::string img = s.path(c.name + ".qcow2");
    int64_t size = std::max<int64_t>(8 << 20, int64_t(c.cs) * 8);
    int st = 0;
    std::string out = qemu_img("create -q -f qcow2 -o " + c.opts + " " + img + " " + std::to_string(size), &st);
    ASSERT_EQ(st, 0) << out;
    out = run("qemu-io -f qcow2" + pattern_cmds(size, c.cs) + " " + img, &st);
    ASSERT_EQ(st, 0) << out;
    auto want = qemu_content(img, s);
    stack k;
    node* n = k.open_qcow2(img, true);
    ASSERT_NE(n, nullptr);
    expect_same(blockd_content(*n), want, c.name);
  }
}

TEST(qcow2_read, compressed_clusters_and_backing_chains) {
  NEED_QEMU();
  scratch s;
  int64_t size = 4 << 20;
  std::string base = s.path("base.qcow2"), raw = s.path("base.raw");
  int st = 0;
  for (const char* type : {"zlib", "zstd"}) {
    SCOPED_TRACE(type);
    qemu_img("create -q -f raw " + raw + " " + std::to_string(size));
    run("qemu-io -f raw -c 'write -P 0x5a 0 1M' -c 'write -P 0x17 2M 300k' " + raw, &st);
    ASSERT_EQ(st, 0);
    std::string out =
        qemu_img("convert -c -O qcow2 -o compression_type=" + std::string(type) + " " + raw + " " + base, &st);
    ASSERT_EQ(st, 0) << out;
    stack k;
    node* n = k.open_qcow2(base, true);
    ASSERT_NE(n, nullptr);
    expect_same(blockd_content(*n), slurp(raw), "compressed");
  }
  // A chain of three with a raw bottom, named by the headers (relative names, backing formats).
  std::string mid = s.path("mid.qcow2"), top = s.path("top.qcow2");
  qemu_img("create -q -f qcow2 -b base.raw -F raw " + mid, &st);
  ASSERT_EQ(st, 0);
  run("qemu-io -f qcow2 -c 'write -P 0x66 64k 64k' -c 'write -z 2M 64k' " + mid, &st);
  qemu_img("create -q -f qcow2 -o cluster_size=4096 -b mid.qcow2 -F qcow2 " + top + " 6M", &st);
  ASSERT_EQ(st, 0);
  run("qemu-io -f qcow2 -c 'write -P 0x77 100k 8k' -c 'write -P 0x78 5M 4k' " + top, &st);
  auto want = qemu_content(top, s);
  stack k;
  node* n = k.open_qcow2(top, true);
  ASSERT_NE(n, nullptr);
  EXPECT_EQ(n->length(), 6 << 20);
  expect_same(blockd_content(*n), want, "chain");
}

// Applies random writes, zeroes and discards through blockd and to a model; every so often reads
// a random range back; finally qemu-img must find the image clean and equal to the model.
void model_run(const std::string& img, const scratch& s, uint64_t seed, int ops, bool with_backing_content,
               bool discards = true, bool resizes = false) {
  std::vector<uint8_t> initial = with_backing_content ? qemu_content(img, s) : std::vector<uint8_t>();
  stack k;
  node* n = k.open_qcow2(img, false, {{"discard", "unmap"}});
  ASSERT_NE(n, nullptr);
  int64_t size = n->length();
  std::vector<uint8_t> model = with_backing_content ? initial : std::vector<uint8_t>(size_t(size), 0);
  std::mt19937_64 rng(seed);
  sync_io io(*n);
  void* buf = nullptr;
  ASSERT_EQ(posix_memalign(&buf, 4096, 1 << 20), 0);
  auto* b = static_cast<uint8_t*>(buf);
  for (int i = 0; i < ops; ++i) {
    int64_t unit = (rng() % 4 == 0) ? 512 : 4096;
    int64_t len = unit * int64_t(1 + rng() % (rng() % 8 == 0 ? 200 : 16));
    len = std::min<int64_t>(len, 1 << 20);
    int64_t off = int64_t(rng() % uint64_t(size / unit)) * unit;
    if (off + len > size) len = size - off;
    int op = int(rng() % 10);
    if (op == 8 && !discards) op = 0;
    if (op < 6) {
      uint8_t v = uint8_t(rng());
      for (int64_t j = 0; j < len; ++j) b[j] = uint8_t(v + j / 512);
      ASSERT_EQ(io.write(b, len, off), 0) << "write " << off << "+" << len;
      std::memcpy(model.data() + off, b, size_t(len));
    } else if (op < 8) {
      ASSERT_EQ(io.write_zeroes(off, len, (rng() & 1) ? uint32_t(io_may_unmap) : 0u), 0) << "zero " << off << "+" << len;
      std::memset(model.data() + off, 0, size_t(len));
    } else if (op < 9) {
      // Discard is advisory: only the whole clusters it covers change, and they read as zeroes.
      ASSERT_EQ(io.discard(off, len), 0);
      auto facts = n->driver().facts();
      int64_t cs = facts.cluster_size;
      int64_t a0 = (off + cs - 1) / cs * cs, a1 = (off + len) / cs * cs;
      if (off + len == size) a1 = off + len;
      if (a1 > a0) std::memset(model.data() + a0, 0, size_t(a1 - a0));
    } else if (rng() % 8 == 0 && resizes) {
      // Resize by up to a few clusters either way (sector multiples); what a shrink cut off reads
      // as zeroes when the disk grows again.
      int64_t cs = n->driver().facts().cluster_size;
      int64_t delta = int64_t(rng() % uint64_t(4 * cs / 512 + 1)) * 512;
      int64_t next = (rng() & 1) ? size + delta : std::max<int64_t>(size - delta, 1 << 20);
      ASSERT_TRUE(n->driver().truncate(next).has_value()) << "resize to " << next;
      ASSERT_EQ(n->length(), next);
      model.resize(size_t(next), 0);
      if (next < size) model.resize(size_t(next));
      size = next;
    } else {
      ASSERT_EQ(io.read(b, len, off), 0);
      ASSERT_EQ(std::memcmp(b, model.data() + off, size_t(len)), 0) << "read " << off << "+" << len << " op " << i;
    }
    if (rng() % 50 == 0) {
      ASSERT_EQ(io.flush(), 0);
    }
    if (getenv("BLOCKD_Q2_VERIFY_EACH")) {
      int64_t lo = std::max<int64_t>(0, off - 65536), hi = std::min<int64_t>(size, std::min(off + len, lo + (1 << 20) - 65536) + 65536);
      ASSERT_EQ(io.read(b, hi - lo, lo), 0);
      ASSERT_EQ(std::memcmp(b, model.data() + lo, size_t(hi - lo)), 0) << "after op " << i << " kind " << op << " at "
                                                                      << off << "+" << len;
    }
  }
  free(buf);
  k.close(n);
  expect_clean(img);
  expect_same(qemu_content(img, s), model, "model");
}

TEST(qcow2_write, random_ops_match_a_model_and_check_clean) {
  NEED_QEMU();
  scratch s;
  std::vector<image_case> cases = {
      {"v3-64k", "cluster_size=65536", 65536},   {"v2", "compat=0.10", 65536},
      {"c512", "cluster_size=512", 512},         {"c4k-rc1", "cluster_size=4096,refcount_bits=1", 4096},
      {"ext-l2", "extended_l2=on", 65536},       {"rc64", "refcount_bits=64,cluster_size=4096", 4096},
      {"lazy", "lazy_refcounts=on", 65536},      {"c2m", "cluster_size=2097152", 2097152},
      {"data-file", "data_file=DIR/data-file.raw", 65536},
      {"data-file-raw", "data_file=DIR/data-file-raw.raw,data_file_raw=on", 65536},
  };
  uint64_t seed = 1;
  for (auto& c : cases) {
    SCOPED_TRACE(c.name);
    if (getenv("Q2CASE") && c.name != getenv("Q2CASE")) continue;
    std::string img = s.path(c.name + ".qcow2");
    int st = 0;
    std::string opts = c.opts;
    if (auto p = opts.find("DIR"); p != std::string::npos) opts.replace(p, 3, s.dir);
    std::string out = qemu_img("create -q -f qcow2 -o " + opts + " " + img + " 16M", &st);
    ASSERT_EQ(st, 0) << out;
    // With a raw data file a discard goes to the data file node, which (discard=ignore, the
    // default for the implicitly opened one) may keep the data: its result is not fixed.
    // Resizes too (not exercised with data files, whose length blockd leaves to their owner).
    model_run(img, s, seed++, 400, false, c.name != "data-file-raw", c.name.rfind("data-file", 0) != 0);
    if (c.name == "data-file-raw") {
      // The data file alone is the disk, as a raw image.
      int64_t size = 16 << 20;
      auto raw = slurp(s.path("data-file-raw.raw"));
      raw.resize(size_t(size), 0);
      expect_same(raw, qemu_content(img, s), "raw data file");
    }
  }
}

// Writes over several allocated clusters: back to back on the host (one write for the whole
// request), in reverse host order, and across a zero cluster and a hole (split per cluster).
// Whatever the path, the content must be what qemu-img reads and the image must check clean.
TEST(qcow2_write, multi_cluster_overwrites_in_place_and_split) {
  NEED_QEMU();
  scratch s;
  std::string img = s.path("runs.qcow2");
  int st = 0;
  std::string out = qemu_img("create -q -f qcow2 " + img + " 16M", &st);
  ASSERT_EQ(st, 0) << out;
  // 0-4M: allocated in order; 8M-10M: cluster by cluster from the top down (reverse host order);
  // 12M-14M: allocated, then a zero cluster and a discarded one in the middle.
  std::string cmds = " -c 'write -P 0x11 0 4M'";
  for (int i = 31; i >= 0; --i) cmds += " -c 'write -P 0x22 " + std::to_string((8 << 20) + i * 65536) + " 64k'";
  cmds += " -c 'write -P 0x33 12M 2M' -c 'write -z 13M 64k' -c 'discard 13248k 64k'";
  out = run("qemu-io -f qcow2" + cmds + " " + img, &st);
  ASSERT_EQ(st, 0) << out;
  {
    stack k;
    node* n = k.open_qcow2(img);
    ASSERT_NE(n, nullptr);
    write_pattern(*n, 1000 * 512, 1 << 20, 0xa1);             // unaligned, 17 contiguous clusters
    write_pattern(*n, 3 << 20, 1 << 20, 0xa2);                // aligned, ends at the allocated edge
    write_pattern(*n, (3 << 20) + 512 * 1024, 1 << 20, 0xa3); // runs past it into unallocated space
    write_pattern(*n, (8 << 20) + 4096, 1 << 20, 0xa4);       // reverse host order
    write_pattern(*n, (12 << 20) + 512 * 1024, 1 << 20, 0xa5); // over the zero cluster and the hole
    auto mine = blockd_content(*n);
    k.close(n);
    expect_same(mine, qemu_content(img, s), "blockd vs qemu-img");
    std::vector<uint8_t> model(16 << 20, 0);
    auto fill = [&](int64_t off, int64_t len, uint8_t v) { std::memset(model.data() + off, v, size_t(len)); };
    fill(0, 4 << 20, 0x11);
    fill(8 << 20, 2 << 20, 0x22);
    fill(12 << 20, 2 << 20, 0x33);
    fill(13 << 20, 65536, 0);
    fill(13248 * 1024, 65536, 0);
    fill(1000 * 512, 1 << 20, 0xa1);
    fill(3 << 20, 1 << 20, 0xa2);
    fill((3 << 20) + 512 * 1024, 1 << 20, 0xa3);
    fill((8 << 20) + 4096, 1 << 20, 0xa4);
    fill((12 << 20) + 512 * 1024, 1 << 20, 0xa5);
    expect_same(mine, model, "blockd vs model");
  }
  expect_clean(img);
}

TEST(qcow2_write, over_a_backing_file_and_compressed_clusters) {
  NEED_QEMU();
  scratch s;
  std::string raw = s.path("b.raw"), base = s.path("b.qcow2"), top = s.path("t.qcow2");
  int st = 0;
  qemu_img("create -q -f raw " + raw + " 8M");
  run("qemu-io -f raw -c 'write -P 0x5a 0 3M' -c 'write -P 0x17 5M 1M' " + raw, &st);
  qemu_img("convert -c -O qcow2 " + raw + " " + base, &st);
  ASSERT_EQ(st, 0);
  // Writes into compressed clusters (copy-on-write from them).
  model_run(base, s, 77, 300, true);
  qemu_img("create -q -f qcow2 -b b.raw -F raw " + top, &st);
  ASSERT_EQ(st, 0);
  model_run(top, s, 78, 300, true);
  qemu_img("create -q -f qcow2 -o extended_l2=on -b b.raw -F raw " + s.path("te.qcow2"), &st);
  model_run(s.path("te.qcow2"), s, 79, 300, true);
}

TEST(qcow2_write, growing_past_the_refcount_table_and_resizing) {
  NEED_QEMU();
  scratch s;
  std::string img = s.path("grow.qcow2");
  int st = 0;
  // 512-byte clusters with 64-bit refcounts: one refcount block covers 64 clusters, so writes
  // need new blocks and several refcount table growths.
  qemu_img("create -q -f qcow2 -o cluster_size=512,refcount_bits=64 " + img + " 4M", &st);
  ASSERT_EQ(st, 0);
  model_run(img, s, 5, 300, false);
  {
    stack k;
    node* n = k.open_qcow2(img);
    ASSERT_NE(n, nullptr);
    ASSERT_TRUE(n->driver().truncate(64 << 20).has_value());
    sync_io io(*n);
    std::vector<uint8_t> b(4096, 0xab);
    void* buf = nullptr;
    ASSERT_EQ(posix_memalign(&buf, 4096, 4096), 0);
    std::memcpy(buf, b.data(), 4096);
    ASSERT_EQ(io.write(buf, 4096, (64 << 20) - 4096), 0);
    free(buf);
    k.close(n);
  }
  expect_clean(img);
  std::string info = qemu_img("info --output=json " + img);
  EXPECT_NE(info.find("\"virtual-size\": 67108864"), std::string::npos) << info;
  // A big growth of a 512-byte-cluster image: the new L1 table spans many refcount block ranges.
  std::string big = s.path("big.qcow2");
  qemu_img("create -q -f qcow2 -o cluster_size=512 " + big + " 1M", &st);
  ASSERT_EQ(st, 0);
  {
    stack k;
    node* n = k.open_qcow2(big);
    ASSERT_NE(n, nullptr);
    ASSERT_TRUE(n->driver().truncate(int64_t(2) << 30).has_value());
    write_pattern(*n, (int64_t(2) << 30) - 4096, 4096, 0x77);
    k.close(n);
  }
  expect_clean(big);
  auto tail = qemu_img("info --output=json " + big);
  EXPECT_NE(tail.find("\"virtual-size\": 2147483648"), std::string::npos) << tail;
}

TEST(qcow2_open, bad_images_fail_clearly) {
  NEED_QEMU();
  scratch s;
  std::string img = s.path("x.qcow2");
  std::ofstream(img) << "this is not a qcow2 image at all, just text";
  stack k;
  json::object o{{"driver", "qcow2"}, {"node-name", "x"}, {"file", json::object{{"driver", "file"}, {"filename", img}}}};
  auto r = k.add(o);
  ASSERT_FALSE(r.has_value());
  EXPECT_NE(r.error().desc.find("qcow2"), std::string::npos) << r.error().desc;
}

}  // namespace
}  // namespace blockd::block

// ---- crash safety ------------------------------------------------------------------------------

namespace blockd::block {
namespace {

// The writer half of the crash test: run in a child process (this same binary, selected by
// environment), it writes forever and reports each completed step on stdout; the parent kills it.
TEST(qcow2_crash, child_writer) {
  const char* img = getenv("BLOCKD_Q2_CRASH_IMAGE");
  if (!img) GTEST_SKIP() << "only runs as the crash test's child";
  uint64_t seed = std::strtoull(getenv("BLOCKD_Q2_CRASH_SEED"), nullptr, 10);
  stack k;
  node* n = k.open_qcow2(img);
  ASSERT_NE(n, nullptr);
  sync_io io(*n);
  std::mt19937_64 rng(seed);
  void* buf = nullptr;
  ASSERT_EQ(posix_memalign(&buf, 4096, 65536), 0);
  int64_t size = n->length();
  for (uint64_t i = 0;; ++i) {
    int64_t len = 4096 * int64_t(1 + rng() % 4);
    int64_t off = int64_t(rng() % uint64_t(size / 4096)) * 4096;
    if (off + len > size) len = size - off;
    std::memset(buf, int(i & 0xff), size_t(len));
    int op = int(rng() % 16);
    int r = op == 0 ? io.write_zeroes(off, len, io_may_unmap) : op == 1 ? io.discard(off, len) : io.write(buf, len, off);
    if (r) return;
    if (rng() % 8 == 0 && io.flush()) return;
    std::printf("%llu\n", (unsigned long long)i);
    std::fflush(stdout);
  }
}

// A killed process's io_uring may keep its file open (and its OFD locks held) for a moment after
// waitpid: wait until nobody holds QEMU's lock bytes, with a deadline.
bool wait_unlocked(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  bool free_now = false;
  for (int i = 0; i < 10000 && !free_now; ++i) {
    struct flock fl {};
    fl.l_type = F_WRLCK;
    fl.l_whence = SEEK_SET;
    fl.l_start = 100;
    fl.l_len = 200;
    free_now = fcntl(fd, F_OFD_GETLK, &fl) == 0 && fl.l_type == F_UNLCK;
    if (!free_now) usleep(1000);
  }
  ::close(fd);
  return free_now;
}

// Kills a writer at a random point, `trials` times; every image must check without corruption.
void crash_trials(int trials, const std::string& opts) {
  scratch s;
  std::mt19937_64 rng(getenv("BLOCKD_Q2_CRASH_SEED0") ? std::strtoull(getenv("BLOCKD_Q2_CRASH_SEED0"), nullptr, 10) : 4242);
  for (int t = 0; t < trials; ++t) {
    SCOPED_TRACE("trial " + std::to_string(t));
    std::string img = s.path("crash.qcow2");
    unlink(img.c_str());
    int st = 0;
    std::string out = qemu_img("create -q -f qcow2 -o " + opts + " " + img + " 64M", &st);
    ASSERT_EQ(st, 0) << out;
    int pipefd[2];
    ASSERT_EQ(pipe(pipefd), 0);
    uint64_t steps = 5 + rng() % 200;
    pid_t pid = fork();
    if (pid == 0) {
      dup2(pipefd[1], 1);
      close(pipefd[0]);
      setenv("BLOCKD_Q2_CRASH_IMAGE", img.c_str(), 1);
      setenv("BLOCKD_Q2_CRASH_SEED", std::to_string(rng()).c_str(), 1);
      execl("/proc/self/exe", "unit_tests", "--gtest_filter=qcow2_crash.child_writer", (char*)nullptr);
      _exit(127);
    }
    close(pipefd[1]);
    FILE* f = fdopen(pipefd[0], "r");
    char line[256];
    uint64_t seen = 0;
    while (seen < steps && fgets(line, sizeof line, f))
      if (line[0] >= '0' && line[0] <= '9') ++seen;
    kill(pid, SIGKILL);
    waitpid(pid, nullptr, 0);
    fclose(f);
    ASSERT_TRUE(wait_unlocked(img));
    out = qemu_img("check --output=json " + img, &st);
    // 0: clean; 3: leaked clusters only. Anything else (2: corruption) fails.
    EXPECT_TRUE(st == 0 || st == 3) << "after " << seen << " steps: " << out;
    auto v = json::parse(out.substr(out.find('{')));
    auto& o = v.as_object();
    EXPECT_EQ(o.contains("corruptions") ? o.at("corruptions").as_int64() : 0, 0) << out;
    // blockd opens what it left (repairing lazy refcounts) and leaves it clean on close.
    {
      stack k;
      node* n = k.open_qcow2(img);
      ASSERT_NE(n, nullptr);
      k.close(n);
    }
    out = qemu_img("check --output=json " + img, &st);
    EXPECT_TRUE(st == 0 || st == 3) << out;
  }
}

TEST(qcow2_crash, sigkill_during_allocating_writes_never_corrupts) {
  NEED_QEMU();
  // 50 trials in the suite; bench/qcow2-crash runs many more through BLOCKD_Q2_CRASH_TRIALS.
  int trials = getenv("BLOCKD_Q2_CRASH_TRIALS") ? std::atoi(getenv("BLOCKD_Q2_CRASH_TRIALS")) : 50;
  crash_trials(trials - trials / 5, "cluster_size=65536");
  crash_trials(trials / 5, "cluster_size=4096,lazy_refcounts=on");
}

}  // namespace
}  // namespace blockd::block

// ---- concurrency -------------------------------------------------------------------------------

namespace blockd::block {
namespace {

// Up to 32 requests in flight on disjoint ranges (overlapping in-flight writes have no defined
// result), mixing allocating and in-place writes, zeroes, discards, reads and flushes. Reads are
// checked when they complete; the image must check clean and equal the model at the end.
struct qd_runner final : io_waiter {
  struct slot {
    io_request r;
    uint8_t* buf = nullptr;
    bool busy = false;
  };
  node& n;
  local_loop& loop;
  std::vector<uint8_t>& model;
  std::vector<slot> slots;
  int in_flight = 0;
  int failures = 0;
  std::string first_failure;
  qd_runner(node& n, local_loop& l, std::vector<uint8_t>& m, int qd) : n(n), loop(l), model(m), slots(size_t(qd)) {
    for (auto& s : slots) {
      void* p = nullptr;
      EXPECT_EQ(posix_memalign(&p, 4096, 256 << 10), 0);
      s.buf = static_cast<uint8_t*>(p);
    }
  }
  ~qd_runner() {
    for (auto& s : slots) free(s.buf);
  }
  bool overlaps(int64_t off, int64_t len) const {
    for (auto& s : slots)
      if (s.busy && s.r.op != io_op::flush && off < s.r.offset + s.r.length && s.r.offset < off + len) return true;
    return false;
  }
  void io_done(io_request& r) override {
    auto* s = static_cast<slot*>(r.user);
    --in_flight;
    s->busy = false;
    if (r.result != 0) {
      if (!failures++) first_failure = "op " + std::to_string(int(r.op)) + " at " + std::to_string(r.offset) + ": " +
                                       std::to_string(r.result);
      return;
    }
    if (r.op == io_op::read && std::memcmp(s->buf, model.data() + r.offset, size_t(r.length)) != 0) {
      if (!failures++) first_failure = "read mismatch at " + std::to_string(r.offset) + "+" + std::to_string(r.length);
    }
  }
  void run(uint64_t seed, int ops) {
    std::mt19937_64 rng(seed);
    int64_t size = n.length();
    int issued = 0;
    while (issued < ops || in_flight > 0) {
      for (auto& s : slots) {
        if (s.busy || issued >= ops) continue;
        int64_t len = 4096 * int64_t(1 + rng() % 16);
        if (rng() % 8 == 0) len = 4096 * int64_t(1 + rng() % 64);
        int64_t off = int64_t(rng() % uint64_t(size / 4096)) * 4096;
        if (off + len > size) len = size - off;
        if (overlaps(off, len)) continue;
        s.r.reset();
        int k = int(rng() % 20);
        s.r.offset = off;
        s.r.length = len;
        if (k < 11) {
          s.r.op = io_op::write;
          uint8_t v = uint8_t(rng());
          for (int64_t j = 0; j < len; ++j) s.buf[j] = uint8_t(v + j / 4096);
          std::memcpy(model.data() + off, s.buf, size_t(len));  // disjoint: the model may change now
          s.r.set_buffer(s.buf, len);
        } else if (k < 14) {
          s.r.op = io_op::write_zeroes;
          s.r.flags = (rng() & 1) ? uint32_t(io_may_unmap) : 0u;
          std::memset(model.data() + off, 0, size_t(len));
        } else if (k < 19) {
          s.r.op = io_op::read;
          s.r.set_buffer(s.buf, len);
        } else {
          s.r.op = io_op::flush;
          s.r.offset = 0;
          s.r.length = 0;
        }
        s.r.waiter = this;
        s.r.user = &s;
        s.busy = true;
        ++in_flight;
        ++issued;
        n.submit(s.r);
      }
      loop.turn();
    }
  }
};

TEST(qcow2_write, many_requests_in_flight_match_a_model) {
  NEED_QEMU();
  scratch s;
  for (const char* opts : {"cluster_size=65536", "cluster_size=4096,refcount_bits=1", "extended_l2=on",
                           "cluster_size=512", "compat=0.10"}) {
    SCOPED_TRACE(opts);
    std::string img = s.path("qd.qcow2");
    unlink(img.c_str());
    int st = 0;
    qemu_img("create -q -f qcow2 -o " + std::string(opts) + " " + img + " 32M", &st);
    ASSERT_EQ(st, 0);
    std::vector<uint8_t> model(32 << 20, 0);
    {
      stack k;
      node* n = k.open_qcow2(img, false, {{"discard", "unmap"}});
      ASSERT_NE(n, nullptr);
      qd_runner q(*n, k.loop, model, 32);
      q.run(99, 3000);
      EXPECT_EQ(q.failures, 0) << q.first_failure;
      k.close(n);
    }
    expect_clean(img);
    expect_same(qemu_content(img, s), model, opts);
  }
}

}  // namespace
}  // namespace blockd::block

// ---- internal snapshots ------------------------------------------------------------------------

namespace blockd::block {
namespace {

TEST(qcow2_snapshot, create_and_delete_interoperate_with_qemu_img) {
  NEED_QEMU();
  scratch s;
  std::string img = s.path("snap.qcow2");
  int st = 0;
  qemu_img("create -q -f qcow2 " + img + " 8M", &st);
  ASSERT_EQ(st, 0);
  // A snapshot qemu-img made: blockd's writes must copy-on-write around it.
  run("qemu-io -f qcow2 -c 'write -P 0x11 0 2M' -c 'write -c -P 0x12 4M 64k' " + img, &st);
  qemu_img("snapshot -c before " + img, &st);
  ASSERT_EQ(st, 0);
  {
    stack k;
    node* n = k.open_qcow2(img);
    ASSERT_NE(n, nullptr);
    EXPECT_EQ(n->driver().facts().snapshots.size(), 1u);
    write_pattern(*n, 4096, 8192, 0x21);
    write_pattern(*n, 4 << 20, 4096, 0x22);  // into the compressed cluster
    ASSERT_TRUE(n->driver().snapshot_create("mine", 1700000000, 5).has_value());
    write_pattern(*n, 1 << 20, 65536, 0x23);
    auto facts = n->driver().facts();
    ASSERT_EQ(facts.snapshots.size(), 2u);
    EXPECT_EQ(facts.snapshots[1].as_object().at("name").as_string(), "mine");
    EXPECT_EQ(facts.snapshots[1].as_object().at("id").as_string(), "2");
    k.close(n);
  }
  expect_clean(img);
  std::string list = qemu_img("snapshot -l " + img);
  EXPECT_NE(list.find("before"), std::string::npos) << list;
  EXPECT_NE(list.find("mine"), std::string::npos) << list;
  // Each snapshot holds what the disk held when it was taken.
  std::string a = s.path("a.raw"), b = s.path("b.raw");
  qemu_img("convert -O raw -l snapshot.name=before " + img + " " + a, &st);
  ASSERT_EQ(st, 0);
  qemu_img("convert -O raw -l snapshot.name=mine " + img + " " + b, &st);
  ASSERT_EQ(st, 0);
  auto va = slurp(a), vb = slurp(b), now = qemu_content(img, s);
  EXPECT_EQ(va[4096], 0x11);
  EXPECT_EQ(vb[4096], 0x21);
  EXPECT_EQ(vb[4 << 20], 0x22);
  EXPECT_EQ(va[4 << 20], 0x12);
  EXPECT_EQ(vb[1 << 20], 0x11);
  EXPECT_EQ(now[1 << 20], 0x23);
  {
    stack k;
    node* n = k.open_qcow2(img);
    ASSERT_NE(n, nullptr);
    std::string name = "before";
    auto info = n->driver().snapshot_delete(nullptr, &name);
    ASSERT_TRUE(info.has_value()) << info.error().desc;
    EXPECT_EQ(info->at("id").as_string(), "1");
    std::string id = "2";
    ASSERT_TRUE(n->driver().snapshot_delete(&id, nullptr).has_value());
    EXPECT_FALSE(n->driver().snapshot_delete(&id, nullptr).has_value());
    write_pattern(*n, 0, 4096, 0x31);
    k.close(n);
  }
  expect_clean(img);
  list = qemu_img("snapshot -l " + img);
  EXPECT_EQ(list.find("mine"), std::string::npos) << list;
  auto after = qemu_content(img, s);
  now[0] = 0x31;
  for (int i = 1; i < 4096; ++i) now[size_t(i)] = 0x31;
  expect_same(after, now, "after deleting both snapshots");
}

}  // namespace
}  // namespace blockd::block

// ---- corruption ----------------------------------------------------------------------------------

namespace blockd::block {
namespace {

uint64_t get_be64(int fd, off_t off) {
  uint8_t b[8];
  EXPECT_EQ(pread(fd, b, 8, off), 8);
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v = (v << 8) | b[i];
  return v;
}
void set_be64(int fd, off_t off, uint64_t v) {
  uint8_t b[8];
  for (int i = 7; i >= 0; --i, v >>= 8) b[i] = uint8_t(v);
  EXPECT_EQ(pwrite(fd, b, 8, off), 8);
}

TEST(qcow2_corrupt, a_write_onto_metadata_is_refused_and_the_image_marked) {
  NEED_QEMU();
  scratch s;
  std::string img = s.path("bad.qcow2");
  int st = 0;
  qemu_img("create -q -f qcow2 " + img + " 1M", &st);
  run("qemu-io -f qcow2 -c 'write -P 0x11 0 64k' " + img, &st);
  ASSERT_EQ(st, 0);
  // Point guest cluster 0 at the refcount table.
  int fd = ::open(img.c_str(), O_RDWR);
  ASSERT_GE(fd, 0);
  uint64_t l1 = get_be64(fd, 40), reftable = get_be64(fd, 48);
  uint64_t l2 = get_be64(fd, off_t(l1)) & 0x00fffffffffffe00ull;
  set_be64(fd, off_t(l2), (1ull << 63) | reftable);
  ::close(fd);

  std::vector<std::pair<std::string, json::object>> events;
  local_loop loop{io::reactor::create(64, nullptr)};
  graph g{[&] {
    auto e = loop.env();
    e.emit = [&](std::string name, json::object data) { events.emplace_back(std::move(name), std::move(data)); };
    return e;
  }};
  auto n = g.add({{"driver", "qcow2"}, {"node-name", "disk"}, {"file", json::object{{"driver", "file"}, {"filename", img}}}});
  ASSERT_TRUE(n.has_value()) << n.error().desc;
  sync_io io(**n);
  void* buf = nullptr;
  ASSERT_EQ(posix_memalign(&buf, 4096, 4096), 0);
  std::memset(buf, 0x66, 4096);
  EXPECT_EQ(io.write(buf, 4096, 0), -EIO);
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].first, "BLOCK_IMAGE_CORRUPTED");
  auto& ev = events[0].second;
  EXPECT_EQ(ev.at("node-name").as_string(), "disk");
  EXPECT_EQ(ev.at("device").as_string(), "");
  EXPECT_TRUE(ev.at("fatal").as_bool());
  EXPECT_NE(std::string(ev.at("msg").as_string()).find("refcount table"), std::string::npos) << ev;
  // From now on nothing is written, not even to healthy clusters.
  EXPECT_EQ(io.write(buf, 4096, 512 << 10), -EIO);
  free(buf);
  g.del("disk");
  std::string info = qemu_img("info --output=json " + img);
  EXPECT_NE(info.find("\"corrupt\": true"), std::string::npos) << info;
  // A corrupt image opens read-only only.
  auto again = g.add({{"driver", "qcow2"}, {"node-name", "d2"}, {"file", json::object{{"driver", "file"}, {"filename", img}}}});
  ASSERT_FALSE(again.has_value());
  EXPECT_NE(again.error().desc.find("corrupt"), std::string::npos) << again.error().desc;
  auto ro = g.add({{"driver", "qcow2"}, {"node-name", "d3"}, {"read-only", true},
                   {"file", json::object{{"driver", "file"}, {"filename", img}}}});
  EXPECT_TRUE(ro.has_value());
}

}  // namespace
}  // namespace blockd::block

// ---- header extensions ---------------------------------------------------------------------------

namespace blockd::block {
namespace {

TEST(qcow2_header, unknown_extensions_survive_header_rewrites) {
  NEED_QEMU();
  scratch s;
  std::string img = s.path("ext.qcow2");
  int st = 0;
  qemu_img("create -q -f qcow2 -o lazy_refcounts=on " + img + " 1M", &st);
  ASSERT_EQ(st, 0);
  auto bytes = slurp(img);
  auto h = qcow2::parse_header(std::span<const uint8_t>(bytes.data(), 65536), bytes.size());
  ASSERT_TRUE(h.has_value());
  h->extensions.push_back({0x12345678, {'k', 'e', 'e', 'p', ' ', 'm', 'e'}});
  auto out = qcow2::serialize_header(*h);
  ASSERT_TRUE(out.has_value());
  int fd = ::open(img.c_str(), O_RDWR);
  ASSERT_EQ(pwrite(fd, out->data(), out->size(), 0), ssize_t(out->size()));
  ::close(fd);
  {
    // A resize and the lazy-refcount dirty mark both rewrite the header.
    stack k;
    node* n = k.open_qcow2(img);
    ASSERT_NE(n, nullptr);
    ASSERT_TRUE(n->driver().truncate(4 << 20).has_value());
    write_pattern(*n, 0, 4096, 0x42);
    k.close(n);
  }
  expect_clean(img);
  bytes = slurp(img);
  auto again = qcow2::parse_header(std::span<const uint8_t>(bytes.data(), 65536), bytes.size());
  ASSERT_TRUE(again.has_value());
  EXPECT_EQ(again->size, 4u << 20);
  EXPECT_FALSE(again->incompatible_features & qcow2::incompat_dirty);
  bool found = false;
  for (auto& e : again->extensions)
    if (e.type == 0x12345678 && std::string(e.data.begin(), e.data.end()) == "keep me") found = true;
  EXPECT_TRUE(found);
}

}  // namespace
}  // namespace blockd::block

// ---- reopen ----------------------------------------------------------------------------------------

namespace blockd::block {
namespace {

TEST(qcow2_reopen, read_only_and_back_writes_everything_first) {
  NEED_QEMU();
  scratch s;
  std::string img = s.path("r.qcow2");
  int st = 0;
  qemu_img("create -q -f qcow2 -o lazy_refcounts=on " + img + " 4M", &st);
  ASSERT_EQ(st, 0);
  stack k;
  node* n = k.open_qcow2(img);
  ASSERT_NE(n, nullptr);
  write_pattern(*n, 0, 65536, 0x5a);
  json::object file{{"driver", "file"}, {"filename", img}};
  auto reopen = [&](bool ro) {
    json::array list{json::object{{"driver", "qcow2"}, {"node-name", n->name()}, {"read-only", ro},
                                  {"file", n->children()[0]->child->name()}}};
    auto r = k.g.reopen(list);
    ASSERT_TRUE(r.has_value()) << r.error().desc;
  };
  reopen(true);
  // Nothing is cached any more and the dirty mark is gone: another reader sees a clean image.
  expect_clean(img);
  std::string info = qemu_img("info -U --output=json " + img);
  EXPECT_NE(info.find("\"dirty-flag\": false"), std::string::npos) << info;
  EXPECT_EQ(sync_io(*n).write_zeroes(0, 4096), -EPERM);
  reopen(false);
  write_pattern(*n, 65536, 4096, 0x5b);
  k.close(n);
  expect_clean(img);
  auto v = qemu_content(img, s);
  EXPECT_EQ(v[0], 0x5a);
  EXPECT_EQ(v[65536], 0x5b);
}

}  // namespace
}  // namespace blockd::block

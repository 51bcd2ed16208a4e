// qcow2 allocated runs (multi-cluster writes into unallocated clusters): contiguous host clusters, exact file length, edges over a backing file, freed space reused with zeroed edges; checked with qemu-img; test thread.
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <boost/json.hpp>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

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
std::string sh(const std::string& cmd, int* status = nullptr) { return run(cmd, status); }

void write_pattern(node& n, int64_t off, int64_t len, uint8_t v) {
  void* buf = nullptr;
  ASSERT_EQ(posix_memalign(&buf, 4096, size_t(len)), 0);
  std::memset(buf, v, size_t(len));
  ASSERT_EQ(sync_io(n).write(buf, len, off), 0) << "write at " << off;
  free(buf);
}

// The disk as qemu-img reads it equals the model.
void expect_content(const std::string& img, const std::vector<uint8_t>& model, const scratch& s) {
  std::string raw = s.path("model.raw");
  {
    std::ofstream f(raw, std::ios::binary);
    f.write(reinterpret_cast<const char*>(model.data()), std::streamsize(model.size()));
  }
  int st = 0;
  std::string out = sh("qemu-img compare -f raw -F qcow2 " + raw + " " + img, &st);
  EXPECT_EQ(st, 0) << out;
}

int64_t file_size(const std::string& p) {
  struct stat st {};
  return stat(p.c_str(), &st) == 0 ? int64_t(st.st_size) : -1;
}

#define NEED_QEMU()                                                  \
  if (!have_tool("qemu-img") || !have_tool("qemu-io")) GTEST_SKIP() << "qemu-img/qemu-io not installed"

TEST(qcow2_alloc_run, fresh_writes_get_contiguous_clusters_and_an_exact_file) {
  NEED_QEMU();
  scratch s;
  std::string img = s.path("f.qcow2");
  int st = 0;
  sh("qemu-img create -q -f qcow2 " + img + " 8M", &st);
  ASSERT_EQ(st, 0);
  std::vector<uint8_t> model(8 << 20, 0);
  auto fill = [&](int64_t off, int64_t len, uint8_t v) { std::memset(model.data() + off, v, size_t(len)); };
  {
    stack k;
    // discard=unmap: discards reach the driver (and free clusters) rather than being ignored.
    node* n = k.open_qcow2(img, false, {{"discard", "unmap"}});
    ASSERT_NE(n, nullptr);
    write_pattern(*n, 0, 1 << 20, 0x11);                       // whole clusters
    write_pattern(*n, 1 << 20, 1 << 20, 0x12);                 // the next run, behind the first
    write_pattern(*n, (4 << 20) + 4096, (1 << 20) - 8192, 0x13);  // partial head and tail cluster
    write_pattern(*n, (6 << 20) - 65536, 3 * 65536, 0x14);     // a run crossing a 2 MiB boundary
    k.close(n);
  }
  fill(0, 1 << 20, 0x11);
  fill(1 << 20, 1 << 20, 0x12);
  fill((4 << 20) + 4096, (1 << 20) - 8192, 0x13);
  fill((6 << 20) - 65536, 3 * 65536, 0x14);
  int64_t end = expect_clean(img);
  // Nothing past what is in use: the data writes lengthened the file exactly.
  EXPECT_EQ(file_size(img), end);
  expect_content(img, model, s);
  // The first 2 MiB are one host extent (two runs, back to back).
  std::string map = sh("qemu-img map --output=json " + img, &st);
  ASSERT_EQ(st, 0) << map;
  auto v = json::parse(map);
  bool found = false;
  for (auto& e : v.as_array()) {
    auto& o = e.as_object();
    if (o.at("start").as_int64() == 0 && o.at("data").as_bool()) {
      EXPECT_GE(o.at("length").as_int64(), 2 << 20) << map;
      found = true;
    }
  }
  EXPECT_TRUE(found) << map;
}

TEST(qcow2_alloc_run, edges_over_a_backing_file_keep_its_bytes) {
  NEED_QEMU();
  scratch s;
  std::string base = s.path("b.raw"), top = s.path("t.qcow2");
  int st = 0;
  sh("qemu-img create -q -f raw " + base + " 4M", &st);
  sh("qemu-io -f raw -c 'write -P 0x5a 0 4M' " + base, &st);
  ASSERT_EQ(st, 0);
  sh("qemu-img create -q -f qcow2 -b b.raw -F raw " + top, &st);
  ASSERT_EQ(st, 0);
  std::vector<uint8_t> model(4 << 20, 0x5a);
  {
    stack k;
    node* n = k.open_qcow2(top, false, {{"discard", "unmap"}});
    ASSERT_NE(n, nullptr);
    write_pattern(*n, 65536 + 512, 1 << 20, 0x21);  // the edge clusters keep the backing file's bytes
    write_pattern(*n, 2 << 20, 2 << 20, 0x22);      // whole clusters: one run over the backing file
    k.close(n);
  }
  std::memset(model.data() + 65536 + 512, 0x21, 1 << 20);
  std::memset(model.data() + (2 << 20), 0x22, 2 << 20);
  expect_clean(top);
  expect_content(top, model, s);
}

TEST(qcow2_alloc_run, freed_space_is_reused_with_zeroed_edges) {
  NEED_QEMU();
  scratch s;
  std::string img = s.path("r.qcow2");
  int st = 0;
  sh("qemu-img create -q -f qcow2 " + img + " 8M", &st);
  ASSERT_EQ(st, 0);
  int64_t before = 0;
  {
    stack k;
    node* n = k.open_qcow2(img, false, {{"discard", "unmap"}});
    ASSERT_NE(n, nullptr);
    write_pattern(*n, 0, 4 << 20, 0x11);
    sync_io io(*n);
    ASSERT_EQ(io.flush(), 0);
    before = file_size(img);
    ASSERT_EQ(io.discard(1 << 20, 2 << 20), 0);
    ASSERT_EQ(io.flush(), 0);  // the refcounts drop once the tables no longer name the clusters
    // 17 clusters, partial at both ends, into the freed space: its old bytes must not show.
    write_pattern(*n, (1 << 20) + 512, 1 << 20, 0x22);
    k.close(n);
  }
  std::vector<uint8_t> model(8 << 20, 0);
  std::memset(model.data(), 0x11, 1 << 20);
  std::memset(model.data() + (1 << 20) + 512, 0x22, 1 << 20);
  std::memset(model.data() + (3 << 20), 0x11, 1 << 20);
  expect_clean(img);
  expect_content(img, model, s);
  EXPECT_EQ(file_size(img), before) << "the run went past the end instead of into the freed clusters";
}

}  // namespace
}  // namespace blockd::block

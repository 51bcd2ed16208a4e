// qcow2 image creation against QEMU's tools: an option matrix checked with qemu-img check/info/map and qemu-io, headers byte-compared with qemu-img create, option errors with QEMU's texts; test thread.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <boost/json.hpp>
#include <algorithm>
#include <cerrno>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "tests/unit/shell_tools.h"
#include "formats/qcow2/create.h"
#include "formats/qcow2/layout.h"
#include "storage/block/driver.h"
#include "storage/block/local_loop.h"
#include "storage/block/node.h"
#include "storage/io/reactor.h"

namespace blockd::qcow2 {
namespace {

namespace json = boost::json;

using test::have_qemu_tools;
using test::sh;

#define REQUIRE_QEMU() \
  if (!have_qemu_tools()) GTEST_SKIP() << "qemu-img/qemu-io not installed"

// An empty file under /dev/shm, removed at the end of the test.
struct temp_file {
  std::string path;
  explicit temp_file(const std::string& dir = "/dev/shm") {
    path = dir + "/blockd-qcow2-create-XXXXXX";
    int fd = mkstemp(path.data());
    EXPECT_GE(fd, 0) << std::strerror(errno);
    if (fd >= 0) close(fd);
  }
  ~temp_file() { unlink(path.c_str()); }
  temp_file(const temp_file&) = delete;
  temp_file& operator=(const temp_file&) = delete;
};

std::vector<uint8_t> slurp(const std::string& path) {
  std::vector<uint8_t> out;
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return out;
  uint8_t buf[65536];
  ssize_t n;
  while ((n = read(fd, buf, sizeof buf)) > 0) out.insert(out.end(), buf, buf + n);
  close(fd);
  return out;
}

int64_t file_length(const std::string& path) {
  struct stat st{};
  return stat(path.c_str(), &st) == 0 ? st.st_size : -1;
}

// A file driver that takes only 4 KiB-aligned reads and writes (the node refuses anything else with
// EINVAL), as a device with 4 KiB sectors opened for direct I/O would.
class strict_driver final : public block::block_driver {
 public:
  explicit strict_driver(std::unique_ptr<block::block_driver> inner) : inner_(std::move(inner)) {}
  uint32_t caps() const override { return inner_->caps(); }
  block::driver_limits limits() const override { return {4096u, 0}; }
  int64_t length() const override { return inner_->length(); }
  void submit(block::io_request& r) override { inner_->submit(r); }
  result<void> truncate(int64_t size) override { return inner_->truncate(size); }

 private:
  std::unique_ptr<block::block_driver> inner_;
};

// File nodes on one local loop, the way a create job's resolve hands them over: "img" and "data"
// name the image and data file nodes.
struct target {
  block::local_loop loop{io::reactor::create(64, nullptr)};
  std::vector<std::unique_ptr<block::node>> nodes;
  block::node* img = nullptr;
  block::node* data = nullptr;

  block::node* open_file(const std::string& path, bool direct = false, bool strict = false) {
    json::object opts{{"filename", path}};
// open_args grows as drivers need more; the test sets only what a file node needs.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"
    block::open_args a{.options = opts, .env = loop.env()};
#pragma GCC diagnostic pop
    a.direct = direct;
    auto drv = block::find_driver("file")->open(a);
    EXPECT_TRUE(drv.has_value()) << (drv ? "" : drv.error().desc);
    if (!drv) return nullptr;
    if (strict) *drv = std::make_unique<strict_driver>(std::move(*drv));
    block::node_settings s;
    s.name = "n" + std::to_string(nodes.size());
    s.driver = "file";
    s.direct = direct;
    s.options = opts;
    nodes.push_back(std::make_unique<block::node>(std::move(s), std::move(*drv), loop.env()));
    return nodes.back().get();
  }

  result<void> create(json::object opts, std::function<bool()> cancelled = nullptr) {
    opts["driver"] = "qcow2";
    if (!opts.contains("file")) opts["file"] = "img";
    block::create_args a{opts, [this](const json::value& ref) -> result<block::node*> {
                           if (ref.is_string() && ref.get_string() == "img" && img) return img;
                           if (ref.is_string() && ref.get_string() == "data" && data) return data;
                           return fail("Cannot find device='' nor node-name='" + json::serialize(ref) + "'");
                         }};
    if (cancelled) a.cancelled = cancelled;
    return create_qcow2(a);
  }
};

// Creates an image on `path` (and `data_path`) through blockd and returns the error text, "" if fine.
std::string create_on(const std::string& path, const std::string& data_path, const json::object& opts,
                      std::function<bool()> cancelled = nullptr) {
  target t;
  t.img = t.open_file(path);
  if (!data_path.empty()) t.data = t.open_file(data_path);
  auto r = t.create(opts, std::move(cancelled));
  return r ? "" : r.error().desc;
}

json::object parse_object(const std::string& text) {
  boost::system::error_code ec;
  auto v = json::parse(text, ec);
  if (ec || !v.is_object()) {
    ADD_FAILURE() << "not a JSON object: " << text;
    return {};
  }
  return v.as_object();
}

// qemu-img check must find nothing: no corruption, no leak, no check error.
void expect_clean(const std::string& path, const std::string& what) {
  int rc = 0;
  std::string out = sh("qemu-img check -f qcow2 --output=json '" + path + "'", &rc, true);
  EXPECT_EQ(rc, 0) << what << ": " << out;
  auto o = parse_object(out.substr(std::min(out.find('{'), out.size())));
  for (const char* k : {"corruptions", "leaks", "check-errors", "corruptions-fixed", "leaks-fixed"})
    if (auto* v = o.if_contains(k)) {
      EXPECT_EQ(v->to_number<int64_t>(), 0) << what << ": " << k << " in " << out;
    }
}

struct qemu_io_result {
  int rc = 0;
  std::string out;
};
qemu_io_result qemu_io(const std::string& path, const std::string& cmds) {
  qemu_io_result r;
  r.out = sh("qemu-io -f qcow2 " + cmds + " '" + path + "'", &r.rc, true);
  return r;
}
void expect_io_ok(const std::string& path, const std::string& cmds, const std::string& what) {
  auto r = qemu_io(path, cmds);
  EXPECT_EQ(r.rc, 0) << what << ": " << cmds << "\n" << r.out;
  EXPECT_EQ(r.out.find("failed"), std::string::npos) << what << ": " << cmds << "\n" << r.out;
}

// ---- the layout plan -------------------------------------------------------------------------

TEST(Qcow2CreateLayout, RefcountStructuresCoverThemselves) {
  for (uint32_t cb : {9u, 12u, 16u, 21u})
    for (uint32_t order = 0; order <= 6; ++order)
      for (uint64_t extra : {0ull, 1ull, 61ull, 4093ull, 70000ull, 3000000ull}) {
        auto l = plan_layout(cb, order, extra / 7 + 1, extra / 11, extra);
        uint64_t cs = l.cluster_size();
        uint64_t per_block = cs * 8 >> order;
        SCOPED_TRACE("cluster_bits " + std::to_string(cb) + " order " + std::to_string(order) + " extra " +
                     std::to_string(extra));
        EXPECT_GE(l.refblocks * per_block, l.clusters);
        EXPECT_GE(l.reftable_clusters * (cs / 8), l.refblocks);
        // Tight: one block fewer would not do (the plan starts from one block and only grows).
        if (l.refblocks > 1) {
          EXPECT_LT((l.refblocks - 1) * per_block, l.clusters);
        }
        EXPECT_EQ(l.clusters, 1 + l.reftable_clusters + l.refblocks + l.l1_clusters + l.l2_tables + l.data_clusters);
        EXPECT_EQ(l.reftable_offset, cs);
        EXPECT_EQ(l.refblock_offset, (1 + l.reftable_clusters) * cs);
        EXPECT_EQ(l.data_offset + l.data_clusters * cs, l.clusters * cs);
      }
}

// ---- byte-for-byte against qemu-img create ----------------------------------------------------

struct same_case {
  const char* qemu_opts;  // for qemu-img create -o
  const char* blockd;     // the same as BlockdevCreateOptionsQcow2 members (JSON)
  uint64_t size;
};

// Without preallocation (and with it when one L2 table maps everything) QEMU's image is header,
// refcount table, refcount block, L1 (, L2, data): the plan gives the same offsets, so the files
// must be identical up to QEMU's end; blockd only pads its end to a sector.
TEST(Qcow2Create, SameBytesAsQemuImg) {
  REQUIRE_QEMU();
  temp_file data_q, data_b;
  std::string dq = data_q.path, db = data_b.path;
  const same_case cases[] = {
      {"", "{}", 100 << 20},
      {"", "{}", 0},
      {"compat=0.10", R"({"version":"v2"})", 100 << 20},
      {"cluster_size=512", R"({"cluster-size":512})", 100 << 20},
      {"cluster_size=4096,refcount_bits=1", R"({"cluster-size":4096,"refcount-bits":1})", 64 << 20},
      {"cluster_size=2M,refcount_bits=64", R"({"cluster-size":2097152,"refcount-bits":64})", 1ull << 40},
      {"cluster_size=512,refcount_bits=64", R"({"cluster-size":512,"refcount-bits":64})", 8 << 20},
      {"lazy_refcounts=on,compression_type=zstd", R"({"lazy-refcounts":true,"compression-type":"zstd"})", 1 << 30},
      {"extended_l2=on,refcount_bits=2", R"({"extended-l2":true,"refcount-bits":2})", 3ull << 30},
      {"extended_l2=on,cluster_size=16k", R"({"extended-l2":true,"cluster-size":16384})", 1 << 20},
      {"backing_file=/x/base.img,backing_fmt=qcow2", R"({"backing-file":"/x/base.img","backing-fmt":"qcow2"})",
       1 << 20},
      {"backing_file=relative.raw,backing_fmt=raw,lazy_refcounts=on",
       R"({"backing-file":"relative.raw","backing-fmt":"raw","lazy-refcounts":true})", 1 << 20},
      {"compat=0.10,backing_file=b.img,backing_fmt=raw",
       R"({"version":"v2","backing-file":"b.img","backing-fmt":"raw"})", 1 << 20},
      {"cluster_size=512,backing_file=bb,backing_fmt=raw",
       R"({"cluster-size":512,"backing-file":"bb","backing-fmt":"raw"})", 1 << 20},
      {"preallocation=metadata", R"({"preallocation":"metadata"})", 1 << 20},
      {"preallocation=metadata,extended_l2=on,refcount_bits=8",
       R"({"preallocation":"metadata","extended-l2":true,"refcount-bits":8})", 2 << 20},
      {"data_file=@,extended_l2=on", R"({"data-file":"data","extended-l2":true})", 1 << 20},
      {"data_file=@,data_file_raw=on", R"({"data-file":"data","data-file-raw":true})", 1 << 20},
      {"data_file=@,preallocation=metadata,cluster_size=8k",
       R"({"data-file":"data","preallocation":"metadata","cluster-size":8192})", 1 << 20},
  };
  for (auto& c : cases) {
    std::string qopts = c.qemu_opts;
    bool with_data = qopts.find("data_file=@") != std::string::npos;
    // Both record the data file's name: give them names of the same length in the same place.
    if (with_data) qopts.replace(qopts.find('@'), 1, dq);
    SCOPED_TRACE(qopts);
    temp_file q, b;
    truncate(dq.c_str(), 0);
    truncate(db.c_str(), 0);
    int rc = 0;
    std::string out = sh("qemu-img create -q -u -f qcow2 " + (qopts.empty() ? "" : "-o '" + qopts + "' ") + "'" +
                             q.path + "' " + std::to_string(c.size),
                         &rc, true);
    ASSERT_EQ(rc, 0) << out;
    auto opts = parse_object(c.blockd);
    opts["size"] = c.size;
    ASSERT_EQ(create_on(b.path, with_data ? db : "", opts), "");
    auto qb = slurp(q.path), bb = slurp(b.path);
    ASSERT_GE(bb.size(), qb.size());
    EXPECT_LE(bb.size(), (qb.size() + 511) / 512 * 512);
    if (with_data) {
      // The data file name differs in its random suffix only.
      std::string qn = dq.substr(dq.rfind('/') + 1), bn = db.substr(db.rfind('/') + 1);
      auto at = std::search(bb.begin(), bb.begin() + std::min<size_t>(bb.size(), 65536), bn.begin(), bn.end());
      ASSERT_NE(at, bb.begin() + std::min<size_t>(bb.size(), 65536));
      std::copy(qn.begin(), qn.end(), at);
      EXPECT_EQ(file_length(db), int64_t(c.size)) << "the data file grows to the virtual size";
    }
    size_t first_diff = qb.size();
    for (size_t i = 0; i < qb.size(); ++i)
      if (qb[i] != bb[i]) {
        first_diff = i;
        break;
      }
    EXPECT_EQ(first_diff, qb.size()) << "first difference at byte " << first_diff;
    for (size_t i = qb.size(); i < bb.size(); ++i) ASSERT_EQ(bb[i], 0) << "padding at " << i;
  }
}

// ---- the option matrix -----------------------------------------------------------------------

struct matrix_case {
  const char* opts;  // BlockdevCreateOptionsQcow2 members besides file/size/data-file
  uint64_t size;
  bool data_file = false;
  bool backing = false;     // a raw backing file holding 0x11 in its first 64 KiB
  bool raw_data = false;    // the data file already holds 0x5a in its first 64 KiB (data-file-raw)
};

// Everything qemu-img says about the image matches what was asked for; qemu-img check is clean;
// qemu-io reads zeroes (or the backing/data file's contents), writes, and check stays clean.
TEST(Qcow2Create, MatrixAgainstQemuTools) {
  REQUIRE_QEMU();
  const matrix_case cases[] = {
      {"{}", 16 << 20},
      {R"({"version":"v2"})", 16 << 20},
      {R"({"version":"v3"})", 0},
      {R"({"cluster-size":512,"refcount-bits":1,"preallocation":"metadata"})", 4 << 20},
      {R"({"cluster-size":512,"refcount-bits":64,"preallocation":"metadata"})", 4 << 20},
      {R"({"cluster-size":512,"refcount-bits":2,"preallocation":"full"})", (3 << 20) + 512},
      {R"({"cluster-size":512,"refcount-bits":4,"preallocation":"falloc","version":"v3"})", 2 << 20},
      {R"({"cluster-size":4096,"refcount-bits":8,"preallocation":"falloc"})", 8 << 20},
      {R"({"cluster-size":4096,"refcount-bits":32,"preallocation":"full","lazy-refcounts":true})", 4 << 20},
      {R"({"cluster-size":65536,"refcount-bits":64,"preallocation":"full"})", (8 << 20) + 4096},
      {R"({"cluster-size":65536,"preallocation":"metadata","version":"v2"})", 40 << 20},
      {R"({"cluster-size":2097152,"refcount-bits":1,"preallocation":"full"})", (5 << 20) + 512},
      {R"({"cluster-size":2097152,"preallocation":"metadata","refcount-bits":16})", 1 << 30},
      {R"({"cluster-size":2097152})", 1ull << 40},
      {R"({"extended-l2":true})", 32 << 20},
      {R"({"extended-l2":true,"cluster-size":16384,"preallocation":"metadata"})", 8 << 20},
      {R"({"extended-l2":true,"cluster-size":2097152,"preallocation":"falloc"})", 4 << 20},
      {R"({"compression-type":"zstd","lazy-refcounts":true})", 16 << 20},
      {R"({"compression-type":"zlib","version":"v2"})", 1 << 20},
      {"{}", 8 << 20, true},
      {R"({"preallocation":"metadata","cluster-size":4096})", 8 << 20, true},
      {R"({"preallocation":"falloc","extended-l2":true})", 8 << 20, true},
      {R"({"preallocation":"full","refcount-bits":1})", 4 << 20, true},
      {R"({"data-file-raw":true})", 4 << 20, true, false, true},
      {R"({"data-file-raw":true,"extended-l2":true})", 4 << 20, true, false, true},
      {R"({"data-file-raw":true,"preallocation":"full","cluster-size":512})", 2 << 20, true, false, true},
      {R"({"backing-fmt":"raw"})", 4 << 20, false, true},
      {R"({"version":"v2"})", 4 << 20, false, true},
      {R"({"cluster-size":512})", 4 << 20, false, true},
      {R"({"backing-fmt":"raw","extended-l2":true,"preallocation":"metadata"})", 4 << 20, false, true},
      {R"({"backing-fmt":"raw","extended-l2":true,"preallocation":"full"})", 4 << 20, false, true},
      {R"({"extended-l2":true,"preallocation":"falloc","cluster-size":32768})", 4 << 20, true, true},
  };
  for (auto& c : cases) {
    SCOPED_TRACE(std::string(c.opts) + " size " + std::to_string(c.size) + (c.data_file ? " +data-file" : "") +
                 (c.backing ? " +backing" : ""));
    temp_file img, data, base;
    auto opts = parse_object(c.opts);
    opts["size"] = c.size;
    if (c.data_file) opts["data-file"] = "data";
    if (c.backing) {
      opts["backing-file"] = base.path;
      ASSERT_EQ(truncate(base.path.c_str(), int64_t(c.size)), 0);
      sh("qemu-io -f raw -c 'write -P 0x11 0 64k' '" + base.path + "'");
    }
    if (c.raw_data) {
      ASSERT_EQ(truncate(data.path.c_str(), int64_t(c.size)), 0);
      sh("qemu-io -f raw -c 'write -P 0x5a 0 64k' '" + data.path + "'");
    }
    ASSERT_EQ(create_on(img.path, c.data_file ? data.path : "", opts), "");
    expect_clean(img.path, "after create");

    // qemu-img info reports what was asked for.
    int rc = 0;
    std::string out = sh("qemu-img info -f qcow2 --output=json '" + img.path + "'", &rc, true);
    ASSERT_EQ(rc, 0) << out;
    auto info = parse_object(out);
    bool v2 = opts.contains("version") && opts.at("version").as_string() == "v2";
    auto want_int = [&](const char* k, int64_t d) { return opts.contains(k) ? opts.at(k).to_number<int64_t>() : d; };
    auto want_bool = [&](const char* k) { return opts.contains(k) && opts.at(k).as_bool(); };
    EXPECT_EQ(info["virtual-size"].to_number<uint64_t>(), c.size);
    EXPECT_EQ(info["cluster-size"].to_number<int64_t>(), want_int("cluster-size", 65536));
    auto& fs = info["format-specific"].as_object()["data"].as_object();
    EXPECT_EQ(fs["compat"].as_string(), v2 ? "0.10" : "1.1");
    EXPECT_EQ(fs["refcount-bits"].to_number<int64_t>(), want_int("refcount-bits", 16));
    EXPECT_EQ(fs.contains("lazy-refcounts") && fs["lazy-refcounts"].as_bool(), want_bool("lazy-refcounts"));
    EXPECT_EQ(fs.contains("extended-l2") && fs["extended-l2"].as_bool(), want_bool("extended-l2"));
    EXPECT_EQ(fs["compression-type"].as_string(),
              opts.contains("compression-type") ? opts.at("compression-type").as_string() : "zlib");
    if (c.data_file) {
      EXPECT_EQ(fs["data-file"].as_string(), data.path);
      EXPECT_EQ(fs["data-file-raw"].as_bool(), want_bool("data-file-raw"));
      EXPECT_GE(file_length(data.path), int64_t(c.size));
    } else {
      EXPECT_FALSE(fs.contains("data-file"));
    }
    if (c.backing) {
      EXPECT_EQ(info["backing-filename"].as_string(), base.path);
      if (opts.contains("backing-fmt")) {
        EXPECT_EQ(info["backing-filename-format"].as_string(), "raw");
      } else {
        EXPECT_FALSE(info.contains("backing-filename-format"));
      }
    } else {
      EXPECT_FALSE(info.contains("backing-filename"));
    }

    // Preallocation: every guest cluster is mapped (except with extended L2 entries, where the
    // subclusters stay unallocated as in QEMU, unless a raw data file backs them).
    std::string prealloc = opts.contains("preallocation") ? std::string(opts.at("preallocation").as_string()) : "off";
    if (want_bool("data-file-raw") && prealloc == "off") prealloc = "metadata";
    if (prealloc != "off" && c.size && (!want_bool("extended-l2") || want_bool("data-file-raw"))) {
      out = sh("qemu-img map -f qcow2 --output=json '" + img.path + "'", &rc, true);
      ASSERT_EQ(rc, 0) << out;
      boost::system::error_code ec;
      auto map = json::parse(out, ec);
      ASSERT_FALSE(ec) << out;
      uint64_t covered = 0;
      for (auto& e : map.as_array()) {
        EXPECT_TRUE(e.as_object().at("data").as_bool()) << out;
        EXPECT_TRUE(e.as_object().contains("offset")) << out;
        covered += e.as_object().at("length").to_number<uint64_t>();
      }
      EXPECT_EQ(covered, c.size);
    }
    if ((prealloc == "full" || prealloc == "falloc") && !c.data_file) {
      struct stat st{};
      ASSERT_EQ(stat(img.path.c_str(), &st), 0);
      EXPECT_GE(uint64_t(st.st_blocks) * 512, c.size) << "data clusters are allocated in the file";
    }
    if ((prealloc == "full" || prealloc == "falloc") && c.data_file && !c.raw_data) {
      struct stat st{};
      ASSERT_EQ(stat(data.path.c_str(), &st), 0);
      EXPECT_GE(uint64_t(st.st_blocks) * 512, c.size) << "the data file is allocated";
    }
    if (c.size == 0 || c.size > (64 << 20)) continue;

    // Reads: the backing file or the raw data file shows through, zeroes elsewhere.
    std::string sz = std::to_string(c.size), rest = std::to_string(c.size - 65536);
    if (c.backing) {
      expect_io_ok(img.path, "-c 'read -P 0x11 0 64k' -c 'read -P 0 64k " + rest + "'", "backing read");
    } else if (c.raw_data) {
      expect_io_ok(img.path, "-c 'read -P 0x5a 0 64k' -c 'read -P 0 64k " + rest + "'", "raw read");
    } else {
      expect_io_ok(img.path, "-c 'read -P 0 0 " + sz + "'", "zero read");
    }

    // Writes, at both ends, then check again.
    std::string tail = std::to_string(c.size - 4096);
    expect_io_ok(img.path, "-c 'write -P 0xab 4k 8k' -c 'write -P 0xcd " + tail + " 4k'", "write");
    expect_io_ok(img.path, "-c 'read -P 0xab 4k 8k' -c 'read -P 0xcd " + tail + " 4k'", "read back");
    expect_clean(img.path, "after writes");
    if (c.raw_data) {
      // A raw data file holds the guest data at the guest offsets.
      auto d = slurp(data.path);
      ASSERT_GE(d.size(), c.size);
      EXPECT_EQ(d[4096], 0xab);
      EXPECT_EQ(d[c.size - 1], 0xcd);
    }
  }
}

// ---- errors ----------------------------------------------------------------------------------

struct error_case {
  const char* opts;
  const char* error;  // QEMU 7.2's text for the same request (blockdev-create job error)
};

TEST(Qcow2Create, OptionErrorsAreQemus) {
  const std::string long_name(1024, 'x');
  const error_case cases[] = {
      {R"({"size":1000})", "Image size must be a multiple of 512 bytes"},
      {R"({"size":1000,"cluster-size":1000})", "Image size must be a multiple of 512 bytes"},
      {R"({"size":1048576,"cluster-size":1000})", "Cluster size must be a power of two between 512 and 2048k"},
      {R"({"size":1048576,"cluster-size":256})", "Cluster size must be a power of two between 512 and 2048k"},
      {R"({"size":1048576,"cluster-size":4194304})", "Cluster size must be a power of two between 512 and 2048k"},
      {R"({"size":1048576,"cluster-size":0})", "Cluster size must be a power of two between 512 and 2048k"},
      {R"({"size":1048576,"cluster-size":8192,"extended-l2":true})",
       "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"},
      {R"({"size":1048576,"version":"v2","extended-l2":true})",
       "Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)"},
      {R"({"size":1048576,"version":"v2","lazy-refcounts":true})",
       "Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)"},
      {R"({"size":1048576,"refcount-bits":3})", "Refcount width must be a power of two and may not exceed 64 bits"},
      {R"({"size":1048576,"refcount-bits":128})", "Refcount width must be a power of two and may not exceed 64 bits"},
      {R"({"size":1048576,"refcount-bits":0})", "Refcount width must be a power of two and may not exceed 64 bits"},
      {R"({"size":1048576,"refcount-bits":-16})", "Refcount width must be a power of two and may not exceed 64 bits"},
      {R"({"size":1048576,"version":"v2","refcount-bits":8})",
       "Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or "
       "greater)"},
      {R"({"size":1048576,"backing-fmt":"raw"})", "Backing format cannot be used without backing file"},
      {R"({"size":1048576,"backing-file":"b","preallocation":"metadata"})",
       "Backing file and preallocation can only be used at the same time if extended_l2 is on"},
      {R"({"size":1048576,"backing-file":"b","preallocation":"full"})",
       "Backing file and preallocation can only be used at the same time if extended_l2 is on"},
      {R"({"size":1048576,"data-file-raw":true})", "data-file-raw requires data-file"},
      {R"({"size":1048576,"data-file-raw":true,"data-file":"data","backing-file":"b"})",
       "Backing file and data-file-raw cannot be used at the same time"},
      {R"({"size":1048576,"version":"v2","data-file":"data"})",
       "External data files are only supported with compatibility level 1.1 and above (use version=v3 or greater)"},
      {R"({"size":1048576,"version":"v2","compression-type":"zstd"})",
       "Non-zlib compression type is only supported with compatibility level 1.1 and above (use version=v3 or "
       "greater)"},
      {R"({"size":1048576,"data-file":"nope"})", "Cannot find device='' nor node-name='\"nope\"'"},
      {R"({"size":1048576,"encrypt":{"format":"luks","key-secret":"s0"}})", "No secret with id 's0'"},
      {R"({"size":1048576,"encrypt":{"format":"luks"}})", "Parameter 'encrypt.key-secret' is required for cipher"},
      {R"({"size":9223372036854776320})", "Could not resize image: Image size cannot be negative"},
      {R"({"size":9223372036854775296})",
       "Could not resize image: offset(9223372036854775296) exceeds maximum(9223372035781033984)"},
      {R"({"size":137438954496,"cluster-size":512})",
       "Could not resize image: Failed to grow the L1 table: File too large"},
  };
  for (auto& c : cases) {
    SCOPED_TRACE(c.opts);
    temp_file img, data;
    EXPECT_EQ(create_on(img.path, data.path, parse_object(c.opts)), c.error);
    EXPECT_EQ(file_length(img.path), 0) << "nothing written";
  }
  // Backing file names: too long for the header field, or for a small cluster.
  temp_file img;
  auto o = parse_object(R"({"size":1048576})");
  o["backing-file"] = long_name;
  EXPECT_EQ(create_on(img.path, "", o),
            "Could not assign backing file '" + long_name + "' with format '(null)': Invalid argument");
  o["backing-file"] = long_name.substr(1);
  o["cluster-size"] = 512;
  o["backing-fmt"] = "qcow2";
  EXPECT_EQ(create_on(img.path, "", o),
            "Could not assign backing file '" + long_name.substr(1) + "' with format 'qcow2': No space left on device");
  o.erase("cluster-size");
  EXPECT_EQ(create_on(img.path, "", o), "") << "1023 bytes fit a 64 KiB cluster";
}

// A data file name that does not fit next to the header of a 512-byte cluster.
TEST(Qcow2Create, DataFileNameTooLongForCluster) {
  std::string dir = "/dev/shm/blockd-qcow2-" + std::string(200, 'd');
  mkdir(dir.c_str(), 0700);
  std::string data = dir + "/" + std::string(200, 'e');
  close(open(data.c_str(), O_CREAT | O_RDWR | O_CLOEXEC, 0600));
  temp_file img;
  EXPECT_EQ(create_on(img.path, data, parse_object(R"({"size":1048576,"cluster-size":512,"data-file":"data"})")),
            "Could not update qcow2 header: No space left on device");
  EXPECT_EQ(create_on(img.path, data, parse_object(R"({"size":1048576,"cluster-size":1024,"data-file":"data"})")),
            "");
  unlink(data.c_str());
  rmdir(dir.c_str());
}

// Creation over a file that held something else starts from scratch; a cancelled preallocation
// stops and leaves no qcow2 header behind.
TEST(Qcow2Create, ReusedFileAndCancel) {
  REQUIRE_QEMU();
  temp_file img;
  {
    int fd = open(img.path.c_str(), O_RDWR | O_CLOEXEC);
    std::vector<uint8_t> junk(1 << 20, 0xee);
    ASSERT_EQ(pwrite(fd, junk.data(), junk.size(), 0), ssize_t(junk.size()));
    close(fd);
  }
  ASSERT_EQ(create_on(img.path, "", parse_object(R"({"size":4194304,"preallocation":"metadata"})")), "");
  expect_clean(img.path, "over junk");
  expect_io_ok(img.path, "-c 'read -P 0 0 4M'", "over junk");

  int calls = 0;
  std::string e = create_on(img.path, "", parse_object(R"({"size":67108864,"preallocation":"full"})"),
                            [&] { return ++calls > 3; });
  EXPECT_EQ(e, "qcow2 image creation cancelled");
  auto head = slurp(img.path);
  ASSERT_GE(head.size(), 4u);
  EXPECT_NE(be32(head.data()), magic);
}

// A node opened with cache.direct takes only aligned requests in aligned memory: creation must keep
// to them even where clusters (512 bytes) are smaller than the alignment.
TEST(Qcow2Create, DirectIo) {
  REQUIRE_QEMU();
  std::string dir;
  for (const char* d : {static_cast<const char*>(getenv("TMPDIR")), "/var/tmp", "/tmp"}) {
    if (!d || !*d) continue;
    std::string p = std::string(d) + "/blockd-dio-XXXXXX";
    int fd = mkstemp(p.data());
    if (fd < 0) continue;
    close(fd);
    int dfd = open(p.c_str(), O_RDWR | O_DIRECT | O_CLOEXEC);
    unlink(p.c_str());
    if (dfd >= 0) {
      close(dfd);
      dir = d;
      break;
    }
  }
  if (dir.empty()) GTEST_SKIP() << "no directory here takes O_DIRECT";
  for (const char* opts : {R"({"size":1049088,"cluster-size":512,"preallocation":"full"})",
                           R"({"size":2097152,"cluster-size":512,"preallocation":"falloc","data-file":"data"})",
                           R"({"size":1048576,"cluster-size":512,"refcount-bits":64})"}) {
    SCOPED_TRACE(opts);
    temp_file img(dir), data(dir);
    {
      target t;
      t.img = t.open_file(img.path, true);
      t.data = t.open_file(data.path, true);
      ASSERT_NE(t.img, nullptr);
      auto r = t.create(parse_object(opts));
      ASSERT_TRUE(r.has_value()) << r.error().desc;
    }
    expect_clean(img.path, "direct");
    expect_io_ok(img.path, "-c 'read -P 0 0 1M'", "direct");
  }
}

TEST(Qcow2Create, StrictAlignment) {
  REQUIRE_QEMU();
  for (const char* opts : {R"({"size":1049088,"cluster-size":512,"preallocation":"full"})",
                           R"({"size":1049088,"cluster-size":512,"preallocation":"falloc","refcount-bits":1})",
                           R"({"size":1048576,"cluster-size":1024,"preallocation":"metadata"})",
                           R"({"size":1049088,"cluster-size":512,"preallocation":"full","data-file":"data"})",
                           R"({"size":1048576,"cluster-size":2048,"refcount-bits":64})",
                           R"({"size":0,"cluster-size":512})"}) {
    SCOPED_TRACE(opts);
    temp_file img, data;
    // The data file starts unaligned, so its preallocation has an unaligned head.
    ASSERT_EQ(truncate(data.path.c_str(), 1000), 0);
    {
      target t;
      t.img = t.open_file(img.path, false, true);
      t.data = t.open_file(data.path, false, true);
      ASSERT_NE(t.img, nullptr);
      auto r = t.create(parse_object(opts));
      ASSERT_TRUE(r.has_value()) << r.error().desc;
    }
    expect_clean(img.path, "strict");
    auto o = parse_object(opts);
    uint64_t size = o["size"].to_number<uint64_t>();
    if (size) expect_io_ok(img.path, "-c 'read -P 0 0 " + std::to_string(size) + "'", "strict");
  }
}

}  // namespace
}  // namespace blockd::qcow2

// qcow2 layout against qemu-img: headers of images it creates over an option matrix, the L1/L2 walk against `qemu-img map`, and hostile headers against its errors; test thread.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include <boost/json.hpp>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "tests/unit/shell_tools.h"
#include "formats/qcow2/compress.h"
#include "formats/qcow2/layout.h"

namespace blockd::qcow2 {
namespace {

using test::have_qemu_tools;
using test::sh;

std::vector<uint8_t> read_at(const std::string& path, uint64_t off, size_t len) {
  std::vector<uint8_t> b(len, 0);
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  EXPECT_GE(fd, 0) << path;
  ssize_t n = pread(fd, b.data(), len, off_t(off));
  close(fd);
  if (n >= 0) b.resize(size_t(n));
  return b;
}

uint64_t file_size(const std::string& path) {
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  off_t n = lseek(fd, 0, SEEK_END);
  close(fd);
  return uint64_t(n);
}

result<header> parse_file(const std::string& path) {
  auto first = read_at(path, 0, 2 << 20);
  return parse_header(first, file_size(path));
}

class qcow2_images : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!have_qemu_tools()) GTEST_SKIP() << "qemu-img/qemu-io not installed (scripts/test installs them)";
    char t[] = "/dev/shm/blockd-qcow2-XXXXXX";
    dir = mkdtemp(t);
  }
  void TearDown() override {
    if (!dir.empty()) sh("rm -rf " + dir);
  }
  std::string dir;
};

// What the image says about every subcluster of the guest disk, by walking L1 and L2 ourselves.
enum class cls { data, zero, unalloc };
struct walked {
  cls c;
  uint64_t host = 0;  // data: host offset of the subcluster's first byte (0 for compressed)
};

std::vector<walked> walk(const header& h, const std::string& path, std::string* problem) {
  uint64_t sub = h.cluster_size() / h.subclusters();
  uint64_t n = (h.size + sub - 1) / sub;
  std::vector<walked> out(n, walked{cls::unalloc});
  auto l1 = read_at(path, h.l1_table_offset, size_t(h.l1_size) * 8);
  l1.resize(size_t(h.l1_size) * 8, 0);
  for (uint64_t s = 0; s < n; ++s) {
    uint64_t guest = s * sub;
    uint64_t cluster = guest >> h.cluster_bits;
    uint64_t l1i = cluster / h.l2_entries();
    auto d1 = decode_l1(h, be64(&l1[l1i * 8]));
    if (!d1.valid) {
      *problem = d1.why;
      return out;
    }
    if (!d1.l2_offset) continue;
    uint64_t l2i = cluster % h.l2_entries();
    auto e = read_at(path, d1.l2_offset + l2i * h.l2_entry_size(), h.l2_entry_size());
    uint64_t bitmap = h.extended_l2() ? be64(&e[8]) : 0;
    auto d2 = decode_l2(h, be64(e.data()), bitmap, uint32_t((guest % h.cluster_size()) / sub));
    if (!d2.valid) {
      *problem = d2.why;
      return out;
    }
    switch (d2.m.kind) {
      case cluster_kind::unallocated: break;
      case cluster_kind::zero_plain:
      case cluster_kind::zero_allocated: out[s] = {cls::zero}; break;
      case cluster_kind::normal: out[s] = {cls::data, d2.m.host_offset + guest % h.cluster_size()}; break;
      case cluster_kind::compressed: out[s] = {cls::data, 0}; break;
    }
  }
  return out;
}

// Compares the walk with `qemu-img map --output=json` of the same image (top layer only).
void expect_map_agrees(const header& h, const std::string& path, const std::string& label) {
  std::string problem;
  auto w = walk(h, path, &problem);
  ASSERT_TRUE(problem.empty()) << label << ": " << problem;
  auto map = boost::json::parse(sh("qemu-img map --output=json -f qcow2 " + path)).as_array();
  uint64_t sub = h.cluster_size() / h.subclusters();
  std::vector<bool> covered(w.size(), false);
  for (auto& v : map) {
    auto& e = v.as_object();
    uint64_t start = e.at("start").to_number<uint64_t>(), len = e.at("length").to_number<uint64_t>();
    bool present = e.at("present").as_bool() && e.at("depth").to_number<int>() == 0;
    bool data = e.at("data").as_bool();
    cls want = !present ? cls::unalloc : data ? cls::data : cls::zero;
    // Entries may start inside a (sub)cluster: check every subcluster they touch.
    for (uint64_t g = start; g < start + len; g = (g / sub + 1) * sub) {
      auto& got = w.at(g / sub);
      // An allocated cluster whose host range is a hole reads as zeroes: qemu-img says zero there.
      bool hole_in_data = want == cls::zero && got.c == cls::data;
      ASSERT_TRUE(int(want) == int(got.c) || hole_in_data) << label << " at guest offset " << g << ": map says "
                                                            << int(want) << ", the walk " << int(got.c);
      if (want == cls::data && e.contains("offset") && got.host) {
        ASSERT_EQ(e.at("offset").to_number<uint64_t>() + (g - start), got.host + g % sub) << label << " at " << g;
      }
      covered[g / sub] = true;
    }
  }
  for (size_t i = 0; i < covered.size(); ++i) ASSERT_TRUE(covered[i]) << label << ": subcluster " << i << " not in the map";
}

struct variant {
  std::string label;
  std::string create_opts;  // -o ...
  uint64_t size;
};

TEST_F(qcow2_images, headers_and_maps_of_images_qemu_img_creates) {
  std::vector<variant> vs = {
      {"v3 64k", "cluster_size=65536", 64 << 20},
      {"v2 64k", "compat=0.10,cluster_size=65536", 64 << 20},
      {"v3 512", "cluster_size=512", 4 << 20},
      {"v3 2M", "cluster_size=2097152", 64 << 20},
      {"refcount 1", "refcount_bits=1", 16 << 20},
      {"refcount 64", "refcount_bits=64", 16 << 20},
      {"lazy", "lazy_refcounts=on", 16 << 20},
      {"extended l2", "extended_l2=on,cluster_size=65536", 16 << 20},
      {"zstd", "compression_type=zstd", 16 << 20},
      {"preallocated metadata", "preallocation=metadata,cluster_size=4096", 4 << 20},
  };
  for (auto& v : vs) {
    std::string img = dir + "/img.qcow2";
    unlink(img.c_str());
    int rc = 0;
    sh("qemu-img create -q -f qcow2 -o " + v.create_opts + " " + img + " " + std::to_string(v.size), &rc);
    ASSERT_EQ(rc, 0) << v.label;
    // Data, zeroes, a compressed cluster, a discard, and writes smaller than a (sub)cluster.
    uint64_t cs = 1;
    for (auto& kv : {std::string("cluster_size=")})
      if (auto at = v.create_opts.find(kv); at != std::string::npos) cs = std::stoull(v.create_opts.substr(at + kv.size()));
    if (cs == 1) cs = 65536;
    std::string comp = std::to_string(v.size / 2 / cs * cs) + " " + std::to_string(cs);
    // (A compressed write only goes to an unallocated cluster: not with preallocated metadata.)
    std::string first = v.create_opts.find("preallocation") == std::string::npos ? "-c 'write -c -P 0x22 " + comp + "' " : "";
    sh("qemu-io -f qcow2 " + first + "-c 'write -P 0x11 0 192k' -c 'write -z 64k 64k' "
       "-c 'discard 128k 64k' -c 'write -P 0x33 2M 2k' -c 'write -P 0x44 3M 6k' " + img, &rc);
    ASSERT_EQ(rc, 0) << v.label;
    auto h = parse_file(img);
    ASSERT_TRUE(h) << v.label << ": " << h.error().desc;
    auto info = boost::json::parse(sh("qemu-img info --output=json -f qcow2 " + img)).as_object();
    EXPECT_EQ(h->size, info.at("virtual-size").to_number<uint64_t>()) << v.label;
    EXPECT_EQ(h->cluster_size(), info.at("cluster-size").to_number<uint64_t>()) << v.label;
    auto& data = info.at("format-specific").at("data").as_object();
    EXPECT_EQ(h->version == 2 ? "0.10" : "1.1", data.at("compat").as_string()) << v.label;
    if (h->version == 3) {
      EXPECT_EQ(h->refcount_bits(), data.at("refcount-bits").to_number<uint32_t>()) << v.label;
      EXPECT_EQ(bool(h->compatible_features & compat_lazy_refcounts), data.at("lazy-refcounts").as_bool()) << v.label;
      EXPECT_EQ(h->extended_l2(), data.at("extended-l2").as_bool()) << v.label;
      EXPECT_EQ(h->compression_type == compression::zstd ? "zstd" : "zlib", data.at("compression-type").as_string())
          << v.label;
    }
    expect_map_agrees(*h, img, v.label);
    // The header blockd would write back parses to the same fields, extensions included.
    header copy = *h;
    auto bytes = serialize_header(copy);
    ASSERT_TRUE(bytes) << v.label;
    auto again = parse_header(*bytes, file_size(img));
    ASSERT_TRUE(again) << v.label << ": " << again.error().desc;
    EXPECT_EQ(again->l1_table_offset, h->l1_table_offset);
    EXPECT_EQ(again->refcount_table_offset, h->refcount_table_offset);
    EXPECT_EQ(again->incompatible_features, h->incompatible_features);
    EXPECT_EQ(again->extensions.size(), h->extensions.size()) << v.label;
    EXPECT_EQ(again->features.size(), h->features.size()) << v.label;
  }
}

TEST_F(qcow2_images, backing_file_and_external_data_file_names) {
  std::string base = dir + "/base.qcow2", top = dir + "/top.qcow2", ext = dir + "/ext.qcow2", raw = dir + "/ext.raw";
  int rc = 0;
  sh("qemu-img create -q -f qcow2 " + base + " 8M", &rc);
  sh("qemu-io -f qcow2 -c 'write -P 0x55 0 1M' " + base, &rc);
  sh("qemu-img create -q -f qcow2 -b " + base + " -F qcow2 " + top, &rc);
  ASSERT_EQ(rc, 0);
  sh("qemu-io -f qcow2 -c 'write -P 0x66 512k 128k' " + top, &rc);
  auto h = parse_file(top);
  ASSERT_TRUE(h) << h.error().desc;
  EXPECT_EQ(base, h->backing_file);
  EXPECT_EQ("qcow2", h->backing_format);
  expect_map_agrees(*h, top, "top");

  sh("qemu-img create -q -f qcow2 -o data_file=" + raw + " " + ext + " 8M", &rc);
  ASSERT_EQ(rc, 0);
  sh("qemu-io -f qcow2 -c 'write -P 0x77 64k 64k' " + ext, &rc);
  auto e = parse_file(ext);
  ASSERT_TRUE(e) << e.error().desc;
  EXPECT_TRUE(e->has_data_file());
  EXPECT_EQ(raw, e->data_file);
  EXPECT_FALSE(e->autoclear_features & autoclear_data_file_raw);
  expect_map_agrees(*e, ext, "data file");
  // data-file-raw: qemu-img maps the whole disk to the data file as it is (identity), which the
  // driver has to reproduce; here only the flag is checked.
  unlink(ext.c_str());
  unlink(raw.c_str());
  sh("qemu-img create -q -f qcow2 -o data_file=" + raw + ",data_file_raw=on " + ext + " 8M", &rc);
  ASSERT_EQ(rc, 0);
  auto er = parse_file(ext);
  ASSERT_TRUE(er) << er.error().desc;
  EXPECT_TRUE(er->autoclear_features & autoclear_data_file_raw);
}

// Compressed clusters qemu-io wrote (zlib and zstd) decompress, through the decoded descriptor, to
// exactly what was written.
TEST_F(qcow2_images, compressed_clusters_from_qemu_decompress_bit_exactly) {
  for (std::string type : {"zlib", "zstd"}) {
    for (uint64_t cs : {4096ull, 65536ull, 2097152ull}) {
      std::string img = dir + "/c.qcow2";
      unlink(img.c_str());
      int rc = 0;
      sh("qemu-img create -q -f qcow2 -o compression_type=" + type + ",cluster_size=" + std::to_string(cs) + " " + img +
             " 16M",
         &rc);
      ASSERT_EQ(rc, 0);
      // One compressed cluster at guest cluster 1 (its L2 entry is the second one).
      sh("qemu-io -f qcow2 -c 'write -c -P 0x5a " + std::to_string(cs) + " " + std::to_string(cs) + "' " + img, &rc);
      ASSERT_EQ(rc, 0);
      auto h = parse_file(img);
      ASSERT_TRUE(h) << h.error().desc;
      auto l1 = read_at(img, h->l1_table_offset, 8);
      auto d1 = decode_l1(*h, be64(l1.data()));
      ASSERT_TRUE(d1.valid && d1.l2_offset);
      auto e = read_at(img, d1.l2_offset + 1 * h->l2_entry_size(), 8);
      auto d2 = decode_l2(*h, be64(e.data()));
      ASSERT_TRUE(d2.valid) << d2.why;
      ASSERT_EQ(int(cluster_kind::compressed), int(d2.m.kind)) << type << " " << cs;
      auto in = read_at(img, d2.m.host_offset, d2.m.compressed_size);
      std::vector<uint8_t> out(cs);
      auto r = decompress_cluster(h->compression_type, in.data(), in.size(), out.data(), out.size());
      ASSERT_TRUE(r) << type << " " << cs << ": " << r.error().desc;
      EXPECT_EQ(std::vector<uint8_t>(cs, 0x5a), out) << type << " " << cs;
      // A damaged stream is an error, never garbage.
      if (in.size() > 8) {
        std::fill(in.begin(), in.begin() + 8, 0xff);
        EXPECT_FALSE(decompress_cluster(h->compression_type, in.data(), in.size(), out.data(), out.size())) << type;
      }
    }
  }
}

TEST(qcow2_compression, round_trip_and_incompressible_data) {
  std::vector<uint8_t> text(65536);
  for (size_t i = 0; i < text.size(); ++i) text[i] = uint8_t("blockd qcow2 "[i % 13]);
  std::vector<uint8_t> noise(65536);
  uint64_t x = 88172645463325252ull;
  for (auto& b : noise) {
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    b = uint8_t(x);
  }
  for (auto type : {compression::zlib, compression::zstd}) {
    auto c = compress_cluster(type, text.data(), text.size());
    ASSERT_TRUE(c);
    ASSERT_FALSE(c->empty());
    EXPECT_LT(c->size(), text.size());
    c->resize(c->size() + 300, 0xee);  // the rest of the last sector
    std::vector<uint8_t> out(text.size());
    ASSERT_TRUE(decompress_cluster(type, c->data(), c->size(), out.data(), out.size()));
    EXPECT_EQ(text, out);
    auto n = compress_cluster(type, noise.data(), noise.size());
    ASSERT_TRUE(n);
    EXPECT_TRUE(n->empty()) << "random data is written uncompressed";
  }
}

TEST(qcow2_refcounts, every_width_round_trips) {
  for (uint32_t order = 0; order <= 6; ++order) {
    header h;
    h.refcount_order = order;
    std::vector<uint8_t> block(4096, 0);
    uint64_t entries = block.size() * 8 / h.refcount_bits();
    uint64_t max = order == 6 ? ~uint64_t(0) : (uint64_t(1) << h.refcount_bits()) - 1;
    for (uint64_t i = 0; i < entries; ++i) refcount_set(h, block.data(), i, (i * 2654435761u) & max);
    for (uint64_t i = 0; i < entries; ++i) ASSERT_EQ((i * 2654435761u) & max, refcount_get(h, block.data(), i)) << order;
  }
}

// Hostile headers: each mutation of a valid image is refused by blockd with qemu-img's own text.
TEST_F(qcow2_images, hostile_headers_fail_with_qemus_messages) {
  std::string img = dir + "/good.qcow2";
  int rc = 0;
  sh("qemu-img create -q -f qcow2 " + img + " 64M", &rc);
  ASSERT_EQ(rc, 0);
  auto good = read_at(img, 0, 65536);
  struct mutation {
    std::string label;
    std::function<void(std::vector<uint8_t>&)> apply;
  };
  std::vector<mutation> ms = {
      {"version 4", [](auto& b) { put_be32(&b[4], 4); }},
      {"version 1", [](auto& b) { put_be32(&b[4], 1); }},
      {"cluster bits 8", [](auto& b) { put_be32(&b[20], 8); }},
      {"cluster bits 22", [](auto& b) { put_be32(&b[20], 22); }},
      {"header length 100", [](auto& b) { put_be32(&b[100], 100); }},
      {"header length beyond the cluster", [](auto& b) { put_be32(&b[100], 70000); }},
      {"backing offset beyond the cluster", [](auto& b) { put_be64(&b[8], 70000); }},
      {"unknown incompatible bit", [](auto& b) { put_be64(&b[72], 1ull << 7); }},
      {"refcount order 7", [](auto& b) { put_be32(&b[96], 7); }},
      {"crypt method 3", [](auto& b) { put_be32(&b[32], 3); }},
      {"no refcount table", [](auto& b) { put_be32(&b[56], 0); }},
      {"refcount table misaligned", [](auto& b) { put_be64(&b[48], 65536 + 512); }},
      {"L1 misaligned", [](auto& b) { put_be64(&b[40], 65536 * 3 + 8); }},
      {"L1 too small", [](auto& b) { put_be32(&b[36], 0); }},
      {"L1 too large", [](auto& b) { put_be32(&b[36], 0x2000000); }},
      {"compression type without its bit", [](auto& b) { b[104] = 1; }},
      {"unknown compression type", [](auto& b) {
         b[104] = 7;
         put_be64(&b[72], incompat_compression);
       }},
      {"snapshot table misaligned", [](auto& b) {
         put_be32(&b[60], 1);
         put_be64(&b[64], 65536 * 5 + 16);
       }},
      {"too many snapshots", [](auto& b) {
         put_be32(&b[60], 70000);
         put_be64(&b[64], 65536 * 5);
       }},
      {"refcount table too large", [](auto& b) { put_be32(&b[56], 0x10000); }},
      {"extension longer than the cluster", [](auto& b) {
         put_be32(&b[112], 0x12345678);
         put_be32(&b[116], 0x100000);
       }},
      {"backing name too long", [](auto& b) {
         put_be64(&b[8], 1024);
         put_be32(&b[16], 2000);
       }},
      {"unknown feature named by the table", [](auto& b) {
         put_be64(&b[72], 1ull << 9);
         // A feature name table extension naming incompatible bit 9.
         put_be32(&b[112], ext_feature_table);
         put_be32(&b[116], 48);
         std::fill(b.begin() + 120, b.begin() + 168, 0);
         b[120] = 0;
         b[121] = 9;
         std::memcpy(&b[122], "shiny new thing", 15);
         std::fill(b.begin() + 168, b.begin() + 176, 0);
       }},
      {"extended L2 with 4k clusters", [](auto& b) {
         put_be32(&b[20], 12);
         put_be64(&b[72], incompat_extended_l2);
       }},
  };
  for (auto& m : ms) {
    auto b = good;
    m.apply(b);
    std::string bad = dir + "/bad.qcow2";
    sh("cp " + img + " " + bad);
    int fd = open(bad.c_str(), O_WRONLY | O_CLOEXEC);
    ASSERT_EQ(ssize_t(b.size()), pwrite(fd, b.data(), b.size(), 0));
    close(fd);
    std::string out = sh("qemu-img info -f qcow2 " + bad, &rc, true);
    auto ours = parse_header(b, file_size(bad));
    std::string prefix = "qemu-img: Could not open '" + bad + "': ";
    if (rc == 0) {
      EXPECT_TRUE(ours) << m.label << " is accepted by qemu-img but refused by blockd: " << ours.error().desc;
      continue;
    }
    ASSERT_EQ(0u, out.find(prefix)) << m.label << ": " << out;
    std::string theirs = out.substr(prefix.size());
    while (!theirs.empty() && theirs.back() == '\n') theirs.pop_back();
    ASSERT_FALSE(ours) << m.label << " is refused by qemu-img (" << theirs << ") but accepted by blockd";
    EXPECT_EQ(theirs, ours.error().desc) << m.label;
  }
}

}  // namespace
}  // namespace blockd::qcow2

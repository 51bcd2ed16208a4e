// qcow2 persistent bitmaps: extension, directory and table round trips and corrupt-input rejection, the directory of images qemu-img writes, and the driver loading, recording and storing bitmaps qemu-img reads back; test thread.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>

#include <boost/json.hpp>
#include <cstring>
#include <string>
#include <vector>

#include "formats/qcow2/bitmap_dir.h"
#include "formats/qcow2/layout.h"
#include "storage/block/bitmap_ops.h"
#include "storage/block/contract.h"
#include "storage/block/graph.h"
#include "storage/block/local_loop.h"
#include "storage/block/node.h"
#include "storage/block/sync_io.h"
#include "storage/io/reactor.h"
#include "tests/unit/qcow2_test_stack.h"
#include "tests/unit/shell_tools.h"

namespace blockd::qcow2 {
namespace {

constexpr uint64_t cs = 65536;

bool shell_ok(const std::string& cmd) {
  int rc = -1;
  test::sh(cmd, &rc);
  return rc == 0;
}
constexpr uint64_t disk = 64ull << 20;

bitmap_entry entry(std::string name, uint32_t flags = bitmap_flag_auto, uint8_t gbits = 16) {
  bitmap_entry e;
  e.name = std::move(name);
  e.flags = flags;
  e.granularity_bits = gbits;
  e.table_offset = 5 * cs;
  e.table_size = uint32_t(bitmap_table_entries(disk, gbits, cs));
  return e;
}

void put_be16_(uint8_t* p, uint16_t v) {
  p[0] = uint8_t(v >> 8);
  p[1] = uint8_t(v);
}

std::string error_of(std::span<const uint8_t> dir, uint32_t nb) {
  auto r = parse_bitmap_directory(dir, nb, cs, disk);
  return r ? "" : r.error().desc;
}

TEST(qcow2_bitmap_layout, extension_round_trip_and_checks) {
  bitmaps_ext e{3, 96, 7 * cs};
  auto bytes = encode_bitmaps_ext(e);
  ASSERT_EQ(bytes.size(), 24u);
  auto back = parse_bitmaps_ext(bytes, cs);
  ASSERT_TRUE(back.has_value()) << back.error().desc;
  EXPECT_EQ(back->nb_bitmaps, 3u);
  EXPECT_EQ(back->directory_size, 96u);
  EXPECT_EQ(back->directory_offset, 7 * cs);

  auto bad = [&](auto edit) {
    auto b = bytes;
    edit(b);
    auto r = parse_bitmaps_ext(b, cs);
    return r ? std::string() : r.error().desc;
  };
  EXPECT_EQ(bad([](auto& b) { b.pop_back(); }), "bitmaps_ext: Invalid extension length");
  EXPECT_EQ(bad([](auto& b) { b[7] = 1; }), "bitmaps_ext: Reserved field is not zero");
  EXPECT_EQ(bad([](auto& b) { put_be32(b.data(), 0); }), "found bitmaps extension with zero bitmaps");
  EXPECT_EQ(bad([](auto& b) { put_be32(b.data(), 65536); }),
            "bitmaps_ext: Image has 65536 bitmaps, exceeding the QEMU supported maximum of 65535");
  EXPECT_EQ(bad([](auto& b) { put_be64(b.data() + 16, 7 * cs + 8); }), "bitmaps_ext: invalid bitmap directory offset");
  EXPECT_EQ(bad([](auto& b) { put_be64(b.data() + 8, max_bitmap_directory_size + 1); }),
            "bitmaps_ext: bitmap directory size (67107841) exceeds the maximum supported size (67107840)");
}

TEST(qcow2_bitmap_layout, directory_round_trip) {
  std::vector<bitmap_entry> in{entry("a"), entry("in use", bitmap_flag_in_use, 12), entry(std::string(1023, 'x'), 0, 31)};
  in[1].table_offset = 9 * cs;
  auto bytes = encode_bitmap_directory(in);
  EXPECT_EQ(bytes.size(), bitmap_entry_size(1) + bitmap_entry_size(6) + bitmap_entry_size(1023));
  EXPECT_EQ(bitmap_entry_size(1), 32u);
  EXPECT_EQ(bitmap_entry_size(8), 32u);
  EXPECT_EQ(bitmap_entry_size(9), 40u);
  auto out = parse_bitmap_directory(bytes, 3, cs, disk);
  ASSERT_TRUE(out.has_value()) << out.error().desc;
  ASSERT_EQ(out->size(), 3u);
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ((*out)[i].name, in[i].name);
    EXPECT_EQ((*out)[i].flags, in[i].flags);
    EXPECT_EQ((*out)[i].granularity_bits, in[i].granularity_bits);
    EXPECT_EQ((*out)[i].table_offset, in[i].table_offset);
    EXPECT_EQ((*out)[i].table_size, in[i].table_size);
  }
  EXPECT_EQ(bitmap_flag_names(bitmap_flag_in_use | bitmap_flag_auto), (std::vector<std::string>{"in-use", "auto"}));
  EXPECT_TRUE(bitmap_flag_names(0).empty());
}

TEST(qcow2_bitmap_layout, table_sizes) {
  // 64 MiB at 64 KiB granules: 1024 bits, 128 bytes, one cluster.
  EXPECT_EQ(bitmap_data_bytes(disk, 16), 128u);
  EXPECT_EQ(bitmap_table_entries(disk, 16, cs), 1u);
  // At 512-byte granules: 131072 bits = 16 KiB; with 4 KiB clusters that is 4 entries.
  EXPECT_EQ(bitmap_table_entries(disk, 9, 4096), 4u);
  // A partial last granule counts, and data is whole 64-bit words.
  EXPECT_EQ(bitmap_data_bytes(65537, 16), 8u);
  EXPECT_EQ(bitmap_table_entries(0, 16, cs), 0u);
}

TEST(qcow2_bitmap_layout, corrupt_directories_are_refused_with_qemus_texts) {
  auto good = encode_bitmap_directory({entry("a"), entry("b")});
  EXPECT_EQ(error_of(good, 2), "");
  EXPECT_EQ(error_of({}, 2), "Requested bitmap directory size is zero");
  EXPECT_EQ(error_of(good, 1), "More bitmaps found than specified in header extension");
  EXPECT_EQ(error_of(good, 3), "Less bitmaps found than specified in header extension");
  EXPECT_EQ(error_of(std::span<const uint8_t>(good.data(), 40), 2), "Broken bitmap directory");
  EXPECT_EQ(error_of(std::span<const uint8_t>(good.data(), 16), 1), "Broken bitmap directory");

  auto with = [&](size_t at, auto edit) {
    auto d = good;
    edit(d.data() + at);
    return error_of(d, 2);
  };
  const std::string bad_a = "Bitmap 'a' doesn't satisfy the constraints";
  EXPECT_EQ(with(0, [](uint8_t* p) { put_be32(p + 20, 8); }), "Bitmap extra data is not supported");
  EXPECT_EQ(with(0, [](uint8_t* p) { put_be32(p + 8, 0); }), bad_a);                   // no table
  EXPECT_EQ(with(0, [](uint8_t* p) { put_be64(p, 0); }), bad_a);                       // table at 0
  EXPECT_EQ(with(0, [](uint8_t* p) { put_be64(p, cs + 512); }), bad_a);                // misaligned
  EXPECT_EQ(with(0, [](uint8_t* p) { put_be32(p + 8, max_bitmap_table_size + 1); }), bad_a);
  EXPECT_EQ(with(0, [](uint8_t* p) { put_be32(p + 8, 8193); }), bad_a);                // > 512 MiB of data
  EXPECT_EQ(with(0, [](uint8_t* p) { p[17] = 8; }), bad_a);                            // granularity
  EXPECT_EQ(with(0, [](uint8_t* p) { p[17] = 32; }), bad_a);
  EXPECT_EQ(with(0, [](uint8_t* p) { put_be32(p + 12, 0x4); }), bad_a);               // reserved flag
  EXPECT_EQ(with(0, [](uint8_t* p) { p[16] = 2; }), bad_a);                            // type
  EXPECT_EQ(with(32, [](uint8_t* p) { put_be16_(p + 18, 2000); }), "Broken bitmap directory");
  // A consistent bitmap needs a table covering the disk; one in use may be stale.
  auto small = [](uint32_t flags) {
    auto e = entry("s", flags, 9);  // 131072 bits: 16 KiB, one cluster; 0 clusters is refused
    e.table_size = 1;
    return e;
  };
  EXPECT_EQ(error_of(encode_bitmap_directory({small(bitmap_flag_auto)}), 1), "");
  auto tiny_disk = parse_bitmap_directory(encode_bitmap_directory({small(0)}), 1, 512, disk);
  ASSERT_FALSE(tiny_disk.has_value());  // 512-byte clusters: 4096 bits cover 2 MiB, not 64
  EXPECT_EQ(tiny_disk.error().desc, "Bitmap 's' doesn't satisfy the constraints");
  EXPECT_TRUE(parse_bitmap_directory(encode_bitmap_directory({small(bitmap_flag_in_use)}), 1, 512, disk).has_value());
}

TEST(qcow2_bitmap_layout, table_entries) {
  EXPECT_TRUE(bitmap_table_entry_ok(0, cs));
  EXPECT_TRUE(bitmap_table_entry_ok(bitmap_entry_all_ones, cs));
  EXPECT_TRUE(bitmap_table_entry_ok(3 * cs, cs));
  EXPECT_FALSE(bitmap_table_entry_ok(3 * cs | 1, cs));   // an offset with the all-ones bit
  EXPECT_FALSE(bitmap_table_entry_ok(3 * cs + 512, cs));  // misaligned
  EXPECT_FALSE(bitmap_table_entry_ok(0x2, cs));           // reserved bits 1-8
  EXPECT_FALSE(bitmap_table_entry_ok(1ull << 56, cs));    // reserved bits 56-63
  std::vector<uint64_t> t{0, 1, 4 * cs, 0x00fffffffff0000ull};
  EXPECT_EQ(decode_bitmap_table(encode_bitmap_table(t)), t);
  uint8_t b[2];
  put_be16_(b, 0x1234);
  EXPECT_EQ(be16(b), 0x1234);
}

// ---- against qemu-img ------------------------------------------------------------------------------

std::vector<uint8_t> read_at(const std::string& path, uint64_t off, size_t len) {
  std::vector<uint8_t> b(len, 0);
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  EXPECT_GE(fd, 0) << path;
  ssize_t n = pread(fd, b.data(), len, off_t(off));
  ::close(fd);
  if (n >= 0) b.resize(size_t(n));
  return b;
}

using block::qcow2_test::scratch;

// The stored directory of `img`, read by the pure functions.
std::vector<bitmap_entry> directory_of(const std::string& img, header* hout = nullptr) {
  auto first = read_at(img, 0, cs);
  auto h = parse_header(first, 1 << 30);
  EXPECT_TRUE(h.has_value());
  if (!h) return {};
  if (hout) *hout = *h;
  for (auto& x : h->extensions)
    if (x.type == ext_bitmaps) {
      auto e = parse_bitmaps_ext(x.data, h->cluster_size());
      EXPECT_TRUE(e.has_value());
      auto d = read_at(img, e->directory_offset, e->directory_size);
      auto entries = parse_bitmap_directory(d, e->nb_bitmaps, h->cluster_size(), h->size);
      EXPECT_TRUE(entries.has_value()) << entries.error().desc;
      return entries ? *entries : std::vector<bitmap_entry>{};
    }
  return {};
}

TEST(qcow2_bitmap_layout, directories_qemu_img_writes_parse) {
  if (!test::have_qemu_tools()) GTEST_SKIP() << "qemu-img/qemu-io not installed";
  scratch s;
  std::string img = s.path("q.qcow2");
  ASSERT_TRUE(qcow2::shell_ok("qemu-img create -q -f qcow2 " + img + " 64M"));
  ASSERT_TRUE(qcow2::shell_ok("qemu-img bitmap --add " + img + " first"));
  ASSERT_TRUE(qcow2::shell_ok("qemu-img bitmap --add -g 4096 --disable " + img + " second-name"));
  ASSERT_TRUE(qcow2::shell_ok("qemu-io -f qcow2 " + img + " -c 'write 0 1M' >/dev/null"));
  header h;
  auto d = directory_of(img, &h);
  ASSERT_EQ(d.size(), 2u);
  EXPECT_TRUE(h.autoclear_features & autoclear_bitmaps);
  EXPECT_EQ(d[0].name, "first");
  EXPECT_EQ(d[0].flags, bitmap_flag_auto);
  EXPECT_EQ(d[0].granularity_bits, 16);
  EXPECT_EQ(d[1].name, "second-name");
  EXPECT_EQ(d[1].flags, 0u);
  EXPECT_EQ(d[1].granularity_bits, 12);
  // The recorded write gave `first` one data cluster with bits 0-15 set (1 MiB at 64 KiB).
  auto t = decode_bitmap_table(read_at(img, d[0].table_offset, d[0].table_size * 8));
  ASSERT_EQ(t.size(), 1u);
  ASSERT_TRUE(bitmap_table_entry_ok(t[0], cs));
  ASSERT_NE(t[0] & bitmap_entry_offset_mask, 0u);
  auto data = read_at(img, t[0] & bitmap_entry_offset_mask, 4);
  EXPECT_EQ(data, (std::vector<uint8_t>{0xff, 0xff, 0, 0}));
  // The disabled one recorded nothing: no data cluster at all.
  auto t2 = decode_bitmap_table(read_at(img, d[1].table_offset, d[1].table_size * 8));
  for (auto v : t2) EXPECT_EQ(v, 0u);
}

}  // namespace
}  // namespace blockd::qcow2

// ---- the driver -----------------------------------------------------------------------------------

namespace blockd::block {
namespace {

namespace json = boost::json;

using qcow2_test::stack;

std::string out_of(const std::string& cmd) { return qcow2_test::run(cmd); }

json::array stored_info(const std::string& img) {
  auto v = json::parse(out_of("qemu-img info -U --output=json " + img));
  auto& d = v.at("format-specific").at("data").as_object();
  return d.contains("bitmaps") ? d.at("bitmaps").as_array() : json::array{};
}

void write_at(node& n, int64_t off, int64_t len) {
  void* buf = nullptr;
  ASSERT_EQ(posix_memalign(&buf, 4096, size_t(len)), 0);
  std::memset(buf, 0x5a, size_t(len));
  EXPECT_EQ(sync_io(n).write(buf, len, off), 0);
  free(buf);
}

bool clean(const std::string& img) { return qcow2::shell_ok("qemu-img check -U -q " + img); }

TEST(qcow2_bitmaps, load_record_store_and_remove) {
  if (!test::have_qemu_tools()) GTEST_SKIP() << "qemu-img/qemu-io not installed";
  qcow2::scratch s;
  std::string img = s.path("d.qcow2");
  ASSERT_TRUE(qcow2::shell_ok("qemu-img create -q -f qcow2 " + img + " 32M"));
  ASSERT_TRUE(qcow2::shell_ok("qemu-img bitmap --add " + img + " qa"));
  ASSERT_TRUE(qcow2::shell_ok("qemu-io -f qcow2 " + img + " -c 'write 0 128k' >/dev/null"));
  std::string sha_qa;
  {
    stack k;
    auto n = k.try_open_qcow2(img);
    ASSERT_TRUE(n.has_value()) << n.error().desc;
    dirty_bitmap* qa = (*n)->bitmaps().find("qa");
    ASSERT_NE(qa, nullptr);
    EXPECT_TRUE(qa->persistent && qa->enabled && !qa->inconsistent && !qa->readonly);
    EXPECT_EQ(qa->dirty_bytes(), 128 * 1024);
    // Opened read-write: in use on disk until stored.
    auto info = stored_info(img);
    ASSERT_EQ(info.size(), 1u);
    EXPECT_EQ(info[0].at("flags").as_array().size(), 2u) << info;
    EXPECT_EQ(add_bitmap(**n, {.name = "mine", .granularity = 4096, .persistent = true}).has_value(), true);
    EXPECT_EQ(add_bitmap(**n, {.name = "qa", .persistent = true}).error().desc, "Bitmap already exists: qa");
    EXPECT_EQ(add_bitmap(**n, {.name = "gone", .persistent = true}).has_value(), true);
    write_at(**n, 1 << 20, 8192);
    EXPECT_EQ((*n)->bitmaps().find("mine")->dirty_bytes(), 8192);
    EXPECT_EQ(qa->dirty_bytes(), 128 * 1024 + 65536);
    sha_qa = qa->sha256();
    // Removing a bitmap never stored is no error; a stored one leaves the image at once.
    EXPECT_TRUE((*n)->driver().remove_stored_bitmap("gone").has_value());
    release_bitmap(**n, "gone");
    EXPECT_TRUE((*n)->driver().remove_stored_bitmap("qa").has_value());
    EXPECT_EQ(stored_info(img).size(), 0u);
    EXPECT_TRUE(clean(img));
    // Put back (same bits) so the close stores it as a new entry.
    auto keep = std::make_shared<dirty_bitmap>(*qa);
    release_bitmap(**n, "qa");
    (*n)->bitmaps().add(keep);
    (*n)->sync_bitmap_hook();
    k.g.del((*n)->name());
  }
  EXPECT_TRUE(clean(img));
  auto info = stored_info(img);
  ASSERT_EQ(info.size(), 2u) << info;
  // Stored newest first, as QEMU appends them walking its list.
  EXPECT_EQ(info[0].at("name"), "qa");
  EXPECT_EQ(info[1].at("name"), "mine");
  EXPECT_EQ(info[1].at("granularity").to_number<int64_t>(), 4096);
  EXPECT_EQ(json::serialize(info[0].at("flags")), "[\"auto\"]");
  {
    stack k;
    auto n = k.try_open_qcow2(img, true);
    ASSERT_TRUE(n.has_value()) << n.error().desc;
    dirty_bitmap* qa = (*n)->bitmaps().find("qa");
    ASSERT_NE(qa, nullptr);
    EXPECT_TRUE(qa->readonly);
    EXPECT_EQ(qa->sha256(), sha_qa);
    EXPECT_EQ((*n)->bitmaps().find("mine")->dirty_bytes(), 8192);
    // Resizing needs every stored bitmap usable: a read-only one is not (and the node is read-only).
    EXPECT_FALSE((*n)->driver().truncate(64 << 20).has_value());
    k.g.del((*n)->name());
  }
  EXPECT_EQ(stored_info(img).size(), 2u);
  // Growing a read-write image resizes the bitmaps; they are stored at the new size.
  {
    stack k;
    auto n = k.try_open_qcow2(img);
    ASSERT_TRUE(n.has_value()) << n.error().desc;
    ASSERT_TRUE((*n)->driver().truncate(64 << 20).has_value());
    (*n)->publish_facts();
    write_at(**n, 60 << 20, 4096);
    k.g.del((*n)->name());
  }
  EXPECT_TRUE(clean(img));
  auto out = out_of("qemu-img info -U --output=json " + img);
  EXPECT_NE(out.find("\"virtual-size\": 67108864"), std::string::npos) << out;
  {
    stack k;
    auto n = k.try_open_qcow2(img, true);
    ASSERT_TRUE(n.has_value()) << n.error().desc;
    EXPECT_EQ((*n)->bitmaps().find("mine")->dirty_bytes(), 8192 + 4096);
    EXPECT_TRUE((*n)->bitmaps().find("mine")->get(60 << 20));
    k.g.del((*n)->name());
  }
}

TEST(qcow2_bitmaps, v2_images_and_limits) {
  if (!test::have_qemu_tools()) GTEST_SKIP() << "qemu-img/qemu-io not installed";
  qcow2::scratch s;
  std::string v2 = s.path("v2.qcow2"), big = s.path("big.qcow2");
  ASSERT_TRUE(qcow2::shell_ok("qemu-img create -q -f qcow2 -o compat=0.10 " + v2 + " 1M"));
  ASSERT_TRUE(qcow2::shell_ok("qemu-img create -q -f qcow2 " + big + " 4T"));
  stack k;
  auto a = k.try_open_qcow2(v2);
  ASSERT_TRUE(a.has_value());
  EXPECT_EQ(add_bitmap(**a, {.name = "x", .persistent = true}).error().desc,
            "Can't make bitmap 'x' persistent in 'q1': Cannot store dirty bitmaps in qcow2 v2 files");
  auto b = k.try_open_qcow2(big);
  ASSERT_TRUE(b.has_value());
  auto& d = (*b)->driver();
  EXPECT_EQ(d.can_store_bitmap("x", 512).error().desc, "Too much space will be occupied by the bitmap. Use larger granularity");
  EXPECT_TRUE(d.can_store_bitmap("x", 1024).has_value());
  EXPECT_EQ(d.can_store_bitmap("x", 1ull << 32).error().desc, "Granularity exceeds maximum (2147483648 bytes)");
  EXPECT_EQ(d.can_store_bitmap(std::string(1024, 'n'), 65536).error().desc, "Name length exceeds maximum (1023 characters)");
  k.g.del((*a)->name());
  k.g.del((*b)->name());
}

}  // namespace
}  // namespace blockd::block

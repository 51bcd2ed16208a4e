// The block-copy engine over real nodes on a local loop (null, file, qcow2): plain copies, zero clusters and holes, compression, backing chains and copy-up; test thread.
#include "tests/drivers/copy_engine_fixture.h"

namespace blockd::block {
namespace {

// ---- plain copies ------------------------------------------------------------------------------

TEST_F(copy_fixture, null_to_file_writes_zeroes_not_bytes) {
  node* src = s->open("null-co", {{"size", image_size}, {"read-zeroes", true}});
  node* dst = file(image(image_size));
  fill(dst, 0, image_size, 1);
  recorder rec(dst, false);
  seen sn;
  copy_engine e({.source = src, .target = dst}, sn.cbs());
  e.work_map().set(0, image_size);
  e.start();
  run_until([&] { return sn.idle > 0; });
  EXPECT_EQ(sn.done, image_size);
  EXPECT_EQ(rec.write_bytes, 0) << "zero ranges must become write_zeroes";
  EXPECT_EQ(rec.zero_bytes, image_size);
  EXPECT_EQ(read_all(dst), std::vector<char>(size_t(image_size), 0));
  EXPECT_EQ(e.remaining(), 0);
}

TEST_F(copy_fixture, null_to_file_without_block_status_copies_bytes) {
  node* src = s->open("null-co", {{"size", image_size}, {"read-zeroes", true}});
  node* dst = file(image(image_size));
  fill(dst, 0, image_size, 1);
  recorder rec(dst, false);
  seen sn;
  copy_engine e({.source = src, .target = dst, .block_status = false}, sn.cbs());
  e.work_map().set(0, image_size);
  e.start();
  run_until([&] { return sn.idle > 0; });
  EXPECT_EQ(rec.write_bytes, image_size);
  EXPECT_EQ(read_all(dst), std::vector<char>(size_t(image_size), 0));
}

TEST_F(copy_fixture, file_to_file_big_requests_and_holes) {
  node* src = file(image(image_size));
  fill(src, 0, 2 * M, 2);          // data
  fill(src, 3 * M, 512 * K, 3);    // data; 2M..3M and 3.5M..4M are holes
  node* dst = file(image(image_size));
  fill(dst, 0, image_size, 9);
  recorder rec(dst, false);
  seen sn;
  copy_engine e({.source = src, .target = dst, .granularity = 64 * K, .max_chunk = 1 * M}, sn.cbs());
  e.work_map().set(0, image_size);
  EXPECT_EQ(e.remaining(), image_size);
  e.start();
  run_until([&] { return sn.idle > 0; });
  EXPECT_EQ(read_all(dst), read_all(src));
  EXPECT_EQ(rec.write_bytes, 2 * M + 512 * K);
  EXPECT_EQ(rec.zero_bytes, image_size - 2 * M - 512 * K);
  EXPECT_EQ(e.largest_request(), 1 * M) << "consecutive dirty chunks merge up to max_chunk";
  EXPECT_EQ(sn.done, image_size);
  EXPECT_EQ(sn.errors.size(), 0u);
}

TEST_F(copy_fixture, partial_work_map_copies_only_dirty_chunks) {
  node* src = file(image(image_size));
  fill(src, 0, image_size, 4);
  node* dst = file(image(image_size));
  recorder rec(dst, false);
  seen sn;
  copy_engine e({.source = src, .target = dst, .granularity = 64 * K}, sn.cbs());
  e.work_map().set(128 * K, 1);       // one chunk
  e.work_map().set(1 * M, 200 * K);   // four chunks (widened)
  e.start();
  run_until([&] { return sn.idle > 0; });
  EXPECT_EQ(rec.write_bytes, 5 * 64 * K);
  auto a = read_all(src), b = read_all(dst);
  EXPECT_TRUE(std::equal(a.begin() + 128 * K, a.begin() + 192 * K, b.begin() + 128 * K));
  EXPECT_TRUE(std::equal(a.begin() + 1 * M, a.begin() + 1 * M + 256 * K, b.begin() + 1 * M));
  EXPECT_EQ(b[0], 0);
}

// ---- qcow2: zero clusters, holes, compression ----------------------------------------------------

struct qcow2_copy : copy_fixture {
  std::string src_path, dst_path;
  node *src = nullptr, *dst = nullptr;
  // Source: data in 0..1M, zero clusters in 2M..3M, the rest unallocated.
  bool make() {
    src_path = qcow2_image(image_size);
    dst_path = qcow2_image(image_size);
    if (src_path.empty() || dst_path.empty()) return false;
    if (!sh("qemu-io -f qcow2 -c 'write -P 0x5a 0 1M' -c 'write -z 2M 1M' " + src_path)) return false;
    src = s->open("qcow2", {}, file(src_path));
    dst = s->open("qcow2", {}, file(dst_path));
    return true;
  }
  std::string map_of(const std::string& p) {
    EXPECT_EQ(io(dst, io_op::flush, 0, 0), 0);
    std::string out = sh_out("qemu-img map -U -f qcow2 --output=json " + p);
    EXPECT_FALSE(out.empty());
    return out.empty() ? "[]" : out;
  }
  // The map as (start, length, data, zero) rows, for comparisons.
  static std::vector<std::tuple<int64_t, int64_t, bool, bool>> rows(const std::string& json) {
    std::vector<std::tuple<int64_t, int64_t, bool, bool>> r;
    auto v = boost::json::parse(json);
    for (auto& x : v.as_array()) {
      auto& o = x.as_object();
      bool data = o.at("data").as_bool(), zero = o.at("zero").as_bool();
      int64_t st = o.at("start").to_number<int64_t>(), len = o.at("length").to_number<int64_t>();
      if (!r.empty() && std::get<2>(r.back()) == data && std::get<3>(r.back()) == zero &&
          std::get<0>(r.back()) + std::get<1>(r.back()) == st)
        std::get<1>(r.back()) += len;
      else
        r.emplace_back(st, len, data, zero);
    }
    return r;
  }
};

TEST_F(qcow2_copy, zero_clusters_become_write_zeroes) {
  if (!make()) GTEST_SKIP() << "qemu-img / qemu-io are not installed";
  recorder rec(dst, false);
  seen sn;
  copy_engine e({.source = src, .target = dst}, sn.cbs());
  e.work_map().set(0, image_size);
  e.start();
  run_until([&] { return sn.idle > 0; });
  EXPECT_EQ(rec.write_bytes, 1 * M) << "only the data cluster range is copied as bytes";
  EXPECT_EQ(rec.zero_bytes, image_size - 1 * M);
  EXPECT_EQ(read_all(dst), read_all(src));
  auto m = rows(map_of(dst_path));
  ASSERT_FALSE(m.empty());
  EXPECT_EQ(m[0], std::make_tuple(int64_t(0), 1 * M, true, false));
  for (size_t i = 1; i < m.size(); ++i) EXPECT_FALSE(std::get<2>(m[i])) << "no data past 1M";
}

TEST_F(qcow2_copy, fresh_target_keeps_holes) {
  if (!make()) GTEST_SKIP() << "qemu-img / qemu-io are not installed";
  recorder rec(dst, false);
  seen sn;
  copy_engine e({.source = src, .target = dst, .target_zeroed = true}, sn.cbs());
  e.work_map().set(0, image_size);
  e.start();
  run_until([&] { return sn.idle > 0; });
  EXPECT_EQ(rec.write_bytes, 1 * M);
  EXPECT_EQ(rec.zero_bytes, 0);
  EXPECT_EQ(sn.skipped, image_size - 1 * M);
  auto m = rows(map_of(dst_path));
  // Data, then one unallocated stretch (reads zeroes, nothing allocated).
  ASSERT_EQ(m.size(), 2u) << map_of(dst_path);
  EXPECT_EQ(m[0], std::make_tuple(int64_t(0), 1 * M, true, false));
  EXPECT_EQ(m[1], std::make_tuple(1 * M, image_size - 1 * M, false, true));
  EXPECT_TRUE(sh("qemu-img compare -U -f qcow2 -F qcow2 " + src_path + " " + dst_path));
}

TEST_F(qcow2_copy, compressed_writes) {
  if (!make()) GTEST_SKIP() << "qemu-img / qemu-io are not installed";
  seen sn;
  copy_engine e({.source = src, .target = dst, .mode = copy_mode::compress, .target_zeroed = true}, sn.cbs());
  e.work_map().set(0, image_size);
  e.start();
  run_until([&] { return sn.idle > 0; });
  EXPECT_EQ(sn.errors.size(), 0u);
  EXPECT_EQ(read_all(dst), read_all(src));
  EXPECT_EQ(io(dst, io_op::flush, 0, 0), 0);
  std::string out = sh_out("qemu-img check -U --output=json " + dst_path);
  ASSERT_FALSE(out.empty());
  auto o = boost::json::parse(out).as_object();
  EXPECT_EQ(o.at("compressed-clusters").to_number<int64_t>(), 16) << out;
}

// ---- backing chains: sync=top / full, scan, copy-up ---------------------------------------------

struct chain_copy : copy_fixture {
  std::string base_path, top_path;
  node *base = nullptr, *top = nullptr;
  // base (raw): data everywhere; top (qcow2 over it): its own data in 1M..1.5M.
  bool make() {
    base_path = image(image_size);
    top_path = qcow2_image(image_size, base_path);
    if (top_path.empty()) return false;
    base = file(base_path);
    fill(base, 0, image_size, 5);
    top = s->open_with("qcow2", {}, {{"file", file(top_path)}, {"backing", base}});
    fill(top, 1 * M, 512 * K, 6);
    return true;
  }
};

TEST_F(chain_copy, sync_top_copies_only_the_top) {
  if (!make()) GTEST_SKIP() << "qemu-img is not installed";
  node* dst = file(image(image_size));
  recorder rec(dst, false);
  seen sn;
  copy_engine e({.source = top, .target = dst, .policy = copy_policy_top()}, sn.cbs());
  e.work_map().set(0, image_size);
  e.start();
  run_until([&] { return sn.idle > 0; });
  EXPECT_EQ(rec.write_bytes, 512 * K);
  EXPECT_EQ(rec.zero_bytes, 0);
  EXPECT_EQ(sn.skipped, image_size - 512 * K);
  auto t = read_all(top), d = read_all(dst);
  EXPECT_TRUE(std::equal(t.begin() + 1 * M, t.begin() + 1 * M + 512 * K, d.begin() + 1 * M));
  EXPECT_EQ(d[0], 0);
  EXPECT_EQ(d[size_t(2 * M)], 0);
}

TEST_F(chain_copy, sync_full_copies_the_chain) {
  if (!make()) GTEST_SKIP() << "qemu-img is not installed";
  node* dst = file(image(image_size));
  seen sn;
  copy_engine e({.source = top, .target = dst}, sn.cbs());
  e.work_map().set(0, image_size);
  e.start();
  run_until([&] { return sn.idle > 0; });
  EXPECT_EQ(read_all(dst), read_all(top));
  EXPECT_EQ(sn.skipped, 0);
}

TEST_F(chain_copy, scan_fills_the_work_map_from_the_policy) {
  if (!make()) GTEST_SKIP() << "qemu-img is not installed";
  node* dst = file(image(image_size));
  seen sn;
  copy_engine e({.source = top, .target = dst, .policy = copy_policy_top()}, sn.cbs());
  int rc = 1;
  e.scan([&](int r) { rc = r; });
  EXPECT_EQ(rc, 1) << "never inside the call";
  run_until([&] { return rc != 1; });
  EXPECT_EQ(rc, 0);
  EXPECT_EQ(e.work_map().dirty_bytes(), 512 * K);
  EXPECT_TRUE(e.work_map().get(1 * M));
  EXPECT_FALSE(e.work_map().get(0));
}

TEST_F(chain_copy, copy_up_streams_the_backing_data_into_the_top) {
  if (!make()) GTEST_SKIP() << "qemu-img is not installed";
  auto before = read_all(top);
  seen sn;
  // stream: what the base holds (depth 2) is copied up; what the top holds already is skipped.
  copy_engine e({.source = top, .mode = copy_mode::copy_up, .policy = copy_policy_above(2, true)}, sn.cbs());
  e.work_map().set(0, image_size);
  e.start();
  run_until([&] { return sn.idle > 0; });
  EXPECT_EQ(sn.skipped, 512 * K);
  EXPECT_EQ(read_all(top), before);
  // Everything is allocated in the top now.
  for (int64_t off = 0; off < image_size;) {
    io_request st;
    ASSERT_EQ(io(top, io_op::block_status, off, image_size - off, nullptr, 0, &st), 0);
    EXPECT_EQ(st.depth, 1) << "at " << off;
    ASSERT_GT(st.status_length, 0);
    off += st.status_length;
  }
}

TEST(copy_policy, depths) {
  copy_extent top{0, 1, bs_data | bs_allocated, 1}, mid{0, 1, bs_data, 2}, low{0, 1, bs_zero, 3}, none{0, 1, bs_zero, 0};
  EXPECT_EQ(copy_policy_top()(top), copy_action::copy);
  EXPECT_EQ(copy_policy_top()(mid), copy_action::skip);
  EXPECT_EQ(copy_policy_full()(none), copy_action::zero);
  EXPECT_EQ(copy_policy_full()(mid), copy_action::copy);
  auto commit = copy_policy_above(2);
  EXPECT_EQ(commit(top), copy_action::copy);
  EXPECT_EQ(commit(mid), copy_action::copy);
  EXPECT_EQ(commit(low), copy_action::skip);
  EXPECT_EQ(commit(none), copy_action::skip);
  auto stream = copy_policy_above(3, true);
  EXPECT_EQ(stream(top), copy_action::skip);
  EXPECT_EQ(stream(low), copy_action::zero);
}

}  // namespace
}  // namespace blockd::block

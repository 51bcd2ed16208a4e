// NBD block status extents of a dirty bitmap (qemu:dirty-bitmap contexts): runs, cuts, caps and merging; test thread.
#include <gtest/gtest.h>

#include <vector>

#include "protocol/nbd/bitmap_extents.h"

namespace blockd::nbd {
namespace {

constexpr uint64_t K = 1024, M = 1024 * 1024;

std::vector<std::pair<uint64_t, uint32_t>> flat(const std::vector<extent>& v) {
  std::vector<std::pair<uint64_t, uint32_t>> out;
  for (auto& e : v) out.emplace_back(e.length, e.flags);
  return out;
}

// The pattern test_nbd_bitmaps writes (and qemu-storage-daemon 7.2 reported for it with nbdinfo):
// 3 KiB at 100 KiB, 64 KiB at 1 MiB, one byte at 5000 KiB, 1 MiB of zeroes at 8 MiB.
block::dirty_bitmap pattern(uint64_t granularity) {
  block::dirty_bitmap b("b0", granularity, 16 * M);
  b.set(100 * K, 3 * K);
  b.set(1 * M, 64 * K);
  b.set(5000 * K, 1);
  b.set(8 * M, 1 * M);
  return b;
}

TEST(nbd_bitmap_extents, whole_export_alternates_granule_aligned_runs) {
  std::vector<extent> v;
  bitmap_extents(pattern(64 * K), 0, 16 * M, max_bitmap_extents, false, v);
  std::vector<std::pair<uint64_t, uint32_t>> want{{65536, 0},   {65536, 1},   {917504, 0},
                                                  {65536, 1},   {3997696, 0}, {65536, 1},
                                                  {3211264, 0}, {1048576, 1}, {7340032, 0}};
  EXPECT_EQ(want, flat(v));
  v.clear();
  bitmap_extents(pattern(512), 0, 16 * M, max_bitmap_extents, false, v);
  std::vector<std::pair<uint64_t, uint32_t>> fine{{102400, 0}, {3072, 1},    {943104, 0},
                                                  {65536, 1},  {4005888, 0}, {512, 1},
                                                  {3268096, 0}, {1048576, 1}, {7340032, 0}};
  EXPECT_EQ(fine, flat(v));
}

TEST(nbd_bitmap_extents, the_range_cuts_runs_at_its_ends) {
  std::vector<extent> v;
  bitmap_extents(pattern(64 * K), 70000, 100000, max_bitmap_extents, false, v);
  std::vector<std::pair<uint64_t, uint32_t>> want{{131072 - 70000, 1}, {170000 - 131072, 0}};
  EXPECT_EQ(want, flat(v));
  v.clear();
  bitmap_extents(pattern(64 * K), 200000, 1000, max_bitmap_extents, false, v);  // all clean
  EXPECT_EQ((std::vector<std::pair<uint64_t, uint32_t>>{{1000, 0}}), flat(v));
}

TEST(nbd_bitmap_extents, req_one_and_the_cap_cover_a_prefix) {
  std::vector<extent> v;
  bitmap_extents(pattern(64 * K), 0, 16 * M, 1, false, v);
  EXPECT_EQ((std::vector<std::pair<uint64_t, uint32_t>>{{65536, 0}}), flat(v));
  v.clear();
  bitmap_extents(pattern(64 * K), 65536, 16 * M - 65536, 1, false, v);
  EXPECT_EQ((std::vector<std::pair<uint64_t, uint32_t>>{{65536, 1}}), flat(v));
  v.clear();
  bitmap_extents(pattern(64 * K), 0, 16 * M, 3, false, v);
  EXPECT_EQ((std::vector<std::pair<uint64_t, uint32_t>>{{65536, 0}, {65536, 1}, {917504, 0}}), flat(v));
}

TEST(nbd_bitmap_extents, clean_past_the_bitmap_and_empty_ranges) {
  block::dirty_bitmap b("b", 512, 1000);
  b.set(0, 1000);
  std::vector<extent> v;
  bitmap_extents(b, 0, 2048, max_bitmap_extents, false, v);
  EXPECT_EQ((std::vector<std::pair<uint64_t, uint32_t>>{{1000, 1}, {1048, 0}}), flat(v));
  v.clear();
  bitmap_extents(b, 0, 0, max_bitmap_extents, false, v);
  EXPECT_TRUE(v.empty());
}

TEST(nbd_bitmap_extents, long_runs_merge_up_to_the_extent_width) {
  const uint64_t size = 5 * K * M;
  block::dirty_bitmap b("b", 64 * K, int64_t(size));
  b.set(0, int64_t(size));
  std::vector<extent> v;
  // Compact replies: a request is at most 32 bits long, and so is the one extent covering it.
  bitmap_extents(b, 0, 0xffffffffull - 511, max_bitmap_extents, false, v);
  EXPECT_EQ((std::vector<std::pair<uint64_t, uint32_t>>{{0xffffffffull - 511, 1}}), flat(v));
  v.clear();
  // Extended headers: one 64-bit extent for the whole run.
  bitmap_extents(b, 0, size, max_bitmap_extents, true, v);
  EXPECT_EQ((std::vector<std::pair<uint64_t, uint32_t>>{{size, 1}}), flat(v));
}

}  // namespace
}  // namespace blockd::nbd

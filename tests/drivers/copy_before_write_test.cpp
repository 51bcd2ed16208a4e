// The copy-before-write filter and its snapshot-access view over real file nodes: old data reaches the target before a guest write, once per chunk, on-cbw-error and cbw-timeout, the view's reads; test thread.
#include "tests/drivers/copy_engine_fixture.h"

namespace blockd::block {
namespace {

struct cbw_fixture : copy_fixture {
  node *src = nullptr, *tgt = nullptr, *cbw = nullptr, *snap = nullptr;
  std::vector<char> before;  // the source at the filter's opening

  void make(boost::json::object opts = {}, int64_t tgt_size = 0) {
    src = file(image(image_size));
    fill(src, 0, image_size, 5);
    before = read_all(src);
    tgt = file(image(tgt_size ? tgt_size : image_size));
    cbw = s->open_with("copy-before-write", std::move(opts), {{"file", src}, {"target", tgt}});
    ASSERT_NE(cbw, nullptr);
    snap = s->open("snapshot-access", {}, cbw);
    ASSERT_NE(snap, nullptr);
  }
  int write(node* n, int64_t off, int64_t len, char byte) {
    std::vector<char> b(size_t(len), byte);
    return io(n, io_op::write, off, len, b.data());
  }
  std::vector<char> read(node* n, int64_t off, int64_t len, int* rc = nullptr) {
    std::vector<char> b(static_cast<size_t>(len));
    int r = io(n, io_op::read, off, len, b.data());
    if (rc) *rc = r;
    else EXPECT_EQ(r, 0);
    return b;
  }
  std::vector<char> old(int64_t off, int64_t len) const {
    return std::vector<char>(before.begin() + off, before.begin() + off + len);
  }
};

TEST_F(cbw_fixture, a_write_copies_the_old_data_of_its_chunks_first) {
  make();
  recorder on_tgt(tgt, false);
  ASSERT_EQ(write(cbw, 100 * K, 64 * K, 'x'), 0);
  // The guest's data is on the disk; the two 64 KiB chunks it touched went to the target first, as they were.
  EXPECT_EQ(read(src, 100 * K, 64 * K), std::vector<char>(64 * K, 'x'));
  EXPECT_EQ(read(tgt, 64 * K, 128 * K), old(64 * K, 128 * K));
  EXPECT_EQ(on_tgt.write_bytes, 128 * K);
  // Only the chunks it touched: the neighbours stay unwritten on the target.
  EXPECT_EQ(read(tgt, 0, 64 * K), std::vector<char>(64 * K, 0));
  // A second write there finds them copied already.
  ASSERT_EQ(write(cbw, 64 * K, 128 * K, 'y'), 0);
  EXPECT_EQ(on_tgt.write_bytes, 128 * K);
  // The view reads the moment of the opening: from the target where copied, from the disk elsewhere.
  EXPECT_EQ(read(snap, 0, image_size), before);
}

TEST_F(cbw_fixture, zero_writes_and_discards_copy_first_too) {
  make();
  ASSERT_EQ(io(cbw, io_op::write_zeroes, 1 * M, 256 * K), 0);
  EXPECT_EQ(read(src, 1 * M, 256 * K), std::vector<char>(256 * K, 0));
  EXPECT_EQ(read(tgt, 1 * M, 256 * K), old(1 * M, 256 * K));
  EXPECT_EQ(read(snap, 1 * M, 256 * K), old(1 * M, 256 * K));
}

TEST_F(cbw_fixture, the_view_is_read_only) {
  make();
  std::vector<char> b(4096, 'z');
  EXPECT_EQ(io(snap, io_op::write, 0, 4096, b.data()), -ENOTSUP);
  EXPECT_EQ(io(snap, io_op::write_zeroes, 0, 4096), -ENOTSUP);
  EXPECT_EQ(read(src, 0, 4096), old(0, 4096));
}

TEST_F(cbw_fixture, break_guest_write_fails_the_write_and_keeps_the_view) {
  // A target shorter than the disk: copies past its end fail.
  make({}, 1 * M);
  EXPECT_EQ(write(cbw, 2 * M, 64 * K, 'q'), -EINVAL);
  EXPECT_EQ(read(src, 2 * M, 64 * K), old(2 * M, 64 * K));  // the disk was not touched
  EXPECT_EQ(read(snap, 2 * M, 64 * K), old(2 * M, 64 * K));
  // Within the target all is well.
  EXPECT_EQ(write(cbw, 0, 64 * K, 'q'), 0);
  EXPECT_EQ(read(snap, 0, 64 * K), old(0, 64 * K));
}

TEST_F(cbw_fixture, break_snapshot_lets_the_write_go_and_breaks_the_view) {
  make({{"on-cbw-error", "break-snapshot"}}, 1 * M);
  EXPECT_EQ(read(snap, 2 * M, 64 * K), old(2 * M, 64 * K));
  EXPECT_EQ(write(cbw, 2 * M, 64 * K, 'q'), 0);
  EXPECT_EQ(read(src, 2 * M, 64 * K), std::vector<char>(64 * K, 'q'));
  int rc = 0;
  (void)read(snap, 0, 64 * K, &rc);
  EXPECT_EQ(rc, -EACCES);  // every read of the view fails from now on
  io_request st;
  EXPECT_EQ(io(snap, io_op::block_status, 0, 64 * K, nullptr, 0, &st), -EACCES);
  // Later writes are not copied any more (nothing would read them).
  recorder on_tgt(tgt, false);
  EXPECT_EQ(write(cbw, 0, 64 * K, 'r'), 0);
  EXPECT_EQ(on_tgt.write_bytes, 0);
}

TEST_F(cbw_fixture, cbw_timeout_bounds_the_copy) {
  make({{"cbw-timeout", 1}});
  recorder hold_tgt(tgt);
  hold_tgt.hold = true;  // the target never answers
  int64_t t0 = node::now_ns();
  EXPECT_EQ(write(cbw, 0, 64 * K, 'w'), -ETIMEDOUT);
  int64_t took = node::now_ns() - t0;
  EXPECT_GE(took, 900'000'000);
  EXPECT_LT(took, 5'000'000'000);
  EXPECT_EQ(read(src, 0, 64 * K), old(0, 64 * K));
  hold_tgt.release_all();  // the copy ends (late): the engine is idle again before the nodes go
  run_until([&] { return hold_tgt.active.empty(); });
  spin();
}

TEST_F(cbw_fixture, the_view_reports_block_status_of_where_it_reads) {
  make();
  ASSERT_EQ(write(cbw, 0, 64 * K, 'a'), 0);
  io_request st;
  ASSERT_EQ(io(snap, io_op::block_status, 0, image_size, nullptr, 0, &st), 0);
  EXPECT_TRUE(st.status & bs_data);
  EXPECT_TRUE(st.status & bs_allocated);  // copied: allocated in the view's own layer
  EXPECT_EQ(st.status_length, 64 * K);     // the copied chunk, then the disk's extent
}

}  // namespace
}  // namespace blockd::block

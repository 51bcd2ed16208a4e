// Unit tests for the NBD transmission codec: header parsing, QEMU's request checks, reply encodings; test thread.
#include <gtest/gtest.h>

#include "protocol/nbd/transmission.h"
#include "protocol/nbd/wire.h"

using namespace blockd::nbd;

namespace {
std::string header(reply_mode m, uint16_t flags, uint16_t type, uint64_t cookie, uint64_t off, uint64_t len) {
  std::string s;
  put32(s, m == reply_mode::extended ? extended_request_magic : request_magic);
  put16(s, flags);
  put16(s, type);
  put64(s, cookie);
  put64(s, off);
  if (m == reply_mode::extended) put64(s, len);
  else put32(s, uint32_t(len));
  return s;
}
const uint8_t* u(const std::string& s) { return reinterpret_cast<const uint8_t*>(s.data()); }
}  // namespace

TEST(NbdTransmission, ParsesCompactAndExtendedHeaders) {
  request r;
  size_t used = 0;
  auto h = header(reply_mode::structured, cf_fua, cmd_write, 7, 4096, 512);
  EXPECT_EQ(parse_status::need_more, parse_request(u(h), 27, reply_mode::structured, r, used));
  ASSERT_EQ(parse_status::ok, parse_request(u(h), h.size(), reply_mode::structured, r, used));
  EXPECT_EQ(28u, used);
  EXPECT_EQ(7u, r.cookie);
  EXPECT_EQ(512u, r.length);
  auto x = header(reply_mode::extended, 0, cmd_read, 9, 0, 1ull << 40);
  ASSERT_EQ(parse_status::ok, parse_request(u(x), x.size(), reply_mode::extended, r, used));
  EXPECT_EQ(32u, used);
  EXPECT_EQ(1ull << 40, r.length);
  // A compact header on an extended connection is a bad magic: the server hangs up.
  EXPECT_EQ(parse_status::bad_magic, parse_request(u(h), h.size(), reply_mode::extended, r, used));
}

// put_request writes back exactly the bytes a client sent (a handed-over client's half-read write).
TEST(NbdTransmission, PutRequestIsTheInverseOfParse) {
  for (auto m : {reply_mode::simple, reply_mode::structured, reply_mode::extended}) {
    uint64_t len = m == reply_mode::extended ? (1ull << 33) + 5 : 0xfffffff0u;
    auto h = header(m, cf_fua | cf_no_hole, cmd_write_zeroes, 0x0102030405060708ull, 0x1122334455667788ull, len);
    request r;
    size_t used = 0;
    ASSERT_EQ(parse_status::ok, parse_request(u(h), h.size(), m, r, used));
    std::string back;
    put_request(back, m, r);
    EXPECT_EQ(h, back);
  }
}

TEST(NbdTransmission, ChecksAsQemu) {
  export_state rw{1 << 20, false, reply_mode::structured};
  export_state ro{1 << 20, true, reply_mode::simple};
  auto chk = [](const request& r, const export_state& x) { return check_request(r, x); };
  EXPECT_EQ(0u, chk({0, cmd_read, 1, 0, 4096}, rw).error);
  EXPECT_EQ(0u, chk({cf_df, cmd_read, 1, 0, 4096}, rw).error);
  EXPECT_EQ(e_inval, chk({cf_df, cmd_read, 1, 0, 4096}, ro).error);  // DF needs structured replies
  auto w = chk({0, cmd_write, 1, 0, 4096}, ro);
  EXPECT_EQ(e_inval, w.error);
  EXPECT_EQ("Export is read-only", w.message);
  EXPECT_EQ(4096u, w.payload);
  EXPECT_FALSE(w.disconnect);
  auto big = chk({0, cmd_write, 1, 0, (32u << 20) + 1}, rw);
  EXPECT_TRUE(big.disconnect);
  EXPECT_EQ("len (33554433) is larger than max len (33554432)", big.message);
  auto eof = chk({0, cmd_write_zeroes, 1, (1 << 20) - 512, 1024}, rw);
  EXPECT_EQ("operation past EOF; From: 1048064, Len: 1024, Size: 1048576", eof.message);
  EXPECT_EQ(e_inval, chk({cf_req_one, cmd_trim, 1, 0, 512}, rw).error);
  EXPECT_EQ(0u, chk({cf_req_one, cmd_block_status, 1, 0, 512}, rw).error);
  EXPECT_EQ(0u, chk({cf_fast_zero | cf_no_hole | cf_fua, cmd_write_zeroes, 1, 0, 512}, rw).error);
  EXPECT_EQ(e_inval, chk({0, 42, 1, 0, 0}, rw).error);
  EXPECT_TRUE(chk({0, cmd_disc, 1, 0, 0}, rw).disc);
}

TEST(NbdTransmission, RepliesInEveryMode) {
  std::string s;
  put_done(s, reply_mode::simple, 5, 0);
  ASSERT_EQ(16u, s.size());
  EXPECT_EQ(simple_reply_magic, get32(u(s)));
  s.clear();
  put_error(s, reply_mode::structured, 5, 0, e_inval, "bad");
  ASSERT_EQ(20u + 6 + 3, s.size());
  EXPECT_EQ(rt_error, get16(u(s) + 6));
  EXPECT_EQ(reply_flag_done, get16(u(s) + 4));
  s.clear();
  put_done(s, reply_mode::extended, 5, 4096);
  ASSERT_EQ(32u, s.size());
  EXPECT_EQ(extended_reply_magic, get32(u(s)));
  s.clear();
  put_read_header(s, reply_mode::structured, 5, 4096, 512, true);
  ASSERT_EQ(28u, s.size());
  EXPECT_EQ(520u, get32(u(s) + 16));
  s.clear();
  put_block_status(s, reply_mode::structured, 5, 0, 0, {{4096, 0}, {8192, state_hole | state_zero}}, true);
  ASSERT_EQ(20u + 4 + 16, s.size());
  EXPECT_EQ(3u, get32(u(s) + 36));
  s.clear();
  put_block_status(s, reply_mode::extended, 5, 0, 1, {{1ull << 33, 2}}, true);
  ASSERT_EQ(32u + 8 + 16, s.size());
  EXPECT_EQ(rt_block_status_ext, get16(u(s) + 6));
  EXPECT_EQ(1u, get32(u(s) + 36));
  EXPECT_EQ(1ull << 33, get64(u(s) + 40));
}

TEST(NbdTransmission, BlockStatusPayload) {
  std::string p;
  put64(p, 4096);
  put32(p, 0);
  put32(p, 1);
  block_status_payload b;
  ASSERT_TRUE(parse_block_status_payload(u(p), p.size(), b));
  EXPECT_EQ(4096u, b.effect_length);
  EXPECT_EQ(2u, b.ids.size());
  EXPECT_FALSE(parse_block_status_payload(u(p), 7, b));
}

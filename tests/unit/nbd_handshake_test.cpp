// Unit tests for the NBD handshake state machine: every option's good and bad paths, byte by byte; test thread.
#include <gtest/gtest.h>

#include "protocol/nbd/handshake.h"
#include "protocol/nbd/wire.h"

using namespace blockd::nbd;

namespace {

struct catalog final : export_catalog {
  std::vector<export_view> v;
  const export_view* find(const std::string& n) const override {
    for (auto& e : v)
      if (e.name == n) return &e;
    return nullptr;
  }
  std::vector<const export_view*> all() const override {
    std::vector<const export_view*> out;
    for (auto& e : v) out.push_back(&e);
    return out;
  }
};

struct reply_t {
  uint32_t opt, type;
  std::string data;
};

// Drives a handshake with client bytes and splits what the server sent into option replies.
struct harness {
  catalog cat;
  handshake hs{cat, {}};
  std::string out, in;
  size_t pos = 0;

  harness() {
    export_view e;
    e.name = "disk";
    e.description = "a disk";
    e.size = 1 << 20;
    e.flags = tf_has_flags | tf_send_flush;
    e.min_block = 512;
    e.allocation_depth = true;
    e.bitmaps = {"b0"};
    cat.v.push_back(e);
    hs.start(out);
    EXPECT_EQ(18u, out.size());
    EXPECT_EQ(nbd_magic, get64(reinterpret_cast<const uint8_t*>(out.data())));
    out.clear();
  }
  void send(const std::string& b) {
    in += b;
    size_t used = hs.feed(reinterpret_cast<const uint8_t*>(in.data()), in.size(), out);
    in.erase(0, used);
  }
  void flags(uint32_t f) {
    std::string s;
    put32(s, f);
    send(s);
  }
  void option(uint32_t o, const std::string& payload) {
    std::string s;
    put64(s, opts_magic);
    put32(s, o);
    put32(s, uint32_t(payload.size()));
    send(s + payload);
  }
  std::vector<reply_t> replies() {
    std::vector<reply_t> r;
    const uint8_t* p = reinterpret_cast<const uint8_t*>(out.data());
    while (pos + 20 <= out.size()) {
      EXPECT_EQ(rep_magic, get64(p + pos));
      uint32_t len = get32(p + pos + 16);
      r.push_back({get32(p + pos + 8), get32(p + pos + 12), out.substr(pos + 20, len)});
      pos += 20 + len;
    }
    return r;
  }
};

std::string name_payload(const std::string& name, std::vector<uint16_t> infos) {
  std::string s;
  put32(s, uint32_t(name.size()));
  s += name;
  put16(s, uint16_t(infos.size()));
  for (auto i : infos) put16(s, i);
  return s;
}

std::string meta_payload(const std::string& name, std::vector<std::string> queries) {
  std::string s;
  put32(s, uint32_t(name.size()));
  s += name;
  put32(s, uint32_t(queries.size()));
  for (auto& q : queries) {
    put32(s, uint32_t(q.size()));
    s += q;
  }
  return s;
}

}  // namespace

TEST(NbdHandshake, UnknownClientFlagsClose) {
  harness h;
  h.flags(0x80);
  EXPECT_EQ(handshake::state::closed, h.hs.current());
  EXPECT_EQ("Unknown client flags 0x80 received", h.hs.close_reason());
}

TEST(NbdHandshake, NonFixedClientMayOnlyExportName) {
  harness h;
  h.flags(0);
  h.option(opt_list, "");
  EXPECT_EQ(handshake::state::closed, h.hs.current());
  EXPECT_TRUE(h.out.empty());
}

TEST(NbdHandshake, ExportNameWithAndWithoutZeroes) {
  for (uint32_t f : {flag_c_fixed_newstyle, flag_c_fixed_newstyle | flag_c_no_zeroes}) {
    harness h;
    h.flags(f);
    h.option(opt_export_name, "disk");
    EXPECT_EQ(handshake::state::transmission, h.hs.current());
    EXPECT_EQ((f & flag_c_no_zeroes) ? 10u : 134u, h.out.size());
    EXPECT_EQ(uint64_t(1 << 20), get64(reinterpret_cast<const uint8_t*>(h.out.data())));
  }
  harness h;
  h.flags(1);
  h.option(opt_export_name, "nope");
  EXPECT_EQ(handshake::state::closed, h.hs.current());
}

TEST(NbdHandshake, ListAndBytewiseFeeding) {
  harness h;
  std::string all;
  put32(all, 1);
  put64(all, opts_magic);
  put32(all, opt_list);
  put32(all, 0);
  for (char c : all) h.send(std::string(1, c));
  auto r = h.replies();
  ASSERT_EQ(2u, r.size());
  EXPECT_EQ(rep_server, r[0].type);
  EXPECT_EQ(std::string("\0\0\0\4diska disk", 14), r[0].data);
  EXPECT_EQ(rep_ack, r[1].type);
}

TEST(NbdHandshake, BadLengthsAndUnknownOptions) {
  harness h;
  h.flags(1);
  h.option(opt_list, "x");
  h.option(opt_structured_reply, "xy");
  h.option(99, "abc");
  h.option(opt_starttls, "");
  h.option(opt_info, std::string("\0\0\0\xff", 4));
  h.option(opt_info, std::string("\0\0\x20\x00", 4));
  auto r = h.replies();
  ASSERT_EQ(6u, r.size());
  EXPECT_EQ(rep_err_invalid, r[0].type);
  EXPECT_EQ("option 'list' has unexpected length", r[0].data);
  EXPECT_EQ(rep_err_invalid, r[1].type);
  EXPECT_EQ(rep_err_unsup, r[2].type);
  EXPECT_EQ("Unsupported option 99 (<unknown>)", r[2].data);
  EXPECT_EQ(rep_err_policy, r[3].type);
  EXPECT_EQ("TLS not configured", r[3].data);
  EXPECT_EQ("Inconsistent lengths in option info", r[4].data);
  EXPECT_EQ("Invalid name length: 8192", r[5].data);
  EXPECT_EQ(handshake::state::negotiating, h.hs.current());
}

TEST(NbdHandshake, HostileLengthsAreBounded) {
  harness h;
  h.flags(1);
  // Over the buffered limit: drained a byte at a time, then refused; nothing is buffered.
  std::string big(100000, 'a');
  h.option(opt_go, big);
  EXPECT_LE(h.in.size(), 16u);
  auto r = h.replies();
  ASSERT_EQ(1u, r.size());
  EXPECT_EQ(rep_err_too_big, r[0].type);
  // Over QEMU's hard cap: disconnect at the header.
  std::string s;
  put64(s, opts_magic);
  put32(s, opt_go);
  put32(s, 0xffffffffu);
  h.send(s);
  EXPECT_EQ(handshake::state::closed, h.hs.current());
}

TEST(NbdHandshake, InfoNeedsBlockSizeOnAlignedExport) {
  harness h;
  h.flags(1);
  h.option(opt_info, name_payload("disk", {}));
  auto r = h.replies();
  ASSERT_EQ(4u, r.size());  // description, block size, export, error
  EXPECT_EQ(rep_info, r[0].type);
  EXPECT_EQ(info_description, get16(reinterpret_cast<const uint8_t*>(r[0].data.data())));
  EXPECT_EQ(rep_err_block_size_reqd, r[3].type);
  h.option(opt_info, name_payload("nope", {}));
  r = h.replies();
  ASSERT_EQ(1u, r.size());
  EXPECT_EQ(rep_err_unknown, r[0].type);
  EXPECT_EQ("export 'nope' not present", r[0].data);
}

TEST(NbdHandshake, GoWithNameAndBlockSize) {
  harness h;
  h.flags(3);
  h.option(opt_structured_reply, "");
  h.option(opt_go, name_payload("disk", {info_name, info_block_size}));
  auto r = h.replies();
  ASSERT_EQ(6u, r.size());
  EXPECT_EQ(rep_ack, r[0].type);
  EXPECT_EQ(std::string("\0\1disk", 6), r[1].data);
  auto* bs = reinterpret_cast<const uint8_t*>(r[3].data.data());
  EXPECT_EQ(512u, get32(bs + 2));
  EXPECT_EQ(4096u, get32(bs + 6));
  auto* ex = reinterpret_cast<const uint8_t*>(r[4].data.data());
  EXPECT_EQ(tf_has_flags | tf_send_flush | tf_send_df, get16(ex + 10));
  EXPECT_EQ(rep_ack, r[5].type);
  EXPECT_EQ(handshake::state::transmission, h.hs.current());
  EXPECT_EQ(reply_mode::structured, h.hs.mode());
}

TEST(NbdHandshake, StructuredAndExtendedOrder) {
  harness h;
  h.flags(1);
  h.option(opt_extended_headers, "");
  h.option(opt_structured_reply, "");
  h.option(opt_extended_headers, "");
  auto r = h.replies();
  ASSERT_EQ(3u, r.size());
  EXPECT_EQ(rep_ack, r[0].type);
  EXPECT_EQ(rep_err_ext_header_reqd, r[1].type);
  EXPECT_EQ(rep_err_invalid, r[2].type);
  h.option(opt_export_name, "disk");  // not allowed once extended headers are on
  EXPECT_EQ(handshake::state::closed, h.hs.current());
}

TEST(NbdHandshake, MetaContexts) {
  harness h;
  h.flags(1);
  h.option(opt_set_meta_context, meta_payload("disk", {"base:allocation"}));
  auto r = h.replies();
  ASSERT_EQ(1u, r.size());
  EXPECT_EQ(rep_err_invalid, r[0].type);  // needs structured replies
  h.option(opt_list_meta_context, meta_payload("disk", {}));
  r = h.replies();
  ASSERT_EQ(4u, r.size());
  EXPECT_EQ("base:allocation", r[0].data.substr(4));
  EXPECT_EQ("qemu:allocation-depth", r[1].data.substr(4));
  EXPECT_EQ("qemu:dirty-bitmap:b0", r[2].data.substr(4));
  EXPECT_EQ(2u, get32(reinterpret_cast<const uint8_t*>(r[2].data.data())));
  h.option(opt_list_meta_context, meta_payload("disk", {"qemu:", "other:x", "base:"}));
  r = h.replies();
  ASSERT_EQ(4u, r.size());
  h.option(opt_structured_reply, "");
  h.option(opt_set_meta_context, meta_payload("disk", {"qemu:allocation-depth", "base:", "qemu:bogus"}));
  r = h.replies();
  ASSERT_EQ(3u, r.size());
  EXPECT_EQ("qemu:allocation-depth", r[1].data.substr(4));
  EXPECT_EQ(rep_ack, r[2].type);
  h.option(opt_go, name_payload("disk", {}));
  EXPECT_EQ(handshake::state::transmission, h.hs.current());
  EXPECT_TRUE(h.hs.contexts().allocation_depth);
  EXPECT_FALSE(h.hs.contexts().base_allocation);
}

TEST(NbdHandshake, AbortAcks) {
  harness h;
  h.flags(1);
  h.option(opt_abort, "");
  auto r = h.replies();
  ASSERT_EQ(1u, r.size());
  EXPECT_EQ(rep_ack, r[0].type);
  EXPECT_EQ(handshake::state::closed, h.hs.current());
}

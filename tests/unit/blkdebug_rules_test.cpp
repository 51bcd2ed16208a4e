// blkdebug's rule parsing (config file with hostile input, blockdev-add arrays) and rule engine (event, state, sector, iotype, once, errno); test thread.
#include <gtest/gtest.h>

#include <cerrno>
#include <random>
#include <string>

#include "formats/filters/blkdebug_rules.h"

namespace blockd::block {
namespace {

std::string parse_error(std::string_view text) {
  rule_set rs;
  auto r = parse_blkdebug_config(text, rs);
  return r ? "" : r.error().desc;
}

TEST(blkdebug_config, parses_both_groups) {
  rule_set rs;
  auto r = parse_blkdebug_config(
      "# a comment\n"
      "[inject-error]\n"
      "event = \"read_aio\"\n"
      "errno = \"28\"\n"
      "sector = \"8\"\n"
      "once = \"on\"\n"
      "immediately = \"yes\"\n"
      "iotype = \"write\"\n"
      "state = \"2\"\n"
      "\n"
      "[set-state]\n"
      "event = \"l2_load\"\n"
      "state = \"1\"\n"
      "new_state = \"2\"\n",
      rs);
  ASSERT_TRUE(r) << r.error().desc;
  ASSERT_EQ(rs.inject.size(), 1u);
  ASSERT_EQ(rs.set_state.size(), 1u);
  auto& i = rs.inject[0];
  EXPECT_EQ(i.event, blkdebug_event::read_aio);
  EXPECT_EQ(i.error, 28);
  EXPECT_EQ(i.offset, 8 * 512);
  EXPECT_TRUE(i.once);
  EXPECT_TRUE(i.immediately);
  EXPECT_EQ(i.iotypes, uint32_t(iot_write));
  EXPECT_EQ(i.state, 2);
  EXPECT_EQ(rs.set_state[0].event, blkdebug_event::l2_load);
  EXPECT_EQ(rs.set_state[0].state, 1);
  EXPECT_EQ(rs.set_state[0].new_state, 2);
}

TEST(blkdebug_config, defaults_are_qemus) {
  rule_set rs;
  ASSERT_TRUE(parse_blkdebug_config("[inject-error]\nevent = \"write_aio\"\n", rs));
  auto& i = rs.inject.at(0);
  EXPECT_EQ(i.error, EIO);
  EXPECT_EQ(i.offset, -1);
  EXPECT_FALSE(i.once);
  EXPECT_FALSE(i.immediately);
  EXPECT_EQ(i.iotypes, iot_default);
  EXPECT_FALSE(i.iotypes & iot_block_status);
  EXPECT_EQ(i.state, 0);
}

// The texts QSD 7.2 answers for the same files (probed by hand; the integration test compares live).
TEST(blkdebug_config, errors_carry_qemus_texts) {
  EXPECT_EQ(parse_error("garbage\n"), "no group defined");
  EXPECT_EQ(parse_error("event = \"read_aio\"\n"), "no group defined");
  EXPECT_EQ(parse_error("[bogus]\nevent = \"x\"\n"), "There is no option group 'bogus'");
  EXPECT_EQ(parse_error("[inject-error]\nfoo = \"1\"\n"), "Invalid parameter 'foo'");
  EXPECT_EQ(parse_error("[inject-error]\nevent = \"nosuch\"\n"), "invalid parameter value: nosuch");
  EXPECT_EQ(parse_error("[inject-error]\nevent = \"read_aio\"\nerrno = \"abc\"\n"), "Parameter 'errno' expects a number");
  EXPECT_EQ(parse_error("[inject-error]\nerrno = \"5\"\n"), "Missing event name for rule");
  EXPECT_EQ(parse_error("[inject-error]\nevent = \"read_aio\"\niotype = \"read,write\"\n"),
            "invalid parameter value: read,write");
  EXPECT_EQ(parse_error("[inject-error]\nevent = \"read_aio\"\nonce = \"maybe\"\n"),
            "Parameter 'once' expects 'on' or 'off'");
  EXPECT_EQ(parse_error("[inject-error]\n  event = \"read_aio\"\n\n# c\n   # indented\n"), "Invalid parameter '#'");
  EXPECT_EQ(parse_error("[inject-error]\nevent = read_aio\n"), "invalid parameter value: ");
  EXPECT_EQ(parse_error("[inject-error]\n   \n"), "parse error");
  EXPECT_EQ(parse_error("[set-state]\nevent = \"read_aio\"\nnew_state = \"x\"\n"),
            "Parameter 'new_state' expects a number");
  // Accepted as QEMU accepts them.
  EXPECT_EQ(parse_error("[set-state]\nevent = \"read_aio\"\n"), "");
  EXPECT_EQ(parse_error("[inject-error \"x\"]\nevent = \"read_aio\"\n"), "");
  EXPECT_EQ(parse_error("[inject-error]\nevent = \"read_aio\"\nsector = \"-3\"\n"), "");
  EXPECT_EQ(parse_error(""), "");
}

TEST(blkdebug_config, hostile_input_never_crashes) {
  // Long lines (read in 1023-byte pieces), NULs, unterminated quotes and groups, binary noise.
  std::string long_line = "[inject-error]\nevent = \"" + std::string(5000, 'a') + "\"\n";
  EXPECT_NE(parse_error(long_line), "");
  EXPECT_EQ(parse_error(std::string("[inject-error]\nevent = \"read_aio\"\0garbage\n", 42)), "");
  // No closing quote: the value runs to the end of the line, newline included (QSD answers the same).
  EXPECT_EQ(parse_error("[inject-error]\nevent = \"read_aio\n"), "invalid parameter value: read_aio\n");
  EXPECT_EQ(parse_error("[inject-error\nevent = \"read_aio\"\n"), "There is no option group 'inject-error\n'");
  EXPECT_EQ(parse_error("[]\nevent = \"read_aio\"\n"), "no group defined");
  EXPECT_EQ(parse_error("[inject-error]\nerrno = \"99999999999999999999999\"\nevent = \"read_aio\"\n"),
            "Parameter 'errno' expects a number");
  std::mt19937 rng(7);
  for (int round = 0; round < 2000; ++round) {
    std::string s;
    size_t n = rng() % 300;
    const char alphabet[] = "[]\"= \n#\t\r\0abcdeinjct-rorsaetvx0123456789_";
    for (size_t i = 0; i < n; ++i) s.push_back(alphabet[rng() % (sizeof(alphabet) - 1)]);
    rule_set rs;
    (void)parse_blkdebug_config(s, rs);
  }
}

TEST(blkdebug_config, unreadable_file) {
  rule_set rs;
  auto r = read_blkdebug_config("/nonexistent/blkdebug.cfg", rs);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().desc, "Could not read blkdebug config file: No such file or directory");
}

TEST(blkdebug_options, arrays_become_rules) {
  auto o = boost::json::parse(R"({"inject-error": [{"event": "read_aio", "errno": 28, "sector": -1, "once": true},
                                                   {"event": "l2_load", "iotype": "block-status"}],
                                  "set-state": [{"event": "flush_to_disk", "state": 3, "new_state": 4}]})").as_object();
  rule_set rs;
  ASSERT_TRUE(parse_blkdebug_options(o, rs));
  ASSERT_EQ(rs.inject.size(), 2u);
  EXPECT_EQ(rs.inject[0].error, 28);
  EXPECT_EQ(rs.inject[0].offset, -1);
  EXPECT_TRUE(rs.inject[0].once);
  EXPECT_EQ(rs.inject[1].iotypes, uint32_t(iot_block_status));
  ASSERT_EQ(rs.set_state.size(), 1u);
  EXPECT_EQ(rs.set_state[0].new_state, 4);
}

inject_rule rule(blkdebug_event e) {
  inject_rule r;
  r.event = e;
  return r;
}

TEST(blkdebug_engine, fires_only_after_its_event) {
  rule_set rs;
  rs.inject.push_back(rule(blkdebug_event::read_aio));
  blkdebug_engine en(rs);
  EXPECT_EQ(en.check(io_op::read, 0, 512).error, 0);  // no event yet
  en.event(blkdebug_event::write_aio);                 // another event
  EXPECT_EQ(en.check(io_op::read, 0, 512).error, 0);
  en.event(blkdebug_event::read_aio);
  EXPECT_EQ(en.check(io_op::read, 0, 512).error, -EIO);
  EXPECT_EQ(en.check(io_op::read, 0, 512).error, -EIO);  // stays active (not once)
  en.event(blkdebug_event::write_aio);  // an event without rules keeps the active set
  EXPECT_EQ(en.check(io_op::read, 0, 512).error, -EIO);
}

TEST(blkdebug_engine, iotype_sector_errno_once_immediately) {
  rule_set rs;
  auto r = rule(blkdebug_event::read_aio);
  r.iotypes = iot_write;
  r.offset = 8 * 512;
  r.error = ENOSPC;
  r.once = true;
  r.immediately = true;
  rs.inject.push_back(r);
  blkdebug_engine en(rs);
  en.event(blkdebug_event::read_aio);
  EXPECT_EQ(en.check(io_op::read, 4096, 512).error, 0);    // iotype read: not this rule's
  EXPECT_EQ(en.check(io_op::write, 0, 4096).error, 0);     // ends before sector 8
  EXPECT_EQ(en.check(io_op::write, 4097, 512).error, 0);   // starts after it
  EXPECT_EQ(en.check(io_op::flush, 0, 0).error, 0);        // iotype and no sector
  auto v = en.check(io_op::write, 0, 8192);
  EXPECT_EQ(v.error, -ENOSPC);
  EXPECT_TRUE(v.immediately);
  EXPECT_EQ(en.check(io_op::write, 0, 8192).error, 0);  // once: gone
  en.event(blkdebug_event::read_aio);
  EXPECT_EQ(en.check(io_op::write, 0, 8192).error, 0);  // and never comes back
}

TEST(blkdebug_engine, default_iotypes_leave_block_status_alone) {
  rule_set rs;
  rs.inject.push_back(rule(blkdebug_event::none));
  blkdebug_engine en(rs);
  en.event(blkdebug_event::none);
  for (io_op op : {io_op::read, io_op::write, io_op::write_zeroes, io_op::discard, io_op::flush})
    EXPECT_EQ(en.check(op, 0, 512).error, -EIO);
  EXPECT_EQ(en.check(io_op::block_status, 0, 512).error, 0);
}

TEST(blkdebug_engine, zero_errno_lets_requests_through) {
  rule_set rs;
  auto r = rule(blkdebug_event::read_aio);
  r.error = 0;
  rs.inject.push_back(r);
  rs.inject.push_back(rule(blkdebug_event::read_aio));  // would fail, but the first match decides
  blkdebug_engine en(rs);
  en.event(blkdebug_event::read_aio);
  EXPECT_EQ(en.check(io_op::read, 0, 512).error, 0);
}

TEST(blkdebug_engine, state_machine) {
  rule_set rs;
  auto r = rule(blkdebug_event::read_aio);
  r.state = 2;
  rs.inject.push_back(r);
  rs.set_state.push_back({blkdebug_event::read_aio, 1, 2});
  rs.set_state.push_back({blkdebug_event::flush_to_disk, 0, 1});  // any state back to 1
  blkdebug_engine en(rs);
  EXPECT_EQ(en.state(), 1);
  en.event(blkdebug_event::read_aio);  // found state 1: the inject rule (state 2) stays inactive
  EXPECT_EQ(en.state(), 2);
  EXPECT_EQ(en.check(io_op::read, 0, 512).error, 0);
  en.event(blkdebug_event::read_aio);  // state 2: fires; no set-state rule for state 2
  EXPECT_EQ(en.state(), 2);
  EXPECT_EQ(en.check(io_op::read, 0, 512).error, -EIO);
  en.event(blkdebug_event::flush_to_disk);
  EXPECT_EQ(en.state(), 1);
}

TEST(blkdebug_engine, a_new_injection_replaces_the_active_set) {
  rule_set rs;
  auto a = rule(blkdebug_event::read_aio);
  a.iotypes = iot_read;
  auto b = rule(blkdebug_event::write_aio);
  b.iotypes = iot_write;
  rs.inject = {a, b};
  blkdebug_engine en(rs);
  en.event(blkdebug_event::read_aio);
  EXPECT_EQ(en.check(io_op::read, 0, 512).error, -EIO);
  en.event(blkdebug_event::write_aio);
  EXPECT_EQ(en.check(io_op::read, 0, 512).error, 0);
  EXPECT_EQ(en.check(io_op::write, 0, 512).error, -EIO);
}

}  // namespace
}  // namespace blockd::block

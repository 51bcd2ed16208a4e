// QMP event rate limiting (QEMU's monitor rule for QUORUM_* events): keys, first-sent, last-held; test thread.
#include <gtest/gtest.h>

#include "protocol/qmp/event_throttle.h"

namespace blockd::qmp {
namespace {

TEST(event_throttle, keys_follow_qemus_monitor) {
  EXPECT_EQ(event_throttle::key_of("QUORUM_FAILURE", {{"reference", "q"}}), "QUORUM_FAILURE");
  EXPECT_EQ(event_throttle::key_of("QUORUM_REPORT_BAD", {{"node-name", "c1"}}), "QUORUM_REPORT_BAD/c1");
  EXPECT_NE(event_throttle::key_of("QUORUM_REPORT_BAD", {{"node-name", "c1"}}),
            event_throttle::key_of("QUORUM_REPORT_BAD", {{"node-name", "c2"}}));
  EXPECT_FALSE(event_throttle::key_of("BLOCK_JOB_COMPLETED", {}));
  EXPECT_FALSE(event_throttle::key_of("BLOCK_IO_ERROR", {}));  // not limited in 7.2
}

TEST(event_throttle, the_first_goes_out_the_last_held_follows_then_the_key_frees) {
  event_throttle t;
  std::map<std::string, std::optional<int>> st;
  EXPECT_TRUE(t.offer("k", 1, st));
  EXPECT_FALSE(t.offer("k", 2, st));
  EXPECT_FALSE(t.offer("k", 3, st));
  EXPECT_TRUE(t.offer("other", 9, st)) << "keys are independent";
  EXPECT_EQ(t.expire("k", st), 3) << "only the newest held event is sent";
  EXPECT_FALSE(t.offer("k", 4, st)) << "a new period started with the held event";
  EXPECT_EQ(t.expire("k", st), 4);
  EXPECT_EQ(t.expire("k", st), std::nullopt);
  EXPECT_TRUE(t.offer("k", 5, st)) << "a quiet period frees the key";
}

}  // namespace
}  // namespace blockd::qmp

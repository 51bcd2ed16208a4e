// Unit tests for storage/io/reactor: both backends, sockets, pipes, files, timeouts, cancel; test thread only.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>
#include <functional>
#include <string>

#include "storage/io/reactor.h"

using blockd::io::completion;
using blockd::io::reactor;

namespace {

struct recorder final : completion {
  int calls = 0;
  int result = 0;
  std::function<void(int)> then;
  void complete(int res) override {
    ++calls;
    result = res;
    if (then) then(res);
  }
};

std::unique_ptr<reactor> make(bool poll) {
  if (poll) return reactor::create_poll();
  std::string note;
  return reactor::create(64, &note);
}

void run_until(reactor& r, const recorder& c) {
  for (int i = 0; i < 1000 && c.calls == 0; ++i) r.run_once(true);
}

class ReactorTest : public ::testing::TestWithParam<bool> {};

TEST_P(ReactorTest, SocketSendRecvCompletesOnceAndAsynchronously) {
  auto r = make(GetParam());
  int sv[2];
  ASSERT_EQ(0, ::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv));
  char in[16] = {};
  recorder rc, sc;
  r->recv(sv[0], in, sizeof in, &rc);
  r->send(sv[1], "hello", 5, &sc);
  EXPECT_EQ(0, rc.calls);  // never completed inside the queueing call
  EXPECT_EQ(0, sc.calls);
  run_until(*r, rc);
  run_until(*r, sc);
  EXPECT_EQ(1, rc.calls);
  EXPECT_EQ(5, rc.result);
  EXPECT_EQ(1, sc.calls);
  EXPECT_EQ(5, sc.result);
  EXPECT_EQ(0, std::memcmp(in, "hello", 5));
  EXPECT_EQ(0u, r->in_flight());
  ::close(sv[0]);
  ::close(sv[1]);
}

TEST_P(ReactorTest, PeerCloseGivesZeroByteRecv) {
  auto r = make(GetParam());
  int sv[2];
  ASSERT_EQ(0, ::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv));
  char in[4];
  recorder rc;
  r->recv(sv[0], in, sizeof in, &rc);
  ::close(sv[1]);
  run_until(*r, rc);
  EXPECT_EQ(0, rc.result);
  ::close(sv[0]);
}

TEST_P(ReactorTest, CancelPendingRecv) {
  auto r = make(GetParam());
  int sv[2];
  ASSERT_EQ(0, ::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv));
  char in[4];
  recorder rc;
  r->recv(sv[0], in, sizeof in, &rc);
  r->run_once(false);
  r->cancel(&rc);
  run_until(*r, rc);
  EXPECT_EQ(1, rc.calls);
  EXPECT_EQ(-ECANCELED, rc.result);
  for (int i = 0; i < 10; ++i) r->run_once(false);
  EXPECT_EQ(1, rc.calls);
  ::close(sv[0]);
  ::close(sv[1]);
}

TEST_P(ReactorTest, TimeoutFires) {
  auto r = make(GetParam());
  recorder tc;
  r->timeout(1000000, &tc);  // 1 ms
  run_until(*r, tc);
  EXPECT_EQ(1, tc.calls);
  EXPECT_EQ(0, tc.result);
}

TEST_P(ReactorTest, PositionedFileWriteThenRead) {
  auto r = make(GetParam());
  char path[] = "/tmp/blockd-reactor-XXXXXX";
  int fd = ::mkstemp(path);
  ASSERT_GE(fd, 0);
  ::unlink(path);
  recorder wc;
  r->write(fd, "abcdef", 6, 4096, &wc);
  run_until(*r, wc);
  EXPECT_EQ(6, wc.result);
  char buf[6] = {};
  recorder rc;
  r->read(fd, buf, 6, 4096, &rc);
  run_until(*r, rc);
  EXPECT_EQ(6, rc.result);
  EXPECT_EQ(0, std::memcmp(buf, "abcdef", 6));
  ::close(fd);
}

TEST_P(ReactorTest, AcceptDeliversConnectedSocket) {
  auto r = make(GetParam());
  int l = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(0, ::bind(l, reinterpret_cast<sockaddr*>(&a), sizeof a));
  ASSERT_EQ(0, ::listen(l, 4));
  socklen_t len = sizeof a;
  ::getsockname(l, reinterpret_cast<sockaddr*>(&a), &len);
  recorder ac;
  r->accept(l, &ac);
  int c = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  ASSERT_EQ(0, ::connect(c, reinterpret_cast<sockaddr*>(&a), sizeof a));
  run_until(*r, ac);
  ASSERT_GE(ac.result, 0);
  ::close(ac.result);
  ::close(c);
  ::close(l);
}

TEST_P(ReactorTest, ManyOperationsBeyondRingSizeAllComplete) {
  auto r = make(GetParam());
  int sv[2];
  ASSERT_EQ(0, ::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv));
  constexpr int n = 300;  // more than the 64-entry ring: the overflow list must carry the rest
  std::vector<recorder> done(n);
  for (int i = 0; i < n; ++i) r->send(sv[1], "x", 1, &done[i]);
  // Each tiny send costs a socket buffer slot, so the reader must keep draining for all to finish.
  char buf[n];
  size_t got = 0;
  for (int turn = 0; turn < 100000 && (r->in_flight() > 0 || got < n); ++turn) {
    r->run_once(false);
    ssize_t k = ::recv(sv[0], buf, sizeof buf, MSG_DONTWAIT);
    if (k > 0) got += static_cast<size_t>(k);
  }
  for (auto& d : done) EXPECT_EQ(1, d.calls);
  EXPECT_EQ(static_cast<size_t>(n), got);
  ::close(sv[0]);
  ::close(sv[1]);
}

INSTANTIATE_TEST_SUITE_P(Backends, ReactorTest, ::testing::Values(false, true),
                         [](const auto& info) { return info.param ? "poll" : "uring"; });

}  // namespace

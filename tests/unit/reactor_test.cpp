// Unit tests for storage/io/reactor: both backends, sockets, pipes, files (and the poll backend's file workers), timeouts, cancel; test thread.
#include <arpa/inet.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <future>
#include <linux/falloc.h>
#include <linux/userfaultfd.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <functional>
#include <string>
#include <thread>
#include <vector>

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

int temp_file() {
  char path[] = "/tmp/blockd-reactor-XXXXXX";
  int fd = ::mkstemp(path);
  if (fd >= 0) ::unlink(path);
  return fd;
}

TEST_P(ReactorTest, FileOperationsCompleteOnceOnTheLoopAndCountInFlight) {
  auto r = make(GetParam());
  int fd = temp_file();
  ASSERT_GE(fd, 0);
  char a[] = "hello ", b[] = "world";
  iovec out[2] = {{a, 6}, {b, 5}};
  recorder wc, ac, sc;
  r->writev(fd, out, 2, 512, &wc);
  r->fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, 1 << 20, &ac);
  r->fsync(fd, true, &sc);
  EXPECT_EQ(0, wc.calls + ac.calls + sc.calls) << "completed inside the queueing call";
  EXPECT_EQ(3u, r->in_flight());
  for (int i = 0; i < 1000 && r->in_flight() > 0; ++i) r->run_once(true);
  EXPECT_EQ(0u, r->in_flight());
  EXPECT_EQ(1, wc.calls);
  EXPECT_EQ(11, wc.result);
  EXPECT_EQ(1, ac.calls);
  EXPECT_TRUE(ac.result == 0 || ac.result == -EOPNOTSUPP) << ac.result;
  EXPECT_EQ(1, sc.calls);
  EXPECT_EQ(0, sc.result);
  char x[6] = {}, y[5] = {};
  iovec in[2] = {{x, 6}, {y, 5}};
  recorder rc;
  r->readv(fd, in, 2, 512, &rc);
  EXPECT_EQ(1u, r->in_flight());
  run_until(*r, rc);
  EXPECT_EQ(11, rc.result);
  EXPECT_EQ(0, std::memcmp(x, "hello ", 6));
  EXPECT_EQ(0, std::memcmp(y, "world", 5));
  recorder bad;
  r->readv(-1, in, 2, 0, &bad);  // errors come back as -errno, on the loop as well
  run_until(*r, bad);
  EXPECT_EQ(-EBADF, bad.result);
  ::close(fd);
}

// run_here (memory-backed files): the call is made at once, but its completion still comes on a
// later turn of the loop, counted in flight until then, like every other operation.
TEST_P(ReactorTest, RunHereFileOperationsCompleteOnTheNextTurn) {
  auto r = make(GetParam());
  int fd = temp_file();
  ASSERT_GE(fd, 0);
  char a[] = "in place";
  iovec out[1] = {{a, 8}};
  recorder wc;
  r->writev(fd, out, 1, 4096, &wc, true);
  EXPECT_EQ(0, wc.calls) << "completed inside the queueing call";
  EXPECT_EQ(1u, r->in_flight());
  char back[8] = {};
  EXPECT_EQ(8, ::pread(fd, back, 8, 4096)) << "the write was not made by the call itself";
  EXPECT_EQ(0, std::memcmp(back, "in place", 8));
  run_until(*r, wc);
  EXPECT_EQ(1, wc.calls);
  EXPECT_EQ(8, wc.result);
  EXPECT_EQ(0u, r->in_flight());
  char x[8] = {};
  iovec in[1] = {{x, 8}};
  recorder rc, bad;
  r->readv(fd, in, 1, 4096, &rc, true);
  r->readv(-1, in, 1, 0, &bad, true);
  run_until(*r, rc);
  run_until(*r, bad);
  EXPECT_EQ(8, rc.result);
  EXPECT_EQ(0, std::memcmp(x, "in place", 8));
  EXPECT_EQ(-EBADF, bad.result);
  EXPECT_EQ(1, bad.calls);
  ::close(fd);
}

TEST_P(ReactorTest, ManyFileOperationsAllCompleteWithTheirOwnResults) {
  auto r = make(GetParam());
  int fd = temp_file();
  ASSERT_GE(fd, 0);
  constexpr int n = 500;  // beyond the ring, and far more than the poll backend's workers
  std::vector<std::vector<char>> bufs(n);
  std::vector<recorder> done(n);
  for (int i = 0; i < n; ++i) {
    bufs[i].assign(size_t(100 + i), char('a' + i % 26));
    r->write(fd, bufs[i].data(), bufs[i].size(), int64_t(i) * 4096, &done[i]);
  }
  EXPECT_EQ(size_t(n), r->in_flight());
  for (int i = 0; i < 100000 && r->in_flight() > 0; ++i) r->run_once(true);
  for (int i = 0; i < n; ++i) {
    EXPECT_EQ(1, done[i].calls) << i;
    EXPECT_EQ(100 + i, done[i].result) << i;
  }
  std::vector<char> back(600);
  for (int i : {0, 77, 499}) {
    ASSERT_EQ(ssize_t(100 + i), ::pread(fd, back.data(), size_t(100 + i), int64_t(i) * 4096));
    EXPECT_EQ(0, std::memcmp(back.data(), bufs[i].data(), size_t(100 + i)));
  }
  ::close(fd);
}

TEST_P(ReactorTest, CancelledFileOperationsCompleteExactlyOnce) {
  auto r = make(GetParam());
  int fd = temp_file();
  ASSERT_GE(fd, 0);
  constexpr int n = 64;
  char buf[512] = {};
  std::vector<recorder> done(n);
  for (int i = 0; i < n; ++i) r->write(fd, buf, sizeof buf, int64_t(i) * 512, &done[i]);
  // Best effort: a withdrawn operation reports -ECANCELED, one already running its real result.
  r->cancel(&done[5]);
  r->run_once(false);
  r->cancel(&done[40]);
  r->cancel(&done[63]);
  for (int i = 0; i < 10000 && r->in_flight() > 0; ++i) r->run_once(true);
  EXPECT_EQ(0u, r->in_flight());
  for (int i = 0; i < n; ++i) {
    EXPECT_EQ(1, done[i].calls) << i;
    bool cancelled = i == 5 || i == 40 || i == 63;
    if (cancelled)
      EXPECT_TRUE(done[i].result == 512 || done[i].result == -ECANCELED) << i << ": " << done[i].result;
    else
      EXPECT_EQ(512, done[i].result) << i;
  }
  for (int i = 0; i < 10; ++i) r->run_once(false);
  for (auto& d : done) EXPECT_EQ(1, d.calls);
  ::close(fd);
}

TEST_P(ReactorTest, DestroyedWithFileOperationsPending) {
  int fd = temp_file();
  ASSERT_GE(fd, 0);
  constexpr int n = 200;
  std::vector<char> buf(65536, 'z');  // outlives the reactor, as a driver's buffers do
  std::vector<recorder> done(n);
  {
    auto r = make(GetParam());
    for (int i = 0; i < n; ++i) r->write(fd, buf.data(), buf.size(), int64_t(i) * 65536, &done[i]);
    r->run_once(false);  // some are with the kernel or a worker now, the rest still queued
  }
  for (auto& d : done) EXPECT_LE(d.calls, 1);
  ::close(fd);
}

TEST_P(ReactorTest, OffloadedCallRunsOffTheLoopWhileTimersFire) {
  auto r = make(GetParam());
  std::promise<void> release;
  auto released = release.get_future().share();
  auto loop_thread = std::this_thread::get_id();
  std::atomic<bool> ran_elsewhere{false};
  recorder call, tick;
  r->offload(
      [&, released] {
        ran_elsewhere = std::this_thread::get_id() != loop_thread;
        released.wait();  // a block-device ioctl taking its time
        return 42;
      },
      &call);
  EXPECT_EQ(r->in_flight(), 1u);
  r->timeout(1000000, &tick);
  run_until(*r, tick);
  EXPECT_EQ(tick.calls, 1) << "the loop kept running while the call blocked";
  EXPECT_EQ(call.calls, 0);
  release.set_value();
  run_until(*r, call);
  EXPECT_EQ(call.calls, 1);
  EXPECT_EQ(call.result, 42);
  EXPECT_TRUE(ran_elsewhere);
  EXPECT_EQ(r->in_flight(), 0u);
}

TEST_P(ReactorTest, ManyOffloadedCallsCompleteOnceWithTheirResults) {
  auto r = make(GetParam());
  std::vector<recorder> rs(100);
  for (int i = 0; i < 100; ++i) r->offload([i] { return i % 7 == 0 ? -EIO : i; }, &rs[size_t(i)]);
  for (int k = 0; k < 10000 && r->in_flight() > 0; ++k) r->run_once(true);
  for (int i = 0; i < 100; ++i) {
    EXPECT_EQ(rs[size_t(i)].calls, 1);
    EXPECT_EQ(rs[size_t(i)].result, i % 7 == 0 ? -EIO : i);
  }
}

INSTANTIATE_TEST_SUITE_P(Backends, ReactorTest, ::testing::Values(false, true),
                         [](const auto& info) { return info.param ? "poll" : "uring"; });

}  // namespace

namespace {

// A page whose first touch stops the touching thread until the test lets it go (userfaultfd): a
// file read into it blocks in the kernel for as long as the test wants, deterministically.
struct stalling_page {
  int uffd = -1;
  char* mem = nullptr;
  size_t size = size_t(sysconf(_SC_PAGESIZE));
  std::string why_not;

  stalling_page() {
    uffd = int(::syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK));
    if (uffd < 0) {
      why_not = std::string("userfaultfd unavailable: ") + std::strerror(errno);
      return;
    }
    uffdio_api api{.api = UFFD_API, .features = 0, .ioctls = 0};
    if (ioctl(uffd, UFFDIO_API, &api) != 0) {
      why_not = std::string("UFFDIO_API: ") + std::strerror(errno);
      return;
    }
    void* m = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) {
      why_not = "mmap failed";
      return;
    }
    mem = static_cast<char*>(m);
    uffdio_register reg{};
    reg.range = {reinterpret_cast<uintptr_t>(mem), size};
    reg.mode = UFFDIO_REGISTER_MODE_MISSING;
    if (ioctl(uffd, UFFDIO_REGISTER, &reg) != 0) why_not = std::string("UFFDIO_REGISTER: ") + std::strerror(errno);
  }
  ~stalling_page() {
    if (mem) munmap(mem, size);
    if (uffd >= 0) ::close(uffd);
  }
  // Waits (up to `ms`) until some thread faults on the page.
  bool wait_fault(int ms) {
    pollfd p{uffd, POLLIN, 0};
    if (::poll(&p, 1, ms) != 1) return false;
    uffd_msg msg{};
    return ::read(uffd, &msg, sizeof msg) == ssize_t(sizeof msg) && msg.event == UFFD_EVENT_PAGEFAULT;
  }
  // Maps a zero page in; the stalled thread goes on.
  void release() {
    std::vector<char> zeros(size, 0);
    uffdio_copy c{};
    c.dst = reinterpret_cast<uintptr_t>(mem);
    c.src = reinterpret_cast<uintptr_t>(zeros.data());
    c.len = size;
    ioctl(uffd, UFFDIO_COPY, &c);
  }
};

// The poll backend's reason for its workers: a file operation that blocks in the kernel must not
// stop the loop. Here a read stalls on a page fault while the loop keeps running timers; a cancel
// of the running read changes nothing, and it completes once, with its real result.
TEST(PollReactor, BlockedFileOperationDoesNotStallTheLoop) {
  stalling_page page;
  if (!page.why_not.empty()) GTEST_SKIP() << page.why_not;
  auto r = reactor::create_poll();
  int fd = temp_file();
  ASSERT_GE(fd, 0);
  ASSERT_EQ(6, ::pwrite(fd, "abcdef", 6, 0));
  // The helper lets the page go once the loop has shown it still runs (or after 5 s, so a loop that
  // waits for the read fails the test instead of hanging it).
  std::atomic<bool> faulted{false}, timer_fired{false};
  std::thread helper([&] {
    faulted = page.wait_fault(5000);
    for (int i = 0; i < 500 && !timer_fired; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
    page.release();
  });
  recorder rc, tc;
  r->read(fd, page.mem, 6, 0, &rc);
  r->run_once(false);  // hands it to a worker, which faults on the page and stops there
  for (int i = 0; i < 500 && !faulted; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  EXPECT_TRUE(faulted) << "the read never touched the page";
  r->timeout(1000000, &tc);  // 1 ms
  run_until(*r, tc);
  timer_fired = true;
  EXPECT_EQ(1, tc.calls);
  EXPECT_EQ(0, rc.calls) << "the loop waited for a blocked file read";
  EXPECT_EQ(rc.calls == 0 ? 1u : 0u, r->in_flight());
  r->cancel(&rc);  // running in a worker: best effort means it still finishes with its real result
  helper.join();
  run_until(*r, rc);
  EXPECT_EQ(1, rc.calls);
  EXPECT_EQ(6, rc.result);
  EXPECT_EQ(0, std::memcmp(page.mem, "abcdef", 6));
  EXPECT_EQ(0u, r->in_flight());
  ::close(fd);
}

}  // namespace

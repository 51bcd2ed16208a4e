// Actor-tier tests of exports as graph roots: an export re-pointed to another node moves its live NBD clients there; test thread.
#include <caf/all.hpp>
#include <gtest/gtest.h>

#include <arpa/inet.h>
#include <fcntl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>
#include <endian.h>
#include <string>

#include "actors/runtime/pinned.h"
#include "actors/supervisor/supervisor.h"
#include "tests/actors/supervisor_harness.h"

using namespace blockd;

namespace {

// Just enough of an NBD client (fixed newstyle, NBD_OPT_EXPORT_NAME, simple replies) to read.
struct mini_nbd_client {
  int fd = -1;
  uint64_t handle = 0;

  bool full(void* p, size_t n, bool rd) {
    auto* b = static_cast<char*>(p);
    while (n) {
      ssize_t r = rd ? ::read(fd, b, n) : ::write(fd, b, n);
      if (r <= 0) return false;
      b += r;
      n -= size_t(r);
    }
    return true;
  }
  bool connect(const std::string& path, const std::string& name) {
    fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    std::strncpy(a.sun_path, path.c_str(), sizeof(a.sun_path) - 1);
    if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) return false;
    char greet[18];
    if (!full(greet, sizeof greet, true) || std::memcmp(greet, "NBDMAGICIHAVEOPT", 16) != 0) return false;
    uint32_t cflags = htobe32(1 | 2);  // fixed newstyle, no zeroes
    if (!full(&cflags, 4, false)) return false;
    uint64_t magic = htobe64(0x49484156454F5054ull);
    uint32_t opt = htobe32(1), len = htobe32(uint32_t(name.size()));
    if (!full(&magic, 8, false) || !full(&opt, 4, false) || !full(&len, 4, false) ||
        !full(const_cast<char*>(name.data()), name.size(), false))
      return false;
    char info[10];  // size and transmission flags
    return full(info, sizeof info, true);
  }
  // Reads `n` bytes at `off`; the error field of the reply, or -1 on a broken connection.
  int read(uint64_t off, uint32_t n, std::string& out) {
    char req[28];
    uint32_t m = htobe32(0x25609513);
    uint16_t flags = 0, type = 0;
    uint64_t h = ++handle, o = htobe64(off);
    uint32_t l = htobe32(n);
    std::memcpy(req, &m, 4);
    std::memcpy(req + 4, &flags, 2);
    std::memcpy(req + 6, &type, 2);
    std::memcpy(req + 8, &h, 8);
    std::memcpy(req + 16, &o, 8);
    std::memcpy(req + 24, &l, 4);
    if (!full(req, sizeof req, false)) return -1;
    char rep[16];
    if (!full(rep, sizeof rep, true)) return -1;
    uint32_t err;
    std::memcpy(&err, rep + 4, 4);
    err = be32toh(err);
    if (err) return int(err);
    out.assign(n, '\0');
    return full(out.data(), n, true) ? 0 : -1;
  }
  ~mini_nbd_client() {
    if (fd >= 0) ::close(fd);
  }
};

struct export_root : ::testing::Test {
  caf::actor_system_config cfg;
  std::unique_ptr<caf::actor_system> sys;
  std::unique_ptr<iothread> main_io;
  caf::actor sup;
  std::string dir;

  void SetUp() override {
    cfg.set("scheduler.max-threads", size_t(1));
    sys = std::make_unique<caf::actor_system>(cfg);
    main_io = std::make_unique<iothread>(*sys, "main", iothread_params{});
    sup = spawn_pinned<supervisor_actor>(*sys, *main_io, supervisor_hooks{});
    char tmpl[] = "/dev/shm/blockd-root-XXXXXX";
    dir = mkdtemp(tmpl);
    caf::scoped_actor self{*sys};
    self->send(sup, ready_atom::value);  // the command line is applied: serve clients
  }
  void TearDown() override {
    test::stop_supervisor(*sys, sup);
    main_io.reset();
    sys.reset();
    std::string cmd = "rm -rf " + dir;
    EXPECT_EQ(0, system(cmd.c_str()));
  }
  command_outcome cmd(const std::string& name, boost::json::object args) {
    return test::sup_command(*sys, sup, name, std::move(args));
  }
  void ok(const std::string& name, boost::json::object args) {
    auto o = cmd(name, std::move(args));
    ASSERT_TRUE(o.ok) << name << ": " << o.err.desc;
  }
  command_outcome repoint(const std::string& exp, const std::string& node) {
    caf::scoped_actor self{*sys};
    command_outcome out = command_outcome::failure(error("no reply"));
    self->request(sup, std::chrono::seconds(10), repoint_atom::value, exp, node)
        .receive([&](const command_outcome& o) { out = o; }, [](caf::error& e) { FAIL() << caf::to_string(e); });
    return out;
  }
  std::string image(const std::string& name, char fill) {
    std::string p = dir + "/" + name;
    int fd = ::open(p.c_str(), O_CREAT | O_RDWR | O_CLOEXEC, 0600);
    std::string data(1 << 16, fill);
    EXPECT_EQ(ssize_t(data.size()), ::pwrite(fd, data.data(), data.size(), 0));
    ::close(fd);
    return p;
  }
  boost::json::value exports() { return cmd("query-block-exports", {}).ret; }
};

TEST_F(export_root, a_repointed_export_serves_its_connected_client_from_the_new_node) {
  ok("blockdev-add", {{"driver", "file"}, {"node-name", "a"}, {"filename", image("a.img", 'A')}});
  ok("blockdev-add", {{"driver", "file"}, {"node-name", "b"}, {"filename", image("b.img", 'B')}});
  std::string sock = dir + "/nbd.sock";
  ok("nbd-server-start", {{"addr", {{"type", "unix"}, {"data", {{"path", sock}}}}}});
  ok("block-export-add", {{"type", "nbd"}, {"id", "e0"}, {"node-name", "a"}, {"name", "disk"}});
  mini_nbd_client c;
  ASSERT_TRUE(c.connect(sock, "disk"));
  std::string got;
  ASSERT_EQ(0, c.read(0, 4096, got));
  EXPECT_EQ(std::string(4096, 'A'), got);

  auto r = repoint("e0", "b");
  ASSERT_TRUE(r.ok) << r.err.desc;
  // The same connection now reads the other node, and the export reports it.
  ASSERT_EQ(0, c.read(0, 4096, got));
  EXPECT_EQ(std::string(4096, 'B'), got);
  EXPECT_EQ("b", exports().as_array().at(0).at("node-name").as_string());
  // The old node has no user left and can go; the new one is in use by the export.
  ok("blockdev-del", {{"node-name", "a"}});
  auto del = cmd("blockdev-del", {{"node-name", "b"}});
  EXPECT_FALSE(del.ok);
  EXPECT_EQ("Node b is in use", del.err.desc);
  ASSERT_EQ(0, c.read(8192, 512, got));
  EXPECT_EQ(std::string(512, 'B'), got);
}

TEST_F(export_root, a_refused_repoint_leaves_the_export_where_it_was) {
  ok("blockdev-add", {{"driver", "file"}, {"node-name", "a"}, {"filename", image("a.img", 'A')}});
  ok("blockdev-add", {{"driver", "file"}, {"node-name", "ro"}, {"filename", image("b.img", 'B')}, {"read-only", true}});
  std::string sock = dir + "/nbd.sock";
  ok("nbd-server-start", {{"addr", {{"type", "unix"}, {"data", {{"path", sock}}}}}});
  ok("block-export-add", {{"type", "nbd"}, {"id", "e0"}, {"node-name", "a"}, {"name", "disk"}, {"writable", true}});
  mini_nbd_client c;
  ASSERT_TRUE(c.connect(sock, "disk"));
  // A writable export cannot move onto a read-only node: the write permission is refused.
  auto r = repoint("e0", "ro");
  EXPECT_FALSE(r.ok);
  EXPECT_EQ("a", exports().as_array().at(0).at("node-name").as_string());
  std::string got;
  ASSERT_EQ(0, c.read(0, 4096, got));
  EXPECT_EQ(std::string(4096, 'A'), got);
  EXPECT_FALSE(repoint("nope", "a").ok);
  EXPECT_FALSE(repoint("e0", "nope").ok);
}

}  // namespace

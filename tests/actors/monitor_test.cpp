// Actor-tier tests of monitor + supervisor over socketpairs: negotiation, event broadcast, ordering, close.
#include <caf/all.hpp>
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <unistd.h>

#include <boost/json.hpp>
#include <string>

#include "actors/messages.h"
#include "actors/runtime/iothread.h"
#include "actors/runtime/pinned.h"
#include "actors/supervisor/supervisor.h"
#include "tests/actors/supervisor_harness.h"

using namespace blockd;

namespace {

// The test's end of a monitor connection: blocking reads of CRLF-terminated messages.
struct peer {
  int fd = -1;
  std::string buf;
  boost::json::value next() {
    for (;;) {
      auto pos = buf.find("\r\n");
      if (pos != std::string::npos) {
        auto v = boost::json::parse(buf.substr(0, pos));
        buf.erase(0, pos + 2);
        return v;
      }
      char tmp[4096];
      ssize_t n = ::read(fd, tmp, sizeof tmp);
      if (n <= 0) return nullptr;
      buf.append(tmp, static_cast<size_t>(n));
    }
  }
  void send(const std::string& s) { ASSERT_EQ(static_cast<ssize_t>(s.size()), ::write(fd, s.data(), s.size())); }
};

struct monitor_fixture : ::testing::Test {
  caf::actor_system_config cfg;
  std::unique_ptr<caf::actor_system> sys;
  std::unique_ptr<iothread> io;
  caf::actor sup;
  bool quit_called = false;

  void SetUp() override {
    cfg.set("scheduler.max-threads", size_t(1));
    sys = std::make_unique<caf::actor_system>(cfg);
    io = std::make_unique<iothread>(*sys, "main", iothread_params{});
    supervisor_hooks hooks;
    hooks.quit_requested = [this] { quit_called = true; };
    sup = spawn_pinned<supervisor_actor>(*sys, *io, hooks);
    // As main() does once the command line is applied: monitors serve from here on.
    caf::scoped_actor self{*sys};
    self->send(sup, ready_atom::value);
  }
  void TearDown() override {
    test::stop_supervisor(*sys, sup);
    io.reset();
    sys.reset();
  }

  // Creates a chardev on one end of a socketpair (fd passing, client mode) and a monitor on it.
  peer add_monitor(const std::string& id, bool pretty = false) {
    int sv[2];
    EXPECT_EQ(0, ::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv));
    chardev_spec spec;
    spec.id = id;
    spec.backend = "socket";
    spec.fd = sv[0];
    caf::scoped_actor self{*sys};
    self->request(sup, caf::infinite, chardev_atom::value, spec, std::string())
        .receive([](const command_outcome& r) { EXPECT_TRUE(r.ok) << r.err.desc; }, [](caf::error&) { FAIL(); });
    ::close(sv[0]);  // the chardev keeps its own duplicate
    self->request(sup, caf::infinite, monitor_atom::value, id, pretty, std::string())
        .receive([](const command_outcome& r) { EXPECT_TRUE(r.ok) << r.err.desc; }, [](caf::error&) { FAIL(); });
    return peer{sv[1], {}};
  }

  void raise_event(const std::string& name, boost::json::object data) {
    caf::anon_send(sup, event_atom::value, name, json_args{std::move(data)});
  }
};

TEST_F(monitor_fixture, EventsReachOnlyNegotiatedMonitorsBeforeLaterReplies) {
  auto a = add_monitor("m1");
  auto b = add_monitor("m2");
  EXPECT_TRUE(a.next().as_object().contains("QMP"));
  EXPECT_TRUE(b.next().as_object().contains("QMP"));
  a.send("{\"execute\": \"qmp_capabilities\", \"id\": 1}");
  EXPECT_EQ(boost::json::parse(R"({"return": {}, "id": 1})"), a.next());

  raise_event("BLOCK_EXPORT_DELETED", boost::json::object{{"id", "e0"}});
  auto ev = a.next().as_object();
  EXPECT_EQ("BLOCK_EXPORT_DELETED", ev.at("event").as_string());
  EXPECT_EQ(boost::json::parse(R"({"id": "e0"})"), ev.at("data"));
  EXPECT_GT(ev.at("timestamp").at("seconds").as_int64(), 1700000000);
  EXPECT_GE(ev.at("timestamp").at("microseconds").as_int64(), 0);

  // Monitor 2 is still negotiating: the event was not queued for it, so its next message is the
  // reply to what it sends now.
  b.send("{\"execute\": \"query-version\", \"id\": 7}");
  auto r = b.next().as_object();
  EXPECT_EQ(7, r.at("id").as_int64());
  EXPECT_EQ("CommandNotFound", r.at("error").at("class").as_string());
  ::close(a.fd);
  ::close(b.fd);
}

TEST_F(monitor_fixture, QuitRepliesThenShutdownFlushesAndCloses) {
  auto a = add_monitor("m1");
  a.next();
  a.send("{\"execute\": \"qmp_capabilities\"}{\"execute\": \"quit\", \"id\": \"q\"}");
  EXPECT_EQ(boost::json::parse(R"({"return": {}})"), a.next());
  EXPECT_EQ(boost::json::parse(R"({"return": {}, "id": "q"})"), a.next());
  EXPECT_TRUE(quit_called);
  caf::scoped_actor self{*sys};
  self->request(sup, std::chrono::seconds(5), shutdown_atom::value).receive([](bool ok) { EXPECT_TRUE(ok); },
                                                                           [](caf::error&) { FAIL(); });
  EXPECT_TRUE(a.next().is_null());  // EOF after the flush
  ::close(a.fd);
}

TEST_F(monitor_fixture, PrettyMonitorUsesCrlfOnEveryLine) {
  auto a = add_monitor("m1", true);
  std::string greeting;
  for (;;) {
    char c;
    ASSERT_EQ(1, ::read(a.fd, &c, 1));
    greeting.push_back(c);
    if (greeting.size() > 2 && greeting.ends_with("}\r\n") && greeting.find("\r\n}\r\n") != std::string::npos) break;
  }
  EXPECT_EQ(0u, greeting.find("{\r\n    \"QMP\": {\r\n"));
  for (size_t i = 0; i < greeting.size(); ++i)
    if (greeting[i] == '\n') {
      EXPECT_EQ('\r', greeting[i - 1]);
    }
  ::close(a.fd);
}

TEST_F(monitor_fixture, ObjectAddRunsInTheSupervisorAndKeepsReplyOrder) {
  auto a = add_monitor("m1");
  a.next();
  a.send(
      "{\"execute\": \"qmp_capabilities\"}"
      "{\"execute\": \"object-add\", \"arguments\": {\"qom-type\": \"iothread\", \"id\": \"io9\"}, \"id\": 1}"
      "{\"execute\": \"query-version\", \"id\": 2}"
      "{\"execute\": \"object-del\", \"arguments\": {\"id\": \"io9\"}, \"id\": 3}"
      "{\"execute\": \"object-del\", \"arguments\": {\"id\": \"io9\"}, \"id\": 4}");
  a.next();
  EXPECT_EQ(boost::json::parse(R"({"return": {}, "id": 1})"), a.next());
  EXPECT_EQ(2, a.next().at("id").as_int64());
  EXPECT_EQ(boost::json::parse(R"({"return": {}, "id": 3})"), a.next());
  EXPECT_EQ(boost::json::parse(R"({"id": 4, "error": {"class": "GenericError", "desc": "object 'io9' not found"}})"),
            a.next());
  ::close(a.fd);
}

}  // namespace

// Actor-tier tests of placement: nodes moved by x-blockdev-set-iothread, new parents, reopen and iothread deletion serve requests on their new home only.
#include <caf/all.hpp>
#include <gtest/gtest.h>

#include <fcntl.h>
#include <unistd.h>

#include <future>
#include <mutex>
#include <string>
#include <vector>

#include "actors/node/node_actor.h"
#include "actors/runtime/pinned.h"
#include "actors/supervisor/supervisor.h"
#include "tests/actors/supervisor_harness.h"
#include "storage/block/contract.h"
#include "tests/actors/reader_actor.h"

using namespace blockd;

namespace {

struct placement : ::testing::Test {
  caf::actor_system_config cfg;
  std::unique_ptr<caf::actor_system> sys;
  std::unique_ptr<iothread> main_io;
  caf::actor sup;
  std::mutex mx;
  std::vector<std::string> violations;
  std::string dir;

  void SetUp() override {
    // Every node runs under the contract checker: a request submitted or completed off the node's
    // home is reported here.
    block::set_contract_checks(true);
    block::set_contract_handler([this](const std::string& w) {
      std::lock_guard<std::mutex> g(mx);
      violations.push_back(w);
    });
    cfg.set("scheduler.max-threads", size_t(1));
    sys = std::make_unique<caf::actor_system>(cfg);
    main_io = std::make_unique<iothread>(*sys, "main", iothread_params{});
    sup = spawn_pinned<supervisor_actor>(*sys, *main_io, supervisor_hooks{});
    char tmpl[] = "/dev/shm/blockd-place-XXXXXX";
    dir = mkdtemp(tmpl);
  }
  void TearDown() override {
    test::stop_supervisor(*sys, sup);
    main_io.reset();
    sys.reset();
    block::set_contract_handler(nullptr);
    std::string cmd = "rm -rf " + dir;
    EXPECT_EQ(0, system(cmd.c_str()));
    EXPECT_TRUE(violations.empty()) << violations.front();
  }

  command_outcome cmd(const std::string& name, boost::json::object args) {
    return test::sup_command(*sys, sup, name, std::move(args));
  }
  void ok(const std::string& name, boost::json::object args) {
    auto o = cmd(name, std::move(args));
    ASSERT_TRUE(o.ok) << name << ": " << o.err.desc;
  }

  // Reads through node `name` from a reader pinned to `where`: true when all 32 reads completed
  // there, which the contract checker only allows if the node lives there too.
  bool reads_on(iothread& where, const std::string& name) {
    caf::actor na;
    {
      caf::scoped_actor self{*sys};
      self->request(sup, std::chrono::seconds(5), node_lookup_atom::value, name)
          .receive([&](const caf::actor& a) { na = a; }, [](caf::error& e) { FAIL() << caf::to_string(e); });
    }
    if (!na) return false;
    std::promise<bool> done;
    auto fut = done.get_future();
    auto reader = spawn_pinned<test::reader_actor>(*sys, where, na, 32, &done);
    bool ok = fut.get();
    caf::anon_send_exit(reader, caf::exit_reason::user_shutdown);
    std::lock_guard<std::mutex> g(mx);
    return ok && violations.empty();
  }

  // Whether node `name` lives off the main loop: a node task reports where it ran.
  bool runs_off_main(const std::string& name) {
    caf::scoped_actor self{*sys};
    caf::actor na;
    self->request(sup, std::chrono::seconds(5), node_lookup_atom::value, name)
        .receive([&](const caf::actor& a) { na = a; }, [](caf::error& e) { FAIL() << caf::to_string(e); });
    if (!na) return false;
    bool off = false;
    self->request(na, std::chrono::seconds(5), run_atom::value, node_task{[this](block::node& n) {
                    return command_outcome::success(
                        boost::json::value(!main_io->is_current() && n.env().on_home && n.env().on_home()));
                  }})
        .receive([&](const command_outcome& o) { off = o.ret.as_bool(); }, [](caf::error& e) { FAIL() << caf::to_string(e); });
    return off;
  }

  std::string image(const std::string& name) {
    std::string p = dir + "/" + name;
    int fd = ::open(p.c_str(), O_CREAT | O_RDWR | O_CLOEXEC, 0600);
    EXPECT_GE(fd, 0);
    EXPECT_EQ(0, ::ftruncate(fd, 1 << 20));
    ::close(fd);
    return p;
  }
};

TEST_F(placement, a_moved_component_serves_requests_on_its_new_iothread) {
  ok("object-add", {{"qom-type", "iothread"}, {"id", "io1"}});
  ok("blockdev-add", {{"driver", "file"}, {"node-name", "f0"}, {"filename", image("a.img")}});
  ok("blockdev-add", {{"driver", "raw"}, {"node-name", "r0"}, {"file", "f0"}});
  EXPECT_TRUE(reads_on(*main_io, "r0"));
  // Moving the child moves its parent too (one component, one home).
  ok("x-blockdev-set-iothread", {{"node-name", "f0"}, {"iothread", "io1"}});
  // The supervisor's iothread objects are its own; reach io1 through a node task run at home.
  caf::actor r0;
  {
    caf::scoped_actor self{*sys};
    self->request(sup, std::chrono::seconds(5), node_lookup_atom::value, std::string("r0"))
        .receive([&](const caf::actor& a) { r0 = a; }, [](caf::error&) {});
    self->request(r0, std::chrono::seconds(5), run_atom::value, node_task{[this](block::node& n) {
                    // Not on the main loop, and the env agrees with the thread the task runs on.
                    bool ok = !main_io->is_current() && n.env().on_home && n.env().on_home();
                    return command_outcome::success(boost::json::value(ok));
                  }})
        .receive([](const command_outcome& o) { EXPECT_EQ(boost::json::value(true), o.ret); },
                 [](caf::error& e) { FAIL() << caf::to_string(e); });
  }
  // Back to the main loop with iothread: null; reads from there work again.
  ok("x-blockdev-set-iothread", {{"node-name", "r0"}, {"iothread", nullptr}});
  EXPECT_TRUE(reads_on(*main_io, "r0"));
  EXPECT_TRUE(reads_on(*main_io, "f0"));
}

TEST_F(placement, deleting_an_iothread_moves_its_nodes_to_the_main_loop) {
  ok("object-add", {{"qom-type", "iothread"}, {"id", "io1"}});
  ok("blockdev-add", {{"driver", "null-aio"}, {"node-name", "n0"}, {"size", 1 << 20}, {"latency-ns", 100000}});
  ok("x-blockdev-set-iothread", {{"node-name", "n0"}, {"iothread", "io1"}});
  // A new parent of a node on io1 opens on io1 with it.
  ok("blockdev-add", {{"driver", "raw"}, {"node-name", "r0"}, {"file", "n0"}});
  ok("object-del", {{"id", "io1"}});
  EXPECT_TRUE(reads_on(*main_io, "r0"));
  EXPECT_TRUE(reads_on(*main_io, "n0"));
}

TEST_F(placement, a_child_taken_from_another_iothread_joins_its_new_parent) {
  ok("object-add", {{"qom-type", "iothread"}, {"id", "io1"}});
  ok("blockdev-add", {{"driver", "file"}, {"node-name", "f0"}, {"filename", image("a.img")}});
  ok("blockdev-add", {{"driver", "file"}, {"node-name", "f1"}, {"filename", image("b.img")}});
  ok("blockdev-add", {{"driver", "raw"}, {"node-name", "r0"}, {"file", "f0"}});
  ok("x-blockdev-set-iothread", {{"node-name", "f1"}, {"iothread", "io1"}});
  ok("blockdev-reopen", {{"options", boost::json::array{boost::json::object{
                                         {"driver", "raw"}, {"node-name", "r0"}, {"file", "f1"}}}}});
  EXPECT_TRUE(reads_on(*main_io, "f1"));
  EXPECT_TRUE(reads_on(*main_io, "r0"));
}

TEST_F(placement, unknown_nodes_and_iothreads_are_refused) {
  ok("blockdev-add", {{"driver", "null-co"}, {"node-name", "n0"}});
  auto o = cmd("x-blockdev-set-iothread", {{"node-name", "nope"}, {"iothread", "io1"}});
  EXPECT_EQ("Failed to find node with node-name='nope'", o.err.desc);
  o = cmd("x-blockdev-set-iothread", {{"node-name", "n0"}, {"iothread", "io9"}});
  EXPECT_EQ("Cannot find iothread io9", o.err.desc);
  EXPECT_TRUE(reads_on(*main_io, "n0"));
}

// ---- node tasks: control work on a node runs at its home ------------------------------------
// The contract checker (on for every node here) reports a driver's facts, truncate, activate,
// inactivate, reopen steps or close run anywhere but the node's home; TearDown fails on any report.

TEST_F(placement, control_commands_on_an_iothread_node_run_at_its_home) {
  ok("object-add", {{"qom-type", "iothread"}, {"id", "io1"}});
  ok("blockdev-add", {{"driver", "file"}, {"node-name", "f0"}, {"filename", image("a.img")}});
  ok("blockdev-add", {{"driver", "raw"}, {"node-name", "r0"}, {"file", "f0"}});
  ok("x-blockdev-set-iothread", {{"node-name", "r0"}, {"iothread", "io1"}});
  ok("block_resize", {{"node-name", "r0"}, {"size", 2 << 20}});
  auto o = cmd("query-named-block-nodes", {});
  ASSERT_TRUE(o.ok);
  int64_t size = -1;
  for (auto& v : o.ret.as_array())
    if (v.as_object().at("node-name") == "r0") size = v.as_object().at("image").as_object().at("virtual-size").as_int64();
  EXPECT_EQ(2 << 20, size);  // what the home published after the resize
  ok("blockdev-set-active", {{"node-name", "r0"}, {"active", false}});
  ok("blockdev-set-active", {{"active", true}});
  ok("blockdev-reopen", {{"options", boost::json::array{boost::json::object{
                                         {"driver", "raw"}, {"node-name", "r0"}, {"file", "f0"}, {"read-only", true}}}}});
  // A new node over f0 opens on io1, where f0 lives, and closes there.
  ok("blockdev-add", {{"driver", "raw"}, {"node-name", "r1"}, {"file", "f0"}, {"read-only", true}});
  EXPECT_TRUE(runs_off_main("r1"));
  ok("blockdev-del", {{"node-name", "r1"}});
  EXPECT_TRUE(runs_off_main("r0"));
}

TEST_F(placement, a_failing_task_at_home_answers_the_command) {
  ok("object-add", {{"qom-type", "iothread"}, {"id", "io1"}});
  ok("blockdev-add", {{"driver", "file"}, {"node-name", "f0"}, {"filename", image("a.img")}});
  ok("blockdev-add", {{"driver", "raw"}, {"node-name", "r0"}, {"file", "f0"}, {"size", 1 << 19}});
  ok("x-blockdev-set-iothread", {{"node-name", "r0"}, {"iothread", "io1"}});
  auto o = cmd("block_resize", {{"node-name", "r0"}, {"size", 1 << 20}});
  EXPECT_FALSE(o.ok);
  EXPECT_EQ("Cannot resize fixed-size raw disks", o.err.desc);  // the driver's refusal, from io1
  // The command released its hold and the queue: the next ones run.
  ok("blockdev-del", {{"node-name", "r0"}});
  ok("blockdev-del", {{"node-name", "f0"}});
}

TEST_F(placement, a_refused_open_at_home_leaves_nothing_behind) {
  ok("object-add", {{"qom-type", "iothread"}, {"id", "io1"}});
  ok("blockdev-add", {{"driver", "file"}, {"node-name", "f0"}, {"filename", image("a.img")}});
  ok("x-blockdev-set-iothread", {{"node-name", "f0"}, {"iothread", "io1"}});
  // A window beyond the file: the driver refuses at home, the graph never saw the node.
  auto o = cmd("blockdev-add", {{"driver", "raw"}, {"node-name", "r0"}, {"file", "f0"}, {"offset", 2 << 20}});
  EXPECT_FALSE(o.ok);
  o = cmd("query-named-block-nodes", {});
  ASSERT_TRUE(o.ok);
  EXPECT_EQ(1u, o.ret.as_array().size());
  // The name is free again, and the node opens there when asked properly.
  ok("blockdev-add", {{"driver", "raw"}, {"node-name", "r0"}, {"file", "f0"}});
  EXPECT_TRUE(runs_off_main("r0"));
}

}  // namespace

// Shared fixtures of the qcow2 driver tests: a scratch directory, a graph on the test thread's loop that opens nodes as blockdev-add does, and qemu-img's verdicts; test thread.
#pragma once
#include <gtest/gtest.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>

#include <boost/json.hpp>

#include <string>

#include "storage/block/contract.h"
#include "storage/block/graph.h"
#include "storage/block/local_loop.h"
#include "storage/block/node.h"
#include "storage/io/reactor.h"

namespace blockd::block::qcow2_test {

namespace json = boost::json;

inline bool have_tool(const char* name) {
  return std::system((std::string("command -v ") + name + " >/dev/null 2>&1").c_str()) == 0;
}

// Runs a shell command with its stderr folded into the returned output.
inline std::string run(const std::string& cmd, int* status = nullptr) {
  std::string out;
  FILE* p = popen((cmd + " 2>&1").c_str(), "r");
  if (!p) return out;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  int st = pclose(p);
  if (status) *status = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return out;
}

// A scratch directory under /dev/shm, removed with everything in it (kept with KEEP=1 set).
struct scratch {
  std::string dir;
  scratch() {
    char t[] = "/dev/shm/blockd-q2-XXXXXX";
    dir = mkdtemp(t);
  }
  ~scratch() {
    if (!getenv("KEEP")) std::system(("rm -rf " + dir).c_str());
  }
  std::string path(const std::string& name) const { return dir + "/" + name; }
};

// A graph on this thread's loop: nodes are opened exactly as blockdev-add opens them, with contract checks on.
struct stack {
  local_loop loop{io::reactor::create(256, nullptr)};
  graph g{[this] { return loop.env(); }};
  stack() {
    set_contract_checks(true);
    set_contract_handler([](const std::string& what) { ADD_FAILURE() << what; });
  }
  result<node*> add(const json::object& o) { return g.add(o); }
  // The open's own result (tests of refused opens); nodes are named q1, q2, ...
  result<node*> try_open_qcow2(const std::string& path, bool read_only = false, json::object extra = {}) {
    json::object o{{"driver", "qcow2"},
                   {"node-name", "q" + std::to_string(++count)},
                   {"file", json::object{{"driver", "file"}, {"filename", path}}}};
    if (read_only) o["read-only"] = true;
    for (auto& kv : extra) o[kv.key()] = kv.value();
    return g.add(o);
  }
  node* open_qcow2(const std::string& path, bool read_only = false, json::object extra = {}) {
    auto r = try_open_qcow2(path, read_only, std::move(extra));
    EXPECT_TRUE(r.has_value()) << (r ? "" : r.error().desc);
    return r ? *r : nullptr;
  }
  void close(node* n) { g.del(n->name()); }
  int count = 0;
};

// qemu-img check finds no corruption, leak or error; returns the image end offset it reports (-1: none).
inline int64_t expect_clean(const std::string& path) {
  int st = 0;
  std::string out = run("qemu-img check --output=json " + path, &st);
  EXPECT_EQ(st, 0) << out;
  auto at = out.find('{');
  if (at == std::string::npos) {
    ADD_FAILURE() << out;
    return -1;
  }
  auto v = json::parse(out.substr(at));
  auto& o = v.as_object();
  EXPECT_EQ(o.contains("corruptions") ? o.at("corruptions").as_int64() : 0, 0) << out;
  EXPECT_EQ(o.contains("leaks") ? o.at("leaks").as_int64() : 0, 0) << out;
  EXPECT_EQ(o.contains("check-errors") ? o.at("check-errors").as_int64() : 0, 0) << out;
  return o.contains("image-end-offset") ? o.at("image-end-offset").as_int64() : -1;
}

}  // namespace blockd::block::qcow2_test

// The copy-engine tests' harness: nodes on a local loop, a recording/holding write hook, callback recorder; test thread.
#pragma once
#include <map>
#include <set>

#include "storage/block/copy_engine.h"
#include "storage/block/rate_limit.h"
#include "storage/block/write_hook.h"
#include "tests/drivers/conformance_stacks.h"

namespace blockd::block {
namespace {

constexpr int64_t K = 1024, M = 1024 * 1024;

// Records what reaches a node's driver (the final op: write or write_zeroes) and can hold writes
// (a gating hook) or check that no two writes to the same range overlap in time.
struct recorder final : write_hook {
  node* n = nullptr;
  int64_t write_bytes = 0, zero_bytes = 0, writes = 0, zeroes = 0;
  bool hold = false;
  std::vector<io_request*> held;
  std::vector<std::pair<int64_t, int64_t>> active;
  int overlaps = 0;
  explicit recorder(node* node_, bool gate = true) : n(node_) {
    gates = gate;
    n->add_write_hook(this);
  }
  ~recorder() { n->remove_write_hook(this); }
  bool before_write(io_request& r) override {
    for (auto& [o, l] : active)
      if (r.offset < o + l && o < r.offset + r.length) ++overlaps;
    active.emplace_back(r.offset, r.length);
    if (hold) {
      held.push_back(&r);
      return false;
    }
    return true;
  }
  void after_write(const io_request& r) override {
    for (size_t i = 0; i < active.size(); ++i)
      if (active[i] == std::pair(r.offset, r.length)) {
        active.erase(active.begin() + ptrdiff_t(i));
        break;
      }
    if (r.op == io_op::write) {
      ++writes;
      write_bytes += r.length;
    } else if (r.op == io_op::write_zeroes) {
      ++zeroes;
      zero_bytes += r.length;
    }
  }
  // Lets the writes held so far go on, holding the ones that come next.
  void release_held() {
    auto h = std::move(held);
    held.clear();
    for (auto* r : h) n->release_write(*r);
  }
  void release_all() {
    hold = false;
    auto h = std::move(held);
    held.clear();
    for (auto* r : h) n->release_write(*r);
  }
};

// A source write hook that feeds mirror-style re-dirtying into an engine (after the write completed).
struct redirty final : write_hook {
  node* n;
  copy_engine* e = nullptr;
  explicit redirty(node* node_) : n(node_) { n->add_write_hook(this); }
  ~redirty() { n->remove_write_hook(this); }
  void after_write(const io_request& r) override {
    if (e) e->mark_dirty(r.offset, r.length);
  }
};

// What the callbacks saw.
struct seen {
  int idle = 0, paused = 0, cancelled = 0, finished = 0, fin_err = 0;
  int64_t done = 0, skipped = 0;
  std::vector<copy_error> errors;
  copy_error_action action = copy_error_action::report;
  copy_callbacks cbs() {
    copy_callbacks c;
    c.on_progress = [this](int64_t d, int64_t s) {
      done += d;
      skipped += s;
    };
    c.on_idle = [this] { ++idle; };
    c.on_error = [this](const copy_error& e) {
      errors.push_back(e);
      return action;
    };
    c.on_paused = [this] { ++paused; };
    c.on_finished = [this](int err) {
      ++finished;
      fin_err = err;
    };
    c.on_cancelled = [this] { ++cancelled; };
    return c;
  }
};

struct copy_fixture : ::testing::Test {
  std::unique_ptr<stack> s = std::make_unique<stack>();

  std::string image(int64_t size) {
    std::string p = temp_image(size);
    s->extra_paths.push_back(p);
    return p;
  }
  node* file(const std::string& p) { return s->open("file", {{"filename", p}}); }
  static bool sh(const std::string& cmd) { return std::system((cmd + " >/dev/null 2>&1").c_str()) == 0; }
  // A command's standard output (stderr dropped); "" when it failed.
  static std::string sh_out(const std::string& cmd) {
    FILE* p = popen((cmd + " 2>/dev/null").c_str(), "r");
    if (!p) return "";
    std::string text;
    char buf[4096];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, p)) > 0) text.append(buf, n);
    return pclose(p) == 0 ? text : "";
  }
  // A qcow2 image made by qemu-img (empty: "" when qemu-img is missing), then commands on it.
  std::string qcow2_image(int64_t size, const std::string& backing = "") {
    std::string p = image(0);
    std::string cmd = "qemu-img create -q -f qcow2 ";
    if (!backing.empty()) cmd += "-b " + backing + " -F raw ";
    if (!sh(cmd + p + " " + std::to_string(size))) return "";
    return p;
  }

  int io(node* n, io_op op, int64_t off, int64_t len, void* buf = nullptr, uint32_t flags = 0,
         io_request* out = nullptr) {
    io_request r;
    r.op = op;
    r.offset = off;
    r.length = len;
    r.flags = flags;
    if (buf) r.set_buffer(buf, len);
    waiter w;
    r.waiter = &w;
    n->submit(r);
    s->loop.until([&] { return w.calls > 0; });
    if (out) *out = r;
    return r.result;
  }
  std::vector<char> read_all(node* n) {
    std::vector<char> b(size_t(n->length()));
    EXPECT_EQ(io(n, io_op::read, 0, n->length(), b.data()), 0);
    return b;
  }
  void fill(node* n, int64_t off, int64_t len, int seed) {
    std::vector<char> b(static_cast<size_t>(len));
    for (size_t i = 0; i < b.size(); ++i) b[i] = char((i * 131 + size_t(seed) * 7 + (i >> 12)) | 1);
    EXPECT_EQ(io(n, io_op::write, off, len, b.data()), 0);
  }
  void run_until(const std::function<bool()>& p) { s->loop.until(p); }
  // Turns the loop a while (for "nothing happens" checks: there is no event to wait for).
  void spin(int turns = 200) {
    for (int i = 0; i < turns; ++i) s->loop.turn();
  }
};

}  // namespace
}  // namespace blockd::block

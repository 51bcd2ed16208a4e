// A node's loop without an iothread (tests, benchmarks, tools): deferred functions plus one reactor; the calling thread only.
#pragma once
#include <deque>
#include <functional>
#include <memory>
#include <thread>

#include "storage/block/driver.h"
#include "storage/io/reactor.h"

namespace blockd::block {

// The iothread loop reduced to what a node needs: run what was deferred, then one reactor turn that
// sleeps only when nothing else is runnable (the same shape as actors/runtime/iothread's loop).
struct local_loop {
  explicit local_loop(std::unique_ptr<io::reactor> r) : reactor(std::move(r)) {}
  std::unique_ptr<io::reactor> reactor;
  std::deque<std::function<void()>> deferred;
  std::thread::id owner = std::this_thread::get_id();  // the thread that turns this loop
  driver_env env() {
    return {reactor.get(), [this](std::function<void()> fn) { deferred.push_back(std::move(fn)); },
            [this] { return std::this_thread::get_id() == owner; },
            [this](driver_env::start_fn start) { return block_on(start); }};
  }
  // driver_env::block_on: only the owner thread turns this loop, so it waits by turning it (nested).
  int block_on(const driver_env::start_fn& start) {
    bool fin = false;
    int res = 0;
    start([&](int r) {
      res = r;
      fin = true;
    });
    while (!fin) turn();
    return res;
  }
  void turn() {
    auto batch = std::move(deferred);
    deferred.clear();
    for (auto& fn : batch) fn();
    reactor->run_once(deferred.empty() && reactor->in_flight() > 0);
  }
};

}  // namespace blockd::block

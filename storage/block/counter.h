// stat_counter: a statistic written by one thread (a node's home) and read from any (queries); any thread.
#pragma once
#include <atomic>
#include <cstdint>

namespace blockd::block {

// Single writer, many readers. Relaxed loads and stores compile to plain moves on the platforms
// blockd runs on, so the data path pays nothing, while the supervisor reads a value that is merely
// a little old instead of racing with the writer. Only the owning thread may call the mutators.
template <class T>
class stat_counter {
 public:
  stat_counter(T v = T()) : v_(v) {}
  stat_counter(const stat_counter& o) : v_(o.get()) {}
  stat_counter& operator=(const stat_counter& o) {
    set(o.get());
    return *this;
  }
  T get() const { return v_.load(std::memory_order_relaxed); }
  operator T() const { return get(); }
  void set(T v) { v_.store(v, std::memory_order_relaxed); }
  stat_counter& operator+=(T n) {
    set(get() + n);
    return *this;
  }
  void operator++(int) { *this += T(1); }

 private:
  std::atomic<T> v_;
};

using counter = stat_counter<uint64_t>;

}  // namespace blockd::block

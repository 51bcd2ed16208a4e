// Coroutine helpers for drivers that chain I/O (formats): a lazy task, an awaitable child request, a mutex and a wait list; home iothread only.
#pragma once
#include <coroutine>
#include <cstdint>
#include <deque>
#include <exception>
#include <functional>
#include <utility>

#include "storage/block/io_request.h"
#include "storage/block/node.h"

namespace blockd::block::co {

// GCC 12 (PR 99576, fixed in 13): in a statement holding a co_await, a temporary that initialises a
// part of a larger object (a member of a braced awaiter, a lambda capture) is copied into the frame
// and destroyed twice. Awaiters that own anything (a shared_ptr, a std::function) are built as named
// locals and then awaited; no braced aggregate or capturing lambda inside a co_await statement.

// A lazily started coroutine returning T. Awaiting it runs it; when it ends, control transfers
// straight back to the awaiter (symmetric transfer), so long chains do not grow the stack.
template <class T>
class task {
 public:
  struct promise_type {
    T value{};
    std::coroutine_handle<> cont = std::noop_coroutine();
    task get_return_object() { return task(std::coroutine_handle<promise_type>::from_promise(*this)); }
    std::suspend_always initial_suspend() noexcept { return {}; }
    struct final_awaiter {
      bool await_ready() noexcept { return false; }
      std::coroutine_handle<> await_suspend(std::coroutine_handle<promise_type> h) noexcept {
        return h.promise().cont;
      }
      void await_resume() noexcept {}
    };
    final_awaiter final_suspend() noexcept { return {}; }
    void return_value(T v) { value = std::move(v); }
    // Drivers report failures as -errno; an exception here is a bug, and a bug must not limp on.
    void unhandled_exception() { std::terminate(); }
  };

  task(task&& o) noexcept : h_(std::exchange(o.h_, {})) {}
  task& operator=(task&&) = delete;
  ~task() {
    if (h_) h_.destroy();
  }

  bool await_ready() const noexcept { return false; }
  std::coroutine_handle<> await_suspend(std::coroutine_handle<> awaiter) noexcept {
    h_.promise().cont = awaiter;
    return h_;
  }
  T await_resume() { return std::move(h_.promise().value); }

  std::coroutine_handle<promise_type> release() { return std::exchange(h_, {}); }

 private:
  explicit task(std::coroutine_handle<promise_type> h) : h_(h) {}
  std::coroutine_handle<promise_type> h_;
};

namespace detail {
// The frame that owns a started top-level task and reports its result; destroys itself at the end.
struct detached {
  struct promise_type {
    detached get_return_object() { return {}; }
    std::suspend_never initial_suspend() noexcept { return {}; }
    std::suspend_never final_suspend() noexcept { return {}; }
    void return_void() {}
    void unhandled_exception() { std::terminate(); }
  };
};
inline detached run_detached(task<int> t, std::function<void(int)> done) {
  int r = co_await t;
  done(r);
}
}  // namespace detail

// Starts `t` now; `done(result)` runs when it ends (possibly before start() returns, when the task
// needed no I/O: callers that must not complete synchronously check for that themselves).
inline void start(task<int> t, std::function<void(int)> done) { detail::run_detached(std::move(t), std::move(done)); }

// One request to a child node, awaited: `int res = co_await child_io(node, op, offset, len, ...)`.
class child_io final : private io_waiter {
 public:
  child_io(node& n, io_op op, int64_t offset, int64_t length, uint32_t flags = 0) : n_(n) {
    r_.op = op;
    r_.offset = offset;
    r_.length = length;
    r_.flags = flags;
  }
  child_io& buffer(void* p) {
    r_.set_buffer(p, r_.length);
    return *this;
  }
  child_io& vector(const iovec* iov, int cnt) {
    r_.iov = iov;
    r_.iovcnt = cnt;
    return *this;
  }
  bool await_ready() const noexcept { return false; }
  void await_suspend(std::coroutine_handle<> h) {
    h_ = h;
    r_.waiter = this;
    n_.submit(r_);  // never completes inside submit (the driver contract), so h_ is set first
  }
  int await_resume() const noexcept { return r_.result; }
  const io_request& request() const { return r_; }

 private:
  void io_done(io_request&) override { h_.resume(); }
  node& n_;
  io_request r_;
  std::coroutine_handle<> h_;
};

// A FIFO of suspended coroutines, resumed on a later loop turn (never inside the waker's frame:
// the waker may hold references the resumed code would invalidate).
class wait_list {
 public:
  explicit wait_list(std::function<void(std::function<void()>)>* defer = nullptr) : defer_(defer) {}
  void bind(std::function<void(std::function<void()>)>* defer) { defer_ = defer; }
  struct awaiter {
    wait_list& w;
    bool await_ready() const noexcept { return false; }
    void await_suspend(std::coroutine_handle<> h) { w.q_.push_back(h); }
    void await_resume() const noexcept {}
  };
  awaiter wait() { return {*this}; }
  bool empty() const { return q_.empty(); }
  void wake_one() {
    if (q_.empty()) return;
    auto h = q_.front();
    q_.pop_front();
    (*defer_)([h] { h.resume(); });
  }
  void wake_all() {
    while (!q_.empty()) wake_one();
  }

 private:
  std::function<void(std::function<void()>)>* defer_;
  std::deque<std::coroutine_handle<>> q_;
};

// A mutex for coroutines on one thread; unlock hands it to the next waiter directly (FIFO).
class mutex {
 public:
  explicit mutex(std::function<void(std::function<void()>)>* defer = nullptr) : waiters_(defer) {}
  void bind(std::function<void(std::function<void()>)>* defer) { waiters_.bind(defer); }
  struct awaiter {
    mutex& m;
    bool await_ready() {
      if (m.locked_) return false;
      m.locked_ = true;
      return true;
    }
    void await_suspend(std::coroutine_handle<> h) { m.waiters_.wait().await_suspend(h); }
    void await_resume() const noexcept {}
  };
  awaiter lock() { return {*this}; }
  void unlock() {
    if (waiters_.empty()) locked_ = false;
    else waiters_.wake_one();  // stays locked: ownership passes to the woken coroutine
  }
  bool locked() const { return locked_; }

 private:
  bool locked_ = false;
  wait_list waiters_;
};

// Holds a co::mutex for a scope: `auto g = co_await lock_guard::take(m);` is not expressible, so
// callers write `co_await m.lock(); guard g{m};`.
struct guard {
  mutex& m;
  ~guard() { m.unlock(); }
};

}  // namespace blockd::block::co

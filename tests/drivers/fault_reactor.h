// Test support: a reactor that wraps a real one and injects ring faults (errors, short transfers, EAGAIN) into file operations; the test's loop thread only.
#pragma once
#include <sys/uio.h>

#include <cerrno>
#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "storage/io/reactor.h"

namespace blockd::io {

// What happens to the file operations (readv/writev/fsync/fallocate/offload) passing through. The
// decision is taken per operation, in submission order, so a test can say "every read fails" or
// "the third write comes back short". Socket operations and timers pass through untouched.
class fault_reactor final : public reactor {
 public:
  enum class op_class { readv, writev, fsync, fallocate, offload };
  enum class effect {
    none,
    fail,       // complete with -err without touching storage
    short_io,   // readv/writev: transfer only the first half (rounded down to `short_unit`)
    transient,  // complete with -err (EAGAIN/EINTR) without touching storage; the caller retries
  };
  struct decision {
    effect what = effect::none;
    int err = EIO;
  };
  // Called for each file operation with its kind and its sequence number (0-based, per kind).
  std::function<decision(op_class, uint64_t)> rule;
  uint32_t short_unit = 512;  // keep O_DIRECT transfers aligned
  uint64_t injected = 0;      // operations that were changed

  explicit fault_reactor(std::unique_ptr<reactor> inner) : inner_(std::move(inner)) {}

  const char* kind() const override { return inner_->kind(); }
  void read(int fd, void* buf, size_t len, int64_t off, completion* c) override { inner_->read(fd, buf, len, off, c); }
  void write(int fd, const void* buf, size_t len, int64_t off, completion* c) override {
    inner_->write(fd, buf, len, off, c);
  }
  void readv(int fd, const iovec* iov, int iovcnt, int64_t off, completion* c, bool run_here) override {
    if (auto* w = intercept(op_class::readv, c, iov, iovcnt))
      return inner_->readv(fd, w->iov.data(), int(w->iov.size()), off, w, run_here);
  }
  void writev(int fd, const iovec* iov, int iovcnt, int64_t off, completion* c, bool run_here) override {
    if (auto* w = intercept(op_class::writev, c, iov, iovcnt))
      return inner_->writev(fd, w->iov.data(), int(w->iov.size()), off, w, run_here);
  }
  void fsync(int fd, bool datasync, completion* c) override {
    if (auto* w = intercept(op_class::fsync, c)) inner_->fsync(fd, datasync, w);
  }
  void fallocate(int fd, int mode, int64_t off, int64_t len, completion* c) override {
    if (auto* w = intercept(op_class::fallocate, c)) inner_->fallocate(fd, mode, off, len, w);
  }
  void offload(std::function<int()> fn, completion* c) override {
    if (auto* w = intercept(op_class::offload, c)) inner_->offload(std::move(fn), w);
  }
  void recv(int fd, void* buf, size_t len, completion* c) override { inner_->recv(fd, buf, len, c); }
  void send(int fd, const void* buf, size_t len, completion* c) override { inner_->send(fd, buf, len, c); }
  void sendmsg(int fd, const struct msghdr* m, completion* c) override { inner_->sendmsg(fd, m, c); }
  void accept(int fd, completion* c) override { inner_->accept(fd, c); }
  void connect(int fd, const void* addr, unsigned addrlen, completion* c) override { inner_->connect(fd, addr, addrlen, c); }
  void timeout(uint64_t ns, completion* c) override { inner_->timeout(ns, c); }
  void cancel(completion* c) override { inner_->cancel(c); }
  unsigned run_once(bool block) override { return inner_->run_once(block); }
  size_t in_flight() const override { return inner_->in_flight(); }
  bool poll_ready() override { return inner_->poll_ready(); }
  void set_max_batch(unsigned n) override { inner_->set_max_batch(n); }
  void set_pool_limits(const pool_limits& l) override { inner_->set_pool_limits(l); }
  int set_worker_affinity(const cpu_set_t* cpus) override { return inner_->set_worker_affinity(cpus); }
  reactor_stats stats() const override { return inner_->stats(); }

 private:
  // Stands between the reactor and the caller's completion for one operation.
  struct wrapped final : completion {
    fault_reactor* owner = nullptr;
    completion* target = nullptr;
    int forced = 1;  // <= 0: the result to report instead of the real one
    std::vector<iovec> iov;
    void complete(int res) override {
      completion* t = target;
      int r = forced <= 0 ? forced : res;
      delete this;
      t->complete(r);
    }
  };

  wrapped* intercept(op_class k, completion* c, const iovec* iov = nullptr, int iovcnt = 0) {
    decision d = rule ? rule(k, seq_[size_t(k)]++) : decision{};
    auto* w = new wrapped;
    w->owner = this;
    w->target = c;
    w->iov.assign(iov, iov + iovcnt);
    if (d.what == effect::fail || d.what == effect::transient) {
      // Nothing reaches storage; the result still arrives on a later turn, never synchronously.
      ++injected;
      w->forced = -d.err;
      inner_->timeout(0, w);
      return nullptr;
    }
    if (d.what == effect::short_io && iovcnt > 0) {
      size_t total = 0;
      for (auto& v : w->iov) total += v.iov_len;
      size_t keep = (total / 2) / short_unit * short_unit;
      if (keep > 0 && keep < total) {
        ++injected;
        size_t left = keep;
        size_t n = 0;
        for (; n < w->iov.size() && left > 0; ++n) {
          if (w->iov[n].iov_len > left) w->iov[n].iov_len = left;
          left -= w->iov[n].iov_len;
        }
        w->iov.resize(n);
      }
    }
    return w;
  }

  std::unique_ptr<reactor> inner_;
  uint64_t seq_[5] = {};
};

}  // namespace blockd::io

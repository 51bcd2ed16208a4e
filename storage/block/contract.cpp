// The contract checker between a node and its driver (see contract.h); home iothread, control calls with the node drained.
#include "storage/block/contract.h"

#include <atomic>
#include <cstdio>
#include <deque>
#include <cstdlib>
#include <mutex>
#include <unordered_map>

#include "storage/block/io_request.h"

namespace blockd::block {
namespace {

std::mutex handler_mx;
contract_handler& handler() {
  static contract_handler h;
  return h;
}

int checks_state() {
#ifdef NDEBUG
  const char* v = std::getenv("BLOCKD_CHECK_CONTRACTS");
  static int state = (v && *v && *v != '0') ? 1 : 0;
#else
  static int state = 1;
#endif
  return state;
}
std::atomic<int> forced{-1};  // -1: follow the build and the environment

void report(const std::string& node_name, const std::string& what) {
  std::string msg = "driver contract broken on node '" + node_name + "': " + what;
  contract_handler h;
  {
    std::lock_guard<std::mutex> g(handler_mx);
    h = handler();
  }
  if (h) return h(msg);
  std::fprintf(stderr, "blockd: %s\n", msg.c_str());
  std::abort();
}

const char* op_name(io_op op) {
  switch (op) {
    case io_op::read: return "read";
    case io_op::write: return "write";
    case io_op::write_zeroes: return "write_zeroes";
    case io_op::discard: return "discard";
    case io_op::flush: return "flush";
    case io_op::block_status: return "block_status";
  }
  return "?";
}

class checked_driver final : public block_driver, private io_waiter {
 public:
  checked_driver(std::unique_ptr<block_driver> inner, std::string name, driver_env env)
      : inner_(std::move(inner)), name_(std::move(name)), env_(std::move(env)) {}

  ~checked_driver() override {
    if (!live_.empty()) fail(std::to_string(live_.size()) + " request(s) still in the driver when it was closed");
  }

  uint32_t caps() const override { return inner_->caps(); }
  driver_limits limits() const override { return inner_->limits(); }
  int64_t length() const override { return inner_->length(); }

  void submit(io_request& r) override {
    check_home("submit");
    check_request(r);
    // The driver gets a shadow, so a second completion reaches the checker and not the submitter.
    io_request* s = pool_.get();
    s->op = r.op;
    s->flags = r.flags;
    s->offset = r.offset;
    s->length = r.length;
    s->iov = r.iov;
    s->iovcnt = r.iovcnt;
    s->user = &r;
    s->waiter = this;
    live_.emplace(s, &r);
    ++submitting_;
    inner_->submit(*s);
    --submitting_;
  }

  result<void> preallocate(int64_t offset, int64_t len) override {
    check_home("preallocate");
    return inner_->preallocate(offset, len);
  }
  bool extend_by_write(int64_t end) override {
    check_home("extend_by_write");
    return inner_->extend_by_write(end);
  }
  void debug_event(blkdebug_event e) override {
    check_home("debug_event");
    inner_->debug_event(e);
  }

  result<void> truncate(int64_t size) override {
    // Growing is allowed under I/O (a format appends clusters past the end of its file while other
    // requests run below the old end); anything else needs the node drained.
    check_home("truncate");
    if (size < inner_->length()) drained("truncate");
    return inner_->truncate(size);
  }
  result<void> check_perm(uint32_t perm, uint32_t shared) override { return inner_->check_perm(perm, shared); }
  void set_perm(uint32_t perm, uint32_t shared) override { inner_->set_perm(perm, shared); }
  void child_perm(const std::string& role, bool read_only, uint32_t node_perm, uint32_t node_shared, uint32_t& perm,
                  uint32_t& shared) const override {
    inner_->child_perm(role, read_only, node_perm, node_shared, perm, shared);
  }
  // Queries on other threads read what the home published (node::facts), never the driver.
  image_facts facts() const override {
    check_home("facts");
    return inner_->facts();
  }
  boost::json::value driver_stats() const override { return inner_->driver_stats(); }

  result<std::unique_ptr<reopen_state>> reopen_prepare(const reopen_args& a, std::vector<std::string>& consumed) override {
    check_home("reopen prepare");
    auto st = inner_->reopen_prepare(a, consumed);
    if (!st) return st;
    struct checked_state final : reopen_state {
      checked_driver* d;
      std::unique_ptr<reopen_state> inner;
      bool done = false;
      void commit() override { finish("reopen commit", true); }
      void abort() override { finish("reopen abort", false); }
      void child_perm(const block_driver&, const std::string& role, bool read_only, uint32_t node_perm,
                      uint32_t node_shared, uint32_t& perm, uint32_t& shared) const override {
        inner->child_perm(*d->inner_, role, read_only, node_perm, node_shared, perm, shared);
      }
      void finish(const char* what, bool commit) {
        if (done) d->fail(std::string(what) + " after the reopen was already committed or aborted");
        done = true;
        d->check_home(what);
        d->drained(what);
        commit ? inner->commit() : inner->abort();
      }
      ~checked_state() override {
        if (!done) d->fail("a prepared reopen was neither committed nor aborted");
      }
    };
    auto c = std::make_unique<checked_state>();
    c->d = this;
    c->inner = std::move(*st);
    return std::unique_ptr<reopen_state>(std::move(c));
  }
  std::vector<std::string> reopen_resettable() const override { return inner_->reopen_resettable(); }

  result<void> activate() override {
    check_home("activate");
    drained("activate");
    return inner_->activate();
  }
  void inactivate() override {
    check_home("inactivate");
    drained("inactivate");
    inner_->inactivate();
  }
  bool supports_snapshots() const override { return inner_->supports_snapshots(); }
  result<void> snapshot_create(const std::string& name, int64_t date_sec, int64_t date_nsec) override {
    check_home("snapshot_create");
    drained("snapshot_create");
    return inner_->snapshot_create(name, date_sec, date_nsec);
  }
  result<boost::json::object> snapshot_delete(const std::string* id, const std::string* name) override {
    check_home("snapshot_delete");
    drained("snapshot_delete");
    return inner_->snapshot_delete(id, name);
  }
  result<void> amend(const boost::json::object& options, bool force, const object_refs& objects) override {
    check_home("amend");
    drained("amend");
    return inner_->amend(options, force, objects);
  }
  result<void> change_backing_file(const std::string& file, const std::string& format) override {
    check_home("change_backing_file");
    drained("change_backing_file");
    return inner_->change_backing_file(file, format);
  }
  bool stores_bitmaps() const override { return inner_->stores_bitmaps(); }
  result<void> can_store_bitmap(const std::string& name, uint64_t granularity) override {
    check_home("can_store_bitmap");
    return inner_->can_store_bitmap(name, granularity);
  }
  result<void> remove_stored_bitmap(const std::string& name) override {
    check_home("remove_stored_bitmap");
    return inner_->remove_stored_bitmap(name);
  }
  bool has_child_list() const override { return inner_->has_child_list(); }
  result<std::string> child_add_role() override {
    check_home("child_add_role");
    return inner_->child_add_role();
  }
  void child_added(child_ref c) override {
    check_home("child_added");
    drained("child_added");
    inner_->child_added(c);
  }
  result<void> child_del_check(const std::string& role) override {
    check_home("child_del_check");
    return inner_->child_del_check(role);
  }
  void child_deleted(child_edge* e) override {
    check_home("child_deleted");
    drained("child_deleted");
    inner_->child_deleted(e);
  }
  void close() override {
    check_home("close");
    drained("close");
    inner_->close();
  }
  void drain_begin() override {
    check_home("drain_begin");
    inner_->drain_begin();
  }
  void drain_end() override {
    check_home("drain_end");
    inner_->drain_end();
  }
  void* driver_extension(const char* id) override { return inner_->driver_extension(id); }
  void rehome(const driver_env& env) override {
    drained("rehome");
    env_ = env;
    inner_->rehome(env);
  }

 private:
  void fail(const std::string& what) const { report(name_, what); }

  void check_home(const char* what) const {
    if (env_.on_home && !env_.on_home()) fail(std::string(what) + " off the node's home thread");
  }

  void drained(const char* what) const {
    if (!live_.empty()) fail(std::string(what) + " with " + std::to_string(live_.size()) + " request(s) in the driver");
  }

  void check_request(const io_request& r) const {
    std::string op = op_name(r.op);
    if (r.offset < 0 || r.length < 0) return fail(op + " with a negative offset or length");
    int64_t len = inner_->length();
    if (r.op != io_op::flush && (r.offset > len || r.length > len - r.offset))
      return fail(op + " of [" + std::to_string(r.offset) + ", +" + std::to_string(r.length) + ") beyond the length " +
                  std::to_string(len));
    bool payload = r.op == io_op::read || r.op == io_op::write;
    if (payload) {
      int64_t total = 0;
      for (int i = 0; i < r.iovcnt; ++i) total += int64_t(r.iov[i].iov_len);
      if (total != r.length) return fail(op + " whose scatter list covers " + std::to_string(total) + " of " +
                                         std::to_string(r.length) + " bytes");
      auto lim = inner_->limits();
      uint32_t a = lim.request_alignment ? lim.request_alignment : 1;
      if (r.offset % a || r.length % a)
        return fail(op + " of [" + std::to_string(r.offset) + ", +" + std::to_string(r.length) +
                    ") not aligned to the driver's " + std::to_string(a) + " bytes");
      if (lim.max_transfer > 0 && r.length > lim.max_transfer)
        return fail(op + " of " + std::to_string(r.length) + " bytes over the driver's max transfer " +
                    std::to_string(lim.max_transfer));
    }
    if (r.op == io_op::write_zeroes || r.op == io_op::discard) {
      // The node cuts these to the driver's limits (node_split.cpp).
      auto lim = inner_->limits();
      int64_t max = r.op == io_op::discard ? lim.max_discard : lim.max_write_zeroes;
      if (max > 0 && r.length > max)
        return fail(op + " of " + std::to_string(r.length) + " bytes over the driver's limit " + std::to_string(max));
    }
    uint32_t allowed = 0;
    if (r.op == io_op::read && (inner_->caps() & cap_copy_on_read)) allowed = io_copy_up;
    if (r.op == io_op::write) allowed = io_fua | ((inner_->caps() & cap_compress) ? uint32_t(io_compress) : 0u);
    if (r.op == io_op::write_zeroes) allowed = io_fua | io_may_unmap | io_no_fallback;
    if (r.flags & ~allowed) return fail(op + " with flags it may not carry (" + std::to_string(r.flags) + ")");
    if ((r.flags & io_fua) && !(inner_->caps() & cap_fua))
      return fail(op + " with FUA to a driver without cap_fua (the node must emulate it)");
  }

  void io_done(io_request& s) override {
    auto it = live_.find(&s);
    if (it == live_.end()) return fail("a request was completed twice (or one the driver never got)");
    if (submitting_ > 0) fail(std::string(op_name(s.op)) + " completed inside submit()");
    check_home("completion");
    io_request& r = *it->second;
    live_.erase(it);
    if (s.result > 0) fail(std::string(op_name(s.op)) + " completed with a positive result " + std::to_string(s.result));
    if (s.op == io_op::block_status && s.result == 0 && s.length > 0 &&
        (s.status_length <= 0 || s.status_length > s.length))
      fail("block_status answered an extent of " + std::to_string(s.status_length) + " bytes for a request of " +
           std::to_string(s.length));
    r.result = s.result;
    r.status = s.status;
    r.status_length = s.status_length;
    r.depth = s.depth;
    // A freed shadow waits a while before reuse, so a late second completion finds it absent from
    // live_ (and is reported) instead of completing whichever request got it next.
    quarantine_.push_back(&s);
    if (quarantine_.size() > 256) {
      pool_.put(quarantine_.front());
      quarantine_.pop_front();
    }
    r.complete(r.result);
  }

  std::unique_ptr<block_driver> inner_;
  std::string name_;
  driver_env env_;
  request_pool pool_;
  std::unordered_map<io_request*, io_request*> live_;  // shadow -> the node's request
  std::deque<io_request*> quarantine_;
  int submitting_ = 0;
};

}  // namespace

void set_contract_handler(contract_handler h) {
  std::lock_guard<std::mutex> g(handler_mx);
  handler() = std::move(h);
}

bool contract_checks_enabled() {
  int f = forced.load();
  return f >= 0 ? f != 0 : checks_state() != 0;
}

void set_contract_checks(bool on) { forced = on ? 1 : 0; }

std::unique_ptr<block_driver> check_contract(std::unique_ptr<block_driver> drv, std::string node_name,
                                             driver_env env) {
  return std::make_unique<checked_driver>(std::move(drv), std::move(node_name), std::move(env));
}

}  // namespace blockd::block

// throttle: a filter that holds requests to its throttle group's limits (FIFO per direction, woken by a timer on its own loop); data path on the home iothread, wake-ups posted from any thread.
#include <time.h>

#include <cerrno>
#include <deque>
#include <mutex>

#include "config/objects/throttle_group.h"
#include "protocol/qmp/schema.h"
#include "storage/block/filter.h"
#include "storage/io/reactor.h"

namespace blockd::block {
namespace {

uint64_t mono_ns() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return uint64_t(ts.tv_sec) * 1000000000u + uint64_t(ts.tv_nsec);
}

class throttle_driver;

// What other threads may touch of a throttle node: where its loop is, and the latest wake-up per
// direction. Shared with the closures and timers in flight, so a wake-up that outlives the node or
// its move to another iothread finds out instead of running code on the wrong thread.
struct member_core {
  std::mutex mu;
  driver_env env;      // the node's current home (rehome replaces it)
  uint64_t gen = 0;    // bumped by rehome: work posted to the old home moves on to the new one
  throttle_driver* owner = nullptr;  // null once closed; read on the home only
  uint64_t seq[2] = {0, 0};          // the latest schedule_wake per direction (older ones are dropped)
};

void arm(std::shared_ptr<member_core> c, uint64_t gen, bool w, uint64_t seq, uint64_t deadline);

// A reactor timer for one wake-up; on expiry it re-checks on the loop it fired on.
struct wake_timer final : io::completion {
  std::shared_ptr<member_core> core;
  uint64_t gen, seq, deadline;
  bool w;
  void complete(int) override {
    auto c = std::move(core);
    uint64_t g = gen, s = seq, d = deadline;
    bool ww = w;
    delete this;
    arm(std::move(c), g, ww, s, d);
  }
};

class throttle_driver final : public filter_driver, public qom::throttle_member {
 public:
  throttle_driver(child_ref child, std::shared_ptr<qom::throttle_state> st, std::string group, driver_env env)
      : filter_driver(child), state_(std::move(st)), group_(std::move(group)), core_(std::make_shared<member_core>()) {
    core_->env = std::move(env);
    core_->owner = this;
    state_->attach(this);
  }
  ~throttle_driver() override { close(); }

  void close() override {
    if (!state_) return;
    state_->detach(this);
    state_.reset();
    std::lock_guard g(core_->mu);
    core_->owner = nullptr;
  }

  void rehome(const driver_env& env) override {
    std::lock_guard g(core_->mu);
    core_->env = env;
    ++core_->gen;
  }

  // Quiescing: what waits goes now and new requests pass unthrottled until resume (QEMU's
  // io_limits_disabled), so a drain never waits for the limits.
  void drain_begin() override {
    ++limits_off_;
    for (bool w : {false, true})
      while (!queue_[w].empty()) {
        io_request* r = queue_[w].front();
        queue_[w].pop_front();
        state_->on_wake(this, w, true, uint64_t(r->length), mono_ns());
        pass_down(*r, 0);
      }
  }
  void drain_end() override {
    if (limits_off_) --limits_off_;
  }

  void submit(io_request& r) override {
    bool w;
    switch (r.op) {
      case io_op::read: w = false; break;
      case io_op::write:
      case io_op::write_zeroes:
      case io_op::discard: w = true; break;  // QEMU throttles zeroes and discards as writes
      default: return pass_down(r, 0);       // flush, block status: not throttled
    }
    if (limits_off_ || state_->intercept(this, w, uint64_t(r.length), mono_ns())) return pass_down(r, 0);
    queue_[w].push_back(&r);
  }

  // Any thread, with the group's lock held: note the wake-up and post it to the home loop.
  void schedule_wake(bool w, uint64_t deadline) override {
    std::unique_lock g(core_->mu);
    uint64_t s = ++core_->seq[w];
    uint64_t gen = core_->gen;
    if (core_->env.on_home && core_->env.on_home()) {
      g.unlock();
      // On the home already (our own request scheduled us): a timer at once, or a wake-up next turn.
      start_wake(core_, gen, w, s, deadline);
      return;
    }
    auto defer = core_->env.defer;
    g.unlock();
    defer([c = core_, gen, w, s, deadline] { arm(c, gen, w, s, deadline); });
  }

  // The wake-up ran on the home loop: the head of the queue may go (the group says).
  void on_wake(bool w) {
    if (!state_) return;
    bool has = !queue_[w].empty();
    uint64_t bytes = has ? uint64_t(queue_[w].front()->length) : 0;
    if (!state_->on_wake(this, w, has, bytes, mono_ns())) return;
    io_request* r = queue_[w].front();
    queue_[w].pop_front();
    pass_down(*r, 0);
  }

  // Waits on the home loop; a deferred wake-up so nothing completes inside the caller.
  static void start_wake(const std::shared_ptr<member_core>& c, uint64_t gen, bool w, uint64_t s, uint64_t deadline) {
    io::reactor* re;
    std::function<void(std::function<void()>)> defer;
    {
      std::lock_guard g(c->mu);
      re = c->env.reactor;
      defer = c->env.defer;
    }
    uint64_t now = mono_ns();
    if (deadline > now && re) {
      auto* t = new wake_timer;
      t->core = c;
      t->gen = gen;
      t->seq = s;
      t->deadline = deadline;
      t->w = w;
      re->timeout(deadline - now, t);
      return;
    }
    defer([c, gen, w, s] { arm(c, gen, w, s, 0); });
  }

  // The group this node is in (reopen may move it to another).
  result<std::unique_ptr<reopen_state>> reopen_prepare(const reopen_args& a, std::vector<std::string>& consumed) override {
    consumed = {"throttle-group"};
    auto* v = a.options.if_contains("throttle-group");
    std::string id = v && v->is_string() ? std::string(v->as_string()) : group_;
    if (id == group_) return std::make_unique<reopen_state>();
    auto st = a.objects ? a.objects->throttle_group(id) : nullptr;
    if (!st) return fail("Throttle group '" + id + "' does not exist");
    struct move final : reopen_state {
      throttle_driver* d;
      std::shared_ptr<qom::throttle_state> to;
      std::string id;
      void commit() override {
        // Quiesced: nothing is queued, so the member leaves one group and joins the other whole.
        d->state_->detach(d);
        d->state_ = to;
        d->group_ = id;
        d->state_->attach(d);
      }
    };
    auto m = std::make_unique<move>();
    m->d = this;
    m->to = std::move(st);
    m->id = id;
    return std::unique_ptr<reopen_state>(std::move(m));
  }

  std::shared_ptr<member_core> core() const { return core_; }

 private:
  std::shared_ptr<qom::throttle_state> state_;
  std::string group_;
  std::shared_ptr<member_core> core_;
  std::deque<io_request*> queue_[2];  // waiting requests, FIFO per direction (read, write)
  int limits_off_ = 0;                // quiesced: requests pass without waiting
};

// Runs on whatever loop the closure or timer was posted to: drop a superseded wake-up, follow a
// move to another iothread, wait out the deadline, then wake the member.
void arm(std::shared_ptr<member_core> c, uint64_t gen, bool w, uint64_t seq, uint64_t deadline) {
  std::unique_lock g(c->mu);
  if (!c->owner || c->seq[w] != seq) return;
  if (c->gen != gen) {
    auto defer = c->env.defer;
    uint64_t ng = c->gen;
    g.unlock();
    defer([c, ng, w, seq, deadline] { arm(c, ng, w, seq, deadline); });
    return;
  }
  throttle_driver* d = c->owner;
  g.unlock();
  if (deadline > mono_ns()) return throttle_driver::start_wake(c, gen, w, seq, deadline);
  d->on_wake(w);
}

result<std::unique_ptr<block_driver>> open_throttle(open_args& a) {
  node* child = a.find_child("file");
  if (!child) return fail("throttle node needs a file child");
  std::string id(a.options.at("throttle-group").as_string());
  auto st = a.objects->throttle_group(id);
  if (!st) return fail("Throttle group '" + id + "' does not exist");
  return std::unique_ptr<block_driver>(new throttle_driver(child_ref(a.edge("file")), std::move(st), id, a.env));
}

}  // namespace

void register_throttle_driver() {
  driver_entry e{"throttle", false, {"file"}, open_throttle, nullptr};
  e.options_type = "BlockdevOptionsThrottle";
  e.is_filter = true;
  e.define_options = [](qmp::schema& s) { s.object("BlockdevOptionsThrottle", "throttle-group:str file:BlockdevRef"); };
  register_driver(std::move(e));
}

}  // namespace blockd::block

// copy-before-write: a filter that copies the old data of what a guest write, write-zeroes or discard is about to change to its target first (image fleecing, backup); home iothread only.
#include "formats/filters/copy_before_write.h"

#include <algorithm>
#include <cerrno>
#include <memory>
#include <vector>

#include "protocol/qmp/schema.h"
#include "storage/block/co.h"
#include "storage/block/copy_engine.h"
#include "storage/block/filter.h"
#include "storage/io/reactor.h"

namespace blockd::block {
namespace {

constexpr int64_t default_cluster = 65536;  // QEMU's block-copy default and minimum

enum class on_cbw_error : uint8_t { break_guest_write, break_snapshot };

// One copy_now a guest write waits on, with the cbw-timeout timer racing it. Shared by the engine's
// callback, the timer and the waiting coroutine: whichever answers first resumes it, the other
// finds `answered` set and does nothing.
struct copy_wait {
  std::coroutine_handle<> h;
  int res = 0;
  bool answered = false;
  io::reactor* reactor = nullptr;
  io::completion* timer = nullptr;  // armed, not yet fired
  void answer(int r) {
    if (answered) return;
    answered = true;
    res = r;
    if (timer && reactor) reactor->cancel(std::exchange(timer, nullptr));
    h.resume();
  }
};

struct copy_timer final : io::completion {
  std::shared_ptr<copy_wait> w;
  void complete(int res) override {
    auto keep = std::move(w);
    delete this;
    if (res == -ECANCELED) return;  // the copy answered first and cancelled us
    keep->timer = nullptr;
    keep->answer(-ETIMEDOUT);
  }
};

class cbw_filter final : public filter_driver, public cbw_state {
 public:
  cbw_filter(child_ref file, child_ref target, driver_env env, int64_t cluster, on_cbw_error mode, uint32_t timeout_s)
      : filter_driver(file), target_(target), env_(std::move(env)), cluster_(cluster), mode_(mode), timeout_s_(timeout_s),
        done_("", uint64_t(cluster), file->length()), access_("", uint64_t(cluster), file->length()) {
    copy_settings s;
    s.source = file.get();
    s.target = target.get();
    s.granularity = cluster;
    s.max_chunk = std::max<int64_t>(cluster, 1 << 20);
    s.zeroes_charged = true;
    engine_ = std::make_unique<copy_engine>(s, copy_callbacks{});
    // Until told otherwise (a bitmap, a backup job's sync mode) every chunk holds data of the moment
    // the filter was opened: each is copied before its first overwrite, and readable in the view.
    engine_->work_map().set(0, file->length());
    access_.set(0, file->length());
    waiters_.bind(&env_.defer);
  }

  // Only the user bitmap's dirty chunks are of interest: the others are never copied nor readable.
  void limit_to(const dirty_bitmap& b) {
    engine_->work_map().clear();
    engine_->work_map().merge_from(b);
    access_.clear();
    access_.merge_from(b);
  }

  void* driver_extension(const char* id) override { return std::string_view(id) == cbw_state::id ? static_cast<cbw_state*>(this) : nullptr; }
  void rehome(const driver_env& env) override {
    env_ = env;
    waiters_.bind(&env_.defer);
  }

  void child_perm(const std::string& role, bool, uint32_t node_perm, uint32_t node_shared, uint32_t& perm,
                  uint32_t& shared) const override {
    if (role == "target") {
      // The target is written behind the guest's back; its own backing chain may be the disk
      // itself (fleecing), so writes are shared. A resize would break the fixed chunk map.
      perm = perm_write;
      shared = perm_all & ~perm_resize;
      return;
    }
    // The disk: once the filter has users, nobody else may write it past the filter (that write
    // would not be copied first). A filter nobody uses yet shares everything, so it can be opened
    // over a disk others still write and then take their place (QEMU: only with parents).
    perm = node_perm | perm_consistent_read;
    shared = node_perm ? node_shared & ~(perm_write | perm_resize) : node_shared;
  }
  result<void> truncate(int64_t) override {
    return fail("Cannot resize a copy-before-write node: its chunk map is fixed; remove the filter first");
  }
  uint32_t caps() const override { return filter_driver::caps() & ~uint32_t(cap_resize); }

  void close() override {
    // The engine goes with the filter; a job that used it has let go of it. A copy a timed-out guest
    // write left behind (cbw-timeout) may still be out on the children, which are open until we are
    // closed: it is waited for here, or its completion would find the engine gone.
    if (engine_ && engine_->in_flight() > 0 && env_.block_on) {
      (void)env_.block_on([this](std::function<void(int)> done) {
        copy_callbacks cb;
        cb.on_cancelled = [done] { done(0); };
        engine_->set_callbacks(std::move(cb));
        engine_->cancel();
      });
    }
    engine_.reset();
  }

  void submit(io_request& r) override {
    if (!is_write_op(r.op) || r.length == 0) return pass_down(r, 0);
    co::start(before_write(r), [this, &r](int rc) {
      if (rc < 0) return r.complete(rc);
      pass_down(r, 0);
    });
  }

  // ---- cbw_state -----------------------------------------------------------------------------
  copy_engine& engine() override { return *engine_; }
  node* source() const override { return child_.get(); }
  node* target() const override { return target_.get(); }
  int64_t cluster_size() const override { return cluster_; }
  int snapshot_error() const override { return snapshot_error_; }

  where lookup(int64_t offset, int64_t length, int64_t& run) const override {
    int64_t end = std::min(offset + std::max<int64_t>(length, 1), child_->length());
    if (offset >= end) {
      run = std::max<int64_t>(length, 1);
      return where::none;
    }
    bool acc = false, done = false;
    int64_t a_end = access_.run_end(offset, end, acc);
    if (!acc) {
      run = a_end - offset;
      return where::none;
    }
    int64_t d_end = done_.run_end(offset, a_end, done);
    run = d_end - offset;
    return done ? where::target : where::source;
  }

  uint64_t read_lock(int64_t offset, int64_t length) override {
    locks_.push_back(read_range{++lock_seq_, offset, offset + length});
    return lock_seq_;
  }
  void read_unlock(uint64_t ticket) override {
    std::erase_if(locks_, [ticket](const read_range& l) { return l.ticket == ticket; });
    waiters_.wake_all();  // each re-checks what it waits for
  }

  void snapshot_discard(int64_t offset, int64_t length, std::function<void(int)> done) override {
    co::start(discard_view(offset, length), std::move(done));
  }

 private:
  struct read_range {
    uint64_t ticket;
    int64_t off, end;
  };

  bool read_locked(int64_t off, int64_t end) const {
    return std::any_of(locks_.begin(), locks_.end(), [&](const read_range& l) { return l.off < end && off < l.end; });
  }

  // The chunks [offset, offset+length) touches, as a byte range.
  void widen(int64_t offset, int64_t length, int64_t& lo, int64_t& hi) const {
    lo = offset / cluster_ * cluster_;
    hi = std::min((offset + length + cluster_ - 1) / cluster_ * cluster_, child_->length());
  }

  struct copy_awaiter {
    cbw_filter& f;
    int64_t off, len;
    std::shared_ptr<copy_wait> w = std::make_shared<copy_wait>();
    bool await_ready() const noexcept { return false; }
    void await_suspend(std::coroutine_handle<> h) {
      w->h = h;
      if (f.timeout_s_ > 0 && f.env_.reactor) {
        auto* t = new copy_timer;
        t->w = w;
        w->reactor = f.env_.reactor;
        w->timer = t;
        f.env_.reactor->timeout(uint64_t(f.timeout_s_) * 1000000000ull, t);
      }
      f.engine_->copy_now(off, len, [w = w](int rc) { w->answer(rc); });
    }
    int await_resume() const noexcept { return w->res; }
  };

  co::task<int> before_write(io_request& r) {
    // A broken snapshot is not copied any more (QEMU's snapshot_error): the guest goes on.
    if (snapshot_error_ == 0 && engine_) {
      int64_t lo, hi;
      widen(r.offset, r.length, lo, hi);
      // A named awaiter: GCC 12 (PR 99576, fixed in 13) copies the temporary that initialises a
      // non-trivial member of a braced awaiter in a co_await statement and destroys both copies.
      copy_awaiter copy{*this, lo, hi - lo};
      int rc = co_await copy;
      if (rc < 0) {
        if (mode_ == on_cbw_error::break_guest_write) co_return rc;
        snapshot_error_ = rc;
      } else {
        // Old data is on the target now: the view reads it there, so guest writes need not wait
        // for view reads that start from here on.
        done_.set(lo, hi - lo);
      }
      // View reads already on their way to the source read the old data: the write waits for them.
      while (read_locked(lo, hi)) co_await waiters_.wait();
    }
    co_return 0;
  }

  co::task<int> discard_view(int64_t offset, int64_t length) {
    // Only whole chunks leave the view (QEMU aligns inwards).
    int64_t lo = (offset + cluster_ - 1) / cluster_ * cluster_;
    int64_t hi = std::min(offset + length, child_->length());
    if (hi < child_->length()) hi = hi / cluster_ * cluster_;
    if (hi <= lo) co_return 0;
    while (read_locked(lo, hi)) co_await waiters_.wait();
    access_.reset(lo, hi - lo);
    done_.reset(lo, hi - lo);
    engine_->work_map().reset(lo, hi - lo);
    co_return co_await co::child_io(*target_, io_op::discard, lo, hi - lo);
  }

  child_ref target_;
  driver_env env_;
  int64_t cluster_;
  on_cbw_error mode_;
  uint32_t timeout_s_;
  std::unique_ptr<copy_engine> engine_;
  dirty_bitmap done_, access_;
  int snapshot_error_ = 0;
  std::vector<read_range> locks_;
  uint64_t lock_seq_ = 0;
  co::wait_list waiters_;
};

result<std::unique_ptr<block_driver>> open_cbw(open_args& a) {
  node* file = a.find_child("file");
  node* target = a.find_child("target");
  if (!file || !target) return fail("copy-before-write node needs a file and a target child");
  on_cbw_error mode = on_cbw_error::break_guest_write;
  if (auto* v = a.options.if_contains("on-cbw-error"); v && v->as_string() == "break-snapshot")
    mode = on_cbw_error::break_snapshot;
  uint32_t timeout_s = 0;
  if (auto* v = a.options.if_contains("cbw-timeout")) timeout_s = v->to_number<uint32_t>();
  int64_t min_cluster = 0;
  if (auto* v = a.options.if_contains("min-cluster-size")) {
    uint64_t m = v->to_number<uint64_t>();
    if (m & (m - 1)) return fail("min-cluster-size needs to be a power of 2");
    if (m > uint64_t(INT64_MAX)) return fail("min-cluster-size too large: " + std::to_string(m) + " > " + std::to_string(INT64_MAX));
    min_cluster = int64_t(m);
  }
  const dirty_bitmap* bm = nullptr;
  if (auto* v = a.options.if_contains("bitmap")) {
    auto& o = v->as_object();
    std::string bnode(o.at("node").as_string()), bname(o.at("name").as_string());
    node* owner = a.find_node ? a.find_node(bnode) : nullptr;
    if (!owner) return fail("Node '" + bnode + "' not found");
    bm = owner->bitmaps().find(bname);
    if (!bm) return fail("Dirty bitmap '" + bname + "' not found");
  }
  // QEMU's block-copy chunk: the target's cluster size, at least 64 KiB and min-cluster-size.
  int64_t tc = target->facts() ? target->facts()->cluster_size : 0;
  int64_t cluster = std::max({default_cluster, tc, min_cluster});
  auto f = std::make_unique<cbw_filter>(child_ref(a.edge("file")), child_ref(a.edge("target")), a.env, cluster, mode,
                                        timeout_s);
  if (bm) f->limit_to(*bm);
  return std::unique_ptr<block_driver>(std::move(f));
}

}  // namespace

void register_cbw_driver() {
  driver_entry e{"copy-before-write", false, {"file", "target"}, open_cbw, nullptr};
  e.is_filter = true;
  e.weak_options = {"on-cbw-error", "cbw-timeout"};
  e.options_type = "BlockdevOptionsCbw";
  e.define_options = [](qmp::schema& s) {
    s.enumeration("OnCbwError", "break-guest-write break-snapshot");
    if (!s.find_type("BlockDirtyBitmap")) s.object("BlockDirtyBitmap", "node:str name:str");
    s.object("BlockdevOptionsCbw",
             "file:BlockdevRef target:BlockdevRef *bitmap:BlockDirtyBitmap *on-cbw-error:OnCbwError "
             "*cbw-timeout:uint32 *min-cluster-size:size");
  };
  register_driver(std::move(e));
}

}  // namespace blockd::block

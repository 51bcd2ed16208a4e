// The mirror's write hook: dirty marking (background) and writes to both sides (write-blocking); home iothread only.
#include "storage/block/mirror_hook.h"

#include "storage/block/node.h"

namespace blockd::block {

// One guest write in write-blocking mode: its lock, its copy to the target and which side is done.
struct mirror_hook::active_write final : io_waiter {
  mirror_hook* h = nullptr;
  io_request* guest = nullptr;
  io_request target;  // the same op, offset and payload (the guest's buffers: they live until it completes)
  int64_t offset = 0, length = 0;
  bool source_done = false, target_finished = false, held = false;
  int source_res = 0, target_res = 0;
  void io_done(io_request&) override { h->target_done(*this); }
};

mirror_hook::mirror_hook(node& source, node& target, copy_engine& engine, callbacks cb)
    : source_(source), target_(target), engine_(engine), cb_(std::move(cb)) {
  gates = true;
}

mirror_hook::~mirror_hook() = default;

void mirror_hook::stop() {
  stopped_ = true;
  check_drained();
}

void mirror_hook::check_drained() {
  if (stopped_ && writes_.empty() && cb_.drained) std::exchange(cb_.drained, nullptr)();
}

bool mirror_hook::before_write(io_request& r) {
  if (stopped_ || !blocking_ || r.op == io_op::discard) {
    ++untracked_;
    return true;
  }
  std::unique_ptr<active_write> w;
  if (!spare_.empty()) {
    w = std::move(spare_.back());
    spare_.pop_back();
  } else {
    w = std::make_unique<active_write>();
    w->h = this;
  }
  w->guest = &r;
  w->offset = r.offset;
  w->length = r.length;
  w->source_done = w->target_finished = w->held = false;
  w->source_res = w->target_res = 0;
  active_write& ref = *w;
  writes_.emplace(&r, std::move(w));
  if (engine_.lock_range(r.offset, r.length, [this, &ref] { go(ref, false); })) {
    go(ref, true);
    return true;
  }
  return false;  // a copy or another guest write holds these chunks: go() releases it
}

void mirror_hook::go(active_write& w, bool immediate) {
  // Both sides at once; the guest hears of it when both are done (hold_completion).
  io_request& t = w.target;
  io_request& g = *w.guest;
  t.reset();
  t.op = g.op;
  t.offset = g.offset;
  t.length = g.length;
  t.iov = g.iov;
  t.iovcnt = g.iovcnt;
  // io_control: a drain of the source waits for this guest write, so its target half must pass a
  // quiesce of the target (the pivot and job start quiesce both).
  t.flags = (g.flags & (io_fua | io_may_unmap | io_no_fallback)) | io_control;
  if (!engine_.settings().may_unmap) t.flags &= ~uint32_t(io_may_unmap);  // as the job's own zero writes
  t.waiter = &w;
  target_.submit(t);
  if (!immediate) source_.release_write(g);
}

void mirror_hook::after_write(const io_request& r) {
  auto it = writes_.find(const_cast<io_request*>(&r));
  if (it == writes_.end()) {
    if (untracked_) --untracked_;
    if (stopped_ || r.result < 0) return;
    engine_.mark_dirty(r.offset, r.length);
    if (cb_.dirtied) cb_.dirtied();
    return;
  }
  it->second->source_done = true;
  it->second->source_res = r.result;
}

bool mirror_hook::hold_completion(io_request& r) {
  auto it = writes_.find(&r);
  if (it == writes_.end()) return false;
  active_write& w = *it->second;
  if (!w.target_finished) {
    w.held = true;
    return true;
  }
  end(w);
  return false;
}

void mirror_hook::target_done(active_write& w) {
  w.target_finished = true;
  w.target_res = w.target.result;
  if (!w.held) return;  // the source half is still on its way: hold_completion ends it
  io_request* g = w.guest;
  end(w);
  source_.release_completion(*g);
}

void mirror_hook::end(active_write& w) {
  // A failed source write leaves the target ahead of it: the chunks are copied again from what the
  // source reads. A chunk only counts as clean while no write of the old mode is still in flight
  // (one of those could land on the source after this one).
  bool synced = w.source_res == 0 && w.target_res == 0;
  engine_.unlock_range(w.offset, w.length, synced && untracked_ == 0);
  if (w.target_res < 0 && cb_.target_failed) cb_.target_failed(-w.target_res);
  if (synced && cb_.synced) cb_.synced(w.length);
  auto it = writes_.find(w.guest);
  spare_.push_back(std::move(it->second));
  writes_.erase(it);
  check_drained();
}

}  // namespace blockd::block

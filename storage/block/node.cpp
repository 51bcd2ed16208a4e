// Node request path: validation, accounting, write threshold, FUA emulation, quiescing; home iothread only.
#include "storage/block/node.h"

#include "storage/block/contract.h"
#include "storage/block/iov.h"

#include <time.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

namespace blockd::block {

int64_t node::now_ns() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return int64_t(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

node::node(node_settings s, std::unique_ptr<block_driver> drv, driver_env env, std::shared_ptr<bitmap_set> bitmaps)
    : s_(std::move(s)), drv_(std::move(drv)), env_(std::move(env)), bitmaps_(std::move(bitmaps)) {
  if (!bitmaps_) bitmaps_ = std::make_shared<bitmap_set>();
  sync_bitmap_hook();
  fua_waiter_.owner = this;
  if (contract_checks_enabled()) drv_ = check_contract(std::move(drv_), s_.name, env_);
  // Empty until whoever opens the node publishes the driver's facts on its home (the graph does
  // right after open); nothing reads the driver here, as a node may be built off its home.
  facts_.store(std::make_shared<const image_facts>());
}

void node::publish_facts() {
  auto f = std::make_shared<image_facts>(drv_->facts());
  bitmaps_->resize(drv_->length());
  f->bitmaps = bitmaps_->facts();
  facts_.store(std::shared_ptr<const image_facts>(std::move(f)), std::memory_order_release);
}

void node::add_write_hook(write_hook* h) {
  if (std::find(hooks_.begin(), hooks_.end(), h) == hooks_.end()) hooks_.push_back(h);
}

void node::remove_write_hook(write_hook* h) { std::erase(hooks_, h); }

void node::sync_bitmap_hook() {
  if (bitmaps_->recording())
    add_write_hook(bitmaps_.get());
  else
    remove_write_hook(bitmaps_.get());
}

void node::rehome(driver_env env) {
  env_ = std::move(env);
  drv_->rehome(env_);
}

node::~node() {
  // Parents go first (graph::destroy), so a format can still write its metadata to its children.
  *life_ = false;
  drv_->close();
}

namespace {
bool all_zero(const io_request& r) { return iov_is_zero(r.iov, r.iovcnt); }

op_stats* bucket(node_stats& st, io_op op) {
  switch (op) {
    case io_op::read: return &st.rd;
    case io_op::write:
    case io_op::write_zeroes: return &st.wr;
    case io_op::discard: return &st.unmap;
    case io_op::flush: return &st.flush;
    case io_op::block_status: break;
  }
  return nullptr;  // block status is not an accounted operation
}
}  // namespace

void node::submit(io_request& r) {
  // The node's own layer: what it changes (op and flags: detect-zeroes, discard, io_control) goes
  // back when it finishes, and the submitter is told through the layer's waiter.
  io_request::layer& l = r.push_layer(this);
  l.start_ns = now_ns();
  ++in_flight_;
  int64_t len = drv_->length();
  int err = 0;
  if (r.op != io_op::flush && (r.offset < 0 || r.length < 0 || r.offset > len || r.length > len - r.offset))
    err = -EINVAL;
  bool writes = r.op == io_op::write || r.op == io_op::write_zeroes || r.op == io_op::discard;
  if (!err && writes && (s_.read_only || !s_.active)) err = -EPERM;  // an inactive node's image may belong to another process
  if (!err && (r.op == io_op::read || r.op == io_op::write)) {
    int64_t total = 0;
    for (int i = 0; i < r.iovcnt; ++i) total += int64_t(r.iov[i].iov_len);
    if (total != r.length) err = -EINVAL;
  }
  if (!err && (r.op == io_op::read || r.op == io_op::write)) {
    uint32_t a = drv_->limits().request_alignment;
    // The driver's contract: it only sees aligned payload requests (alignment > 1 only with O_DIRECT).
    if (a > 1 && (r.offset % a || r.length % a)) err = -EINVAL;
  }
  // A compressed write to a driver that cannot store one fails, as in QEMU (never a plain write).
  if (!err && (r.flags & io_compress) && (r.op != io_op::write || !(drv_->caps() & cap_compress))) err = -ENOTSUP;
  if ((r.flags & io_copy_up) && (r.op != io_op::read || !(drv_->caps() & cap_copy_on_read))) r.flags &= ~uint32_t(io_copy_up);
  if (err) {
    if (auto* b = bucket(stats_, r.op)) b->invalid++;
    l.unaccounted = true;
    finish_later(r, err);
    return;
  }
  bool control = r.flags & io_control;
  r.flags &= ~uint32_t(io_control);
  if (quiesce_depth_ > 0 && !control) {
    held_.push_back(&r);
    return;
  }
  start(r);
}

void node::start(io_request& r) {
  if (r.op == io_op::write && s_.detect_zeroes != detect_zeroes_mode::off && all_zero(r)) {
    r.op = io_op::write_zeroes;
    if (s_.detect_zeroes == detect_zeroes_mode::unmap) r.flags |= io_may_unmap;
  }
  if (r.op == io_op::write_zeroes && !s_.discard_unmap) r.flags &= ~uint32_t(io_may_unmap);
  if ((r.op == io_op::discard && !s_.discard_unmap) || (r.op == io_op::flush && s_.no_flush)) {
    // discard=ignore and cache.no-flush: the request succeeds without touching storage.
    finish_later(r, 0);
    return;
  }
  if (is_write_op(r.op)) {
    r.top_layer().hooked = true;
    if (!hooks_.empty()) return run_hooks(r, 0);
  }
  to_driver(r);
}

void node::run_hooks(io_request& r, size_t from) {
  // Gating hooks in registration order; one that holds the request resumes it at the next one
  // (release_write). A hook list changed meanwhile only shifts who is asked next, never skips the
  // driver.
  for (size_t i = from; i < hooks_.size(); ++i) {
    if (!hooks_[i]->gates) continue;
    r.top_layer().hook_pos = uint8_t(std::min<size_t>(i, 255));
    if (!hooks_[i]->before_write(r)) return;
  }
  to_driver(r);
}

void node::release_write(io_request& r) { run_hooks(r, size_t(r.top_layer().hook_pos) + 1); }

void node::to_driver(io_request& r) {
  if ((r.flags & io_fua) && !(drv_->caps() & cap_fua)) {
    // The driver cannot make one write durable by itself: the node flushes after it (io_done).
    r.flags &= ~uint32_t(io_fua);
    r.top_layer().fua_emulated = true;
  }
  if ((r.op == io_op::write_zeroes || r.op == io_op::discard) && r.length > 0) {
    // Only these two ask for the limits (a virtual call down the filter chain): reads and writes,
    // and drivers without opt/max limits for them (all but blkdebug with them set), go straight on.
    driver_limits l = drv_->limits();
    bool z = r.op == io_op::write_zeroes;
    if (z ? (l.opt_write_zeroes | l.max_write_zeroes) : (l.opt_discard | l.max_discard)) return split_to_driver(r, l);
  }
  drv_->submit(r);
}

void node::finish_later(io_request& r, int res) {
  r.result = res;
  env_.defer([this, &r] { finish(r); });
}

void node::io_done(io_request& r) {
  if (r.top_layer().fua_emulated) {
    r.top_layer().fua_emulated = false;  // the submitter gets its flags back when the layer goes
    if (r.result != 0 || s_.no_flush) return finish(r);
    // Emulated FUA: the write is done; make it durable before the submitter hears of it.
    io_request* f = pool_.get();
    f->op = io_op::flush;
    f->user = &r;
    f->waiter = &fua_waiter_;
    drv_->submit(*f);
    return;
  }
  finish(r);
}

void node::fua_flush_waiter::io_done(io_request& f) {
  auto* r = static_cast<io_request*>(f.user);
  r->result = f.result;
  owner->pool_.put(&f);
  owner->finish(*r);
}

void node::finish(io_request& r) {
  io_request::layer& l = r.top_layer();
  if (l.hooked) {
    l.hooked = false;
    for (write_hook* h : hooks_) h->after_write(r);
    return completion_hooks(r, 0);
  }
  finish_rest(r);
}

void node::completion_hooks(io_request& r, size_t from) {
  // As run_hooks: gating hooks in order, one that holds resumes at the next (release_completion).
  for (size_t i = from; i < hooks_.size(); ++i) {
    if (!hooks_[i]->gates) continue;
    r.top_layer().hook_pos = uint8_t(std::min<size_t>(i, 255));
    if (hooks_[i]->hold_completion(r)) return;
  }
  finish_rest(r);
}

void node::release_completion(io_request& r) { completion_hooks(r, size_t(r.top_layer().hook_pos) + 1); }

void node::finish_rest(io_request& r) {
  io_request::layer& l = r.top_layer();
  int64_t end = now_ns();
  if (!l.unaccounted) account(r, l.start_ns, end);
  stats_.last_op_ns.set(end);
  if (r.result == 0 && (r.op == io_op::write || r.op == io_op::write_zeroes)) {
    uint64_t end_off = uint64_t(r.offset + r.length);
    if (end_off > stats_.wr_highest_offset) stats_.wr_highest_offset.set(end_off);
    uint64_t t = write_threshold();
    // One-shot, as QEMU's; the exchange keeps a concurrent block-set-write-threshold intact.
    if (t && end_off > t && write_threshold_.compare_exchange_strong(t, 0, std::memory_order_relaxed) && on_threshold)
      on_threshold(end_off - t, t);
  }
  --in_flight_;
  r.pop_layer();
  r.waiter->io_done(r);
  check_drained();
}

void node::account(const io_request& r, int64_t start_ns, int64_t end_ns) {
  auto* b = bucket(stats_, r.op);
  if (!b) return;
  if (r.result < 0) {
    b->failed++;
  } else {
    b->operations++;
    if (r.op != io_op::flush) b->bytes += uint64_t(r.length);
  }
  b->total_time_ns += uint64_t(end_ns - start_ns);
}

void node::check_drained() {
  if (quiesce_depth_ == 0 || in_flight_ != held_.size() || drained_.empty()) return;
  auto fns = std::move(drained_);
  drained_.clear();
  for (auto& fn : fns) fn();
}

void node::quiesce(std::function<void()> drained) {
  if (quiesce_depth_++ == 0) drv_->drain_begin();
  drained_.push_back(std::move(drained));
  check_drained();
}

void node::resume() {
  if (quiesce_depth_ == 0 || --quiesce_depth_ > 0) return;
  drv_->drain_end();
  auto held = std::move(held_);
  held_.clear();
  for (auto* r : held) start(*r);
}

}  // namespace blockd::block

namespace blockd::block {

std::vector<child_edge*> node::children() const {
  std::vector<child_edge*> out;
  for (auto& s : slots)
    if (s->child) out.push_back(s.get());
  std::stable_sort(out.begin(), out.end(), [](auto* a, auto* b) { return a->attached_seq < b->attached_seq; });
  return out;
}

child_edge* node::slot(const std::string& role) const {
  for (auto& s : slots)
    if (s->role == role) return s.get();
  return nullptr;
}

}  // namespace blockd::block

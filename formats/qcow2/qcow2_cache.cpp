// The qcow2 driver's metadata cache and its crash-ordered writeback: cached L2 slices and refcount blocks, loading, writing back, flushes, the header and the lazy-refcount dirty mark (class: driver_impl.h); home iothread only.
#include "formats/qcow2/driver_impl.h"

namespace blockd::qcow2 {

aligned_buf make_buf(size_t len, bool zero) {
  void* p = nullptr;
  if (posix_memalign(&p, 4096, std::max<size_t>(len, 512)) != 0) throw std::bad_alloc();
  if (zero) std::memset(p, 0, std::max<size_t>(len, 512));
  return aligned_buf(static_cast<uint8_t*>(p));
}

// ---- metadata cache ----------------------------------------------------------------------------

meta_block* meta_cache::find(uint64_t offset) {
  auto it = map_.find(offset);
  return it == map_.end() ? nullptr : it->second.get();
}

meta_block* meta_cache::insert(uint64_t offset, std::function<void(std::function<void()>)>* defer) {
  auto b = std::make_unique<meta_block>();
  b->offset = offset;
  b->data = make_buf(block_bytes_, false);
  b->ready.bind(defer);
  auto* p = b.get();
  map_[offset] = std::move(b);
  touch(p);
  return p;
}

void meta_cache::trim() {
  if (map_.size() <= capacity_) return;
  std::vector<meta_block*> victims;
  for (auto& [off, b] : map_)
    if (!b->dirty && !b->pins && !b->loading) victims.push_back(b.get());
  std::sort(victims.begin(), victims.end(), [](auto* a, auto* b) { return a->lru < b->lru; });
  size_t excess = map_.size() - capacity_;
  // Evict a little more than needed so a full cache does not scan on every insert.
  excess = std::min(victims.size(), excess + capacity_ / 8);
  for (size_t i = 0; i < excess; ++i) map_.erase(victims[i]->offset);
}

std::vector<meta_block*> meta_cache::dirty_blocks() {
  std::vector<meta_block*> v;
  for (auto& [off, b] : map_)
    if (b->dirty) v.push_back(b.get());
  std::sort(v.begin(), v.end(), [](auto* a, auto* b) { return a->offset < b->offset; });
  return v;
}

void meta_cache::clear_clean() {
  for (auto it = map_.begin(); it != map_.end();) {
    if (!it->second->dirty && !it->second->pins && !it->second->loading) it = map_.erase(it);
    else ++it;
  }
}


namespace impl {

// ---- cache --------------------------------------------------------------------------------------

task<int> qcow2_driver::load(meta_cache& c, uint64_t off, meta_block*& out, bool fresh) {
  meta_block* b = c.find(off);
  if (b) {
    ++b->pins;
    c.touch(b);
    while (b->loading) co_await b->ready.wait();
    if (b->error) {
      int e = b->error;
      unpin(c, b);
      co_return e;
    }
    out = b;
    co_return 0;
  }
  b = c.insert(off, &env_.defer);
  b->pins = 1;
  if (fresh) {
    std::memset(b->data.get(), 0, c.block_bytes());
  } else {
    b->loading = true;
    file_->driver().debug_event(&c == rc_cache_.get() ? blkdebug_event::refblock_load : blkdebug_event::l2_load);
    int r = co_await io(*file_, io_op::read, int64_t(off), int64_t(c.block_bytes())).buffer(b->data.get());
    b->loading = false;
    b->ready.wake_all();
    if (r < 0) {
      b->error = r;
      unpin(c, b);
      co_return r;
    }
  }
  c.trim();
  out = b;
  co_return 0;
}

// ---- writeback ----------------------------------------------------------------------------------

task<int> qcow2_driver::write_blocks(meta_cache& c) {
  auto dirty = c.dirty_blocks();
  if (dirty.empty()) co_return 0;
  file_->driver().debug_event(&c == rc_cache_.get() ? blkdebug_event::refblock_update : blkdebug_event::l2_update);
  join_state j;
  for (auto* b : dirty) {
    ++b->pins;
    start_piece(&j, [](qcow2_driver* d, meta_cache* c, meta_block* b) -> task<int> {
      int r = co_await d->io(*d->file_, io_op::write, int64_t(b->offset), int64_t(c->block_bytes())).buffer(b->data.get());
      if (r >= 0) c->set_dirty(b, false);
      d->unpin(*c, b);
      co_return r;
    }(this, &c, b));
  }
  while (j.left > 0) co_await j.done.wait();
  c.trim();
  co_return j.err;
}

void qcow2_driver::start_piece(join_state* j, task<int> t) {
  j->done.bind(&env_.defer);
  ++j->left;
  co::start(std::move(t), [j](int r) {
    if (r < 0 && !j->err) j->err = r;
    if (--j->left == 0) j->done.wake_all();
  });
}

task<int> qcow2_driver::writeback() {
  // A corrupt image gets no more metadata writes: what is cached may be what is wrong.
  if (corrupt_) co_return -EIO;
  bool wrote = false;
  if (rc_cache_->dirty_count()) {
    int r = co_await write_blocks(*rc_cache_);
    if (r < 0) co_return r;
    wrote = true;
  }
  if (l2_cache_->dirty_count()) {
    if (wrote) {
      int r = co_await io(*file_, io_op::flush, 0, 0);
      if (r < 0) co_return r;
    }
    int r = co_await write_blocks(*l2_cache_);
    if (r < 0) co_return r;
    wrote = true;
  }
  if (!pending_frees_.empty()) {
    // The tables that dropped these references are durable now; only then may the clusters go.
    int r = co_await io(*file_, io_op::flush, 0, 0);
    if (r < 0) co_return r;
    auto frees = std::move(pending_frees_);
    pending_frees_.clear();
    for (auto& f : frees) {
      // QEMU's qcow2_free_clusters announces each range it frees before the refcounts drop.
      file_->driver().debug_event(blkdebug_event::cluster_free);
      uint64_t first = f.host / cs_, last = (f.host + f.len - 1) / cs_;
      for (uint64_t c = first; c <= last; ++c) {
        uint64_t rc = 0;
        r = co_await get_refcount(c, rc);
        if (r < 0) co_return r;
        if (rc == 0) {
          signal_corruption("Cannot free cluster at offset " + std::to_string(c * cs_) + ": its refcount is already 0",
                            int64_t(c * cs_), int64_t(cs_));
          co_return -EIO;
        }
        r = co_await set_refcount(c, rc - 1);
        if (r < 0) co_return r;
        if (rc == 1) {
          free_hint_ = std::min(free_hint_, c);
          run_hint_ = std::min(run_hint_, c);
          if (compress_cursor_ / cs_ == c) compress_cursor_ = 0;  // its space is no longer ours
          meta_clusters_.erase(c);
          bool pass = f.why == free_request ? o_.pass_discard_request
                      : f.why == free_snapshot ? o_.pass_discard_snapshot
                                               : o_.pass_discard_other;
          if (pass) (void)co_await io(*file_, io_op::discard, int64_t(c * cs_), int64_t(cs_));
        }
      }
    }
  }
  co_return 0;
}

task<int> qcow2_driver::flush_all() {
  co_await meta_lock_.lock();
  co::guard g{meta_lock_};
  // Two rounds: the second writes the refcount decrements the first applied.
  int r = co_await writeback();
  if (r >= 0) r = co_await writeback();
  if (r >= 0) r = co_await io(*file_, io_op::flush, 0, 0);
  co_return r;
}

task<int> qcow2_driver::write_header() {
  auto bytes = serialize_header(h_);
  if (!bytes) co_return -EINVAL;
  uint64_t len = (bytes->size() + std::max<uint64_t>(align_, 1) - 1) / std::max<uint64_t>(align_, 1) * std::max<uint64_t>(align_, 1);
  len = std::min<uint64_t>(std::max<uint64_t>(len, bytes->size()), cs_);
  auto buf = make_buf(len);
  std::memcpy(buf.get(), bytes->data(), bytes->size());
  co_return co_await io(*file_, io_op::write, 0, int64_t(len)).buffer(buf.get());
}

// Lazy refcounts: the first metadata change marks the image dirty (a crash then means a refcount
// rebuild on the next open); the mark is cleared when the image is closed cleanly.
task<int> qcow2_driver::mark_dirty_flag() {
  if (!o_.lazy_refcounts || dirty_flag_set_) co_return 0;
  h_.incompatible_features |= incompat_dirty;
  int r = co_await write_header();
  if (r >= 0) r = co_await io(*file_, io_op::flush, 0, 0);
  if (r < 0) {
    h_.incompatible_features &= ~incompat_dirty;
    co_return r;
  }
  dirty_flag_set_ = true;
  co_return 0;
}

// Dirty tables stay cached until a flush, or until a cache overflows with them (clean blocks are
// evicted first; dirty ones can only go once written): writing back early would rewrite the same
// tables over and over under a random write load, holding the metadata lock and flushing each time.
task<int> qcow2_driver::maybe_writeback() {
  // Only a cache that has outgrown its capacity (every block it could evict is dirty) forces one: a
  // cache exactly as large as the image's tables stays dirty until the next flush.
  if (l2_cache_->size() <= l2_cache_->capacity() && rc_cache_->size() <= rc_cache_->capacity() &&
      pending_frees_.size() < 4096)
    co_return 0;
  co_await meta_lock_.lock();
  co::guard g{meta_lock_};
  co_return co_await writeback();
}

}  // namespace impl
}  // namespace blockd::qcow2

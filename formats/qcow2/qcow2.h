// The qcow2 format driver: state of one open image (tables, caches, allocator) and its coroutines; home iothread only.
#pragma once
#include <boost/json.hpp>

#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "formats/qcow2/layout.h"
#include "storage/block/co.h"
#include "storage/block/driver.h"

namespace blockd::qcow2 {

using block::co::task;

// Buffers for the image file: aligned for O_DIRECT, freed with free().
struct aligned_deleter {
  void operator()(uint8_t* p) const { std::free(p); }
};
using aligned_buf = std::unique_ptr<uint8_t[], aligned_deleter>;
aligned_buf make_buf(size_t len, bool zero = true);

// What the user chose for this node (BlockdevOptionsQcow2), resolved to numbers.
struct open_options {
  bool lazy_refcounts = false;
  bool pass_discard_request = false;
  bool pass_discard_snapshot = true;
  bool pass_discard_other = false;
  bool discard_no_unref = false;
  uint32_t overlap = 0;  // overlap_* bits
  uint64_t l2_cache_bytes = 0;
  uint64_t l2_slice_bytes = 0;
  uint64_t refcount_cache_bytes = 0;
  int64_t cache_clean_interval = 600;
};

enum overlap_bit : uint32_t {
  overlap_main_header = 1u << 0,
  overlap_active_l1 = 1u << 1,
  overlap_active_l2 = 1u << 2,
  overlap_refcount_table = 1u << 3,
  overlap_refcount_block = 1u << 4,
  overlap_snapshot_table = 1u << 5,
  overlap_inactive_l1 = 1u << 6,
  overlap_inactive_l2 = 1u << 7,
  overlap_bitmap_directory = 1u << 8,
};

// One L2 slice or refcount block held in memory.
struct meta_block {
  uint64_t offset = 0;  // where it lives in the image file
  aligned_buf data;
  bool loading = false;
  bool dirty = false;
  int error = 0;
  int pins = 0;
  uint64_t lru = 0;
  block::co::wait_list ready;
};

// A bounded cache of metadata blocks of one size. Blocks in use are pinned; clean unpinned blocks
// are evicted least recently used first; dirty ones wait for the next writeback.
class meta_cache {
 public:
  meta_cache(size_t block_bytes, size_t capacity) : block_bytes_(block_bytes), capacity_(capacity) {}
  size_t block_bytes() const { return block_bytes_; }
  meta_block* find(uint64_t offset);
  meta_block* insert(uint64_t offset, std::function<void(std::function<void()>)>* defer);
  void erase(uint64_t offset) {
    auto it = map_.find(offset);
    if (it == map_.end()) return;
    if (it->second->dirty) --dirty_;
    map_.erase(it);
  }
  // Every change of a block's dirty state goes through here, so dirty_count() is O(1) on the write path.
  void set_dirty(meta_block* b, bool d) {
    if (b->dirty != d) dirty_ += d ? 1 : -1;
    b->dirty = d;
  }
  void touch(meta_block* b) { b->lru = ++clock_; }
  void trim();  // evicts clean, unpinned blocks beyond the capacity
  size_t dirty_count() const { return dirty_; }
  std::vector<meta_block*> dirty_blocks();
  void clear_clean();  // drops every clean unpinned block (inactivate, refcount rebuild)
  // cache-clean-interval: drops clean, unpinned blocks not used since the previous call.
  void clean_unused() {
    for (auto it = map_.begin(); it != map_.end();) {
      auto& b = *it->second;
      if (!b.dirty && !b.pins && !b.loading && b.lru <= clean_mark_) it = map_.erase(it);
      else ++it;
    }
    clean_mark_ = clock_;
  }
  size_t size() const { return map_.size(); }
  size_t capacity() const { return capacity_; }

 private:
  size_t block_bytes_;
  size_t capacity_;
  uint64_t clock_ = 0;
  uint64_t clean_mark_ = 0;
  size_t dirty_ = 0;
  std::unordered_map<uint64_t, std::unique_ptr<meta_block>> map_;
};

// An internal snapshot as the snapshot table holds it.
struct snapshot {
  uint64_t l1_offset = 0;
  uint32_t l1_size = 0;
  std::string id, name;
  uint32_t date_sec = 0, date_nsec = 0;
  uint64_t vm_clock_nsec = 0;
  uint32_t vm_state_size = 0;
  uint64_t vm_state_size_large = 0;
  uint64_t disk_size = 0;
  bool has_disk_size = false;
  uint64_t icount = ~0ull;
  std::vector<uint8_t> extra;  // extra data beyond what blockd interprets, kept as it is
};

result<std::vector<snapshot>> parse_snapshots(const uint8_t* p, size_t len, uint32_t count);
std::vector<uint8_t> serialize_snapshots(const std::vector<snapshot>& s);

result<open_options> parse_open_options(const boost::json::object& o, const header& h, uint64_t virtual_size,
                                        bool discard_unmap);

}  // namespace blockd::qcow2

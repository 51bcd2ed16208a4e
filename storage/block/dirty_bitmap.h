// Dirty bitmaps: one bit per granule of a node's guest range, and the set a node keeps (a write hook); home iothread only.
#pragma once
#include <boost/json.hpp>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "protocol/error.h"
#include "storage/block/write_hook.h"

namespace blockd::block {

// A named (or anonymous: a merge's scratch copy) bitmap over `size` bytes of guest data. A bit
// stands for `granularity` bytes (a power of two, at least 512); the last granule may be partial.
// Bits live in 64-bit words, least significant bit first, the layout QEMU hashes for
// x-debug-block-dirty-bitmap-sha256 (so the digest of the same bits is the same).
class dirty_bitmap {
 public:
  dirty_bitmap(std::string name, uint64_t granularity, int64_t size);

  const std::string& name() const { return name_; }
  uint64_t granularity() const { return gran_; }
  int64_t size() const { return size_; }
  uint64_t bits() const { return bits_; }
  // Bytes that are dirty, counted in whole granules (a partial last one as a whole one too):
  // QEMU's "count".
  int64_t dirty_bytes() const;
  uint64_t dirty_granules() const { return set_count_; }

  // Byte ranges; they are widened to whole granules and clipped to size().
  void set(int64_t offset, int64_t length);
  void reset(int64_t offset, int64_t length);
  void clear();
  bool get(int64_t offset) const;  // the granule holding `offset`
  // Where the run of equal bits that starts at `offset` ends (at most `limit`, a byte offset):
  // the extent NBD reports. `dirty` gets the run's state.
  int64_t run_end(int64_t offset, int64_t limit, bool& dirty) const;
  // The first dirty byte at or after `offset`, or -1.
  int64_t next_dirty(int64_t offset) const;

  // Grows (new granules clean) or shrinks (bits past the end dropped): the node was resized.
  void resize(int64_t size);
  // this |= o. Granularities may differ: each dirty granule of `o` dirties the bytes it covers.
  void merge_from(const dirty_bitmap& o);
  // Takes o's bits (same size and granularity: a backup of this bitmap made earlier).
  void copy_bits_from(const dirty_bitmap& o) {
    words_ = o.words_;
    set_count_ = o.set_count_;
  }
  bool same_bits(const dirty_bitmap& o) const { return gran_ == o.gran_ && size_ == o.size_ && words_ == o.words_; }

  // Granule bits as bytes, least significant bit of byte 0 first, ceil(bits/8) bytes: the qcow2
  // bitmap data layout. load_bytes() reads the same layout (shorter input leaves the rest clean).
  std::vector<uint8_t> to_bytes(uint64_t first_granule, uint64_t granules) const;
  void load_bytes(uint64_t first_granule, const uint8_t* p, uint64_t granules);
  void fill(uint64_t first_granule, uint64_t granules, bool dirty);
  // Lowercase hex SHA-256 of the words (at least one), as QEMU computes it.
  std::string sha256() const;

  // State as QMP shows it (BlockDirtyInfo) and as the rules check it.
  bool enabled = true;       // records writes ("recording", unless busy with a successor)
  bool persistent = false;   // stored in the image on close
  bool busy = false;         // an operation (an NBD export, a job) uses it
  bool readonly = false;     // loaded from an image opened read-only: nothing may change it
  bool inconsistent = false; // loaded with the in-use flag: a writer died; it can only be removed
  bool skip_store = false;   // a transaction's remove prepared: not written back at close
  int export_users = 0;      // exports that made it busy (busy stays until the last one goes)

 private:
  uint64_t granule(int64_t offset) const { return uint64_t(offset) >> shift_; }
  void set_bits(uint64_t first, uint64_t last, bool v);  // [first, last)
  bool bit(uint64_t i) const { return (words_[i >> 6] >> (i & 63)) & 1; }

  std::string name_;
  uint64_t gran_;
  unsigned shift_;
  int64_t size_;
  uint64_t bits_ = 0;
  uint64_t set_count_ = 0;
  std::vector<uint64_t> words_;
};

// One entry of BlockDirtyInfo (query-named-block-nodes "dirty-bitmaps").
struct bitmap_fact {
  std::string name;
  int64_t count = 0;
  uint64_t granularity = 0;
  bool recording = false, busy = false, persistent = false, inconsistent = false;
};
boost::json::object to_json(const bitmap_fact& f);

// The bitmaps of one node, newest first (QEMU's listing order). It is the node's write hook while
// at least one bitmap records: every write, write-zeroes and discard dirties its range once it
// completes, whatever its result (a failed write may have changed part of the range).
class bitmap_set final : public write_hook {
 public:
  dirty_bitmap* find(const std::string& name) const;
  bool empty() const { return list_.empty(); }
  const std::vector<std::shared_ptr<dirty_bitmap>>& all() const { return list_; }
  // Adds at the front (newest first). The caller checked the name is free.
  dirty_bitmap& add(std::shared_ptr<dirty_bitmap> b);
  std::shared_ptr<dirty_bitmap> take(const std::string& name);  // removes and returns it (null: none)
  // Whether any bitmap records: the node registers this set as a hook only then.
  bool recording() const;
  void resize(int64_t size);
  std::vector<bitmap_fact> facts() const;

  void after_write(const io_request& r) override;

 private:
  std::vector<std::shared_ptr<dirty_bitmap>> list_;
};

// QEMU's limits and defaults.
constexpr size_t bitmap_max_name = 1023;
constexpr uint64_t bitmap_min_granularity = 512;

}  // namespace blockd::block

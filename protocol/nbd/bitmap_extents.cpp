// NBD block status for a dirty bitmap (see bitmap_extents.h); plain C++, the bitmap's home iothread.
#include "protocol/nbd/bitmap_extents.h"

#include <algorithm>
#include <limits>

namespace blockd::nbd {

void bitmap_extents(const block::dirty_bitmap& b, uint64_t offset, uint64_t length, size_t max, bool extended,
                    std::vector<extent>& out) {
  const int64_t end = int64_t(offset + length);
  const int64_t bitmap_end = std::min<int64_t>(end, b.size());
  // How much of one dirty run a single step takes: QEMU's max_dirty_count.
  const int64_t bound = extended ? std::numeric_limits<int64_t>::max() : std::numeric_limits<int32_t>::max();
  const uint64_t merge_limit = extended ? uint64_t(std::numeric_limits<int64_t>::max()) : 0xffffffffull;
  // False once the array is full: the extent did not fit.
  auto add = [&](uint64_t len, uint32_t flags) {
    if (len == 0) return true;
    if (!out.empty() && out.back().flags == flags && out.back().length + len <= merge_limit) {
      out.back().length += len;
      return true;
    }
    if (out.size() >= max) return false;
    out.push_back({len, flags});
    return true;
  };
  int64_t start = int64_t(offset);
  while (start < bitmap_end) {
    int64_t dirty_start = b.next_dirty(start);
    if (dirty_start < 0 || dirty_start >= bitmap_end) break;
    int64_t limit = dirty_start + std::min(bitmap_end - dirty_start, bound);
    bool dirty = false;
    int64_t dirty_end = b.run_end(dirty_start, limit, dirty);
    if (!add(uint64_t(dirty_start - start), 0) || !add(uint64_t(dirty_end - dirty_start), state_dirty)) return;
    start = dirty_end;
  }
  // The clean rest of the range (nothing to add when the array just filled up).
  add(uint64_t(end - start), 0);
}

}  // namespace blockd::nbd

// NBD block status for a dirty bitmap (the qemu:dirty-bitmap:NAME context): extents built from the bitmap's runs; plain C++, the bitmap's home iothread.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "protocol/nbd/transmission.h"
#include "storage/block/dirty_bitmap.h"

namespace blockd::nbd {

// NBD_STATE_DIRTY, the only flag of a dirty-bitmap context.
constexpr uint32_t state_dirty = 1u << 0;
// QEMU's NBD_MAX_BLOCK_STATUS_EXTENTS (1 MiB of 8-byte extents): the most one reply chunk holds.
constexpr size_t max_bitmap_extents = (1u << 20) / 8;

// Appends to `out` the extents of `b` over [offset, offset + length), as QEMU's bitmap_to_extents
// builds them: clean and dirty runs alternate; a dirty run starts and ends on granule boundaries
// except where the range cuts it; bytes past the bitmap's end are clean. Runs of one state merge
// while the sum fits the extent (32 bits, or 63 with extended headers); a dirty run is split every
// INT32_MAX bytes in compact mode. With more than `max` extents (1 for NBD_CMD_FLAG_REQ_ONE) the
// reply covers only a prefix of the range, and the client asks again for the rest.
void bitmap_extents(const block::dirty_bitmap& b, uint64_t offset, uint64_t length, size_t max, bool extended,
                    std::vector<extent>& out);

}  // namespace blockd::nbd

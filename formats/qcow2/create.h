// qcow2 image creation (blockdev-create driver=qcow2): option checks, layout planning, writing the image; the create job's worker thread.
#pragma once
#include <cstdint>

#include "protocol/error.h"
#include "storage/block/driver.h"

namespace blockd::qcow2 {

// Where everything of a new image goes. All clusters in [0, clusters) have refcount 1 and nothing
// else is allocated, so the refcount blocks can be written without a second pass.
struct create_layout {
  uint32_t cluster_bits = 16;
  uint32_t refcount_order = 4;
  uint64_t reftable_offset = 0;
  uint64_t reftable_clusters = 0;
  uint64_t refblock_offset = 0;
  uint64_t refblocks = 0;
  uint64_t l1_offset = 0;     // 0 when the image has no L1 entries (size 0), as QEMU writes it
  uint64_t l1_entries = 0;
  uint64_t l1_clusters = 0;
  uint64_t l2_offset = 0;     // first preallocated L2 table; the others follow it
  uint64_t l2_tables = 0;
  uint64_t data_offset = 0;   // first preallocated data cluster in the image file
  uint64_t data_clusters = 0; // in the image file (0 with an external data file)
  uint64_t clusters = 0;      // clusters with a refcount: [0, clusters)
  uint64_t cluster_size() const { return uint64_t(1) << cluster_bits; }
};

// Plans the image file: header, refcount table, refcount blocks, L1, then `l2_tables` L2 tables and
// `data_clusters` data clusters. The refcount structures must also count themselves, so their size
// is found by iterating to a fixed point (it only grows, so it terminates).
create_layout plan_layout(uint32_t cluster_bits, uint32_t refcount_order, uint64_t l1_entries, uint64_t l2_tables,
                          uint64_t data_clusters);

// Creates a qcow2 image as described by `a.options` (a validated BlockdevCreateOptionsQcow2 object)
// on the node that its "file" member resolves to, with guest data in "data-file" when given. Blocks;
// checks a.cancelled() while preallocating. The error texts are QEMU's for the same failures.
result<void> create_qcow2(const block::create_args& a);

}  // namespace blockd::qcow2

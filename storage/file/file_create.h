// blockdev-create for driver "file" (BlockdevCreateOptionsFile); runs on the create job's worker thread.
#pragma once
#include "protocol/error.h"
#include "storage/block/driver.h"

namespace blockd::block {

// Creates (or empties) the file and gives it its size, as QEMU's raw_co_create does: the same
// steps, locks and error texts. Preallocation "full" stops early when a.cancelled() turns true.
result<void> create_file(const create_args& a);

}  // namespace blockd::block

// qcow2 cluster compression (zlib raw deflate, zstd): decompress what QEMU wrote, compress what blockd writes; pure functions, any thread.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "formats/qcow2/layout.h"
#include "protocol/error.h"

namespace blockd::qcow2 {

// Fills exactly `out_len` bytes (one cluster) from compressed data. `in` may run past the end of
// the compressed stream (the descriptor counts whole sectors), never short of it.
result<void> decompress_cluster(compression type, const uint8_t* in, size_t in_len, uint8_t* out, size_t out_len);

// Compresses one cluster; returns the compressed bytes, or an empty vector when compression would
// not make it smaller than the cluster (the caller then writes it uncompressed, as QEMU does).
result<std::vector<uint8_t>> compress_cluster(compression type, const uint8_t* in, size_t len);

}  // namespace blockd::qcow2

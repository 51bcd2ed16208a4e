// The qcow2 fuzz entry point shared by the libFuzzer target and the regression replayer; one calling thread (it turns its own loop).
#pragma once
#include <cstddef>
#include <cstdint>

namespace blockd::fuzz {

// Input layout: [image bytes][trailer of qcow2_trailer_bytes]. Inputs shorter than the trailer are
// all image (every control byte zero). trailer[0] picks the open variant (mode_* bits);
// trailer[1] % 12 is the number of operations; trailer[2] seeds the written data; bit 0 of
// trailer[3] leaves out the final flush; trailer[4..48) are 11 operation records of 4 bytes each
// (see qcow2_fuzz.cpp).
inline constexpr size_t qcow2_trailer_bytes = 48;

enum qcow2_mode_bit : uint8_t {
  mode_read_only = 1u << 0,       // open with read-only: true (else read-write)
  mode_follow_backing = 1u << 1,  // open the backing file the header names (only scratch names)
  mode_discard_unmap = 1u << 2,   // discard: unmap (pass discards down)
  mode_overlap_lo = 1u << 3,      // bits 3-4: overlap-check cached / none / constant / all
  mode_overlap_hi = 1u << 4,
  mode_small_caches = 1u << 5,    // minimal L2 and refcount caches with 512-byte L2 slices
  mode_lazy_option = 1u << 6,     // lazy-refcounts: true given explicitly
  mode_reopen_check = 1u << 7,    // after a read-write session the image must open again read-only
                                  // (unless overlap-check is none)
};

// What one input did, for the replayer's summary.
struct qcow2_outcome {
  bool opened = false;
  int ops_ok = 0;
  int ops_failed = 0;
};

// Runs one input: writes the image into the scratch directory, opens it through block::graph,
// performs the trailer's operations, closes it. Aborts (a finding) when the driver breaks a rule
// the harness checks: an empty open error, an I/O result that is not 0 or -errno, a read-only
// image whose file changed, a read-write session whose image no longer opens read-only.
qcow2_outcome qcow2_fuzz_one(const uint8_t* data, size_t size);

// Creates the process's scratch directory under /dev/shm (idempotent) and removes it at exit.
void qcow2_fuzz_init();

// Removes the scratch directory a process `pid` left behind (a replayed child that crashed).
void qcow2_fuzz_remove_scratch(int pid);

}  // namespace blockd::fuzz

// libFuzzer target over hostile qcow2 images (built with BLOCKD_FUZZ=ON); libFuzzer's thread only.
#include <cstddef>
#include <cstdint>

#include "tests/fuzz/qcow2_fuzz.h"

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  blockd::fuzz::qcow2_fuzz_init();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  (void)blockd::fuzz::qcow2_fuzz_one(data, size);
  return 0;
}

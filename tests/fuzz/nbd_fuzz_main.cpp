// libFuzzer target over NBD option haggling and transmission request parsing (built with BLOCKD_FUZZ=ON); libFuzzer's thread only.
#include <cstddef>
#include <cstdint>

#include "tests/fuzz/nbd_fuzz.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  (void)blockd::fuzz::nbd_fuzz_one(data, size);
  return 0;
}

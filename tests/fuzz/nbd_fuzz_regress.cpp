// Replays NBD fuzz inputs through nbd_fuzz_one without libFuzzer (see regress_main.h); main thread.
#include <cstdio>
#include <string>

#include "tests/fuzz/nbd_fuzz.h"
#include "tests/fuzz/regress_main.h"

namespace {
void run_one(const std::string& path) {
  auto data = blockd::fuzz::regress_detail::slurp(path);
  auto o = blockd::fuzz::nbd_fuzz_one(data.data(), data.size());
  static const char* const states[] = {"negotiating", "transmission", "closed"};
  std::printf("  %s: %d options answered, %s, %d requests (%d refused)\n", path.c_str(), o.options, states[o.state],
              o.requests, o.refused);
  std::fflush(stdout);
}
}  // namespace

int main(int argc, char** argv) { return blockd::fuzz::regress_main(argc, argv, "nbd_fuzz_regress", run_one, nullptr); }

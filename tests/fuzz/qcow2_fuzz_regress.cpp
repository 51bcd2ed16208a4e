// Replays qcow2 fuzz inputs through qcow2_fuzz_one without libFuzzer (see regress_main.h); main thread.
#include <cstdio>
#include <string>

#include "tests/fuzz/qcow2_fuzz.h"
#include "tests/fuzz/regress_main.h"

namespace {
void run_one(const std::string& path) {
  auto data = blockd::fuzz::regress_detail::slurp(path);
  auto o = blockd::fuzz::qcow2_fuzz_one(data.data(), data.size());
  std::printf("  %s: %s, %d ops ok, %d failed\n", path.c_str(), o.opened ? "opened" : "refused", o.ops_ok,
              o.ops_failed);
  std::fflush(stdout);
}
void after_child(int pid) { blockd::fuzz::qcow2_fuzz_remove_scratch(pid); }
}  // namespace

int main(int argc, char** argv) {
  return blockd::fuzz::regress_main(argc, argv, "qcow2_fuzz_regress", run_one, after_child);
}

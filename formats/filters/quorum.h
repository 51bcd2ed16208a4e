// The quorum driver's settings and validation, shared by its registration and the unit tests; any thread (no state).
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "storage/block/driver.h"

namespace blockd::block {

struct quorum_settings {
  int threshold = 1;  // vote-threshold
  bool blkverify = false;
  bool rewrite_corrupted = false;
  bool fifo = false;  // read-pattern=fifo
};

// QEMU's checks at open, with its texts; with fifo, blkverify and rewrite-corrupted are cleared
// (QEMU only reads them in quorum mode).
result<void> check_quorum_settings(quorum_settings& s, int children);

// A quorum over `kids` (tests build nodes by hand; blockdev-add goes through the registry).
std::unique_ptr<block_driver> make_quorum_driver(std::vector<child_ref> kids, quorum_settings s, driver_env env,
                                                 std::string name);

void register_quorum_driver();

}  // namespace blockd::block

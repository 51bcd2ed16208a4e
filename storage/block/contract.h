// The node <-> driver contract checker: a driver wrapper that verifies every call and completion; home iothread (permission calls and rehome: the supervisor, node drained).
#pragma once
#include <functional>
#include <memory>
#include <string>

#include "storage/block/driver.h"

namespace blockd::block {

// What the checker verifies, per request handed to a driver:
// - the caller is on the node's home thread (when the env can tell);
// - the request is well formed: non-negative offset and length, inside the driver's length (flush
//   excepted), a scatter list covering exactly `length` bytes for read/write and none otherwise,
//   offset and length multiples of the driver's request alignment, no longer than its max
//   transfer, only the flags its operation may carry, FUA only to a driver that declares cap_fua;
// - the driver completes it exactly once, never from inside submit(), on the home thread, with a
//   result of 0 or -errno, and for block status with an extent inside the request;
// - control calls that change what requests see (truncate, reopen commit, activate, inactivate,
//   rehome) and the driver's destruction happen with no request in the driver;
// - control calls that reach the driver's I/O or its data-path state (facts, truncate, reopen
//   prepare/commit/abort, activate, inactivate, internal snapshots, close) run on the home thread:
//   the supervisor sends them there as node tasks.
// A violation is a bug in blockd (node or driver), never in the user's input.

// Called with a description of the violation; the default prints it and aborts.
using contract_handler = std::function<void(const std::string& what)>;
void set_contract_handler(contract_handler h);  // empty restores the default

// Whether new nodes get a checker: on in debug builds, or with BLOCKD_CHECK_CONTRACTS=1 in the
// environment; tests may switch it explicitly.
bool contract_checks_enabled();
void set_contract_checks(bool on);

// Wraps `drv` (the driver of node `node_name`) in a checker.
std::unique_ptr<block_driver> check_contract(std::unique_ptr<block_driver> drv, std::string node_name,
                                             driver_env env);

}  // namespace blockd::block

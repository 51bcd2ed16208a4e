// The block driver interface (one instance per node) and the driver registry; home iothread only.
#pragma once
#include <boost/json.hpp>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "protocol/error.h"
#include "storage/block/io_request.h"
#include "storage/block/perm.h"

namespace blockd::io {
class reactor;
}

namespace blockd::block {

class node;

// What a driver may use from its home iothread. `defer` runs a function on a later loop turn: the
// way a driver without real I/O completes requests without completing them synchronously.
struct driver_env {
  io::reactor* reactor = nullptr;
  std::function<void(std::function<void()>)> defer;
};

enum driver_cap : uint32_t {
  cap_write_zeroes = 1u << 0,  // efficient zeroing (no buffer write)
  cap_discard = 1u << 1,
  cap_fua = 1u << 2,           // honours io_fua natively (else the node adds a flush)
  cap_block_status = 1u << 3,
  cap_resize = 1u << 4,
};

struct driver_limits {
  uint32_t request_alignment = 1;  // offsets and lengths of read/write must be multiples of this
  int64_t max_transfer = 0;        // 0 = unlimited
};

// Image information for query-named-block-nodes ("image" member) and the node's filename.
struct image_facts {
  int64_t virtual_size = 0;
  int64_t actual_size = 0;
  bool has_dirty_flag = false;  // QSD shows "dirty-flag": false for file-backed nodes
  boost::json::value format_specific;  // ImageInfoSpecific ("format-specific"), or null
};

class block_driver {
 public:
  virtual ~block_driver() = default;

  virtual uint32_t caps() const { return 0; }
  virtual driver_limits limits() const { return {}; }
  virtual int64_t length() const = 0;

  // Starts `r`; completes it later through r.complete(). Never blocks, never completes inside submit.
  virtual void submit(io_request& r) = 0;

  // Control path, home iothread, may block briefly (file metadata syscalls).
  virtual result<void> truncate(int64_t size) { (void)size; return fail("Image format driver does not support resize"); }
  // The node's cumulative permissions changed: take them (a file updates its OFD locks here).
  virtual result<void> set_perm(uint32_t perm, uint32_t shared) { (void)perm; (void)shared; return {}; }
  // What this driver asks of its child `role`, given what the node's users need and share.
  virtual void child_perm(const std::string& role, uint32_t node_perm, uint32_t node_shared, uint32_t& perm,
                          uint32_t& shared) const {
    (void)role;
    perm = node_perm;
    shared = node_shared;
  }
  virtual image_facts facts() const { return {.virtual_size = length()}; }
  // Driver-specific statistics for query-blockstats ("driver-specific"), or null.
  virtual boost::json::value driver_stats() const { return nullptr; }
  // Options a reopen may change in place; the rest must stay as they are.
  virtual result<void> reopen_check(const boost::json::object& new_options) { (void)new_options; return {}; }
};

// Everything a driver's open sees: validated options (typed JSON), the resolved children, the env.
struct open_args {
  const boost::json::object& options;
  std::vector<std::pair<std::string, node*>> children;  // role -> child, in the driver's order
  driver_env env;
  bool read_only = false;  // a driver may set it (auto-read-only fallback)
  bool auto_read_only = false;
  bool direct = false;    // cache.direct
  bool no_flush = false;  // cache.no-flush
  node* find_child(const std::string& role) const {
    for (auto& [r, n] : children)
      if (r == role) return n;
    return nullptr;
  }
};

struct driver_entry {
  std::string name;
  bool protocol = false;                // a leaf that talks to the OS
  std::vector<std::string> child_roles;  // option members holding a BlockdevRef, e.g. {"file"}
  std::function<result<std::unique_ptr<block_driver>>(open_args&)> open;
  // The filename QEMU reports for a node of this driver: plain for protocol nodes with a filename,
  // otherwise "json:{...}" built from the options (see node_filename in graph).
  std::function<std::string(const boost::json::object& options)> plain_filename;
};

// The drivers this build has (registered at start-up by each driver's translation unit).
const driver_entry* find_driver(const std::string& name);
void register_driver(driver_entry e);
void register_builtin_drivers();  // idempotent

}  // namespace blockd::block

// QEMU's block permission model: what a user of a node needs and what it lets others do; any thread.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "protocol/error.h"

namespace blockd::block {

enum perm : uint32_t {
  perm_consistent_read = 1u << 0,
  perm_write = 1u << 1,
  perm_write_unchanged = 1u << 2,
  perm_resize = 1u << 3,
  perm_all = (1u << 4) - 1,
};

// "write, resize": QEMU's wording for a permission set, in bit order.
std::string perm_names(uint32_t perms);
// The set as x-debug-query-block-graph lists it (highest bit first, as QSD prints).
std::vector<std::string> perm_list(uint32_t perms);

// One user of a node: a parent node's child edge, an export, a job or a command's temporary use.
struct perm_user {
  std::string description;  // "node 'r0' (uses node 'f0' as 'file' child)"
  uint32_t perm = 0;
  uint32_t shared = perm_all;
  bool allows_inactive = false;  // the node may be inactivated under it (an export with allow-inactive)
};

// Refuses `added` if it needs what an existing user does not share, or does not share what one
// needs; the message names both, as QEMU's does.
result<void> check_conflict(const std::string& node_name, const std::vector<perm_user>& existing,
                            const perm_user& added);

}  // namespace blockd::block

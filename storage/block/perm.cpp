// Permission names and conflict checks with QEMU's messages; any thread.
#include "storage/block/perm.h"

namespace blockd::block {
namespace {
const char* const names[] = {"consistent read", "write", "write unchanged", "resize"};
const char* const qapi_names[] = {"consistent-read", "write", "write-unchanged", "resize"};
}  // namespace

std::string perm_names(uint32_t perms) {
  std::string out;
  for (int i = 0; i < 4; ++i) {
    if (!(perms & (1u << i))) continue;
    if (!out.empty()) out += ", ";
    out += names[i];
  }
  return out;
}

std::vector<std::string> perm_list(uint32_t perms) {
  std::vector<std::string> out;
  for (int i = 3; i >= 0; --i)
    if (perms & (1u << i)) out.push_back(qapi_names[i]);
  return out;
}

result<void> check_conflict(const std::string& node_name, const std::vector<perm_user>& existing,
                            const perm_user& added) {
  auto conflict = [&](uint32_t bits, const perm_user& needs, const perm_user& refuses) {
    return fail("Permission conflict on node '" + node_name + "': permissions '" + perm_names(bits) +
                "' are both required by " + needs.description + " and unshared by " + refuses.description + ".");
  };
  for (auto& e : existing) {
    if (uint32_t bad = added.perm & ~e.shared) return conflict(bad, added, e);
    if (uint32_t bad = e.perm & ~added.shared) return conflict(bad, e, added);
  }
  return {};
}

}  // namespace blockd::block

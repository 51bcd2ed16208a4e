// Inherited descriptors: captured once in main() before any thread starts, then consulted by the supervisor only.
#include "config/inherited_fds.h"

#include <dirent.h>

#include <algorithm>
#include <cstdlib>
#include <set>

namespace blockd {
namespace {
std::set<int>& inherited() {
  static std::set<int> s;
  return s;
}
}  // namespace

void capture_inherited_fds() {
  DIR* d = ::opendir("/proc/self/fd");
  if (!d) return;
  int own = ::dirfd(d);
  while (dirent* e = ::readdir(d)) {
    char* end = nullptr;
    long fd = std::strtol(e->d_name, &end, 10);
    if (end == e->d_name || *end || fd <= 2 || fd == own) continue;
    inherited().insert(int(fd));
  }
  ::closedir(d);
}

result<int> take_inherited_fd(const std::string& str) {
  bool digits = !str.empty() && str.size() <= 10 &&
                std::all_of(str.begin(), str.end(), [](char c) { return c >= '0' && c <= '9'; });
  long long v = digits ? std::strtoll(str.c_str(), nullptr, 10) : -1;
  if (!digits || v > 2147483647LL)
    return fail("No file descriptor named " + str + " found (pass the number of a descriptor blockd inherited)");
  auto it = inherited().find(int(v));
  if (it == inherited().end())
    return fail("file descriptor " + str + " was not inherited by blockd at start-up (or is already in use); "
                "pass a listening socket that the parent process left open");
  inherited().erase(it);
  return int(v);
}

}  // namespace blockd

// Trace point registry and output for -T/--trace; any thread (output lines are written whole).
#include "protocol/trace/trace.h"

#include <fnmatch.h>
#include <sys/time.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <mutex>

namespace blockd::trace {

std::atomic<bool> enabled_flags[static_cast<unsigned>(point::count_)];

namespace {
std::mutex out_mx;
FILE* out = nullptr;
const char* const names[] = {"monitor_qmp_request", "monitor_qmp_response", "monitor_qmp_event",
                             "monitor_connect", "iothread_start"};
static_assert(std::size(names) == static_cast<size_t>(point::count_));
}  // namespace

const char* name(point p) { return names[static_cast<unsigned>(p)]; }

std::vector<std::string> all_names() { return {std::begin(names), std::end(names)}; }

size_t enable(const std::string& pattern) {
  size_t n = 0;
  for (unsigned i = 0; i < static_cast<unsigned>(point::count_); ++i)
    if (::fnmatch(pattern.c_str(), names[i], 0) == 0) {
      enabled_flags[i] = true;
      ++n;
    }
  return n;
}

result<void> set_output(const std::string& path) {
  FILE* f = std::fopen(path.c_str(), "a");
  if (!f) return fail("cannot open trace file '" + path + "': " + std::strerror(errno));
  std::lock_guard<std::mutex> g(out_mx);
  if (out) std::fclose(out);
  out = f;
  return {};
}

void emit(point p, const std::string& message) {
  if (!on(p)) return;
  timeval tv{};
  ::gettimeofday(&tv, nullptr);
  std::lock_guard<std::mutex> g(out_mx);
  std::fprintf(out ? out : stderr, "%d@%ld.%06ld:%s %s\n", static_cast<int>(::getpid()), static_cast<long>(tv.tv_sec),
               static_cast<long>(tv.tv_usec), name(p), message.c_str());
  std::fflush(out ? out : stderr);
}

}  // namespace blockd::trace

// blockd's trace points (-T/--trace): named events enabled by glob patterns, printed to stderr or a file; any thread.
#pragma once
#include <atomic>
#include <string>
#include <vector>

#include "protocol/error.h"

namespace blockd::trace {

enum class point : unsigned {
  monitor_qmp_request,   // a request was read from a monitor
  monitor_qmp_response,  // a reply was queued for a monitor
  monitor_qmp_event,     // an event was queued for a monitor
  monitor_connect,       // a monitor client connected or went away
  iothread_start,        // an iothread started or stopped
  count_
};

const char* name(point p);
extern std::atomic<bool> enabled_flags[static_cast<unsigned>(point::count_)];
inline bool on(point p) { return enabled_flags[static_cast<unsigned>(p)].load(std::memory_order_relaxed); }

// Enables every point whose name matches the glob; returns how many matched.
size_t enable(const std::string& pattern);
// Sends trace output to this file instead of stderr.
result<void> set_output(const std::string& path);
// Writes "NAME message" with a timestamp, if the point is on.
void emit(point p, const std::string& message);
std::vector<std::string> all_names();

}  // namespace blockd::trace

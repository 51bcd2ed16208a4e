// thread-context objects: a CPU set (from cpu-affinity or NUMA node-affinity) for threads created under them; plain C++, the model's thread.
#pragma once
#include <sched.h>

#include <vector>

#include "config/qom/object.h"

namespace blockd::qom {

// QEMU runs a helper thread per context and creates threads from it so they inherit its
// affinity. blockd keeps the CPU set only: whoever creates a thread for the context (an iothread
// with a future x-thread-context option) applies cpu_set() to it with apply_to_current_thread().
// thread-id reads back the thread that made the object (QSD shows its helper thread's id).
class thread_context_object final : public object {
 public:
  static result<std::unique_ptr<object>> make(const std::string& id, const boost::json::object& props);
  // The CPUs threads of this context run on (the process's CPUs when none were given).
  cpu_set_t cpu_set() const;
  std::vector<uint16_t> cpus() const;
  // sched_setaffinity on the calling thread; "Setting CPU affinity failed: ..." on failure.
  result<void> apply_to_current_thread() const;

  result<boost::json::value> get(const std::string& prop) const override;
  result<void> set(const std::string& prop, const boost::json::value& v) override;
  result<void> complete(model& m) override;

  // CPUs of NUMA node `node` from sysfs (no libnuma); empty if the node does not exist.
  static std::vector<uint16_t> node_cpus(unsigned node);

 private:
  result<void> set_cpus(const boost::json::value& v);
  result<void> set_nodes(const boost::json::value& v);
  std::vector<uint16_t> cpus_;  // sorted, unique; empty: inherit
  bool cpu_given_ = false, node_given_ = false;
  int64_t tid_ = 0;
};

}  // namespace blockd::qom

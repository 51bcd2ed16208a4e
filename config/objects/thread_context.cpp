// thread-context objects (see thread_context.h); plain C++, the model's thread.
#include "config/objects/thread_context.h"

#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <set>
#include <sstream>

#include "config/qom/type_registry.h"

namespace blockd::qom {
namespace {

result<std::vector<uint16_t>> u16_list(const boost::json::value& v, const char* what_empty) {
  // QEMU's list visitor names elements "null" in this text.
  if (!v.is_array()) return std::unexpected(type_error("null", "array"));
  std::vector<uint16_t> out;
  for (auto& e : v.as_array()) {
    if (!(e.is_int64() || e.is_uint64())) return std::unexpected(type_error("null", "integer"));
    if (e.is_int64() ? (e.as_int64() < 0 || e.as_int64() > 65535) : e.as_uint64() > 65535)
      return fail("Parameter 'null' expects uint16_t");
    out.push_back(static_cast<uint16_t>(e.is_int64() ? e.as_int64() : static_cast<int64_t>(e.as_uint64())));
  }
  if (out.empty()) return fail(what_empty);
  return out;
}

std::vector<uint16_t> sorted_unique(std::vector<uint16_t> v) {
  std::set<uint16_t> s(v.begin(), v.end());
  return {s.begin(), s.end()};
}

}  // namespace

std::vector<uint16_t> thread_context_object::node_cpus(unsigned node) {
  std::ifstream f("/sys/devices/system/node/node" + std::to_string(node) + "/cpulist");
  std::vector<uint16_t> out;
  std::string list;
  if (!f || !std::getline(f, list)) return out;
  std::stringstream ss(list);
  std::string range;
  while (std::getline(ss, range, ',')) {
    if (range.empty()) continue;
    auto dash = range.find('-');
    unsigned a = std::stoul(range.substr(0, dash)), b = dash == std::string::npos ? a : std::stoul(range.substr(dash + 1));
    for (unsigned c = a; c <= b && c < 65536; ++c) out.push_back(static_cast<uint16_t>(c));
  }
  return out;
}

result<std::unique_ptr<object>> thread_context_object::make(const std::string&, const boost::json::object& props) {
  auto o = std::make_unique<thread_context_object>();
  o->tid_ = ::syscall(SYS_gettid);
  // The schema's member order: cpu-affinity, then node-affinity.
  if (auto* v = props.if_contains("cpu-affinity"))
    if (auto r = o->set_cpus(*v); !r) return std::unexpected(r.error());
  if (auto* v = props.if_contains("node-affinity"))
    if (auto r = o->set_nodes(*v); !r) return std::unexpected(r.error());
  return o;
}

result<void> thread_context_object::set_cpus(const boost::json::value& v) {
  if (node_given_) return fail("Mixing CPU and node affinity not supported");
  auto l = u16_list(v, "CPU list is empty");
  if (!l) return std::unexpected(l.error());
  cpus_ = sorted_unique(*l);
  cpu_given_ = true;
  return {};
}

result<void> thread_context_object::set_nodes(const boost::json::value& v) {
  if (cpu_given_) return fail("Mixing CPU and node affinity not supported");
  auto l = u16_list(v, "Node list is empty");
  if (!l) return std::unexpected(l.error());
  std::vector<uint16_t> cpus;
  for (uint16_t n : *l)
    for (uint16_t c : node_cpus(n)) cpus.push_back(c);
  if (cpus.empty()) return fail("The nodes select no CPUs");
  cpus_ = sorted_unique(cpus);
  node_given_ = true;
  return {};
}

cpu_set_t thread_context_object::cpu_set() const {
  cpu_set_t s;
  CPU_ZERO(&s);
  if (cpus_.empty()) {
    ::sched_getaffinity(0, sizeof s, &s);
    return s;
  }
  for (uint16_t c : cpus_)
    if (c < CPU_SETSIZE) CPU_SET(c, &s);
  return s;
}

std::vector<uint16_t> thread_context_object::cpus() const {
  if (!cpus_.empty()) return cpus_;
  std::vector<uint16_t> out;
  cpu_set_t s = cpu_set();
  for (int c = 0; c < CPU_SETSIZE; ++c)
    if (CPU_ISSET(c, &s)) out.push_back(static_cast<uint16_t>(c));
  return out;
}

result<void> thread_context_object::apply_to_current_thread() const {
  cpu_set_t s = cpu_set();
  if (::sched_setaffinity(0, sizeof s, &s) != 0)
    return fail(std::string("Setting CPU affinity failed: ") + std::strerror(errno));
  return {};
}

result<void> thread_context_object::complete(model&) {
  // QSD applies the set to its helper thread here; the kernel refuses a set without an allowed
  // CPU (EINVAL), which blockd checks against the process's own set without moving any thread.
  if (cpus_.empty()) return {};
  cpu_set_t allowed;
  CPU_ZERO(&allowed);
  ::sched_getaffinity(0, sizeof allowed, &allowed);
  bool any = std::any_of(cpus_.begin(), cpus_.end(), [&](uint16_t c) { return c < CPU_SETSIZE && CPU_ISSET(c, &allowed); });
  if (!any) return fail(std::string("Setting CPU affinity failed: ") + std::strerror(EINVAL));
  return {};
}

result<boost::json::value> thread_context_object::get(const std::string& prop) const {
  if (prop == "thread-id") return boost::json::value(tid_);
  if (prop == "cpu-affinity") {
    boost::json::array a;
    for (uint16_t c : cpus()) a.push_back(c);
    return boost::json::value(a);
  }
  return object::get(prop);  // node-affinity is write-only, as in QSD
}

result<void> thread_context_object::set(const std::string& prop, const boost::json::value& v) {
  // After creation QSD re-pins its thread to the new set; blockd's users read cpu_set() when
  // they create a thread.
  if (prop == "cpu-affinity") {
    node_given_ = false;
    return set_cpus(v);
  }
  if (prop == "node-affinity") {
    cpu_given_ = false;
    return set_nodes(v);
  }
  return object::set(prop, v);
}

void register_thread_context_types(type_registry& r) {
  r.add({.name = "thread-context",
         .parent = "object",
         .interfaces = {"user-creatable"},
         .properties = {{.name = "thread-id", .type = "int", .writable = false},
                        {.name = "node-affinity", .type = "int", .readable = false},
                        {.name = "cpu-affinity", .type = "int"}},
         .make = thread_context_object::make});
}

}  // namespace blockd::qom

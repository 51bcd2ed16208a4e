// Which QMP events QEMU's monitor rate-limits and by what key; any thread (no state).
#include "protocol/qmp/event_throttle.h"

namespace blockd::qmp {

std::optional<std::string> event_throttle::key_of(const std::string& name, const boost::json::object& data) {
  // monitor_qapi_event_conf: of QSD's events only these two (VSERPORT_CHANGE has no source here).
  if (name == "QUORUM_FAILURE") return name;
  if (name == "QUORUM_REPORT_BAD") {
    auto* n = data.if_contains("node-name");
    return name + "/" + (n && n->is_string() ? std::string(n->as_string()) : std::string());
  }
  return std::nullopt;
}

}  // namespace blockd::qmp

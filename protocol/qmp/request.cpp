// QMP request envelope validation and reply construction; any thread.
#include "protocol/qmp/request.h"

#include <algorithm>
#include <vector>

#include "protocol/qmp/json_writer.h"

namespace blockd::qmp {

std::expected<request, envelope_error> parse_request(const boost::json::value& v, bool oob_enabled) {
  if (!v.is_object()) return std::unexpected(envelope_error{error("QMP input must be a JSON object"), std::nullopt});
  const auto& obj = v.get_object();
  std::optional<boost::json::value> id;
  if (auto* p = obj.if_contains("id")) id = *p;
  auto bad = [&](std::string msg) { return std::unexpected(envelope_error{error(std::move(msg)), id}); };

  // Members are checked in the order QEMU iterates its dictionary, so the same error wins.
  std::vector<std::pair<unsigned, size_t>> order;
  size_t idx = 0;
  for (const auto& kv : obj) order.emplace_back(qdict_bucket(kv.key()), idx++);
  std::stable_sort(order.begin(), order.end(), [](const auto& a, const auto& b) {
    return a.first != b.first ? a.first < b.first : a.second > b.second;
  });
  for (auto [bucket, i] : order) {
    const auto& kv = *(obj.begin() + static_cast<std::ptrdiff_t>(i));
    std::string_view key = kv.key();
    if (key == "execute" || (key == "exec-oob" && oob_enabled)) {
      if (!kv.value().is_string()) return bad("QMP input member '" + std::string(key) + "' must be a string");
    } else if (key == "arguments") {
      if (!kv.value().is_object()) return bad("QMP input member 'arguments' must be an object");
    } else if (key != "id") {
      return bad("QMP input member '" + std::string(key) + "' is unexpected");
    }
  }
  const auto* exec = obj.if_contains("execute");
  const auto* oob = oob_enabled ? obj.if_contains("exec-oob") : nullptr;
  if (!exec && !oob) return bad("QMP input lacks member 'execute'");
  if (exec && oob) return bad("QMP input member 'execute' clashes with 'exec-oob'");
  request r;
  r.command = std::string((exec ? exec : oob)->as_string());
  r.oob = oob != nullptr;
  r.id = std::move(id);
  if (auto* a = obj.if_contains("arguments")) r.arguments = a->as_object();
  return r;
}

boost::json::object make_return(const boost::json::value& ret, const std::optional<boost::json::value>& id) {
  boost::json::object o;
  o["return"] = ret;
  if (id) o["id"] = *id;
  return o;
}

boost::json::object make_error(const blockd::error& e, const std::optional<boost::json::value>& id) {
  boost::json::object err;
  err["class"] = error_class_name(e.cls);
  err["desc"] = e.desc;
  boost::json::object o;
  if (id) o["id"] = *id;
  o["error"] = std::move(err);
  return o;
}

boost::json::object make_event(std::string_view name, const boost::json::object& data, int64_t seconds,
                                int64_t microseconds) {
  boost::json::object ts;
  ts["seconds"] = seconds;
  ts["microseconds"] = microseconds;
  boost::json::object o;
  o["timestamp"] = std::move(ts);
  o["event"] = name;
  o["data"] = data;
  return o;
}

}  // namespace blockd::qmp

// QOM object defaults and JSON value helpers with QAPI's texts; plain C++, the model's thread.
#include "config/qom/object.h"

#include <cmath>

namespace blockd::qom {

result<boost::json::value> object::get(const std::string& prop) const {
  return fail("Property '" + type_ + "." + prop + "' is not readable");
}

result<void> object::set(const std::string& prop, const boost::json::value&) {
  return fail("Property '" + type_ + "." + prop + "' is not writable");
}

error type_error(const std::string& name, const std::string& what) {
  return error("Invalid parameter type for '" + name + "', expected: " + what);
}

result<int64_t> json_int(const boost::json::value& v, const std::string& name) {
  if (v.is_int64()) return v.as_int64();
  if (v.is_uint64() && v.as_uint64() <= static_cast<uint64_t>(INT64_MAX)) return static_cast<int64_t>(v.as_uint64());
  // QEMU's JSON parser keeps integral doubles out of integer slots, as here.
  return std::unexpected(type_error(name, "integer"));
}

result<uint64_t> json_uint(const boost::json::value& v, const std::string& name) {
  if (v.is_uint64()) return v.as_uint64();
  if (v.is_int64()) return static_cast<uint64_t>(v.as_int64());  // QEMU wraps negatives likewise
  return std::unexpected(type_error(name, "integer"));
}

result<bool> json_bool(const boost::json::value& v, const std::string& name) {
  if (v.is_bool()) return v.as_bool();
  return std::unexpected(type_error(name, "boolean"));
}

result<std::string> json_string(const boost::json::value& v, const std::string& name) {
  if (v.is_string()) return std::string(v.as_string());
  return std::unexpected(type_error(name, "string"));
}

result<std::string> json_enum(const boost::json::value& v, const std::string& name,
                              const std::vector<std::string>& values) {
  auto s = json_string(v, name);
  if (!s) return s;
  for (auto& x : values)
    if (x == *s) return s;
  return fail("Parameter '" + name + "' does not accept value '" + *s + "'");
}

result<void> opt_int(const boost::json::object& props, const char* name, int64_t& out) {
  auto* v = props.if_contains(name);
  if (!v) return {};
  auto r = json_int(*v, name);
  if (!r) return std::unexpected(r.error());
  out = *r;
  return {};
}

result<void> opt_bool(const boost::json::object& props, const char* name, bool& out) {
  auto* v = props.if_contains(name);
  if (!v) return {};
  auto r = json_bool(*v, name);
  if (!r) return std::unexpected(r.error());
  out = *r;
  return {};
}

result<void> opt_string(const boost::json::object& props, const char* name, std::string& out) {
  auto* v = props.if_contains(name);
  if (!v) return {};
  auto r = json_string(*v, name);
  if (!r) return std::unexpected(r.error());
  out = *r;
  return {};
}

result<void> opt_enum(const boost::json::object& props, const char* name, const std::vector<std::string>& values,
                      std::string& out) {
  auto* v = props.if_contains(name);
  if (!v) return {};
  auto r = json_enum(*v, name, values);
  if (!r) return std::unexpected(r.error());
  out = *r;
  return {};
}

}  // namespace blockd::qom

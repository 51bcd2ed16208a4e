// throttle-group objects and the shared leaky-bucket state (see throttle_group.h); config on the model's thread, the state from any thread.
#include "config/objects/throttle_group.h"

#include <algorithm>
#include <cmath>

#include "config/qom/type_registry.h"

namespace blockd::qom {
namespace {

// ThrottleLimits member prefixes, bucket by bucket.
const char* const prefixes[throttle_buckets] = {"bps-total", "bps-read", "bps-write",
                                                "iops-total", "iops-read", "iops-write"};

enum class field { avg, max, length };

// Resolves a ThrottleLimits member name (without "x-") to its slot; false if not one.
bool member(const std::string& name, size_t& bucket, field& f) {
  for (size_t i = 0; i < throttle_buckets; ++i) {
    std::string p = prefixes[i];
    if (name == p) f = field::avg;
    else if (name == p + "-max") f = field::max;
    else if (name == p + "-max-length") f = field::length;
    else continue;
    bucket = i;
    return true;
  }
  return false;
}

int64_t& slot(throttle_config& c, size_t b, field f) {
  auto& l = c.b[b];
  return f == field::avg ? l.avg : f == field::max ? l.max : l.burst_length;
}

}  // namespace

result<void> throttle_validate(const throttle_config& c) {
  using k = throttle_bucket;
  auto conflict = [&](k total, k read, k write, bool use_max) {
    auto v = [&](k x) { return use_max ? c[x].max : c[x].avg; };
    return v(total) && (v(read) || v(write));
  };
  if (conflict(k::bps_total, k::bps_read, k::bps_write, false) ||
      conflict(k::iops_total, k::iops_read, k::iops_write, false) ||
      conflict(k::bps_total, k::bps_read, k::bps_write, true) ||
      conflict(k::iops_total, k::iops_read, k::iops_write, true))
    return fail("bps/iops/max total values and read/write values cannot be used at the same time");
  for (auto& l : c.b) {
    if (l.avg < 0 || l.max < 0 || l.avg > throttle_value_max || l.max > throttle_value_max)
      return fail("bps/iops/max values must be within [0, " + std::to_string(throttle_value_max) + "]");
    if (!l.burst_length) return fail("the burst length cannot be 0");
    if (l.burst_length > 1 && !l.max) return fail("burst length set without burst rate");
    if (l.max && l.burst_length > throttle_value_max / l.max) return fail("burst length too high for this burst rate");
    if (l.max && !l.avg) return fail("bps_max/iops_max require corresponding bps/iops values");
    if (l.max && l.max < l.avg) return fail("bps_max/iops_max cannot be lower than bps/iops");
  }
  if (c.op_size && !c[k::iops_total].avg && !c[k::iops_read].avg && !c[k::iops_write].avg)
    return fail("iops size requires an iops value to be set");
  return {};
}

result<void> throttle_apply_limits(throttle_config& c, const boost::json::object& limits) {
  throttle_config next = c;
  // QEMU applies the members bucket by bucket, so a bad length names the first such member.
  for (size_t i = 0; i < throttle_buckets; ++i)
    for (field f : {field::avg, field::max, field::length}) {
      std::string name = std::string(prefixes[i]) + (f == field::avg ? "" : f == field::max ? "-max" : "-max-length");
      auto* v = limits.if_contains(name);
      if (!v) continue;
      auto n = json_int(*v, "limits." + name);
      if (!n) return std::unexpected(n.error());
      if (f == field::length && (*n < 0 || *n > int64_t{UINT32_MAX}))
        return fail(name + " value must be in the range [0, 4294967295]");
      slot(next, i, f) = *n;
    }
  if (auto* v = limits.if_contains("iops-size")) {
    auto n = json_int(*v, "limits.iops-size");
    if (!n) return std::unexpected(n.error());
    next.op_size = *n;
  }
  for (auto& kv : limits) {
    size_t b;
    field f;
    std::string key(kv.key());
    if (key != "iops-size" && !member(key, b, f)) return fail("Parameter 'limits." + key + "' is unexpected");
  }
  c = next;
  return {};
}

boost::json::object throttle_limits_json(const throttle_config& c) {
  boost::json::object o;
  for (size_t i = 0; i < throttle_buckets; ++i) {
    std::string p = prefixes[i];
    o[p] = c.b[i].avg;
    o[p + "-max"] = c.b[i].max;
    o[p + "-max-length"] = c.b[i].burst_length;
  }
  o["iops-size"] = c.op_size;
  return o;
}

// ---- the object -------------------------------------------------------------------------------------

result<std::unique_ptr<object>> throttle_group_object::make(const std::string&, const boost::json::object& props) {
  auto o = std::make_unique<throttle_group_object>();
  // QSD sets the flat x-* members first and "limits" last, whatever their order in the command.
  for (auto& kv : props) {
    std::string key(kv.key());
    if (key == "limits") continue;
    if (auto r = o->set(key, kv.value()); !r) return std::unexpected(r.error());
  }
  if (auto* l = props.if_contains("limits"))
    if (auto r = o->set("limits", *l); !r) return std::unexpected(r.error());
  return o;
}

result<boost::json::value> throttle_group_object::get(const std::string& prop) const {
  throttle_config c = initialized_ ? state_->config() : pending_;
  if (prop == "limits") return boost::json::value(throttle_limits_json(c));
  if (prop == "x-iops-size") return boost::json::value(c.op_size);
  size_t b;
  field f;
  if (prop.starts_with("x-") && member(prop.substr(2), b, f)) return boost::json::value(slot(c, b, f));
  return object::get(prop);
}

result<void> throttle_group_object::set(const std::string& prop, const boost::json::value& v) {
  if (prop == "limits") {
    // "All fields are optional; a missing one keeps its value"; checked as a whole.
    if (!v.is_object()) return std::unexpected(type_error("limits", "object"));
    throttle_config c = initialized_ ? state_->config() : pending_;
    if (auto r = throttle_apply_limits(c, v.as_object()); !r) return r;
    if (auto r = throttle_validate(c); !r) return r;
    if (initialized_) state_->set_config(c);
    else pending_ = c;
    return {};
  }
  size_t b = 0;
  field f = field::avg;
  bool is_size = prop == "x-iops-size";
  if (!is_size && !(prop.starts_with("x-") && member(prop.substr(2), b, f))) return object::set(prop, v);
  if (initialized_) return fail("Property cannot be set after initialization");
  auto n = json_int(v, prop);
  if (!n) return std::unexpected(n.error());
  if (*n < 0) return fail("Property values cannot be negative");
  if (is_size) {
    pending_.op_size = *n;
    return {};
  }
  // QEMU's text lacks a space here.
  if (f == field::length && *n > int64_t{UINT32_MAX}) return fail(prop + " value must be in therange [0, 4294967295]");
  slot(pending_, b, f) = *n;
  return {};
}

result<void> throttle_group_object::complete(model&) {
  if (auto r = throttle_validate(pending_); !r) return r;
  state_->set_config(pending_);
  initialized_ = true;
  return {};
}

void register_throttle_group_types(type_registry& r) {
  // Property order as QSD 7.2's qom-list prints it.
  std::vector<property_info> props;
  for (const char* n : {"x-bps-write-max-length", "x-iops-total-max-length", "x-iops-size", "limits", "x-bps-total",
                        "x-iops-read-max-length", "x-bps-write", "x-iops-write-max-length", "x-bps-read-max",
                        "x-iops-read-max", "x-bps-total-max", "x-bps-read-max-length", "x-iops-read", "x-bps-read",
                        "x-bps-write-max", "x-iops-total-max", "x-iops-total", "x-iops-write",
                        "x-bps-total-max-length", "x-iops-write-max"})
    props.push_back({.name = n, .type = std::string(n) == "limits" ? "ThrottleLimits" : "int"});
  r.add({.name = "throttle-group",
         .parent = "object",
         .interfaces = {"user-creatable"},
         .properties = std::move(props),
         .make = throttle_group_object::make});
}

}  // namespace blockd::qom

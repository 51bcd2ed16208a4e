// Option helpers shared by the graph's open and reopen code (boolean members, inheritance from a parent); supervisor's thread.
#pragma once
#include <boost/json.hpp>

#include <algorithm>
#include <string_view>

namespace blockd::block {

// Members every node has (BlockdevOptions' base); they never reach the driver's own option view
// and never appear in a "json:" filename.
inline bool is_common(std::string_view k) {
  static const char* const common_keys[] = {"driver", "node-name", "discard", "cache", "active", "read-only",
                                            "auto-read-only", "force-share", "detect-zeroes"};
  return std::any_of(std::begin(common_keys), std::end(common_keys), [&](const char* c) { return k == c; });
}

inline bool get_bool(const boost::json::object& o, const char* k, bool dflt) {
  auto* v = o.if_contains(k);
  return v ? v->as_bool() : dflt;
}

// An inline child takes what it does not set itself from its parent, as QEMU's option inheritance
// does: read-only, auto-read-only, force-share and the cache flags; discard defaults to unmap below
// the top (the parent already applied its own discard policy).
inline boost::json::object inherited_options(const boost::json::object& child, const boost::json::object& parent) {
  boost::json::object o = child;
  for (const char* k : {"read-only", "auto-read-only", "force-share"})
    if (!o.contains(k))
      if (auto* v = parent.if_contains(k)) o[k] = *v;
  if (auto* pc = parent.if_contains("cache")) {
    boost::json::object cache = o.contains("cache") ? o["cache"].as_object() : boost::json::object();
    for (auto& kv : pc->as_object())
      if (!cache.contains(kv.key())) cache[kv.key()] = kv.value();
    o["cache"] = std::move(cache);
  }
  if (!o.contains("discard")) o["discard"] = "unmap";
  // An inactive parent opens its inline children inactive too (QEMU passes the flag down).
  if (auto* v = parent.if_contains("active"); v && !o.contains("active")) o["active"] = *v;
  return o;
}

}  // namespace blockd::block

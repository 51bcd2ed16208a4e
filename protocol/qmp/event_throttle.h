// QMP event rate limiting as QEMU's monitor does it (QUORUM_* events: at most one a second per key, the last held one sent when the second is up); the supervisor's thread only.
#pragma once
#include <boost/json.hpp>

#include <cstdint>
#include <map>
#include <optional>
#include <string>

namespace blockd::qmp {

// Plain bookkeeping, no clock and no timer of its own: the caller asks offer() for each event and
// calls expire(key) when the period it was told to wait for has passed.
class event_throttle {
 public:
  static constexpr int64_t period_ms = 1000;

  // The throttling key of an event, or nullopt when the event is never throttled.
  static std::optional<std::string> key_of(const std::string& name, const boost::json::object& data);

  // An event of `key` arrives. true: send it now and call expire(key) after period_ms. false: it
  // is held (replacing an older held one) and goes out at the next expire.
  template <class Event>
  bool offer(const std::string& key, Event ev, std::map<std::string, std::optional<Event>>& state) const {
    auto it = state.find(key);
    if (it == state.end()) {
      state.emplace(key, std::nullopt);
      return true;
    }
    it->second = std::move(ev);
    return false;
  }
  // The period of `key` is up: the held event to send now (then wait another period and expire
  // again), or nullopt when none was held (the key is free again).
  template <class Event>
  std::optional<Event> expire(const std::string& key, std::map<std::string, std::optional<Event>>& state) const {
    auto it = state.find(key);
    if (it == state.end()) return std::nullopt;
    if (!it->second) {
      state.erase(it);
      return std::nullopt;
    }
    auto ev = std::move(*it->second);
    it->second.reset();
    return ev;
  }
};

}  // namespace blockd::qmp

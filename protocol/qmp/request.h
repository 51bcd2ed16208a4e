// QMP request envelope checks and reply/event shapes (qmp-spec rules, QSD's texts); any thread.
#pragma once
#include <boost/json.hpp>
#include <cstdint>
#include <expected>
#include <optional>
#include <string>
#include <string_view>

#include "protocol/error.h"

namespace blockd::qmp {

struct request {
  std::string command;
  boost::json::object arguments;
  std::optional<boost::json::value> id;
  bool oob = false;
};

struct envelope_error {
  blockd::error err;
  std::optional<boost::json::value> id;  // echoed when the input was an object
};

// Checks a parsed value as QSD's dispatcher does, in its order: object-ness, then each member in
// QDict iteration order, then the presence of execute (or exec-oob when OOB is enabled).
std::expected<request, envelope_error> parse_request(const boost::json::value& v, bool oob_enabled);

boost::json::object make_return(const boost::json::value& ret, const std::optional<boost::json::value>& id);
boost::json::object make_error(const blockd::error& e, const std::optional<boost::json::value>& id);
boost::json::object make_event(std::string_view name, const boost::json::object& data, int64_t seconds,
                               int64_t microseconds);

}  // namespace blockd::qmp

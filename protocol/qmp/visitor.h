// Validates and converts input against schema types with QAPI's exact messages (QMP or keyval input); any thread.
#pragma once
#include <boost/json.hpp>
#include <string_view>

#include "protocol/error.h"
#include "protocol/qmp/schema.h"

namespace blockd::qmp {

// qmp: strict JSON types, nothing coerced. keyval: every leaf is a string (command-line syntax) and
// is converted to the member's type: booleans on/yes/true/y and off/no/false/n, integers in any C
// base, sizes with k/M/G/T/P/E suffixes, numbers, enums by name.
enum class input_mode { qmp, keyval };

// Returns the validated value with keyval strings converted to their types. No defaults are filled.
result<boost::json::value> visit(const schema& s, std::string_view type_name, const boost::json::value& input,
                                 input_mode mode);

// Validates a command's arguments ({} for commands without parameters).
result<boost::json::object> visit_command_args(const schema& s, std::string_view command,
                                               const boost::json::object& args, input_mode mode = input_mode::qmp);

}  // namespace blockd::qmp

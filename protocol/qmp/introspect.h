// query-qmp-schema and query-commands output generated from the one schema; any thread.
#pragma once
#include <boost/json.hpp>

#include "protocol/qmp/schema.h"

namespace blockd::qmp {

// SchemaInfo list in QEMU's layout: commands and events in definition order, then the types they
// use in order of first use, with type names masked as numbers ("0" is the empty object).
boost::json::array introspect(const schema& s);

// [{"name": ...}] in the order QSD lists them (newest registration first).
boost::json::array command_list(const schema& s);

}  // namespace blockd::qmp

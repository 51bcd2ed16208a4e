// Serializes JSON values exactly as QEMU's QMP output looks (member order, ASCII escapes, %.17g); any thread.
#pragma once
#include <boost/json.hpp>
#include <string>
#include <string_view>

namespace blockd::qmp {

// Compact form uses ", " and ": "; pretty form indents by 4 with "\n" line breaks (the monitor
// turns them into CRLF). Object members come out in the order QEMU's QDict iterates them, which
// is what makes blockd's replies byte-identical to QSD's.
std::string to_json(const boost::json::value& v, bool pretty = false);

// The bucket QEMU's QDict puts a key in; members are emitted by ascending bucket and, within a
// bucket, most recently inserted first.
unsigned qdict_bucket(std::string_view key);

}  // namespace blockd::qmp

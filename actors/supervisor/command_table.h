// The supervisor's command table: every QMP command it runs, by name, bound to its schema entry and handler; main iothread only.
#pragma once
#include <boost/json.hpp>

#include <functional>
#include <map>
#include <string>
#include <vector>

#include "actors/messages.h"
#include "protocol/qmp/schema.h"

namespace blockd {

using reply_fn = std::function<void(command_outcome)>;
// A handler answers exactly once through `reply`, now or later (after nodes drained, a job
// started, a task on another iothread reported back). `args` are already checked against the
// command's schema by the monitor.
using command_handler = std::function<void(boost::json::object& args, reply_fn reply)>;

// Adding a command is one registration here plus its definition in protocol/qmp/schema_defs.cpp;
// the table refuses a name the schema lacks, and verify() refuses a schema command nobody runs,
// so the two cannot drift apart (the monitor answers CommandNotFound from the schema alone).
class command_table {
 public:
  explicit command_table(const qmp::schema& s) : schema_(s) {}

  // Throws std::logic_error for a name the schema does not define or one registered twice: a
  // programming error, found at start-up.
  void add(const std::string& name, command_handler h);
  // For commands that answer at once.
  void add_now(const std::string& name, std::function<command_outcome(boost::json::object&)> fn);

  const command_handler* find(const std::string& name) const;
  std::vector<std::string> names() const;

  // Throws std::logic_error naming the schema commands that neither this table nor the monitor
  // (`monitor_handled`) runs.
  void verify(const std::vector<std::string>& monitor_handled) const;

 private:
  const qmp::schema& schema_;
  std::map<std::string, command_handler> handlers_;
};

}  // namespace blockd

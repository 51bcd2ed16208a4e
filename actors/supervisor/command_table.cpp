// The supervisor's command table (see command_table.h); main iothread only.
#include "actors/supervisor/command_table.h"

#include <algorithm>
#include <stdexcept>

namespace blockd {

void command_table::add(const std::string& name, command_handler h) {
  if (!schema_.find_command(name))
    throw std::logic_error("command '" + name + "' has a handler but no schema entry; define it in schema_defs.cpp");
  if (!handlers_.emplace(name, std::move(h)).second)
    throw std::logic_error("command '" + name + "' is registered twice");
}

void command_table::add_now(const std::string& name, std::function<command_outcome(boost::json::object&)> fn) {
  add(name, [fn = std::move(fn)](boost::json::object& args, reply_fn reply) { reply(fn(args)); });
}

const command_handler* command_table::find(const std::string& name) const {
  auto it = handlers_.find(name);
  return it == handlers_.end() ? nullptr : &it->second;
}

std::vector<std::string> command_table::names() const {
  std::vector<std::string> out;
  for (auto& [n, h] : handlers_) out.push_back(n);
  return out;
}

void command_table::verify(const std::vector<std::string>& monitor_handled) const {
  std::string missing;
  for (const auto& e : schema_.entities()) {
    if (!e.is_command) continue;
    const std::string& n = schema_.commands()[e.index].name;
    if (handlers_.count(n) || std::find(monitor_handled.begin(), monitor_handled.end(), n) != monitor_handled.end())
      continue;
    missing += (missing.empty() ? "" : ", ") + n;
  }
  if (!missing.empty())
    throw std::logic_error("the QMP schema defines commands nobody runs: " + missing +
                           "; register a handler or drop the definition");
}

}  // namespace blockd

// Help texts for --object: the user-creatable types blockd implements and their properties; any thread.
#include "config/object_help.h"

#include <utility>
#include <vector>

namespace blockd {
namespace {

struct type_props {
  const char* type;
  std::vector<const char*> props;  // "name=<type>" in alphabetical order, as QSD lists them
};

const std::vector<type_props>& table() {
  static const std::vector<type_props> t = {
      {"iothread",
       {"aio-max-batch=<int>", "poll-grow=<int>", "poll-max-ns=<int>", "poll-shrink=<int>", "thread-pool-max=<int>",
        "thread-pool-min=<int>"}},
      {"main-loop", {"aio-max-batch=<int>", "thread-pool-max=<int>", "thread-pool-min=<int>"}},
  };
  return t;
}

}  // namespace

bool object_type_supported(const std::string& t) {
  for (auto& e : table())
    if (t == e.type) return true;
  return false;
}

std::string object_types_help() {
  std::string s = "List of user creatable objects:\n";
  for (auto& e : table()) s += std::string("  ") + e.type + "\n";
  return s;
}

std::string object_type_help(const std::string& t) {
  for (auto& e : table())
    if (t == e.type) {
      std::string s = t + " options:\n";
      for (auto* p : e.props) s += std::string("  ") + p + "\n";
      return s;
    }
  return "invalid object type: " + t + "\n";
}

}  // namespace blockd

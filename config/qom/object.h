// QOM object base class, its property descriptions and JSON value helpers; plain C++, the thread that owns the model (the supervisor's).
#pragma once
#include <boost/json.hpp>

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "protocol/error.h"

namespace blockd::qom {

class model;

// One property of a QOM class, as qom-list and qom-list-properties show it.
struct property_info {
  std::string name;
  std::string type;         // QOM type string: "string", "bool", "int", "QAuthZListPolicy", ...
  std::string description;  // QSD 7.2 prints none for the user-creatable types; kept empty then
  std::optional<boost::json::value> default_value;  // "default-value" in qom-list-properties
  bool readable = true;
  bool writable = true;
};

// A user-creatable object (or any other object placed in the QOM tree, e.g. a chardev).
// Creation runs in QSD's phases: the factory reads the properties (setter checks, before the id is
// taken), the model then claims the id in /objects (duplicate check), then complete() runs
// (loading files, cross-checks). A failing complete() releases the id again.
class object {
 public:
  virtual ~object() = default;
  const std::string& id() const { return id_; }
  const std::string& type_name() const { return type_; }

  // qom-get of a property this object's class lists (the model answers "type" and unknown names).
  virtual result<boost::json::value> get(const std::string& prop) const;
  // qom-set of a listed, writable property after creation.
  virtual result<void> set(const std::string& prop, const boost::json::value& v);
  // Completion after the id is claimed; may look up other objects through the model.
  virtual result<void> complete(model& m) { return {}; }
  // object-del: an error refuses the deletion with that text (the model adds the users it knows).
  virtual result<void> can_delete() const { return {}; }
  // Runs just before the object leaves the tree.
  virtual void on_delete() {}

 private:
  friend class model;
  std::string id_;
  std::string type_;
};

// Makes an object from object-add's type properties (qom-type and id removed). Runs the setter
// phase only: range and type checks QSD makes while setting each property.
using factory = std::function<result<std::unique_ptr<object>>(const std::string& id, const boost::json::object& props)>;

// ---- JSON helpers with QSD's texts, for factories and qom-set -----------------------------------

// QAPI's "Invalid parameter type for 'NAME', expected: WHAT".
error type_error(const std::string& name, const std::string& what);
result<int64_t> json_int(const boost::json::value& v, const std::string& name);
result<uint64_t> json_uint(const boost::json::value& v, const std::string& name);
result<bool> json_bool(const boost::json::value& v, const std::string& name);
result<std::string> json_string(const boost::json::value& v, const std::string& name);
// An enum member: "Parameter 'NAME' does not accept value 'X'" for others.
result<std::string> json_enum(const boost::json::value& v, const std::string& name,
                              const std::vector<std::string>& values);

// Reads an optional member of `props` with the matching helper; leaves `out` when absent.
result<void> opt_int(const boost::json::object& props, const char* name, int64_t& out);
result<void> opt_bool(const boost::json::object& props, const char* name, bool& out);
result<void> opt_string(const boost::json::object& props, const char* name, std::string& out);
result<void> opt_enum(const boost::json::object& props, const char* name, const std::vector<std::string>& values,
                      std::string& out);

}  // namespace blockd::qom

// The QOM type registry: every type QSD reports, its parent, interfaces, properties and factory; plain C++, registration at start-up, reads from the model's thread.
#pragma once
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "config/qom/object.h"

namespace blockd::qom {

struct type_info {
  std::string name;
  std::string parent;                    // empty only for "object" and "interface"
  bool abstract = false;
  std::vector<std::string> interfaces;   // e.g. "user-creatable"
  std::vector<property_info> properties;  // this class's own, in the order qom-list prints them
  factory make;                          // empty: object-add refuses the type
  // Why object-add refuses a type that QSD creates (appended to QSD's "invalid object type: X").
  std::string refusal;
};

class type_registry {
 public:
  // The registry with every built-in type (see builtin_types.cpp); factories may still be installed.
  static type_registry& global();
  // An empty registry (tests).
  type_registry() = default;

  void add(type_info t);
  const type_info* find(const std::string& name) const;
  // Installs (or replaces) the factory of a registered type, e.g. the supervisor's iothread.
  // false if the type is not registered.
  bool install_factory(const std::string& name, factory f);

  // True if `name` is `of` or derives from it, or implements it as an interface.
  bool is_a(const std::string& name, const std::string& of) const;
  // Class properties from the root class down to `name`, as qom-list prints them ("type" first).
  std::vector<property_info> properties(const std::string& name) const;
  // Registered names in the order QSD 7.2 iterates its type table (see glib_order.h).
  std::vector<std::string> names_in_qsd_order() const;

 private:
  std::map<std::string, type_info> types_;
  std::vector<std::string> insertion_;
};

// Adds the built-in types to `r`: called once by global(); each register_* lives beside its types.
void register_builtin_types(type_registry& r);

}  // namespace blockd::qom

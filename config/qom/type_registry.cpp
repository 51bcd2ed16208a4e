// The QOM type registry (see type_registry.h); plain C++, filled at start-up, read on the model's thread.
#include "config/qom/type_registry.h"

#include <algorithm>

#include "config/qom/glib_order.h"

namespace blockd::qom {

type_registry& type_registry::global() {
  static type_registry* r = [] {
    auto* reg = new type_registry;
    register_builtin_types(*reg);
    return reg;
  }();
  return *r;
}

void type_registry::add(type_info t) {
  auto name = t.name;
  if (!types_.contains(name)) insertion_.push_back(name);
  types_[name] = std::move(t);
}

const type_info* type_registry::find(const std::string& name) const {
  auto it = types_.find(name);
  return it == types_.end() ? nullptr : &it->second;
}

bool type_registry::install_factory(const std::string& name, factory f) {
  auto it = types_.find(name);
  if (it == types_.end()) return false;
  it->second.make = std::move(f);
  it->second.refusal.clear();
  return true;
}

namespace {

// Does `t` (a type) derive from `of` through its parent chain?
bool derives(const type_registry& r, const std::string& t, const std::string& of) {
  for (const type_info* i = r.find(t); i; i = i->parent.empty() ? nullptr : r.find(i->parent))
    if (i->name == of) return true;
  return false;
}

}  // namespace

bool type_registry::is_a(const std::string& name, const std::string& of) const {
  if (derives(*this, name, of)) return true;
  // QOM's dynamic cast to an interface: the interfaces of the class and its ancestors that derive
  // from `of`; more than one match is ambiguous and the cast fails, so a class that implements two
  // interfaces does not "implement" their common parent "interface" (tls-cipher-suites in QSD).
  int matches = 0;
  for (const type_info* i = find(name); i; i = i->parent.empty() ? nullptr : find(i->parent))
    for (auto& iface : i->interfaces)
      if (derives(*this, iface, of)) ++matches;
  return matches == 1;
}

std::vector<property_info> type_registry::properties(const std::string& name) const {
  std::vector<const type_info*> chain;
  for (const type_info* i = find(name); i; i = i->parent.empty() ? nullptr : find(i->parent)) chain.push_back(i);
  std::vector<property_info> out;
  for (auto it = chain.rbegin(); it != chain.rend(); ++it)
    out.insert(out.end(), (*it)->properties.begin(), (*it)->properties.end());
  return out;
}

std::vector<std::string> type_registry::names_in_qsd_order() const {
  // QSD walks its type table (a GHashTable filled in QEMU's registration order) and prepends each
  // match to the reply. blockd registers in its own order, so collisions may land differently:
  // the set is exact, the order close (clients treat the reply as a set).
  glib_order t;
  for (auto& n : insertion_) t.insert(n);
  auto s = t.slots();
  std::reverse(s.begin(), s.end());
  return s;
}

}  // namespace blockd::qom

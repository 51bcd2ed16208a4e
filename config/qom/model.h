// The QOM tree and the QMP commands over it (object-add/-del, qom-*), with users that keep objects alive; plain C++, one owner thread (the supervisor's).
#pragma once
#include <boost/json.hpp>

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "config/qom/glib_order.h"
#include "config/qom/object.h"
#include "config/qom/type_registry.h"

namespace blockd::qom {

class model;

// A user's hold on an object (a node on a throttle-group, an NBD server on its TLS creds): while
// it lives, object-del refuses the object and names the user. Move-only; releases on destruction.
class ref_handle {
 public:
  ref_handle() = default;
  ref_handle(ref_handle&& o) noexcept { *this = std::move(o); }
  ref_handle& operator=(ref_handle&& o) noexcept;
  ~ref_handle() { reset(); }
  void reset();
  explicit operator bool() const { return m_ != nullptr; }
  const std::string& id() const { return id_; }

 private:
  friend class model;
  model* m_ = nullptr;
  std::string id_, user_;
};

class model {
 public:
  explicit model(type_registry& types = type_registry::global());
  ~model();
  model(const model&) = delete;
  model& operator=(const model&) = delete;

  type_registry& types() { return types_; }

  // ---- QMP commands (arguments as the schema validated them) --------------------------------
  result<boost::json::value> object_add(const boost::json::object& args);
  result<boost::json::value> object_del(const std::string& id);
  result<boost::json::value> qom_list(const std::string& path);
  result<boost::json::value> qom_get(const std::string& path, const std::string& property);
  result<boost::json::value> qom_set(const std::string& path, const std::string& property,
                                     const boost::json::value& value);
  result<boost::json::value> qom_list_types(const std::string* implements, bool abstract);
  result<boost::json::value> qom_list_properties(const std::string& type_name);
  result<boost::json::value> qom_list_get(const std::vector<std::string>& paths);
  // Dispatches one of the commands above by QMP name; nullopt if `name` is not one of them.
  std::optional<result<boost::json::value>> run(const std::string& name, const boost::json::object& args);

  // object-del in two steps for callers that must do asynchronous work in between (moving nodes
  // off an iothread): prepare checks existence, users and can_delete(); finish removes.
  result<object*> prepare_delete(const std::string& id);
  void finish_delete(const std::string& id);

  // ---- lookups for other modules ------------------------------------------------------------
  // The object with this id under /objects (creates /objects as QSD's lookups do).
  object* find(const std::string& id);
  template <class T>
  T* find_as(const std::string& id) {
    return dynamic_cast<T*>(find(id));
  }
  // Objects under /objects in creation order.
  std::vector<object*> objects() const;

  // ---- users ---------------------------------------------------------------------------------
  // `user` describes the holder for error texts, e.g. "node 'disk0'" or "object 'tls0'".
  result<ref_handle> ref(const std::string& id, const std::string& user);
  void unref(const std::string& id, const std::string& user);
  std::vector<std::string> users_of(const std::string& id) const;

  // ---- other children (chardevs) ---------------------------------------------------------------
  // Places `o` (its type must be registered) as /CONTAINER/NAME; the container is made on demand.
  result<void> add_child(const std::string& container, const std::string& name, const std::string& type,
                         std::unique_ptr<object> o);
  void remove_child(const std::string& container, const std::string& name);

 private:
  struct node {
    std::string type;             // QOM type name
    std::unique_ptr<object> obj;  // null for containers
    std::map<std::string, std::unique_ptr<node>> children;
    glib_order order;             // the children's names, in QSD's table order
    node* parent = nullptr;
    std::string name;
  };
  node* container(const std::string& name);  // /NAME, created on demand
  node* resolve(const std::string& path, bool* ambiguous);
  void partial(node* n, const std::vector<std::string>& parts, node*& found, bool& ambiguous);
  node* walk(node* from, const std::vector<std::string>& parts);
  std::string path_of(const node* n) const;
  result<boost::json::value> get_prop(const node* n, const std::string& property);
  boost::json::array list_of(const node* n);

  type_registry& types_;
  node root_;
  std::vector<std::string> creation_;  // ids under /objects in creation order
  std::map<std::string, std::vector<std::string>> users_;
};

}  // namespace blockd::qom

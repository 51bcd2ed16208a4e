// authz-simple, authz-list and authz-listfile objects: who may connect over TLS; plain C++, the model's thread.
#pragma once
#include <ctime>
#include <memory>

#include "config/qom/object.h"
#include "protocol/tls/tls.h"

namespace blockd::qom {

class model;

class authz_object : public object {
 public:
  virtual bool allows(const std::string& identity) = 0;
};

class authz_simple_object final : public authz_object {
 public:
  static result<std::unique_ptr<object>> make(const std::string& id, const boost::json::object& props);
  bool allows(const std::string& identity) override { return identity == identity_; }
  result<boost::json::value> get(const std::string& prop) const override;
  result<void> set(const std::string& prop, const boost::json::value& v) override;

 private:
  std::string identity_;
};

class authz_list_object final : public authz_object {
 public:
  static result<std::unique_ptr<object>> make(const std::string& id, const boost::json::object& props);
  bool allows(const std::string& identity) override { return policy_.allows(identity); }
  result<boost::json::value> get(const std::string& prop) const override;
  result<void> set(const std::string& prop, const boost::json::value& v) override;

  // Parses AuthZListProperties members (policy, rules) onto `p`, with QAPI's texts.
  static result<void> read(const boost::json::object& props, tls::authz_policy& p);
  static boost::json::array rules_json(const tls::authz_policy& p);

 private:
  tls::authz_policy policy_;
};

// authz-listfile: the rules of an authz-list read from a JSON file. QSD 7.2 and 10.2 cannot create
// it (the QAPI name "authz-listfile" differs from the QOM type "authz-list-file": object-add says
// "invalid object type: authz-listfile"); blockd builds it under the QAPI name.
// With refresh (the default), allows() compares the file's mtime, size and inode with the last
// load and reloads when they changed (a stat per check instead of inotify); a file that fails to
// load refuses everyone until it loads again, as QEMU documents.
class authz_listfile_object final : public authz_object {
 public:
  static result<std::unique_ptr<object>> make(const std::string& id, const boost::json::object& props);
  bool allows(const std::string& identity) override;
  // Reloads if the file changed; false if it could not be loaded.
  bool refresh_if_changed();
  result<boost::json::value> get(const std::string& prop) const override;
  result<void> set(const std::string& prop, const boost::json::value& v) override;
  result<void> complete(model& m) override;

 private:
  result<void> load();
  std::string filename_;
  bool refresh_ = true;
  tls::authz_policy policy_;
  bool loaded_ = false;
  struct timespec mtime_{};
  off_t size_ = -1;
  ino_t ino_ = 0;
};

// QSD's tls-authz check: "Cannot find QAuthZ object ID X" / "Object 'X' is not a QAuthZ subclass".
result<bool> authorize(model& m, const std::string& authz_id, const std::string& identity);

}  // namespace blockd::qom

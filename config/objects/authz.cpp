// authz-simple, authz-list and authz-listfile objects (see authz.h); plain C++, the model's thread.
#include "config/objects/authz.h"

#include <sys/stat.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

#include "config/qom/model.h"
#include "config/qom/type_registry.h"

namespace blockd::qom {
namespace {

const std::vector<std::string> policies = {"deny", "allow"};
const std::vector<std::string> match_formats = {"exact", "glob"};

}  // namespace

result<bool> authorize(model& m, const std::string& authz_id, const std::string& identity) {
  object* o = m.find(authz_id);
  if (!o) return fail("Cannot find QAuthZ object ID " + authz_id);
  auto* a = dynamic_cast<authz_object*>(o);
  if (!a) return fail("Object '" + authz_id + "' is not a QAuthZ subclass");
  return a->allows(identity);
}

// ---- authz-simple ----------------------------------------------------------------------------------

result<std::unique_ptr<object>> authz_simple_object::make(const std::string&, const boost::json::object& props) {
  auto o = std::make_unique<authz_simple_object>();
  if (!props.contains("identity")) return fail("Parameter 'identity' is missing");
  if (auto r = opt_string(props, "identity", o->identity_); !r) return std::unexpected(r.error());
  return o;
}

result<boost::json::value> authz_simple_object::get(const std::string& prop) const {
  if (prop == "identity") return boost::json::value(identity_);
  return object::get(prop);
}

result<void> authz_simple_object::set(const std::string& prop, const boost::json::value& v) {
  if (prop != "identity") return object::set(prop, v);
  auto s = json_string(v, prop);
  if (!s) return std::unexpected(s.error());
  identity_ = *s;
  return {};
}

// ---- authz-list ------------------------------------------------------------------------------------

result<void> authz_list_object::read(const boost::json::object& props, tls::authz_policy& p) {
  std::string policy = p.default_allow ? "allow" : "deny";
  if (auto r = opt_enum(props, "policy", policies, policy); !r) return r;
  std::vector<tls::authz_rule> rules = p.rules;
  if (auto* rs = props.if_contains("rules")) {
    if (!rs->is_array()) return std::unexpected(type_error("rules", "array"));
    rules.clear();
    size_t i = 0;
    for (auto& r : rs->as_array()) {
      std::string at = "rules[" + std::to_string(i++) + "]";
      if (!r.is_object()) return std::unexpected(type_error(at, "object"));
      auto& ro = r.as_object();
      tls::authz_rule rule;
      auto* m = ro.if_contains("match");
      if (!m) return fail("Parameter '" + at + ".match' is missing");
      auto ms = json_string(*m, at + ".match");
      if (!ms) return std::unexpected(ms.error());
      rule.match = *ms;
      auto* pv = ro.if_contains("policy");
      if (!pv) return fail("Parameter '" + at + ".policy' is missing");
      auto ps = json_enum(*pv, at + ".policy", policies);
      if (!ps) return std::unexpected(ps.error());
      rule.allow = *ps == "allow";
      std::string fmt = "exact";
      if (auto* fv = ro.if_contains("format")) {
        auto fs = json_enum(*fv, at + ".format", match_formats);
        if (!fs) return std::unexpected(fs.error());
        fmt = *fs;
        rule.format_given = true;
      }
      rule.glob = fmt == "glob";
      rules.push_back(std::move(rule));
    }
  }
  p.default_allow = policy == "allow";
  p.rules = std::move(rules);
  return {};
}

boost::json::array authz_list_object::rules_json(const tls::authz_policy& p) {
  // QSD reads back "format" only where it was given (QEMU keeps the optional member's flag).
  boost::json::array out;
  for (auto& r : p.rules) {
    boost::json::object o{{"match", r.match}, {"policy", r.allow ? "allow" : "deny"}};
    if (r.format_given) o["format"] = r.glob ? "glob" : "exact";
    out.push_back(std::move(o));
  }
  return out;
}

result<std::unique_ptr<object>> authz_list_object::make(const std::string&, const boost::json::object& props) {
  auto o = std::make_unique<authz_list_object>();
  if (auto r = read(props, o->policy_); !r) return std::unexpected(r.error());
  return o;
}

result<boost::json::value> authz_list_object::get(const std::string& prop) const {
  if (prop == "policy") return boost::json::value(policy_.default_allow ? "allow" : "deny");
  if (prop == "rules") return boost::json::value(rules_json(policy_));
  return object::get(prop);
}

result<void> authz_list_object::set(const std::string& prop, const boost::json::value& v) {
  if (prop != "policy" && prop != "rules") return object::set(prop, v);
  boost::json::object one;
  one[prop] = v;
  return read(one, policy_);
}

// ---- authz-listfile ----------------------------------------------------------------------------------

result<std::unique_ptr<object>> authz_listfile_object::make(const std::string&, const boost::json::object& props) {
  auto o = std::make_unique<authz_listfile_object>();
  if (!props.contains("filename")) return fail("Parameter 'filename' is missing");
  if (auto r = opt_string(props, "filename", o->filename_); !r) return std::unexpected(r.error());
  if (auto r = opt_bool(props, "refresh", o->refresh_); !r) return std::unexpected(r.error());
  return o;
}

result<void> authz_listfile_object::load() {
  struct stat st{};
  if (::stat(filename_.c_str(), &st) != 0) {
    loaded_ = false;
    return fail("Unable to read '" + filename_ + "': " + std::strerror(errno));
  }
  mtime_ = st.st_mtim;
  size_ = st.st_size;
  ino_ = st.st_ino;
  std::ifstream f(filename_);
  std::ostringstream ss;
  ss << f.rdbuf();
  boost::system::error_code ec;
  auto v = boost::json::parse(ss.str(), ec);
  loaded_ = false;
  if (ec) return fail("Unable to parse '" + filename_ + "': " + ec.message());
  if (!v.is_object()) return fail("File '" + filename_ + "' must contain a JSON object");
  tls::authz_policy p;
  for (auto& kv : v.as_object())
    if (kv.key() != "policy" && kv.key() != "rules") return fail("Parameter '" + std::string(kv.key()) + "' is unexpected");
  if (auto r = authz_list_object::read(v.as_object(), p); !r) return r;
  policy_ = std::move(p);
  loaded_ = true;
  return {};
}

bool authz_listfile_object::refresh_if_changed() {
  struct stat st{};
  bool same = ::stat(filename_.c_str(), &st) == 0 && st.st_mtim.tv_sec == mtime_.tv_sec &&
              st.st_mtim.tv_nsec == mtime_.tv_nsec && st.st_size == size_ && st.st_ino == ino_;
  if (!same) (void)load();
  return loaded_;
}

bool authz_listfile_object::allows(const std::string& identity) {
  if (refresh_ && !refresh_if_changed()) return false;
  return loaded_ && policy_.allows(identity);
}

result<boost::json::value> authz_listfile_object::get(const std::string& prop) const {
  if (prop == "filename") return boost::json::value(filename_);
  if (prop == "refresh") return boost::json::value(refresh_);
  return object::get(prop);
}

result<void> authz_listfile_object::set(const std::string& prop, const boost::json::value& v) {
  if (prop == "filename") {
    auto s = json_string(v, prop);
    if (!s) return std::unexpected(s.error());
    filename_ = *s;
    return {};
  }
  if (prop == "refresh") {
    auto b = json_bool(v, prop);
    if (!b) return std::unexpected(b.error());
    refresh_ = *b;
    return {};
  }
  return object::set(prop, v);
}

result<void> authz_listfile_object::complete(model&) { return load(); }

void register_authz_types(type_registry& r) {
  r.add({.name = "authz", .parent = "object", .abstract = true});
  r.add({.name = "authz-simple",
         .parent = "authz",
         .interfaces = {"user-creatable"},
         .properties = {{.name = "identity", .type = "string"}},
         .make = authz_simple_object::make});
  r.add({.name = "authz-list",
         .parent = "authz",
         .interfaces = {"user-creatable"},
         .properties = {{.name = "policy", .type = "QAuthZListPolicy"}, {.name = "rules", .type = "QAuthZListRule"}},
         .make = authz_list_object::make});
  // QSD's QOM type (listed by qom-list-types) is "authz-list-file", which object-add cannot name.
  r.add({.name = "authz-list-file",
         .parent = "authz",
         .interfaces = {"user-creatable"},
         .properties = {{.name = "filename", .type = "string"}, {.name = "refresh", .type = "bool"}},
         .make = authz_listfile_object::make});
}

}  // namespace blockd::qom

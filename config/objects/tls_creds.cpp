// tls-creds-* and tls-cipher-suites objects (see tls_creds.h); plain C++, the model's thread.
#include "config/objects/tls_creds.h"

#include "config/objects/secret.h"
#include "config/qom/model.h"
#include "config/qom/type_registry.h"

namespace blockd::qom {
namespace {

const std::vector<std::string> endpoints = {"client", "server"};

}  // namespace

factory tls_creds_object::make_for(const std::string& type) {
  return [type](const std::string&, const boost::json::object& props) -> result<std::unique_ptr<object>> {
    auto o = std::make_unique<tls_creds_object>();
    o->type_ = type;
    o->o_.type = type == "tls-creds-psk" ? tls::kind::psk : type == "tls-creds-anon" ? tls::kind::anon : tls::kind::x509;
    for (auto& kv : props)
      if (auto r = o->set(std::string(kv.key()), kv.value()); !r) return std::unexpected(r.error());
    return o;
  };
}

result<boost::json::value> tls_creds_object::get(const std::string& prop) const {
  if (prop == "endpoint") return boost::json::value(o_.server ? "server" : "client");
  if (prop == "dir") return boost::json::value(o_.dir);
  if (prop == "verify-peer") return boost::json::value(o_.verify_peer);
  if (prop == "priority") return boost::json::value(o_.priority);
  if (prop == "sanity-check" && type_ == "tls-creds-x509") return boost::json::value(o_.sanity_check);
  if (prop == "passwordid" && type_ == "tls-creds-x509") return boost::json::value(passwordid_);
  if (prop == "username" && type_ == "tls-creds-psk") return boost::json::value(o_.username);
  return object::get(prop);
}

result<void> tls_creds_object::set(const std::string& prop, const boost::json::value& v) {
  // Values set after creation are stored, as in QSD, but the loaded credentials stay.
  if (prop == "endpoint") {
    auto s = json_enum(v, prop, endpoints);
    if (!s) return std::unexpected(s.error());
    o_.server = *s == "server";
    return {};
  }
  auto str = [&](std::string& out) -> result<void> {
    auto s = json_string(v, prop);
    if (!s) return std::unexpected(s.error());
    out = *s;
    return {};
  };
  auto flag = [&](bool& out) -> result<void> {
    auto b = json_bool(v, prop);
    if (!b) return std::unexpected(b.error());
    out = *b;
    return {};
  };
  if (prop == "dir") return str(o_.dir);
  if (prop == "priority") return str(o_.priority);
  if (prop == "verify-peer") return flag(o_.verify_peer);
  if (prop == "sanity-check" && type_ == "tls-creds-x509") return flag(o_.sanity_check);
  if (prop == "passwordid" && type_ == "tls-creds-x509") return str(passwordid_);
  if (prop == "username" && type_ == "tls-creds-psk") return str(o_.username);
  return object::set(prop, v);
}

result<void> tls_creds_object::complete(model& m) {
  if (type_ == "tls-cipher-suites") {
    // QSD's object only turns the priority string into a cipher list for firmware; it has no
    // property showing the list, and an unknown priority string is accepted at creation.
    if (o_.priority.empty()) return fail("'priority' property is not set");
    return {};
  }
  if (!passwordid_.empty()) {
    auto pw = secret_bytes(m, passwordid_);
    if (!pw) return std::unexpected(pw.error());
    o_.key_password = *pw;
  }
  auto c = tls::credentials::load(o_);
  o_.key_password.reset();  // the password is not kept once the key is in memory
  if (!c) return std::unexpected(c.error());
  creds_ = std::move(*c);
  return {};
}

result<std::shared_ptr<const tls::credentials>> tls_credentials(model& m, const std::string& id, bool server) {
  object* o = m.find(id);
  if (!o) return fail("No TLS credentials with id '" + id + "'");
  auto* t = dynamic_cast<tls_creds_object*>(o);
  if (!t || !t->credentials()) return fail("Object with id '" + id + "' is not TLS credentials");
  if (t->is_server() != server)
    return fail(server ? "Expected TLS credentials for a server endpoint"
                       : "Expected TLS credentials for a client endpoint");
  return t->credentials();
}

void register_tls_types(type_registry& r) {
  // QSD 7.2 also lists a deprecated "loaded" on the credential types; 10.2 dropped it.
  r.add({.name = "tls-creds",
         .parent = "object",
         .abstract = true,
         .properties = {{.name = "endpoint", .type = "QCryptoTLSCredsEndpoint"},
                        {.name = "dir", .type = "string"},
                        {.name = "verify-peer", .type = "bool"},
                        {.name = "priority", .type = "string"}}});
  r.add({.name = "tls-creds-x509",
         .parent = "tls-creds",
         .interfaces = {"user-creatable"},
         .properties = {{.name = "sanity-check", .type = "bool"}, {.name = "passwordid", .type = "string"}},
         .make = tls_creds_object::make_for("tls-creds-x509")});
  r.add({.name = "tls-creds-psk",
         .parent = "tls-creds",
         .interfaces = {"user-creatable"},
         .properties = {{.name = "username", .type = "string"}},
         .make = tls_creds_object::make_for("tls-creds-psk")});
  r.add({.name = "tls-creds-anon",
         .parent = "tls-creds",
         .interfaces = {"user-creatable"},
         .make = tls_creds_object::make_for("tls-creds-anon")});
  r.add({.name = "tls-cipher-suites",
         .parent = "tls-creds",
         .interfaces = {"user-creatable", "fw_cfg-data-generator"},
         .make = tls_creds_object::make_for("tls-cipher-suites")});
}

}  // namespace blockd::qom

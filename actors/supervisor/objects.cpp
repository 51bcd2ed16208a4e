// Objects: object-add/-del for iothreads, main-loop, TLS credentials and authz; main iothread only.
#include <caf/all.hpp>

#include <algorithm>

#include "actors/supervisor/supervisor.h"

namespace blockd {
namespace {

// Object types QSD links in and blockd has not built yet: object-add names them as unavailable.
bool qsd_links_type(const std::string& t) {
  static const char* linked[] = {"authz-list",     "authz-listfile", "authz-pam",      "authz-simple",
                                 "pr-manager-helper", "secret",      "secret_keyring", "thread-context",
                                 "throttle-group", "tls-cipher-suites", "tls-creds-anon", "tls-creds-psk",
                                 "tls-creds-x509"};
  return std::any_of(std::begin(linked), std::end(linked), [&](const char* n) { return t == n; });
}

// Reads a non-negative int64 property the way QEMU's iothread setters check it.
result<void> read_param(const boost::json::object& args, const char* name, int64_t& out) {
  auto* v = args.if_contains(name);
  if (!v) return {};
  int64_t n = v->is_int64() ? v->as_int64() : static_cast<int64_t>(v->to_number<double>());
  if (n < 0) return fail(std::string(name) + " value must be in range [0, 9223372036854775807]");
  out = n;
  return {};
}

}  // namespace

void supervisor_actor::register_object_commands() {
  commands_.add_now("object-add", [this](boost::json::object& a) { return object_add(a); });
  commands_.add("object-del", [this](boost::json::object& a, reply_fn r) {
    object_del(std::string(a.at("id").as_string()), std::move(r));
  });
}

supervisor_actor::object_entry* supervisor_actor::find_object(const std::string& id) {
  for (auto& o : objects_)
    if (o.id == id) return &o;
  return nullptr;
}

command_outcome supervisor_actor::object_add(boost::json::object& args) {
  std::string type(args.at("qom-type").as_string());
  std::string id(args.at("id").as_string());
  // Checks run in QSD's order: identifier, type, property values, duplicate id, completion.
  if (!id_wellformed(id)) return command_outcome::failure(identifier_error());
  if (type.starts_with("tls-creds-") || type == "authz-simple" || type == "authz-list")
    return tls_object_add(type, id, args);
  if (type == "authz-listfile")
    // QSD's own enum/type-name mismatch makes this type impossible to create (inventory T92).
    return command_outcome::failure(error("invalid object type: " + type));
  if (type != "iothread" && type != "main-loop") {
    if (qsd_links_type(type))
      return command_outcome::failure(error("invalid object type: " + type + " (not available in blockd yet)"));
    return command_outcome::failure(error("invalid object type: " + type));
  }
  iothread_params p;
  const char* names[] = {"poll-max-ns", "poll-grow", "poll-shrink", "aio-max-batch", "thread-pool-min", "thread-pool-max"};
  int64_t* slots[] = {&p.poll_max_ns, &p.poll_grow, &p.poll_shrink, &p.aio_max_batch, &p.thread_pool_min, &p.thread_pool_max};
  for (size_t i = 0; i < std::size(names); ++i)
    if (auto r = read_param(args, names[i], *slots[i]); !r) return command_outcome::failure(r.error());
  if (find_object(id))
    return command_outcome::failure(
        error("attempt to add duplicate property '" + id + "' to object (type 'container')"));
  if (p.thread_pool_min > p.thread_pool_max || p.thread_pool_max == 0)
    return command_outcome::failure(error("bad thread-pool-min/thread-pool-max values"));
  object_entry e{id, type, p, nullptr, nullptr, nullptr};
  if (type == "main-loop") {
    bool exists = std::any_of(objects_.begin(), objects_.end(), [](auto& o) { return o.type == "main-loop"; });
    if (exists) return command_outcome::failure(error("only one main-loop instance allowed"));
  } else {
    try {
      e.thread = std::make_unique<iothread>(home_->system(), id, p);
    } catch (const std::exception& ex) {
      return command_outcome::failure(error("cannot start iothread '" + id + "': " + ex.what()));
    }
  }
  objects_.push_back(std::move(e));
  return command_outcome::success();
}

command_outcome supervisor_actor::tls_object_add(const std::string& type, const std::string& id,
                                                 const boost::json::object& args) {
  auto str = [&](const char* k) {
    auto* v = args.if_contains(k);
    return v && v->is_string() ? std::string(v->as_string()) : std::string();
  };
  auto flag = [&](const char* k, bool dflt) {
    auto* v = args.if_contains(k);
    return v && v->is_bool() ? v->as_bool() : dflt;
  };
  object_entry e{id, type, {}, nullptr, nullptr, nullptr};
  if (type.starts_with("tls-creds-")) {
    tls::creds_options o;
    o.type = type == "tls-creds-psk" ? tls::kind::psk : type == "tls-creds-anon" ? tls::kind::anon : tls::kind::x509;
    o.dir = str("dir");
    o.server = str("endpoint") == "server";
    o.verify_peer = flag("verify-peer", true);
    o.priority = str("priority");
    o.sanity_check = flag("sanity-check", true);
    o.username = str("username");
    if (find_object(id))
      return command_outcome::failure(
          error("attempt to add duplicate property '" + id + "' to object (type 'container')"));
    if (args.contains("passwordid"))
      return command_outcome::failure(error("tls-creds-x509 'passwordid' (an encrypted private key) is not "
                                            "supported by blockd; decrypt the key file instead"));
    auto c = tls::credentials::load(o);
    if (!c) return command_outcome::failure(c.error());
    e.creds = std::move(*c);
  } else {
    auto p = std::make_shared<tls::authz_policy>();
    if (type == "authz-simple") {
      p->rules.push_back({str("identity"), true, false});
    } else {
      p->default_allow = str("policy") == "allow";
      if (auto* rs = args.if_contains("rules"); rs && rs->is_array())
        for (auto& r : rs->as_array()) {
          const auto& ro = r.as_object();
          auto* f = ro.if_contains("format");
          p->rules.push_back({std::string(ro.at("match").as_string()), ro.at("policy").as_string() == "allow",
                              f && f->is_string() && f->as_string() == "glob"});
        }
    }
    if (find_object(id))
      return command_outcome::failure(
          error("attempt to add duplicate property '" + id + "' to object (type 'container')"));
    e.authz = std::move(p);
  }
  objects_.push_back(std::move(e));
  return command_outcome::success();
}

result<bool> supervisor_actor::authorize(const std::string& authz_id, const std::string& identity) {
  auto* o = find_object(authz_id);
  if (!o) return fail("Cannot find QAuthZ object ID " + authz_id);
  if (!o->authz) return fail("Object '" + authz_id + "' is not a QAuthZ subclass");
  return o->authz->allows(identity);
}

void supervisor_actor::object_del(const std::string& id, reply_fn reply) {
  auto* o = find_object(id);
  if (!o) return reply(command_outcome::failure(error("object '" + id + "' not found")));
  // The main loop cannot go away while the daemon runs, as in QSD.
  if (o->type == "main-loop") return reply(command_outcome::failure(error("object '" + id + "' is in use, can not be deleted")));
  if (!o->thread) {
    // TLS credentials and authz objects: an NBD server that uses credentials keeps its own
    // reference, so deleting them succeeds, as in QSD; authz is looked up again per client.
    objects_.erase(objects_.begin() + (o - objects_.data()));
    return reply(command_outcome::success());
  }
  iothread* t = o->thread.get();
  std::vector<block::node*> living;
  for (auto& [n, h] : homes_)
    if (h == t) living.push_back(const_cast<block::node*>(n));
  auto erase = [this, id] {
    // Stops and joins the thread; no node and no node actor is left on it.
    if (auto* o = find_object(id)) objects_.erase(objects_.begin() + (o - objects_.data()));
  };
  if (living.empty()) {
    erase();
    return reply(command_outcome::success());
  }
  // An export with fixed-iothread keeps its node on this iothread: the thread cannot go.
  if (const export_entry* e = pinning_export(components(living)))
    return reply(command_outcome::failure(
        error("iothread '" + id + "' runs node '" + e->node_name + "', which export '" + e->id +
              "' keeps there (fixed-iothread); delete the export first")));
  // QSD deletes the iothread under its nodes (and crashes on their next request); blockd first
  // moves them to the main loop, so the deletion succeeds as in QSD and the nodes keep working.
  move_components(living, home_, [] { return command_outcome::success(); },
                  [erase, reply = std::move(reply)](command_outcome out) {
                    if (out.ok) erase();  // nodes still live there when the move failed
                    reply(std::move(out));
                  });
}

}  // namespace blockd

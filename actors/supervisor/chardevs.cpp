// Chardevs and monitors: the chardev table, --chardev and the chardev-*/ringbuf-*/query-chardev* commands, monitors on chardevs; main iothread only.
#include <caf/all.hpp>

#include <algorithm>
#include <cstdio>

#include "actors/chardev/backends.h"
#include "actors/monitor/monitor.h"
#include "actors/runtime/pinned.h"
#include "actors/supervisor/supervisor.h"
#include "protocol/qmp/base64.h"
#include "config/inherited_fds.h"
#include "config/objects/tls_creds.h"
#include "protocol/chardev/ringbuf.h"
#include "protocol/chardev/websocket.h"

namespace blockd {

namespace json = boost::json;

std::shared_ptr<chr::chardev> supervisor_actor::find_chardev(const std::string& id) const {
  for (auto& c : chardevs_)
    if (c->id() == id) return c;
  return nullptr;
}

chr::env supervisor_actor::chardev_env(const std::string& note_prefix) {
  chr::env e;
  e.reactor = &home_->reactor();
  e.note_prefix = note_prefix;
  e.daemonized = hooks_.daemonized;
  e.take_fd = [this](const std::string& str) -> result<int> {
    // As QSD: a descriptor by number only from the command line (no monitor has passed any).
    if (!starting_) return fail("only QEMU supports file descriptor passing");
    bool digits = !str.empty() && std::all_of(str.begin(), str.end(), [](char c) { return c >= '0' && c <= '9'; });
    if (!digits) return fail("Unable to parse FD number " + str);
    return take_inherited_fd(str);
  };
  e.tls_creds = [this](const std::string& id, bool server) -> result<std::shared_ptr<const tls::credentials>> {
    // QEMU's char-socket lookup has the NBD server's texts.
    if (!qom_) return fail("blockd is shutting down");
    return qom::tls_credentials(*qom_, id, server);
  };
  e.authorize = [this](const std::string& id, const std::string& identity) { return authorize(id, identity); };
  e.find = [this](const std::string& id) { return find_chardev(id); };
  e.report = [](const std::string& line) { std::fprintf(stderr, "blockd: %s\n", line.c_str()); };
  return e;
}

// ---- creation ---------------------------------------------------------------------------------

void supervisor_actor::open_chardev(const chardev_spec& spec, const std::string& note_prefix, reply_fn reply) {
  auto dev = chr::chardev::open(spec, chardev_env(note_prefix));
  if (!dev) return reply(command_outcome::failure(dev.error()));
  auto d = *dev;
  // Some backends finish later (QSD blocks there; blockd's loop goes on, only this command waits).
  // The chardev reports from its loop, outside the supervisor's turn: the report comes back as a
  // message before anything here changes.
  uint64_t token = ++chardev_wait_counter_;
  chardev_waits_[token] = [this, d, reply](result<void> r) {
    if (!r) {
      d->close();
      return reply(command_outcome::failure(r.error()));
    }
    chardevs_.push_back(d);
    chardev_order_.insert(d->id());
    publish_chardev_qom(d);
    json::object ret;
    if (auto pty = d->pty_path(); !pty.empty()) ret["pty"] = pty;
    reply(command_outcome::success(std::move(ret)));
  };
  auto self = caf::actor_cast<caf::actor>(this);
  d->wait_ready([self, token](result<void> r) {
    caf::anon_send(self, chr_ready_atom::value, token, r.has_value(), r ? std::string() : r.error().desc);
  });
}

void supervisor_actor::add_chardev(const chardev_spec& spec, const std::string& note_prefix, reply_fn reply) {
  auto dup = [](const std::string& id) {
    return command_outcome::failure(error("attempt to add duplicate property '" + id + "' to object (type 'container')"));
  };
  if (!spec.mux) {
    if (find_chardev(spec.id)) return reply(dup(spec.id));
    return open_chardev(spec, note_prefix, std::move(reply));
  }
  // mux=on: the backend becomes "<id>-base" and a mux "<id>" stands over it, as in QEMU.
  chardev_spec base = spec;
  base.id = spec.id + "-base";
  base.mux = false;
  if (find_chardev(base.id)) return reply(dup(base.id));
  open_chardev(base, note_prefix, [this, spec, note_prefix, reply](command_outcome o) {
    if (!o.ok) return reply(o);
    chardev_spec mux;
    mux.id = spec.id;
    mux.backend = "mux";
    mux.chardev = spec.id + "-base";
    mux.from_cli = spec.from_cli;
    if (find_chardev(mux.id)) return reply(command_outcome::failure(
        error("attempt to add duplicate property '" + mux.id + "' to object (type 'container')")));
    open_chardev(mux, note_prefix, reply);
  });
}

void supervisor_actor::remove_chardev(const std::string& id) {
  auto it = std::find_if(chardevs_.begin(), chardevs_.end(), [&](auto& c) { return c->id() == id; });
  if (it == chardevs_.end()) return;
  (*it)->close();
  chardevs_.erase(it);
  chardev_order_.remove(id);
  unpublish_chardev_qom(id);
}

// The QOM side of a chardev: /chardevs/<id> of type chardev-<backend>, with the properties of its
// type (a socket's connected and addr, read live).
void supervisor_actor::publish_chardev_qom(const std::shared_ptr<chr::chardev>& dev) {
  // QSD 7.2's type list (which blockd reports) has no chardev-hub; a hub stays out of the tree.
  if (!qom_ || !qom_->types().find(dev->qom_type())) return;
  if (auto r = qom_->add_child("chardevs", dev->id(), dev->qom_type(), dev->qom_object()); !r)
    std::fprintf(stderr, "blockd: chardev '%s' has no QOM object: %s\n", dev->id().c_str(), r.error().desc.c_str());
}

void supervisor_actor::unpublish_chardev_qom(const std::string& id) {
  if (qom_) qom_->remove_child("chardevs", id);
}

command_outcome supervisor_actor::add_monitor(const std::string& chardev_id, bool pretty, const std::string& id) {
  auto dev = find_chardev(chardev_id);
  if (!dev) return command_outcome::failure(error("chardev \"" + chardev_id + "\" not found"));
  // The monitor is the chardev's frontend from now on, so a second user is refused at once.
  auto port = std::make_shared<monitor_port>();
  if (auto r = dev->attach(port.get()); !r) return command_outcome::failure(r.error());
  auto m = spawn_pinned<monitor_actor>(home_->system(), *home_, caf::actor_cast<caf::actor>(this), dev, port,
                                       monitor_options{id, pretty});
  monitors_.push_back(m);
  if (!starting_) send(m, start_atom::value);
  return command_outcome::success();
}

// ---- commands ---------------------------------------------------------------------------------

void supervisor_actor::register_chardev_commands() {
  using args_t = json::object;
  auto str = [](const args_t& a, const char* k) { return std::string(a.at(k).as_string()); };

  commands_.add("chardev-add", [this, str](args_t& a, reply_fn reply) {
    std::string id = str(a, "id");
    if (find_chardev(id)) return reply(command_outcome::failure(error("Chardev with id '" + id + "' already exists")));
    auto prefixed = [id, reply](command_outcome o) {
      if (!o.ok) o.err.desc = "Failed to add chardev '" + id + "': " + o.err.desc;
      reply(std::move(o));
    };
    auto spec = chardev_spec_from_qmp(id, a.at("backend").as_object());
    if (!spec) return prefixed(command_outcome::failure(spec.error()));
    open_chardev(*spec, "", prefixed);
  });

  commands_.add("chardev-change", [this, str](args_t& a, reply_fn reply) {
    std::string id = str(a, "id");
    auto dev = find_chardev(id);
    if (!dev) return reply(command_outcome::failure(error("Chardev '" + id + "' does not exist")));
    if (dev->spec().backend == "mux")
      return reply(command_outcome::failure(error("Mux device hotswap not supported yet")));
    if (dev->has_frontend()) {
      // QEMU swaps the backend under a frontend that can follow it; monitors, muxes and hubs
      // cannot, which makes this the answer for every frontend QSD has.
      if (!dev->frontends_can_change())
        return reply(command_outcome::failure(error("Chardev user does not support chardev hotswap")));
    }
    // Without a frontend QEMU removes the chardev and adds the new one under the same id; a
    // failing add leaves it removed, as there.
    remove_chardev(id);
    auto prefixed = [id, reply](command_outcome o) {
      if (!o.ok) o.err.desc = "Failed to add chardev '" + id + "': " + o.err.desc;
      reply(std::move(o));
    };
    auto spec = chardev_spec_from_qmp(id, a.at("backend").as_object());
    if (!spec) return prefixed(command_outcome::failure(spec.error()));
    open_chardev(*spec, "", prefixed);
  });

  commands_.add_now("chardev-remove", [this, str](args_t& a) {
    std::string id = str(a, "id");
    auto dev = find_chardev(id);
    if (!dev) return command_outcome::failure(error("Chardev '" + id + "' not found"));
    if (dev->busy()) return command_outcome::failure(error("Chardev '" + id + "' is busy"));
    remove_chardev(id);
    return command_outcome::success();
  });

  commands_.add_now("chardev-send-break", [this, str](args_t& a) {
    std::string id = str(a, "id");
    auto dev = find_chardev(id);
    if (!dev) return command_outcome::failure(error("Chardev '" + id + "' not found"));
    dev->send_break();
    return command_outcome::success();
  });

  commands_.add_now("query-chardev", [this](args_t&) {
    // QSD walks /chardevs in its table order; the slots come reversed, as qom-list shows them.
    json::array out;
    auto names = chardev_order_.slots();
    for (auto it = names.rbegin(); it != names.rend(); ++it) {
      auto dev = find_chardev(*it);
      if (!dev) continue;
      json::object e;
      e["label"] = dev->id();
      e["filename"] = dev->filename();
      e["frontend-open"] = dev->frontend_open();
      out.push_back(std::move(e));
    }
    return command_outcome::success(std::move(out));
  });

  commands_.add_now("query-chardev-backends", [](args_t&) {
    json::array out;
    for (auto& n : chardev_backends_query_order()) out.push_back(json::object{{"name", n}});
    return command_outcome::success(std::move(out));
  });

  // The two ringbuf commands, QEMU's checks in QEMU's order.
  auto ring = [this](const std::string& device) -> result<chr::ring_buffer*> {
    auto dev = find_chardev(device);
    if (!dev) return fail("Device '" + device + "' not found");
    auto* r = chr::ring_of(*dev);
    if (!r) return fail(device + " is not a ringbuf device");
    return r;
  };

  commands_.add_now("ringbuf-write", [ring, str](args_t& a) {
    auto r = ring(str(a, "device"));
    if (!r) return command_outcome::failure(r.error());
    std::string data = str(a, "data");
    auto* f = a.if_contains("format");
    std::string bytes;
    if (f && f->as_string() == "base64") {
      auto d = qmp::glib_base64_decode(data);
      if (!d) return command_outcome::failure(d.error());
      bytes = std::move(*d);
    } else {
      bytes = chr::qemu_utf8_bytes(data);
    }
    // Straight into the ring, as QEMU's ringbuf-write does (no logfile on this path).
    (*r)->write(bytes);
    return command_outcome::success();
  });

  commands_.add_now("ringbuf-read", [ring, str](args_t& a) {
    auto r = ring(str(a, "device"));
    if (!r) return command_outcome::failure(r.error());
    int64_t size = a.at("size").as_int64();
    if (size <= 0) return command_outcome::failure(error("size must be greater than zero"));
    std::string bytes = (*r)->read(static_cast<uint64_t>(size));
    auto* f = a.if_contains("format");
    if (f && f->as_string() == "base64") return command_outcome::success(json::value(chr::base64_encode(bytes)));
    return command_outcome::success(json::value(chr::qemu_utf8_text(bytes)));
  });
}

}  // namespace blockd

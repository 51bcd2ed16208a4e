// The QOM types blockd reports but does not create (QSD's internal classes) and the list of built-in registrations; plain C++, start-up.
#include "config/qom/type_registry.h"

namespace blockd::qom {

// Each object family registers its own types beside its implementation (config/objects/).
void register_event_loop_types(type_registry& r);
void register_secret_types(type_registry& r);
void register_throttle_group_types(type_registry& r);
void register_tls_types(type_registry& r);
void register_authz_types(type_registry& r);
void register_thread_context_types(type_registry& r);
void register_pr_manager_types(type_registry& r);

namespace {

// QSD's classes that are not user-creatable: the roots, containers, I/O channels and chardev
// backends. They appear in qom-list-types and qom-list-properties only; chardevs are made by
// chardev-add, which places its own objects under /chardevs.
void register_base_types(type_registry& r) {
  r.add({.name = "object", .abstract = true, .properties = {{.name = "type", .type = "string", .writable = false}}});
  r.add({.name = "interface", .abstract = true});
  r.add({.name = "user-creatable", .parent = "interface", .abstract = true});
  r.add({.name = "fw_cfg-data-generator", .parent = "interface", .abstract = true});
  r.add({.name = "container", .parent = "object"});
  r.add({.name = "qio-channel", .parent = "object", .abstract = true});
  for (const char* n : {"qio-channel-null", "qio-channel-socket", "qio-channel-file", "qio-channel-command",
                        "qio-channel-websock", "qio-channel-tls", "qio-channel-buffer"})
    r.add({.name = n, .parent = "qio-channel"});
  // qom-list-properties of qio-net-listener crashes QSD 7.2; blockd lists its "type".
  r.add({.name = "qio-net-listener", .parent = "object"});
  r.add({.name = "qio-dns-resolver", .parent = "object"});
  r.add({.name = "chardev", .parent = "object", .abstract = true});
  r.add({.name = "chardev-fd", .parent = "chardev", .abstract = true});
  for (const char* n : {"chardev-serial", "chardev-pipe", "chardev-stdio", "chardev-file"})
    r.add({.name = n, .parent = "chardev-fd"});
  for (const char* n : {"chardev-mux", "chardev-parallel", "chardev-null", "chardev-ringbuf", "chardev-udp", "chardev-pty"})
    r.add({.name = n, .parent = "chardev"});
  r.add({.name = "chardev-memory", .parent = "chardev-ringbuf"});
  r.add({.name = "chardev-socket",
         .parent = "chardev",
         .properties = {{.name = "connected", .type = "bool", .writable = false},
                        {.name = "addr", .type = "SocketAddress", .writable = false}}});
}

}  // namespace

void register_builtin_types(type_registry& r) {
  register_base_types(r);
  register_event_loop_types(r);
  register_secret_types(r);
  register_throttle_group_types(r);
  register_tls_types(r);
  register_authz_types(r);
  register_thread_context_types(r);
  register_pr_manager_types(r);
}

}  // namespace blockd::qom

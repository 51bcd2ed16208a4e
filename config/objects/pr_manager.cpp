// pr-manager types: listed as QSD lists them, refused by object-add (blockd has no persistent-reservation path); plain C++, start-up.
#include "config/qom/type_registry.h"

namespace blockd::qom {

void register_pr_manager_types(type_registry& r) {
  r.add({.name = "pr-manager", .parent = "object", .abstract = true, .interfaces = {"user-creatable"}});
  // QSD 7.2 creates it and connects to qemu-pr-helper's socket at once. blockd's file and
  // host_device drivers do not issue SCSI persistent reservations, so there is nothing to use it.
  // authz-pam is absent from QSD 7.2 too (built without PAM): object-add says "invalid object
  // type: authz-pam" in both, and it is not registered here.
  r.add({.name = "pr-manager-helper",
         .parent = "pr-manager",
         .properties = {{.name = "path", .type = "string"}},
         .refusal = "blockd does not support SCSI persistent reservations (qemu-pr-helper)"});
}

}  // namespace blockd::qom

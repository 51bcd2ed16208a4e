// The QOM objects drivers may name in their options (secrets, throttle groups), as the supervisor saw them when an open began; immutable once made, so the opening iothread reads it without locks.
#pragma once
#include <memory>
#include <string>
#include <unordered_map>

#include "protocol/error.h"

namespace blockd::qom {
class throttle_state;
}

namespace blockd::block {

// The supervisor fills one of these on its own thread before drivers open (blockdev-add, a
// snapshot's overlay); the drivers take what their options name. A copy of the model rather
// than a reference to it: the open may run on another iothread, where the model must not be read.
struct object_refs {
  struct entry {
    bool is_secret = false;
    std::string secret;  // the decoded payload (secrets only)
    std::shared_ptr<qom::throttle_state> throttle;  // throttle-group objects only
  };
  std::unordered_map<std::string, entry> by_id;  // every object, by id

  // The payload of secret `id`, with QSD's texts.
  result<std::string> secret_bytes(const std::string& id) const {
    auto it = by_id.find(id);
    if (it == by_id.end()) return fail("No secret with id '" + id + "'");
    if (!it->second.is_secret) return fail("Object with id '" + id + "' is not a secret");
    return it->second.secret;
  }
  // The shared state of throttle group `id`, or null when there is no such group.
  std::shared_ptr<qom::throttle_state> throttle_group(const std::string& id) const {
    auto it = by_id.find(id);
    return it == by_id.end() ? nullptr : it->second.throttle;
  }
};

}  // namespace blockd::block

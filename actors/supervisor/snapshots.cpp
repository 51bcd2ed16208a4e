// QMP internal snapshot commands (blockdev-snapshot-internal-sync, blockdev-snapshot-delete-internal-sync): checks here, the driver's work as a node task at home; the supervisor's thread.
#include <sys/time.h>

#include "actors/supervisor/supervisor.h"
#include "protocol/error.h"

namespace blockd {
namespace {

// The node a snapshot command names: a root node (no parent), as QEMU's qmp_get_root_bs demands.
result<block::node*> root_node(block::graph& g, const std::string& device) {
  auto found = g.lookup(&device, &device);
  if (!found) return found;
  if (!(*found)->parents.empty()) return fail("Need a root block node");
  return found;
}

}  // namespace

void supervisor_actor::snapshot_internal(const boost::json::object& args, reply_fn reply) {
  std::string device(args.at("device").as_string());
  std::string name(args.at("name").as_string());
  auto found = root_node(*graph_, device);
  if (!found) return reply(command_outcome::failure(found.error()));
  block::node* n = *found;
  if (n->settings().read_only) return reply(command_outcome::failure(error("Device '" + device + "' is read only")));
  if (!n->driver().supports_snapshots())
    return reply(command_outcome::failure(error("Block format '" + n->settings().driver + "' used by device '" + device +
                                                "' does not support internal snapshots")));
  if (name.empty()) return reply(command_outcome::failure(error("Name is empty")));
  // The snapshot list the node's home published (after open and after every snapshot task).
  auto facts = n->facts();
  for (auto& s : facts->snapshots)
    if (s.as_object().at("name").as_string() == name)
      return reply(command_outcome::failure(
          error("Snapshot with name '" + name + "' already exists on device '" + device + "'")));
  timeval tv{};
  ::gettimeofday(&tv, nullptr);
  // A snapshot updates the refcount of every allocated cluster: on a large image that takes long,
  // so it runs at the node's home and this loop keeps serving meanwhile; the command still holds
  // the queue, so no other change sees the node halfway.
  with_quiesced_steps(
      {n},
      [this, n, name, device, tv](reply_fn done) {
        run_on_node(
            n,
            [name, device, tv](block::node& x) {
              auto r = x.driver().snapshot_create(name, tv.tv_sec, int64_t(tv.tv_usec) * 1000);
              if (!r)
                return command_outcome::failure(
                    error("Failed to create snapshot '" + name + "' on device '" + device + "': " + r.error().desc));
              return command_outcome::success();
            },
            std::move(done));
      },
      std::move(reply));
}

void supervisor_actor::snapshot_delete_internal(const boost::json::object& args, reply_fn reply) {
  std::string device(args.at("device").as_string());
  std::string id, name;
  const std::string* idp = nullptr;
  const std::string* namep = nullptr;
  if (auto* v = args.if_contains("id")) idp = &(id = std::string(v->as_string()));
  if (auto* v = args.if_contains("name")) namep = &(name = std::string(v->as_string()));
  auto found = root_node(*graph_, device);
  if (!found) return reply(command_outcome::failure(found.error()));
  block::node* n = *found;
  if (!idp && !namep) return reply(command_outcome::failure(error("Name or id must be provided")));
  if (!n->driver().supports_snapshots())
    return reply(command_outcome::failure(error("Failed to get a snapshot list: Operation not supported")));
  bool exists = false;
  auto facts = n->facts();
  for (auto& v : facts->snapshots) {
    auto& s = v.as_object();
    if ((!idp || s.at("id").as_string() == id) && (!namep || s.at("name").as_string() == name)) exists = true;
  }
  if (!exists)
    return reply(command_outcome::failure(error("Snapshot with id '" + (idp ? id : std::string("null")) +
                                                "' and name '" + (namep ? name : std::string("null")) +
                                                "' does not exist on device '" + device + "'")));
  if (n->settings().read_only) return reply(command_outcome::failure(error("Device '" + device + "' is read only")));
  with_quiesced_steps(
      {n},
      [this, n, idp = idp ? std::optional<std::string>(id) : std::nullopt,
       namep = namep ? std::optional<std::string>(name) : std::nullopt](reply_fn done) {
        run_on_node(
            n,
            [idp, namep](block::node& x) {
              auto r = x.driver().snapshot_delete(idp ? &*idp : nullptr, namep ? &*namep : nullptr);
              if (!r) return command_outcome::failure(error(r.error().desc));
              return command_outcome::success(boost::json::value(std::move(*r)));
            },
            std::move(done));
      },
      std::move(reply));
}

}  // namespace blockd

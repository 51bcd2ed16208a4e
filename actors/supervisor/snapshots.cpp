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

// blockdev-snapshot-internal-sync as a transaction action: prepare takes the snapshot with the
// node drained (it stays drained until the transaction ends, as QEMU's), abort deletes it again.
std::unique_ptr<block::action> supervisor_actor::internal_snapshot_action(const boost::json::object& args) {
  struct state {
    std::string device, name, node;
    bool created = false, quiesced = false;
  };
  auto st = std::make_shared<state>();
  if (auto* v = args.if_contains("device")) st->device = std::string(v->as_string());
  if (auto* v = args.if_contains("name")) st->name = std::string(v->as_string());
  auto a = std::make_unique<block::step_lambda_action>();
  a->on_prepare = [this, st](block::action::prepared_fn done) {
    auto found = root_node(*graph_, st->device);
    if (!found) return done(std::unexpected(found.error()));
    block::node* n = *found;
    const std::string& device = st->device;
    if (n->settings().read_only) return done(fail("Device '" + device + "' is read only"));
    if (!n->driver().supports_snapshots())
      return done(fail("Block format '" + n->settings().driver + "' used by device '" + device +
                       "' does not support internal snapshots"));
    if (st->name.empty()) return done(fail("Name is empty"));
    // The snapshot list the node's home published (after open and after every snapshot task).
    auto facts = n->facts();
    for (auto& s : facts->snapshots)
      if (s.as_object().at("name").as_string() == st->name)
        return done(fail("Snapshot with name '" + st->name + "' already exists on device '" + device + "'"));
    timeval tv{};
    ::gettimeofday(&tv, nullptr);
    st->node = n->name();
    // A snapshot updates the refcount of every allocated cluster: on a large image that takes
    // long, so it runs at the node's home and this loop keeps serving meanwhile; the command
    // holds the queue, so no other change sees the node halfway.
    quiesce_nodes({n}, [this, st, tv, done]() mutable {
      st->quiesced = true;
      node_step(st->node, [st, tv](block::node& x) {
        auto r = x.driver().snapshot_create(st->name, tv.tv_sec, int64_t(tv.tv_usec) * 1000);
        if (!r)
          return command_outcome::failure(error("Failed to create snapshot '" + st->name + "' on device '" +
                                                st->device + "': " + r.error().desc));
        st->created = true;
        x.publish_facts();
        return command_outcome::success();
      }, [done](command_outcome o) { done(o.as_result()); });
    });
  };
  auto release = [this, st] {
    if (st->quiesced) resume_nodes({st->node});
    st->quiesced = false;
  };
  a->on_commit = [release](std::function<void()> done) {
    release();
    done();
  };
  a->on_abort = [this, st, release](std::function<void()> done) {
    if (!st->created) {
      release();
      return done();
    }
    node_step(st->node, [st](block::node& x) {
      (void)x.driver().snapshot_delete(nullptr, &st->name);
      x.publish_facts();
      return command_outcome::success();
    }, [release, done](command_outcome) {
      release();
      done();
    });
  };
  // A prepare that failed after draining lets the node go too.
  a->on_clean = [release] { release(); };
  return a;
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

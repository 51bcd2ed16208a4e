// Chardevs and monitors: the chardev table, --chardev/chardev-add, monitors on chardevs; main iothread only.
#include <caf/all.hpp>

#include "actors/monitor/monitor.h"
#include "actors/runtime/pinned.h"
#include "actors/supervisor/supervisor.h"

namespace blockd {

command_outcome supervisor_actor::add_chardev(const chardev_spec& spec, const std::string& note_prefix) {
  for (auto& c : chardevs_)
    if (c->id() == spec.id)
      return command_outcome::failure(
          error("attempt to add duplicate property '" + spec.id + "' to object (type 'container')"));
  auto dev = chardev::open(spec, note_prefix);
  if (!dev) return command_outcome::failure(dev.error());
  // QSD shows every chardev as /chardevs/<id>; its properties come with the chardev backends.
  if (auto q = qom_->add_child("chardevs", spec.id, "chardev-" + spec.backend, std::make_unique<qom::object>()); !q)
    return command_outcome::failure(q.error());
  chardevs_.push_back(std::move(*dev));
  return command_outcome::success();
}

command_outcome supervisor_actor::add_monitor(const std::string& chardev_id, bool pretty, const std::string& id) {
  chardev* dev = nullptr;
  for (auto& c : chardevs_)
    if (c->id() == chardev_id) dev = c.get();
  if (!dev) return command_outcome::failure(error("chardev \"" + chardev_id + "\" not found"));
  if (dev->has_frontend()) return command_outcome::failure(error("Device '" + chardev_id + "' is in use"));
  dev->set_frontend(true);
  auto m = spawn_pinned<monitor_actor>(home_->system(), *home_, caf::actor_cast<caf::actor>(this), dev,
                                       monitor_options{id, pretty});
  monitors_.push_back(m);
  if (!starting_) send(m, start_atom::value);
  return command_outcome::success();
}

}  // namespace blockd

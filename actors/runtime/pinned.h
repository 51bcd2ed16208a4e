// pinned<Base>: a CAF actor that only ever runs on its home iothread; spawn helpers. Any thread may spawn.
#pragma once
#include <caf/actor_config.hpp>
#include <caf/actor_system.hpp>
#include <caf/mailbox_element.hpp>

#include <utility>

#include "actors/runtime/iothread.h"

namespace blockd {

// Every wake-up of the actor (a message arriving while it waits, its first launch) is routed to the
// home iothread's exec_later(), the way CAF's own brokers stick to their multiplexer. The default
// scheduler is never involved, so messages between actors on the same iothread never cross threads.
template <class Base>
class pinned : public Base {
 public:
  template <class... Ts>
  pinned(caf::actor_config& cfg, iothread* home, Ts&&... xs) : Base(cfg, home, std::forward<Ts>(xs)...), home_(home) {}

  void enqueue(caf::mailbox_element_ptr ptr, caf::execution_unit*) override { Base::enqueue(std::move(ptr), home_); }
  void launch(caf::execution_unit*, bool lazy, bool hide) override { Base::launch(home_, lazy, hide); }

  iothread& home() const { return *home_; }

 private:
  iothread* home_;
};

// Spawns actor type T (an event_based_actor subclass whose constructor takes (actor_config&, iothread*, args...))
// pinned to `home`.
template <class T, class... Ts>
auto spawn_pinned(caf::actor_system& sys, iothread& home, Ts&&... xs) {
  return sys.spawn<pinned<T>>(&home, std::forward<Ts>(xs)...);
}

}  // namespace blockd

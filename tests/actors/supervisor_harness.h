// Actor-test helpers that drive a supervisor actor as main() and the monitors do; test thread.
#pragma once
#include <caf/all.hpp>
#include <gtest/gtest.h>

#include <chrono>
#include <string>

#include "actors/supervisor/supervisor.h"

namespace blockd::test {

// Sends one QMP command to the supervisor and waits for its outcome (a CAF error fails the test).
inline command_outcome sup_command(caf::actor_system& sys, const caf::actor& sup, const std::string& name,
                                   boost::json::object args) {
  caf::scoped_actor self{sys};
  command_outcome out = command_outcome::failure(error("no reply"));
  self->request(sup, std::chrono::seconds(10), command_atom::value, name, json_args{std::move(args)})
      .receive([&](const command_outcome& o) { out = o; }, [](caf::error& e) { ADD_FAILURE() << caf::to_string(e); });
  return out;
}

// Shuts the supervisor down as main() does at exit, then waits until every actor is done.
inline void stop_supervisor(caf::actor_system& sys, const caf::actor& sup) {
  {
    caf::scoped_actor self{sys};
    self->request(sup, std::chrono::seconds(5), shutdown_atom::value).receive([](bool) {}, [](caf::error&) {});
    self->send_exit(sup, caf::exit_reason::user_shutdown);
  }
  sys.await_all_actors_done();
}

}  // namespace blockd::test

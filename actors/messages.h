// Message vocabulary between blockd's actors (atoms and payload types); included by actor code on any iothread.
#pragma once
#include <caf/allowed_unsafe_message_type.hpp>
#include <caf/atom.hpp>

#include <boost/json.hpp>
#include <cstdint>
#include <string>

#include "protocol/error.h"

namespace blockd {

// The outcome of one control command, as the monitor turns it into a QMP reply.
struct command_outcome {
  bool ok = true;
  boost::json::value ret = boost::json::object();
  error err;

  static command_outcome success(boost::json::value v = boost::json::object()) { return {true, std::move(v), {}}; }
  static command_outcome failure(error e) { return {false, nullptr, std::move(e)}; }
  // As a step result for actions (block::action's prepared_fn).
  result<void> as_result() const {
    if (ok) return {};
    return std::unexpected<error>(err);
  }
};

// One QMP event, already stamped with wall-clock time when it was raised.
struct qmp_event {
  std::string name;
  boost::json::object data;
  int64_t seconds = 0;
  int64_t microseconds = 0;
};

// A JSON object carried in a message (a wrapper, so CAF does not try to print it as a map).
struct json_args {
  boost::json::object v;
};

// Atoms (CAF 0.17 atoms are at most 10 characters).
using command_atom = caf::atom_constant<caf::atom("command")>;    // supervisor: run a QMP command
using event_atom = caf::atom_constant<caf::atom("event")>;        // bus -> monitor
using subscribe_atom = caf::atom_constant<caf::atom("subscribe")>;
using unsubscribe_atom = caf::atom_constant<caf::atom("unsubscr")>;
using chardev_atom = caf::atom_constant<caf::atom("chardev")>;    // supervisor: --chardev
using monitor_atom = caf::atom_constant<caf::atom("monitor")>;    // supervisor: --monitor
using shutdown_atom = caf::atom_constant<caf::atom("shutdown")>;  // supervisor: close everything
using ready_atom = caf::atom_constant<caf::atom("ready")>;        // supervisor: the command line is applied
using close_atom = caf::atom_constant<caf::atom("close")>;        // monitor: flush and close
using io_atom = caf::atom_constant<caf::atom("io")>;              // completion of an I/O operation
using start_atom = caf::atom_constant<caf::atom("start")>;
using next_atom = caf::atom_constant<caf::atom("next")>;
using retry_atom = caf::atom_constant<caf::atom("retry")>;
using chr_event_atom = caf::atom_constant<caf::atom("chrevent")>;  // chardev -> its monitor: open/close/break
using chr_input_atom = caf::atom_constant<caf::atom("chrinput")>;  // chardev -> its monitor: bytes read
using chr_ready_atom = caf::atom_constant<caf::atom("chrready")>;  // chardev -> supervisor: open finished
using flushed_atom = caf::atom_constant<caf::atom("flushed")>;     // chardev -> monitor: output went out

}  // namespace blockd

CAF_ALLOW_UNSAFE_MESSAGE_TYPE(blockd::command_outcome)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(blockd::qmp_event)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(blockd::json_args)

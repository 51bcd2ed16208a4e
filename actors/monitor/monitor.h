// The QMP monitor actor: one per --monitor, a frontend of its chardev (any backend); pinned to the main iothread.
#pragma once
#include <caf/event_based_actor.hpp>

#include <array>
#include <deque>
#include <memory>
#include <optional>
#include <string>

#include "actors/messages.h"
#include "actors/chardev/chardev.h"
#include "actors/runtime/iothread.h"
#include "protocol/qmp/json_stream.h"
#include "protocol/qmp/request.h"

namespace blockd {

struct monitor_options {
  std::string id;
  bool pretty = false;
};

// A monitor's place as its chardev's frontend. The supervisor attaches it when --monitor is
// given (so a second user of the chardev is refused at once, as in QSD) and hands it to the
// monitor actor. The chardev calls it from its loop, outside the actor's own turn, so every call
// becomes a message to the actor; only `room` (the flow control the actor keeps up to date) is
// read directly, on the same thread. Until the monitor starts (the command line applied) it takes
// no input and ignores events: the monitor looks at the backend's state when it starts.
struct monitor_port final : chr::frontend {
  caf::weak_actor_ptr self;
  bool started = false;
  bool room = false;
  void chr_event(chr::event e) override;
  void chr_read(std::string_view bytes) override;
  size_t chr_can_read() override { return started && room ? 65536 : 0; }
};

class monitor_actor : public caf::event_based_actor {
 public:
  monitor_actor(caf::actor_config& cfg, iothread* home, caf::actor supervisor, std::shared_ptr<chr::chardev> dev,
                std::shared_ptr<monitor_port> port, monitor_options opts);
  ~monitor_actor() override;
  caf::behavior make_behavior() override;

 private:
  // One queued in-band item: a request or an error to report in order.
  struct pending_item {
    std::optional<qmp::request> req;
    boost::json::object error_reply;
  };

  void on_event(chr::event e);
  void open_connection();
  void close_connection();
  void on_bytes(const char* data, size_t n);
  void on_value(qmp::json_result&& r);
  void pump();
  void parse_pending();
  void update_room();
  bool queue_full() const;
  void dispatch(qmp::request req, bool oob);
  void finish_command(const std::optional<boost::json::value>& id, const command_outcome& out, uint64_t gen);
  void write_message(const boost::json::object& msg);
  caf::actor self_handle();

  iothread* home_;
  caf::actor supervisor_;
  std::shared_ptr<chr::chardev> dev_;
  monitor_options opts_;
  std::shared_ptr<monitor_port> port_;
  bool attached_ = true;

  // connection state (QEMU's: reset by every OPENED)
  uint64_t gen_ = 0;
  bool open_ = false;
  bool shutting_down_ = false;
  bool negotiated_ = false;
  bool oob_enabled_ = false;
  bool executing_ = false;
  std::deque<pending_item> queue_;
  qmp::json_stream parser_;
  std::string unparsed_;  // received bytes held back while the request queue is full
  std::optional<caf::response_promise> close_promise_;
};

}  // namespace blockd

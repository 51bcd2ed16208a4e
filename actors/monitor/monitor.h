// The QMP monitor actor: one per --monitor, serving its chardev's connection; pinned to the main iothread.
#pragma once
#include <caf/event_based_actor.hpp>

#include <array>
#include <deque>
#include <memory>
#include <optional>
#include <string>

#include "actors/messages.h"
#include "actors/monitor/chardev.h"
#include "actors/runtime/iothread.h"
#include "protocol/qmp/json_stream.h"
#include "protocol/qmp/request.h"
#include "storage/io/reactor.h"

namespace blockd {

struct monitor_options {
  std::string id;
  bool pretty = false;
};

class monitor_actor : public caf::event_based_actor {
 public:
  monitor_actor(caf::actor_config& cfg, iothread* home, caf::actor supervisor, chardev* dev, monitor_options opts);
  caf::behavior make_behavior() override;

 private:
  enum tag : int { tag_recv = 1, tag_send = 2, tag_accept = 3, tag_timer = 4 };

  // A reactor completion that turns into an io_atom message to the monitor; it holds a strong
  // reference so the actor (and the buffers it owns) outlive every operation in flight.
  struct io_op final : io::completion {
    caf::actor owner;
    int which = 0;
    uint64_t gen = 0;
    void complete(int res) override;
  };

  // One queued in-band item: a request or an error to report in order.
  struct pending_item {
    std::optional<qmp::request> req;
    boost::json::object error_reply;
  };

  void on_io(int which, uint64_t gen, int res);
  void open_connection();
  void wait_for_client();
  void post_recv();
  void start_send();
  void begin_close();
  void maybe_finish_close();
  void on_bytes(const char* data, size_t n);
  void on_value(qmp::json_result&& r);
  void pump();
  void parse_pending();
  bool queue_full() const;
  void dispatch(qmp::request req, bool oob);
  void finish_command(const std::optional<boost::json::value>& id, const command_outcome& out);
  void write_message(const boost::json::object& msg);
  caf::actor self_handle();

  iothread* home_;
  caf::actor supervisor_;
  chardev* dev_;
  monitor_options opts_;

  // connection state
  uint64_t gen_ = 0;
  bool open_ = false;
  bool closing_ = false;    // connection going down (EOF, error or shutdown)
  bool shutting_down_ = false;
  bool negotiated_ = false;
  bool oob_enabled_ = false;
  bool executing_ = false;
  std::deque<pending_item> queue_;
  qmp::json_stream parser_;
  std::string unparsed_;  // received bytes held back while the request queue is full

  io_op recv_op_, send_op_, accept_op_, timer_op_;
  bool recv_busy_ = false, send_busy_ = false, accept_busy_ = false, timer_busy_ = false;
  std::array<char, 16384> in_buf_{};
  std::string out_;      // replies and events not yet handed to the kernel
  std::string sending_;  // the bytes of the send in flight (stable until it completes)
  std::optional<caf::response_promise> close_promise_;
};

}  // namespace blockd

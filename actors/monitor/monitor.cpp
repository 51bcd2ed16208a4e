// QMP monitor: framing, negotiation, in-band queue, OOB, replies and events for one chardev; main iothread only.
#include "actors/monitor/monitor.h"

#include <caf/all.hpp>

#include "protocol/qmp/identity.h"
#include "protocol/qmp/introspect.h"
#include "protocol/qmp/json_writer.h"
#include "protocol/qmp/schema.h"
#include "protocol/qmp/visitor.h"
#include "protocol/trace/trace.h"

namespace blockd {
namespace {

// A client that never reads its replies must not make the daemon buffer without limit.
constexpr size_t max_output_bytes = 64u << 20;

boost::json::object version_info() {
  // Members go in in schema order: the writer reproduces QEMU's dictionary order from that.
  boost::json::object triple;
  triple["major"] = qmp::compat_major;
  triple["minor"] = qmp::compat_minor;
  triple["micro"] = qmp::compat_micro;
  boost::json::object v;
  v["qemu"] = std::move(triple);
  v["package"] = qmp::package_string;
  return v;
}

}  // namespace

void monitor_actor::io_op::complete(int res) {
  caf::actor o = std::move(owner);
  owner = nullptr;
  caf::anon_send(o, io_atom::value, which, gen, res);
}

monitor_actor::monitor_actor(caf::actor_config& cfg, iothread* home, caf::actor supervisor, chardev* dev,
                             monitor_options opts)
    : caf::event_based_actor(cfg),
      home_(home),
      supervisor_(std::move(supervisor)),
      dev_(dev),
      opts_(std::move(opts)),
      parser_([this](qmp::json_result&& r) { on_value(std::move(r)); }) {
  recv_op_.which = tag_recv;
  send_op_.which = tag_send;
  accept_op_.which = tag_accept;
  timer_op_.which = tag_timer;
}

caf::actor monitor_actor::self_handle() { return caf::actor_cast<caf::actor>(this); }

caf::behavior monitor_actor::make_behavior() {
  send(supervisor_, subscribe_atom::value, self_handle());
  // start_atom comes from the supervisor once the command line is applied.
  return {
      [this](start_atom) {
        if (dev_->connected())
          open_connection();
        else
          wait_for_client();
      },
      [this](io_atom, int which, uint64_t gen, int res) { on_io(which, gen, res); },
      [this](next_atom) { pump(); },
      [this](event_atom, const qmp_event& ev) {
        // Events reach only connections that finished negotiation; nothing is kept for later.
        if (!open_ || closing_ || !negotiated_) return;
        write_message(qmp::make_event(ev.name, ev.data, ev.seconds, ev.microseconds));
      },
      [this](close_atom) -> caf::result<bool> {
        shutting_down_ = true;
        close_promise_ = make_response_promise();
        auto rp = *close_promise_;
        if (timer_busy_) home_->reactor().cancel(&timer_op_);
        if (accept_busy_) home_->reactor().cancel(&accept_op_);
        if (open_)
          begin_close();
        else
          maybe_finish_close();
        return rp;
      },
  };
}

void monitor_actor::wait_for_client() {
  if (shutting_down_) return;
  switch (dev_->type()) {
    case chardev::kind::socket_server:
      if (!accept_busy_) {
        accept_busy_ = true;
        accept_op_.owner = self_handle();
        accept_op_.gen = gen_;
        home_->reactor().accept(dev_->listen_fd(), &accept_op_);
      }
      break;
    case chardev::kind::socket_client:
      if (dev_->spec().reconnect_ms > 0 && !timer_busy_) {
        timer_busy_ = true;
        timer_op_.owner = self_handle();
        timer_op_.gen = gen_;
        home_->reactor().timeout(static_cast<uint64_t>(dev_->spec().reconnect_ms) * 1000000u, &timer_op_);
      }
      break;
    case chardev::kind::stdio:
    case chardev::kind::null: break;  // stdio never comes back after EOF; null never opens
  }
}

void monitor_actor::open_connection() {
  trace::emit(trace::point::monitor_connect, "mon=" + dev_->id() + " connected");
  ++gen_;
  open_ = true;
  closing_ = false;
  negotiated_ = false;
  oob_enabled_ = false;
  executing_ = false;
  queue_.clear();
  parser_.reset();
  unparsed_.clear();
  out_.clear();
  sending_.clear();
  boost::json::object greeting;
  boost::json::object qmp;
  qmp["version"] = version_info();
  qmp["capabilities"] = boost::json::array{"oob"};
  greeting["QMP"] = std::move(qmp);
  write_message(greeting);
  post_recv();
}

void monitor_actor::post_recv() {
  if (!open_ || closing_ || recv_busy_) return;
  if (queue_full() || !unparsed_.empty()) return;
  recv_busy_ = true;
  recv_op_.owner = self_handle();
  recv_op_.gen = gen_;
  if (dev_->type() == chardev::kind::stdio)
    home_->reactor().read(dev_->in_fd(), in_buf_.data(), in_buf_.size(), -1, &recv_op_);
  else
    home_->reactor().recv(dev_->in_fd(), in_buf_.data(), in_buf_.size(), &recv_op_);
}

void monitor_actor::on_io(int which, uint64_t gen, int res) {
  switch (which) {
    case tag_recv:
      recv_busy_ = false;
      if (closing_ || gen != gen_) {
        maybe_finish_close();
        return;
      }
      if (res <= 0) {
        if (res == -EINTR || res == -EAGAIN) {
          post_recv();
          return;
        }
        begin_close();
        return;
      }
      on_bytes(in_buf_.data(), static_cast<size_t>(res));
      post_recv();
      return;
    case tag_send:
      send_busy_ = false;
      if (res < 0) {
        if (res == -EINTR || res == -EAGAIN) {
          start_send();
          return;
        }
        out_.clear();
        sending_.clear();
        begin_close();
        return;
      }
      sending_.erase(0, static_cast<size_t>(res));
      if (closing_ && ((sending_.empty() && out_.empty()) || !shutting_down_)) {
        maybe_finish_close();
        return;
      }
      start_send();
      return;
    case tag_accept:
      accept_busy_ = false;
      if (shutting_down_) {
        if (res >= 0) ::close(res);
        maybe_finish_close();
        return;
      }
      if (res < 0) {
        if (res != -ECANCELED) wait_for_client();
        return;
      }
      dev_->adopt_connection(res);
      open_connection();
      return;
    case tag_timer:
      timer_busy_ = false;
      if (shutting_down_) {
        maybe_finish_close();
        return;
      }
      if (dev_->reconnect_now())
        open_connection();
      else
        wait_for_client();
      return;
  }
}

void monitor_actor::on_bytes(const char* data, size_t n) {
  unparsed_.append(data, n);
  parse_pending();
}

bool monitor_actor::queue_full() const {
  // Flow control as QSD: without OOB one in-band request at a time, with OOB a queue of eight.
  size_t limit = oob_enabled_ ? 8 : 1;
  return queue_.size() + (executing_ ? 1 : 0) >= limit;
}

void monitor_actor::parse_pending() {
  // Input is parsed only while the request queue has room, so a request is judged (OOB allowed or
  // not, negotiated or not) in the state left by the requests before it, however the bytes arrived.
  size_t done = 0;
  while (done < unparsed_.size() && !queue_full())
    done += parser_.feed(std::string_view(unparsed_).substr(done));
  unparsed_.erase(0, done);
  // Requests parsed from this chunk run after every out-of-band request in it was answered,
  // which is what lets an exec-oob reply overtake queued in-band replies (T73).
  send(this, next_atom::value);
}

void monitor_actor::on_value(qmp::json_result&& r) {
  if (trace::on(trace::point::monitor_qmp_request))
    trace::emit(trace::point::monitor_qmp_request,
                "mon=" + dev_->id() + " " + (r.ok ? qmp::to_json(r.value) : "error: " + r.error));
  if (!r.ok) {
    queue_.push_back({std::nullopt, qmp::make_error(error(r.error), std::nullopt)});
    if (queue_full()) parser_.pause();
    return;
  }
  auto req = qmp::parse_request(r.value, oob_enabled_);
  if (!req) {
    queue_.push_back({std::nullopt, qmp::make_error(req.error().err, req.error().id)});
    if (queue_full()) parser_.pause();
    return;
  }
  if (req->oob) {
    dispatch(std::move(*req), true);
    return;
  }
  queue_.push_back({std::move(*req), {}});
  if (queue_full()) parser_.pause();
}

void monitor_actor::pump() {
  for (;;) {
    while (!executing_ && !queue_.empty() && open_ && !closing_) {
      auto item = std::move(queue_.front());
      queue_.pop_front();
      if (!item.req)
        write_message(item.error_reply);
      else
        dispatch(std::move(*item.req), false);
    }
    if (executing_ || unparsed_.empty() || queue_full() || !open_ || closing_) break;
    // Room again: parse what was held back (this may queue more requests).
    size_t done = 0;
    while (done < unparsed_.size() && !queue_full())
      done += parser_.feed(std::string_view(unparsed_).substr(done));
    unparsed_.erase(0, done);
  }
  post_recv();
}

void monitor_actor::dispatch(qmp::request req, bool oob) {
  const auto& schema = qmp::qsd_schema();
  const auto& id = req.id;
  // Before negotiation the command table holds qmp_capabilities only, and QSD rewrites the text of
  // every CommandNotFound it produces there.
  if (!negotiated_ && req.command != "qmp_capabilities") {
    write_message(qmp::make_error(
        error(error_class::command_not_found, "Expecting capabilities negotiation with 'qmp_capabilities'"), id));
    return;
  }
  const auto* cmd = schema.find_command(req.command);
  if (!cmd) {
    write_message(qmp::make_error(
        error(error_class::command_not_found, "The command " + req.command + " has not been found"), id));
    return;
  }
  if (oob && !cmd->allow_oob) {
    write_message(qmp::make_error(error("The command " + req.command + " does not support OOB"), id));
    return;
  }
  auto args = qmp::visit_command_args(schema, req.command, req.arguments, qmp::input_mode::qmp);
  if (!args) {
    write_message(qmp::make_error(args.error(), id));
    return;
  }

  if (req.command == "qmp_capabilities") {
    if (negotiated_) {
      write_message(qmp::make_error(error(error_class::command_not_found,
                                          "Capabilities negotiation is already complete, command ignored"),
                                    id));
      return;
    }
    bool want_oob = false;
    if (auto* en = args->if_contains("enable"))
      for (auto& c : en->as_array())
        if (c.is_string() && c.as_string() == "oob") want_oob = true;
    negotiated_ = true;
    oob_enabled_ = want_oob;
    write_message(qmp::make_return(boost::json::object(), id));
    return;
  }
  if (req.command == "query-version") {
    write_message(qmp::make_return(version_info(), id));
    return;
  }
  if (req.command == "query-commands") {
    write_message(qmp::make_return(qmp::command_list(schema), id));
    return;
  }
  if (req.command == "query-qmp-schema") {
    write_message(qmp::make_return(qmp::introspect(schema), id));
    return;
  }

  // Everything else changes daemon state: the supervisor runs it and the reply keeps its place.
  executing_ = true;
  request(supervisor_, caf::infinite, command_atom::value, req.command, json_args{std::move(*args)})
      .then(
          [this, id](const command_outcome& out) {
            finish_command(id, out);
          },
          [this, id](const caf::error& e) {
            finish_command(id, command_outcome::failure(error("internal error: " + to_string(e))));
          });
}

void monitor_actor::finish_command(const std::optional<boost::json::value>& id, const command_outcome& out) {
  executing_ = false;
  if (open_ && !closing_) {
    if (out.ok)
      write_message(qmp::make_return(out.ret, id));
    else
      write_message(qmp::make_error(out.err, id));
  }
  pump();
}

void monitor_actor::write_message(const boost::json::object& msg) {
  if (!open_ || dev_->out_fd() < 0) return;
  std::string text = qmp::to_json(msg, opts_.pretty);
  if (trace::on(trace::point::monitor_qmp_response))
    trace::emit(trace::point::monitor_qmp_response, "mon=" + dev_->id() + " " + text);
  text.push_back('\n');
  // Every line the monitor sends ends in CR LF, as QEMU's monitor output does.
  std::string wire;
  wire.reserve(text.size() + 16);
  for (char c : text) {
    if (c == '\n') wire.push_back('\r');
    wire.push_back(c);
  }
  if (out_.size() + sending_.size() + wire.size() > max_output_bytes) {
    std::fprintf(stderr, "blockd: monitor %s: client is not reading its replies; dropping the connection\n",
                 opts_.id.empty() ? dev_->id().c_str() : opts_.id.c_str());
    out_.clear();
    begin_close();
    return;
  }
  out_ += wire;
  start_send();
}

void monitor_actor::start_send() {
  if (send_busy_ || !open_ || dev_->out_fd() < 0) return;
  // The kernel reads from sending_ until the operation completes, so new output goes to out_ and
  // the two swap only when nothing is in flight.
  if (sending_.empty()) sending_.swap(out_);
  if (sending_.empty()) return;
  send_busy_ = true;
  send_op_.owner = self_handle();
  send_op_.gen = gen_;
  if (dev_->type() == chardev::kind::stdio)
    home_->reactor().write(dev_->out_fd(), sending_.data(), sending_.size(), -1, &send_op_);
  else
    home_->reactor().send(dev_->out_fd(), sending_.data(), sending_.size(), &send_op_);
}

void monitor_actor::begin_close() {
  if (!open_) {
    maybe_finish_close();
    return;
  }
  closing_ = true;
  if (recv_busy_) home_->reactor().cancel(&recv_op_);
  // On shutdown the replies already queued (quit's among them) still go out; a connection that
  // went away on its own has nobody left to read them.
  if (send_busy_ && !shutting_down_) home_->reactor().cancel(&send_op_);
  maybe_finish_close();
}

void monitor_actor::maybe_finish_close() {
  // The descriptor is closed only when no operation on it is in flight, so a recycled fd number
  // can never receive a stale completion.
  if (open_ && closing_) {
    bool draining = send_busy_ || ((!out_.empty() || !sending_.empty()) && shutting_down_);
    if (recv_busy_ || draining) return;
    open_ = false;
    closing_ = false;
    queue_.clear();
    parser_.reset();
    unparsed_.clear();
    out_.clear();
    sending_.clear();
    dev_->drop_connection();
    if (!shutting_down_) wait_for_client();
  }
  if (shutting_down_ && !open_ && !recv_busy_ && !send_busy_ && !accept_busy_ && !timer_busy_) {
    if (close_promise_) {
      close_promise_->deliver(true);
      close_promise_.reset();
      send(supervisor_, unsubscribe_atom::value, self_handle());
      quit();
    }
  }
}

}  // namespace blockd

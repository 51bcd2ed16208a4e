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

void monitor_port::chr_event(chr::event e) {
  if (!started) return;
  if (auto a = caf::actor_cast<caf::actor>(self)) caf::anon_send(a, chr_event_atom::value, static_cast<int>(e));
}

void monitor_port::chr_read(std::string_view bytes) {
  if (auto a = caf::actor_cast<caf::actor>(self)) caf::anon_send(a, chr_input_atom::value, std::string(bytes));
}

monitor_actor::monitor_actor(caf::actor_config& cfg, iothread* home, caf::actor supervisor,
                             std::shared_ptr<chr::chardev> dev, std::shared_ptr<monitor_port> port,
                             monitor_options opts)
    : caf::event_based_actor(cfg),
      home_(home),
      supervisor_(std::move(supervisor)),
      dev_(std::move(dev)),
      port_(std::move(port)),
      opts_(std::move(opts)),
      parser_([this](qmp::json_result&& r) { on_value(std::move(r)); }) {}

monitor_actor::~monitor_actor() {
  if (attached_) dev_->detach(port_.get());
}

caf::actor monitor_actor::self_handle() { return caf::actor_cast<caf::actor>(this); }

caf::behavior monitor_actor::make_behavior() {
  send(supervisor_, subscribe_atom::value, self_handle());
  port_->self = caf::actor_cast<caf::weak_actor_ptr>(this);
  // start_atom comes from the supervisor once the command line is applied: only then does the
  // monitor serve, greeting at once if its backend is open (QEMU's OPENED on attach).
  return {
      [this](start_atom) {
        if (port_->started || shutting_down_) return;
        port_->started = true;
        if (dev_->be_open())
          open_connection();
        else
          update_room();
      },
      [this](chr_event_atom, int e) { on_event(static_cast<chr::event>(e)); },
      [this](chr_input_atom, const std::string& bytes) {
        if (open_ && !shutting_down_) on_bytes(bytes.data(), bytes.size());
      },
      [this](next_atom) { pump(); },
      [this](event_atom, const qmp_event& ev) {
        // Events reach only connections that finished negotiation; nothing is kept for later.
        if (!open_ || !negotiated_) return;
        write_message(qmp::make_event(ev.name, ev.data, ev.seconds, ev.microseconds));
      },
      [this](close_atom) -> caf::result<bool> {
        shutting_down_ = true;
        close_promise_ = make_response_promise();
        auto rp = *close_promise_;
        // The replies already written (quit's among them) go out before the monitor lets go.
        auto me = caf::actor_cast<caf::weak_actor_ptr>(this);
        dev_->flush([me] {
          if (auto a = caf::actor_cast<caf::actor>(me)) caf::anon_send(a, flushed_atom::value);
        });
        return rp;
      },
      [this](flushed_atom) {
        if (!close_promise_) return;
        if (attached_) dev_->detach(port_.get());
        attached_ = false;
        open_ = false;
        close_promise_->deliver(true);
        close_promise_.reset();
        send(supervisor_, unsubscribe_atom::value, self_handle());
        quit();
      },
  };
}

void monitor_actor::on_event(chr::event e) {
  if (shutting_down_) return;
  switch (e) {
    case chr::event::opened: open_connection(); break;
    case chr::event::closed: close_connection(); break;
    // QMP monitors ignore breaks and mux focus changes, as QEMU's do.
    case chr::event::brk:
    case chr::event::mux_in:
    case chr::event::mux_out: break;
  }
}

void monitor_actor::open_connection() {
  trace::emit(trace::point::monitor_connect, "mon=" + dev_->id() + " connected");
  ++gen_;
  open_ = true;
  negotiated_ = false;
  oob_enabled_ = false;
  executing_ = false;
  queue_.clear();
  parser_.reset();
  unparsed_.clear();
  boost::json::object greeting;
  boost::json::object qmp;
  qmp["version"] = version_info();
  qmp["capabilities"] = boost::json::array{"oob"};
  greeting["QMP"] = std::move(qmp);
  write_message(greeting);
  update_room();
}

void monitor_actor::close_connection() {
  // A command in flight still completes; its reply has no connection to go to (gen_ moves on).
  ++gen_;
  open_ = false;
  executing_ = false;
  queue_.clear();
  parser_.reset();
  unparsed_.clear();
  update_room();
}

void monitor_actor::update_room() {
  bool room = open_ && !shutting_down_ && !queue_full() && unparsed_.empty();
  bool was = port_->room;
  port_->room = room;
  if (room && !was && attached_) dev_->input_ready();
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
  update_room();
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
    while (!executing_ && !queue_.empty() && open_) {
      auto item = std::move(queue_.front());
      queue_.pop_front();
      if (!item.req)
        write_message(item.error_reply);
      else
        dispatch(std::move(*item.req), false);
    }
    if (executing_ || unparsed_.empty() || queue_full() || !open_) break;
    // Room again: parse what was held back (this may queue more requests).
    size_t done = 0;
    while (done < unparsed_.size() && !queue_full())
      done += parser_.feed(std::string_view(unparsed_).substr(done));
    unparsed_.erase(0, done);
  }
  update_room();
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
  uint64_t gen = gen_;
  request(supervisor_, caf::infinite, command_atom::value, req.command, json_args{std::move(*args)})
      .then(
          [this, id, gen](const command_outcome& out) {
            finish_command(id, out, gen);
          },
          [this, id, gen](const caf::error& e) {
            finish_command(id, command_outcome::failure(error("internal error: " + to_string(e))), gen);
          });
}

void monitor_actor::finish_command(const std::optional<boost::json::value>& id, const command_outcome& out,
                                   uint64_t gen) {
  if (gen != gen_) return;  // the connection it came from is gone; the new one owes nothing
  executing_ = false;
  if (open_) {
    if (out.ok)
      write_message(qmp::make_return(out.ret, id));
    else
      write_message(qmp::make_error(out.err, id));
  }
  pump();
}

void monitor_actor::write_message(const boost::json::object& msg) {
  if (!open_) return;
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
  if (dev_->backlog() + wire.size() > max_output_bytes) {
    std::fprintf(stderr, "blockd: monitor %s: client is not reading its replies; dropping the connection\n",
                 opts_.id.empty() ? dev_->id().c_str() : opts_.id.c_str());
    dev_->hangup();
    return;
  }
  dev_->write(wire);
}

}  // namespace blockd

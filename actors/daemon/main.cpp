// blockd's entry point: QSD-compatible command line, start-up in order, wait, clean shutdown; main thread.
#include <caf/all.hpp>
#include <sys/eventfd.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <iostream>
#include <optional>
#include <string>

#include "actors/daemon/process.h"
#include "actors/messages.h"
#include "actors/runtime/iothread.h"
#include "actors/runtime/pinned.h"
#include "actors/supervisor/supervisor.h"
#include "config/chardev_spec.h"
#include "config/command_line.h"
#include "config/inherited_fds.h"
#include "config/help_text.h"
#include "config/keyval.h"
#include "config/object_help.h"
#include "config/qemu_opts.h"
#include "protocol/qmp/json_stream.h"
#include "protocol/qmp/schema.h"
#include "protocol/qmp/visitor.h"
#include "protocol/trace/trace.h"

namespace blockd {
namespace {

// What one command-line item asks of the running daemon, after parsing.
struct item_outcome {
  bool exit_now = false;  // a help request was answered: exit 0
  std::optional<error> err;
};

// Parses a --blockdev/--export/--monitor/--nbd-server/--object argument: JSON when it starts
// with '{', keyval otherwise; either way validated against the schema type.
result<boost::json::value> parse_structured(const std::string& arg, std::string_view implied_key,
                                            std::string_view type_name, bool* help) {
  const auto& schema = qmp::qsd_schema();
  if (!arg.empty() && arg[0] == '{') {
    auto parsed = qmp::parse_json_text(arg);
    if (!parsed.ok) return fail(parsed.error);
    return qmp::visit(schema, type_name, parsed.value, qmp::input_mode::qmp);
  }
  auto kv = keyval_parse(arg, implied_key);
  if (!kv) return std::unexpected(kv.error());
  if (kv->help) {
    *help = true;
    return boost::json::value(std::move(kv->tree));
  }
  return qmp::visit(schema, type_name, boost::json::value(std::move(kv->tree)), qmp::input_mode::keyval);
}

std::optional<error> ask(caf::scoped_actor& self, const caf::actor& sup, caf::message msg) {
  std::optional<error> out;
  self->request(sup, caf::infinite, std::move(msg))
      .receive([&](const command_outcome& r) { if (!r.ok) out = r.err; },
               [&](const caf::error& e) { out = error("internal error: " + to_string(e)); });
  return out;
}

item_outcome apply_object(caf::scoped_actor& self, const caf::actor& sup, const std::string& arg) {
  bool help = false;
  if (!arg.empty() && arg[0] != '{') {
    auto kv = keyval_parse(arg, "qom-type");
    if (kv && kv->help) {
      auto* type = kv->tree.if_contains("qom-type");
      std::string text = type && type->is_string() ? object_type_help(std::string(type->as_string()))
                                                  : object_types_help();
      std::fputs(text.c_str(), stdout);
      return {true, std::nullopt};
    }
  }
  auto v = parse_structured(arg, "qom-type", "ObjectOptions", &help);
  if (!v) return {false, v.error()};
  return {false, ask(self, sup, caf::make_message(command_atom::value, std::string("object-add"), json_args{v->as_object()}))};
}

item_outcome apply_blockdev(caf::scoped_actor& self, const caf::actor& sup, const std::string& arg) {
  bool help = false;
  auto v = parse_structured(arg, "driver", "BlockdevOptions", &help);
  if (help) return {false, error("Help is not available for this option")};
  if (!v) return {false, v.error()};
  return {false, ask(self, sup, caf::make_message(command_atom::value, std::string("blockdev-add"),
                                                  json_args{v->as_object()}))};
}

// --export and --nbd-server: the same keyval/JSON as their QMP commands, applied in order. The
// server's flat SocketAddress goes to nbd-server-start as it is (the supervisor takes both forms).
item_outcome apply_command_item(caf::scoped_actor& self, const caf::actor& sup, const std::string& arg,
                                std::string_view implied_key, std::string_view type_name, const char* command) {
  bool help = false;
  auto v = parse_structured(arg, implied_key, type_name, &help);
  if (help) return {false, error("Help is not available for this option")};
  if (!v) return {false, v.error()};
  return {false, ask(self, sup, caf::make_message(command_atom::value, std::string(command), json_args{v->as_object()}))};
}

item_outcome apply_monitor(caf::scoped_actor& self, const caf::actor& sup, const std::string& arg) {
  bool help = false;
  auto v = parse_structured(arg, "chardev", "MonitorOptions", &help);
  if (!v) return {false, v.error()};
  if (help) return {false, error("Help is not available for this option")};
  auto& o = v->as_object();
  if (auto* mode = o.if_contains("mode"); mode && mode->as_string() == "readline")
    return {false, error("Only QMP is supported")};
  bool pretty = false;
  if (auto* p = o.if_contains("pretty")) pretty = p->as_bool();
  std::string id;
  if (auto* i = o.if_contains("id")) id = std::string(i->as_string());
  return {false, ask(self, sup,
                     caf::make_message(monitor_atom::value, std::string(o.at("chardev").as_string()), pretty, id))};
}

item_outcome apply_chardev(caf::scoped_actor& self, const caf::actor& sup, const cli_item& item) {
  std::string prefix = "blockd: " + item.location + ": ";
  auto opts = qemu_opts_parse(item.arg, "backend", chardev_option_names());
  // Deprecation warnings come first, before any error about a later item.
  auto warn = [&](const std::string& w) { std::fputs((prefix + "warning: " + w + "\n").c_str(), stderr); };
  if (!opts) {
    error e = opts.error();
    size_t pos = 0;
    std::string hint = e.hint;
    e.hint.clear();
    // Each warning is two lines (note and advice); the hint holds them all.
    std::vector<std::string> lines;
    while (pos < hint.size()) {
      auto nl = hint.find('\n', pos);
      lines.push_back(hint.substr(pos, nl - pos));
      pos = nl + 1;
    }
    for (size_t i = 0; i + 1 < lines.size(); i += 2) warn(lines[i] + "\n" + lines[i + 1]);
    return {false, e};
  }
  for (auto& w : opts->warnings) warn(w);
  if (opts->help) {
    std::string text = "Available chardev backend types:\n";
    for (auto& b : chardev_backends_supported()) text += "  " + b + "\n";
    std::fputs(text.c_str(), stdout);
    return {true, std::nullopt};
  }
  auto spec = chardev_spec_from_options(opts->options);
  if (!spec) return {false, spec.error()};
  return {false, ask(self, sup, caf::make_message(chardev_atom::value, *spec, prefix))};
}

// -T/--trace: QemuOpts with the implied key "enable"; "help" lists the trace points.
item_outcome apply_trace(const cli_item& item) {
  static const std::vector<std::string> allowed = {"enable", "events", "file"};
  auto opts = qemu_opts_parse(item.arg, "enable", allowed);
  if (!opts) return {false, opts.error()};
  bool list = opts->help;
  for (auto& [k, v] : opts->options) {
    if (k == "enable" && (v == "help" || v == "?")) list = true;
  }
  if (list) {
    for (auto& n : trace::all_names()) std::printf("%s\n", n.c_str());
    return {true, std::nullopt};
  }
  for (auto& [k, v] : opts->options) {
    if (k == "enable") {
      trace::enable(v);
    } else if (k == "file") {
      if (auto r = trace::set_output(v); !r) return {false, r.error()};
    } else if (k == "events") {
      FILE* f = std::fopen(v.c_str(), "r");
      if (!f) return {false, error("cannot open trace events file '" + v + "': " + std::strerror(errno))};
      char line[512];
      while (std::fgets(line, sizeof line, f)) {
        std::string pat(line);
        while (!pat.empty() && (pat.back() == '\n' || pat.back() == '\r' || pat.back() == ' ')) pat.pop_back();
        if (!pat.empty() && pat[0] != '#') trace::enable(pat);
      }
      std::fclose(f);
    }
  }
  return {false, std::nullopt};
}

item_outcome apply_item(caf::scoped_actor& self, const caf::actor& sup, const cli_item& item) {
  switch (item.opt) {
    case cli_option::object: return apply_object(self, sup, item.arg);
    case cli_option::monitor: return apply_monitor(self, sup, item.arg);
    case cli_option::chardev: return apply_chardev(self, sup, item);
    case cli_option::trace: return apply_trace(item);
    case cli_option::positional: return {false, error("Unexpected argument")};
    case cli_option::blockdev:
      return apply_blockdev(self, sup, item.arg);
    case cli_option::export_:
      return apply_command_item(self, sup, item.arg, "type", "BlockExportOptions", "block-export-add");
    case cli_option::nbd_server:
      return apply_command_item(self, sup, item.arg, "", "NbdServerOptions", "nbd-server-start");
  }
  return {false, error("unknown option")};
}

void print_item_error(const cli_item& item, const error& e) {
  std::string line = "blockd: " + item.location + ": " + e.desc + "\n";
  if (!e.hint.empty()) line += e.hint + "\n";
  std::fputs(line.c_str(), stderr);
}

}  // namespace
}  // namespace blockd

int main(int argc, char** argv) {
  using namespace blockd;
  capture_inherited_fds();  // before anything of blockd's own is open
  auto plan = parse_command_line(argc, argv);
  if (!plan) {
    std::fputs((plan.error().message + "\n").c_str(), stderr);
    return 1;
  }
  if (plan->help) {
    std::fputs(help_text().c_str(), stdout);
    return 0;
  }
  if (plan->version) {
    std::fputs(version_text().c_str(), stdout);
    return 0;
  }
  if (plan->daemonize) process::daemonize_begin();
  process::block_signals();

  int exit_code = 0;
  int quit_fd = ::eventfd(0, EFD_CLOEXEC);
  {
    caf::actor_system_config cfg;
    // The default scheduler only hosts CAF internals: every blockd actor is pinned to an iothread.
    cfg.set("scheduler.max-threads", size_t(1));
    cfg.set("logger.console", caf::atom("none"));
    caf::actor_system sys{cfg};
    // QEMU's main loop does not busy-poll (poll-max-ns is an iothread property only); a main-loop
    // object's aio-max-batch and thread-pool-* reach it through set_event_loop_base_params.
    iothread_params main_params;
    main_params.poll_max_ns = 0;
    auto main_io = std::make_unique<iothread>(sys, "main", main_params);
    supervisor_hooks hooks;
    hooks.quit_requested = [quit_fd] {
      uint64_t one = 1;
      (void)!::write(quit_fd, &one, sizeof one);
    };
    auto sup = spawn_pinned<supervisor_actor>(sys, *main_io, hooks);
    {
      caf::scoped_actor self{sys};
      bool started = true;
      bool help_exit = false;
      for (auto& item : plan->items) {
        auto out = apply_item(self, sup, item);
        if (out.err) {
          print_item_error(item, *out.err);
          started = false;
          exit_code = 1;
          break;
        }
        if (out.exit_now) {
          help_exit = true;
          break;
        }
      }
      if (started && !help_exit && plan->pidfile) {
        if (auto r = process::write_pidfile(*plan->pidfile); !r) {
          std::fprintf(stderr, "blockd: cannot create PID file: %s\n", r.error().desc.c_str());
          started = false;
          exit_code = 1;
        }
      }
      if (started && !help_exit) {
        self->send(sup, ready_atom::value);
        process::daemonize_ready();
        process::wait_for_stop(quit_fd);
      }
      // Orderly shutdown: monitors flush their last replies and close, iothreads stop, sockets go.
      self->request(sup, std::chrono::seconds(10), shutdown_atom::value)
          .receive([](bool) {}, [](const caf::error&) {});
      self->send_exit(sup, caf::exit_reason::user_shutdown);
    }
    sys.await_all_actors_done();
    main_io.reset();
  }
  process::remove_pidfile();
  std::fflush(stdout);
  return exit_code;
}

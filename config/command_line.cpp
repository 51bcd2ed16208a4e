// getopt_long-compatible scanner for blockd's options (abbreviations, --opt=value, -Targ); start-up only.
#include "config/command_line.h"

#include <cstring>
#include <string_view>

namespace blockd {
namespace {

enum class kind { help, version, daemonize, pidfile, item };

struct long_opt {
  const char* name;
  bool has_arg;
  kind k;
  cli_option opt;
};

const long_opt long_opts[] = {
    {"blockdev", true, kind::item, cli_option::blockdev},
    {"chardev", true, kind::item, cli_option::chardev},
    {"daemonize", false, kind::daemonize, cli_option::blockdev},
    {"export", true, kind::item, cli_option::export_},
    {"help", false, kind::help, cli_option::blockdev},
    {"monitor", true, kind::item, cli_option::monitor},
    {"nbd-server", true, kind::item, cli_option::nbd_server},
    {"object", true, kind::item, cli_option::object},
    {"pidfile", true, kind::pidfile, cli_option::blockdev},
    {"trace", true, kind::item, cli_option::trace},
    {"version", false, kind::version, cli_option::blockdev},
};

std::unexpected<cli_failure> failure(const std::string& msg) { return std::unexpected(cli_failure{"blockd: " + msg}); }

}  // namespace

std::expected<cli_plan, cli_failure> parse_command_line(int argc, char** argv) {
  cli_plan plan;
  bool options_done = false;
  for (int i = 1; i < argc; ++i) {
    std::string_view a = argv[i];
    if (options_done || a.size() < 2 || a[0] != '-') {
      plan.items.push_back({cli_option::positional, std::string(a), std::string(a)});
      continue;
    }
    if (a == "--") {
      options_done = true;
      continue;
    }
    if (a.starts_with("--")) {
      std::string_view body = a.substr(2);
      auto eq = body.find('=');
      std::string_view name = body.substr(0, eq);
      const long_opt* match = nullptr;
      std::vector<const long_opt*> candidates;
      for (auto& o : long_opts) {
        if (name == o.name) {
          match = &o;
          candidates.clear();
          break;
        }
        if (std::string_view(o.name).starts_with(name)) candidates.push_back(&o);
      }
      if (!match) {
        if (candidates.size() == 1) {
          match = candidates[0];
        } else if (candidates.size() > 1) {
          std::string msg = "option '" + std::string(a.substr(0, eq == std::string_view::npos ? a.size() : eq + 2)) +
                            "' is ambiguous; possibilities:";
          for (auto* c : candidates) msg += std::string(" '--") + c->name + "'";
          return failure(msg);
        } else {
          return failure("unrecognized option '" + std::string(a.substr(0, eq == std::string_view::npos ? a.size() : eq + 2)) + "'");
        }
      }
      std::string value;
      std::string location;
      if (match->has_arg) {
        if (eq != std::string_view::npos) {
          value = std::string(body.substr(eq + 1));
          location = std::string(a);
        } else if (i + 1 < argc) {
          value = argv[++i];
          location = std::string(a) + " " + value;
        } else {
          return failure("option '--" + std::string(match->name) + "' requires an argument");
        }
      } else if (eq != std::string_view::npos) {
        return failure("option '--" + std::string(match->name) + "' doesn't allow an argument");
      }
      switch (match->k) {
        case kind::help: plan.help = true; return plan;
        case kind::version: plan.version = true; return plan;
        case kind::daemonize: plan.daemonize = true; break;
        case kind::pidfile: plan.pidfile = value; break;
        case kind::item: plan.items.push_back({match->opt, location, value}); break;
      }
      continue;
    }
    // Short options, possibly grouped: -h, -V, -T ARG / -TARG.
    for (size_t k = 1; k < a.size(); ++k) {
      char c = a[k];
      if (c == 'h') {
        plan.help = true;
        return plan;
      }
      if (c == 'V') {
        plan.version = true;
        return plan;
      }
      if (c == 'T') {
        std::string value;
        std::string location;
        if (k + 1 < a.size()) {
          value = std::string(a.substr(k + 1));
          location = std::string(a);
        } else if (i + 1 < argc) {
          value = argv[++i];
          location = std::string(a) + " " + value;
        } else {
          return failure("option requires an argument -- 'T'");
        }
        plan.items.push_back({cli_option::trace, location, value});
        break;
      }
      return failure(std::string("invalid option -- '") + c + "'");
    }
  }
  return plan;
}

}  // namespace blockd

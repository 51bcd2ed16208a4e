// Unit tests for the command-line layer: keyval, QemuOpts, getopt-style scanning and --chardev specs; test thread.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "config/chardev_spec.h"
#include "config/command_line.h"
#include "config/keyval.h"
#include "config/qemu_opts.h"

namespace blockd {
namespace {

std::string kv_error(std::string_view text, std::string_view implied = "") {
  auto r = keyval_parse(text, implied);
  return r ? std::string("<ok>") : r.error().desc;
}

boost::json::object kv(std::string_view text, std::string_view implied = "") {
  auto r = keyval_parse(text, implied);
  EXPECT_TRUE(r.has_value()) << text << ": " << (r ? "" : r.error().desc);
  return r ? r->tree : boost::json::object();
}

TEST(keyval, flat_items_keep_string_values) {
  auto t = kv("qom-type=iothread,id=io0,poll-max-ns=10");
  EXPECT_EQ(boost::json::value(t), boost::json::parse(R"({"qom-type":"iothread","id":"io0","poll-max-ns":"10"})"));
}

TEST(keyval, implied_key_only_for_first_item) {
  auto t = kv("iothread,id=io0", "qom-type");
  EXPECT_EQ(t.at("qom-type"), "iothread");
  EXPECT_EQ(kv_error("id=io0,iothread", "qom-type"), "Expected '=' after parameter 'iothread'");
  EXPECT_EQ(kv_error("iothread,id=x"), "Expected '=' after parameter 'iothread'");
}

TEST(keyval, dotted_keys_nest_and_dense_indexes_form_arrays) {
  auto t = kv("cache.direct=on,cache.no-flush=off,addr.0=a,addr.1=b");
  EXPECT_EQ(t.at("cache").as_object().at("direct"), "on");
  ASSERT_TRUE(t.at("addr").is_array());
  EXPECT_EQ(t.at("addr").as_array().size(), 2u);
  EXPECT_EQ(t.at("addr").as_array()[1], "b");
}

TEST(keyval, double_comma_escapes_a_comma_in_values) {
  auto t = kv("filename=/tmp/a,,b.img,x=1");
  EXPECT_EQ(t.at("filename"), "/tmp/a,b.img");
  EXPECT_EQ(t.at("x"), "1");
}

TEST(keyval, later_duplicate_wins) {
  EXPECT_EQ(kv("node-name=a,node-name=b").at("node-name"), "b");
}

TEST(keyval, errors_match_qsd) {
  EXPECT_EQ(kv_error("=x"), "Invalid parameter ''");
  EXPECT_EQ(kv_error("a.b=1,a=2"), "Parameters 'a.*' used inconsistently");
  EXPECT_EQ(kv_error("a=2,a.b=1"), "Parameters 'a.*' used inconsistently");
  EXPECT_EQ(kv_error("a.1=x,a.3=y"), "Parameter 'a.0' missing");
  EXPECT_EQ(kv_error("a..b=1"), "Invalid parameter 'a..b'");
  EXPECT_EQ(kv_error(std::string(200, 'k') + "=1").substr(0, 10), "Parameter ");
  EXPECT_NE(kv_error(std::string(200, 'k') + "=1").find("is too long"), std::string::npos);
}

TEST(keyval, help_is_recognized_anywhere) {
  auto r = keyval_parse("iothread,help", "qom-type");
  ASSERT_TRUE(r);
  EXPECT_TRUE(r->help);
  auto q = keyval_parse("help", "qom-type");
  ASSERT_TRUE(q);
  EXPECT_TRUE(q->help);
}

TEST(qemu_opts, items_in_order_with_implied_backend) {
  auto r = qemu_opts_parse("socket,id=c,path=/x,server=on,wait=off", "backend", chardev_option_names());
  ASSERT_TRUE(r) << r.error().desc;
  ASSERT_EQ(r->options.size(), 5u);
  EXPECT_EQ(r->options[0], (std::pair<std::string, std::string>{"backend", "socket"}));
  EXPECT_EQ(r->options[4], (std::pair<std::string, std::string>{"wait", "off"}));
  EXPECT_TRUE(r->warnings.empty());
}

TEST(qemu_opts, short_form_booleans_warn_and_expand) {
  auto r = qemu_opts_parse("socket,id=c,path=/x,server,nowait", "backend", chardev_option_names());
  ASSERT_TRUE(r) << r.error().desc;
  ASSERT_EQ(r->warnings.size(), 2u);
  EXPECT_EQ(r->warnings[0], "short-form boolean option 'server' deprecated\nPlease use server=on instead");
  EXPECT_EQ(r->warnings[1], "short-form boolean option 'nowait' deprecated\nPlease use wait=off instead");
  EXPECT_EQ(r->options.back(), (std::pair<std::string, std::string>{"wait", "off"}));
}

TEST(qemu_opts, unknown_name_is_an_error_after_earlier_warnings) {
  auto r = qemu_opts_parse("null,id=c,server,bogus=1", "backend", chardev_option_names());
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().desc, "Invalid parameter 'bogus'");
  EXPECT_NE(r.error().hint.find("short-form boolean option 'server'"), std::string::npos);
}

result<chardev_spec> spec(std::string_view text) {
  auto r = qemu_opts_parse(text, "backend", chardev_option_names());
  if (!r) return std::unexpected(r.error());
  return chardev_spec_from_options(r->options);
}

TEST(chardev_spec, unix_server) {
  auto s = spec("socket,id=m,path=/run/q.sock,server=on,wait=off");
  ASSERT_TRUE(s) << s.error().desc;
  EXPECT_EQ(s->addr_str("path"), "/run/q.sock");
  EXPECT_TRUE(s->server);
  EXPECT_FALSE(s->wait);
}

TEST(chardev_spec, tcp_client_with_reconnect) {
  auto s = spec("socket,id=m,host=127.0.0.1,port=4444,reconnect=2");
  ASSERT_TRUE(s) << s.error().desc;
  EXPECT_EQ(s->addr_str("host"), "127.0.0.1");
  EXPECT_EQ(s->addr_str("port"), "4444");
  EXPECT_FALSE(s->server);
  EXPECT_EQ(s->reconnect_ms, 2000);
}

TEST(chardev_spec, errors_match_qsd) {
  EXPECT_EQ(spec("socket").error().desc, "chardev: no id specified");
  // A socket without an address is a descriptor to be found at open time ("Unable to parse FD
  // number", test_differential_cli covers it).
  EXPECT_EQ(spec("socket,id=c")->addr_type(), "fd");
  EXPECT_EQ(spec("socket,id=c,host=h,server=on").error().desc, "chardev: socket: no port given");
  EXPECT_EQ(spec("bogus,id=c").error().desc, "'bogus' is not a valid char driver name");
  EXPECT_EQ(validate_socket_spec(*spec("socket,id=c,path=/p,server=on,reconnect=1")).error().desc,
            "'reconnect' option is incompatible with socket in server listen mode");
  EXPECT_EQ(spec("socket,id=c,path=/p,host=h,port=1").error().desc,
            "None or one of 'path', 'fd' or 'host' option required.");
  auto bad_id = spec("null,id=9c");
  ASSERT_FALSE(bad_id);
  EXPECT_EQ(bad_id.error().desc, "Parameter 'id' expects an identifier");
  EXPECT_EQ(bad_id.error().hint, "Identifiers consist of letters, digits, '-', '.', '_', starting with a letter.");
}

TEST(identifiers, qom_rule) {
  EXPECT_TRUE(id_wellformed("a"));
  EXPECT_TRUE(id_wellformed("io-0.x_y"));
  EXPECT_FALSE(id_wellformed(""));
  EXPECT_FALSE(id_wellformed("0a"));
  EXPECT_FALSE(id_wellformed("a,b"));
  EXPECT_FALSE(id_wellformed("-a"));
}

// getopt_long needs mutable argv; this keeps the strings alive for one call.
std::expected<cli_plan, cli_failure> scan(std::vector<std::string> args) {
  args.insert(args.begin(), "blockd");
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  return parse_command_line(static_cast<int>(args.size()), argv.data());
}

TEST(command_line, items_keep_order_and_typed_location) {
  auto p = scan({"--chardev", "null,id=c", "--obj", "iothread,id=x", "--monitor=c", "--pidfile", "/tmp/p"});
  ASSERT_TRUE(p) << p.error().message;
  ASSERT_EQ(p->items.size(), 3u);
  EXPECT_EQ(p->items[0].opt, cli_option::chardev);
  EXPECT_EQ(p->items[1].opt, cli_option::object);
  EXPECT_EQ(p->items[1].location, "--obj iothread,id=x");
  EXPECT_EQ(p->items[2].arg, "c");
  EXPECT_EQ(p->pidfile, "/tmp/p");
  EXPECT_FALSE(p->daemonize);
}

TEST(command_line, first_help_or_version_ends_the_scan) {
  auto h = scan({"-h", "--foo"});
  ASSERT_TRUE(h);
  EXPECT_TRUE(h->help);
  auto v = scan({"--version"});
  ASSERT_TRUE(v);
  EXPECT_TRUE(v->version);
  auto e = scan({"--foo", "-V"});
  ASSERT_FALSE(e);
  EXPECT_EQ(e.error().message, "blockd: unrecognized option '--foo'");
}

TEST(command_line, syntax_errors_match_getopt) {
  EXPECT_EQ(scan({"--object"}).error().message, "blockd: option '--object' requires an argument");
  EXPECT_EQ(scan({"-T"}).error().message, "blockd: option requires an argument -- 'T'");
  EXPECT_EQ(scan({"-x"}).error().message, "blockd: invalid option -- 'x'");
}

TEST(command_line, positional_arguments_are_items_that_fail_in_order) {
  auto p = scan({"--chardev", "null,id=c", "extra"});
  ASSERT_TRUE(p);
  ASSERT_EQ(p->items.size(), 2u);
  EXPECT_EQ(p->items[1].opt, cli_option::positional);
  EXPECT_EQ(p->items[1].arg, "extra");
}

TEST(command_line, daemonize_and_trace) {
  auto p = scan({"--daemonize", "-T", "enable=qmp_*", "--trace", "events=/x"});
  ASSERT_TRUE(p) << p.error().message;
  EXPECT_TRUE(p->daemonize);
  ASSERT_EQ(p->items.size(), 2u);
  EXPECT_EQ(p->items[0].opt, cli_option::trace);
  EXPECT_EQ(p->items[0].arg, "enable=qmp_*");
}

}  // namespace
}  // namespace blockd

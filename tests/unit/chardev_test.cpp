// Unit tests of the chardev pure parts: --chardev/chardev-add parsing, telnet filtering, websocket handshake and framing, ringbuf semantics, QEMU's UTF-8 and base64 rules, mux escapes.
#include <gtest/gtest.h>

#include <boost/json.hpp>

#include "config/chardev_spec.h"
#include "config/qemu_opts.h"
#include "protocol/chardev/mux_escape.h"
#include "protocol/chardev/ringbuf.h"
#include "protocol/qmp/base64.h"
#include "protocol/chardev/telnet.h"
#include "protocol/chardev/websocket.h"

using namespace blockd;
using namespace blockd::chr;

namespace {

result<chardev_spec> cli(std::string_view text, std::vector<std::string>* notes = nullptr) {
  auto r = qemu_opts_parse(text, "backend", chardev_option_names());
  if (!r) return std::unexpected(r.error());
  return chardev_spec_from_options(r->options, notes);
}

std::string cli_error(std::string_view text) {
  auto s = cli(text);
  return s ? "OK" : s.error().desc;
}

result<chardev_spec> qmp_spec(const char* backend_json) {
  return chardev_spec_from_qmp("c", boost::json::parse(backend_json).as_object());
}

std::string bytes(std::initializer_list<int> v) {
  std::string s;
  for (int c : v) s.push_back(static_cast<char>(c));
  return s;
}

}  // namespace

// ---- --chardev ----------------------------------------------------------------------------------

TEST(chardev_cli, backend_texts_match_qsd_72) {
  EXPECT_EQ(cli_error("file,id=f"), "chardev: file: no filename given");
  EXPECT_EQ(cli_error("pipe,id=p"), "chardev: pipe: no device path given");
  EXPECT_EQ(cli_error("serial,id=s"), "chardev: serial/tty: no device path given");
  EXPECT_EQ(cli_error("parallel,id=p"), "chardev: parallel: no device path given");
  EXPECT_EQ(cli_error("udp,id=u"), "chardev: udp: remote port not specified");
  EXPECT_EQ(cli_error("mux,id=x"), "chardev: mux: no chardev given");
  EXPECT_EQ(cli_error("vc,id=v"), "'vc' is not a valid char driver name");
  EXPECT_EQ(cli_error("null"), "chardev: no id specified");
  EXPECT_EQ(cli_error("id=n"), "chardev: \"n\" missing backend");
  EXPECT_EQ(cli_error("socket,id=s,host=127.0.0.1"), "chardev: socket: no port given");
  EXPECT_EQ(cli_error("socket,id=s,path=/x,delay=off,nodelay=on"), "'delay' and 'nodelay' are mutually exclusive");
  EXPECT_EQ(cli_error("socket,id=s,path=/x,server=maybe"), "Parameter 'server' expects 'on' or 'off'");
  EXPECT_EQ(cli_error("socket,id=s,path=/x,reconnect=soon"), "Parameter 'reconnect' expects a number");
  auto size = cli("ringbuf,id=r,size=abc");
  ASSERT_FALSE(size);
  EXPECT_EQ(size.error().desc, "Parameter 'size' expects a non-negative number below 2^64");
  EXPECT_NE(size.error().hint.find("Optional suffix k, M, G"), std::string::npos);
  EXPECT_EQ(cli_error("ringbuf,id=r,size=-1"), "Parameter 'size' expects a non-negative number below 2^64");
  EXPECT_EQ(cli_error("null,id=n,numeric=on"), "Invalid parameter 'numeric'");
}

TEST(chardev_cli, defaults_and_values) {
  auto r = cli("ringbuf,id=r,size=64k");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->size, 65536);
  EXPECT_EQ(cli("memory,id=r,size=0")->size, 65536);  // size=0 means the default on the command line
  EXPECT_EQ(cli("ringbuf,id=r,size=1G")->size, int64_t(1) << 30);

  auto f = cli("file,id=f,path=/tmp/x,append=on,logfile=/tmp/l,logappend=on");
  ASSERT_TRUE(f);
  EXPECT_EQ(f->out_path, "/tmp/x");
  EXPECT_TRUE(f->append);
  EXPECT_EQ(f->logfile, "/tmp/l");
  EXPECT_TRUE(f->logappend);

  auto u = cli("udp,id=u,port=5000,localport=6000");
  ASSERT_TRUE(u);
  EXPECT_EQ(u->addr_str("host"), "localhost");
  EXPECT_EQ(u->local_addr.at("port").as_string(), "6000");

  auto s = cli("socket,id=s,path=/p,server=on,wait=off,telnet=on,nodelay=on");
  ASSERT_TRUE(s);
  EXPECT_TRUE(s->server && s->telnet && s->nodelay);
  EXPECT_FALSE(s->wait);
  // QEMU's command line fills tight and abstract for unix addresses (qom-get addr shows them).
  EXPECT_EQ(s->addr, boost::json::parse(R"({"type":"unix","path":"/p","tight":true,"abstract":false})"));

  auto c = cli("socket,id=c,host=h,port=1,reconnect-ms=250");
  ASSERT_TRUE(c);
  EXPECT_FALSE(c->server);
  EXPECT_EQ(c->reconnect_ms, 250);
  EXPECT_EQ(cli("socket,id=c,host=h,port=1,reconnect=2")->reconnect_ms, 2000);

  auto m = cli("socket,id=m,path=/p,server=on,wait=off,mux=on");
  ASSERT_TRUE(m);
  EXPECT_TRUE(m->mux);

  auto h = cli("hub,id=h,chardevs.0=a,chardevs.1=b");
  ASSERT_TRUE(h);
  EXPECT_EQ(h->hub, (std::vector<std::string>{"a", "b"}));

  EXPECT_EQ(cli("pty,id=p,path=/tmp/link")->pty_link, "/tmp/link");
  EXPECT_FALSE(cli("stdio,id=s,signal=off")->signal);
}

TEST(chardev_cli, aliases_warn_as_qsd) {
  std::vector<std::string> notes;
  auto s = cli("tty,id=t,path=/dev/null", &notes);
  ASSERT_TRUE(s);
  EXPECT_EQ(s->backend, "serial");
  ASSERT_EQ(notes.size(), 1u);
  EXPECT_EQ(notes[0], "The alias 'tty' is deprecated, use 'serial' instead");
  notes.clear();
  EXPECT_EQ(cli("parport,id=p,path=/dev/null", &notes)->backend, "parallel");
  EXPECT_EQ(notes.at(0), "The alias 'parport' is deprecated, use 'parallel' instead");
}

TEST(chardev_cli, socket_validation_texts) {
  auto v = [](std::string_view t) {
    auto s = cli(t);
    if (!s) return s.error().desc;
    auto r = validate_socket_spec(*s);
    return r ? std::string("OK") : r.error().desc;
  };
  EXPECT_EQ(v("socket,id=s,path=/p,server=on,wait=off,reconnect=0"),
            "'reconnect' option is incompatible with socket in server listen mode");
  EXPECT_EQ(v("socket,id=s,fd=3,server=on,wait=off,reconnect=1"), "'reconnect' option is incompatible with 'fd' address type");
  EXPECT_EQ(v("socket,id=s,path=/p,wait=off"), "'wait' option is incompatible with socket in client connect mode");
  EXPECT_EQ(v("socket,id=s,path=/p,websocket=on"), "Websocket client is not implemented");
  EXPECT_EQ(v("socket,id=s,path=/p,server=on,wait=off,tls-authz=a"), "'tls_authz' option requires 'tls_creds' option");
  EXPECT_EQ(v("socket,id=s,path=/p,server=on,wait=off"), "OK");
}

// ---- chardev-add -------------------------------------------------------------------------------

TEST(chardev_qmp, defaults_differ_from_the_command_line) {
  auto s = qmp_spec(R"({"type":"socket","data":{"addr":{"type":"unix","data":{"path":"/p"}}}})");
  ASSERT_TRUE(s);
  EXPECT_TRUE(s->server);  // QMP's default
  EXPECT_FALSE(s->wait);
  EXPECT_FALSE(s->wait_given);
  EXPECT_EQ(s->addr, boost::json::parse(R"({"type":"unix","path":"/p"})"));

  auto w = qmp_spec(R"({"type":"socket","data":{"addr":{"type":"unix","data":{"path":"/p"}},"server":false,"wait":true}})");
  EXPECT_EQ(validate_socket_spec(*w).error().desc, "'wait' option is incompatible with socket in client connect mode");

  auto r = qmp_spec(R"({"type":"ringbuf","data":{"size":0}})");
  EXPECT_EQ(r->size, 0);  // over QMP 0 stays 0 (and passes QEMU's power-of-two check)
  EXPECT_EQ(qmp_spec(R"({"type":"memory","data":{}})")->size, 65536);

  auto f = qmp_spec(R"({"type":"file","data":{"in":"/i","out":"/o","append":true}})");
  EXPECT_EQ(f->in_path, "/i");
  EXPECT_EQ(f->out_path, "/o");
  EXPECT_TRUE(f->append);

  auto u = qmp_spec(R"({"type":"udp","data":{"remote":{"type":"inet","data":{"host":"h","port":"1"}},
                                        "local":{"type":"inet","data":{"host":"","port":"2"}}}})");
  EXPECT_EQ(u->addr_str("host"), "h");
  EXPECT_EQ(u->local_addr.at("port").as_string(), "2");
  EXPECT_EQ(qmp_spec(R"({"type":"mux","data":{"chardev":"b"}})")->chardev, "b");
  EXPECT_EQ(qmp_spec(R"({"type":"null"})")->backend, "null");
}

// ---- telnet ------------------------------------------------------------------------------------

TEST(telnet, init_sequences_are_qemus) {
  EXPECT_EQ(std::string(telnet_init_sequence(false)), bytes({255, 251, 1, 255, 251, 3, 255, 251, 0, 255, 253, 0}));
  EXPECT_EQ(std::string(telnet_init_sequence(true)), bytes({255, 253, 25, 255, 251, 25, 255, 253, 0, 255, 251, 0, 255,
                                                            253, 24, 255, 250, 24, 1, 255, 240}));
}

TEST(telnet, filter_matches_qsd_72) {
  // Each case was sent to QSD 7.2 inside a JSON string; the member name it complained about is
  // the data that got through.
  auto run = [](bool tn3270, const std::string& in, unsigned* breaks = nullptr) {
    telnet_filter f(tn3270);
    std::string out;
    unsigned b = f.filter(in, out);
    if (breaks) *breaks = b;
    return out;
  };
  EXPECT_EQ(run(false, "ab" + bytes({255, 251, 1}) + "cd"), "abcd");        // IAC WILL ECHO: three bytes
  EXPECT_EQ(run(false, "x" + bytes({255, 255})), "x" + bytes({255}));       // IAC IAC: one 0xFF
  unsigned breaks = 0;
  EXPECT_EQ(run(false, "x" + bytes({255, 243}) + "y", &breaks), "xy");       // IAC BREAK: two bytes, a break
  EXPECT_EQ(breaks, 1u);
  EXPECT_EQ(run(false, "x" + bytes({255, 241}) + "yz"), "xz");              // IAC NOP eats one more
  EXPECT_EQ(run(false, "x" + bytes({255, 250, 24}) + "abc" + bytes({255, 240}) + "yz"), "xabcz");  // SB .. SE
  // tn3270: EOR, SB and SE stay; IP and NOP go (two bytes).
  EXPECT_EQ(run(true, "x" + bytes({255, 239}) + "y"), "x" + bytes({255, 239}) + "y");
  EXPECT_EQ(run(true, "a" + bytes({255, 241}) + "b" + bytes({255, 244}) + "c"), "abc");
  // State survives between reads.
  telnet_filter f(false);
  std::string out;
  f.filter("x" + bytes({255}), out);
  f.filter(bytes({251}), out);
  f.filter(bytes({1}) + "yz", out);
  EXPECT_EQ(out, "xyz");
}

// ---- websocket ---------------------------------------------------------------------------------

namespace {
const std::string request =
    "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: binary\r\n\r\n";

std::string replace(std::string s, const std::string& from, const std::string& to) {
  auto p = s.find(from);
  if (p != std::string::npos) s.replace(p, from.size(), to);
  return s;
}

std::string status_of(const std::string& req) {
  auto h = websocket_server_handshake(req, 0);
  if (h.st == ws_handshake::status::incomplete) return "incomplete";
  return h.response.substr(9, 3);
}

std::string masked(uint8_t opcode, const std::string& payload, bool fin = true) {
  std::string f;
  f.push_back(static_cast<char>((fin ? 0x80 : 0) | opcode));
  const uint8_t mask[4] = {0x11, 0x22, 0x33, 0x44};
  if (payload.size() < 126) {
    f.push_back(static_cast<char>(0x80 | payload.size()));
  } else {
    f.push_back(static_cast<char>(0x80 | 126));
    f.push_back(static_cast<char>(payload.size() >> 8));
    f.push_back(static_cast<char>(payload.size() & 0xFF));
  }
  for (uint8_t m : mask) f.push_back(static_cast<char>(m));
  for (size_t i = 0; i < payload.size(); ++i) f.push_back(static_cast<char>(payload[i] ^ mask[i & 3]));
  return f;
}
}  // namespace

TEST(websocket, accept_key_is_rfc6455s_example) {
  EXPECT_EQ(websocket_accept_key("dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
  EXPECT_EQ(base64_encode(""), "");
  EXPECT_EQ(base64_encode("a"), "YQ==");
  EXPECT_EQ(base64_encode("ab"), "YWI=");
  EXPECT_EQ(base64_encode("abc"), "YWJj");
}

TEST(websocket, handshake_replies_as_qemu) {
  auto h = websocket_server_handshake(request + "tail", 0);
  ASSERT_EQ(h.st, ws_handshake::status::accepted);
  EXPECT_EQ(h.consumed, request.size());
  EXPECT_EQ(h.response,
            "HTTP/1.1 101 Switching Protocols\r\nServer: QEMU VNC\r\nDate: Thu, 01 Jan 1970 00:00:00 GMT\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"
            "Sec-WebSocket-Protocol: binary\r\n\r\n");
  // No subprotocol offered: none in the reply.
  auto np = websocket_server_handshake(replace(request, "Sec-WebSocket-Protocol: binary\r\n", ""), 0);
  EXPECT_EQ(np.st, ws_handshake::status::accepted);
  EXPECT_EQ(np.response.find("Sec-WebSocket-Protocol"), std::string::npos);
  // Header names and token values are case-insensitive; Connection may list several tokens.
  EXPECT_EQ(status_of(replace(replace(request, "Upgrade: websocket", "upgrade: WebSocket"), "Connection: Upgrade",
                              "Connection: keep-alive, upgrade")),
            "101");
  EXPECT_EQ(status_of(request.substr(0, request.size() - 2)), "incomplete");
}

TEST(websocket, refusals_in_qemus_order) {
  EXPECT_EQ(status_of(replace(request, "GET /", "POST /x")), "400");  // method before path
  EXPECT_EQ(status_of(replace(request, "GET / HTTP/1.1", "GET /x HTTP/1.0")), "404");  // path before version
  EXPECT_EQ(status_of(replace(request, "HTTP/1.1", "HTTP/1.0")), "400");
  EXPECT_EQ(status_of(replace(request, "Host: x\r\n", "")), "400");
  EXPECT_EQ(status_of(replace(request, "Version: 13", "Version: 8")), "400");
  EXPECT_EQ(status_of(replace(request, "Key: ", "Key: x")), "400");
  EXPECT_EQ(status_of(replace(request, "binary", "base64")), "400");
  EXPECT_EQ(status_of(replace(request, "Connection: Upgrade", "Connection: keep-alive")), "400");
  EXPECT_EQ(status_of("hello\r\n\r\n"), "400");
  EXPECT_EQ(status_of(std::string(5000, 'a')), "400");  // no end of headers within QEMU's 4 KiB
  // QEMU's 400 ends after its last header, without the blank line.
  auto h = websocket_server_handshake("hello\r\n\r\n", 0);
  EXPECT_EQ(h.response,
            "HTTP/1.1 400 Bad Request\r\nServer: QEMU VNC\r\nDate: Thu, 01 Jan 1970 00:00:00 GMT\r\n"
            "Connection: close\r\nSec-WebSocket-Version: 13\r\n");
}

TEST(websocket, frames_out) {
  EXPECT_EQ(websocket_frame(ws_binary, "hi"), bytes({0x82, 2}) + "hi");
  std::string mid(300, 'x');
  EXPECT_EQ(websocket_frame(ws_binary, mid).substr(0, 4), bytes({0x82, 126, 1, 44}));
  std::string big(70000, 'y');
  EXPECT_EQ(websocket_frame(ws_binary, big).substr(0, 10), bytes({0x82, 127, 0, 0, 0, 0, 0, 1, 0x11, 0x70}));
  EXPECT_EQ(websocket_close_frame(1000, "bye"), bytes({0x88, 5, 3, 0xe8}) + "bye");
}

TEST(websocket, decoder_streams_data_and_answers_control_frames) {
  websocket_decoder d;
  websocket_decoder::output out;
  std::string f = masked(ws_binary, "hello world");
  // Byte by byte: the payload comes out as it arrives.
  for (char c : f) d.feed(std::string_view(&c, 1), out);
  EXPECT_EQ(out.data, "hello world");
  // Continuation frames add to the data; ping is answered with its payload; pong is ignored.
  out = {};
  d.feed(masked(ws_binary, "ab", false) + masked(ws_continuation, "cd") + masked(ws_ping, "p1") + masked(ws_pong, "x"), out);
  EXPECT_EQ(out.data, "abcd");
  EXPECT_EQ(out.reply, websocket_frame(ws_pong, "p1"));
  EXPECT_FALSE(out.closed);
  std::string mid(1000, 'm');
  out = {};
  d.feed(masked(ws_binary, mid), out);
  EXPECT_EQ(out.data, mid);
  // Close: QEMU's reply and the end.
  out = {};
  d.feed(masked(ws_close, bytes({3, 0xe8}) + "bye"), out);
  EXPECT_TRUE(out.closed);
  EXPECT_EQ(out.reply, websocket_close_frame(1000, "peer requested close"));
}

TEST(websocket, decoder_refuses_as_qemu) {
  websocket_decoder::output out;
  websocket_decoder a;
  a.feed(bytes({0x82, 2}) + "hi", out);  // unmasked
  EXPECT_TRUE(out.closed);
  EXPECT_EQ(out.reply, websocket_close_frame(1002, "client frames must be masked"));
  EXPECT_TRUE(out.data.empty());
  out = {};
  websocket_decoder b;
  b.feed(masked(ws_text, "{}"), out);
  EXPECT_TRUE(out.closed);
  EXPECT_EQ(out.reply, websocket_close_frame(1003, "only binary, close, ping, and pong frames are supported"));
  // Nothing after the end.
  out = {};
  b.feed(masked(ws_binary, "late"), out);
  EXPECT_TRUE(out.data.empty());
}

// ---- ringbuf -----------------------------------------------------------------------------------

TEST(ringbuf, keeps_the_newest_bytes) {
  ring_buffer r(8);
  r.write("0123456789abc");  // 13 bytes into 8: QSD 7.2 read back "56789abc"
  EXPECT_EQ(r.count(), 8u);
  EXPECT_EQ(r.read(100), "56789abc");
  r.write("hello");
  EXPECT_EQ(r.read(3), "hel");
  r.write("world");  // 2 left + 5 = 7
  EXPECT_EQ(r.read(100), "loworld");
  EXPECT_EQ(r.read(5), "");
  for (int i = 0; i < 3; ++i) r.write("abcdef");  // overflow across several writes
  EXPECT_EQ(r.read(100), "efabcdef");
  ring_buffer none(0);
  none.write("x");
  EXPECT_EQ(none.read(5), "");
  ring_buffer huge(uint64_t(1) << 32);  // memory follows the contents, not the size
  huge.write("abc");
  EXPECT_EQ(huge.read(10), "abc");
}

TEST(ringbuf, size_check_is_qemus) {
  EXPECT_TRUE(check_ringbuf_size(1));
  EXPECT_TRUE(check_ringbuf_size(0));
  EXPECT_TRUE(check_ringbuf_size(int64_t(1) << 32));
  EXPECT_EQ(check_ringbuf_size(3).error().desc, "size of ringbuf chardev must be power of two");
  EXPECT_EQ(check_ringbuf_size(-4).error().desc, "size of ringbuf chardev must be power of two");
  EXPECT_FALSE(check_ringbuf_size(-1));
}

TEST(ringbuf, utf8_text_as_qsd_72_returns_it) {
  const std::string fffd = "\xEF\xBF\xBD";
  EXPECT_EQ(qemu_utf8_text("ab\xff" "cd\xc3"), "ab" + fffd + "cd" + fffd);
  EXPECT_EQ(qemu_utf8_text("\xc3\xa9\xe2\x82\xac\xf0\x9f"), "\xc3\xa9\xe2\x82\xac" + fffd);
  EXPECT_EQ(qemu_utf8_text(std::string("ab\0cd", 5)), "ab");  // a C string: ends at NUL
  EXPECT_EQ(qemu_utf8_text("\xed\xa0\x80x\xc0\x80y"), fffd + "x" + std::string(1, '\0') + "y");  // C0 80 is NUL
  // Noncharacters, five-byte forms, overlongs and cut sequences: one replacement each.
  EXPECT_EQ(qemu_utf8_text("\xef\xbf\xbf|\xef\xb7\x90|\xef\xbf\xbe|\xf0\x9f\xbf\xbf|\xf8\x88\x80\x80\x80|\xe0\x80\xaf|"
                           "\xc3|\xc3(|\xe2\x82|\xe2\x82(|\x7f|\x1f"),
            fffd + "|" + fffd + "|" + fffd + "|" + fffd + "|" + fffd + "|" + fffd + "|" + fffd + "|" + fffd + "(|" +
                fffd + "|" + fffd + "(|\x7f|\x1f");
  EXPECT_EQ(qemu_utf8_text("\xfe\xff|\xf4\x8f\xbf\xbf"), fffd + fffd + "|" + fffd);
  EXPECT_EQ(qemu_utf8_text("\xf4\x90\x80\x80"), fffd);  // beyond U+10FFFF
  EXPECT_EQ(qemu_utf8_text("\xf0\x9f\x98\x80"), "\xf0\x9f\x98\x80");
  EXPECT_EQ(qemu_utf8_bytes(std::string("a\0b", 3)), "a\xc0\x80" "b");
}

TEST(ringbuf, base64_as_glib_decodes_it) {
  auto d = [](const char* s) {
    auto r = blockd::qmp::glib_base64_decode(s);
    return r ? *r : "ERR:" + r.error().desc;
  };
  EXPECT_EQ(d("YWJj"), "abc");
  EXPECT_EQ(d("YWJj="), "abc");
  EXPECT_EQ(d("YWJ"), "");       // a partial group is dropped
  EXPECT_EQ(d("YQ==YWJj"), "aabc");
  EXPECT_EQ(d("Y=Q="), "`\x04");
  EXPECT_EQ(d("=YWJj"), "\x01\x85\x89");
  EXPECT_EQ(d("YWJjZA="), "abc");
  EXPECT_EQ(d("===="), std::string(1, '\0'));
  EXPECT_EQ(d("YQ==="), "a");
  EXPECT_EQ(d(""), "");
  EXPECT_EQ(d("!!!"), "ERR:Base64 data contains invalid characters");
  EXPECT_EQ(d("YW Jj"), "ERR:Base64 data contains invalid characters");
}

// ---- mux ---------------------------------------------------------------------------------------

TEST(mux, escape_keys) {
  using a = mux_escape::action;
  mux_escape m;
  EXPECT_EQ(m.feed('x'), a::deliver);
  EXPECT_EQ(m.feed(1), a::swallow);
  EXPECT_EQ(m.feed(1), a::deliver);  // C-a C-a sends C-a
  EXPECT_EQ(m.feed(1), a::swallow);
  EXPECT_EQ(m.feed('c'), a::switch_focus);
  EXPECT_EQ(m.feed(1), a::swallow);
  EXPECT_EQ(m.feed('h'), a::help);
  EXPECT_EQ(m.feed(1), a::swallow);
  EXPECT_EQ(m.feed('?'), a::help);
  EXPECT_EQ(m.feed(1), a::swallow);
  EXPECT_EQ(m.feed('z'), a::swallow);  // unknown keys vanish with the escape
  EXPECT_EQ(m.feed('z'), a::deliver);
  for (auto [k, want] : {std::pair{'x', a::exit}, std::pair{'s', a::save}, std::pair{'b', a::send_break},
                         std::pair{'t', a::toggle_timestamps}}) {
    EXPECT_EQ(m.feed(1), a::swallow);
    EXPECT_EQ(m.feed(static_cast<uint8_t>(k)), want);
  }
  EXPECT_EQ(mux_help_text(),
            "\n\rC-a h    print this help\n\rC-a x    exit emulator\n\rC-a s    save disk data back to file (if "
            "-snapshot)\n\rC-a t    toggle console timestamps\n\rC-a b    send break (magic sysrq)\n\rC-a c    "
            "switch between console and monitor\n\rC-a C-a  sends C-a\n\r");
  EXPECT_EQ(mux_exit_text(), "QEMU: Terminated\n\r");
}

TEST(mux, timestamps_start_on_the_next_line) {
  mux_timestamps t;
  EXPECT_EQ(t.apply("a\r\n", 5), "a\r\n");
  t.toggle();
  // As QSD 7.2: the line under way gets no stamp, the next one starts the clock.
  EXPECT_EQ(t.apply("reply\r\n", 1000), "reply\r\n");
  EXPECT_EQ(t.apply("next\r\nmore", 2000), "[00:00:00.000] next\r\n[00:00:00.000] more");
  EXPECT_EQ(t.apply("\nx", 2000 + 3723004), "\n[01:02:03.004] x");
  t.toggle();
  EXPECT_EQ(t.apply("\nplain", 0), "\nplain");
}

// The socket backend: unix/tcp/vsock/fd servers and clients, reconnect, TLS, websocket and telnet/tn3270 layers, one client at a time; the chardev's iothread.
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <deque>
#include <optional>

#include "actors/chardev/backends.h"
#include "actors/chardev/fd_stream.h"
#include "actors/chardev/socket_address.h"
#include "config/qom/object.h"
#include "protocol/chardev/telnet.h"
#include "protocol/chardev/websocket.h"

namespace blockd::chr {
namespace {

namespace json = boost::json;

class socket_chardev;

// qom-get of /chardevs/<id>: "connected" and "addr", read live from the chardev.
class socket_qom final : public qom::object {
 public:
  explicit socket_qom(std::weak_ptr<socket_chardev> c) : c_(std::move(c)) {}
  result<json::value> get(const std::string& prop) const override;

 private:
  std::weak_ptr<socket_chardev> c_;
};

class socket_chardev final : public chardev, public fd_stream::handler {
 public:
  socket_chardev(chardev_spec s, env e) : chardev(std::move(s), std::move(e)) {
    timer_.on_done = [this](int res) { on_timer(res); };
    connect_.on_done = [this](int res) { on_connected(res); };
    const char* proto = spec_.telnet ? "telnet" : spec_.websocket ? "websocket" : "tcp";
    proto_ = proto;
  }
  ~socket_chardev() override {
    for (int fd : listen_fds_) ::close(fd);
    for (int fd : waiting_) ::close(fd);
    unlink_socket();
  }

  result<void> setup();
  // Starts listening or the first connection attempt.
  void start() {
    if (spec_.server)
      post_accepts();
    else if (!conn_)
      try_connect();
  }
  // chardev-add (and --chardev) finish once a server with wait=on has its first client, or a
  // client without reconnect has connected (or failed to), as QEMU's creation does synchronously.
  void wait_ready(std::function<void(result<void>)> cb) override {
    bool wait_client = spec_.server && spec_.wait_given && spec_.wait && !conn_;
    bool wait_connect = !spec_.server && spec_.reconnect_ms <= 0 && !conn_ && (connect_.busy || timer_.busy);
    if (!wait_client && !wait_connect) return cb({});
    if (wait_client) {
      std::string prefix = env_.note_prefix.empty() ? "blockd: " : env_.note_prefix;
      std::fprintf(stderr, "%sinfo: blockd waiting for connection on: %s\n", prefix.c_str(), filename().c_str());
    }
    connect_waiters_.push_back(std::move(cb));
  }
  bool connected() const { return phase_ == phase::open; }
  json::object addr() const { return spec_.server ? listen_addr_ : spec_.addr; }

  std::string filename() const override {
    if (!connected()) return "disconnected:" + address_text(addr(), proto_) + (spec_.server ? ",server=on" : "");
    if (local_.family() == AF_UNIX)
      return "unix:" + endpoint_text(local_) + (spec_.server ? ",server=on" : "");
    if (local_.family() == AF_INET || local_.family() == AF_INET6)
      return proto_ + ":" + endpoint_text(local_) + (spec_.server ? ",server=on" : "") + " <-> " + endpoint_text(peer_);
    return "unknown";
  }
  size_t backlog() const override { return conn_ ? conn_->backlog() : 0; }
  void flush(std::function<void()> done) override {
    if (conn_)
      conn_->when_drained(std::move(done));
    else
      done();
  }
  std::unique_ptr<qom::object> qom_object() override {
    return std::make_unique<socket_qom>(std::static_pointer_cast<socket_chardev>(shared_from_this()));
  }

 protected:
  void backend_write(std::string_view bytes) override {
    if (phase_ != phase::open) return;  // QEMU drops output while no client is connected
    if (spec_.websocket)
      transport_write(websocket_frame(ws_binary, bytes));
    else
      transport_write(bytes);
  }
  void resume_reading() override {
    if (conn_) conn_->read_more();
  }
  void hangup() override {
    if (conn_) disconnect(false);
  }
  void on_close() override {
    // The path goes at once (the daemon may be exiting); the descriptors once nothing waits on them.
    unlink_socket();
    for (int fd : waiting_) ::close(fd);
    waiting_.clear();
    drop_connection(false);
    for (auto& a : accepts_)
      if (a->busy) env_.reactor->cancel(a.get());
    if (timer_.busy) env_.reactor->cancel(&timer_);
    finish_waiters(fail("chardev '" + spec_.id + "' was removed before it connected"));
  }
  bool stream_wants_input() override { return phase_ != phase::open || wants_input(); }
  void stream_data(std::string_view bytes) override;
  void stream_end(int) override { disconnect(false); }
  void stream_write_failed(int) override { disconnect(false); }

 private:
  enum class phase { none, tls, websocket, open };

  void post_accepts();
  void on_accept(size_t idx, int res);
  void new_client(int fd);
  void begin_protocols();
  void open_session();
  void transport_write(std::string_view bytes);
  void plain_data(std::string_view bytes);
  void frame_data(std::string_view bytes);
  void disconnect(bool graceful);
  void drop_connection(bool graceful);
  void try_connect();
  void on_connected(int res);
  void on_timer(int res);
  void finish_waiters(result<void> r);
  void unlink_socket() {
    if (!unlink_path_.empty()) ::unlink(unlink_path_.c_str());
    unlink_path_.clear();
  }

  std::string proto_;
  std::vector<int> listen_fds_;
  std::vector<std::unique_ptr<op>> accepts_;
  std::deque<int> waiting_;  // accepted while another client was served: next in line, as a backlog
  json::object listen_addr_;
  std::string unlink_path_;

  std::shared_ptr<fd_stream> conn_;
  phase phase_ = phase::none;
  sock_addr local_, peer_;
  std::unique_ptr<tls::session> tls_;
  std::string ws_request_;
  std::optional<websocket_decoder> ws_;
  std::optional<telnet_filter> telnet_;

  op timer_, connect_;
  std::shared_ptr<result<int>> connect_result_;
  bool connect_error_reported_ = false;
  std::vector<std::function<void(result<void>)>> connect_waiters_;
};

result<json::value> socket_qom::get(const std::string& prop) const {
  auto c = c_.lock();
  if (!c) return fail("chardev is gone");
  if (prop == "connected") return json::value(c->connected());
  if (prop == "addr") return json::value(c->addr());
  return qom::object::get(prop);
}

result<void> socket_chardev::setup() {
  if (auto r = validate_socket_spec(spec_); !r) return r;
  std::string type = spec_.addr_type();
  if (!spec_.tls_creds.empty()) {
    auto c = env_.tls_creds(spec_.tls_creds, spec_.server);
    if (!c) return std::unexpected(c.error());
  }
  int fd = -1;
  if (spec_.handed_fd) {
    fd = ::fcntl(*spec_.handed_fd, F_DUPFD_CLOEXEC, 3);
    if (fd < 0) return fail("Unable to use file descriptor " + std::to_string(*spec_.handed_fd) + ": " + std::strerror(errno));
  } else if (type == "fd") {
    auto taken = env_.take_fd(spec_.addr_str("str"));
    if (!taken) return std::unexpected(taken.error());
    fd = *taken;
  }
  if (spec_.server) {
    if (fd >= 0) {
      listen_fds_.push_back(fd);
    } else {
      auto fds = listen_on(spec_.addr);
      if (!fds) return std::unexpected(fds.error());
      listen_fds_ = std::move(*fds);
      if (type == "unix" && !spec_.addr_bool("abstract", false)) unlink_path_ = spec_.addr_str("path");
    }
    // What QEMU reports from here on is the listener's own address (the real port for port=0).
    listen_addr_ = address_of(local_of(listen_fds_.front()));
    for (size_t i = 0; i < listen_fds_.size(); ++i) {
      auto a = std::make_unique<op>();
      a->on_done = [this, i](int res) { on_accept(i, res); };
      accepts_.push_back(std::move(a));
    }
    return {};
  }
  if (fd >= 0) {
    new_client(fd);
    return {};
  }
  return {};
}

void socket_chardev::post_accepts() {
  if (closed_ || conn_) return;
  for (size_t i = 0; i < accepts_.size(); ++i) {
    if (accepts_[i]->busy) continue;
    accepts_[i]->arm(shared_from_this());
    env_.reactor->accept(listen_fds_[i], accepts_[i].get());
  }
}

void socket_chardev::on_accept(size_t, int res) {
  if (closed_) {
    if (res >= 0) ::close(res);
    return;
  }
  if (res < 0) {
    if (res != -ECANCELED) post_accepts();
    return;
  }
  if (conn_) {
    waiting_.push_back(res);
    return;
  }
  new_client(res);
  post_accepts();  // no-op while connected; a second client waits in the listen backlog
}

void socket_chardev::new_client(int fd) {
  if (spec_.nodelay) {
    int one = 1;
    (void)::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  }
  local_ = local_of(fd);
  peer_ = peer_of(fd);
  conn_ = fd_stream::create(*env_.reactor, fd, fd, fd_stream::mode::socket);
  conn_->set_handler(this);
  finish_waiters({});
  begin_protocols();
  if (conn_) conn_->read_more();
}

void socket_chardev::begin_protocols() {
  // Layers from the wire up, as QEMU stacks its channels: TLS, then websocket, then telnet.
  if (!spec_.tls_creds.empty()) {
    auto creds = env_.tls_creds(spec_.tls_creds, spec_.server);
    tls::authorizer authz;
    if (!spec_.tls_authz.empty())
      authz = [this, id = spec_.tls_authz](const std::string& identity) { return env_.authorize(id, identity); };
    result<std::unique_ptr<tls::session>> s = std::unexpected(error("no credentials"));
    // A client checks the server's certificate against the host name it connected to, as QEMU
    // does for inet addresses.
    if (creds)
      s = spec_.server ? tls::session::server(*creds, authz)
                       : tls::session::client(*creds, spec_.addr_type() == "inet" ? spec_.addr_str("host") : "");
    if (!s) {
      // The credentials went away (object-del) since the chardev was made: refuse this client.
      env_.report("chardev '" + spec_.id + "': TLS handshake failed: " + (creds ? s.error().desc : creds.error().desc));
      disconnect(false);
      return;
    }
    tls_ = std::move(*s);
    phase_ = phase::tls;
    if (!spec_.server) {
      // The client speaks first (ClientHello).
      if (tls_->handshake() == tls::session::status::failed) {
        env_.report("chardev '" + spec_.id + "': TLS handshake failed: " + tls_->error());
        disconnect(false);
        return;
      }
      std::string out;
      tls_->take_out(out);
      conn_->write(out);
    }
    return;
  }
  if (spec_.websocket) {
    phase_ = phase::websocket;
    return;
  }
  open_session();
}

void socket_chardev::open_session() {
  phase_ = phase::open;
  if (spec_.websocket) ws_.emplace();
  if (spec_.telnet || spec_.tn3270) {
    telnet_.emplace(spec_.tn3270);
    backend_write(telnet_init_sequence(spec_.tn3270));
  }
  deliver_event(event::opened);
}

void socket_chardev::transport_write(std::string_view bytes) {
  if (!conn_) return;
  if (tls_) {
    if (!tls_->write(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size())) return disconnect(false);
    std::string out;
    tls_->take_out(out);
    conn_->write(out);
    return;
  }
  conn_->write(bytes);
}

void socket_chardev::stream_data(std::string_view bytes) {
  if (!tls_) return plain_data(bytes);
  tls_->feed(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size());
  if (phase_ == phase::tls) {
    auto st = tls_->handshake();
    std::string out;
    tls_->take_out(out);
    if (conn_ && !out.empty()) conn_->write(out);
    if (st == tls::session::status::again) return;
    if (st == tls::session::status::failed) {
      env_.report("chardev '" + spec_.id + "': TLS handshake failed: " + tls_->error());
      return disconnect(false);
    }
    if (spec_.websocket)
      phase_ = phase::websocket;
    else
      open_session();
  }
  uint8_t buf[16384];
  while (tls_ && conn_) {
    long n = tls_->read(buf, sizeof buf);
    if (n == 0) break;
    if (n < 0) return disconnect(false);
    plain_data(std::string_view(reinterpret_cast<const char*>(buf), static_cast<size_t>(n)));
  }
}

void socket_chardev::plain_data(std::string_view bytes) {
  if (phase_ == phase::websocket) {
    ws_request_.append(bytes);
    auto h = websocket_server_handshake(ws_request_, std::time(nullptr));
    if (h.st == ws_handshake::status::incomplete) return;
    transport_write(h.response);
    if (h.st == ws_handshake::status::refused) return disconnect(true);
    std::string rest = ws_request_.substr(h.consumed);
    ws_request_.clear();
    open_session();
    if (!rest.empty() && conn_) frame_data(rest);
    return;
  }
  if (phase_ == phase::open) frame_data(bytes);
}

void socket_chardev::frame_data(std::string_view bytes) {
  std::string data;
  if (ws_) {
    websocket_decoder::output out;
    ws_->feed(bytes, out);
    if (!out.reply.empty()) transport_write(out.reply);
    data = std::move(out.data);
    if (telnet_) {
      std::string filtered;
      for (unsigned b = telnet_->filter(data, filtered); b > 0; --b) deliver_event(event::brk);
      data.swap(filtered);
    }
    if (!data.empty()) deliver_input(data);
    if (out.closed) disconnect(true);
    return;
  }
  if (telnet_) {
    for (unsigned b = telnet_->filter(bytes, data); b > 0; --b) deliver_event(event::brk);
    if (!data.empty()) deliver_input(data);
    return;
  }
  deliver_input(bytes);
}

void socket_chardev::drop_connection(bool graceful) {
  if (conn_) conn_->shutdown(graceful);  // the descriptor closes once nothing is in flight on it
  conn_.reset();
  tls_.reset();
  ws_.reset();
  telnet_.reset();
  ws_request_.clear();
  phase_ = phase::none;
}

void socket_chardev::disconnect(bool graceful) {
  bool was_open = phase_ == phase::open;
  drop_connection(graceful);
  if (was_open) deliver_event(event::closed);
  if (closed_) return;
  if (spec_.server) {
    if (!waiting_.empty()) {
      int fd = waiting_.front();
      waiting_.pop_front();
      new_client(fd);
      return;
    }
    post_accepts();
    return;
  }
  if (spec_.reconnect_ms > 0 && !timer_.busy) {
    timer_.arm(shared_from_this());
    env_.reactor->timeout(static_cast<uint64_t>(spec_.reconnect_ms) * 1000000u, &timer_);
  }
}

void socket_chardev::try_connect() {
  if (closed_ || conn_ || connect_.busy) return;
  // Resolution and connect block, so they run on a reactor worker, never on the loop.
  auto slot = std::make_shared<result<int>>(fail("not connected"));
  connect_result_ = slot;
  json::object addr = spec_.addr;
  connect_.arm(shared_from_this());
  env_.reactor->offload(
      [slot, addr] {
        *slot = connect_blocking(addr);
        return 0;
      },
      &connect_);
}

void socket_chardev::on_connected(int) {
  auto r = std::move(*connect_result_);
  connect_result_.reset();
  if (closed_) {
    if (r) ::close(*r);
    return;
  }
  if (r) {
    connect_error_reported_ = false;
    new_client(*r);
    return;
  }
  finish_waiters(std::unexpected(r.error()));
  if (spec_.reconnect_ms > 0) {
    // QEMU reports the first failure of a series only.
    if (!connect_error_reported_)
      env_.report("Unable to connect character device " + spec_.id + ": " + r.error().desc);
    connect_error_reported_ = true;
    disconnect(false);
  }
}

void socket_chardev::on_timer(int res) {
  if (closed_ || res == -ECANCELED) return;
  try_connect();
}

void socket_chardev::finish_waiters(result<void> r) {
  auto w = std::move(connect_waiters_);
  connect_waiters_.clear();
  for (auto& cb : w) cb(r);
}

}  // namespace

opened open_socket(const chardev_spec& s, const env& e) {
  auto c = std::make_shared<socket_chardev>(s, e);
  if (auto r = c->setup(); !r) return std::unexpected(r.error());
  c->start();
  return std::shared_ptr<chardev>(c);
}

}  // namespace blockd::chr

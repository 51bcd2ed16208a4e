// NBD listener: socket set-up from a SocketAddress, accept loop, handshake timeouts, hand-off to the export's home; main iothread only.
#include "actors/export/nbd_server.h"
#include "config/inherited_fds.h"

#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <linux/vm_sockets.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>

namespace blockd {
namespace {

std::string errstr(int e) { return std::strerror(e); }

std::string str_of(const boost::json::object& o, const char* k) {
  auto* v = o.if_contains(k);
  return v && v->is_string() ? std::string(v->as_string()) : std::string();
}
bool bool_of(const boost::json::object& o, const char* k, bool dflt) {
  auto* v = o.if_contains(k);
  return v && v->is_bool() ? v->as_bool() : dflt;
}

result<int> listen_unix(const boost::json::object& a, int backlog, std::string& unlink_path) {
  std::string path = str_of(a, "path");
  bool abstract = bool_of(a, "abstract", false);
  bool tight = bool_of(a, "tight", true);
  sockaddr_un sun{};
  sun.sun_family = AF_UNIX;
  size_t max = sizeof(sun.sun_path) - (abstract ? 1 : 0);
  if (path.size() >= max + (abstract ? 1 : 0) || (!abstract && path.size() >= sizeof(sun.sun_path)))
    return fail("UNIX socket path '" + path + "' is too long");
  socklen_t len;
  if (abstract) {
    std::memcpy(sun.sun_path + 1, path.data(), path.size());
    len = tight ? socklen_t(offsetof(sockaddr_un, sun_path) + 1 + path.size()) : socklen_t(sizeof sun);
  } else {
    std::memcpy(sun.sun_path, path.data(), path.size());
    len = sizeof sun;
    // QEMU removes whatever is at the path first (a stale socket from an earlier run).
    if (::unlink(path.c_str()) < 0 && errno != ENOENT)
      return fail("Failed to unlink socket " + path + ": " + errstr(errno));
  }
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return fail("Failed to create Unix socket: " + errstr(errno));
  if (::bind(fd, reinterpret_cast<sockaddr*>(&sun), len) < 0) {
    int e = errno;
    ::close(fd);
    return fail("Failed to bind socket to " + path + ": " + errstr(e));
  }
  if (::listen(fd, backlog) < 0) {
    int e = errno;
    ::close(fd);
    return fail("Failed to listen on socket: " + errstr(e));
  }
  if (!abstract) unlink_path = path;
  return fd;
}

// A decimal number that fits 32 bits and is the whole string (QEMU's parse of vsock cid and port).
bool parse_u32(const std::string& str, uint32_t& out) {
  if (str.empty() || str.size() > 10 || !std::all_of(str.begin(), str.end(), [](char c) { return c >= '0' && c <= '9'; }))
    return false;
  uint64_t v = std::stoull(str);
  if (v > UINT32_MAX) return false;
  out = uint32_t(v);
  return true;
}

result<int> listen_vsock(const boost::json::object& a, int backlog) {
  std::string cid = str_of(a, "cid"), port = str_of(a, "port");
  sockaddr_vm svm{};
  svm.svm_family = AF_VSOCK;
  if (!parse_u32(cid, svm.svm_cid)) return fail("Failed to parse cid '" + cid + "'");
  if (!parse_u32(port, svm.svm_port)) return fail("Failed to parse port '" + port + "'");
  int fd = ::socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return fail("Failed to create socket: " + errstr(errno));
  if (::bind(fd, reinterpret_cast<sockaddr*>(&svm), sizeof svm) < 0) {
    int e = errno;
    ::close(fd);
    return fail("Failed to bind socket: " + errstr(e));
  }
  if (::listen(fd, backlog) < 0) {
    int e = errno;
    ::close(fd);
    return fail("Failed to listen on socket: " + errstr(e));
  }
  return fd;
}

result<int> listen_inet(const boost::json::object& a, int backlog) {
  std::string host = str_of(a, "host"), port = str_of(a, "port");
  bool has4 = a.contains("ipv4"), has6 = a.contains("ipv6");
  bool v4 = bool_of(a, "ipv4", false), v6 = bool_of(a, "ipv6", false);
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;
  if (bool_of(a, "numeric", false)) hints.ai_flags |= AI_NUMERICHOST | AI_NUMERICSERV;
  hints.ai_family = (has4 && v4 && !(has6 && v6)) || (has6 && !v6) ? AF_INET
                    : (has6 && v6 && !(has4 && v4)) || (has4 && !v4) ? AF_INET6
                                                                     : AF_UNSPEC;
  addrinfo* res = nullptr;
  int rc = ::getaddrinfo(host.empty() ? nullptr : host.c_str(), port.c_str(), &hints, &res);
  if (rc != 0) return fail("address resolution failed for " + host + ":" + port + ": " + ::gai_strerror(rc));
  int fd = -1, last = 0;
  for (auto* ai = res; ai && fd < 0; ai = ai->ai_next) {
    int s = ::socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
    if (s < 0) {
      last = errno;
      continue;
    }
    int one = 1;
    (void)::setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (ai->ai_family == AF_INET6) {
      int only = has6 && v6 && has4 && !v4;
      (void)::setsockopt(s, IPPROTO_IPV6, IPV6_V6ONLY, &only, sizeof only);
    }
    if (bool_of(a, "keep-alive", false)) (void)::setsockopt(s, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one);
    if (::bind(s, ai->ai_addr, ai->ai_addrlen) == 0 && ::listen(s, backlog) == 0) {
      fd = s;
      break;
    }
    last = errno;
    ::close(s);
  }
  ::freeaddrinfo(res);
  if (fd < 0) return fail("Failed to find an available port: " + errstr(last));
  return fd;
}

}  // namespace

// One client negotiating. It owns its socket until the hand-off and frees itself once its last
// reactor operation has completed. With tls-creds, STARTTLS switches it to a TLS session whose
// record layer runs in memory: ciphertext goes through the reactor like any other bytes.
struct nbd_server::conn {
  struct cb final : io::completion {
    conn* c = nullptr;
    int which = 0;  // 0 recv, 1 send, 2 timer
    void complete(int res) override { c->on(which, res); }
  };

  nbd_server* srv;
  int fd;
  nbd::handshake hs;
  std::string out;       // bytes on the wire being sent (never touched while a send is in flight)
  size_t out_sent = 0;
  std::string next_out;  // bytes queued behind them
  std::vector<uint8_t> in;  // plaintext for the handshake
  size_t in_len = 0;
  std::vector<uint8_t> cin;  // ciphertext received, once TLS is on
  std::shared_ptr<tls::session> tls;
  bool tls_up = false;
  bool failed = false;  // TLS failed: send what is queued (the alert), then hang up
  cb recv_c, send_c, timer_c;
  bool recv_p = false, send_p = false, timer_p = false;
  bool closing = false, handed = false;

  static nbd::handshake::settings hs_settings(const nbd_server* s) {
    nbd::handshake::settings st;
    st.tls_required = s->h_.tls_creds != nullptr;
    return st;
  }

  conn(nbd_server* s, int f) : srv(s), fd(f), hs(*s->h_.catalog, hs_settings(s)) {
    recv_c = {};
    recv_c.c = send_c.c = timer_c.c = this;
    recv_c.which = 0;
    send_c.which = 1;
    timer_c.which = 2;
    in.resize(64u << 10);
  }

  io::reactor& r() { return srv->main_.reactor(); }

  void begin() {
    hs.start(next_out);
    if (srv->s_.handshake_max_seconds > 0) {
      timer_p = true;
      r().timeout(uint64_t(srv->s_.handshake_max_seconds) * 1000000000ull, &timer_c);
    }
    flush();
    want_more();
  }

  void flush() {
    if (send_p || closing) return;
    if (out_sent >= out.size()) {
      out.swap(next_out);
      next_out.clear();
      out_sent = 0;
    }
    if (out.empty()) return;
    send_p = true;
    r().send(fd, out.data() + out_sent, out.size() - out_sent, &send_c);
  }

  bool sending() const { return send_p || out_sent < out.size() || !next_out.empty(); }

  void want_more() {
    if (recv_p || closing || failed) return;
    auto st = hs.current();
    if (st != nbd::handshake::state::negotiating && st != nbd::handshake::state::starttls) return;
    if (tls) {
      if (cin.empty()) cin.resize(32u << 10);
      recv_p = true;
      r().recv(fd, cin.data(), cin.size(), &recv_c);
      return;
    }
    size_t need = std::max<size_t>(hs.need(), 1);
    if (in.size() < in_len + need) in.resize(in_len + need);
    recv_p = true;
    r().recv(fd, in.data() + in_len, in.size() - in_len, &recv_c);
  }

  // Handshake replies: straight to the wire, or through the TLS session once it is up.
  void emit(const std::string& plain) {
    if (plain.empty()) return;
    if (!tls_up) {
      next_out += plain;
      return;
    }
    if (!tls->write(reinterpret_cast<const uint8_t*>(plain.data()), plain.size())) fail_tls(tls->error());
    take_cipher();
  }

  void take_cipher() {
    if (!tls || tls->out().empty()) return;
    next_out += tls->out();
    tls->consumed(tls->out().size());
  }

  void fail_tls(const std::string& why) {
    // QSD reports every failed negotiation on stderr; blockd does so for TLS, where the reason
    // (an untrusted certificate, a refused identity) is otherwise invisible to the operator.
    if (!failed) std::fprintf(stderr, "blockd: option negotiation failed: %s\n", why.c_str());
    failed = true;
  }

  void run_hs() {
    // Alternates decrypting and negotiating until neither makes progress.
    while (hs.current() == nbd::handshake::state::negotiating && !failed) {
      size_t got = tls_up ? decrypt() : 0;
      if (failed) return;
      std::string produced;
      size_t used = hs.feed(in.data(), in_len, produced);
      std::memmove(in.data(), in.data() + used, in_len - used);
      in_len -= used;
      emit(produced);
      if (hs.current() == nbd::handshake::state::starttls) return start_tls();
      if (used == 0 && got == 0) return;
    }
  }

  size_t decrypt() {
    size_t need = std::max<size_t>(hs.need(), 1);
    if (in.size() < in_len + need) in.resize(in_len + need);
    long n = tls->read(in.data() + in_len, in.size() - in_len);
    if (n < 0) {
      if (!tls->error().empty()) fail_tls(tls->error());
      else failed = true;  // close_notify: the client is gone
      return 0;
    }
    in_len += size_t(n);
    return size_t(n);
  }

  void start_tls() {
    authorizer_for_tls();
    auto s = tls::session::server(srv->h_.tls_creds, authz);
    if (!s) return fail_tls(s.error().desc);
    tls = std::move(*s);
    // Bytes after STARTTLS are already the client's TLS hello.
    if (in_len) tls->feed(in.data(), in_len);
    in_len = 0;
    run_tls_handshake();
  }

  tls::authorizer authz;
  void authorizer_for_tls() {
    if (srv->h_.tls_authz) authz = srv->h_.tls_authz;
  }

  void run_tls_handshake() {
    auto st = tls->handshake();
    take_cipher();
    if (st == tls::session::status::again) return;
    if (st == tls::session::status::failed) return fail_tls(tls->error());
    tls_up = true;
    hs.tls_started();
    run_hs();
  }

  void on(int which, int res) {
    if (which == 0) recv_p = false;
    if (which == 1) send_p = false;
    if (which == 2) timer_p = false;
    if (closing) return maybe_free();
    if (which == 2) {
      if (res != -ECANCELED) close();  // the client took too long to negotiate (QEMU's CVE-2024-7409 fix)
      return maybe_free();
    }
    if (which == 1) {
      if (res <= 0) return close();
      out_sent += size_t(res);
      return progress();
    }
    if (res <= 0) return close();
    if (tls) {
      tls->feed(cin.data(), size_t(res));
      if (!tls_up) run_tls_handshake();
      else run_hs();
    } else {
      in_len += size_t(res);
      run_hs();
    }
    progress();
  }

  void progress() {
    if (failed) {
      // Send what is queued (a TLS alert), then hang up.
      if (sending()) return flush();
      return close();
    }
    switch (hs.current()) {
      case nbd::handshake::state::negotiating:
      case nbd::handshake::state::starttls:
        flush();
        want_more();
        return;
      case nbd::handshake::state::closed:
        // Send what is queued (the ACK of an abort), then hang up.
        if (sending()) return flush();
        close();
        return;
      case nbd::handshake::state::transmission:
        if (send_p) return;  // the hand-off waits for the send in progress
        handoff();
        return;
    }
  }

  void handoff() {
    handed = true;
    closing = true;
    if (timer_p) r().cancel(&timer_c);
    nbd_negotiated n;
    n.fd = fd;
    fd = -1;
    n.export_name = hs.export_name();
    n.mode = hs.mode();
    n.contexts = hs.contexts();
    n.pending_out = out.substr(out_sent) + next_out;
    n.leftover_in.assign(reinterpret_cast<const char*>(in.data()), in_len);
    n.tls = std::move(tls);
    srv->h_.negotiated(std::move(n));
    maybe_free();
  }

  void close() {
    if (closing) return maybe_free();
    closing = true;
    if (fd >= 0) ::shutdown(fd, SHUT_RDWR);
    if (timer_p) r().cancel(&timer_c);
    maybe_free();
  }

  void maybe_free() {
    if (recv_p || send_p || timer_p) return;
    if (fd >= 0) ::close(fd);
    fd = -1;
    nbd_server* s = srv;
    bool h = handed;
    // Freed on a later turn: this may run inside one of its own completions.
    s->main_.post([s, self = this, h] { s->conn_freed(self, h); });
    recv_p = send_p = timer_p = true;  // no further maybe_free
  }
};

result<std::unique_ptr<nbd_server>> nbd_server::start(iothread& main, nbd_server_settings s, hooks h, bool hold) {
  std::unique_ptr<nbd_server> srv(new nbd_server(main, std::move(s), std::move(h)));
  const auto& a = srv->s_.addr;
  std::string type = str_of(a, "type");
  int backlog = srv->s_.max_connections > 0 ? int(srv->s_.max_connections) : SOMAXCONN;
  if (type == "unix") {
    auto fd = listen_unix(a, backlog, srv->unlink_path_);
    if (!fd) return std::unexpected(fd.error());
    srv->listen_fd_ = *fd;
  } else if (type == "inet") {
    auto fd = listen_inet(a, backlog);
    if (!fd) return std::unexpected(fd.error());
    srv->listen_fd_ = *fd;
  } else if (type == "vsock") {
    auto fd = listen_vsock(a, backlog);
    if (!fd) return std::unexpected(fd.error());
    srv->listen_fd_ = *fd;
  } else if (type == "fd") {
    std::string str = str_of(a, "str");
    // Only a descriptor inherited at start-up may be named: a number chosen over QMP must never
    // let blockd take over one of its own sockets.
    auto inherited = take_inherited_fd(str);
    if (!inherited) return std::unexpected(inherited.error());
    int fd = ::fcntl(*inherited, F_DUPFD_CLOEXEC, 3);
    if (fd < 0) return fail("Invalid file descriptor number '" + str + "'");
    int acc = 0;
    socklen_t l = sizeof acc;
    if (::getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &acc, &l) < 0 || !acc) {
      ::close(fd);
      return fail("file descriptor " + str + " is not a listening socket; pass a socket that listen() was called on");
    }
    srv->listen_fd_ = fd;
  } else {
    return fail("socket family '" + type + "' is not available for the NBD server; use unix, inet, vsock or fd");
  }
  srv->accept_cb_.self = srv.get();
  srv->held_ = hold;
  srv->arm_accept();
  return srv;
}

nbd_server::~nbd_server() {
  if (listen_fd_ >= 0) ::close(listen_fd_);
  if (!unlink_path_.empty()) ::unlink(unlink_path_.c_str());
}

void nbd_server::accept_cb::complete(int res) { self->on_accept(res); }

void nbd_server::accept_clients() {
  held_ = false;
  arm_accept();
}

void nbd_server::arm_accept() {
  if (accept_pending_ || stopping_ || held_) return;
  // At the limit the server stops accepting: new clients wait in the listen backlog (QEMU does the same).
  if (s_.max_connections > 0 && clients_ >= s_.max_connections) return;
  accept_pending_ = true;
  main_.reactor().accept(listen_fd_, &accept_cb_);
}

void nbd_server::on_accept(int res) {
  accept_pending_ = false;
  if (stopping_) {
    if (res >= 0) ::close(res);
    return check_stopped();
  }
  if (res >= 0) {
    int one = 1;
    (void)::setsockopt(res, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);  // fails harmlessly on unix sockets
    ++clients_;
    conn* c = new conn(this, res);
    conns_.push_back(c);
    c->begin();
  } else if (res != -EAGAIN && res != -EINTR && res != -ECONNABORTED && res != -EMFILE && res != -ENFILE) {
    return;  // the listener is broken: stop accepting rather than spin
  }
  arm_accept();
}

void nbd_server::conn_freed(conn* c, bool handed_off) {
  std::erase(conns_, c);
  delete c;
  // A handed-off client keeps its slot until client_gone().
  if (!handed_off) {
    --clients_;
    arm_accept();
  }
  check_stopped();
}

void nbd_server::client_gone() {
  if (clients_ > 0) --clients_;
  arm_accept();
}

void nbd_server::stop(std::function<void()> done) {
  stopping_ = true;
  stopped_ = std::move(done);
  if (accept_pending_) main_.reactor().cancel(&accept_cb_);
  for (conn* c : std::vector<conn*>(conns_)) c->close();
  check_stopped();
}

void nbd_server::check_stopped() {
  if (!stopping_ || accept_pending_ || !conns_.empty() || !stopped_) return;
  auto f = std::move(stopped_);
  stopped_ = nullptr;
  f();
}

}  // namespace blockd

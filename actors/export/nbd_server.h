// The NBD server's listener and handshakes: accepts through the main iothread's reactor and negotiates; main iothread only.
#pragma once
#include <boost/json.hpp>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "actors/runtime/iothread.h"
#include "protocol/error.h"
#include "protocol/nbd/handshake.h"
#include "protocol/tls/tls.h"

namespace blockd {

struct nbd_server_settings {
  boost::json::object addr;  // a flat SocketAddress (the --nbd-server form)
  uint32_t max_connections = 100;  // 0 = unlimited; QSD 10.2's default
  uint32_t handshake_max_seconds = 10;  // 0 = no limit
};

// A client that finished its handshake. The receiver owns `fd` from then on and must call
// nbd_server::client_gone() once that client is closed, or at once if it refuses it.
struct nbd_negotiated {
  int fd = -1;
  std::string export_name;
  nbd::reply_mode mode = nbd::reply_mode::simple;
  nbd::meta_selection contexts;
  std::string pending_out;  // on the wire as it is (ciphertext under TLS)
  std::string leftover_in;  // plaintext the handshake did not consume
  std::shared_ptr<tls::session> tls;  // set when the client negotiated TLS; the connection keeps it
};

class nbd_server {
 public:
  struct hooks {
    const nbd::export_catalog* catalog = nullptr;
    std::function<void(nbd_negotiated)> negotiated;
    // tls-creds: TLS is required of every client. tls-authz: the check of the peer's identity,
    // resolved by the supervisor when a client uses it (main iothread).
    std::shared_ptr<const tls::credentials> tls_creds;
    tls::authorizer tls_authz;
  };

  // Binds and listens (errors in QEMU's words). Accepting starts at once, or with accept_clients()
  // when `hold` is set: during start-up the socket exists but clients wait in the backlog until
  // every --export is in place, as with QSD, whose main loop runs only after the command line.
  static result<std::unique_ptr<nbd_server>> start(iothread& main, nbd_server_settings s, hooks h, bool hold = false);
  void accept_clients();
  ~nbd_server();

  const nbd_server_settings& settings() const { return s_; }
  // A transmission client handed out by `negotiated` is gone: its slot is free again.
  void client_gone();
  // Stops listening and drops clients still negotiating; `done` runs once nothing of the listener
  // is in flight any more (the object may then be destroyed).
  void stop(std::function<void()> done);

 private:
  struct conn;
  struct accept_cb final : io::completion {
    nbd_server* self = nullptr;
    void complete(int res) override;
  };

  nbd_server(iothread& main, nbd_server_settings s, hooks h) : main_(main), s_(std::move(s)), h_(std::move(h)) {}
  void arm_accept();
  void on_accept(int res);
  void conn_freed(conn* c, bool handed_off);
  void check_stopped();

  iothread& main_;
  nbd_server_settings s_;
  hooks h_;
  int listen_fd_ = -1;
  std::string unlink_path_;
  accept_cb accept_cb_;
  bool accept_pending_ = false;
  bool stopping_ = false;
  bool held_ = false;
  std::function<void()> stopped_;
  size_t clients_ = 0;  // negotiating plus transmitting
  std::vector<conn*> conns_;
};

}  // namespace blockd

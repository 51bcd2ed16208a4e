// TLS credentials (QEMU's tls-creds-x509/-psk/-anon) and an in-memory gnutls server session; plain C++, the thread that owns the session.
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "protocol/error.h"

namespace blockd::tls {

enum class kind { x509, psk, anon };

// The properties of a tls-creds-* object, as object-add takes them.
struct creds_options {
  kind type = kind::x509;
  std::string dir;
  bool server = false;        // endpoint=server (QEMU's default endpoint is client)
  bool verify_peer = true;
  std::string priority;       // empty: QEMU's default "NORMAL"
  bool sanity_check = true;   // x509 only
  std::string username;       // psk only
  // x509 only: the password of an encrypted (PKCS#8) private key, from the passwordid secret.
  std::optional<std::string> key_password;
};

// Loaded credentials, immutable once made: sessions on any thread share them (gnutls allows
// concurrent use of one credentials structure by many sessions).
class credentials {
 public:
  // Loads the files QEMU expects in `dir` and checks them as QEMU does, in QEMU's words.
  static result<std::shared_ptr<credentials>> load(const creds_options& o);
  ~credentials();
  credentials(const credentials&) = delete;
  credentials& operator=(const credentials&) = delete;

  const creds_options& options() const { return o_; }

 private:
  friend class session;
  credentials() = default;
  creds_options o_;
  void* x509_ = nullptr;      // gnutls_certificate_credentials_t
  void* psk_server_ = nullptr;  // gnutls_psk_server_credentials_t
  void* psk_client_ = nullptr;  // gnutls_psk_client_credentials_t
  void* anon_server_ = nullptr;  // gnutls_anon_server_credentials_t
  void* anon_client_ = nullptr;  // gnutls_anon_client_credentials_t
  void* dh_ = nullptr;        // gnutls_dh_params_t
};

// Decides whether a peer identity (x509 DN or PSK username) may connect: the tls-authz object,
// looked up when used. An error (no such object) refuses the client with that text.
using authorizer = std::function<result<bool>(const std::string& identity)>;

// One TLS session whose record layer runs in memory: the caller feeds ciphertext read from its
// socket and sends what out() holds; nothing here touches a file descriptor or blocks.
class session {
 public:
  static result<std::unique_ptr<session>> server(std::shared_ptr<const credentials> c, authorizer authz);
  // The client side (socket chardevs with server=off): the server's certificate is checked
  // against the CA and `hostname` (when not empty), as QEMU's client sessions do.
  static result<std::unique_ptr<session>> client(std::shared_ptr<const credentials> c, const std::string& hostname);
  ~session();
  session(const session&) = delete;
  session& operator=(const session&) = delete;

  // Ciphertext from the socket.
  void feed(const uint8_t* p, size_t n);

  enum class status { again, done, failed };
  // Advances the handshake with what was fed; once done, checks the peer (verify-peer, tls-authz).
  // On failed, error() says why in QEMU's words.
  status handshake();

  // Plaintext received: > 0 bytes copied, 0 when more ciphertext is needed, -1 when the peer
  // closed the session or it failed (error() then says why; empty for a clean close).
  long read(uint8_t* dst, size_t cap);
  // Plaintext decrypted and buffered in the session, ready for read() without more input.
  size_t pending() const;
  // Encrypts plaintext into out(); false if the session failed.
  bool write(const uint8_t* p, size_t n);
  // Queues the close_notify alert.
  void bye();

  // Ciphertext waiting to be sent; the caller sends a prefix and erases it with consumed().
  const std::string& out() const { return out_; }
  void consumed(size_t n) { out_.erase(0, n); }
  // Moves all of out() to the end of `dst`: by swapping buffers when `dst` is empty, so a connection
  // that alternates the two reuses their memory instead of copying every record once more.
  void take_out(std::string& dst) {
    if (dst.empty()) dst.swap(out_);
    else dst.append(out_);
    out_.clear();
  }

  const std::string& error() const { return err_; }
  // The authenticated peer: the client certificate's DN or the PSK username (empty if none).
  const std::string& peer_name() const { return peer_; }

 private:
  session() = default;
  bool check_peer();
  void set_transport();
  static long pull(void* self, void* buf, size_t n);
  static long push(void* self, const void* buf, size_t n);

  std::shared_ptr<const credentials> creds_;
  authorizer authz_;
  void* s_ = nullptr;  // gnutls_session_t
  std::vector<uint8_t> in_;
  size_t in_pos_ = 0;
  std::string out_;
  std::string err_;
  std::string peer_;
  bool done_ = false;
  bool client_ = false;
  std::string hostname_;  // client: the name the server's certificate must match
};

// The tls-authz objects: authz-simple (one identity) and authz-list (ordered rules, exact or glob).
struct authz_rule {
  std::string match;
  bool allow = false;
  bool glob = false;
  bool format_given = false;  // qom-get of authz-list rules shows "format" only when it was set
};
struct authz_policy {
  std::vector<authz_rule> rules;
  bool default_allow = false;
  bool allows(const std::string& identity) const;
};

}  // namespace blockd::tls

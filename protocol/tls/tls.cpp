// gnutls behind QEMU's TLS object semantics: credential loading and checks with QEMU's texts, and a memory-only server session; plain C++, the owning thread.
#include "protocol/tls/tls.h"

#include <fnmatch.h>
#include <gnutls/gnutls.h>
#include <gnutls/x509.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <ctime>
#include <fstream>
#include <sstream>

namespace blockd::tls {
namespace {

std::string gerr(int rc) { return gnutls_strerror(rc); }

// QEMU's qcrypto_tls_creds_get_path: a required file that cannot be read is an error; a missing
// optional one is simply not used (empty result).
result<std::string> cred_path(const creds_options& o, const char* name, bool required) {
  std::string p = o.dir + "/" + name;
  if (::access(p.c_str(), R_OK) < 0) {
    if (errno == ENOENT && !required) return std::string();
    return fail("Unable to access credentials " + p + ": " + std::strerror(errno));
  }
  return p;
}

result<std::string> read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return fail("Failed to open file \"" + path + "\": " + std::strerror(errno));
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// The DH parameters QEMU loads from dh-params.pem when present. Without the file QEMU generates
// fresh ones (seconds of CPU); blockd uses gnutls's RFC 7919 groups instead, which clients accept alike.
result<void*> load_dh(const std::string& path) {
  if (path.empty()) return nullptr;
  auto text = read_file(path);
  if (!text) return std::unexpected(text.error());
  gnutls_dh_params_t dh;
  gnutls_dh_params_init(&dh);
  gnutls_datum_t d{reinterpret_cast<unsigned char*>(text->data()), unsigned(text->size())};
  int rc = gnutls_dh_params_import_pkcs3(dh, &d, GNUTLS_X509_FMT_PEM);
  if (rc < 0) {
    gnutls_dh_params_deinit(dh);
    return fail("Unable to load DH parameters from " + path + ": " + gerr(rc));
  }
  return static_cast<void*>(dh);
}

// ---- QEMU's x509 sanity checks (crypto/tlscredsx509.c), texts verbatim ----------------------

const char* role(bool server, bool ca) { return ca ? "CA" : server ? "server" : "client"; }

result<void> check_times(gnutls_x509_crt_t c, const std::string& file, bool server, bool ca) {
  time_t now = std::time(nullptr);
  if (gnutls_x509_crt_get_expiration_time(c) < now)
    return fail(std::string("The ") + role(server, ca) + " certificate " + file + " has expired");
  if (gnutls_x509_crt_get_activation_time(c) > now)
    return fail(std::string("The ") + role(server, ca) + " certificate " + file + " is not yet active");
  return {};
}

result<void> check_basic_constraints(gnutls_x509_crt_t c, const std::string& file, bool server, bool ca) {
  int st = gnutls_x509_crt_get_basic_constraints(c, nullptr, nullptr, nullptr);
  if (st > 0) {
    if (!ca)
      return fail("The certificate " + file + " basic constraints show a CA, but we need one for a " +
                  (server ? "server" : "client"));
  } else if (st == 0) {
    if (ca) return fail("The certificate " + file + " basic constraints do not show a CA");
  } else if (st == GNUTLS_E_REQUESTED_DATA_NOT_AVAILABLE) {
    if (ca) return fail("The certificate " + file + " is missing basic constraints for a CA");
  } else {
    return fail("Unable to query certificate " + file + " basic constraints: " + gerr(st));
  }
  return {};
}

result<void> check_key_usage(gnutls_x509_crt_t c, const std::string& file, bool ca) {
  unsigned usage = 0, critical = 0;
  int st = gnutls_x509_crt_get_key_usage(c, &usage, &critical);
  if (st < 0) {
    if (st != GNUTLS_E_REQUESTED_DATA_NOT_AVAILABLE)
      return fail("Unable to query certificate " + file + " key usage: " + gerr(st));
    usage = ca ? GNUTLS_KEY_KEY_CERT_SIGN : GNUTLS_KEY_DIGITAL_SIGNATURE;
  }
  if (ca) {
    if (!(usage & GNUTLS_KEY_KEY_CERT_SIGN) && critical)
      return fail("Certificate " + file + " usage does not permit certificate signing");
  } else {
    // Key encipherment is not required: ECDSA certificates never have it, and QEMU stopped asking
    // for it (10.0.7 and later; the 7.2 oracle accepts such certificates too).
    if (!(usage & GNUTLS_KEY_DIGITAL_SIGNATURE) && critical)
      return fail("Certificate " + file + " usage does not permit digital signature");
  }
  return {};
}

result<void> check_key_purpose(gnutls_x509_crt_t c, const std::string& file, bool server) {
  bool allow_server = false, allow_client = false;
  unsigned critical = 0;
  for (unsigned i = 0;; ++i) {
    char buf[256];
    size_t size = sizeof buf;
    int st = gnutls_x509_crt_get_key_purpose_oid(c, i, buf, &size, &critical);
    if (st == GNUTLS_E_REQUESTED_DATA_NOT_AVAILABLE) {
      // No purposes at all allow both uses.
      if (i == 0) allow_server = allow_client = true;
      break;
    }
    if (st < 0) return fail("Unable to query certificate " + file + " key purpose: " + gerr(st));
    std::string oid(buf);
    if (oid == GNUTLS_KP_TLS_WWW_SERVER) allow_server = true;
    else if (oid == GNUTLS_KP_TLS_WWW_CLIENT) allow_client = true;
    else if (oid == GNUTLS_KP_ANY) allow_server = allow_client = true;
  }
  if (server && !allow_server && critical)
    return fail("Certificate " + file + " purpose does not allow use with a TLS server");
  if (!server && !allow_client && critical)
    return fail("Certificate " + file + " purpose does not allow use with a TLS client");
  return {};
}

result<void> check_cert(gnutls_x509_crt_t c, const std::string& file, bool server, bool ca) {
  if (auto r = check_times(c, file, server, ca); !r) return r;
  if (auto r = check_basic_constraints(c, file, server, ca); !r) return r;
  if (auto r = check_key_usage(c, file, ca); !r) return r;
  if (!ca)
    if (auto r = check_key_purpose(c, file, server); !r) return r;
  return {};
}

result<void> sanity_check(bool server, const std::string& cacert, const std::string& certfile) {
  constexpr unsigned max_certs = 16;
  gnutls_x509_crt_t cert = nullptr;
  gnutls_x509_crt_t cas[max_certs];
  unsigned ncas = 0;
  struct cleanup {
    gnutls_x509_crt_t& cert;
    gnutls_x509_crt_t* cas;
    unsigned& n;
    ~cleanup() {
      if (cert) gnutls_x509_crt_deinit(cert);
      for (unsigned i = 0; i < n; ++i) gnutls_x509_crt_deinit(cas[i]);
    }
  } guard{cert, cas, ncas};
  if (!certfile.empty() && ::access(certfile.c_str(), R_OK) == 0) {
    auto text = read_file(certfile);
    if (!text) return std::unexpected(text.error());
    gnutls_x509_crt_init(&cert);
    gnutls_datum_t d{reinterpret_cast<unsigned char*>(text->data()), unsigned(text->size())};
    int rc = gnutls_x509_crt_import(cert, &d, GNUTLS_X509_FMT_PEM);
    if (rc < 0)
      return fail(std::string("Unable to import ") + (server ? "server" : "client") + " certificate " + certfile +
                  ": " + gerr(rc));
  }
  if (::access(cacert.c_str(), R_OK) == 0) {
    auto text = read_file(cacert);
    if (!text) return std::unexpected(text.error());
    gnutls_datum_t d{reinterpret_cast<unsigned char*>(text->data()), unsigned(text->size())};
    unsigned n = max_certs;
    int rc = gnutls_x509_crt_list_import(cas, &n, &d, GNUTLS_X509_FMT_PEM, GNUTLS_X509_CRT_LIST_IMPORT_FAIL_IF_EXCEED);
    if (rc < 0) return fail("Unable to import CA certificate list " + cacert);
    ncas = n;
  }
  if (cert)
    if (auto r = check_cert(cert, certfile, server, false); !r) return r;
  for (unsigned i = 0; i < ncas; ++i)
    if (auto r = check_cert(cas[i], cacert, server, true); !r) return r;
  if (cert && ncas) {
    unsigned status = 0;
    int rc = gnutls_x509_crt_list_verify(&cert, 1, cas, ncas, nullptr, 0, 0, &status);
    if (rc < 0)
      return fail("Unable to verify certificate " + certfile + " against " + cacert + ": " + gerr(rc));
    if (status) {
      const char* why = "Invalid certificate";
      if (status & GNUTLS_CERT_INVALID) why = "The certificate is not trusted";
      if (status & GNUTLS_CERT_SIGNER_NOT_FOUND) why = "The certificate hasn't got a known issuer";
      if (status & GNUTLS_CERT_REVOKED) why = "The certificate has been revoked";
      if (status & GNUTLS_CERT_INSECURE_ALGORITHM) why = "The certificate uses an insecure algorithm";
      return fail("Our own certificate " + certfile + " failed validation against " + cacert + ": " + why);
    }
  }
  return {};
}

// QEMU's tls-creds-psk client check: the username (default "qemu") must be in keys.psk.
result<std::string> psk_key_for(const std::string& file, const std::string& user) {
  auto text = read_file(file);
  if (!text) return std::unexpected(text.error());
  std::istringstream in(*text);
  std::string line;
  while (std::getline(in, line)) {
    auto colon = line.find(':');
    if (colon != std::string::npos && line.substr(0, colon) == user) return line.substr(colon + 1);
  }
  return fail("Username " + user + " not found in PSK file " + file);
}

}  // namespace

credentials::~credentials() {
  if (x509_) gnutls_certificate_free_credentials(static_cast<gnutls_certificate_credentials_t>(x509_));
  if (psk_server_) gnutls_psk_free_server_credentials(static_cast<gnutls_psk_server_credentials_t>(psk_server_));
  if (psk_client_) gnutls_psk_free_client_credentials(static_cast<gnutls_psk_client_credentials_t>(psk_client_));
  if (anon_server_) gnutls_anon_free_server_credentials(static_cast<gnutls_anon_server_credentials_t>(anon_server_));
  if (anon_client_) gnutls_anon_free_client_credentials(static_cast<gnutls_anon_client_credentials_t>(anon_client_));
  if (dh_) gnutls_dh_params_deinit(static_cast<gnutls_dh_params_t>(dh_));
}

result<std::shared_ptr<credentials>> credentials::load(const creds_options& o) {
  std::shared_ptr<credentials> c(new credentials());
  c->o_ = o;
  if (o.type == kind::anon) {
    // Anonymous credentials need no directory; a server may still take dh-params.pem from one.
    if (o.server) {
      std::string dh;
      if (!o.dir.empty()) {
        auto p = cred_path(o, "dh-params.pem", false);
        if (!p) return std::unexpected(p.error());
        dh = *p;
      }
      auto d = load_dh(dh);
      if (!d) return std::unexpected(d.error());
      c->dh_ = *d;
      gnutls_anon_server_credentials_t a;
      int rc = gnutls_anon_allocate_server_credentials(&a);
      if (rc < 0) return fail("Cannot allocate credentials: " + gerr(rc));
      c->anon_server_ = a;
      if (c->dh_) gnutls_anon_set_server_dh_params(a, static_cast<gnutls_dh_params_t>(c->dh_));
      else gnutls_anon_set_server_known_dh_params(a, GNUTLS_SEC_PARAM_MEDIUM);
    } else {
      gnutls_anon_client_credentials_t a;
      int rc = gnutls_anon_allocate_client_credentials(&a);
      if (rc < 0) return fail("Cannot allocate credentials: " + gerr(rc));
      c->anon_client_ = a;
    }
    return c;
  }
  if (o.dir.empty()) return fail("Missing 'dir' property value");
  if (o.type == kind::psk) {
    if (o.server) {
      if (!o.username.empty()) return fail("username should not be set when endpoint=server");
      auto file = cred_path(o, "keys.psk", true);
      if (!file) return std::unexpected(file.error());
      auto dhp = cred_path(o, "dh-params.pem", false);
      if (!dhp) return std::unexpected(dhp.error());
      auto d = load_dh(*dhp);
      if (!d) return std::unexpected(d.error());
      c->dh_ = *d;
      gnutls_psk_server_credentials_t p;
      int rc = gnutls_psk_allocate_server_credentials(&p);
      if (rc < 0) return fail("Cannot allocate credentials: " + gerr(rc));
      c->psk_server_ = p;
      rc = gnutls_psk_set_server_credentials_file(p, file->c_str());
      if (rc < 0) return fail("Cannot set PSK server credentials: " + gerr(rc));
      if (c->dh_) gnutls_psk_set_server_dh_params(p, static_cast<gnutls_dh_params_t>(c->dh_));
      else gnutls_psk_set_server_known_dh_params(p, GNUTLS_SEC_PARAM_MEDIUM);
    } else {
      std::string user = o.username.empty() ? "qemu" : o.username;
      auto file = cred_path(o, "keys.psk", true);
      if (!file) return std::unexpected(file.error());
      auto key = psk_key_for(*file, user);
      if (!key) return std::unexpected(key.error());
      gnutls_psk_client_credentials_t p;
      int rc = gnutls_psk_allocate_client_credentials(&p);
      if (rc < 0) return fail("Cannot allocate credentials: " + gerr(rc));
      c->psk_client_ = p;
      gnutls_datum_t k{reinterpret_cast<unsigned char*>(key->data()), unsigned(key->size())};
      rc = gnutls_psk_set_client_credentials(p, user.c_str(), &k, GNUTLS_PSK_KEY_HEX);
      if (rc < 0) return fail("Cannot set PSK client credentials: " + gerr(rc));
    }
    return c;
  }
  // x509: the file set QEMU looks for, in QEMU's order (the first missing required one is named).
  std::string cacert, cacrl, cert, key, dhparams;
  auto take = [&](const char* name, bool required, std::string& out) -> result<void> {
    auto p = cred_path(o, name, required);
    if (!p) return std::unexpected(p.error());
    out = *p;
    return {};
  };
  if (o.server) {
    for (auto r : {take("ca-cert.pem", true, cacert), take("ca-crl.pem", false, cacrl),
                   take("server-cert.pem", true, cert), take("server-key.pem", true, key),
                   take("dh-params.pem", false, dhparams)})
      if (!r) return std::unexpected(r.error());
  } else {
    for (auto r : {take("ca-cert.pem", true, cacert), take("ca-crl.pem", false, cacrl),
                   take("client-cert.pem", false, cert), take("client-key.pem", false, key)})
      if (!r) return std::unexpected(r.error());
  }
  if (o.sanity_check)
    if (auto r = sanity_check(o.server, cacert, cert); !r) return std::unexpected(r.error());
  gnutls_certificate_credentials_t x;
  int rc = gnutls_certificate_allocate_credentials(&x);
  if (rc < 0) return fail("Cannot allocate credentials: " + gerr(rc));
  c->x509_ = x;
  rc = gnutls_certificate_set_x509_trust_file(x, cacert.c_str(), GNUTLS_X509_FMT_PEM);
  if (rc < 0) return fail("Cannot load CA certificate '" + cacert + "': " + gerr(rc));
  if (!cert.empty() && !key.empty()) {
    rc = gnutls_certificate_set_x509_key_file2(x, cert.c_str(), key.c_str(), GNUTLS_X509_FMT_PEM,
                                               o.key_password ? o.key_password->c_str() : nullptr, 0);
    if (rc < 0) return fail("Cannot load certificate '" + cert + "' & key '" + key + "': " + gerr(rc));
  }
  if (!cacrl.empty()) {
    rc = gnutls_certificate_set_x509_crl_file(x, cacrl.c_str(), GNUTLS_X509_FMT_PEM);
    if (rc < 0) return fail("Cannot load CRL '" + cacrl + "': " + gerr(rc));
  }
  if (o.server) {
    auto d = load_dh(dhparams);
    if (!d) return std::unexpected(d.error());
    c->dh_ = *d;
    if (c->dh_) gnutls_certificate_set_dh_params(x, static_cast<gnutls_dh_params_t>(c->dh_));
    else gnutls_certificate_set_known_dh_params(x, GNUTLS_SEC_PARAM_MEDIUM);
  }
  return c;
}

// ---- session ----------------------------------------------------------------------------------

long session::pull(void* self, void* buf, size_t n) {
  auto* s = static_cast<session*>(self);
  size_t avail = s->in_.size() - s->in_pos_;
  if (avail == 0) {
    // Not a failure: the record layer waits for the caller to feed more.
    gnutls_transport_set_errno(static_cast<gnutls_session_t>(s->s_), EAGAIN);
    return -1;
  }
  size_t k = std::min(avail, n);
  std::memcpy(buf, s->in_.data() + s->in_pos_, k);
  s->in_pos_ += k;
  if (s->in_pos_ == s->in_.size()) {
    s->in_.clear();
    s->in_pos_ = 0;
  }
  return long(k);
}

long session::push(void* self, const void* buf, size_t n) {
  static_cast<session*>(self)->out_.append(static_cast<const char*>(buf), n);
  return long(n);
}

namespace {

// gnutls_init, then the priority QEMU builds: the configured one plus the key exchanges each
// credential type needs. `out` holds the session from init on (the session object frees it).
result<void> init_with_priority(void*& out, unsigned flags, const creds_options& o) {
  gnutls_session_t h;
  int rc = gnutls_init(&h, flags | GNUTLS_NONBLOCK);
  if (rc < 0) return fail("Cannot initialize TLS session: " + gerr(rc));
  out = h;
  std::string prio = o.priority.empty() ? "NORMAL" : o.priority;
  if (o.type == kind::psk) prio += ":+ECDHE-PSK:+DHE-PSK:+PSK";
  if (o.type == kind::anon) prio += ":+ANON-DH:+ANON-ECDH";
  rc = gnutls_priority_set_direct(h, prio.c_str(), nullptr);
  if (rc < 0) return fail("Unable to set TLS session priority " + prio + ": " + gerr(rc));
  return {};
}

}  // namespace

result<std::unique_ptr<session>> session::server(std::shared_ptr<const credentials> c, authorizer authz) {
  std::unique_ptr<session> s(new session());
  s->creds_ = std::move(c);
  s->authz_ = std::move(authz);
  if (auto r = init_with_priority(s->s_, GNUTLS_SERVER, s->creds_->options()); !r) return std::unexpected(r.error());
  auto h = static_cast<gnutls_session_t>(s->s_);
  int rc = 0;
  if (s->creds_->x509_) {
    rc = gnutls_credentials_set(h, GNUTLS_CRD_CERTIFICATE, s->creds_->x509_);
    // The certificate is requested, not required: a client without one fails the peer check with QEMU's text.
    if (rc >= 0) gnutls_certificate_server_set_request(h, GNUTLS_CERT_REQUEST);
  } else if (s->creds_->psk_server_) {
    rc = gnutls_credentials_set(h, GNUTLS_CRD_PSK, s->creds_->psk_server_);
  } else if (s->creds_->anon_server_) {
    rc = gnutls_credentials_set(h, GNUTLS_CRD_ANON, s->creds_->anon_server_);
  } else {
    return fail("Expected TLS credentials for a server endpoint");
  }
  if (rc < 0) return fail("Cannot set session credentials: " + gerr(rc));
  s->set_transport();
  return s;
}

void session::set_transport() {
  auto h = static_cast<gnutls_session_t>(s_);
  gnutls_transport_set_ptr(h, this);
  gnutls_transport_set_pull_function(h, [](gnutls_transport_ptr_t p, void* b, size_t n) -> ssize_t {
    return pull(p, b, n);
  });
  gnutls_transport_set_push_function(h, [](gnutls_transport_ptr_t p, const void* b, size_t n) -> ssize_t {
    return push(p, b, n);
  });
}

result<std::unique_ptr<session>> session::client(std::shared_ptr<const credentials> c, const std::string& hostname) {
  std::unique_ptr<session> s(new session());
  s->creds_ = std::move(c);
  s->client_ = true;
  s->hostname_ = hostname;
  if (auto r = init_with_priority(s->s_, GNUTLS_CLIENT, s->creds_->options()); !r) return std::unexpected(r.error());
  auto h = static_cast<gnutls_session_t>(s->s_);
  int rc = 0;
  if (s->creds_->x509_) {
    rc = gnutls_credentials_set(h, GNUTLS_CRD_CERTIFICATE, s->creds_->x509_);
    if (rc >= 0 && !hostname.empty()) gnutls_server_name_set(h, GNUTLS_NAME_DNS, hostname.data(), hostname.size());
  } else if (s->creds_->psk_client_) {
    rc = gnutls_credentials_set(h, GNUTLS_CRD_PSK, s->creds_->psk_client_);
  } else if (s->creds_->anon_client_) {
    rc = gnutls_credentials_set(h, GNUTLS_CRD_ANON, s->creds_->anon_client_);
  } else {
    return fail("Expected TLS credentials for a client endpoint");
  }
  if (rc < 0) return fail("Cannot set session credentials: " + gerr(rc));
  s->set_transport();
  return s;
}

session::~session() {
  if (s_) gnutls_deinit(static_cast<gnutls_session_t>(s_));
}

void session::feed(const uint8_t* p, size_t n) { in_.insert(in_.end(), p, p + n); }

session::status session::handshake() {
  if (done_) return status::done;
  auto h = static_cast<gnutls_session_t>(s_);
  for (;;) {
    int rc = gnutls_handshake(h);
    if (rc == GNUTLS_E_AGAIN || rc == GNUTLS_E_INTERRUPTED) return status::again;
    if (rc < 0 && !gnutls_error_is_fatal(rc)) continue;  // warning alerts: go on
    if (rc < 0) {
      err_ = gerr(rc);
      return status::failed;
    }
    break;
  }
  if (!check_peer()) return status::failed;
  done_ = true;
  return status::done;
}

// QEMU's qcrypto_tls_session_check_credentials for a server, texts verbatim.
bool session::check_peer() {
  auto h = static_cast<gnutls_session_t>(s_);
  const auto& o = creds_->options();
  auto authorize = [&]() -> bool {
    if (!authz_) return true;
    auto ok = authz_(peer_);
    if (!ok) {
      err_ = ok.error().desc;
      return false;
    }
    if (!*ok) {
      err_ = "TLS x509 authz check for " + peer_ + " is denied";
      return false;
    }
    return true;
  };
  if (o.type == kind::anon) return true;
  if (client_ && o.type == kind::psk) return true;
  if (o.type == kind::psk) {
    const char* user = gnutls_psk_server_get_username(h);
    if (!user) {
      err_ = "No PSK username available";
      return false;
    }
    peer_ = user;
    return authorize();
  }
  if (!o.verify_peer) return true;
  unsigned st = 0;
  int rc = gnutls_certificate_verify_peers2(h, &st);
  if (rc < 0) {
    err_ = "Verify failed: " + gerr(rc);
    return false;
  }
  if (st) {
    const char* why = "Invalid certificate";
    if (st & GNUTLS_CERT_INVALID) why = "The certificate is not trusted";
    if (st & GNUTLS_CERT_SIGNER_NOT_FOUND) why = "The certificate hasn't got a known issuer";
    if (st & GNUTLS_CERT_REVOKED) why = "The certificate has been revoked";
    if (st & GNUTLS_CERT_INSECURE_ALGORITHM) why = "The certificate uses an insecure algorithm";
    err_ = why;
    return false;
  }
  unsigned n = 0;
  const gnutls_datum_t* certs = gnutls_certificate_get_peers(h, &n);
  if (!certs || n == 0) {
    err_ = "No certificate peers";
    return false;
  }
  time_t now = std::time(nullptr);
  for (unsigned i = 0; i < n; ++i) {
    gnutls_x509_crt_t c;
    if (gnutls_x509_crt_init(&c) < 0) {
      err_ = "Cannot initialize certificate";
      return false;
    }
    struct guard {
      gnutls_x509_crt_t c;
      ~guard() { gnutls_x509_crt_deinit(c); }
    } g{c};
    if (gnutls_x509_crt_import(c, &certs[i], GNUTLS_X509_FMT_DER) < 0) {
      err_ = "Cannot import certificate";
      return false;
    }
    if (gnutls_x509_crt_get_expiration_time(c) < now) {
      err_ = "The certificate has expired";
      return false;
    }
    if (gnutls_x509_crt_get_activation_time(c) > now) {
      err_ = "The certificate is not yet activated";
      return false;
    }
    if (i == 0 && client_) {
      // QEMU's client check: the server's certificate names the host it connected to.
      if (!hostname_.empty() && !gnutls_x509_crt_check_hostname(c, hostname_.c_str())) {
        err_ = "Certificate does not match the hostname " + hostname_;
        return false;
      }
      continue;
    }
    if (i == 0) {
      // The DN as gnutls_x509_crt_get_dn prints it, the identity QEMU hands to tls-authz.
      size_t size = 0;
      rc = gnutls_x509_crt_get_dn(c, nullptr, &size);
      std::string dn(size, '\0');
      rc = gnutls_x509_crt_get_dn(c, dn.data(), &size);
      if (rc < 0) {
        err_ = "Cannot get client distinguished name: " + gerr(rc);
        return false;
      }
      dn.resize(size);
      peer_ = dn;
      if (!authorize()) return false;
    }
  }
  return true;
}

long session::read(uint8_t* dst, size_t cap) {
  auto h = static_cast<gnutls_session_t>(s_);
  size_t got = 0;
  while (got < cap) {
    ssize_t rc = gnutls_record_recv(h, dst + got, cap - got);
    if (rc > 0) {
      got += size_t(rc);
      continue;
    }
    if (rc == GNUTLS_E_AGAIN || rc == GNUTLS_E_INTERRUPTED) {
      // After a post-handshake message (a TLS 1.3 session ticket) gnutls answers AGAIN even when
      // more records wait in the input fed: go on while input is left, or they would sit there.
      if (in_pos_ < in_.size()) continue;
      break;
    }
    if (rc == 0) return got ? long(got) : -1;  // close_notify: a clean end
    if (!gnutls_error_is_fatal(int(rc))) continue;  // a warning alert or a refused renegotiation
    if (got) return long(got);  // the failure shows on the next call
    err_ = gerr(int(rc));
    return -1;
  }
  return long(got);
}

size_t session::pending() const { return gnutls_record_check_pending(static_cast<gnutls_session_t>(s_)); }

bool session::write(const uint8_t* p, size_t n) {
  auto h = static_cast<gnutls_session_t>(s_);
  while (n > 0) {
    // The push function never refuses, so each call takes one record's worth at once.
    ssize_t rc = gnutls_record_send(h, p, n);
    if (rc == GNUTLS_E_AGAIN || rc == GNUTLS_E_INTERRUPTED) continue;
    if (rc < 0) {
      err_ = gerr(int(rc));
      return false;
    }
    p += rc;
    n -= size_t(rc);
  }
  return true;
}

void session::bye() { gnutls_bye(static_cast<gnutls_session_t>(s_), GNUTLS_SHUT_WR); }

bool authz_policy::allows(const std::string& identity) const {
  // QEMU's authz-list: the first matching rule decides; none matching, the default policy does.
  for (const auto& r : rules) {
    bool hit = r.glob ? ::fnmatch(r.match.c_str(), identity.c_str(), 0) == 0 : r.match == identity;
    if (hit) return r.allow;
  }
  return default_allow;
}

}  // namespace blockd::tls

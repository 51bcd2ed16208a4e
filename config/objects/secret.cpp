// secret and secret_keyring objects (see secret.h); plain C++, the model's thread.
#include "config/objects/secret.h"

#include <gnutls/crypto.h>
#include <gnutls/gnutls.h>
#include <linux/keyctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>

#include "config/qom/model.h"
#include "config/qom/type_registry.h"
#include "protocol/qmp/base64.h"

namespace blockd::qom {
namespace {

const std::vector<std::string> formats = {"raw", "base64"};

}  // namespace

result<std::string> base64_decode(const std::string& in) {
  // QSD 7.2 accepts what GLib decodes ("aGVsbG8", "YWJj=") and calls a NUL an invalid character.
  return qmp::glib_base64_decode(in);
}

result<std::string> aes256_cbc_decrypt(const std::string& key, const std::string& iv, const std::string& ct) {
  if (ct.size() % 16 != 0)
    return fail("Length " + std::to_string(ct.size()) + " must be a multiple of block size 16");
  gnutls_datum_t k{reinterpret_cast<unsigned char*>(const_cast<char*>(key.data())), static_cast<unsigned>(key.size())};
  gnutls_datum_t v{reinterpret_cast<unsigned char*>(const_cast<char*>(iv.data())), static_cast<unsigned>(iv.size())};
  gnutls_cipher_hd_t h;
  int rc = gnutls_cipher_init(&h, GNUTLS_CIPHER_AES_256_CBC, &k, &v);
  if (rc < 0) return fail(std::string("Cannot initialize cipher: ") + gnutls_strerror(rc));
  std::string pt(ct.size(), '\0');
  rc = ct.empty() ? 0 : gnutls_cipher_decrypt2(h, ct.data(), ct.size(), pt.data(), pt.size());
  gnutls_cipher_deinit(h);
  if (rc < 0) return fail(std::string("Cannot decrypt data: ") + gnutls_strerror(rc));
  if (!pt.empty()) {
    // QEMU trusts the last byte as the padding length, checking only that it fits.
    size_t padding = static_cast<unsigned char>(pt.back());
    if (padding > pt.size())
      return fail("Incorrect number of padding bytes (" + std::to_string(padding) + ") found on decrypted data");
    pt.resize(pt.size() - padding);
  }
  return pt;
}

result<std::string> secret_bytes(model& m, const std::string& id) {
  object* o = m.find(id);
  if (!o) return fail("No secret with id '" + id + "'");
  auto* s = dynamic_cast<secret_common*>(o);
  if (!s) return fail("Object with id '" + id + "' is not a secret");
  return s->bytes();
}

// ---- secret_common -------------------------------------------------------------------------------

result<void> secret_common::read_common(const boost::json::object& props) {
  if (auto r = opt_enum(props, "format", formats, format_); !r) return r;
  if (auto r = opt_string(props, "keyid", keyid_); !r) return r;
  return opt_string(props, "iv", iv_);
}

result<boost::json::value> secret_common::get(const std::string& prop) const {
  if (prop == "format") return boost::json::value(format_);
  if (prop == "keyid") return boost::json::value(keyid_);
  if (prop == "iv") return boost::json::value(iv_);
  return object::get(prop);
}

result<void> secret_common::set(const std::string& prop, const boost::json::value& v) {
  // As in QSD the values are stored but the loaded secret does not change.
  if (prop == "format") {
    auto s = json_enum(v, prop, formats);
    if (!s) return std::unexpected(s.error());
    format_ = *s;
    return {};
  }
  if (prop == "keyid" || prop == "iv") {
    auto s = json_string(v, prop);
    if (!s) return std::unexpected(s.error());
    (prop == "keyid" ? keyid_ : iv_) = *s;
    return {};
  }
  return object::set(prop, v);
}

result<void> secret_common::complete(model& m) {
  auto raw = load_raw();
  if (!raw) return std::unexpected(raw.error());
  if (keyid_.empty()) {
    // Without keyid the iv is ignored, as in QSD.
    if (format_ == "base64") {
      auto d = base64_decode(*raw);
      if (!d) return std::unexpected(d.error());
      bytes_ = std::move(*d);
    } else {
      bytes_ = std::move(*raw);
    }
    return {};
  }
  auto key = secret_bytes(m, keyid_);
  if (!key) return std::unexpected(key.error());
  if (key->size() != 32) return fail("Key should be 32 bytes in length");
  if (iv_.empty()) return fail("IV is required to decrypt secret");
  auto iv = base64_decode(iv_);
  if (!iv) return std::unexpected(iv.error());
  if (iv->size() != 16) return fail("IV should be 16 bytes in length not " + std::to_string(iv->size()));
  std::string ct = *raw;
  if (format_ == "base64") {
    auto d = base64_decode(ct);
    if (!d) return std::unexpected(d.error());
    ct = std::move(*d);
  }
  auto pt = aes256_cbc_decrypt(*key, *iv, ct);
  if (!pt) return std::unexpected(pt.error());
  bytes_ = std::move(*pt);
  return {};
}

// ---- secret ----------------------------------------------------------------------------------------

result<std::unique_ptr<object>> secret_object::make(const std::string&, const boost::json::object& props) {
  auto o = std::make_unique<secret_object>();
  if (auto r = o->read_common(props); !r) return std::unexpected(r.error());
  std::string s;
  if (props.contains("data")) {
    if (auto r = opt_string(props, "data", s); !r) return std::unexpected(r.error());
    o->data_ = s;
  }
  if (props.contains("file")) {
    if (auto r = opt_string(props, "file", s); !r) return std::unexpected(r.error());
    o->file_ = s;
  }
  return o;
}

result<boost::json::value> secret_object::get(const std::string& prop) const {
  if (prop == "data") return boost::json::value(data_.value_or(""));
  if (prop == "file") return boost::json::value(file_.value_or(""));
  return secret_common::get(prop);
}

result<void> secret_object::set(const std::string& prop, const boost::json::value& v) {
  if (prop == "data" || prop == "file") {
    auto s = json_string(v, prop);
    if (!s) return std::unexpected(s.error());
    (prop == "data" ? data_ : file_) = *s;
    return {};
  }
  return secret_common::set(prop, v);
}

result<std::string> secret_object::load_raw() {
  if (data_ && file_) return fail("'file' and 'data' are mutually exclusive");
  if (data_) return *data_;
  if (!file_) return fail("Either 'file' or 'data' must be provided");
  std::ifstream f(*file_, std::ios::binary);
  if (!f) {
    // GLib's g_file_get_contents text, which QSD passes on.
    int e = errno;
    return fail("Unable to read " + *file_ + ": Failed to open file \u201c" + *file_ + "\u201d: " + std::strerror(e));
  }
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// ---- secret_keyring ----------------------------------------------------------------------------------

result<std::unique_ptr<object>> secret_keyring_object::make(const std::string&, const boost::json::object& props) {
  auto o = std::make_unique<secret_keyring_object>();
  if (auto r = o->read_common(props); !r) return std::unexpected(r.error());
  auto* v = props.if_contains("serial");
  if (!v) return fail("Parameter 'serial' is missing");
  auto n = json_int(*v, "serial");
  if (!n) return std::unexpected(n.error());
  if (*n < INT32_MIN || *n > INT32_MAX) return fail("Parameter 'serial' expects int32_t");
  o->serial_ = static_cast<int32_t>(*n);
  return o;
}

result<boost::json::value> secret_keyring_object::get(const std::string& prop) const {
  if (prop == "serial") return boost::json::value(static_cast<int64_t>(serial_));
  return secret_common::get(prop);
}

result<void> secret_keyring_object::set(const std::string& prop, const boost::json::value& v) {
  if (prop == "serial") {
    auto n = json_int(v, prop);
    if (!n) return std::unexpected(n.error());
    if (*n < INT32_MIN || *n > INT32_MAX) return fail("Parameter 'serial' expects int32_t");
    serial_ = static_cast<int32_t>(*n);
    return {};
  }
  return secret_common::set(prop, v);
}

result<std::string> secret_keyring_object::load_raw() {
  // keyctl(KEYCTL_READ) straight through the syscall: no libkeyutils needed.
  auto err = [&](int e) {
    char hex[16];
    std::snprintf(hex, sizeof hex, "%08x", static_cast<uint32_t>(serial_));
    return fail(std::string("Unable to read serial key ") + hex + ": " + std::strerror(e));
  };
  long n = ::syscall(SYS_keyctl, KEYCTL_READ, static_cast<long>(serial_), nullptr, 0L);
  if (n < 0) return err(errno);
  std::string buf(static_cast<size_t>(n), '\0');
  for (;;) {
    long m = ::syscall(SYS_keyctl, KEYCTL_READ, static_cast<long>(serial_), buf.data(), static_cast<long>(buf.size()));
    if (m < 0) return err(errno);
    if (static_cast<size_t>(m) <= buf.size()) {
      buf.resize(static_cast<size_t>(m));
      return buf;
    }
    buf.resize(static_cast<size_t>(m));  // the key grew meanwhile
  }
}

void register_secret_types(type_registry& r) {
  // The deprecated "loaded" property of QSD 7.2 is gone in 10.2, the compatibility target.
  r.add({.name = "secret_common",
         .parent = "object",
         .abstract = true,
         .interfaces = {"user-creatable"},
         .properties = {{.name = "iv", .type = "string"},
                        {.name = "keyid", .type = "string"},
                        {.name = "format", .type = "QCryptoSecretFormat"}}});
  r.add({.name = "secret",
         .parent = "secret_common",
         .properties = {{.name = "file", .type = "string"}, {.name = "data", .type = "string"}},
         .make = secret_object::make});
  r.add({.name = "secret_keyring",
         .parent = "secret_common",
         .properties = {{.name = "serial", .type = "int32_t"}},
         .make = secret_keyring_object::make});
}

}  // namespace blockd::qom

// secret and secret_keyring objects: payload loading, base64 and AES-256-CBC decryption with QSD's texts; plain C++, the model's thread.
#pragma once
#include <string>

#include "config/qom/object.h"

namespace blockd::qom {

class model;

// QEMU's secret_common: the payload comes from a subclass (inline data, a file, the kernel
// keyring) and is then decoded (format=base64) or decrypted with another secret (keyid + iv).
class secret_common : public object {
 public:
  // The decoded secret, for other objects (tls-creds-x509 passwordid, luks key-secret, ...).
  const std::string& bytes() const { return bytes_; }

  result<boost::json::value> get(const std::string& prop) const override;
  result<void> set(const std::string& prop, const boost::json::value& v) override;
  result<void> complete(model& m) override;

  // The common setter phase (format, keyid, iv).
  result<void> read_common(const boost::json::object& props);

 protected:
  // The raw payload, before decoding or decryption.
  virtual result<std::string> load_raw() = 0;

  std::string format_ = "raw";
  std::string keyid_, iv_;

 private:
  std::string bytes_;
};

class secret_object final : public secret_common {
 public:
  static result<std::unique_ptr<object>> make(const std::string& id, const boost::json::object& props);
  result<boost::json::value> get(const std::string& prop) const override;
  result<void> set(const std::string& prop, const boost::json::value& v) override;

 protected:
  result<std::string> load_raw() override;

 private:
  std::optional<std::string> data_, file_;
};

class secret_keyring_object final : public secret_common {
 public:
  static result<std::unique_ptr<object>> make(const std::string& id, const boost::json::object& props);
  result<boost::json::value> get(const std::string& prop) const override;
  result<void> set(const std::string& prop, const boost::json::value& v) override;

 protected:
  result<std::string> load_raw() override;

 private:
  int32_t serial_ = 0;
};

// The bytes of the secret `id`, with QSD's lookup texts ("No secret with id 'X'",
// "Object with id 'X' is not a secret").
result<std::string> secret_bytes(model& m, const std::string& id);

// QEMU's base64 decoder rules: "Base64 data contains invalid characters" otherwise.
result<std::string> base64_decode(const std::string& in);
// AES-256-CBC with PKCS#7-style padding removal as QEMU does it (exposed for tests).
result<std::string> aes256_cbc_decrypt(const std::string& key, const std::string& iv, const std::string& ciphertext);

}  // namespace blockd::qom

// tls-creds-x509/-psk/-anon and tls-cipher-suites objects holding loaded gnutls credentials; plain C++, the model's thread (the credentials themselves are shareable).
#pragma once
#include <memory>

#include "config/qom/object.h"
#include "protocol/tls/tls.h"

namespace blockd::qom {

class model;

class tls_creds_object : public object {
 public:
  static factory make_for(const std::string& type);
  // The loaded credentials (null for tls-cipher-suites).
  std::shared_ptr<const tls::credentials> credentials() const { return creds_; }
  const tls::creds_options& options() const { return o_; }
  bool is_server() const { return o_.server; }

  result<boost::json::value> get(const std::string& prop) const override;
  result<void> set(const std::string& prop, const boost::json::value& v) override;
  result<void> complete(model& m) override;

 private:
  std::string type_;  // the QOM type (its properties differ)
  tls::creds_options o_;
  std::string passwordid_;
  std::shared_ptr<const tls::credentials> creds_;
};

// The credentials of tls-creds object `id` for an endpoint, with QSD's lookup texts (NBD server
// tls-creds, nbd client driver).
result<std::shared_ptr<const tls::credentials>> tls_credentials(model& m, const std::string& id, bool server);

}  // namespace blockd::qom

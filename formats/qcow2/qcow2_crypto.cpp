// qcow2 encryption glue (see qcow2_crypto.h): LUKS header area inside image clusters, legacy AES keys, option checks with QSD's texts; any thread, no shared state.
#include "formats/qcow2/qcow2_crypto.h"

#include <algorithm>
#include <cstring>

#include "formats/luks/luks_driver.h"

namespace blockd::qcow2 {

boost::json::object crypto_ctx::info() const {
  if (method != crypt_luks) return boost::json::object{{"format", "aes"}};
  boost::json::object o = luks::info_json(luks, false);
  o["format"] = "luks";
  return o;
}

std::vector<uint8_t> encode_crypto_ext(const crypto_ext& e) {
  std::vector<uint8_t> b(16);
  put_be64(b.data(), e.offset);
  put_be64(b.data() + 8, e.length);
  return b;
}

result<crypto_ext> find_crypto_ext(const header& h, uint64_t file_len) {
  for (auto& e : h.extensions) {
    if (e.type != ext_crypto_header) continue;
    if (e.data.size() != 16) return fail("Invalid encryption header extension length " + std::to_string(e.data.size()));
    crypto_ext c{be64(e.data.data()), be64(e.data.data() + 8)};
    // The header area is whole clusters of the image file, named by the refcounts like any metadata.
    if (c.offset & (h.cluster_size() - 1)) return fail("Encryption header offset '" + std::to_string(c.offset) + "' is not cluster aligned");
    if (c.length < luks::header_size || c.length > max_crypto_header || c.offset > file_len ||
        c.length > file_len - c.offset)
      return fail("Encryption header length '" + std::to_string(c.length) + "' is invalid");
    return c;
  }
  return fail("Could not read encryption header: the image has no encryption header extension");
}

namespace {

std::string opt_format(const boost::json::object* enc) {
  if (!enc) return "";
  auto* f = enc->if_contains("format");
  return f && f->is_string() ? std::string(f->get_string()) : "";
}

result<std::string> secret_of(const boost::json::object* enc, const block::object_refs& objects) {
  auto* ks = enc ? enc->if_contains("key-secret") : nullptr;
  if (!ks || !ks->is_string()) return fail("Parameter 'encrypt.key-secret' is required for cipher");
  return objects.secret_bytes(std::string(ks->get_string()));
}

}  // namespace

result<std::unique_ptr<crypto_ctx>> open_crypto(const header& h, const boost::json::object& options,
                                                const block::object_refs& objects, const file_read_fn& read_at,
                                                uint64_t file_len, bool writable) {
  const boost::json::object* enc = nullptr;
  if (auto* v = options.if_contains("encrypt"); v && v->is_object()) enc = &v->as_object();
  const char* have = h.crypt_method == crypt_luks ? "luks" : "aes";
  std::string want = opt_format(enc);
  if (!want.empty() && want != have)
    return fail(std::string("Header reported '") + have + "' encryption format but options specify '" + want + "'");
  auto secret = secret_of(enc, objects);
  if (!secret) return std::unexpected(secret.error());
  auto c = std::make_unique<crypto_ctx>();
  c->method = h.crypt_method;
  c->secret = *secret;

  if (h.crypt_method == crypt_aes) {
    // QEMU 10.2's stance on the old method; blockd can still read such an image to convert it.
    if (writable)
      return fail("Use of AES-CBC encrypted qcow2 images is no longer supported in system emulators: open it with "
                  "read-only=true and convert it with qemu-img to an unencrypted qcow2 or a LUKS encrypted image");
    // The legacy key: the secret's first 16 bytes, zero padded; AES-128-CBC, plain64 IVs of the guest sector.
    uint8_t key[16] = {};
    std::memcpy(key, secret->data(), std::min<size_t>(secret->size(), sizeof key));
    auto ci = luks::sector_cipher::make(luks::cipher_alg::aes_128, luks::cipher_mode::cbc, luks::ivgen_alg::plain64,
                                        std::nullopt, key, sizeof key);
    if (!ci) return std::unexpected(ci.error());
    c->cipher = std::move(*ci);
    return c;
  }

  auto ext = find_crypto_ext(h, file_len);
  if (!ext) return std::unexpected(ext.error());
  c->hdr_offset = ext->offset;
  c->hdr_length = ext->length;
  std::vector<uint8_t> first(luks::header_size);
  if (int rc = read_at(ext->offset, first.size(), first.data()); rc < 0)
    return fail(std::string("Could not read encryption header: ") + std::strerror(-rc));
  // Key material lies inside the header area: slot offsets are bounded by its length.
  auto lh = luks::parse_header(first.data(), first.size(), ext->length, false);
  if (!lh) return std::unexpected(lh.error());
  auto key = luks::unlock(*lh, *secret, [&](uint64_t off, size_t len, uint8_t* out) {
    if (off > ext->length || len > ext->length - off) return -EINVAL;
    return read_at(ext->offset + off, len, out);
  });
  if (!key) return std::unexpected(key.error());
  auto ci = luks::sector_cipher::make(lh->alg, lh->mode, lh->ivgen, lh->ivhash, key->data(), key->size());
  if (!ci) return std::unexpected(ci.error());
  c->cipher = std::move(*ci);
  c->luks = std::move(*lh);
  return c;
}

result<std::vector<uint8_t>> new_luks_area(const boost::json::object& enc, const block::object_refs& objects) {
  auto secret = secret_of(&enc, objects);
  if (!secret) return std::unexpected(secret.error());
  std::vector<uint8_t> master, slot0;
  // Not detached: the payload offset is the header area's end, as QEMU records it for qcow2 (unused there).
  auto h = luks::new_header(enc, *secret, master, slot0, false);
  if (!h) return std::unexpected(h.error());
  std::vector<uint8_t> area(luks::header_area_bytes(*h), 0);
  auto hb = h->serialize();
  std::memcpy(area.data(), hb.data(), hb.size());
  uint64_t at = uint64_t(h->slots[0].key_offset) * luks::sector;
  std::memcpy(area.data() + at, slot0.data(), slot0.size());
  return area;
}

}  // namespace blockd::qcow2

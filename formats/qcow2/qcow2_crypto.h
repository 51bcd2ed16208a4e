// qcow2 encryption glue over formats/luks: the crypto context of an open image (LUKS or legacy AES), its query view, and the LUKS header area for a new image; any thread, no shared state.
#pragma once
#include <boost/json.hpp>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "formats/luks/luks_crypto.h"
#include "formats/luks/luks_header.h"
#include "formats/qcow2/layout.h"
#include "protocol/error.h"
#include "storage/block/object_refs.h"

namespace blockd::qcow2 {

inline constexpr uint32_t crypt_aes = 1;
inline constexpr uint32_t crypt_luks = 2;
// The biggest LUKS1 header area blockd accepts in an image (QEMU's largest: 64-byte keys, 8 slots,
// about 2 MiB); a hostile extension cannot make open read more.
inline constexpr uint64_t max_crypto_header = 16u << 20;
inline constexpr uint64_t crypt_sector = 512;

// The unlocked cipher of an encrypted image. Data is encrypted in 512-byte sectors; LUKS numbers a
// sector's IV by its host (image file) offset, the legacy AES method by its guest offset.
struct crypto_ctx {
  uint32_t method = 0;
  std::unique_ptr<luks::sector_cipher> cipher;
  luks::header luks;              // LUKS: the header as parsed (queries)
  uint64_t hdr_offset = 0, hdr_length = 0;  // LUKS: the header area in the image file
  std::string secret;  // the open's key-secret: amend unlocks with it when its options name none

  uint64_t iv_sector(uint64_t host, uint64_t guest) const { return (method == crypt_luks ? host : guest) / crypt_sector; }
  // `len` whole sectors at `buf`, which live at host offset `host` and guest offset `guest`.
  void encrypt(uint64_t host, uint64_t guest, uint8_t* buf, size_t len) const {
    cipher->encrypt(iv_sector(host, guest), buf, len);
  }
  void decrypt(uint64_t host, uint64_t guest, uint8_t* buf, size_t len) const {
    cipher->decrypt(iv_sector(host, guest), buf, len);
  }
  // QCryptoBlockInfo as qcow2's format-specific "encrypt" member shows it.
  boost::json::object info() const;
};

// The "Full disk encryption header pointer" extension: where the LUKS header area lies.
struct crypto_ext {
  uint64_t offset = 0, length = 0;
};
std::vector<uint8_t> encode_crypto_ext(const crypto_ext& e);
result<crypto_ext> find_crypto_ext(const header& h, uint64_t file_len);

// Reads `len` bytes of the image file at `off` into `out` (0 or -errno).
using file_read_fn = std::function<int(uint64_t off, size_t len, uint8_t* out)>;

// Opens the crypto of image `h` (crypt_method != 0) with BlockdevOptionsQcow2 `options` ("encrypt"),
// QSD's texts for a missing secret, a format mismatch and a wrong secret. `read_at` reads the image
// file (the LUKS header area); `writable`: the legacy AES method is refused for writing.
result<std::unique_ptr<crypto_ctx>> open_crypto(const header& h, const boost::json::object& options,
                                                const block::object_refs& objects, const file_read_fn& read_at,
                                                uint64_t file_len, bool writable);

// For blockdev-create: the whole LUKS header area (header, slot 0 for the secret, the other slots
// zero) from QCryptoBlockCreateOptions `enc`, as it goes into the image's clusters.
result<std::vector<uint8_t>> new_luks_area(const boost::json::object& enc, const block::object_refs& objects);

}  // namespace blockd::qcow2

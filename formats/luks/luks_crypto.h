// LUKS crypto building blocks over nettle (algorithm names, hashes, PBKDF2, the AF splitter, the per-sector cipher); any thread, no shared state.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "protocol/error.h"

struct nettle_cipher;
struct nettle_hash;

namespace blockd::luks {

// QAPI's QCryptoCipherAlgo / QCryptoCipherMode / QCryptoIVGenAlgo / QCryptoHashAlgo values this build has.
enum class cipher_alg { aes_128, aes_192, aes_256, cast5_128, serpent_128, serpent_192, serpent_256, twofish_128, twofish_192, twofish_256 };
enum class cipher_mode { ecb, cbc, xts, ctr };
enum class ivgen_alg { plain, plain64, essiv };
enum class hash_alg { md5, sha1, sha224, sha256, sha384, sha512, ripemd160 };

// QAPI names ("aes-256", "xts", "plain64", "sha256") both ways.
const char* name_of(cipher_alg a);
const char* name_of(cipher_mode m);
const char* name_of(ivgen_alg g);
const char* name_of(hash_alg h);
std::optional<cipher_alg> parse_cipher_alg(const std::string& s);
std::optional<cipher_mode> parse_cipher_mode(const std::string& s);
std::optional<ivgen_alg> parse_ivgen_alg(const std::string& s);
std::optional<hash_alg> parse_hash_alg(const std::string& s);

// The LUKS header's cipher family name ("aes", "cast5", "serpent", "twofish") and back, with the key length.
const char* family_of(cipher_alg a);
std::optional<cipher_alg> cipher_from_family(const std::string& family, size_t key_bytes);
size_t key_len(cipher_alg a);    // bytes of one key (xts uses two)
size_t block_len(cipher_alg a);  // cipher block bytes
size_t digest_len(hash_alg h);

// Message digest of `data`.
std::vector<uint8_t> digest(hash_alg h, const uint8_t* data, size_t len);

// PBKDF2-HMAC-<h> (RFC 8018) of `pw` and `salt`, `iters` rounds, filling `out`.
void pbkdf2_hmac(hash_alg h, const uint8_t* pw, size_t pwlen, const uint8_t* salt, size_t saltlen, uint64_t iters,
            uint8_t* out, size_t outlen);
// How many PBKDF2 iterations for an `outlen`-byte key take `ms` milliseconds on this machine (QEMU's
// way: time growing runs until one lasts long enough, then scale). Never below 1.
uint64_t pbkdf2_iters_for(hash_alg h, size_t outlen, uint64_t ms);

// The LUKS anti-forensic splitter: `key` (len bytes) spread over `stripes` stripes (len*stripes bytes
// in `out`) with random fill, and merged back.
void af_split(hash_alg h, const uint8_t* key, size_t len, uint32_t stripes, uint8_t* out);
void af_merge(hash_alg h, const uint8_t* split, size_t len, uint32_t stripes, uint8_t* out);

// Cryptographically random bytes (getrandom).
void random_bytes(uint8_t* out, size_t len);

// Encrypts and decrypts whole 512-byte sectors in place, the IV of each from its sector number as
// QEMU's ivgen does (plain: low 32 bits, plain64: 64 bits, essiv: E_{hash(key)}(sector)), little endian.
class sector_cipher {
 public:
  static constexpr size_t sector_size = 512;
  // `key` is the whole master key (two halves for xts). Errors name the unsupported combination.
  static result<std::unique_ptr<sector_cipher>> make(cipher_alg alg, cipher_mode mode, ivgen_alg ivgen,
                                                     std::optional<hash_alg> ivhash, const uint8_t* key,
                                                     size_t keylen);
  ~sector_cipher();
  // `len` is a multiple of sector_size; `sector` numbers the first one.
  void encrypt(uint64_t sector, uint8_t* buf, size_t len);
  void decrypt(uint64_t sector, uint8_t* buf, size_t len);

 private:
  sector_cipher() = default;
  void iv_for(uint64_t sector, uint8_t* iv) const;
  void run(bool enc, uint64_t sector, uint8_t* buf, size_t len);
  const nettle_cipher* c_ = nullptr;
  cipher_mode mode_ = cipher_mode::xts;
  ivgen_alg ivgen_ = ivgen_alg::plain64;
  std::vector<uint8_t> enc_, dec_, twk_;  // key schedules (tweak key for xts)
  const nettle_cipher* essiv_c_ = nullptr;
  std::vector<uint8_t> essiv_;            // essiv key schedule
  size_t block_ = 16;
};

}  // namespace blockd::luks

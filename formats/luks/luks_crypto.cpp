// LUKS crypto over nettle: names, digests, PBKDF2, AF split/merge, the sector cipher with QEMU's IV rules; any thread, no shared state.
#include "formats/luks/luks_crypto.h"

#include <nettle/cbc.h>
#include <nettle/ctr.h>
#include <nettle/hmac.h>
#include <nettle/memxor.h>
#include <nettle/nettle-meta.h>
#include <nettle/pbkdf2.h>
#include <nettle/xts.h>
#include <sys/random.h>
#include <sys/resource.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <stdexcept>

namespace blockd::luks {
namespace {

struct cipher_row {
  cipher_alg alg;
  const char* name;
  const char* family;
  const nettle_cipher* c;
};
const cipher_row cipher_rows[] = {
    {cipher_alg::aes_128, "aes-128", "aes", &nettle_aes128},
    {cipher_alg::aes_192, "aes-192", "aes", &nettle_aes192},
    {cipher_alg::aes_256, "aes-256", "aes", &nettle_aes256},
    {cipher_alg::cast5_128, "cast5-128", "cast5", &nettle_cast128},
    {cipher_alg::serpent_128, "serpent-128", "serpent", &nettle_serpent128},
    {cipher_alg::serpent_192, "serpent-192", "serpent", &nettle_serpent192},
    {cipher_alg::serpent_256, "serpent-256", "serpent", &nettle_serpent256},
    {cipher_alg::twofish_128, "twofish-128", "twofish", &nettle_twofish128},
    {cipher_alg::twofish_192, "twofish-192", "twofish", &nettle_twofish192},
    {cipher_alg::twofish_256, "twofish-256", "twofish", &nettle_twofish256},
};
const cipher_row& row(cipher_alg a) {
  for (auto& r : cipher_rows)
    if (r.alg == a) return r;
  throw std::logic_error("cipher");
}

struct hash_row {
  hash_alg alg;
  const char* name;
  const nettle_hash* h;
};
const hash_row hash_rows[] = {
    {hash_alg::md5, "md5", &nettle_md5},          {hash_alg::sha1, "sha1", &nettle_sha1},
    {hash_alg::sha224, "sha224", &nettle_sha224}, {hash_alg::sha256, "sha256", &nettle_sha256},
    {hash_alg::sha384, "sha384", &nettle_sha384}, {hash_alg::sha512, "sha512", &nettle_sha512},
    {hash_alg::ripemd160, "ripemd160", &nettle_ripemd160},
};
const nettle_hash* nh(hash_alg h) {
  for (auto& r : hash_rows)
    if (r.alg == h) return r.h;
  throw std::logic_error("hash");
}

const char* mode_names[] = {"ecb", "cbc", "xts", "ctr"};
const char* ivgen_names[] = {"plain", "plain64", "essiv"};

// HMAC over a nettle hash chosen at run time, in the shape nettle's generic pbkdf2() calls.
struct hmac_ctx {
  const nettle_hash* h;
  std::vector<uint8_t> outer, inner, state;
  hmac_ctx(const nettle_hash* hh, const uint8_t* key, size_t keylen)
      : h(hh), outer(hh->context_size), inner(hh->context_size), state(hh->context_size) {
    hmac_set_key(outer.data(), inner.data(), state.data(), h, keylen, key);
  }
  static void update(void* p, size_t len, const uint8_t* data) {
    auto* c = static_cast<hmac_ctx*>(p);
    hmac_update(c->state.data(), c->h, len, data);
  }
  static void digest(void* p, size_t len, uint8_t* out) {
    auto* c = static_cast<hmac_ctx*>(p);
    hmac_digest(c->outer.data(), c->inner.data(), c->state.data(), c->h, len, out);
  }
};

// LUKS's diffusion step: each digest-sized piece replaced by H(be32(index) || piece).
void diffuse(const nettle_hash* h, uint8_t* buf, size_t len) {
  std::vector<uint8_t> ctx(h->context_size);
  size_t ds = h->digest_size;
  std::vector<uint8_t> out(ds);
  for (size_t i = 0, off = 0; off < len; ++i, off += ds) {
    size_t n = std::min(ds, len - off);
    uint8_t be[4] = {uint8_t(i >> 24), uint8_t(i >> 16), uint8_t(i >> 8), uint8_t(i)};
    h->init(ctx.data());
    h->update(ctx.data(), 4, be);
    h->update(ctx.data(), n, buf + off);
    h->digest(ctx.data(), ds, out.data());
    std::memcpy(buf + off, out.data(), n);
  }
}

int64_t cpu_ms() {
  rusage ru{};
  getrusage(RUSAGE_THREAD, &ru);
  return int64_t(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1000 + (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1000;
}

}  // namespace

const char* name_of(cipher_alg a) { return row(a).name; }
const char* name_of(cipher_mode m) { return mode_names[int(m)]; }
const char* name_of(ivgen_alg g) { return ivgen_names[int(g)]; }
const char* name_of(hash_alg h) {
  for (auto& r : hash_rows)
    if (r.alg == h) return r.name;
  return "?";
}
std::optional<cipher_alg> parse_cipher_alg(const std::string& s) {
  for (auto& r : cipher_rows)
    if (s == r.name) return r.alg;
  return std::nullopt;
}
std::optional<cipher_mode> parse_cipher_mode(const std::string& s) {
  for (int i = 0; i < 4; ++i)
    if (s == mode_names[i]) return cipher_mode(i);
  return std::nullopt;
}
std::optional<ivgen_alg> parse_ivgen_alg(const std::string& s) {
  for (int i = 0; i < 3; ++i)
    if (s == ivgen_names[i]) return ivgen_alg(i);
  return std::nullopt;
}
std::optional<hash_alg> parse_hash_alg(const std::string& s) {
  for (auto& r : hash_rows)
    if (s == r.name) return r.alg;
  return std::nullopt;
}
const char* family_of(cipher_alg a) { return row(a).family; }
std::optional<cipher_alg> cipher_from_family(const std::string& family, size_t key_bytes) {
  for (auto& r : cipher_rows)
    if (family == r.family && r.c->key_size == key_bytes) return r.alg;
  return std::nullopt;
}
size_t key_len(cipher_alg a) { return row(a).c->key_size; }
size_t block_len(cipher_alg a) { return row(a).c->block_size; }
size_t digest_len(hash_alg h) { return nh(h)->digest_size; }

std::vector<uint8_t> digest(hash_alg h, const uint8_t* data, size_t len) {
  const nettle_hash* n = nh(h);
  std::vector<uint8_t> ctx(n->context_size), out(n->digest_size);
  n->init(ctx.data());
  n->update(ctx.data(), len, data);
  n->digest(ctx.data(), out.size(), out.data());
  return out;
}

void pbkdf2_hmac(hash_alg h, const uint8_t* pw, size_t pwlen, const uint8_t* salt, size_t saltlen, uint64_t iters,
            uint8_t* out, size_t outlen) {
  hmac_ctx c(nh(h), pw, pwlen);
  // The header stores 32-bit counts, so `iters` always fits nettle's unsigned.
  nettle_pbkdf2(&c, hmac_ctx::update, hmac_ctx::digest, c.h->digest_size, unsigned(std::max<uint64_t>(iters, 1)), saltlen,
           salt, outlen, out);
}

uint64_t pbkdf2_iters_for(hash_alg h, size_t outlen, uint64_t ms) {
  uint8_t pw[32], salt[32];
  random_bytes(pw, sizeof pw);
  random_bytes(salt, sizeof salt);
  std::vector<uint8_t> out(outlen);
  uint64_t iters = 1 << 15;
  int64_t took = 0;
  // Grow the run until one lasts over half a second of CPU time, as QEMU measures it.
  for (;;) {
    int64_t t0 = cpu_ms();
    pbkdf2_hmac(h, pw, sizeof pw, salt, sizeof salt, iters, out.data(), outlen);
    took = cpu_ms() - t0;
    if (took > 500) break;
    if (took == 0) iters *= 2;
    else iters = iters * 1000 / uint64_t(took);
    if (iters > UINT32_MAX) iters = UINT32_MAX;
    if (iters == UINT32_MAX && took > 0) break;
  }
  uint64_t per_s = iters * 1000 / uint64_t(std::max<int64_t>(took, 1));
  uint64_t n = per_s * ms / 1000;
  return n ? n : 1;
}

void random_bytes(uint8_t* out, size_t len) {
  while (len) {
    ssize_t n = getrandom(out, len, 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw std::runtime_error("getrandom failed");
    }
    out += n;
    len -= size_t(n);
  }
}

void af_split(hash_alg h, const uint8_t* key, size_t len, uint32_t stripes, uint8_t* out) {
  const nettle_hash* n = nh(h);
  std::vector<uint8_t> buf(len, 0);
  for (uint32_t i = 0; i + 1 < stripes; ++i) {
    uint8_t* s = out + size_t(i) * len;
    random_bytes(s, len);
    memxor(buf.data(), s, len);
    diffuse(n, buf.data(), len);
  }
  uint8_t* last = out + size_t(stripes - 1) * len;
  memxor3(last, buf.data(), key, len);
}

void af_merge(hash_alg h, const uint8_t* split, size_t len, uint32_t stripes, uint8_t* out) {
  const nettle_hash* n = nh(h);
  std::vector<uint8_t> buf(len, 0);
  for (uint32_t i = 0; i + 1 < stripes; ++i) {
    memxor(buf.data(), split + size_t(i) * len, len);
    diffuse(n, buf.data(), len);
  }
  memxor3(out, buf.data(), split + size_t(stripes - 1) * len, len);
}

result<std::unique_ptr<sector_cipher>> sector_cipher::make(cipher_alg alg, cipher_mode mode, ivgen_alg ivgen,
                                                           std::optional<hash_alg> ivhash, const uint8_t* key,
                                                           size_t keylen) {
  const nettle_cipher* c = row(alg).c;
  size_t want = mode == cipher_mode::xts ? 2 * c->key_size : c->key_size;
  if (keylen != want)
    return fail("Cipher " + std::string(name_of(alg)) + " mode " + name_of(mode) + " needs a " + std::to_string(want) +
                " byte key, not " + std::to_string(keylen));
  if (mode == cipher_mode::xts && c->block_size != 16)
    return fail("Cipher " + std::string(name_of(alg)) + " does not support mode xts");
  std::unique_ptr<sector_cipher> s(new sector_cipher);
  s->c_ = c;
  s->mode_ = mode;
  s->ivgen_ = ivgen;
  s->block_ = c->block_size;
  s->enc_.resize(c->context_size);
  s->dec_.resize(c->context_size);
  c->set_encrypt_key(s->enc_.data(), key);
  c->set_decrypt_key(s->dec_.data(), key);
  if (mode == cipher_mode::xts) {
    s->twk_.resize(c->context_size);
    c->set_encrypt_key(s->twk_.data(), key + c->key_size);
  }
  if (ivgen == ivgen_alg::essiv) {
    if (!ivhash) return fail("Missing IV generator hash algorithm for essiv");
    // The ESSIV cipher is the data cipher's family keyed with H(master key): its key length is the digest's.
    size_t dl = digest_len(*ivhash);
    auto ec = cipher_from_family(family_of(alg), dl);
    if (!ec) {
      std::string fam = family_of(alg);
      if (fam == "aes") return fail("No AES cipher with key size " + std::to_string(dl) + " available");
      if (fam == "serpent") return fail("No Serpent cipher with key size " + std::to_string(dl) + " available");
      if (fam == "twofish") return fail("No Twofish cipher with key size " + std::to_string(dl) + " available");
      return fail("Cipher " + std::string(name_of(alg)) + " not supported with essiv");
    }
    auto salt = digest(*ivhash, key, keylen);
    s->essiv_c_ = row(*ec).c;
    s->essiv_.resize(s->essiv_c_->context_size);
    s->essiv_c_->set_encrypt_key(s->essiv_.data(), salt.data());
  }
  return s;
}

sector_cipher::~sector_cipher() = default;

void sector_cipher::iv_for(uint64_t sector, uint8_t* iv) const {
  std::memset(iv, 0, block_);
  uint64_t v = ivgen_ == ivgen_alg::plain ? (sector & 0xffffffffu) : sector;
  size_t n = std::min<size_t>(ivgen_ == ivgen_alg::plain ? 4 : 8, block_);
  for (size_t i = 0; i < n; ++i) iv[i] = uint8_t(v >> (8 * i));
  if (ivgen_ == ivgen_alg::essiv) essiv_c_->encrypt(essiv_.data(), block_, iv, iv);
}

void sector_cipher::run(bool enc, uint64_t sector, uint8_t* buf, size_t len) {
  uint8_t iv[32];
  for (size_t off = 0; off < len; off += sector_size, ++sector) {
    uint8_t* p = buf + off;
    switch (mode_) {
      case cipher_mode::ecb:
        (enc ? c_->encrypt : c_->decrypt)(enc ? enc_.data() : dec_.data(), sector_size, p, p);
        break;
      case cipher_mode::cbc:
        iv_for(sector, iv);
        if (enc) cbc_encrypt(enc_.data(), c_->encrypt, block_, iv, sector_size, p, p);
        else cbc_decrypt(dec_.data(), c_->decrypt, block_, iv, sector_size, p, p);
        break;
      case cipher_mode::ctr:
        iv_for(sector, iv);
        ctr_crypt(enc_.data(), c_->encrypt, block_, iv, sector_size, p, p);
        break;
      case cipher_mode::xts:
        iv_for(sector, iv);
        if (enc) xts_encrypt_message(enc_.data(), twk_.data(), c_->encrypt, iv, sector_size, p, p);
        else xts_decrypt_message(dec_.data(), twk_.data(), c_->decrypt, c_->encrypt, iv, sector_size, p, p);
        break;
    }
  }
}

void sector_cipher::encrypt(uint64_t sector, uint8_t* buf, size_t len) { run(true, sector, buf, len); }
void sector_cipher::decrypt(uint64_t sector, uint8_t* buf, size_t len) { run(false, sector, buf, len); }

}  // namespace blockd::luks

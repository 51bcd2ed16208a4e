// blockdev-create driver=luks: checks the options like QEMU, writes a LUKS1 header with one key slot, sizes the file(s); the create job's worker thread.
#include <algorithm>
#include <cerrno>
#include <cstring>
#include <optional>
#include <string>

#include "formats/luks/luks_driver.h"
#include "formats/luks/luks_header.h"
#include "storage/block/node.h"
#include "storage/block/sync_io.h"

namespace blockd::luks {
namespace {

uint64_t as_u64(const boost::json::value& v) {
  if (v.is_uint64()) return v.get_uint64();
  if (v.is_int64()) return uint64_t(v.get_int64());
  return 0;
}

std::string str_or(const boost::json::object& o, const char* k, const char* dflt) {
  auto* v = o.if_contains(k);
  return v && v->is_string() ? std::string(v->get_string()) : std::string(dflt);
}

std::string make_uuid() {
  uint8_t u[16];
  random_bytes(u, sizeof u);
  u[6] = uint8_t((u[6] & 0x0f) | 0x40);  // version 4
  u[8] = uint8_t((u[8] & 0x3f) | 0x80);  // RFC 4122 variant
  static const char* hex = "0123456789abcdef";
  std::string s;
  for (int i = 0; i < 16; ++i) {
    if (i == 4 || i == 6 || i == 8 || i == 10) s += '-';
    s += hex[u[i] >> 4];
    s += hex[u[i] & 15];
  }
  return s;
}

}  // namespace

result<header> new_header(const boost::json::object& o, const std::string& secret, std::vector<uint8_t>& master,
                          std::vector<uint8_t>& slot0, bool detached) {
  std::string alg_s = str_or(o, "cipher-alg", "aes-256"), mode_s = str_or(o, "cipher-mode", "xts"),
              ivgen_s = str_or(o, "ivgen-alg", "plain64"), hash_s = str_or(o, "hash-alg", "sha256");
  auto alg = parse_cipher_alg(alg_s);
  if (!alg) return fail("Cipher algorithm '" + alg_s + "' is not supported");
  auto mode = parse_cipher_mode(mode_s);
  if (!mode) return fail("Cipher mode '" + mode_s + "' is not supported");
  auto ivgen = parse_ivgen_alg(ivgen_s);
  if (!ivgen) return fail("IV generator '" + ivgen_s + "' is not supported");
  auto hash = parse_hash_alg(hash_s);
  if (!hash) return fail("Hash algorithm '" + hash_s + "' is not supported");
  std::optional<hash_alg> ivhash;
  if (*ivgen == ivgen_alg::essiv) {
    std::string ih = str_or(o, "ivgen-hash-alg", "sha256");
    ivhash = parse_hash_alg(ih);
    if (!ivhash) return fail("Hash algorithm '" + ih + "' is not supported");
  }
  int64_t iter_time = 2000;
  if (auto* v = o.if_contains("iter-time"); v && v->is_int64()) iter_time = v->get_int64();
  if (iter_time <= 0) return fail("iter-time must be positive");

  header h;
  h.alg = *alg;
  h.mode = *mode;
  h.ivgen = *ivgen;
  h.ivhash = ivhash;
  h.hash = *hash;
  h.cipher_name = family_of(h.alg);
  h.mode_text = mode_spec(h.mode, h.ivgen, h.ivhash);
  h.hash_spec = name_of(h.hash);
  h.key_bytes = uint32_t(key_len(h.alg) * (h.mode == cipher_mode::xts ? 2 : 1));
  master.assign(h.key_bytes, 0);
  random_bytes(master.data(), master.size());
  // Fails here on combinations the cipher cannot do (xts over a 64-bit block, essiv without a key size).
  auto check = sector_cipher::make(h.alg, h.mode, h.ivgen, h.ivhash, master.data(), master.size());
  if (!check) return std::unexpected(check.error());

  random_bytes(h.mk_salt.data(), salt_len);
  // QEMU's counts: PBKDF2 rounds per iter-time, a slot at that, the master key digest at an eighth.
  uint64_t mk = pbkdf2_iters_for(h.hash, digest_size, uint64_t(iter_time)) / 8;
  h.mk_iters = uint32_t(std::clamp<uint64_t>(mk, min_mk_iters, UINT32_MAX));
  pbkdf2_hmac(h.hash, master.data(), master.size(), h.mk_salt.data(), salt_len, h.mk_iters, h.mk_digest.data(),
              digest_size);
  h.uuid = make_uuid();
  uint64_t stride = (h.slot_material_bytes() / sector + 7) / 8 * 8;
  for (size_t i = 0; i < num_slots; ++i) {
    h.slots[i] = key_slot{};
    h.slots[i].key_offset = uint32_t(key_slot_offset / sector + i * stride);
  }
  h.payload_offset = detached ? 0 : uint32_t(key_slot_offset / sector + num_slots * stride);
  uint64_t slot_iters = pbkdf2_iters_for(h.hash, h.key_bytes, uint64_t(iter_time));
  slot0 = make_slot(h, 0, master, secret, slot_iters);
  return h;
}

// The end of the key material area (the header file's length with a detached header).
uint64_t header_area_bytes(const header& h) {
  uint64_t stride = (h.slot_material_bytes() / sector + 7) / 8 * 8;
  return key_slot_offset + num_slots * stride * sector;
}

result<void> write_header(block::sync_io& io, const header& h, uint64_t base) {
  std::vector<uint8_t> buf(key_slot_offset, 0);
  auto hb = h.serialize();
  std::memcpy(buf.data(), hb.data(), hb.size());
  if (int rc = io.write(buf.data(), int64_t(buf.size()), int64_t(base)); rc < 0)
    return fail(std::string("Could not write LUKS header: ") + std::strerror(-rc));
  return {};
}

result<void> create_luks(const block::create_args& a) {
  const auto& o = a.options;
  const auto* file_ref = o.if_contains("file");
  const auto* hdr_ref = o.if_contains("header");
  if (file_ref && file_ref->is_null()) file_ref = nullptr;
  if (hdr_ref && hdr_ref->is_null()) hdr_ref = nullptr;
  if (!file_ref && !hdr_ref) return fail("Parameter 'file' is required");
  uint64_t size = as_u64(o.at("size"));
  std::string prealloc = str_or(o, "preallocation", "off");
  auto* ks = o.if_contains("key-secret");
  if (!ks || !ks->is_string()) return fail("Parameter 'key-secret' is required for cipher");
  auto secret = a.objects->secret_bytes(std::string(ks->get_string()));
  if (!secret) return std::unexpected(secret.error());

  block::node* data = nullptr;
  block::node* hdr = nullptr;
  if (file_ref) {
    auto n = a.resolve(*file_ref);
    if (!n) return std::unexpected(n.error());
    data = *n;
  }
  if (hdr_ref) {
    auto n = a.resolve(*hdr_ref);
    if (!n) return std::unexpected(n.error());
    hdr = *n;
  }
  bool detached = hdr != nullptr;
  std::vector<uint8_t> master, slot0;
  auto h = new_header(o, *secret, master, slot0, detached);
  if (!h) return std::unexpected(h.error());

  block::sync_io hio(detached ? *hdr : *data);
  uint64_t payload = uint64_t(h->payload_offset) * sector;
  // The header file first gets its final length (QEMU truncates it to the header area, then the
  // luks node to the requested size), so the slot material lands inside it.
  if (detached) {
    if (auto r = hio.truncate(int64_t(header_area_bytes(*h))); !r) return r;
  } else {
    if (auto r = hio.truncate(int64_t(payload + size)); !r) return r;
  }
  if (auto r = write_header(hio, *h); !r) return r;
  if (int rc = hio.write(slot0.data(), int64_t(slot0.size()), int64_t(h->slots[0].key_offset) * int64_t(sector)); rc < 0)
    return fail(std::string("Could not write key slot 0: ") + std::strerror(-rc));
  if (data && detached) {
    block::sync_io dio(*data);
    if (auto r = dio.truncate(int64_t(size)); !r) return r;
  }
  // falloc/full: the payload is allocated in the file (its bytes are not zeroes once decrypted; QEMU's are not either).
  if (data && (prealloc == "falloc" || prealloc == "full") && size) {
    block::sync_io dio(*data);
    int rc = dio.write_zeroes(int64_t(detached ? 0 : payload), int64_t(size));
    if (rc < 0 && rc != -ENOTSUP) return fail(std::string("Could not preallocate data: ") + std::strerror(-rc));
  }
  if (int rc = hio.flush(); rc < 0) return fail(std::string("Could not flush LUKS header: ") + std::strerror(-rc));
  return {};
}

}  // namespace blockd::luks

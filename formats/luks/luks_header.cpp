// LUKS1 header: parsing with checks against hostile input, serialization, key slot unlock and creation, the query view; any thread, no shared state.
#include "formats/luks/luks_header.h"

#include <algorithm>
#include <cstring>

namespace blockd::luks {
namespace {

const uint8_t magic[6] = {'L', 'U', 'K', 'S', 0xba, 0xbe};

uint32_t be32(const uint8_t* p) { return uint32_t(p[0]) << 24 | uint32_t(p[1]) << 16 | uint32_t(p[2]) << 8 | p[3]; }
void put32(uint8_t* p, uint32_t v) {
  p[0] = uint8_t(v >> 24);
  p[1] = uint8_t(v >> 16);
  p[2] = uint8_t(v >> 8);
  p[3] = uint8_t(v);
}
// A NUL-padded text field; a field without NUL is used whole (never read past it).
std::string field(const uint8_t* p, size_t n) {
  size_t k = 0;
  while (k < n && p[k]) ++k;
  return std::string(reinterpret_cast<const char*>(p), k);
}
void put_field(uint8_t* p, size_t n, const std::string& s) {
  std::memcpy(p, s.data(), std::min(n - 1, s.size()));
}

// Offsets of the on-disk fields (LUKS1 spec).
constexpr size_t o_version = 6, o_cipher = 8, o_mode = 40, o_hash = 72, o_payload = 104, o_keybytes = 108,
                 o_mkdigest = 112, o_mksalt = 132, o_mkiters = 164, o_uuid = 168, o_slots = 208, slot_size = 48;

}  // namespace

std::string mode_spec(cipher_mode m, ivgen_alg g, std::optional<hash_alg> h) {
  std::string s = std::string(name_of(m)) + "-" + name_of(g);
  if (h) s += std::string(":") + name_of(*h);
  return s;
}

std::vector<uint8_t> header::serialize() const {
  std::vector<uint8_t> b(header_size, 0);
  std::memcpy(b.data(), magic, 6);
  b[o_version] = uint8_t(version >> 8);
  b[o_version + 1] = uint8_t(version);
  put_field(&b[o_cipher], 32, cipher_name);
  put_field(&b[o_mode], 32, mode_text);
  put_field(&b[o_hash], 32, hash_spec);
  put32(&b[o_payload], payload_offset);
  put32(&b[o_keybytes], key_bytes);
  std::memcpy(&b[o_mkdigest], mk_digest.data(), digest_size);
  std::memcpy(&b[o_mksalt], mk_salt.data(), salt_len);
  put32(&b[o_mkiters], mk_iters);
  put_field(&b[o_uuid], 40, uuid);
  for (size_t i = 0; i < num_slots; ++i) {
    uint8_t* p = &b[o_slots + i * slot_size];
    const key_slot& s = slots[i];
    put32(p, s.active);
    put32(p + 4, s.iterations);
    std::memcpy(p + 8, s.salt.data(), salt_len);
    put32(p + 40, s.key_offset);
    put32(p + 44, s.stripes);
  }
  return b;
}

result<header> parse_header(const uint8_t* b, size_t len, uint64_t file_len, bool detached) {
  if (len < header_size || std::memcmp(b, magic, 6) != 0) return fail("Volume is not in LUKS format");
  header h;
  h.version = uint16_t(b[o_version] << 8 | b[o_version + 1]);
  if (h.version != 1) return fail("Unsupported LUKS version " + std::to_string(h.version));
  h.cipher_name = field(&b[o_cipher], 32);
  h.mode_text = field(&b[o_mode], 32);
  h.hash_spec = field(&b[o_hash], 32);
  h.payload_offset = be32(&b[o_payload]);
  h.key_bytes = be32(&b[o_keybytes]);
  std::memcpy(h.mk_digest.data(), &b[o_mkdigest], digest_size);
  std::memcpy(h.mk_salt.data(), &b[o_mksalt], salt_len);
  h.mk_iters = be32(&b[o_mkiters]);
  h.uuid = field(&b[o_uuid], 40);
  for (size_t i = 0; i < num_slots; ++i) {
    const uint8_t* p = &b[o_slots + i * slot_size];
    key_slot& s = h.slots[i];
    s.active = be32(p);
    s.iterations = be32(p + 4);
    std::memcpy(s.salt.data(), p + 8, salt_len);
    s.key_offset = be32(p + 40);
    s.stripes = be32(p + 44);
  }

  // Mode spec: "<mode>[-<ivgen>[:<hash>]]".
  std::string mode_name = h.mode_text, ivgen_name, ivhash_name;
  if (auto dash = mode_name.find('-'); dash != std::string::npos) {
    ivgen_name = mode_name.substr(dash + 1);
    mode_name.resize(dash);
    if (auto colon = ivgen_name.find(':'); colon != std::string::npos) {
      ivhash_name = ivgen_name.substr(colon + 1);
      ivgen_name.resize(colon);
    }
  }
  auto mode = parse_cipher_mode(mode_name);
  if (!mode) return fail("Cipher mode '" + mode_name + "' is not supported");
  h.mode = *mode;
  if (ivgen_name.empty()) {
    // "ecb" alone: no IV is used, so the generator does not matter.
    if (h.mode != cipher_mode::ecb) return fail("Missing IV generator algorithm in cipher mode '" + h.mode_text + "'");
    h.ivgen = ivgen_alg::plain64;
  } else {
    auto g = parse_ivgen_alg(ivgen_name);
    if (!g) return fail("IV generator '" + ivgen_name + "' is not supported");
    h.ivgen = *g;
  }
  if (h.ivgen == ivgen_alg::essiv) {
    if (ivhash_name.empty()) return fail("Missing IV generator hash specification");
    auto ih = parse_hash_alg(ivhash_name);
    if (!ih) return fail("Hash algorithm '" + ivhash_name + "' is not supported");
    h.ivhash = *ih;
  } else if (!ivhash_name.empty()) {
    return fail("Hash algorithm '" + ivhash_name + "' is not supported with IV generator '" + ivgen_name + "'");
  }
  auto hash = parse_hash_alg(h.hash_spec);
  if (!hash) return fail("Hash algorithm '" + h.hash_spec + "' is not supported");
  h.hash = *hash;
  if (h.key_bytes == 0 || h.key_bytes > 128 || (h.mode == cipher_mode::xts && h.key_bytes % 2))
    return fail("Algorithm '" + h.cipher_name + "' with key size " + std::to_string(h.key_bytes) +
                " bytes not supported");
  size_t one_key = h.mode == cipher_mode::xts ? h.key_bytes / 2 : h.key_bytes;
  auto alg = cipher_from_family(h.cipher_name, one_key);
  if (!alg)
    return fail("Algorithm '" + h.cipher_name + "' with key size " + std::to_string(one_key) + " bytes not supported");
  h.alg = *alg;
  if (h.mode == cipher_mode::xts && block_len(h.alg) != 16)
    return fail("Cipher '" + h.cipher_name + "' does not support mode xts");

  // Key slots: QEMU's sanity checks, so a hostile header can never make us read or write elsewhere.
  uint64_t header_sectors = key_slot_offset / sector;
  uint64_t material_sectors = h.slot_material_bytes() / sector;
  for (size_t i = 0; i < num_slots; ++i) {
    const key_slot& s = h.slots[i];
    if (s.active != slot_active && s.active != slot_inactive)
      return fail("Keyslot " + std::to_string(i) + " state (active/disable) is corrupted");
    if (s.active == slot_active && s.stripes != af_stripes)
      return fail("Keyslot " + std::to_string(i) + " is corrupted (stripes " + std::to_string(s.stripes) +
                  " != " + std::to_string(af_stripes) + ")");
    if (s.active == slot_active && s.iterations == 0)
      return fail("Keyslot " + std::to_string(i) + " is corrupted (iterations 0)");
    if (s.key_offset < header_sectors)
      return fail("Keyslot " + std::to_string(i) + " is overlapping with the LUKS header");
    if (!detached && uint64_t(s.key_offset) + material_sectors > h.payload_offset)
      return fail("Keyslot " + std::to_string(i) + " is overlapping with the encrypted payload");
    if (file_len && s.active == slot_active && (uint64_t(s.key_offset) + material_sectors) * sector > file_len)
      return fail("Keyslot " + std::to_string(i) + " key material extends beyond the end of the image");
    for (size_t j = i + 1; j < num_slots; ++j) {
      uint64_t a0 = s.key_offset, a1 = a0 + material_sectors;
      uint64_t b0 = h.slots[j].key_offset, b1 = b0 + material_sectors;
      if (a0 < b1 && b0 < a1)
        return fail("Keyslots " + std::to_string(i) + " and " + std::to_string(j) + " are overlapping in the header");
    }
  }
  if (!detached && h.payload_offset < header_sectors) return fail("LUKS payload is overlapping with the header");
  if (h.mk_iters == 0) return fail("LUKS master key iteration count is 0");
  return h;
}

bool master_key_matches(const header& h, const std::vector<uint8_t>& key) {
  uint8_t d[digest_size];
  pbkdf2_hmac(h.hash, key.data(), key.size(), h.mk_salt.data(), salt_len, h.mk_iters, d, digest_size);
  return std::memcmp(d, h.mk_digest.data(), digest_size) == 0;
}

result<std::optional<std::vector<uint8_t>>> try_slot(const header& h, size_t i, const std::string& secret,
                                                      const read_fn& read_at) {
  const key_slot& s = h.slots[i];
  if (s.active != slot_active) return std::optional<std::vector<uint8_t>>();
  std::vector<uint8_t> slot_key(h.key_bytes);
  pbkdf2_hmac(h.hash, reinterpret_cast<const uint8_t*>(secret.data()), secret.size(), s.salt.data(), salt_len,
         s.iterations, slot_key.data(), slot_key.size());
  std::vector<uint8_t> material(h.slot_material_bytes());
  if (int rc = read_at(uint64_t(s.key_offset) * sector, material.size(), material.data()); rc < 0)
    return fail("Unable to read key slot " + std::to_string(i) + ": " + std::strerror(-rc));
  // The key material is encrypted with the slot key, sector numbers counted from its own start.
  auto c = sector_cipher::make(h.alg, h.mode, h.ivgen, h.ivhash, slot_key.data(), slot_key.size());
  if (!c) return std::unexpected(c.error());
  (*c)->decrypt(0, material.data(), material.size());
  std::vector<uint8_t> key(h.key_bytes);
  af_merge(h.hash, material.data(), h.key_bytes, s.stripes, key.data());
  if (!master_key_matches(h, key)) return std::optional<std::vector<uint8_t>>();
  return std::optional<std::vector<uint8_t>>(std::move(key));
}

result<std::vector<uint8_t>> unlock(const header& h, const std::string& secret, const read_fn& read_at) {
  for (size_t i = 0; i < num_slots; ++i) {
    auto k = try_slot(h, i, secret, read_at);
    if (!k) return std::unexpected(k.error());
    if (*k) return std::move(**k);
  }
  return fail("Invalid password, cannot unlock any keyslot");
}

std::vector<uint8_t> make_slot(header& h, size_t i, const std::vector<uint8_t>& master, const std::string& secret,
                               uint64_t iters) {
  key_slot& s = h.slots[i];
  random_bytes(s.salt.data(), salt_len);
  s.iterations = uint32_t(std::clamp<uint64_t>(iters, min_slot_iters, UINT32_MAX));
  s.stripes = af_stripes;
  std::vector<uint8_t> slot_key(h.key_bytes);
  pbkdf2_hmac(h.hash, reinterpret_cast<const uint8_t*>(secret.data()), secret.size(), s.salt.data(), salt_len,
         s.iterations, slot_key.data(), slot_key.size());
  std::vector<uint8_t> material(h.slot_material_bytes(), 0);
  af_split(h.hash, master.data(), h.key_bytes, af_stripes, material.data());
  auto c = sector_cipher::make(h.alg, h.mode, h.ivgen, h.ivhash, slot_key.data(), slot_key.size());
  if (c) (*c)->encrypt(0, material.data(), material.size());
  s.active = slot_active;
  return material;
}

boost::json::object info_json(const header& h, bool detached) {
  boost::json::object o;
  o["cipher-alg"] = name_of(h.alg);
  o["cipher-mode"] = name_of(h.mode);
  o["ivgen-alg"] = name_of(h.ivgen);
  if (h.ivhash) o["ivgen-hash-alg"] = name_of(*h.ivhash);
  o["hash-alg"] = name_of(h.hash);
  o["detached-header"] = detached;
  o["payload-offset"] = int64_t(h.payload_offset) * int64_t(sector);
  o["master-key-iters"] = int64_t(h.mk_iters);
  o["uuid"] = h.uuid;
  boost::json::array slots;
  for (const key_slot& s : h.slots) {
    boost::json::object so;
    so["active"] = s.active == slot_active;
    if (s.active == slot_active) {
      so["iters"] = int64_t(s.iterations);
      so["stripes"] = int64_t(s.stripes);
    }
    so["key-offset"] = int64_t(s.key_offset) * int64_t(sector);
    slots.push_back(std::move(so));
  }
  o["slots"] = std::move(slots);
  return o;
}

}  // namespace blockd::luks

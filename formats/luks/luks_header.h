// The LUKS1 on-disk header (parse with hostile-input checks, serialize, unlock a key slot, describe for queries); any thread, no shared state.
#pragma once
#include <boost/json.hpp>

#include <array>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "formats/luks/luks_crypto.h"
#include "protocol/error.h"

namespace blockd::luks {

constexpr size_t header_size = 592;
constexpr size_t num_slots = 8;
constexpr uint32_t slot_active = 0x00AC71F3;
constexpr uint32_t slot_inactive = 0x0000DEAD;
constexpr uint32_t af_stripes = 4000;
constexpr size_t salt_len = 32;
constexpr size_t digest_size = 20;  // mk-digest bytes
constexpr uint64_t sector = 512;
constexpr uint64_t key_slot_offset = 4096;  // where QEMU puts the first key material
constexpr uint64_t min_slot_iters = 1000, min_mk_iters = 1000;

struct key_slot {
  uint32_t active = slot_inactive;
  uint32_t iterations = 0;
  std::array<uint8_t, salt_len> salt{};
  uint32_t key_offset = 0;  // sectors
  uint32_t stripes = af_stripes;
};

struct header {
  uint16_t version = 1;
  std::string cipher_name, mode_text, hash_spec;  // the header's text fields
  uint32_t payload_offset = 0;  // sectors
  uint32_t key_bytes = 0;
  std::array<uint8_t, digest_size> mk_digest{};
  std::array<uint8_t, salt_len> mk_salt{};
  uint32_t mk_iters = 0;
  std::string uuid;
  std::array<key_slot, num_slots> slots{};

  // Decoded algorithms (filled by parse / set by create).
  cipher_alg alg = cipher_alg::aes_256;
  cipher_mode mode = cipher_mode::xts;
  ivgen_alg ivgen = ivgen_alg::plain64;
  std::optional<hash_alg> ivhash;
  hash_alg hash = hash_alg::sha256;

  std::vector<uint8_t> serialize() const;  // header_size bytes
  size_t split_key_len() const { return size_t(key_bytes) * af_stripes; }
  // Bytes of one slot's key material on disk, in whole sectors.
  uint64_t slot_material_bytes() const { return (split_key_len() + sector - 1) / sector * sector; }
};

// Parses and checks the 592-byte header: magic, version, algorithms, key size, slots (stripes,
// offsets inside the header area and not overlapping). `file_len` bounds the key material (0: no
// bound). `detached`: the payload lives in another file, so its offset may be anything.
result<header> parse_header(const uint8_t* buf, size_t len, uint64_t file_len, bool detached);

// The "<mode>-<ivgen>[:<hash>]" text and back.
std::string mode_spec(cipher_mode m, ivgen_alg g, std::optional<hash_alg> h);

// Reads slot material through `read_at` (offset, len, buffer -> 0 or -errno) and tries every active
// slot with `secret`; on success returns the master key. Wrong secret: QEMU's text.
using read_fn = std::function<int(uint64_t offset, size_t len, uint8_t* buf)>;
result<std::vector<uint8_t>> unlock(const header& h, const std::string& secret, const read_fn& read_at);
// Tries one slot; returns the master key or nullopt when the secret does not open it.
result<std::optional<std::vector<uint8_t>>> try_slot(const header& h, size_t slot, const std::string& secret,
                                                      const read_fn& read_at);

// Builds slot `i` for `master` under `secret`: fills h.slots[i] (salt, iterations) and returns its
// encrypted key material (slot_material_bytes long) for the caller to write at key_offset.
std::vector<uint8_t> make_slot(header& h, size_t i, const std::vector<uint8_t>& master, const std::string& secret,
                               uint64_t iters);

// The master key digest check (PBKDF2 of the candidate key against mk-digest).
bool master_key_matches(const header& h, const std::vector<uint8_t>& key);

// QCryptoBlockInfoLUKS as query-named-block-nodes shows it.
boost::json::object info_json(const header& h, bool detached);

}  // namespace blockd::luks

// Unit tests of qcow2's encryption glue (formats/qcow2/qcow2_crypto.*) against images qemu-img and qemu-io made; test thread.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "formats/qcow2/layout.h"
#include "formats/qcow2/qcow2_crypto.h"
#include "tests/unit/shell_tools.h"

namespace blockd::qcow2 {
namespace {

struct image {
  std::vector<uint8_t> bytes;
  header h;
  file_read_fn read = [this](uint64_t off, size_t len, uint8_t* out) {
    if (off > bytes.size() || len > bytes.size() - off) return -EIO;
    std::memcpy(out, bytes.data() + off, len);
    return 0;
  };
  // The host offset of guest offset `g` (a normal cluster), 0 when unallocated.
  uint64_t host_of(uint64_t g) const {
    uint64_t cs = h.cluster_size(), per_l2 = cs / 8;
    uint64_t l1e = be64(bytes.data() + h.l1_table_offset + (g / cs / per_l2) * 8) & offset_mask;
    if (!l1e) return 0;
    uint64_t l2e = be64(bytes.data() + l1e + (g / cs % per_l2) * 8) & offset_mask;
    return l2e ? l2e + g % cs : 0;
  }
};

image load(const std::string& path) {
  image im;
  std::ifstream f(path, std::ios::binary);
  im.bytes.assign(std::istreambuf_iterator<char>(f), {});
  auto h = parse_header(std::span<const uint8_t>(im.bytes.data(), std::min<size_t>(im.bytes.size(), 65536)),
                        im.bytes.size());
  EXPECT_TRUE(h) << h.error().desc;
  if (h) im.h = *h;
  return im;
}

block::object_refs secrets() {
  block::object_refs o;
  o.by_id["s0"] = block::object_refs::entry{true, "pw", nullptr};
  o.by_id["bad"] = block::object_refs::entry{true, "nope", nullptr};
  return o;
}

boost::json::object enc(const char* fmt, const char* secret) {
  boost::json::object e{{"format", fmt}};
  if (secret) e["key-secret"] = secret;
  return boost::json::object{{"encrypt", e}};
}

class Qcow2Crypto : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!test::have_qemu_tools()) GTEST_SKIP() << "qemu-img/qemu-io not installed";
    dir = "/dev/shm/qcow2_crypto_unit_" + std::to_string(getpid());
    test::sh("mkdir -p " + dir);
  }
  void TearDown() override {
    if (!dir.empty()) test::sh("rm -rf " + dir);
  }
  std::string make(const std::string& name, const std::string& opts) {
    std::string img = dir + "/" + name;
    int rc = 1;
    // QEMU's PBKDF2 benchmark times its first short round with getrusage, updated per scheduler tick
    // here: it reads 0 ms now and then and fails fast ("Unable to get accurate CPU usage"): try again.
    for (int t = 0; t < 60 && rc; ++t)
      test::sh("rm -f " + img + "; qemu-img create -q -f qcow2 --object secret,id=s0,data=pw -o " + opts + " " + img +
                   " 4M",
               &rc);
    EXPECT_EQ(rc, 0) << opts;
    return img;
  }
  void write(const std::string& img, const std::string& cmds) {
    int rc = 1;
    test::sh("qemu-io --object secret,id=s0,data=pw --image-opts driver=qcow2,file.filename=" + img +
                 ",encrypt.key-secret=s0 " + cmds,
             &rc);
    ASSERT_EQ(rc, 0) << cmds;
  }
  std::string dir;
};

// LUKS: the IV of a data sector is its host offset / 512 (not the guest offset), verified by
// decrypting a cluster qemu-io wrote at guest offset 0, which lands far from host offset 0.
TEST_F(Qcow2Crypto, LuksDecryptsQemuDataByHostOffset) {
  std::string img = make("l.qcow2", "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10");
  write(img, "-c 'write -P 0x55 0 64k' -c 'write -P 0xa7 1M 4k'");
  image im = load(img);
  ASSERT_EQ(im.h.crypt_method, crypt_luks);
  auto ext = find_crypto_ext(im.h, im.bytes.size());
  ASSERT_TRUE(ext) << ext.error().desc;
  EXPECT_EQ(ext->offset % im.h.cluster_size(), 0u);
  auto objs = secrets();
  auto c = open_crypto(im.h, enc("luks", "s0"), objs, im.read, im.bytes.size(), true);
  ASSERT_TRUE(c) << c.error().desc;
  // The LUKS payload offset is the header area's length (unused in qcow2: data lives in clusters).
  EXPECT_EQ(uint64_t(c->get()->luks.payload_offset) * 512, ext->length);
  for (auto [g, pat, len] : {std::tuple<uint64_t, uint8_t, size_t>{0, 0x55, 65536}, {1 << 20, 0xa7, 4096}}) {
    uint64_t host = im.host_of(g);
    ASSERT_NE(host, 0u);
    ASSERT_NE(host, g);  // otherwise the test could not tell the two IV bases apart
    std::vector<uint8_t> d(im.bytes.begin() + long(host), im.bytes.begin() + long(host + len));
    std::vector<uint8_t> by_guest = d;
    c->get()->decrypt(host, g, d.data(), d.size());
    EXPECT_EQ(d, std::vector<uint8_t>(len, pat)) << "guest " << g;
    c->get()->cipher->decrypt(g / 512, by_guest.data(), by_guest.size());
    EXPECT_NE(by_guest, std::vector<uint8_t>(len, pat));
  }
  auto info = c->get()->info();
  EXPECT_EQ(info.at("format"), "luks");
  EXPECT_EQ(info.at("cipher-alg"), "aes-256");
  EXPECT_EQ(info.at("cipher-mode"), "xts");
}

// QSD 7.2's texts, in its order (format mismatch, then the secret, then the password).
TEST_F(Qcow2Crypto, LuksOpenErrorsUseQsdTexts) {
  std::string img = make("e.qcow2", "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10");
  image im = load(img);
  auto objs = secrets();
  auto open = [&](const boost::json::object& o) {
    auto c = open_crypto(im.h, o, objs, im.read, im.bytes.size(), true);
    return c ? std::string("ok") : c.error().desc;
  };
  EXPECT_EQ(open({}), "Parameter 'encrypt.key-secret' is required for cipher");
  EXPECT_EQ(open(enc("luks", nullptr)), "Parameter 'encrypt.key-secret' is required for cipher");
  EXPECT_EQ(open(enc("aes", "s0")), "Header reported 'luks' encryption format but options specify 'aes'");
  EXPECT_EQ(open(enc("luks", "nosuch")), "No secret with id 'nosuch'");
  EXPECT_EQ(open(enc("luks", "bad")), "Invalid password, cannot unlock any keyslot");
  EXPECT_EQ(open(enc("luks", "s0")), "ok");
}

// The legacy AES method: readable (AES-128-CBC, IV from the guest sector), refused for writing.
TEST_F(Qcow2Crypto, AesReadsByGuestOffsetAndRefusesWriting) {
  std::string img = make("a.qcow2", "encrypt.format=aes,encrypt.key-secret=s0");
  write(img, "-c 'write -P 0x66 64k 8k'");
  image im = load(img);
  ASSERT_EQ(im.h.crypt_method, crypt_aes);
  auto objs = secrets();
  auto w = open_crypto(im.h, enc("aes", "s0"), objs, im.read, im.bytes.size(), true);
  ASSERT_FALSE(w);
  EXPECT_NE(w.error().desc.find("Use of AES-CBC encrypted qcow2 images is no longer supported"), std::string::npos);
  EXPECT_EQ(open_crypto(im.h, enc("luks", "s0"), objs, im.read, im.bytes.size(), false).error().desc,
            "Header reported 'aes' encryption format but options specify 'luks'");
  auto c = open_crypto(im.h, enc("aes", "s0"), objs, im.read, im.bytes.size(), false);
  ASSERT_TRUE(c) << c.error().desc;
  uint64_t host = im.host_of(65536);
  ASSERT_NE(host, 0u);
  std::vector<uint8_t> d(im.bytes.begin() + long(host), im.bytes.begin() + long(host + 8192));
  c->get()->decrypt(host, 65536, d.data(), d.size());
  EXPECT_EQ(d, std::vector<uint8_t>(8192, 0x66));
  EXPECT_EQ(c->get()->info(), (boost::json::object{{"format", "aes"}}));
}

// A new header area unlocks with its secret and records the payload at its own end, as QEMU's.
TEST(Qcow2CryptoCreate, NewLuksAreaUnlocks) {
  auto objs = secrets();
  boost::json::object e{{"format", "luks"}, {"key-secret", "s0"}, {"iter-time", 10}, {"cipher-alg", "aes-128"}};
  auto area = new_luks_area(e, objs);
  ASSERT_TRUE(area) << area.error().desc;
  auto h = luks::parse_header(area->data(), area->size(), area->size(), false);
  ASSERT_TRUE(h) << h.error().desc;
  EXPECT_EQ(uint64_t(h->payload_offset) * 512, area->size());
  EXPECT_EQ(h->alg, luks::cipher_alg::aes_128);
  auto k = luks::unlock(*h, "pw", [&](uint64_t off, size_t len, uint8_t* out) {
    if (off + len > area->size()) return -EIO;
    std::memcpy(out, area->data() + off, len);
    return 0;
  });
  EXPECT_TRUE(k) << k.error().desc;
  e.erase("key-secret");
  EXPECT_EQ(new_luks_area(e, objs).error().desc, "Parameter 'encrypt.key-secret' is required for cipher");
}

}  // namespace
}  // namespace blockd::qcow2

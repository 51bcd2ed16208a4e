// Tests of the user-creatable objects: secrets, keyring, throttle-group, TLS passwordid, authz, thread-context, iothread thread-context; test thread.
#include <gtest/gtest.h>
#include <linux/keyctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <boost/json.hpp>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <thread>

#include "config/objects/authz.h"
#include "config/objects/event_loop.h"
#include "config/objects/secret.h"
#include "config/objects/thread_context.h"
#include "config/objects/throttle_group.h"
#include "config/objects/tls_creds.h"
#include "config/qom/model.h"
#include "tests/unit/shell_tools.h"

namespace json = boost::json;
using namespace blockd;
using namespace blockd::qom;

namespace {

result<json::value> add(model& m, const std::string& j) { return m.object_add(json::parse(j).as_object()); }
std::string err(model& m, const std::string& j) {
  auto r = add(m, j);
  return r ? std::string("<ok>") : r.error().desc;
}

std::string tmpdir(const std::string& tag) {
  auto d = std::filesystem::temp_directory_path() / ("blockd-objects-" + tag + "-" + std::to_string(::getpid()));
  std::filesystem::remove_all(d);
  std::filesystem::create_directories(d);
  return d.string();
}

}  // namespace

TEST(ObjectSecret, DataFileFormatTexts) {
  model m;
  EXPECT_EQ(err(m, R"({"qom-type":"secret","id":"s0"})"), "Either 'file' or 'data' must be provided");
  EXPECT_EQ(err(m, R"({"qom-type":"secret","id":"s0","data":"x","file":"/f"})"), "'file' and 'data' are mutually exclusive");
  EXPECT_EQ(err(m, R"({"qom-type":"secret","id":"s0","file":"/nonexistent"})"),
            "Unable to read /nonexistent: Failed to open file \u201c/nonexistent\u201d: No such file or directory");
  EXPECT_EQ(err(m, R"({"qom-type":"secret","id":"s0","data":"!!!","format":"base64"})"),
            "Base64 data contains invalid characters");
  EXPECT_EQ(err(m, R"({"qom-type":"secret","id":"s0","data":"YWJj","format":"base64"})"), "<ok>");
  EXPECT_EQ(*secret_bytes(m, "s0"), "abc");
  EXPECT_EQ(secret_bytes(m, "nope").error().desc, "No secret with id 'nope'");
  ASSERT_TRUE(add(m, R"({"qom-type":"authz-simple","id":"az","identity":"a"})"));
  EXPECT_EQ(secret_bytes(m, "az").error().desc, "Object with id 'az' is not a secret");
  auto d = tmpdir("secret");
  std::ofstream(d + "/pw") << "file-secret";
  ASSERT_TRUE(add(m, R"({"qom-type":"secret","id":"f0","file":")" + d + R"(/pw"})"));
  EXPECT_EQ(*secret_bytes(m, "f0"), "file-secret");
}

TEST(ObjectSecret, Base64Decoder) {
  EXPECT_EQ(*base64_decode(""), "");
  EXPECT_EQ(*base64_decode("aGVsbG8="), "hello");
  EXPECT_EQ(*base64_decode("aGVsbA=="), "hell");
  // GLib's rules, as QSD 7.2 accepts them: a trailing partial group is dropped, '=' may stand
  // inside a group (it cuts that group short), anything else outside the alphabet is refused.
  EXPECT_EQ(*base64_decode("aGVsbG8"), "hel");
  EXPECT_EQ(*base64_decode("YWJj="), "abc");
  EXPECT_TRUE(base64_decode("aG=sbG8="));
  EXPECT_EQ(base64_decode(std::string("YW\0Jj", 5)).error().desc, "Base64 data contains invalid characters");
}

TEST(ObjectSecret, DecryptsWithKeyidAndIv) {
  // Known vector: openssl enc -aes-256-cbc -K ('K' x 32) -iv 00112233445566778899aabbccddeeff
  // of "plain-secret", base64: fMXOKL5lB9HCLZtLBrqX1A==.
  model m;
  auto d = tmpdir("aes");
  std::ofstream(d + "/key") << std::string(32, 'K');
  ASSERT_TRUE(add(m, R"({"qom-type":"secret","id":"k32","file":")" + d + R"(/key"})"));
  ASSERT_TRUE(add(m, R"({"qom-type":"secret","id":"short","data":"abc"})"));
  const std::string ct = "fMXOKL5lB9HCLZtLBrqX1A==", iv = "ABEiM0RVZneImaq7zN3u/w==";
  auto enc = [&](const std::string& id, const std::string& extra) {
    return R"({"qom-type":"secret","id":")" + id + R"(","data":")" + ct + R"(")" + extra + "}";
  };
  EXPECT_EQ(err(m, enc("e0", R"(,"format":"base64","keyid":"k32","iv":")" + iv + R"(")")), "<ok>");
  EXPECT_EQ(*secret_bytes(m, "e0"), "plain-secret");
  EXPECT_EQ(*m.qom_get("/objects/e0", "data"), json::value(ct));
  EXPECT_EQ(err(m, enc("e1", R"(,"keyid":"k32")")), "IV is required to decrypt secret");
  EXPECT_EQ(err(m, enc("e1", R"(,"keyid":"k32","iv":")" + iv + R"(")")), "Length 24 must be a multiple of block size 16");
  EXPECT_EQ(err(m, enc("e1", R"(,"keyid":"short","iv":")" + iv + R"(")")), "Key should be 32 bytes in length");
  EXPECT_EQ(err(m, enc("e1", R"(,"keyid":"nokey")")), "No secret with id 'nokey'");
  EXPECT_EQ(err(m, enc("e1", R"(,"keyid":"k32","iv":"AAAA")")), "IV should be 16 bytes in length not 3");
  EXPECT_EQ(err(m, enc("e1", R"(,"keyid":"k32","iv":"!!!")")), "Base64 data contains invalid characters");
  // QSD keeps no hold on the key secret: it may go once the payload is decrypted.
  EXPECT_TRUE(m.object_del("k32"));
  EXPECT_EQ(*secret_bytes(m, "e0"), "plain-secret");
  // A fresh vector from openssl, when it is installed.
  int rc = 0;
  std::string key_hex(64, '4');  // 0x44 x 32
  std::string out = test::sh("printf 'another secret!!' | openssl enc -aes-256-cbc -K " + key_hex +
                                 " -iv 0f0e0d0c0b0a09080706050403020100 | base64 -w0",
                             &rc);
  if (rc == 0 && !out.empty()) {
    std::ofstream(d + "/key2") << std::string(32, 'D');
    ASSERT_TRUE(add(m, R"({"qom-type":"secret","id":"k2","file":")" + d + R"(/key2"})"));
    ASSERT_TRUE(add(m, R"({"qom-type":"secret","id":"o1","format":"base64","keyid":"k2","iv":"Dw4NDAsKCQgHBgUEAwIBAA==","data":")" +
                           out + R"("})"));
    EXPECT_EQ(*secret_bytes(m, "o1"), "another secret!!");
  }
}

TEST(ObjectSecretKeyring, RoundTrip) {
  const char payload[] = "keyring-payload";
  long serial = ::syscall(SYS_add_key, "user", "blockd-test", payload, sizeof payload - 1, KEY_SPEC_PROCESS_KEYRING);
  if (serial < 0) GTEST_SKIP() << "kernel keyring unavailable: " << std::strerror(errno);
  model m;
  ASSERT_TRUE(add(m, R"({"qom-type":"secret_keyring","id":"kr","serial":)" + std::to_string(serial) + "}"));
  EXPECT_EQ(*secret_bytes(m, "kr"), "keyring-payload");
  EXPECT_EQ(*m.qom_get("/objects/kr", "serial"), serial);
  ::syscall(SYS_keyctl, KEYCTL_INVALIDATE, serial);
  EXPECT_EQ(err(m, R"({"qom-type":"secret_keyring","id":"kr2","serial":1})"),
            "Unable to read serial key 00000001: Required key not available");
  EXPECT_EQ(err(m, R"({"qom-type":"secret_keyring","id":"kr3"})"), "Parameter 'serial' is missing");
}

TEST(ObjectThrottleGroup, ValidationTexts) {
  model m;
  auto tg = [&](const std::string& limits) {
    return err(m, R"({"qom-type":"throttle-group","id":"t","limits":)" + limits + "}");
  };
  const std::string range = "bps/iops/max values must be within [0, 1000000000000000]";
  EXPECT_EQ(tg(R"({"iops-total":-1})"), range);
  EXPECT_EQ(tg(R"({"bps-total":1000000000000000000})"), range);
  EXPECT_EQ(tg(R"({"bps-total":100,"bps-total-max":50})"), "bps_max/iops_max cannot be lower than bps/iops");
  EXPECT_EQ(tg(R"({"bps-total-max":50})"), "bps_max/iops_max require corresponding bps/iops values");
  EXPECT_EQ(tg(R"({"bps-total":100,"bps-total-max-length":5})"), "burst length set without burst rate");
  EXPECT_EQ(tg(R"({"bps-total":100,"bps-total-max":200,"bps-total-max-length":0})"), "the burst length cannot be 0");
  EXPECT_EQ(tg(R"({"bps-total":100,"bps-read":10})"),
            "bps/iops/max total values and read/write values cannot be used at the same time");
  EXPECT_EQ(tg(R"({"iops-size":100})"), "iops size requires an iops value to be set");
  EXPECT_EQ(tg(R"({"bps-total-max-length":5000000000})"), "bps-total-max-length value must be in the range [0, 4294967295]");
  EXPECT_EQ(tg(R"({"bps-total":10,"bps-total-max":1000000000000000,"bps-total-max-length":2})"),
            "burst length too high for this burst rate");
  EXPECT_EQ(err(m, R"({"qom-type":"throttle-group","id":"t","x-iops-total":-5})"), "Property values cannot be negative");
  EXPECT_EQ(err(m, R"({"qom-type":"throttle-group","id":"t","x-iops-total-max-length":5000000000})"),
            "x-iops-total-max-length value must be in therange [0, 4294967295]");
  // Flat members go first, "limits" last, whatever the order.
  ASSERT_TRUE(add(m, R"({"qom-type":"throttle-group","id":"t2","x-iops-total":5,"limits":{"iops-total":6}})"));
  EXPECT_EQ(*m.qom_get("/objects/t2", "x-iops-total"), 6);
  EXPECT_EQ(m.qom_set("/objects/t2", "x-iops-total", 1).error().desc, "Property cannot be set after initialization");
  EXPECT_TRUE(m.qom_set("/objects/t2", "limits", json::parse(R"({"bps-write":9})")));
  auto l = m.qom_get("/objects/t2", "limits");
  EXPECT_EQ(l->at("bps-write"), 9);
  EXPECT_EQ(l->at("iops-total"), 6);  // untouched members keep their value
  EXPECT_EQ(m.qom_set("/objects/t2", "limits", json::parse(R"({"bps-write-max":1})")).error().desc,
            "bps_max/iops_max cannot be lower than bps/iops");
  EXPECT_EQ(m.qom_set("/objects/t2", "limits", 5).error().desc, "Invalid parameter type for 'limits', expected: object");
  auto* g = m.find_as<throttle_group_object>("t2");
  ASSERT_TRUE(g);
  EXPECT_EQ(g->state()->config()[throttle_bucket::bps_write].avg, 9);
}

TEST(ObjectThrottleGroup, LeakyBucketSharedAcrossThreads) {
  throttle_state s;
  throttle_config c;
  c[throttle_bucket::iops_total].avg = 100;  // bucket of 10 operations
  s.set_config(c);
  uint64_t t = 1'000'000'000;
  int started = 0;
  while (s.reserve(false, 4096, t) == 0) ++started;
  EXPECT_EQ(started, 11);  // QEMU starts a request while the bucket is not over its size (10)
  uint64_t wait = s.reserve(false, 4096, t);
  EXPECT_GT(wait, 0u);
  EXPECT_LE(wait, 10'000'000u);  // one operation leaks in 10 ms
  EXPECT_EQ(s.reserve(true, 4096, t + wait), 0u);
  // Two threads charging one group never start more than the rate allows.
  throttle_config b;
  b[throttle_bucket::bps_total].avg = 1'000'000;
  b[throttle_bucket::bps_total].max = 1'000'000;
  s.set_config(b);
  std::atomic<uint64_t> bytes{0};
  auto worker = [&] {
    for (int i = 0; i < 1000; ++i)
      if (s.reserve(i % 2, 10'000, 5'000'000'000) == 0) bytes += 10'000;
  };
  std::thread a(worker), d(worker);
  a.join();
  d.join();
  EXPECT_GE(bytes.load(), 1'000'000u);
  EXPECT_LE(bytes.load(), 1'010'000u);  // the bucket (max x 1 s) plus one overfilling request
}

TEST(ObjectTlsCreds, PasswordidDecryptsKey) {
  int rc = 0;
  test::sh("command -v certtool", &rc);
  if (rc != 0) GTEST_SKIP() << "certtool (gnutls-bin) not installed";
  auto d = tmpdir("tls");
  std::ofstream(d + "/ca.info") << "cn = blockd test CA\nca\ncert_signing_key\nexpiration_days = 365\n";
  std::ofstream(d + "/srv.info") << "cn = localhost\ndns_name = localhost\ntls_www_server\nencryption_key\nsigning_key\n"
                                    "expiration_days = 365\n";
  std::string c = "exec >/dev/null 2>&1; cd " + d +
                  " && certtool --generate-privkey --outfile ca-key.pem"
                  " && certtool --generate-self-signed --load-privkey ca-key.pem --template ca.info --outfile ca-cert.pem"
                  " && certtool --generate-privkey --outfile plain-key.pem"
                  " && certtool --generate-certificate --load-privkey plain-key.pem --load-ca-certificate ca-cert.pem"
                  " --load-ca-privkey ca-key.pem --template srv.info --outfile server-cert.pem"
                  " && certtool --to-p8 --load-privkey plain-key.pem --password hunter2 --outfile server-key.pem >/dev/null 2>&1";
  test::sh(c, &rc);
  ASSERT_EQ(rc, 0);
  model m;
  auto x509 = [&](const std::string& id, const std::string& extra) {
    return R"({"qom-type":"tls-creds-x509","id":")" + id + R"(","endpoint":"server","dir":")" + d + R"(")" + extra + "}";
  };
  EXPECT_EQ(err(m, x509("x0", "")), "Cannot load certificate '" + d + "/server-cert.pem' & key '" + d +
                                        "/server-key.pem': Decryption has failed.");
  EXPECT_EQ(err(m, x509("x0", R"(,"passwordid":"nosuch")")), "No secret with id 'nosuch'");
  ASSERT_TRUE(add(m, R"({"qom-type":"secret","id":"bad","data":"wrong"})"));
  EXPECT_NE(err(m, x509("x0", R"(,"passwordid":"bad")")), "<ok>");
  ASSERT_TRUE(add(m, R"({"qom-type":"secret","id":"pw","data":"hunter2"})"));
  EXPECT_EQ(err(m, x509("x1", R"(,"passwordid":"pw")")), "<ok>");
  EXPECT_EQ(*m.qom_get("/objects/x1", "passwordid"), "pw");
  EXPECT_EQ(*m.qom_get("/objects/x1", "endpoint"), "server");
  auto creds = tls_credentials(m, "x1", true);
  ASSERT_TRUE(creds);
  EXPECT_TRUE(*creds);
  EXPECT_EQ(tls_credentials(m, "x1", false).error().desc, "Expected TLS credentials for a client endpoint");
  EXPECT_EQ(tls_credentials(m, "pw", true).error().desc, "Object with id 'pw' is not TLS credentials");
  EXPECT_EQ(tls_credentials(m, "zz", true).error().desc, "No TLS credentials with id 'zz'");
  EXPECT_TRUE(m.object_del("pw"));  // QSD keeps no hold on the password secret either
  EXPECT_EQ(err(m, R"({"qom-type":"tls-cipher-suites","id":"cs"})"), "'priority' property is not set");
  EXPECT_EQ(err(m, R"({"qom-type":"tls-cipher-suites","id":"cs","priority":"NORMAL"})"), "<ok>");
  EXPECT_EQ(*m.qom_list("/objects/cs"), json::parse(R"([{"name":"type","type":"string"},
      {"name":"endpoint","type":"QCryptoTLSCredsEndpoint"},{"name":"dir","type":"string"},
      {"name":"verify-peer","type":"bool"},{"name":"priority","type":"string"}])"));
}

TEST(ObjectAuthz, SimpleListAndListfile) {
  model m;
  EXPECT_EQ(err(m, R"({"qom-type":"authz-simple","id":"a0"})"), "Parameter 'identity' is missing");
  ASSERT_TRUE(add(m, R"({"qom-type":"authz-simple","id":"a0","identity":"CN=bob"})"));
  EXPECT_EQ(*authorize(m, "a0", "CN=bob"), true);
  EXPECT_EQ(*authorize(m, "a0", "CN=eve"), false);
  ASSERT_TRUE(add(m, R"({"qom-type":"authz-list","id":"a1","policy":"allow",
                         "rules":[{"match":"e*","policy":"deny","format":"glob"},{"match":"bob","policy":"allow"}]})"));
  EXPECT_FALSE(*authorize(m, "a1", "eve"));
  EXPECT_TRUE(*authorize(m, "a1", "zed"));
  EXPECT_EQ(*m.qom_get("/objects/a1", "rules"),
            json::parse(R"([{"match":"e*","policy":"deny","format":"glob"},{"match":"bob","policy":"allow"}])"));
  EXPECT_EQ(m.qom_set("/objects/a1", "policy", "bogus").error().desc, "Parameter 'policy' does not accept value 'bogus'");
  EXPECT_EQ(authorize(m, "zz", "x").error().desc, "Cannot find QAuthZ object ID zz");
  ASSERT_TRUE(add(m, R"({"qom-type":"secret","id":"s","data":"x"})"));
  EXPECT_EQ(authorize(m, "s", "x").error().desc, "Object 's' is not a QAuthZ subclass");
  // authz-listfile (QSD cannot create it; blockd can): reloads when the file changes.
  auto d = tmpdir("authz");
  std::string f = d + "/rules.json";
  std::ofstream(f) << R"({"policy":"deny","rules":[{"match":"bob","policy":"allow"}]})";
  ASSERT_TRUE(add(m, R"({"qom-type":"authz-listfile","id":"lf","filename":")" + f + R"("})"));
  EXPECT_EQ(*m.qom_list("/objects"), *m.qom_list("/objects"));
  EXPECT_EQ(*m.qom_get("/objects/lf", "type"), "authz-list-file");
  EXPECT_TRUE(*authorize(m, "lf", "bob"));
  EXPECT_FALSE(*authorize(m, "lf", "eve"));
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  std::ofstream(f) << R"({"policy":"allow","rules":[]})";
  EXPECT_TRUE(*authorize(m, "lf", "eve"));
  std::ofstream(f) << "{not json";
  EXPECT_FALSE(*authorize(m, "lf", "eve"));  // a file that fails to load refuses everyone
}

TEST(ObjectThreadContext, AffinityTexts) {
  model m;
  EXPECT_EQ(err(m, R"({"qom-type":"thread-context","id":"t","cpu-affinity":[]})"), "CPU list is empty");
  EXPECT_EQ(err(m, R"({"qom-type":"thread-context","id":"t","node-affinity":[]})"), "Node list is empty");
  EXPECT_EQ(err(m, R"({"qom-type":"thread-context","id":"t","node-affinity":[999]})"), "The nodes select no CPUs");
  EXPECT_EQ(err(m, R"({"qom-type":"thread-context","id":"t","cpu-affinity":[0],"node-affinity":[0]})"),
            "Mixing CPU and node affinity not supported");
  EXPECT_EQ(err(m, R"({"qom-type":"thread-context","id":"t","cpu-affinity":[9999]})"),
            "Setting CPU affinity failed: Invalid argument");
  ASSERT_TRUE(add(m, R"({"qom-type":"thread-context","id":"t1","cpu-affinity":[0,0]})"));
  EXPECT_EQ(*m.qom_get("/objects/t1", "cpu-affinity"), json::parse("[0]"));
  EXPECT_EQ(m.qom_get("/objects/t1", "node-affinity").error().desc,
            "Property 'thread-context.node-affinity' is not readable");
  EXPECT_EQ(m.qom_set("/objects/t1", "cpu-affinity", json::parse("[70000]")).error().desc,
            "Parameter 'null' expects uint16_t");
  auto* tc = m.find_as<thread_context_object>("t1");
  ASSERT_TRUE(tc);
  cpu_set_t s = tc->cpu_set();
  EXPECT_TRUE(CPU_ISSET(0, &s));
  EXPECT_EQ(CPU_COUNT(&s), 1);
  std::thread([&] {
    ASSERT_TRUE(tc->apply_to_current_thread());
    EXPECT_EQ(sched_getcpu(), 0);
  }).join();
  if (!thread_context_object::node_cpus(0).empty())
    EXPECT_EQ(err(m, R"({"qom-type":"thread-context","id":"t2","node-affinity":[0]})"), "<ok>");
}

TEST(ObjectIothread, ThreadContextExtension) {
  model m;
  // Checked after QSD's own properties and checks, at completion, naming the iothread and the way out.
  EXPECT_EQ(err(m, R"({"qom-type":"iothread","id":"io0","thread-context":"tc0"})"),
            "iothread 'io0': Cannot find thread-context 'tc0'; create it first (object-add "
            "qom-type=thread-context,id=tc0,cpu-affinity=[...]) or leave thread-context out");
  EXPECT_EQ(m.find("io0"), nullptr);  // the failed completion released the id
  EXPECT_EQ(err(m, R"({"qom-type":"iothread","id":"io0","thread-context":"tc0","poll-max-ns":-1})"),
            "poll-max-ns value must be in range [0, 9223372036854775807]");
  EXPECT_EQ(err(m, R"({"qom-type":"iothread","id":"io0","thread-context":"tc0","thread-pool-max":0})"),
            "bad thread-pool-min/thread-pool-max values");
  EXPECT_EQ(err(m, R"({"qom-type":"iothread","id":"io0","thread-context":7})"),
            "Invalid parameter type for 'thread-context', expected: string");
  ASSERT_TRUE(add(m, R"({"qom-type":"secret","id":"sec0","data":"x"})"));
  EXPECT_EQ(err(m, R"({"qom-type":"iothread","id":"io0","thread-context":"sec0"})"),
            "iothread 'io0': object 'sec0' is a secret, not a thread-context; name a thread-context object");

  ASSERT_TRUE(add(m, R"({"qom-type":"thread-context","id":"tc0","cpu-affinity":[0]})"));
  ASSERT_TRUE(add(m, R"({"qom-type":"iothread","id":"io0","thread-context":"tc0"})"));
  auto* io = m.find_as<event_loop_object>("io0");
  ASSERT_TRUE(io);
  EXPECT_EQ(io->thread_context(), m.find_as<thread_context_object>("tc0"));
  EXPECT_EQ(*m.qom_get("/objects/io0", "thread-context"), "tc0");
  // In use: the thread-context cannot go while the iothread runs on it.
  EXPECT_FALSE(m.object_del("tc0"));
  EXPECT_EQ(m.users_of("tc0"), std::vector<std::string>{"iothread 'io0'"});
  // qom-set: an unknown id changes nothing; "" unpins and releases the thread-context.
  EXPECT_FALSE(m.qom_set("/objects/io0", "thread-context", "nope"));
  EXPECT_EQ(*m.qom_get("/objects/io0", "thread-context"), "tc0");
  EXPECT_EQ(io->thread_context(), m.find_as<thread_context_object>("tc0"));
  EXPECT_TRUE(m.qom_set("/objects/io0", "thread-context", ""));
  EXPECT_EQ(io->thread_context(), nullptr);
  EXPECT_TRUE(m.users_of("tc0").empty());
  EXPECT_TRUE(m.qom_set("/objects/io0", "thread-context", "tc0"));
  EXPECT_EQ(m.users_of("tc0").size(), 1u);
  // Deleting the iothread releases it.
  EXPECT_TRUE(m.object_del("io0"));
  EXPECT_TRUE(m.object_del("tc0"));
  // main-loop has no such property.
  ASSERT_TRUE(add(m, R"({"qom-type":"main-loop","id":"ml"})"));
  EXPECT_EQ(m.qom_get("/objects/ml", "thread-context").error().desc, "Property 'main-loop.thread-context' not found");
}

TEST(ObjectIothread, ThreadContextChangeRefusedByTheLoopKeepsTheOld) {
  // What the supervisor's subclass does when re-pinning fails (say, sched_setaffinity's EINVAL).
  struct refusing_iothread : event_loop_object {
    using event_loop_object::event_loop_object;
    int calls = 0;
    result<void> thread_context_changed() override {
      ++calls;
      return fail("Setting CPU affinity failed: Invalid argument");
    }
  };
  type_registry r;
  register_builtin_types(r);
  ASSERT_TRUE(r.install_factory("iothread", [](const std::string&, const json::object& props)
                                              -> result<std::unique_ptr<object>> {
    auto p = event_loop_object::parse(false, props);
    if (!p) return std::unexpected(p.error());
    return std::make_unique<refusing_iothread>(false, *p);
  }));
  model m(r);
  ASSERT_TRUE(add(m, R"({"qom-type":"thread-context","id":"a","cpu-affinity":[0]})"));
  ASSERT_TRUE(add(m, R"({"qom-type":"thread-context","id":"b","cpu-affinity":[0]})"));
  ASSERT_TRUE(add(m, R"({"qom-type":"iothread","id":"io0","thread-context":"a"})"));
  auto* io = m.find_as<refusing_iothread>("io0");
  EXPECT_EQ(m.qom_set("/objects/io0", "thread-context", "b").error().desc, "Setting CPU affinity failed: Invalid argument");
  EXPECT_EQ(io->calls, 1);
  EXPECT_EQ(*m.qom_get("/objects/io0", "thread-context"), "a");
  EXPECT_EQ(io->thread_context(), m.find_as<thread_context_object>("a"));
  EXPECT_EQ(m.users_of("a").size(), 1u);
  EXPECT_TRUE(m.users_of("b").empty());
}

// Unit tests for the schema: introspection structure against QSD 7.2's real output, validator messages.
#include <gtest/gtest.h>

#include <boost/json.hpp>
#include <algorithm>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include "protocol/qmp/introspect.h"
#include "protocol/qmp/json_writer.h"
#include "protocol/qmp/schema.h"
#include "protocol/qmp/visitor.h"

using namespace blockd::qmp;
namespace json = boost::json;

namespace {

using table = std::map<std::string, json::object>;

table index(const json::array& a) {
  table t;
  for (auto& e : a) t[std::string(e.at("name").as_string())] = e.as_object();
  return t;
}

// Resolves masked names recursively so two introspection outputs can be compared by structure.
json::value resolve(const table& t, const std::string& name, std::set<std::string>& stack) {
  if (name.size() > 1 && name.front() == '[')
    return json::object{{"array-of", resolve(t, name.substr(1, name.size() - 2), stack)}};
  auto it = t.find(name);
  if (it == t.end()) return json::value("?" + name);
  if (it->second.at("meta-type") == "builtin") return json::value(name);
  if (stack.count(name)) return json::value("<recursive>");
  stack.insert(name);
  json::object o = it->second;
  o.erase("name");
  for (const char* k : {"arg-type", "ret-type", "element-type"})
    if (o.contains(k)) o[k] = resolve(t, std::string(o[k].as_string()), stack);
  if (o.contains("members"))
    for (auto& m : o["members"].as_array())
      if (m.as_object().contains("type")) m.as_object()["type"] = resolve(t, std::string(m.at("type").as_string()), stack);
  if (o.contains("variants"))
    for (auto& v : o["variants"].as_array()) v.as_object()["type"] = resolve(t, std::string(v.at("type").as_string()), stack);
  stack.erase(name);
  return o;
}

// blockd's extensions are optional members named x-... (documented in the README); they are left
// out of the comparison on both sides, so QSD's structure is compared with what is QSD's.
json::value strip_extensions(json::value v) {
  if (v.is_array())
    for (auto& x : v.as_array()) x = strip_extensions(x);
  if (!v.is_object()) return v;
  json::object& o = v.as_object();
  for (auto& kv : o) kv.value() = strip_extensions(kv.value());
  if (auto* m = o.if_contains("members"); m && m->is_array()) {
    json::array kept;
    for (auto& x : m->as_array())
      if (!x.is_object() || !x.as_object().contains("name") || !x.at("name").as_string().starts_with("x-"))
        kept.push_back(x);
    *m = kept;
  }
  return v;
}

std::string canon(const json::value& v) { return to_json(strip_extensions(v), false); }

table qsd72() {
  std::ifstream f(std::string(BLOCKD_TEST_DATA_DIR) + "/qsd-7.2-qmp-schema.json");
  std::stringstream ss;
  ss << f.rdbuf();
  return index(json::parse(ss.str()).as_array());
}

TEST(Introspection, SameStructureAsQsdForEveryEntityBlockdHas) {
  auto ours = index(introspect(qsd_schema()));
  auto theirs = qsd72();
  // Entities whose type changed between 7.2 and 10.2 are compared separately below.
  std::set<std::string> changed = {"object-add",      "BLOCK_IO_ERROR",          "blockdev-add",
                                   "blockdev-reopen", "query-named-block-nodes", "query-block",
                                   "query-blockstats", "blockdev-set-active",     "blockdev-create",
                                   "x-blockdev-amend", "nbd-server-start",     "block-export-add",
                                   "qom-list-get",  // new in 10.1
                                   "chardev-add",   "chardev-change",  // ChardevBackend: see Chardev102
                                   "transaction",  // blockd has a subset of the action kinds: see below
                                   // block jobs: 8.x/10.x members and deprecations, see BlockJobCommandsFollow102
                                   "block-commit", "block-stream", "blockdev-mirror", "query-block-jobs",
                                   "block-job-pause", "block-job-resume", "block-job-complete", "block-job-dismiss",
                                   "block-job-finalize",
                                   "block-job-change",  // new in 8.2: see BlockJobCommandsFollow102
                                   "blockdev-backup", "drive-backup"};  // 9.1/10.1 members: BlockJobCommandsFollow102
  int compared = 0;
  for (auto& [name, e] : ours) {
    auto meta = e.at("meta-type").as_string();
    if (meta != "command" && meta != "event") continue;
    if (changed.count(name)) continue;
    ASSERT_TRUE(theirs.count(name)) << name;
    std::set<std::string> s1, s2;
    EXPECT_EQ(canon(resolve(theirs, name, s2)), canon(resolve(ours, name, s1))) << name;
    ++compared;
  }
  // control+introspect, object-del, the qom-* commands 7.2 has, events, block commands, graph dump, set-iothread, job-* and query-jobs,
  // the two internal snapshot commands, the export commands but block-export-add and nbd-server-start
  // (10.2 added allow-inactive, handshake-max-seconds and the keep-alive tunables)
  EXPECT_EQ(5 + 1 + 12 + 3 + 1 + 1 + 7 + 2 + 5 + 5 + 6 + 7 + 3 + 1 + 2 + 1, compared);  // + drive-mirror  // + block-job-set-speed/-cancel  // + x-blockdev-change  // + qom-list/-get/-set/-list-types/-list-properties
  // + query-chardev, query-chardev-backends, ringbuf-write/-read, chardev-remove, chardev-send-break
  // + the six block-dirty-bitmap-* commands and x-debug-block-dirty-bitmap-sha256
  // + blockdev-snapshot, blockdev-snapshot-sync, change-backing-file
}

TEST(Introspection, BlockJobCommandsFollow102) {
  auto ours = index(introspect(qsd_schema()));
  auto theirs = qsd72();
  auto members = [](table& t, const std::string& cmd) {
    std::set<std::string> out;
    for (auto& m : t.at(std::string(t.at(cmd).at("arg-type").as_string())).at("members").as_array())
      out.insert(std::string(m.at("name").as_string()));
    return out;
  };
  // 10.2 = 7.2's members plus backing-mask-protocol (8.0) for commit and stream, target-is-zero (10.1) for mirror.
  std::map<std::string, std::string> added = {
      {"block-commit", "backing-mask-protocol"}, {"block-stream", "backing-mask-protocol"}, {"blockdev-mirror", "target-is-zero"}};
  for (auto& [cmd, extra] : added) {
    auto want = members(theirs, cmd);
    want.insert(extra);
    EXPECT_EQ(want, members(ours, cmd)) << cmd;
  }
  // Backup: 7.2's BackupCommon plus discard-source (9.1) and on-cbw-error (10.1); drive-backup is deprecated.
  for (const char* cmd : {"blockdev-backup", "drive-backup"}) {
    auto want = members(theirs, cmd);
    want.insert("discard-source");
    want.insert("on-cbw-error");
    EXPECT_EQ(want, members(ours, cmd)) << cmd;
  }
  EXPECT_EQ("deprecated", ours.at("drive-backup").at("features").as_array()[0].as_string());
  // The block-job-* verbs that have job-* twins are deprecated in 10.2; their arguments are 7.2's.
  for (const char* cmd : {"block-job-pause", "block-job-resume", "block-job-complete", "block-job-dismiss", "block-job-finalize"}) {
    EXPECT_EQ(members(theirs, cmd), members(ours, cmd)) << cmd;
    auto f = ours.at(cmd).if_contains("features");
    ASSERT_TRUE(f) << cmd;
    EXPECT_EQ("deprecated", f->as_array()[0].as_string()) << cmd;
  }
  // block-job-change (8.2): BlockJobChangeOptions, a union on the JobType "type" whose only non-empty
  // branch is mirror's copy-mode.
  {
    auto args = ours.at(std::string(ours.at("block-job-change").at("arg-type").as_string()));
    EXPECT_EQ("type", args.at("tag").as_string());
    std::set<std::string> base;
    for (auto& m : args.at("members").as_array()) base.insert(std::string(m.at("name").as_string()));
    EXPECT_EQ((std::set<std::string>{"id", "type"}), base);
    bool seen = false;
    for (auto& v : args.at("variants").as_array()) {
      auto& m = ours.at(std::string(v.at("type").as_string())).at("members").as_array();
      if (v.at("case").as_string() != "mirror") {
        EXPECT_TRUE(m.empty()) << v.at("case").as_string();
        continue;
      }
      seen = true;
      ASSERT_EQ(1u, m.size());
      EXPECT_EQ("copy-mode", m[0].at("name").as_string());
    }
    EXPECT_TRUE(seen);
  }
  // BlockJobInfo: a union on the JobType "type" (10.2), with mirror's actively-synced.
  auto info = ours.at(std::string(ours.at(std::string(ours.at("query-block-jobs").at("ret-type").as_string())).at("element-type").as_string()));
  EXPECT_EQ("type", info.at("tag").as_string());
  bool mirror = false;
  for (auto& v : info.at("variants").as_array()) {
    auto t = ours.at(std::string(v.at("type").as_string()));
    auto& m = t.at("members").as_array();
    if (v.at("case").as_string() == "mirror") {
      mirror = true;
      ASSERT_EQ(1u, m.size());
      EXPECT_EQ("actively-synced", m[0].at("name").as_string());
    } else {
      EXPECT_TRUE(m.empty()) << v.at("case").as_string();
    }
  }
  EXPECT_TRUE(mirror);
}

TEST(Introspection, TransactionKindsAreQsdsOwn) {
  // blockd's TransactionAction offers only the kinds it runs (backup joins with the jobs): each one
  // must have QSD's data type, and the properties member must be QSD's.
  auto ours = index(introspect(qsd_schema()));
  auto theirs = qsd72();
  auto actions = [](table& t) {
    auto arg = t.at(std::string(t.at("transaction").at("arg-type").as_string()));
    std::string arr = std::string(arg.at("members").as_array()[0].at("type").as_string());
    return t.at(std::string(t.at(arr).at("element-type").as_string()));
  };
  auto o = actions(ours), q = actions(theirs);
  std::map<std::string, std::string> qv;
  for (auto& v : q.at("variants").as_array()) qv[std::string(v.at("case").as_string())] = std::string(v.at("type").as_string());
  int n = 0;
  for (auto& v : o.at("variants").as_array()) {
    std::string kind(v.at("case").as_string());
    if (kind.starts_with("x-")) continue;  // blockd's extensions (README, "Beyond QSD")
    ASSERT_TRUE(qv.count(kind)) << kind;
    // The backup actions' data grew in 9.1/10.1 (BlockJobCommandsFollow102 checks their members).
    if (kind == "blockdev-backup" || kind == "drive-backup") {
      ++n;
      continue;
    }
    std::set<std::string> s1, s2;
    EXPECT_EQ(canon(resolve(theirs, qv[kind], s2)), canon(resolve(ours, std::string(v.at("type").as_string()), s1))) << kind;
    ++n;
  }
  EXPECT_GE(n, 7);
}

TEST(Introspection, BlockdevAddFollows102AndMatchesQsdForBuiltDrivers) {
  auto ours = index(introspect(qsd_schema()));
  auto theirs = qsd72();
  auto arg = [](table& t) { return t.at(std::string(t.at("blockdev-add").at("arg-type").as_string())); };
  auto o = arg(ours), q = arg(theirs);
  EXPECT_EQ("driver", o.at("tag").as_string());
  std::vector<std::string> base;
  for (auto& m : o.at("members").as_array()) base.push_back(std::string(m.at("name").as_string()));
  EXPECT_EQ((std::vector<std::string>{"driver", "node-name", "discard", "cache", "active", "read-only",
                                      "auto-read-only", "force-share", "detect-zeroes"}),
            base);  // 10.0 added "active"
  std::map<std::string, std::string> ov, qv;
  for (auto& v : o.at("variants").as_array()) ov[std::string(v.at("case").as_string())] = std::string(v.at("type").as_string());
  for (auto& v : q.at("variants").as_array()) qv[std::string(v.at("case").as_string())] = std::string(v.at("type").as_string());
  // 10.2 has every 7.2 driver name (plus the libblkio ones 7.2's build left out).
  EXPECT_EQ(47u, ov.size());
  for (auto& [d, t] : qv) EXPECT_TRUE(ov.count(d)) << d;
  for (const char* d : {"file", "host_device", "null-co", "null-aio"}) {
    std::set<std::string> s1, s2;
    EXPECT_EQ(canon(resolve(theirs, qv.at(d), s2)), canon(resolve(ours, ov.at(d), s1))) << d;
  }
  // raw's file member is the recursive BlockdevRef: compare member names and optionality.
  auto members = [](table& t, const std::string& type) {
    std::string out;
    for (auto& m : t.at(type).at("members").as_array())
      out += std::string(m.at("name").as_string()) + (m.as_object().contains("default") ? "? " : " ");
    return out;
  };
  EXPECT_EQ(members(theirs, qv.at("raw")), members(ours, ov.at("raw")));
}

// The variants (case -> type name) of the union a command takes as its argument member `member`.
std::map<std::string, std::string> arg_variants(table& t, const std::string& cmd, const std::string& member) {
  std::map<std::string, std::string> out;
  for (auto& m : t.at(std::string(t.at(cmd).at("arg-type").as_string())).at("members").as_array())
    if (m.at("name") == member.c_str())
      for (auto& v : t.at(std::string(m.at("type").as_string())).at("variants").as_array())
        out[std::string(v.at("case").as_string())] = std::string(v.at("type").as_string());
  return out;
}

std::string member_names(table& t, const std::string& type) {
  std::string out;
  for (auto& m : t.at(type).at("members").as_array())
    out += (m.as_object().contains("default") ? "*" : "") + std::string(m.at("name").as_string()) + " ";
  return out;
}

// chardev-add/-change take QSD 10.2's ChardevBackend: 7.2's branches minus Windows' console, plus
// hub; pty has its own ChardevPty (path); the socket's reconnect became reconnect-ms; the rest
// is 7.2's structure.
TEST(Introspection, Chardev102BackendFollows102WithQsdsBranches) {
  auto ours = index(introspect(qsd_schema()));
  auto theirs = qsd72();
  for (const char* cmd : {"chardev-add", "chardev-change"}) {
    auto ov = arg_variants(ours, cmd, "backend"), qv = arg_variants(theirs, cmd, "backend");
    std::set<std::string> oc, qc;
    for (auto& [c, t] : ov) oc.insert(c);
    for (auto& [c, t] : qv) qc.insert(c);
    qc.erase("console");
    qc.insert("hub");
    EXPECT_EQ(qc, oc) << cmd;
    auto data = [](table& t, const std::string& wrapper) {
      return std::string(t.at(wrapper).at("members").as_array()[0].at("type").as_string());
    };
    for (const char* same : {"file", "serial", "null", "mux", "stdio", "ringbuf", "memory", "vc", "dbus"}) {
      std::set<std::string> s1, s2;
      EXPECT_EQ(canon(resolve(theirs, data(theirs, qv.at(same)), s2)), canon(resolve(ours, data(ours, ov.at(same)), s1)))
          << cmd << " " << same;
    }
    EXPECT_EQ("*logfile *logappend *path ", member_names(ours, data(ours, ov.at("pty"))));
    EXPECT_EQ("*logfile *logappend chardevs ", member_names(ours, data(ours, ov.at("hub"))));
    EXPECT_EQ("*logfile *logappend addr *tls-creds *tls-authz *server *wait *nodelay *telnet *tn3270 *websocket *reconnect-ms ",
              member_names(ours, data(ours, ov.at("socket"))));
  }
}

TEST(Introspection, ImageJobCommandsFollow102WithQsdsBranches) {
  auto ours = index(introspect(qsd_schema()));
  auto theirs = qsd72();
  // 10.2's BlockdevDriver adds the libblkio drivers 7.2's build lacked; otherwise the same cases.
  const std::set<std::string> added = {"io_uring", "nvme-io_uring", "virtio-blk-vfio-pci", "virtio-blk-vhost-user",
                                       "virtio-blk-vhost-vdpa"};
  auto oc = arg_variants(ours, "blockdev-create", "options"), qc = arg_variants(theirs, "blockdev-create", "options");
  for (auto& [d, type] : qc) EXPECT_TRUE(oc.count(d)) << d;
  for (auto& [d, type] : oc) EXPECT_TRUE(qc.count(d) || added.count(d)) << d;
  std::set<std::string> s1, s2;
  EXPECT_EQ(canon(resolve(theirs, qc.at("file"), s2)), canon(resolve(ours, oc.at("file"), s1)));
  // qcow2's encrypt member reaches the crypto enums, which gained values after 7.2 (sm3, sm4).
  EXPECT_EQ(member_names(theirs, qc.at("qcow2")), member_names(ours, oc.at("qcow2")));
  auto oa = arg_variants(ours, "x-blockdev-amend", "options"), qa = arg_variants(theirs, "x-blockdev-amend", "options");
  for (const char* d : {"qcow2", "luks"}) {
    std::set<std::string> a1, a2;
    EXPECT_EQ(canon(resolve(theirs, qa.at(d), a2)), canon(resolve(ours, oa.at(d), a1))) << d;
  }
  EXPECT_EQ(member_names(theirs, std::string(theirs.at("x-blockdev-amend").at("arg-type").as_string())),
            member_names(ours, std::string(ours.at("x-blockdev-amend").at("arg-type").as_string())));
  EXPECT_EQ(member_names(theirs, std::string(theirs.at("blockdev-create").at("arg-type").as_string())),
            member_names(ours, std::string(ours.at("blockdev-create").at("arg-type").as_string())));
  EXPECT_EQ("unstable", ours.at("x-blockdev-amend").at("features").as_array()[0].as_string());
}

// Member names of an object type reached from a command's return type, with '*' for optional ones.
std::vector<std::string> ret_members(table& t, const std::string& cmd, const std::vector<std::string>& path) {
  std::string type(t.at(cmd).at("ret-type").as_string());
  auto deref = [&](std::string ty) {
    auto& e = t.at(ty);
    return e.at("meta-type") == "array" ? std::string(e.at("element-type").as_string()) : ty;
  };
  type = deref(type);
  for (auto& member : path)
    for (auto& m : t.at(type).at("members").as_array())
      if (m.at("name") == member.c_str()) {
        type = deref(std::string(m.at("type").as_string()));
        break;
      }
  std::vector<std::string> out;
  for (auto& m : t.at(type).at("members").as_array())
    out.push_back((m.as_object().contains("default") ? "*" : "") + std::string(m.at("name").as_string()));
  return out;
}

std::vector<std::string> without(std::vector<std::string> v, const std::set<std::string>& drop) {
  std::erase_if(v, [&](const std::string& m) {
    return drop.count(m) || m.find("zone_append") != std::string::npos;
  });
  return v;
}

TEST(Introspection, BlockQueriesFollow102) {
  auto ours = index(introspect(qsd_schema()));
  auto theirs = qsd72();
  // 10.2's BlockDeviceInfo: node-name became mandatory; children and active were added.
  auto o = without(ret_members(ours, "query-named-block-nodes", {}), {"children", "active"});
  auto q = ret_members(theirs, "query-named-block-nodes", {});
  std::replace(q.begin(), q.end(), std::string("*node-name"), std::string("node-name"));
  EXPECT_EQ(q, o);
  // ImageInfo gained limits (8.0) and became BlockNodeInfo + backing-image, which moves backing-image
  // after the base's members; the set of members is otherwise 7.2's.
  auto qi = ret_members(theirs, "query-named-block-nodes", {"image"});
  auto oi = without(ret_members(ours, "query-named-block-nodes", {"image"}), {"*limits"});
  EXPECT_EQ("*backing-image", oi.back());
  std::sort(qi.begin(), qi.end());
  std::sort(oi.begin(), oi.end());
  EXPECT_EQ(qi, oi);
  EXPECT_EQ(ret_members(theirs, "query-blockstats", {}), ret_members(ours, "query-blockstats", {}));
  EXPECT_EQ(ret_members(theirs, "query-blockstats", {"stats"}),
            without(ret_members(ours, "query-blockstats", {"stats"}), {}));
  EXPECT_EQ(ret_members(theirs, "query-block", {}), ret_members(ours, "query-block", {}));
}

TEST(Introspection, ObjectAddFollows102WithEmptyBranchesForEmulatorTypes) {
  auto ours = index(introspect(qsd_schema()));
  auto oa = ours.at(std::string(ours.at("object-add").at("arg-type").as_string()));
  EXPECT_EQ("qom-type", oa.at("tag").as_string());
  auto& variants = oa.at("variants").as_array();
  EXPECT_EQ(51u, variants.size());
  std::map<std::string, std::string> by_case;
  for (auto& v : variants) by_case[std::string(v.at("case").as_string())] = std::string(v.at("type").as_string());
  EXPECT_EQ(0u, ours.at(by_case.at("memory-backend-ram")).at("members").as_array().size());
  EXPECT_EQ(by_case.at("memory-backend-ram"), by_case.at("sev-guest"));
  auto io = ours.at(by_case.at("iothread"));
  std::vector<std::string> names;
  for (auto& m : io.at("members").as_array()) names.push_back(std::string(m.at("name").as_string()));
  // QSD's members, then blockd's one extension (pinning an iothread to a thread-context's CPUs).
  EXPECT_EQ((std::vector<std::string>{"aio-max-batch", "thread-pool-min", "thread-pool-max", "poll-max-ns", "poll-grow",
                                      "poll-shrink", "thread-context"}),
            names);
}

TEST(Introspection, EmptyObjectIsZeroAndBuiltinsByName) {
  auto out = introspect(qsd_schema());
  auto t = index(out);
  auto empty = std::string(t.at("qmp_capabilities").at("ret-type").as_string());
  EXPECT_EQ(0u, t.at(empty).at("members").as_array().size());
  EXPECT_EQ(empty, std::string(t.at("quit").at("arg-type").as_string()));
  EXPECT_TRUE(t.count("str"));
  EXPECT_EQ("builtin", t.at("int").at("meta-type").as_string());
  EXPECT_FALSE(t.count("uint16"));  // integer kinds collapse to int
}

TEST(CommandList, NewestRegistrationFirst) {
  auto l = command_list(qsd_schema());
  ASSERT_GE(l.size(), 7u);
  // char.json comes after block-export.json, block-export.json after block-core.json (as QSD lists them).
  // transaction.json comes after char.json (7.2 and 10.2 both list transaction first).
  EXPECT_EQ("transaction", l[0].at("name").as_string());
  EXPECT_EQ("chardev-send-break", l[1].at("name").as_string());
  EXPECT_EQ("query-block-exports", l[9].at("name").as_string());
  EXPECT_EQ("qmp_capabilities", l[l.size() - 1].at("name").as_string());
}

std::string err(std::string_view type, std::string_view input, input_mode m = input_mode::qmp) {
  auto r = visit(qsd_schema(), type, json::parse(input), m);
  return r ? "OK " + to_json(*r) : r.error().desc;
}

TEST(Visitor, QmpMessagesAsQsd) {
  EXPECT_EQ("Parameter 'id' is missing", err("ObjectOptions", R"({"qom-type": "iothread"})"));
  EXPECT_EQ("Parameter 'qom-type' is missing", err("ObjectOptions", R"({"id": "x"})"));
  EXPECT_EQ("Parameter 'qom-type' does not accept value 'nosuch'", err("ObjectOptions", R"({"qom-type": "nosuch", "id": "x"})"));
  EXPECT_EQ("Parameter 'bogus' is unexpected", err("ObjectOptions", R"({"qom-type": "iothread", "id": "x", "bogus": 1})"));
  EXPECT_EQ("Parameter 'limits.bogus' is unexpected",
            err("ObjectOptions", R"({"qom-type": "throttle-group", "id": "t", "limits": {"bogus": 1}})"));
  EXPECT_EQ("Invalid parameter type for 'id', expected: string", err("ObjectOptions", R"({"qom-type": "iothread", "id": 1})"));
  EXPECT_EQ("Invalid parameter type for 'poll-max-ns', expected: integer",
            err("ObjectOptions", R"({"qom-type": "iothread", "id": "x", "poll-max-ns": "5"})"));
  EXPECT_EQ("Invalid parameter type for 'poll-max-ns', expected: integer",
            err("ObjectOptions", R"({"qom-type": "iothread", "id": "x", "poll-max-ns": 1.0})"));
  EXPECT_EQ("Invalid parameter type for 'poll-max-ns', expected: integer",
            err("ObjectOptions", R"({"qom-type": "iothread", "id": "x", "poll-max-ns": 9223372036854775808})"));
  EXPECT_EQ("Invalid parameter type for 'refresh', expected: boolean",
            err("ObjectOptions", R"({"qom-type": "authz-listfile", "id": "x", "filename": "f", "refresh": "true"})"));
  EXPECT_EQ("Parameter 'serial' expects int32_t",
            err("ObjectOptions", R"({"qom-type": "secret_keyring", "id": "x", "serial": 4294967296})"));
  // Unsigned members (size included) that are not integers: QAPI's type_uint64 text, with the full name.
  EXPECT_EQ("Parameter 'options.size' expects uint64",
            err("q_obj_blockdev-create-arg", R"({"job-id": "c", "options": {"driver": "file", "filename": "f", "size": 1.5}})"));
  EXPECT_EQ("Parameter 'options.extent-size-hint' expects uint64",
            err("q_obj_blockdev-create-arg",
                R"({"job-id": "c", "options": {"driver": "file", "filename": "f", "size": 0, "extent-size-hint": "x"}})"));
  EXPECT_EQ("Parameter 'write-threshold' expects uint64",
            err("q_obj_block-set-write-threshold-arg", R"({"node-name": "n", "write-threshold": 18446744073709551616})"));
  EXPECT_EQ("Parameter 'null' does not accept value 'foo'", err("q_obj_qmp_capabilities-arg", R"({"enable": ["foo"]})"));
  EXPECT_EQ("Invalid parameter type for 'enable[0]', expected: string", err("q_obj_qmp_capabilities-arg", R"({"enable": [1]})"));
  EXPECT_EQ("Parameter 'rules[0].policy' is missing",
            err("ObjectOptions", R"({"qom-type": "authz-list", "id": "a", "rules": [{"match": "x"}]})"));
  EXPECT_EQ(R"(OK {"qom-type": "iothread", "poll-max-ns": 5, "id": "x"})",
            err("ObjectOptions", R"({"qom-type": "iothread", "id": "x", "poll-max-ns": 5})"));
}

TEST(Visitor, KeyvalConversionsAsQsd) {
  auto kv = input_mode::keyval;
  EXPECT_EQ("Parameter 'poll-max-ns' expects integer",
            err("ObjectOptions", R"({"qom-type": "iothread", "id": "x", "poll-max-ns": "abc"})", kv));
  EXPECT_EQ(R"(OK {"qom-type": "iothread", "poll-max-ns": 4096, "id": "x"})",
            err("ObjectOptions", R"({"qom-type": "iothread", "id": "x", "poll-max-ns": "0x1000"})", kv));
  EXPECT_EQ("Parameters 'poll-max-ns.*' are unexpected",
            err("ObjectOptions", R"({"qom-type": "iothread", "id": "x", "poll-max-ns": {"a": "1"}})", kv));
  EXPECT_EQ("Invalid parameter type for 'cpu-affinity', expected: array",
            err("ObjectOptions", R"({"qom-type": "thread-context", "id": "t", "cpu-affinity": "1"})", kv));
  EXPECT_EQ("Invalid parameter type for 'limits', expected: object",
            err("ObjectOptions", R"({"qom-type": "throttle-group", "id": "t", "limits": "5"})", kv));
  EXPECT_EQ("Parameter 'policy' does not accept value 'maybe'",
            err("ObjectOptions", R"({"qom-type": "authz-list", "id": "a", "rules": [{"match": "x", "policy": "maybe"}]})"));
  EXPECT_EQ("Parameter 'pretty' expects 'on' or 'off'", err("MonitorOptions", R"({"chardev": "c", "pretty": "maybe"})", kv));
  EXPECT_EQ(R"(OK {"chardev": "c", "pretty": true})", err("MonitorOptions", R"({"chardev": "c", "pretty": "on"})", kv));
  EXPECT_EQ("Parameter 'null' expects uint16_t",
            err("ObjectOptions", R"({"qom-type": "thread-context", "id": "t", "cpu-affinity": ["1", "70000"]})", kv));
}

}  // namespace

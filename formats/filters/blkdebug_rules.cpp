// blkdebug's rule parsing (config file, blockdev-add options) and rule engine; parsing on the opening thread, the engine on the node's home iothread.
#include "formats/filters/blkdebug_rules.h"

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>

namespace blockd::block {

uint32_t iotype_of(io_op op) {
  switch (op) {
    case io_op::read: return iot_read;
    case io_op::write: return iot_write;
    case io_op::write_zeroes: return iot_write_zeroes;
    case io_op::discard: return iot_discard;
    case io_op::flush: return iot_flush;
    case io_op::block_status: return iot_block_status;
  }
  return 0;
}

namespace {

constexpr std::string_view iotype_names[] = {"read", "write", "write-zeroes", "discard", "flush", "block-status"};

bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; }

// One group of the file as QEMU collects it: its name and key/value pairs, later ones replacing
// earlier ones with the same key.
struct group {
  std::string name;
  std::vector<std::pair<std::string, std::string>> kv;
  void put(std::string k, std::string v) {
    for (auto& [key, val] : kv)
      if (key == k) {
        val = std::move(v);
        return;
      }
    kv.emplace_back(std::move(k), std::move(v));
  }
  const std::string* get(std::string_view k) const {
    for (auto& [key, val] : kv)
      if (key == k) return &val;
    return nullptr;
  }
};

// QemuOpts' number syntax (strtoull, base 0, the whole string): "-1" wraps as it does there.
bool parse_number(const std::string& s, int64_t& out) {
  const char* p = s.c_str();
  while (is_space(*p)) ++p;
  if (!*p) return false;
  errno = 0;
  char* end = nullptr;
  unsigned long long v = std::strtoull(p, &end, 0);
  if (end == p || *end || errno == ERANGE) return false;
  out = int64_t(v);
  return true;
}

bool parse_bool(const std::string& s, bool& out) {
  if (s == "on" || s == "yes" || s == "true" || s == "y") return out = true, true;
  if (s == "off" || s == "no" || s == "false" || s == "n") return out = false, true;
  return false;
}

// What a group accepts, and the type each key is checked against when the group is read.
enum class kind { str, num, boolean };
const std::vector<std::pair<std::string_view, kind>>* group_keys(const std::string& name) {
  static const std::vector<std::pair<std::string_view, kind>> inject = {
      {"event", kind::str}, {"state", kind::num},  {"iotype", kind::str},     {"errno", kind::num},
      {"sector", kind::num}, {"once", kind::boolean}, {"immediately", kind::boolean}};
  static const std::vector<std::pair<std::string_view, kind>> set_state = {
      {"event", kind::str}, {"state", kind::num}, {"new_state", kind::num}};
  if (name == "inject-error") return &inject;
  if (name == "set-state") return &set_state;
  return nullptr;
}

result<void> check_group(const group& g) {
  auto* keys = group_keys(g.name);
  if (!keys) return fail("There is no option group '" + g.name + "'");
  for (auto& [k, v] : g.kv) {
    auto it = std::find_if(keys->begin(), keys->end(), [&](auto& e) { return e.first == k; });
    if (it == keys->end()) return fail("Invalid parameter '" + k + "'");
    int64_t n;
    bool b;
    if (it->second == kind::num && !parse_number(v, n)) return fail("Parameter '" + k + "' expects a number");
    if (it->second == kind::boolean && !parse_bool(v, b)) return fail("Parameter '" + k + "' expects 'on' or 'off'");
  }
  return {};
}

result<blkdebug_event> event_of(const std::string* name) {
  if (!name) return fail("Missing event name for rule");
  auto e = parse_blkdebug_event(*name);
  if (!e) return fail("invalid parameter value: " + *name);
  return *e;
}

int64_t num_or(const group& g, std::string_view k, int64_t dflt) {
  int64_t n = dflt;
  if (auto* v = g.get(k)) parse_number(*v, n);
  return n;
}
bool bool_or(const group& g, std::string_view k, bool dflt) {
  bool b = dflt;
  if (auto* v = g.get(k)) parse_bool(*v, b);
  return b;
}

result<uint32_t> iotypes_of(const std::string* name) {
  if (!name) return iot_default;
  for (size_t i = 0; i < std::size(iotype_names); ++i)
    if (iotype_names[i] == *name) return uint32_t(1u << i);
  return fail("invalid parameter value: " + *name);
}

// sector * 512 in QEMU's unsigned arithmetic; -1 stays "any sector".
int64_t offset_of_sector(int64_t sector) { return sector == -1 ? -1 : int64_t(uint64_t(sector) * 512u); }

// Reads one token of up to `max` non-space characters after optional white space (sscanf's %Ns).
bool scan_token(std::string_view line, size_t& pos, size_t max, std::string& out) {
  while (pos < line.size() && is_space(line[pos])) ++pos;
  size_t start = pos;
  while (pos < line.size() && !is_space(line[pos]) && pos - start < max) ++pos;
  out.assign(line.substr(start, pos - start));
  return !out.empty();
}
// Reads up to `max` characters other than `stop`, at least one (sscanf's %N[^c]).
bool scan_until(std::string_view line, size_t& pos, size_t max, char stop, std::string& out) {
  size_t start = pos;
  while (pos < line.size() && line[pos] != stop && pos - start < max) ++pos;
  out.assign(line.substr(start, pos - start));
  return !out.empty();
}
void skip_space(std::string_view line, size_t& pos) {
  while (pos < line.size() && is_space(line[pos])) ++pos;
}

}  // namespace

result<void> parse_blkdebug_config(std::string_view text, rule_set& out) {
  std::vector<group> groups;
  bool open = false;
  // QEMU reads the file with fgets into 1024 bytes: a longer line is read as several, and a NUL
  // ends what sscanf sees of one.
  size_t pos = 0;
  while (pos < text.size()) {
    size_t nl = text.find('\n', pos);
    size_t end = nl == std::string_view::npos ? text.size() : nl + 1;
    end = std::min(end, pos + 1023);
    std::string_view line = text.substr(pos, end - pos);
    pos = end;
    if (size_t z = line.find('\0'); z != std::string_view::npos) line = line.substr(0, z);
    if (line.empty() || line[0] == '\n' || line[0] == '#') continue;
    if (line[0] == '[') {
      std::string name, id;
      size_t p = 1;
      bool with_id = false;
      if (scan_token(line, p, 63, name)) {
        skip_space(line, p);
        if (p < line.size() && line[p] == '"') {
          ++p;
          with_id = scan_until(line, p, 63, '"', id);
        }
      }
      if (!with_id) {
        p = 1;
        if (!scan_until(line, p, 63, ']', name)) continue;  // "[]": no new group, as in QEMU
      }
      if (open) {
        auto ok = check_group(groups.back());
        if (!ok) return ok;
      }
      groups.push_back({name, {}});
      open = true;
      continue;
    }
    size_t p = 0;
    std::string key, value;
    if (!scan_token(line, p, 63, key)) return fail("parse error");
    skip_space(line, p);
    if (p < line.size() && line[p] == '=') {
      ++p;
      skip_space(line, p);
      if (p < line.size() && line[p] == '"') {
        ++p;
        if (!scan_until(line, p, 1023, '"', value)) value.clear();
      }
    }
    if (!open) return fail("no group defined");
    groups.back().put(std::move(key), std::move(value));
  }
  if (open) {
    auto ok = check_group(groups.back());
    if (!ok) return ok;
  }
  // Rules are made once the whole file is read: every inject-error group, then every set-state one.
  for (auto& g : groups) {
    if (g.name != "inject-error") continue;
    auto ev = event_of(g.get("event"));
    if (!ev) return std::unexpected(ev.error());
    auto io = iotypes_of(g.get("iotype"));
    if (!io) return std::unexpected(io.error());
    inject_rule r;
    r.event = *ev;
    r.state = num_or(g, "state", 0);
    r.iotypes = *io;
    r.error = num_or(g, "errno", EIO);
    r.offset = offset_of_sector(num_or(g, "sector", -1));
    r.once = bool_or(g, "once", false);
    r.immediately = bool_or(g, "immediately", false);
    out.inject.push_back(r);
  }
  for (auto& g : groups) {
    if (g.name != "set-state") continue;
    auto ev = event_of(g.get("event"));
    if (!ev) return std::unexpected(ev.error());
    out.set_state.push_back({*ev, num_or(g, "state", 0), num_or(g, "new_state", 0)});
  }
  return {};
}

result<void> read_blkdebug_config(const std::string& path, rule_set& out) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return fail(std::string("Could not read blkdebug config file: ") + std::strerror(errno ? errno : ENOENT));
  std::ostringstream ss;
  ss << f.rdbuf();
  return parse_blkdebug_config(ss.str(), out);
}

namespace {
int64_t json_int(const boost::json::object& o, const char* key, int64_t dflt) {
  auto* v = o.if_contains(key);
  if (!v) return dflt;
  if (v->is_uint64()) return int64_t(v->as_uint64());
  if (v->is_int64()) return v->as_int64();
  return dflt;
}
bool json_bool(const boost::json::object& o, const char* key, bool dflt) {
  auto* v = o.if_contains(key);
  return v && v->is_bool() ? v->as_bool() : dflt;
}
const std::string* json_str(const boost::json::object& o, const char* key, std::string& buf) {
  auto* v = o.if_contains(key);
  if (!v || !v->is_string()) return nullptr;
  buf = std::string(v->as_string());
  return &buf;
}
}  // namespace

result<void> parse_blkdebug_options(const boost::json::object& options, rule_set& out) {
  if (auto* a = options.if_contains("inject-error"); a && a->is_array()) {
    for (auto& v : a->as_array()) {
      if (!v.is_object()) continue;
      auto& o = v.as_object();
      std::string ename, iname;
      auto ev = event_of(json_str(o, "event", ename));
      if (!ev) return std::unexpected(ev.error());
      auto io = iotypes_of(json_str(o, "iotype", iname));
      if (!io) return std::unexpected(io.error());
      inject_rule r;
      r.event = *ev;
      r.state = json_int(o, "state", 0);
      r.iotypes = *io;
      r.error = json_int(o, "errno", EIO);
      r.offset = offset_of_sector(json_int(o, "sector", -1));
      r.once = json_bool(o, "once", false);
      r.immediately = json_bool(o, "immediately", false);
      out.inject.push_back(r);
    }
  }
  if (auto* a = options.if_contains("set-state"); a && a->is_array()) {
    for (auto& v : a->as_array()) {
      if (!v.is_object()) continue;
      auto& o = v.as_object();
      std::string ename;
      auto ev = event_of(json_str(o, "event", ename));
      if (!ev) return std::unexpected(ev.error());
      out.set_state.push_back({*ev, json_int(o, "state", 0), json_int(o, "new_state", 0)});
    }
  }
  return {};
}

blkdebug_engine::blkdebug_engine(rule_set rules) : rules_(std::move(rules)) {
  uint64_t id = 0;
  for (auto& r : rules_.inject) r.id = ++id;
}

void blkdebug_engine::event(blkdebug_event e) {
  // Rules look at the state the event found; the first set-state rule that matches picks the next
  // one (QEMU walks its rules newest first, so the oldest match is the last word).
  int64_t next = state_;
  for (auto& r : rules_.set_state)
    if (r.event == e && (r.state == 0 || r.state == state_)) {
      next = r.new_state;
      break;
    }
  bool injected = false;
  for (auto& r : rules_.inject) {
    if (r.event != e || (r.state != 0 && r.state != state_)) continue;
    if (!injected) active_.clear();
    injected = true;
    active_.push_back(r.id);
  }
  state_ = next;
}

blkdebug_engine::verdict blkdebug_engine::check(io_op op, int64_t offset, int64_t length) {
  uint32_t type = iotype_of(op);
  if (op == io_op::flush) offset = length = 0;  // a flush covers no sector
  for (size_t i = 0; i < active_.size(); ++i) {
    auto it = std::find_if(rules_.inject.begin(), rules_.inject.end(), [&](auto& r) { return r.id == active_[i]; });
    if (it == rules_.inject.end()) continue;
    const inject_rule& r = *it;
    uint64_t at = uint64_t(r.offset), off = uint64_t(offset);
    bool covers = r.offset == -1 || (length > 0 && at >= off && at < off + uint64_t(length));
    if (!covers || !(r.iotypes & type)) continue;
    // The first matching rule decides; one with no error lets the request through (QEMU's rule).
    if (r.error <= 0) return {};
    verdict v{int(-std::min<int64_t>(r.error, 4095)), r.immediately};
    if (r.once) {
      active_.erase(active_.begin() + ptrdiff_t(i));
      rules_.inject.erase(it);
    }
    return v;
  }
  return {};
}

}  // namespace blockd::block

// QMP output writer: QDict member order, ASCII-only escaping, QEMU number formats; any thread.
#include "protocol/qmp/json_writer.h"

#include <algorithm>
#include <cstdio>
#include <vector>

#include "protocol/qmp/utf8.h"

namespace blockd::qmp {

unsigned qdict_bucket(std::string_view key) {
  // QDict hashes keys with the TDB hash into 512 buckets.
  uint32_t v = 0x238F13AFu * static_cast<uint32_t>(key.size());
  for (size_t i = 0; i < key.size(); ++i)
    v += static_cast<uint32_t>(static_cast<unsigned char>(key[i])) << (i * 5 % 24);
  return (1103515243u * v + 12345u) % 512u;
}

namespace {

void put_hex4(std::string& out, uint32_t u) {
  char buf[8];
  std::snprintf(buf, sizeof buf, "\\u%04X", u);
  out += buf;
}

void put_string(std::string& out, std::string_view s) {
  out.push_back('"');
  for (size_t i = 0; i < s.size();) {
    uint32_t cp = next_qemu_codepoint(s, i);  // utf8.h: QEMU's decoding and replacements
    switch (cp) {
      case '"': out += "\\\""; continue;
      case '\\': out += "\\\\"; continue;
      case '\b': out += "\\b"; continue;
      case '\f': out += "\\f"; continue;
      case '\n': out += "\\n"; continue;
      case '\r': out += "\\r"; continue;
      case '\t': out += "\\t"; continue;
      default: break;
    }
    if (cp >= 0x20 && cp < 0x7F) {
      out.push_back(static_cast<char>(cp));
    } else if (cp < 0x10000) {
      put_hex4(out, cp);
    } else {
      cp -= 0x10000;
      put_hex4(out, 0xD800 + (cp >> 10));
      put_hex4(out, 0xDC00 + (cp & 0x3FF));
    }
  }
  out.push_back('"');
}

void newline(std::string& out, bool pretty, int level) {
  if (!pretty) return;
  out.push_back('\n');
  out.append(static_cast<size_t>(level) * 4, ' ');
}

void put_value(std::string& out, const boost::json::value& v, bool pretty, int level) {
  char buf[64];
  switch (v.kind()) {
    case boost::json::kind::null: out += "null"; return;
    case boost::json::kind::bool_: out += v.get_bool() ? "true" : "false"; return;
    case boost::json::kind::int64:
      std::snprintf(buf, sizeof buf, "%lld", static_cast<long long>(v.get_int64()));
      out += buf;
      return;
    case boost::json::kind::uint64:
      std::snprintf(buf, sizeof buf, "%llu", static_cast<unsigned long long>(v.get_uint64()));
      out += buf;
      return;
    case boost::json::kind::double_:
      std::snprintf(buf, sizeof buf, "%.17g", v.get_double());
      out += buf;
      return;
    case boost::json::kind::string: put_string(out, v.get_string()); return;
    case boost::json::kind::array: {
      const auto& a = v.get_array();
      out.push_back('[');
      bool first = true;
      for (const auto& e : a) {
        if (!first) out.push_back(',');
        if (!pretty && !first) out.push_back(' ');
        newline(out, pretty, level + 1);
        put_value(out, e, pretty, level + 1);
        first = false;
      }
      newline(out, pretty, level);
      out.push_back(']');
      return;
    }
    case boost::json::kind::object: {
      const auto& o = v.get_object();
      // Order members as QEMU's QDict iterates them: by bucket, newest first within a bucket.
      std::vector<std::pair<unsigned, size_t>> order;
      order.reserve(o.size());
      size_t idx = 0;
      for (const auto& kv : o) order.emplace_back(qdict_bucket(kv.key()), idx++);
      std::stable_sort(order.begin(), order.end(), [](const auto& a, const auto& b) {
        return a.first != b.first ? a.first < b.first : a.second > b.second;
      });
      out.push_back('{');
      bool first = true;
      for (auto [bucket, i] : order) {
        const auto& kv = *(o.begin() + static_cast<std::ptrdiff_t>(i));
        if (!first) out.push_back(',');
        if (!pretty && !first) out.push_back(' ');
        newline(out, pretty, level + 1);
        put_string(out, kv.key());
        out += ": ";
        put_value(out, kv.value(), pretty, level + 1);
        first = false;
      }
      newline(out, pretty, level);
      out.push_back('}');
      return;
    }
  }
}

}  // namespace

std::string to_json(const boost::json::value& v, bool pretty) {
  std::string out;
  put_value(out, v, pretty, 0);
  return out;
}

}  // namespace blockd::qmp

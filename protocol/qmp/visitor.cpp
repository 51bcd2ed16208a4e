// QAPI-style input visitor: walks schema types over JSON or keyval input, first error wins; any thread.
#include "protocol/qmp/visitor.h"

#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <optional>
#include <string>

namespace blockd::qmp {
namespace {

struct ctx {
  const schema& s;
  input_mode mode;
};

std::string join(const std::string& path, std::string_view name) {
  return path.empty() ? std::string(name) : path + "." + std::string(name);
}

error type_error(const std::string& path, const char* expected) {
  return error("Invalid parameter type for '" + path + "', expected: " + expected);
}

// qemu_strtosz: a number (possibly fractional) with an optional binary-multiple suffix.
std::optional<uint64_t> parse_size(const std::string& s) {
  if (s.empty() || s[0] == '-' || std::isspace(static_cast<unsigned char>(s[0]))) return std::nullopt;
  errno = 0;
  char* end = nullptr;
  // Integers are taken exactly; a fraction is only allowed in decimal.
  unsigned long long whole = std::strtoull(s.c_str(), &end, 0);
  if (errno != 0 || end == s.c_str()) return std::nullopt;
  double frac = 0;
  if (*end == '.') {
    char* fend = nullptr;
    double f = std::strtod(s.c_str(), &fend);
    frac = f - std::floor(f);
    end = fend;
  }
  uint64_t mult = 1;
  if (*end) {
    switch (*end) {
      case 'b': case 'B': mult = 1; break;
      case 'k': case 'K': mult = 1ull << 10; break;
      case 'm': case 'M': mult = 1ull << 20; break;
      case 'g': case 'G': mult = 1ull << 30; break;
      case 't': case 'T': mult = 1ull << 40; break;
      case 'p': case 'P': mult = 1ull << 50; break;
      case 'e': case 'E': mult = 1ull << 60; break;
      default: return std::nullopt;
    }
    ++end;
    if (*end) return std::nullopt;
  }
  if (frac != 0 && mult == 1) return std::nullopt;
  long double total = static_cast<long double>(whole) * mult + frac * mult;
  if (total >= 18446744073709551616.0L) return std::nullopt;
  return static_cast<uint64_t>(total);
}

result<boost::json::value> visit_value(const ctx& c, const type_def& t, const boost::json::value& in,
                                       const std::string& path, bool in_list);

// QAPI names a member by its own name (not the dotted path) in range and enum errors, and list
// elements have no name at all: they print as 'null'.
std::string bare_name(const std::string& path, bool in_list) {
  if (in_list) return "null";
  auto dot = path.rfind('.');
  return dot == std::string::npos ? path : path.substr(dot + 1);
}

result<boost::json::value> visit_integer(const ctx& c, const type_def& t, const boost::json::value& in,
                                         const std::string& path, bool in_list) {
  bool is_unsigned = t.sk == scalar::u8 || t.sk == scalar::u16 || t.sk == scalar::u32 || t.sk == scalar::u64 ||
                     t.sk == scalar::size;
  int64_t sval = 0;
  uint64_t uval = 0;
  if (c.mode == input_mode::keyval) {
    if (!in.is_string()) return std::unexpected(type_error(path, "integer"));
    std::string text(in.as_string());
    if (t.sk == scalar::size) {
      auto v = parse_size(text);
      if (!v) return fail("Parameter '" + path + "' expects size");
      return boost::json::value(*v);
    }
    errno = 0;
    char* end = nullptr;
    if (is_unsigned) {
      // Like QEMU's parser, "-1" wraps around; the range check below then refuses it.
      uval = std::strtoull(text.c_str(), &end, 0);
    } else {
      sval = std::strtoll(text.c_str(), &end, 0);
    }
    if (text.empty() || *end != '\0' || errno != 0) return fail("Parameter '" + path + "' expects integer");
  } else {
    if (in.is_int64()) {
      sval = in.get_int64();
      // QAPI accepts negative numbers for unsigned members and wraps them (kept for compatibility);
      // the narrower kinds then fail their range check.
      if (is_unsigned) uval = static_cast<uint64_t>(sval);
    } else if (in.is_uint64() && is_unsigned) {
      uval = in.get_uint64();
    } else if (is_unsigned) {
      // Every unsigned kind (and size) goes through QAPI's type_uint64, which words it this way.
      return fail("Parameter '" + path + "' expects uint64");
    } else {
      return std::unexpected(type_error(path, "integer"));
    }
  }
  auto range = [&](const char* name) { return fail("Parameter '" + bare_name(path, in_list) + "' expects " + name); };
  switch (t.sk) {
    case scalar::i8: if (sval < INT8_MIN || sval > INT8_MAX) return range("int8_t"); break;
    case scalar::i16: if (sval < INT16_MIN || sval > INT16_MAX) return range("int16_t"); break;
    case scalar::i32: if (sval < INT32_MIN || sval > INT32_MAX) return range("int32_t"); break;
    case scalar::u8: if (uval > UINT8_MAX) return range("uint8_t"); break;
    case scalar::u16: if (uval > UINT16_MAX) return range("uint16_t"); break;
    case scalar::u32: if (uval > UINT32_MAX) return range("uint32_t"); break;
    default: break;
  }
  if (is_unsigned) {
    if (uval <= static_cast<uint64_t>(INT64_MAX)) return boost::json::value(static_cast<int64_t>(uval));
    return boost::json::value(uval);
  }
  return boost::json::value(sval);
}

result<boost::json::value> visit_builtin(const ctx& c, const type_def& t, const boost::json::value& in,
                                         const std::string& path, bool in_list) {
  // A keyval tree that nests keys below a scalar member ("a.b=1" for scalar "a").
  if (c.mode == input_mode::keyval && in.is_object() && t.sk != scalar::any)
    return fail("Parameters '" + path + ".*' are unexpected");
  switch (t.sk) {
    case scalar::any: return in;
    case scalar::str:
      if (!in.is_string()) return std::unexpected(type_error(path, "string"));
      return in;
    case scalar::boolean:
      if (c.mode == input_mode::keyval) {
        if (!in.is_string()) return std::unexpected(type_error(path, "boolean"));
        auto s = in.as_string();
        if (s == "on" || s == "yes" || s == "true" || s == "y") return boost::json::value(true);
        if (s == "off" || s == "no" || s == "false" || s == "n") return boost::json::value(false);
        return fail("Parameter '" + path + "' expects 'on' or 'off'");
      }
      if (!in.is_bool()) return std::unexpected(type_error(path, "boolean"));
      return in;
    case scalar::number:
      if (c.mode == input_mode::keyval) {
        if (!in.is_string()) return std::unexpected(type_error(path, "number"));
        std::string text(in.as_string());
        char* end = nullptr;
        errno = 0;
        double d = std::strtod(text.c_str(), &end);
        if (text.empty() || *end || errno || !std::isfinite(d)) return fail("Parameter '" + path + "' expects number");
        return boost::json::value(d);
      }
      if (!in.is_number()) return std::unexpected(type_error(path, "number"));
      return boost::json::value(in.to_number<double>());
    case scalar::null:
      if (!in.is_null()) return std::unexpected(type_error(path, "null"));
      return in;
    default: return visit_integer(c, t, in, path, in_list);
  }
}

result<boost::json::value> visit_members(const ctx& c, const type_def& t, const boost::json::object& in,
                                         const std::string& path, boost::json::object& out,
                                         std::vector<std::string_view>& seen) {
  for (const auto& m : t.members) {
    auto* v = in.if_contains(m.name);
    std::string mpath = join(path, m.name);
    if (!v) {
      if (!m.optional) return fail("Parameter '" + mpath + "' is missing");
      continue;
    }
    auto* mt = c.s.find_type(m.type);
    if (!mt) return fail("internal schema error: unknown type " + m.type);
    auto r = visit_value(c, *mt, *v, mpath, false);
    if (!r) return std::unexpected(r.error());
    out[m.name] = std::move(*r);
    seen.push_back(m.name);
  }
  return boost::json::value(nullptr);
}

result<boost::json::value> visit_object(const ctx& c, const type_def& t, const boost::json::value& in,
                                        const std::string& path) {
  if (!in.is_object()) return std::unexpected(type_error(path.empty() ? std::string("null") : path, "object"));
  const auto& obj = in.get_object();
  boost::json::object out;
  std::vector<std::string_view> seen;
  if (auto r = visit_members(c, t, obj, path, out, seen); !r) return r;
  if (!t.tag.empty()) {
    // Flat union: the discriminator (a base member, already checked) picks the branch.
    std::string tag(out.at(t.tag).as_string());
    bool branch = false;
    for (const auto& v : t.variants) {
      if (v.value != tag) continue;
      auto* bt = c.s.find_type(v.type);
      if (!bt) return fail("internal schema error: unknown type " + v.type);
      if (auto r = visit_members(c, *bt, obj, path, out, seen); !r) return r;
      branch = true;
      break;
    }
    // A discriminator value blockd has no branch for (an emulator-only object type) passes its
    // members through untouched: the command itself then refuses the value with QSD's message,
    // instead of the visitor complaining about members QSD would have accepted.
    if (!branch && t.open_branches) {
      for (const auto& kv : obj)
        if (!out.contains(kv.key())) out[kv.key()] = kv.value();
      return boost::json::value(std::move(out));
    }
  }
  // Whatever was not consumed by a member is an error, reported after the members (QAPI order).
  for (const auto& kv : obj) {
    bool used = false;
    for (auto s : seen)
      if (s == kv.key()) used = true;
    if (!used) return fail("Parameter '" + join(path, kv.key()) + "' is unexpected");
  }
  return boost::json::value(std::move(out));
}

result<boost::json::value> visit_value(const ctx& c, const type_def& t, const boost::json::value& in,
                                       const std::string& path, bool in_list) {
  switch (t.kind) {
    case meta::builtin: return visit_builtin(c, t, in, path, in_list);
    case meta::enumeration: {
      if (!in.is_string()) return std::unexpected(type_error(path, "string"));
      for (auto& v : t.values)
        if (in.as_string() == v) return in;
      // QAPI names list elements 'null' in this one message.
      return fail("Parameter '" + bare_name(path, in_list) + "' does not accept value '" +
                  std::string(in.as_string()) + "'");
    }
    case meta::object: return visit_object(c, t, in, path);
    case meta::array: {
      const type_def* et = c.s.find_type(t.element);
      if (!et) return fail("internal schema error: unknown type " + t.element);
      boost::json::array out;
      if (c.mode == input_mode::keyval && in.is_object() && in.get_object().empty()) return boost::json::value(out);
      if (!in.is_array()) return std::unexpected(type_error(path, "array"));
      size_t i = 0;
      for (const auto& e : in.get_array()) {
        std::string epath = c.mode == input_mode::keyval ? join(path, std::to_string(i)) : path + "[" + std::to_string(i) + "]";
        auto r = visit_value(c, *et, e, epath, true);
        if (!r) return std::unexpected(r.error());
        out.push_back(std::move(*r));
        ++i;
      }
      return boost::json::value(std::move(out));
    }
    case meta::alternate: {
      for (auto& alt : t.alternatives) {
        auto* at = c.s.find_type(alt);
        if (!at) continue;
        bool fits = false;
        switch (at->kind) {
          case meta::object: fits = in.is_object(); break;
          case meta::array: fits = in.is_array(); break;
          case meta::enumeration: fits = in.is_string(); break;
          case meta::builtin:
            fits = (at->sk == scalar::str && in.is_string()) || (at->sk == scalar::null && in.is_null()) ||
                   (at->sk == scalar::boolean && in.is_bool()) || (at->sk == scalar::number && in.is_number()) ||
                   (at->sk != scalar::str && at->sk != scalar::null && at->sk != scalar::boolean &&
                    at->sk != scalar::number && (in.is_int64() || in.is_uint64()));
            break;
          case meta::alternate: break;
        }
        if (fits) return visit_value(c, *at, in, path, in_list);
      }
      // QAPI names the alternate itself in this message.
      return std::unexpected(type_error(path, t.name.c_str()));
    }
  }
  return fail("internal schema error");
}

}  // namespace

result<boost::json::value> visit(const schema& s, std::string_view type_name, const boost::json::value& input,
                                 input_mode mode) {
  auto* t = s.find_type(type_name);
  if (!t) return fail("internal schema error: unknown type " + std::string(type_name));
  return visit_value(ctx{s, mode}, *t, input, "", false);
}

result<boost::json::object> visit_command_args(const schema& s, std::string_view command,
                                               const boost::json::object& args, input_mode mode) {
  auto* c = s.find_command(command);
  if (!c) return fail(error_class::command_not_found, "The command " + std::string(command) + " has not been found");
  std::string type = c->arg_type.empty() ? "q_empty" : c->arg_type;
  auto r = visit(s, type, boost::json::value(args), mode);
  if (!r) return std::unexpected(r.error());
  return std::move(r->as_object());
}

}  // namespace blockd::qmp

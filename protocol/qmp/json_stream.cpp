// QMP JSON lexer, value splitter and parser with QEMU's messages, limits and recovery; owner's thread only.
#include "protocol/qmp/json_stream.h"

#include <cerrno>
#include <cstdlib>
#include <optional>

#include "protocol/qmp/utf8.h"

namespace blockd::qmp {
namespace {

// QEMU's limits per value: they bound what one client can make the daemon hold.
constexpr size_t max_token_bytes = 64u << 20;
constexpr size_t max_token_count = 2u << 20;
constexpr int max_nesting = 1024;

bool is_ws(unsigned char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\n'; }
bool is_structural(unsigned char c) {
  return c == '{' || c == '}' || c == '[' || c == ']' || c == ':' || c == ',';
}
bool is_digit(unsigned char c) { return c >= '0' && c <= '9'; }
bool is_alpha(unsigned char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }


int hex4(std::string_view s, size_t at) {
  if (at + 4 > s.size()) return -1;
  int v = 0;
  for (size_t i = at; i < at + 4; ++i) {
    char c = s[i];
    v <<= 4;
    if (c >= '0' && c <= '9') v |= c - '0';
    else if (c >= 'a' && c <= 'f') v |= c - 'a' + 10;
    else if (c >= 'A' && c <= 'F') v |= c - 'A' + 10;
    else return -1;
  }
  return v;
}

// Recursive-descent parser over the tokens of one delimited value. The first error wins.
class parser {
 public:
  template <class Tok>
  explicit parser(const std::vector<Tok>& toks) {
    for (auto& t : toks) items_.push_back({static_cast<int>(t.type), t.text});
  }

  std::optional<boost::json::value> run() { return value(); }
  const std::string& error() const { return err_; }

 private:
  // Mirrors json_stream::tok; kept as ints to keep the token type private to the stream.
  enum { lcurly, rcurly, lsquare, rsquare, colon, comma, string, integer, floating, keyword };
  struct item {
    int type;
    std::string text;
  };

  const item* pop() { return pos_ < items_.size() ? &items_[pos_++] : nullptr; }
  const item* peek() const { return pos_ < items_.size() ? &items_[pos_] : nullptr; }
  std::nullopt_t fail(std::string msg) {
    if (err_.empty()) err_ = std::move(msg);
    return std::nullopt;
  }

  std::optional<boost::json::value> value() {
    const item* t = pop();
    if (!t) return fail("premature EOI");
    switch (t->type) {
      case lcurly: return object();
      case lsquare: return array();
      case string: {
        auto s = decode_string(t->text);
        if (!s) return std::nullopt;
        return boost::json::value(boost::json::string(*s));
      }
      case integer: return number(t->text, false);
      case floating: return number(t->text, true);
      case keyword:
        if (t->text == "true") return boost::json::value(true);
        if (t->text == "false") return boost::json::value(false);
        if (t->text == "null") return boost::json::value(nullptr);
        return fail("invalid keyword '" + t->text + "'");
      default: return fail("expecting value");
    }
  }

  std::optional<boost::json::value> object() {
    boost::json::object obj;
    const item* t = peek();
    if (!t) return fail("premature EOI");
    if (t->type == rcurly) {
      pop();
      return boost::json::value(std::move(obj));
    }
    for (;;) {
      auto key = value();
      if (!key) return std::nullopt;
      if (!key->is_string()) return fail("key is not a string in object");
      t = pop();
      if (!t) return fail("premature EOI");
      if (t->type != colon) return fail("missing : in object pair");
      auto v = value();
      if (!v) return fail("Missing value in dict");
      if (obj.contains(key->as_string())) return fail("duplicate key");
      obj.emplace(key->as_string(), std::move(*v));
      t = pop();
      if (!t) return fail("premature EOI");
      if (t->type == rcurly) return boost::json::value(std::move(obj));
      if (t->type != comma) return fail("expected separator in dict");
    }
  }

  std::optional<boost::json::value> array() {
    boost::json::array arr;
    const item* t = peek();
    if (!t) return fail("premature EOI");
    if (t->type == rsquare) {
      pop();
      return boost::json::value(std::move(arr));
    }
    for (;;) {
      auto v = value();
      if (!v) return std::nullopt;
      arr.push_back(std::move(*v));
      t = pop();
      if (!t) return fail("premature EOI");
      if (t->type == rsquare) return boost::json::value(std::move(arr));
      if (t->type != comma) return fail("expected separator in list");
    }
  }

  static std::optional<boost::json::value> number(const std::string& text, bool is_float) {
    if (!is_float) {
      errno = 0;
      long long v = std::strtoll(text.c_str(), nullptr, 10);
      if (errno == 0) return boost::json::value(static_cast<int64_t>(v));
      if (text[0] != '-') {
        errno = 0;
        unsigned long long u = std::strtoull(text.c_str(), nullptr, 10);
        if (errno == 0) return boost::json::value(static_cast<uint64_t>(u));
      }
    }
    return boost::json::value(std::strtod(text.c_str(), nullptr));
  }

  // Decodes a string token (quotes included): escapes, \u with surrogate pairs, strict UTF-8
  // (plus QEMU's two-byte form of NUL, C0 80).
  std::optional<std::string> decode_string(const std::string& tok) {
    std::string out;
    std::string_view s(tok);
    size_t end = s.size() - 1;  // the closing quote
    for (size_t i = 1; i < end;) {
      unsigned char c = static_cast<unsigned char>(s[i]);
      if (c == '\\') {
        char e = s[i + 1];
        switch (e) {
          case '"': case '\'': case '\\': case '/': out.push_back(e); i += 2; continue;
          case 'b': out.push_back('\b'); i += 2; continue;
          case 'f': out.push_back('\f'); i += 2; continue;
          case 'n': out.push_back('\n'); i += 2; continue;
          case 'r': out.push_back('\r'); i += 2; continue;
          case 't': out.push_back('\t'); i += 2; continue;
          case 'u': {
            auto bad = [&](size_t at) {
              fail(std::string(s.substr(at, std::min<size_t>(6, s.size() - at))) + " is not a valid Unicode character");
              return std::nullopt;
            };
            int cp = hex4(s, i + 2);
            if (cp < 0) return bad(i);
            if (cp >= 0xDC00 && cp <= 0xDFFF) return bad(i);
            if (cp >= 0xD800 && cp <= 0xDBFF) {
              int lo = (i + 7 < s.size() && s[i + 6] == '\\' && s[i + 7] == 'u') ? hex4(s, i + 8) : -1;
              if (lo < 0xDC00 || lo > 0xDFFF) return bad(i);
              uint32_t full = 0x10000 + ((static_cast<uint32_t>(cp) - 0xD800) << 10) + (static_cast<uint32_t>(lo) - 0xDC00);
              // A pair that makes a noncharacter is refused whole, as QEMU names both escapes.
              if (!valid_codepoint(full)) {
                fail(std::string(s.substr(i, 12)) + " is not a valid Unicode character");
                return std::nullopt;
              }
              append_utf8(out, full);
              i += 12;
              continue;
            }
            if (!valid_codepoint(static_cast<uint32_t>(cp))) return bad(i);  // U+FFFF, U+FDD0, ...
            append_utf8(out, static_cast<uint32_t>(cp));
            i += 6;
            continue;
          }
          default: fail("invalid escape sequence in string"); return std::nullopt;
        }
      }
      if (c < 0x80) {
        out.push_back(static_cast<char>(c));
        ++i;
        continue;
      }
      // Multi-byte UTF-8 sequence.
      size_t n = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 0;
      if (c == 0xC0 && i + 1 < end && static_cast<unsigned char>(s[i + 1]) == 0x80) {
        out.push_back('\0');
        i += 2;
        continue;
      }
      if (n == 0 || c > 0xF4 || i + n > end) return fail("invalid UTF-8 sequence in string"), std::nullopt;
      uint32_t cp = c & (0x7F >> n);
      for (size_t k = 1; k < n; ++k) {
        unsigned char cc = static_cast<unsigned char>(s[i + k]);
        if ((cc & 0xC0) != 0x80) return fail("invalid UTF-8 sequence in string"), std::nullopt;
        cp = (cp << 6) | (cc & 0x3F);
      }
      static const uint32_t min_for_len[] = {0, 0, 0x80, 0x800, 0x10000};
      if (cp < min_for_len[n] || !valid_codepoint(cp)) return fail("invalid UTF-8 sequence in string"), std::nullopt;
      out.append(s.substr(i, n));
      i += n;
    }
    return out;
  }

  std::vector<item> items_;
  size_t pos_ = 0;
  std::string err_;
};

}  // namespace

json_stream::json_stream(sink s) : sink_(std::move(s)) {}

size_t json_stream::feed(std::string_view bytes) {
  for (size_t i = 0; i < bytes.size(); ++i) {
    lex_byte(static_cast<unsigned char>(bytes[i]));
    if (pause_) {
      pause_ = false;
      return i + 1;
    }
  }
  return bytes.size();
}

void json_stream::reset() {
  state_ = lex::start;
  text_.clear();
  clear_value();
}

void json_stream::clear_value() {
  tokens_.clear();
  token_bytes_ = 0;
  braces_ = 0;
  brackets_ = 0;
}

void json_stream::emit_error(std::string msg) {
  clear_value();
  sink_(json_result{false, nullptr, std::move(msg)});
}

void json_stream::lex_error() {
  std::string msg = "JSON parse error, stray '" + text_ + "'";
  text_.clear();
  state_ = lex::recovery;
  emit_error(std::move(msg));
}

void json_stream::end_token(tok t) {
  std::string text = std::move(text_);
  text_.clear();
  state_ = lex::start;
  push_token(t, std::move(text));
}

void json_stream::push_token(tok t, std::string text) {
  switch (t) {
    case tok::lcurly: ++braces_; break;
    case tok::rcurly: --braces_; break;
    case tok::lsquare: ++brackets_; break;
    case tok::rsquare: --brackets_; break;
    default: break;
  }
  if (token_bytes_ + text.size() + 1 > max_token_bytes) return emit_error("JSON token size limit exceeded");
  if (tokens_.size() + 1 > max_token_count) return emit_error("JSON token count limit exceeded");
  if (braces_ + brackets_ > max_nesting) return emit_error("JSON nesting depth limit exceeded");
  token_bytes_ += text.size();
  tokens_.push_back({t, std::move(text)});
  // A value is complete when its brackets balance; an excess closer ends it at once (as an error).
  if ((braces_ > 0 || brackets_ > 0) && braces_ >= 0 && brackets_ >= 0) return;
  parse_and_emit();
}

void json_stream::parse_and_emit() {
  parser p(tokens_);
  auto v = p.run();
  clear_value();
  if (v)
    sink_(json_result{true, std::move(*v), {}});
  else
    sink_(json_result{false, nullptr, "JSON parse error, " + p.error()});
}

void json_stream::lex_byte(unsigned char c) {
  // A single token may not grow without bound either.
  if (text_.size() > max_token_bytes) {
    text_.clear();
    state_ = lex::recovery;
    emit_error("JSON token size limit exceeded");
  }
  switch (state_) {
    case lex::recovery:
      // After a lexical error, input (whitespace included) is skipped up to a structural character.
      if (!is_structural(c)) return;
      state_ = lex::start;
      [[fallthrough]];
    case lex::start:
      if (is_ws(c)) return;
      switch (c) {
        case '{': return push_token(tok::lcurly, "{");
        case '}': return push_token(tok::rcurly, "}");
        case '[': return push_token(tok::lsquare, "[");
        case ']': return push_token(tok::rsquare, "]");
        case ':': return push_token(tok::colon, ":");
        case ',': return push_token(tok::comma, ",");
        case '"':
        case '\'':
          quote_ = static_cast<char>(c);
          text_.assign(1, static_cast<char>(c));
          state_ = lex::string;
          return;
        case '-': text_.assign(1, '-'); state_ = lex::number_sign; return;
        case '0': text_.assign(1, '0'); state_ = lex::number_zero; return;
        default: break;
      }
      if (is_digit(c)) {
        text_.assign(1, static_cast<char>(c));
        state_ = lex::number_int;
        return;
      }
      if (is_alpha(c)) {
        text_.assign(1, static_cast<char>(c));
        state_ = lex::keyword;
        return;
      }
      text_.assign(1, static_cast<char>(c));
      return lex_error();
    case lex::string:
      text_.push_back(static_cast<char>(c));
      if (c == static_cast<unsigned char>(quote_)) return end_token(tok::string);
      if (c == '\\') state_ = lex::string_escape;
      else if (c < 0x20) lex_error();
      return;
    case lex::string_escape:
      text_.push_back(static_cast<char>(c));
      if (c < 0x20) return lex_error();
      state_ = lex::string;
      return;
    case lex::number_sign:
      text_.push_back(static_cast<char>(c));
      if (c == '0') state_ = lex::number_zero;
      else if (is_digit(c)) state_ = lex::number_int;
      else lex_error();
      return;
    case lex::number_zero:
    case lex::number_int:
      if (is_digit(c)) {
        text_.push_back(static_cast<char>(c));
        if (state_ == lex::number_zero) lex_error();
        return;
      }
      if (c == '.') { text_.push_back('.'); state_ = lex::number_dot; return; }
      if (c == 'e' || c == 'E') { text_.push_back(static_cast<char>(c)); state_ = lex::number_exp; return; }
      end_token(tok::integer);
      return lex_byte(c);
    case lex::number_dot:
      text_.push_back(static_cast<char>(c));
      if (is_digit(c)) state_ = lex::number_frac;
      else lex_error();
      return;
    case lex::number_frac:
      if (is_digit(c)) { text_.push_back(static_cast<char>(c)); return; }
      if (c == 'e' || c == 'E') { text_.push_back(static_cast<char>(c)); state_ = lex::number_exp; return; }
      end_token(tok::floating);
      return lex_byte(c);
    case lex::number_exp:
      text_.push_back(static_cast<char>(c));
      if (c == '+' || c == '-') state_ = lex::number_exp_sign;
      else if (is_digit(c)) state_ = lex::number_exp_digits;
      else lex_error();
      return;
    case lex::number_exp_sign:
      text_.push_back(static_cast<char>(c));
      if (is_digit(c)) state_ = lex::number_exp_digits;
      else lex_error();
      return;
    case lex::number_exp_digits:
      if (is_digit(c)) { text_.push_back(static_cast<char>(c)); return; }
      end_token(tok::floating);
      return lex_byte(c);
    case lex::keyword:
      if (is_alpha(c)) { text_.push_back(static_cast<char>(c)); return; }
      end_token(tok::keyword);
      return lex_byte(c);
  }
}

void json_stream::flush() {
  switch (state_) {
    case lex::number_zero:
    case lex::number_int: end_token(tok::integer); break;
    case lex::number_frac:
    case lex::number_exp_digits: end_token(tok::floating); break;
    case lex::keyword: end_token(tok::keyword); break;
    case lex::start:
    case lex::recovery: break;
    default: lex_error(); break;  // inside a string or an unfinished number
  }
  state_ = lex::start;
  if (!tokens_.empty()) parse_and_emit();
}

json_result parse_json_text(std::string_view text) {
  std::vector<json_result> got;
  json_stream s([&](json_result&& r) { got.push_back(std::move(r)); });
  s.feed(text);
  s.flush();
  for (auto& r : got)
    if (!r.ok) return std::move(r);
  if (got.empty()) return {false, nullptr, "Expecting a JSON value"};
  if (got.size() > 1) return {false, nullptr, "Expecting at most one JSON value"};
  return std::move(got.front());
}

}  // namespace blockd::qmp

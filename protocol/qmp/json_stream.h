// Incremental splitter and parser for the JSON dialect QMP accepts (QEMU's rules); owner's thread only.
#pragma once
#include <boost/json.hpp>
#include <cstddef>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

namespace blockd::qmp {

struct json_result {
  bool ok = false;
  boost::json::value value;
  std::string error;  // full QMP desc, e.g. "JSON parse error, expecting value"
};

// Splits a byte stream into JSON values by counting braces and brackets over the token stream (no
// line framing), then parses each value. Accepts QEMU's extensions (single-quoted strings, \'),
// enforces its limits (64 MiB of token text, 2 Mi tokens, nesting depth 1024) and recovers after
// errors exactly as QEMU does, so a client sees the same sequence of replies from blockd as from QSD.
class json_stream {
 public:
  using sink = std::function<void(json_result&&)>;
  explicit json_stream(sink s);

  // Calls the sink once per complete value or error, in order. Returns how many bytes were
  // consumed: all of them, unless the sink called pause(), which stops right after that value.
  size_t feed(std::string_view bytes);
  void pause() { pause_ = true; }
  void flush();                       // end of input: parse whatever is buffered
  void reset();                       // forget a partial value (client went away)

 private:
  enum class tok { lcurly, rcurly, lsquare, rsquare, colon, comma, string, integer, floating, keyword };
  struct token {
    tok type;
    std::string text;
  };
  enum class lex { start, string, string_escape, number_sign, number_zero, number_int, number_dot, number_frac,
                   number_exp, number_exp_sign, number_exp_digits, keyword, recovery };

  void lex_byte(unsigned char c);
  void end_token(tok t);
  void lex_error();
  void push_token(tok t, std::string text);
  void emit_error(std::string msg);
  void parse_and_emit();
  void clear_value();

  sink sink_;
  lex state_ = lex::start;
  std::string text_;       // text of the token being lexed
  char quote_ = '"';
  std::vector<token> tokens_;
  size_t token_bytes_ = 0;
  int braces_ = 0;
  int brackets_ = 0;
  bool pause_ = false;
};

// Parses one complete text (a JSON command-line argument): exactly one value, or an error.
json_result parse_json_text(std::string_view text);

}  // namespace blockd::qmp

// Unit tests for the QMP JSON stream parser and writer against QSD 7.2's recorded behaviour; any thread.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "protocol/qmp/json_stream.h"
#include "protocol/qmp/json_writer.h"
#include "protocol/qmp/request.h"

using namespace blockd::qmp;

namespace {

// Feeds `input` (optionally byte by byte) and renders each result as QSD's reply text would carry
// it: the value re-serialized, or the error desc.
std::vector<std::string> run(std::string_view input, bool bytewise = false) {
  std::vector<std::string> out;
  json_stream s([&](json_result&& r) { out.push_back(r.ok ? to_json(r.value) : "ERR " + r.error); });
  if (bytewise)
    for (char c : input) s.feed(std::string_view(&c, 1));
  else
    s.feed(input);
  return out;
}

using v = std::vector<std::string>;

TEST(JsonStream, SplitsByBracesNotLines) {
  EXPECT_EQ(v({R"({"a": 1})", R"({"b": 2})"}), run(R"({"a":1}{"b":2})"));
  EXPECT_EQ(v({R"({"a": 1})", R"({"b": 2})"}), run(R"({"a":1}{"b":2})", true));
  EXPECT_EQ(v{}, run("   \n\n\t\r\n"));
  EXPECT_EQ(v{}, run(R"({"execute": "query)"));
}

TEST(JsonStream, ScalarsAtTopLevel) {
  EXPECT_EQ(v({"[1, 2, 3]"}), run("[1, 2, 3]"));
  EXPECT_EQ(v({"\"query-version\""}), run("\"query-version\""));
  EXPECT_EQ(v({"null", "true"}), run("null true "));
}

TEST(JsonStream, ParseErrorsAsQsd) {
  EXPECT_EQ(v({"ERR JSON parse error, expecting value"}), run(R"({"execute": })"));
  EXPECT_EQ(v({"ERR JSON parse error, expecting value"}), run(R"({"execute": , "id": 11})"));
  EXPECT_EQ(v({"ERR JSON parse error, invalid keyword 'hello'"}), run("hello "));
  EXPECT_EQ(v({"ERR JSON parse error, invalid keyword 'nul'"}), run(R"({"execute": "query-version", "id": nul})"));
  EXPECT_EQ(v({"ERR JSON parse error, duplicate key"}), run(R"({"execute": "a", "execute": "a", "id": 32})"));
  EXPECT_EQ(v({"ERR JSON parse error, invalid escape sequence in string"}), run(R"({"id": "\q"})"));
  EXPECT_EQ(v({"ERR JSON parse error, invalid UTF-8 sequence in string"}), run("{\"id\": \"\xc3(\"}"));
  EXPECT_EQ(v({"ERR JSON parse error, missing : in object pair"}), run(R"({"a" 1})"));
  EXPECT_EQ(v({"ERR JSON parse error, key is not a string in object"}), run(R"({1:2})"));
  EXPECT_EQ(v({"ERR JSON parse error, expecting value"}), run(R"({"a":1,})"));
  EXPECT_EQ(v({"ERR JSON parse error, expected separator in list"}), run("[1 2]"));
  EXPECT_EQ(v({"ERR JSON parse error, expected separator in dict"}), run(R"({"a":1 "b":2})"));
  EXPECT_EQ(v({"ERR JSON parse error, \\u12\" is not a valid Unicode character"}), run(R"({"id":"\u12"})"));
  EXPECT_EQ(v({"ERR JSON parse error, \\ud800 is not a valid Unicode character"}), run(R"({"id":"\ud800"})"));
  EXPECT_EQ(v({"ERR JSON parse error, \\udc00 is not a valid Unicode character"}), run(R"({"id":"\udc00x"})"));
}

TEST(JsonStream, LexicalErrorsResyncTheStream) {
  // T20: an unfinished value, then a control byte, then a fresh request.
  EXPECT_EQ(v({"ERR JSON parse error, stray '\x01'", R"({"id": 13})"}), run("{\"execute\": \"q\", \"id\": 12\x01{\"id\":13}"));
  EXPECT_EQ(v({"ERR JSON parse error, stray '\xff'", R"({"id": 1})"}), run("\xff{\"id\":1}"));
  EXPECT_EQ(v({"ERR JSON parse error, stray '\xff'", R"({"id": 2})"}), run("\xff" "abc {\"id\":2}"));
  EXPECT_EQ(v({"ERR JSON parse error, stray '\x01'", R"({"id": 3})"}), run("\x01xyz\"abc\" {\"id\":3}"));
  EXPECT_EQ(v({"ERR JSON parse error, stray '\"a\x01'", "ERR JSON parse error, expecting value"}),
            run("{\"id\":\"a\x01" "b\"}"));
  EXPECT_EQ(v({"ERR JSON parse error, stray '01'", "ERR JSON parse error, expecting value"}), run(R"({"id":01})"));
  EXPECT_EQ(v({"ERR JSON parse error, stray '1.}'"}), run(R"({"id":1.})"));
  EXPECT_EQ(v({"ERR JSON parse error, stray '-}'"}), run(R"({"id":-})"));
}

TEST(JsonStream, NestingLimitReparsesTheRest) {
  // T51: 1025-deep list inside an object gives exactly 1027 results.
  std::string deep = "{\"execute\": \"query-version\", \"id\": " + std::string(1025, '[') + std::string(1025, ']') + "}";
  auto r = run(deep);
  ASSERT_EQ(1027u, r.size());
  EXPECT_EQ("ERR JSON nesting depth limit exceeded", r[0]);
  EXPECT_EQ("[]", r[1]);  // the dispatcher then says "QMP input must be a JSON object"
  for (size_t i = 2; i < r.size(); ++i) EXPECT_EQ("ERR JSON parse error, expecting value", r[i]);
  // T52: 1000 deep is fine.
  std::string ok = "{\"id\": " + std::string(1000, '[') + std::string(1000, ']') + "}";
  auto r2 = run(ok);
  ASSERT_EQ(1u, r2.size());
  EXPECT_EQ('{', r2[0][0]);
}

TEST(JsonStream, NumbersAndStringsRoundTripLikeQsd) {
  EXPECT_EQ(v({"1000"}), run("[1e3]").empty() ? v{} : v({"1000"}));
  auto one = [](std::string_view in) {
    auto r = run(std::string("[") + std::string(in) + "]");
    return r.size() == 1 ? r[0].substr(1, r[0].size() - 2) : std::string("?");
  };
  EXPECT_EQ("1000", one("1e3"));
  EXPECT_EQ("0.10000000000000001", one("0.1"));
  EXPECT_EQ("12345678901234567890", one("12345678901234567890"));
  EXPECT_EQ("-9.2233720368547758e+18", one("-9223372036854775809"));
  EXPECT_EQ("18446744073709551615", one("18446744073709551615"));
  EXPECT_EQ("1.5000000000000001e+300", one("1.5e300"));
  EXPECT_EQ("-1.5", one("-1.5"));
  EXPECT_EQ("\"\\u00E9\"", one("\"\xc3\xa9\""));
  EXPECT_EQ("\"\\u00E9\"", one("\"\\u00e9\""));
  EXPECT_EQ("\"\\uD83D\\uDE00\"", one("\"\\ud83d\\ude00\""));
  EXPECT_EQ("\"tab\\there\"", one("\"tab\\there\""));
  EXPECT_EQ("\"/\"", one("\"\\/\""));
  EXPECT_EQ("\"a\\u0000b\"", one("\"a\\u0000b\""));
  EXPECT_EQ("\"\\u0000\"", one("\"\xc0\x80\""));
  EXPECT_EQ("\"sq\"", one("'sq'"));
  EXPECT_EQ("\"it's\"", one("'it\\'s'"));
}

TEST(JsonStream, OneShotText) {
  auto r = parse_json_text(R"({"driver":"null-co","node-name":"n0",})");
  EXPECT_FALSE(r.ok);
  EXPECT_EQ("JSON parse error, expecting value", r.error);
  auto ok = parse_json_text(R"({'qom-type': 'iothread', 'id': 'io0'})");
  ASSERT_TRUE(ok.ok);
  EXPECT_EQ("io0", ok.value.at("id").as_string());
  EXPECT_FALSE(parse_json_text(R"({"a":1)").ok);
  EXPECT_FALSE(parse_json_text(R"({"a":1} {"b":2})").ok);
}

TEST(JsonWriter, QdictMemberOrderMatchesQsd) {
  auto o = boost::json::parse(R"({"id": 1, "return": {}})");
  EXPECT_EQ(R"({"return": {}, "id": 1})", to_json(o));
  auto e = boost::json::parse(R"({"error": {"desc": "d", "class": "GenericError"}, "id": "x"})");
  EXPECT_EQ(R"({"id": "x", "error": {"class": "GenericError", "desc": "d"}})", to_json(e));
  auto ver = boost::json::parse(R"({"qemu": {"major": 7, "minor": 2, "micro": 22}, "package": "p"})");
  EXPECT_EQ(R"({"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "p"})", to_json(ver));
  auto ev = make_event("X", boost::json::object{{"id", "e0"}}, 1, 2);
  EXPECT_EQ(R"({"timestamp": {"seconds": 1, "microseconds": 2}, "event": "X", "data": {"id": "e0"}})", to_json(ev));
}

TEST(JsonWriter, PrettyFormAsQsd) {
  auto o = boost::json::parse(R"({"return": {}, "id": 1})");
  EXPECT_EQ("{\n    \"return\": {\n    },\n    \"id\": 1\n}", to_json(o, true));
  auto g = boost::json::parse(R"({"QMP": {"capabilities": ["oob"]}})");
  EXPECT_EQ("{\n    \"QMP\": {\n        \"capabilities\": [\n            \"oob\"\n        ]\n    }\n}", to_json(g, true));
}

TEST(Request, EnvelopeChecksAndIdEcho) {
  auto chk = [](std::string_view text, bool oob = false) {
    auto r = parse_request(boost::json::parse(text), oob);
    if (r) return std::string("OK ") + r->command + (r->oob ? " oob" : "");
    return r.error().err.desc + (r.error().id ? " id=" + to_json(*r.error().id) : std::string());
  };
  EXPECT_EQ("QMP input must be a JSON object", chk("[1, 2, 3]"));
  EXPECT_EQ("QMP input must be a JSON object", chk("42"));
  EXPECT_EQ("QMP input lacks member 'execute'", chk("{}"));
  EXPECT_EQ("QMP input lacks member 'execute' id=14", chk(R"({"id": 14})"));
  EXPECT_EQ("QMP input member 'foo' is unexpected id=15", chk(R"({"execute": "q", "id": 15, "foo": 1})"));
  EXPECT_EQ("QMP input member 'execute' must be a string id=16", chk(R"({"execute": ["q"], "id": 16})"));
  EXPECT_EQ("QMP input member 'arguments' must be an object id=17", chk(R"({"execute": "q", "arguments": [], "id": 17})"));
  EXPECT_EQ("QMP input member 'arguments' must be an object id=18", chk(R"({"execute": "q", "arguments": null, "id": 18})"));
  EXPECT_EQ("QMP input member 'exec-oob' is unexpected id=1", chk(R"({"exec-oob": "q", "id": 1})"));
  EXPECT_EQ("QMP input member 'execute' clashes with 'exec-oob' id=8",
            chk(R"({"execute": "q", "exec-oob": "q", "id": 8})", true));
  EXPECT_EQ("QMP input member 'exec-oob' must be a string id=9", chk(R"({"exec-oob": 1, "id": 9})", true));
  EXPECT_EQ("OK q oob", chk(R"({"exec-oob": "q"})", true));
  EXPECT_EQ("OK query-version", chk(R"({"execute": "query-version", "arguments": {}})"));
}

}  // namespace

TEST(JsonWriter, InvalidTextBecomesReplacementsAsQsd) {
  // Recorded from QSD 7.2 (a file name holding U+FFFF and a surrogate, shown by
  // query-named-block-nodes): each complete but invalid sequence is one U+FFFD.
  EXPECT_EQ(to_json(boost::json::value("a\xef\xbf\xbf" "b\xed\xa0\x80" "c")), "\"a\\uFFFDb\\uFFFDc\"");
  // A sequence cut short is one replacement for the bytes so far; a stray continuation byte is one.
  EXPECT_EQ(to_json(boost::json::value("x\xe2\x82" "y\x80z")), "\"x\\uFFFDy\\uFFFDz\"");
  // Overlong forms are refused, C0 80 is QEMU's NUL, and valid text passes as \u escapes.
  EXPECT_EQ(to_json(boost::json::value("\xe0\x80\xaf" "|\xc0\x80|\xc3\xa9\xf0\x9f\x98\x80")),
            "\"\\uFFFD|\\u0000|\\u00E9\\uD83D\\uDE00\"");
}

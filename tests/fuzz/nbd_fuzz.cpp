// The NBD fuzz harness: a client byte stream through nbd::handshake (one read, then cut into reads) over a test export catalog, the remainder through the transmission parser, every server byte re-parsed by an independent checker; the calling thread only.
#include "tests/fuzz/nbd_fuzz.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <set>
#include <string>
#include <vector>

#include "protocol/nbd/handshake.h"
#include "protocol/nbd/transmission.h"
#include "protocol/nbd/wire.h"

namespace blockd::fuzz {
namespace {

using namespace blockd::nbd;

[[noreturn]] void finding(const std::string& what) {
  std::fprintf(stderr, "nbd_fuzz: FINDING: %s\n", what.c_str());
  std::fflush(stderr);
  std::abort();
}

#define NBD_CHECK(cond, ...)                                          \
  do {                                                                \
    if (!(cond)) {                                                    \
      char buf_[512];                                                 \
      std::snprintf(buf_, sizeof buf_, __VA_ARGS__);                  \
      finding(std::string(#cond) + ": " + buf_);                      \
    }                                                                 \
  } while (0)

bool verbose() {
  static const bool v = std::getenv("BLOCKD_FUZZ_VERBOSE") != nullptr;
  return v;
}

// BLOCKD_FUZZ_NBD_PAST_FINDINGS=1 lets the open findings through, to fuzz past them: check_request's
// payload length for commands other than WRITE and BLOCK_STATUS that carry NBD_CMD_FLAG_PAYLOAD_LEN
// (regress/nbd/payload-len-flag-*), an option reply to an EXPORT_NAME longer than the buffered
// option limit (regress/nbd/export-name-over-buffered-limit-gets-reply), and an empty OFFSET_DATA
// chunk for a zero-length structured read (regress/nbd/structured-read-zero-length-empty-data-chunk).
bool past_findings() {
  static const bool v = std::getenv("BLOCKD_FUZZ_NBD_PAST_FINDINGS") != nullptr;
  return v;
}

// ---- the test catalog -------------------------------------------------------------------------

struct catalog final : export_catalog {
  std::vector<export_view> v;
  const export_view* find(const std::string& name) const override {
    for (auto& e : v)
      if (e.name == name) return &e;
    return nullptr;
  }
  std::vector<const export_view*> all() const override {
    std::vector<const export_view*> r;
    for (auto& e : v) r.push_back(&e);
    return r;
  }
};

// Three exports: a writable one with every context (the name the seed captures use), a read-only
// one with 512-byte blocks and a description, and the empty name with 4 KiB blocks (INFO without
// NBD_INFO_BLOCK_SIZE is refused there). The export view has no TLS-required flag to vary.
const catalog& the_catalog() {
  static const catalog c = [] {
    catalog c;
    export_view a;
    a.name = "disk0";
    a.size = 1ull << 30;
    a.flags = tf_has_flags | tf_send_flush | tf_send_fua | tf_send_trim | tf_send_write_zeroes | tf_can_multi_conn |
              tf_send_cache | tf_send_fast_zero;
    a.allocation_depth = true;
    a.bitmaps = {"b0", "bitmap-1"};
    c.v.push_back(a);
    export_view ro;
    ro.name = "ro";
    ro.description = "read-only disk";
    ro.size = 64ull << 20;
    ro.flags = tf_has_flags | tf_read_only | tf_send_flush | tf_can_multi_conn | tf_send_cache;
    ro.min_block = 512;
    c.v.push_back(ro);
    export_view d;
    d.name = "";
    d.description = "default";
    d.size = 3 * 4096;
    d.flags = tf_has_flags | tf_send_flush | tf_send_trim;
    d.min_block = 4096;
    d.max_block = 65536;
    c.v.push_back(d);
    return c;
  }();
  return c;
}

// ---- cutting the stream into reads ----------------------------------------------------------

struct chopper {
  uint64_t s;
  unsigned style;
  size_t next(size_t left) {
    if (style == 0) return left;
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    static const size_t caps[] = {0, 1, 4, 17, 64, 512, 4096};
    size_t cap = style < 7 ? caps[style] : caps[1 + s % 6];
    return std::min(left, size_t(1 + (s >> 8) % cap));
  }
};

// What one handshake run left behind, compared between the one-read and the cut runs.
struct hs_result {
  std::string out;
  size_t consumed = 0;
  handshake::state st = handshake::state::negotiating;
  std::string reason, name;
  reply_mode mode = reply_mode::simple;
  bool base = false, depth = false;
  std::vector<bool> bitmaps;
  bool block_size = false;
  uint16_t tflags = 0;
  bool tls_required = false;
  int tls_starts = 0;
  uint32_t limit = 0;
};

// The phases in the order a connection may pass them: negotiating in the clear, STARTTLS
// acknowledged, negotiating under TLS, then transmission or closed (both final).
int phase_rank(const handshake& hs) {
  switch (hs.current()) {
    case handshake::state::negotiating: return hs.tls_active() ? 2 : 0;
    case handshake::state::starttls: return 1;
    case handshake::state::transmission: return 3;
    case handshake::state::closed: return 4;
  }
  return -1;
}

int state_rank(handshake::state s) {
  return s == handshake::state::transmission ? 1 : s == handshake::state::closed ? 2 : 0;
}

bool negotiating(handshake::state s) { return s == handshake::state::negotiating || s == handshake::state::starttls; }

hs_result run_handshake(const uint8_t* s, size_t n, uint32_t limit, bool tls_required, chopper ch) {
  handshake::settings st;
  st.buffered_option_limit = limit;
  st.tls_required = tls_required;
  handshake hs(the_catalog(), st);
  hs_result r;
  r.tls_required = tls_required;
  r.limit = limit;
  hs.start(r.out);
  std::vector<uint8_t> pending;
  size_t pos = 0;
  int prev = phase_rank(hs);
  // A STARTTLS at the very end still gets its (successful) TLS handshake.
  while (negotiating(hs.current()) &&
         (pos < n || !pending.empty() || hs.current() == handshake::state::starttls)) {
    if (hs.current() == handshake::state::starttls) {
      // The TLS handshake "succeeds"; the bytes that follow stand for the decrypted stream.
      NBD_CHECK(tls_required && !hs.tls_active(), "STARTTLS acknowledged without tls-creds or twice");
      size_t before = r.out.size();
      NBD_CHECK(hs.feed(pending.data(), pending.size(), r.out) == 0 && r.out.size() == before,
                "feed consumed bytes while STARTTLS waits for the TLS handshake");
      hs.tls_started();
      ++r.tls_starts;
      NBD_CHECK(hs.tls_active() && hs.current() == handshake::state::negotiating, "tls_started() did not resume");
      prev = phase_rank(hs);
    } else if (pos == n) {
      break;
    }
    size_t k = pos < n ? ch.next(n - pos) : 0;
    pending.insert(pending.end(), s + pos, s + pos + k);
    pos += k;
    size_t used = hs.feed(pending.data(), pending.size(), r.out);
    NBD_CHECK(used <= pending.size(), "feed used %zu of %zu", used, pending.size());
    pending.erase(pending.begin(), pending.begin() + long(used));
    r.consumed += used;
    int now_rank = phase_rank(hs);
    auto now = hs.current();
    NBD_CHECK(now_rank >= prev && prev < 3, "phase went from %d to %d", prev, now_rank);
    prev = now_rank;
    if (now == handshake::state::negotiating) {
      // The caller waits for need() bytes: had it all of them already, the server would stall.
      NBD_CHECK(pending.size() < hs.need(), "%zu bytes left over while the handshake needs %zu", pending.size(),
                hs.need());
    } else {
      NBD_CHECK(hs.need() == 0, "need() is %zu after negotiation ended", hs.need());
    }
    // Bounded output: no option makes the server say more than a few KiB.
    NBD_CHECK(r.out.size() <= 18 + 8192 * (r.consumed / 16 + 1), "%zu bytes of output for %zu consumed",
              r.out.size(), r.consumed);
  }
  if (!negotiating(hs.current())) {
    // Past negotiation nothing more is consumed or said.
    size_t before = r.out.size();
    std::vector<uint8_t> rest(pending);
    rest.insert(rest.end(), s + pos, s + n);
    rest.push_back(0);
    size_t used = hs.feed(rest.data(), rest.size(), r.out);
    NBD_CHECK(used == 0 && r.out.size() == before && phase_rank(hs) == prev, "feed after negotiation used %zu", used);
  }
  r.st = hs.current();
  r.reason = hs.close_reason();
  if (r.st == handshake::state::closed) NBD_CHECK(!r.reason.empty(), "closed without a reason");
  r.name = hs.export_name();
  r.mode = hs.mode();
  r.base = hs.contexts().base_allocation;
  r.depth = hs.contexts().allocation_depth;
  r.bitmaps = hs.contexts().bitmaps;
  r.block_size = hs.block_size_negotiated();
  r.tflags = hs.transmission_flags();
  return r;
}

// ---- the independent checker of the server's bytes ------------------------------------------

struct client_opt {
  size_t start = 0;  // offset of the header in the stream
  uint32_t code = 0;
  uint32_t len = 0;
  bool bad_magic = false;
  size_t end() const { return start + 16 + len; }
};

// The client's options as the stream spells them (headers complete; payloads may be cut).
std::vector<client_opt> parse_client(const uint8_t* s, size_t n) {
  std::vector<client_opt> v;
  size_t p = 4;
  while (p + 16 <= n) {
    client_opt o;
    o.start = p;
    o.bad_magic = get64(s + p) != opts_magic;
    o.code = get32(s + p + 8);
    o.len = get32(s + p + 12);
    v.push_back(o);
    if (o.bad_magic || o.len > max_buffer_size) break;
    p += 16 + size_t(o.len);
  }
  return v;
}

// The export name an INFO/GO/META option's payload starts with, when it parses.
bool payload_name(const uint8_t* s, size_t n, const client_opt& o, std::string& name) {
  if (o.end() > n || o.len < 4) return false;
  uint32_t l = get32(s + o.start + 16);
  if (l > o.len - 4) return false;
  name.assign(reinterpret_cast<const char*>(s + o.start + 20), l);
  return true;
}

bool is_pow2(uint32_t v) { return v && !(v & (v - 1)); }

std::string context_name(const export_view& e, uint32_t id) {
  if (id == meta_id_base_allocation) return "base:allocation";
  if (id == meta_id_allocation_depth) return e.allocation_depth ? "qemu:allocation-depth" : "";
  if (id - meta_id_dirty_bitmap < e.bitmaps.size()) return "qemu:dirty-bitmap:" + e.bitmaps[id - meta_id_dirty_bitmap];
  return "";
}

// Walks the server's output as a client would: greeting, then for each client option its replies
// up to a final one (ACK or an error), or the export data that ends EXPORT_NAME. Returns the
// number of answered options.
int check_output(const uint8_t* s, size_t n, const hs_result& r) {
  const std::string& out = r.out;
  auto u = [&](size_t at) { return reinterpret_cast<const uint8_t*>(out.data()) + at; };
  NBD_CHECK(out.size() >= 18, "greeting is %zu bytes", out.size());
  NBD_CHECK(get64(u(0)) == nbd_magic && get64(u(8)) == opts_magic, "greeting magic");
  NBD_CHECK(get16(u(16)) == (flag_fixed_newstyle | flag_no_zeroes), "greeting flags 0x%x", get16(u(16)));
  const catalog& cat = the_catalog();
  bool no_zeroes = n >= 4 && (get32(s) & flag_c_no_zeroes);
  auto opts = parse_client(s, n);
  size_t pos = 18;
  size_t g = 0;
  reply_mode mode = reply_mode::simple;
  // The selection a SET_META_CONTEXT left (QEMU clears it when SET starts in structured mode).
  std::set<uint32_t> selected;
  std::string selected_for;
  bool go_done = false, export_data = false, abort_acked = false, abort_refused = false;
  bool tls_up = false;
  uint16_t go_flags = 0;
  std::string go_name;
  while (pos < out.size()) {
    NBD_CHECK(g < opts.size(), "reply %zu at output offset %zu without a client option", g, pos);
    const client_opt& o = opts[g];
    NBD_CHECK(!o.bad_magic, "a reply to an option with a bad magic");
    NBD_CHECK(!go_done && !abort_acked && !abort_refused, "output after the negotiation ended");
    if (o.code == opt_export_name && !(past_findings() && o.len > r.limit)) {
      // No reply: the export data, then transmission.
      size_t want = 10 + (no_zeroes ? 0 : 124);
      NBD_CHECK(out.size() - pos == want, "EXPORT_NAME answer is %zu bytes, expected %zu", out.size() - pos, want);
      std::string name(reinterpret_cast<const char*>(s + o.start + 16), std::min<size_t>(o.len, n - o.start - 16));
      const export_view* e = cat.find(name);
      NBD_CHECK(e && o.end() <= n, "export data for an unknown export");
      NBD_CHECK(get64(u(pos)) == e->size, "EXPORT_NAME size %llu", (unsigned long long)get64(u(pos)));
      uint16_t f = get16(u(pos + 8));
      NBD_CHECK((f & tf_has_flags) && f == r.tflags, "EXPORT_NAME flags 0x%x, transmission flags 0x%x", f, r.tflags);
      for (size_t i = pos + 10; i < out.size(); ++i) NBD_CHECK(out[i] == 0, "export data padding not zero");
      NBD_CHECK(r.name == name, "export name '%s' chosen, '%s' asked", r.name.c_str(), name.c_str());
      export_data = true;
      go_name = name;
      pos = out.size();
      ++g;
      break;
    }
    std::string req_name;
    bool have_name = payload_name(s, n, o, req_name);
    std::set<std::string> ctx_names;
    std::set<uint32_t> ctx_ids;
    bool saw_export_info = false;
    uint16_t export_flags = 0;
    for (;;) {
      NBD_CHECK(out.size() - pos >= 20, "partial reply header (%zu bytes) to option %u", out.size() - pos, o.code);
      NBD_CHECK(get64(u(pos)) == rep_magic, "reply magic at %zu", pos);
      uint32_t ro = get32(u(pos + 8)), type = get32(u(pos + 12)), len = get32(u(pos + 16));
      NBD_CHECK(ro == o.code, "reply names option %u, client sent %u", ro, o.code);
      NBD_CHECK(len <= out.size() - pos - 20, "reply length %u past the output (%zu left)", len, out.size() - pos - 20);
      if (r.tls_required && !tls_up) {
        // Before TLS: STARTTLS is acknowledged, everything else refused with TLS_REQD.
        if (o.code == opt_starttls) {
          NBD_CHECK(type == rep_ack && len == 0 && o.len == 0, "STARTTLS answered %x", type);
          tls_up = true;
          pos += 20;
          break;
        }
        NBD_CHECK(type == rep_err_tls_reqd, "option %u answered 0x%x before TLS", o.code, type);
        if (o.code == opt_abort) abort_refused = true;
      }
      const uint8_t* p = u(pos + 20);
      pos += 20 + len;
      if (type == rep_ack) {
        NBD_CHECK(len == 0, "ACK with %u payload bytes", len);
        if (o.code == opt_structured_reply) mode = reply_mode::structured;
        if (o.code == opt_extended_headers) mode = reply_mode::extended;
        if (o.code == opt_abort) abort_acked = true;
        if (o.code == opt_info || o.code == opt_go) {
          NBD_CHECK(saw_export_info, "INFO/GO acknowledged without NBD_INFO_EXPORT");
          if (o.code == opt_go) {
            go_done = true;
            go_flags = export_flags;
            go_name = req_name;
          }
        }
        if (o.code == opt_set_meta_context) {
          selected = ctx_ids;
          selected_for = req_name;
        }
        NBD_CHECK(o.code != opt_export_name && o.code != opt_peek_export && o.code <= opt_extended_headers,
                  "ACK to option %u", o.code);
        break;
      }
      if (type & rep_err_bit) {
        NBD_CHECK(type <= rep_err_ext_header_reqd, "error reply type 0x%x", type);
        if (o.code == opt_starttls)
          NBD_CHECK(type == (tls_up || o.len ? rep_err_invalid : rep_err_policy), "STARTTLS refused with 0x%x", type);
        NBD_CHECK(len <= max_string_size + 256, "error message of %u bytes", len);
        if (o.code == opt_set_meta_context && mode != reply_mode::simple) {
          selected.clear();
          selected_for.clear();
        }
        break;
      }
      if (type == rep_server) {
        NBD_CHECK(o.code == opt_list, "NBD_REP_SERVER to option %u", o.code);
        NBD_CHECK(len >= 4 && get32(p) <= len - 4, "NBD_REP_SERVER lengths %u/%u", len, len >= 4 ? get32(p) : 0);
        std::string name(reinterpret_cast<const char*>(p + 4), get32(p));
        std::string desc(reinterpret_cast<const char*>(p + 4 + name.size()), len - 4 - name.size());
        const export_view* e = cat.find(name);
        NBD_CHECK(e && e->description == desc, "listed export '%s'", name.c_str());
        continue;
      }
      if (type == rep_info) {
        NBD_CHECK(o.code == opt_info || o.code == opt_go, "NBD_REP_INFO to option %u", o.code);
        NBD_CHECK(len >= 2, "NBD_REP_INFO of %u bytes", len);
        NBD_CHECK(have_name, "NBD_REP_INFO for an option whose name does not parse");
        const export_view* e = cat.find(req_name);
        NBD_CHECK(e, "NBD_REP_INFO for unknown export");
        uint16_t it = get16(p);
        if (it == info_export) {
          NBD_CHECK(len == 12, "NBD_INFO_EXPORT of %u bytes", len);
          NBD_CHECK(get64(p + 2) == e->size, "NBD_INFO_EXPORT size");
          export_flags = get16(p + 10);
          NBD_CHECK(export_flags & tf_has_flags, "NBD_INFO_EXPORT flags 0x%x", export_flags);
          NBD_CHECK(bool(export_flags & tf_send_df) == (mode != reply_mode::simple), "DF flag 0x%x in mode %d",
                    export_flags, int(mode));
          NBD_CHECK(!(export_flags & tf_block_stat_payload) || mode == reply_mode::extended, "BLOCK_STAT_PAYLOAD");
          NBD_CHECK((export_flags & ~(tf_send_df | tf_block_stat_payload)) == e->flags, "export flags 0x%x",
                    export_flags);
          saw_export_info = true;
        } else if (it == info_name) {
          NBD_CHECK(std::string(reinterpret_cast<const char*>(p + 2), len - 2) == req_name, "NBD_INFO_NAME");
        } else if (it == info_description) {
          NBD_CHECK(std::string(reinterpret_cast<const char*>(p + 2), len - 2) == e->description,
                    "NBD_INFO_DESCRIPTION");
        } else if (it == info_block_size) {
          NBD_CHECK(len == 14, "NBD_INFO_BLOCK_SIZE of %u bytes", len);
          uint32_t mn = get32(p + 2), pr = get32(p + 6), mx = get32(p + 10);
          NBD_CHECK(is_pow2(mn) && mn <= 65536 && is_pow2(pr) && pr >= mn && mx >= mn && (mx % mn == 0 || mx == ~0u),
                    "block sizes %u/%u/%u", mn, pr, mx);
        } else {
          finding("unknown NBD_INFO type " + std::to_string(it));
        }
        continue;
      }
      if (type == rep_meta_context) {
        NBD_CHECK(o.code == opt_list_meta_context || o.code == opt_set_meta_context, "META_CONTEXT to option %u",
                  o.code);
        NBD_CHECK(len > 4, "META_CONTEXT of %u bytes", len);
        NBD_CHECK(have_name && cat.find(req_name), "META_CONTEXT for an export that does not parse or exist");
        uint32_t id = get32(p);
        std::string cname(reinterpret_cast<const char*>(p + 4), len - 4);
        NBD_CHECK(cname == context_name(*cat.find(req_name), id), "context %u named '%s'", id, cname.c_str());
        NBD_CHECK(ctx_names.insert(cname).second && ctx_ids.insert(id).second, "context '%s' twice", cname.c_str());
        NBD_CHECK(o.code != opt_set_meta_context || mode != reply_mode::simple, "SET_META_CONTEXT in simple mode");
        continue;
      }
      finding("reply type " + std::to_string(type) + " to option " + std::to_string(o.code));
    }
    // A final reply is sent only once the whole option was read (ABORT: its header).
    NBD_CHECK((o.code == opt_abort && !abort_refused ? o.start + 16 : o.end()) <= r.consumed,
              "option %u answered before it was read", o.code);
    ++g;
  }
  // The end of the conversation agrees with the state.
  size_t answered_end = g == 0 ? (n >= 4 ? 4 : 0) : (abort_acked ? opts[g - 1].start + 16 : opts[g - 1].end());
  NBD_CHECK(r.tls_starts == int(tls_up), "%d TLS starts, %d STARTTLS acknowledged", r.tls_starts, int(tls_up));
  NBD_CHECK(!r.tls_required || tls_up || r.st != handshake::state::transmission, "transmission without TLS");
  switch (r.st) {
    case handshake::state::transmission:
      NBD_CHECK(go_done || export_data, "transmission without GO's ACK or export data");
      NBD_CHECK(r.consumed == answered_end, "transmission after %zu bytes, the last option ends at %zu", r.consumed,
                answered_end);
      NBD_CHECK(r.name == go_name, "export '%s' chosen, '%s' negotiated", r.name.c_str(), go_name.c_str());
      if (go_done) NBD_CHECK(r.tflags == go_flags, "transmission flags 0x%x, GO said 0x%x", r.tflags, go_flags);
      NBD_CHECK(r.mode == mode, "mode %d, the ACKs say %d", int(r.mode), int(mode));
      {
        std::set<uint32_t> have;
        if (r.base) have.insert(meta_id_base_allocation);
        if (r.depth) have.insert(meta_id_allocation_depth);
        for (size_t b = 0; b < r.bitmaps.size(); ++b)
          if (r.bitmaps[b]) have.insert(meta_id_dirty_bitmap + uint32_t(b));
        std::set<uint32_t> want = selected_for == r.name ? selected : std::set<uint32_t>{};
        NBD_CHECK(have == want, "%zu contexts in transmission, %zu negotiated", have.size(), want.size());
        NBD_CHECK(have.empty() || r.mode != reply_mode::simple, "contexts in simple mode");
      }
      break;
    case handshake::state::negotiating:
      NBD_CHECK(!go_done && !export_data && !abort_acked && !abort_refused, "still negotiating after the end");
      // Every option read in full was answered; nothing was answered that was not read.
      NBD_CHECK(r.consumed >= answered_end, "consumed %zu, answered up to %zu", r.consumed, answered_end);
      if (g < opts.size()) {
        NBD_CHECK(r.consumed < opts[g].end() || opts[g].end() > n, "option at %zu read in full (%zu) but unanswered",
                  opts[g].start, r.consumed);
        NBD_CHECK(r.consumed == answered_end || r.consumed >= opts[g].start + 16,
                  "consumed %zu: inside the header at %zu", r.consumed, opts[g].start);
      } else {
        NBD_CHECK(r.consumed == answered_end, "consumed %zu past the last option (%zu)", r.consumed, answered_end);
      }
      break;
    case handshake::state::starttls:
      finding("the run ended waiting for a TLS handshake");
    case handshake::state::closed:
      if (!abort_acked && !abort_refused) {
        // Closed at the client flags, or at option g, which got no answer.
        NBD_CHECK(g < opts.size() || (g == 0 && r.consumed == 4), "closed after %zu bytes with every option answered",
                  r.consumed);
      }
      break;
  }
  return int(g);
}

// ---- transmission ---------------------------------------------------------------------------

// The flags QEMU accepts on each command (nbd_co_receive_request).
uint16_t valid_flags(uint16_t type, reply_mode m, bool payload_flag) {
  bool ext = m == reply_mode::extended;
  uint16_t v = cf_fua;
  if (type == cmd_read && m != reply_mode::simple) v |= cf_df;
  if (type == cmd_write && ext) v |= cf_payload_len;
  if (type == cmd_write_zeroes) v |= cf_no_hole | cf_fast_zero;
  if (type == cmd_block_status) v |= cf_req_one | (ext && payload_flag ? cf_payload_len : 0);
  return v;
}

// Re-parses the replies encoded for one request: magic, cookie, chunk lengths against payloads.
void check_replies(const std::string& out, reply_mode m, uint64_t cookie, uint64_t offset, size_t read_len) {
  auto u = [&](size_t at) { return reinterpret_cast<const uint8_t*>(out.data()) + at; };
  size_t pos = 0;
  // Structured mode allows a simple reply for what carries no data.
  if (m == reply_mode::simple ||
      (m == reply_mode::structured && out.size() >= 4 && get32(u(0)) == simple_reply_magic)) {
    NBD_CHECK(m == reply_mode::simple || read_len == 0, "simple reply to a structured read");
    NBD_CHECK(out.size() >= 16 && get32(u(0)) == simple_reply_magic && get64(u(8)) == cookie, "simple reply");
    NBD_CHECK(out.size() == 16 + (get32(u(4)) ? 0 : read_len), "simple reply of %zu bytes", out.size());
    return;
  }
  bool ext = m == reply_mode::extended;
  size_t hdr = ext ? 32 : 20;
  bool done = false;
  while (pos < out.size()) {
    NBD_CHECK(!done, "chunk after DONE");
    NBD_CHECK(out.size() - pos >= hdr, "partial chunk header");
    NBD_CHECK(get32(u(pos)) == (ext ? extended_reply_magic : structured_reply_magic), "chunk magic");
    uint16_t flags = get16(u(pos + 4)), type = get16(u(pos + 6));
    NBD_CHECK(get64(u(pos + 8)) == cookie, "chunk cookie");
    uint64_t len = ext ? get64(u(pos + 24)) : get32(u(pos + 16));
    if (ext) NBD_CHECK(get64(u(pos + 16)) == offset, "extended chunk offset");
    NBD_CHECK(flags <= reply_flag_done, "chunk flags 0x%x", flags);
    done = flags & reply_flag_done;
    pos += hdr;
    NBD_CHECK(len <= out.size() - pos, "chunk length %llu past the buffer", (unsigned long long)len);
    const uint8_t* p = u(pos);
    switch (type) {
      case rt_none: NBD_CHECK(len == 0 && done, "NONE chunk"); break;
      case rt_offset_data:
        NBD_CHECK(len == 8 + read_len && get64(p) == offset, "OFFSET_DATA chunk");
        // The spec: an OFFSET_DATA chunk carries at least one byte (libnbd drops the connection).
        NBD_CHECK(len > 8 || past_findings(), "OFFSET_DATA chunk without data (a zero-length read)");
        break;
      case rt_offset_hole: NBD_CHECK(len == 12 && get64(p) == offset && get32(p + 8) > 0, "OFFSET_HOLE chunk"); break;
      case rt_block_status:
        NBD_CHECK(!ext && len >= 12 && (len - 4) % 8 == 0, "BLOCK_STATUS chunk of %llu", (unsigned long long)len);
        break;
      case rt_block_status_ext:
        NBD_CHECK(ext && len >= 24 && (len - 8) % 16 == 0 && get32(p + 4) == (len - 8) / 16, "BLOCK_STATUS_EXT chunk");
        break;
      case rt_error:
        NBD_CHECK(len >= 6 && get32(p) != 0 && get16(p + 4) == len - 6 && get16(p + 4) <= max_string_size,
                  "ERROR chunk");
        NBD_CHECK(done, "ERROR chunk without DONE");
        break;
      default: finding("chunk type " + std::to_string(type));
    }
    pos += size_t(len);
  }
  NBD_CHECK(done, "replies without DONE");
}

void run_transmission(const uint8_t* s, size_t n, reply_mode m, const export_view& e, uint16_t tflags,
                      nbd_outcome& oc) {
  export_state xs;
  xs.size = e.size;
  xs.read_only = tflags & tf_read_only;
  xs.mode = m;
  bool ext = m == reply_mode::extended;
  size_t hsize = ext ? extended_request_size : compact_request_size;
  size_t pos = 0;
  for (int guard = 0; guard < 100000; ++guard) {
    request r;
    size_t used = 0;
    size_t left = n - pos;
    const uint8_t* p = s + pos;
    auto st = parse_request(p, left, m, r, used);
    if (left < 4) {
      NBD_CHECK(st == parse_status::need_more, "%zu bytes parsed as %d", left, int(st));
      return;
    }
    if (get32(p) != (ext ? extended_request_magic : request_magic)) {
      NBD_CHECK(st == parse_status::bad_magic, "magic 0x%x parsed as %d", get32(p), int(st));
      return;
    }
    if (left < hsize) {
      NBD_CHECK(st == parse_status::need_more, "%zu bytes parsed as %d", left, int(st));
      return;
    }
    NBD_CHECK(st == parse_status::ok && used == hsize, "header parsed as %d, used %zu", int(st), used);
    NBD_CHECK(r.flags == get16(p + 4) && r.type == get16(p + 6) && r.cookie == get64(p + 8) &&
                  r.offset == get64(p + 16) && r.length == (ext ? get64(p + 24) : get32(p + 24)),
              "header fields");
    pos += used;
    ++oc.requests;
    auto c = check_request(r, xs);
    if (verbose())
      std::fprintf(stderr, "  request type %u flags 0x%x off %llu len %llu: error %u payload %llu%s%s %s\n", r.type,
                   r.flags, (unsigned long long)r.offset, (unsigned long long)r.length, c.error,
                   (unsigned long long)c.payload, c.disconnect ? " disconnect" : "", c.disc ? " disc" : "",
                   c.message.c_str());
    if (r.type == cmd_disc) {
      NBD_CHECK(c.disc && !c.error, "DISC");
      return;
    }
    NBD_CHECK(!c.disc, "disc for type %u", r.type);
    bool pl_flag = ext && (r.flags & cf_payload_len);
    uint64_t effect = r.length;
    // The payload that follows the header (what keeps the stream in step).
    // In extended mode NBD_CMD_FLAG_PAYLOAD_LEN makes the header length a payload length whatever the
    // command (QEMU reads or drops it: nbd_co_receive_request's extended_with_payload).
    uint64_t want_payload = 0;
    if (r.type == cmd_write || pl_flag) want_payload = r.length;
    if (past_findings() && pl_flag && r.type != cmd_write && r.type != cmd_block_status) want_payload = c.payload;
    if (r.type == cmd_block_status && pl_flag) effect = 0;
    if (pl_flag && r.length > max_buffer_size && want_payload == r.length)
      NBD_CHECK(c.error && c.disconnect, "a %llu-byte payload neither refused nor hung up on",
                (unsigned long long)r.length);
    if (c.error) {
      ++oc.refused;
      NBD_CHECK(c.error == e_inval, "refusal with error %u", c.error);
      NBD_CHECK(!c.message.empty(), "refusal without a message");
      if (!c.disconnect) NBD_CHECK(c.payload == want_payload, "refused type %u: payload %llu, header says %llu", r.type,
                                   (unsigned long long)c.payload, (unsigned long long)want_payload);
    } else {
      NBD_CHECK(!c.disconnect, "disconnect without an error");
      NBD_CHECK(r.type <= cmd_block_status, "type %u accepted", r.type);
      NBD_CHECK(!(r.flags & ~valid_flags(r.type, m, pl_flag)), "flags 0x%x accepted for type %u", r.flags, r.type);
      if (r.type == cmd_read || r.type == cmd_write || r.type == cmd_cache)
        NBD_CHECK(r.length <= max_buffer_size, "length %llu accepted", (unsigned long long)r.length);
      if (r.type != cmd_flush)
        NBD_CHECK(r.offset <= e.size && effect <= e.size - r.offset, "type %u past EOF accepted (%llu+%llu)", r.type,
                  (unsigned long long)r.offset, (unsigned long long)effect);
      if (xs.read_only)
        NBD_CHECK(r.type != cmd_write && r.type != cmd_trim && r.type != cmd_write_zeroes, "write type %u on read-only",
                  r.type);
      NBD_CHECK(c.payload == want_payload, "type %u: payload %llu, header says %llu", r.type,
                (unsigned long long)c.payload, (unsigned long long)want_payload);
      if (pl_flag && r.type == cmd_block_status)
        NBD_CHECK(r.length >= 8 && r.length <= 8 + 4 * 4096, "block status payload of %llu accepted",
                  (unsigned long long)r.length);
    }
    // The replies the connection would send, re-parsed.
    std::string out;
    size_t read_len = 0;
    if (c.error) {
      put_error(out, m, r.cookie, r.offset, c.error, c.message);
    } else if (r.type == cmd_read) {
      read_len = size_t(std::min<uint64_t>(r.length, 64));
      // A sparse read: a hole chunk in front of the data chunk.
      if (m != reply_mode::simple && r.length > 64) put_hole(out, m, r.cookie, r.offset, 64, false);
      // As the connection answers: a read of nothing ends without a data chunk.
      if (read_len == 0) put_read_done(out, m, r.cookie, r.offset);
      else put_read_header(out, m, r.cookie, r.offset, read_len, true);
      out.append(read_len, '\x5a');
    } else if (r.type == cmd_block_status && m != reply_mode::simple) {
      std::vector<extent> ex;
      uint64_t l = std::max<uint64_t>(effect, 1);
      ex.push_back({l / 2 + 1, state_hole});
      if (!(r.flags & cf_req_one)) ex.push_back({l, state_hole | state_zero});
      put_block_status(out, m, r.cookie, r.offset, meta_id_base_allocation, ex, false);
      put_block_status(out, m, r.cookie, r.offset, meta_id_allocation_depth, ex, true);
    } else {
      put_done(out, m, r.cookie, r.offset);
    }
    // A simple-mode read that succeeded is header + data; everything else is replies only.
    check_replies(out, m, r.cookie, r.offset, read_len);
    if (c.disconnect) return;
    if (c.payload > 0) {
      size_t take = size_t(std::min<uint64_t>(c.payload, n - pos));
      if (!c.error && r.type == cmd_block_status && take == c.payload) {
        block_status_payload bp;
        bool ok = parse_block_status_payload(s + pos, take, bp);
        NBD_CHECK(ok == ((take - 8) % 4 == 0), "block status payload of %zu parsed %d", take, ok);
        if (ok)
          NBD_CHECK(bp.effect_length == get64(s + pos) && bp.ids.size() == (take - 8) / 4, "block status payload");
      }
      pos += take;
      if (take < c.payload) return;
    }
  }
}

}  // namespace

nbd_outcome nbd_fuzz_one(const uint8_t* data, size_t size) {
  nbd_outcome oc;
  uint8_t control = 0, seed = 0;
  if (size >= nbd_control_bytes) {
    control = data[0];
    seed = data[1];
    data += nbd_control_bytes;
    size -= nbd_control_bytes;
  }
  static const uint32_t limits[] = {64u << 10, 64, 4096, 16};
  uint32_t limit = limits[control & 3];
  bool tls = seed & nbd_seed_tls_required;
  hs_result whole = run_handshake(data, size, limit, tls, chopper{1, 0});
  hs_result cut = run_handshake(data, size, limit, tls, chopper{0x9e3779b97f4a7c15ull ^ (uint64_t(seed) << 32) ^ size,
                                                           unsigned(control >> 5)});
  // Where the reads end must not change what the server says or decides.
  NBD_CHECK(whole.out == cut.out, "output differs with the reads cut (%zu vs %zu bytes)", whole.out.size(),
            cut.out.size());
  NBD_CHECK(whole.consumed == cut.consumed && whole.st == cut.st && whole.reason == cut.reason &&
                whole.name == cut.name && whole.mode == cut.mode && whole.base == cut.base &&
                whole.depth == cut.depth && whole.bitmaps == cut.bitmaps && whole.block_size == cut.block_size &&
                whole.tflags == cut.tflags && whole.tls_starts == cut.tls_starts,
            "outcome differs with the reads cut (consumed %zu vs %zu)", whole.consumed, cut.consumed);
  oc.options = check_output(data, size, cut);
  oc.state = state_rank(cut.st);
  if (verbose())
    std::fprintf(stderr, "  handshake: %d options answered, state %d (%s), consumed %zu of %zu, %zu bytes out\n",
                 oc.options, oc.state, cut.reason.c_str(), cut.consumed, size, cut.out.size());
  const catalog& cat = the_catalog();
  if (cut.st == handshake::state::transmission) {
    const export_view* e = cat.find(cut.name);
    NBD_CHECK(e, "transmission on unknown export");
    run_transmission(data + cut.consumed, size - cut.consumed, cut.mode, *e, cut.tflags, oc);
  } else if (control & nbd_force_transmission) {
    static const reply_mode modes[] = {reply_mode::simple, reply_mode::structured, reply_mode::extended,
                                       reply_mode::extended};
    const export_view& e = cat.v[((seed >> 4) & 7) % cat.v.size()];
    run_transmission(data + cut.consumed, size - cut.consumed, modes[(control >> 3) & 3], e, e.flags, oc);
  }
  return oc;
}

}  // namespace blockd::fuzz

// NBD option haggling: QEMU's server replies for every option, length check and order rule; plain C++, one connection's thread.
#include "protocol/nbd/handshake.h"

#include <algorithm>
#include <cerrno>
#include <cstdio>

#include "protocol/nbd/wire.h"

namespace blockd::nbd {
namespace {

// Reads an option payload front to back; a read past its end marks the option inconsistent.
struct cursor {
  const uint8_t* p;
  size_t left;
  bool bad = false;
  bool take(size_t n, const uint8_t*& out) {
    if (n > left) {
      bad = true;
      return false;
    }
    out = p;
    p += n;
    left -= n;
    return true;
  }
  bool u16(uint16_t& v) {
    const uint8_t* q;
    if (!take(2, q)) return false;
    v = get16(q);
    return true;
  }
  bool u32(uint32_t& v) {
    const uint8_t* q;
    if (!take(4, q)) return false;
    v = get32(q);
    return true;
  }
};

// QEMU prints export names from clients with control characters escaped; names are bounded already.
std::string sanitize(const std::string& s) {
  std::string out;
  for (unsigned char c : s) {
    if (c < 0x20 || c == 0x7f) {
      static const char hex[] = "0123456789abcdef";
      out += "\\x";
      out += hex[c >> 4];
      out += hex[c & 15];
    } else {
      out += char(c);
    }
  }
  return out;
}

bool needs_payload(uint32_t o) {
  return o == opt_info || o == opt_go || o == opt_list_meta_context || o == opt_set_meta_context ||
         o == opt_export_name;
}

}  // namespace

handshake::handshake(const export_catalog& catalog, settings s) : catalog_(catalog), s_(s) {}

void handshake::start(std::string& out) {
  put64(out, nbd_magic);
  put64(out, opts_magic);
  put16(out, flag_fixed_newstyle | flag_no_zeroes);
}

size_t handshake::need() const {
  if (state_ != state::negotiating) return 0;
  switch (phase_) {
    case phase::client_flags: return 4;
    case phase::option_header: return 16;
    case phase::option_payload: return optlen_;
    case phase::drain: return 1;
  }
  return 0;
}

void handshake::tls_started() {
  if (state_ != state::starttls) return;
  tls_active_ = true;
  state_ = state::negotiating;
  phase_ = phase::option_header;
}

void handshake::close(std::string why) {
  state_ = state::closed;
  reason_ = std::move(why);
}

void handshake::reply(std::string& out, uint32_t type, const std::string& payload) {
  put64(out, rep_magic);
  put32(out, opt_);
  put32(out, type);
  put32(out, uint32_t(payload.size()));
  out += payload;
}

void handshake::reply_err(std::string& out, uint32_t type, const std::string& msg) { reply(out, type, msg); }

size_t handshake::feed(const uint8_t* p, size_t n, std::string& out) {
  size_t used = 0;
  while (state_ == state::negotiating) {
    size_t left = n - used;
    const uint8_t* q = p + used;
    switch (phase_) {
      case phase::client_flags: {
        if (left < 4) return used;
        uint32_t f = get32(q);
        used += 4;
        fixed_ = f & flag_c_fixed_newstyle;
        no_zeroes_ = f & flag_c_no_zeroes;
        f &= ~(flag_c_fixed_newstyle | flag_c_no_zeroes);
        if (f) {
          char buf[64];
          std::snprintf(buf, sizeof buf, "Unknown client flags 0x%x received", f);
          close(buf);
          return used;
        }
        phase_ = phase::option_header;
        break;
      }
      case phase::option_header: {
        if (left < 16) return used;
        uint64_t magic = get64(q);
        opt_ = get32(q + 8);
        optlen_ = get32(q + 12);
        used += 16;
        if (magic != opts_magic) {
          close("Bad magic received");
          return used;
        }
        if (optlen_ > max_buffer_size) {
          close("len (" + std::to_string(optlen_) + ") is larger than max len (" + std::to_string(max_buffer_size) + ")");
          return used;
        }
        if (s_.tls_required && !tls_active_) {
          // QEMU's order: before TLS only STARTTLS is served; nothing else reaches the handlers.
          char hex[16];
          std::snprintf(hex, sizeof hex, "0x%x", opt_);
          if (!fixed_) {
            close(std::string("Unsupported option ") + hex);
            return used;
          }
          if (opt_ == opt_starttls) {
            if (optlen_ > 0) {
              // A client that cannot start TLS correctly is dropped, not answered.
              close("option 'starttls' has unexpected length");
              return used;
            }
            reply(out, rep_ack);
            state_ = state::starttls;
            return used;
          }
          if (opt_ == opt_export_name) {
            // EXPORT_NAME has no error reply: the connection ends.
            close(std::string("Option ") + hex + " not permitted before TLS");
            return used;
          }
          drain_reply_ = rep_err_tls_reqd;
          drain_msg_ = std::string("Option ") + hex + " not permitted before TLS";
          close_after_drain_ = opt_ == opt_abort;
          if (optlen_ > 0) {
            phase_ = phase::drain;
            drain_left_ = optlen_;
            break;
          }
          reply_err(out, drain_reply_, drain_msg_);
          if (close_after_drain_) {
            close("client aborted the handshake");
            return used;
          }
          break;
        }
        if (!fixed_ && opt_ != opt_export_name) {
          // A client that did not agree to fixed newstyle cannot be told about errors.
          close("Unsupported option " + std::to_string(opt_) + " (" + opt_name(opt_) + ")");
          return used;
        }
        if (opt_ == opt_abort) {
          // The spec asks for a reply; clients must tolerate it missing, so the payload is not awaited.
          reply(out, rep_ack);
          close("client aborted the handshake");
          return used;
        }
        if (opt_ == opt_export_name && optlen_ > max_string_size) {
          close("Bad length received");
          return used;
        }
        if (opt_ == opt_export_name && optlen_ > s_.buffered_option_limit) {
          // EXPORT_NAME has no reply format to refuse with: too long a name ends the connection.
          close("Bad length received");
          return used;
        }
        if (needs_payload(opt_) && optlen_ > s_.buffered_option_limit) {
          // Bounded memory: a legitimate INFO/GO/META payload is far below this.
          phase_ = phase::drain;
          drain_left_ = optlen_;
          drain_reply_ = rep_err_too_big;
          drain_msg_ = std::string("option '") + opt_name(opt_) + "' payload too large";
          break;
        }
        if (!needs_payload(opt_) && optlen_ > 0) {
          // Options that take no payload: the payload is dropped, then refused.
          phase_ = phase::drain;
          drain_left_ = optlen_;
          bool known = opt_ == opt_list || opt_ == opt_starttls || opt_ == opt_structured_reply ||
                       opt_ == opt_extended_headers;
          drain_reply_ = known ? rep_err_invalid : rep_err_unsup;
          drain_msg_ = known ? std::string("option '") + opt_name(opt_) + "' has unexpected length"
                             : "Unsupported option " + std::to_string(opt_) + " (" + opt_name(opt_) + ")";
          break;
        }
        if (optlen_ == 0) {
          handle_option(q + 16, 0, out);  // no payload; may end the negotiation
          if (state_ == state::negotiating) phase_ = phase::option_header;
          break;
        }
        phase_ = phase::option_payload;
        break;
      }
      case phase::option_payload: {
        if (left < optlen_) return used;
        used += optlen_;
        phase_ = phase::option_header;
        handle_option(q, optlen_, out);
        break;
      }
      case phase::drain: {
        size_t k = size_t(std::min<uint64_t>(left, drain_left_));
        used += k;
        drain_left_ -= k;
        if (drain_left_ > 0) return used;
        reply_err(out, drain_reply_, drain_msg_);
        phase_ = phase::option_header;
        if (close_after_drain_) {
          close("client aborted the handshake");
          return used;
        }
        break;
      }
    }
  }
  return used;
}

void handshake::handle_option(const uint8_t* p, size_t n, std::string& out) {
  switch (opt_) {
    case opt_export_name: return handle_export_name(p, n, out);
    case opt_list: return handle_list(out);
    case opt_info:
    case opt_go: return handle_info(p, n, out);
    case opt_list_meta_context:
    case opt_set_meta_context: return handle_meta(p, n, out);
    case opt_starttls:
      // Reached only without tls-creds (the spec's NOTLS mode) or once TLS is up; QEMU's wording.
      if (tls_active_) return reply_err(out, rep_err_invalid, "TLS already enabled");
      return reply_err(out, rep_err_policy, "TLS not configured");
    case opt_structured_reply:
      if (mode_ == reply_mode::extended)
        return reply_err(out, rep_err_ext_header_reqd, "extended headers already negotiated");
      if (mode_ == reply_mode::structured)
        return reply_err(out, rep_err_invalid, "structured reply already negotiated");
      mode_ = reply_mode::structured;
      return reply(out, rep_ack);
    case opt_extended_headers:
      if (mode_ == reply_mode::extended) return reply_err(out, rep_err_invalid, "extended headers already negotiated");
      mode_ = reply_mode::extended;
      return reply(out, rep_ack);
    default:
      return reply_err(out, rep_err_unsup, "Unsupported option " + std::to_string(opt_) + " (" + opt_name(opt_) + ")");
  }
}

uint16_t handshake::flags_for(const export_view& e, bool info) const {
  uint16_t f = e.flags;
  if (mode_ != reply_mode::simple) f |= tf_send_df;
  if (mode_ == reply_mode::extended && (contexts_.count() > 0 || info)) f |= tf_block_stat_payload;
  return f;
}

void handshake::handle_export_name(const uint8_t* p, size_t n, std::string& out) {
  if (mode_ == reply_mode::extended) return close("Extended headers already negotiated");
  std::string name(reinterpret_cast<const char*>(p), n);
  const export_view* e = catalog_.find(name);
  if (!e) return close("export not found");
  if (contexts_export_ != name) contexts_ = {};
  tflags_ = flags_for(*e, false);
  put64(out, e->size);
  put16(out, tflags_);
  if (!no_zeroes_) out.append(124, '\0');
  chosen_ = name;
  state_ = state::transmission;
}

void handshake::handle_list(std::string& out) {
  for (const export_view* e : catalog_.all()) {
    std::string payload;
    put32(payload, uint32_t(e->name.size()));
    payload += e->name;
    payload += e->description;
    reply(out, rep_server, payload);
  }
  reply(out, rep_ack);
}

void handshake::handle_info(const uint8_t* p, size_t n, std::string& out) {
  cursor c{p, n};
  const char* on = opt_name(opt_);
  uint32_t len = 0;
  const uint8_t* name_p = nullptr;
  if (!c.u32(len)) return reply_err(out, rep_err_invalid, std::string("Inconsistent lengths in option ") + on);
  if (len > max_string_size) return reply_err(out, rep_err_invalid, "Invalid name length: " + std::to_string(len));
  if (!c.take(len, name_p)) return reply_err(out, rep_err_invalid, std::string("Inconsistent lengths in option ") + on);
  std::string name(reinterpret_cast<const char*>(name_p), len);
  uint16_t requests = 0;
  if (!c.u16(requests)) return reply_err(out, rep_err_invalid, std::string("Inconsistent lengths in option ") + on);
  if (requests != c.left / 2) return reply_err(out, rep_err_invalid, std::string("Inconsistent lengths in option ") + on);
  bool send_name = false, block_size = false;
  for (uint16_t i = 0; i < requests; ++i) {
    uint16_t r = 0;
    c.u16(r);
    if (r == info_name) send_name = true;
    if (r == info_block_size) block_size = true;
  }
  if (c.left) return reply_err(out, rep_err_invalid, std::string("option '") + on + "' has unexpected length");
  const export_view* e = catalog_.find(name);
  if (!e) return reply_err(out, rep_err_unknown, "export '" + sanitize(name) + "' not present");
  if (opt_ == opt_go && contexts_export_ != name) contexts_ = {};
  if (send_name) {
    std::string pl;
    put16(pl, info_name);
    pl += name;
    reply(out, rep_info, pl);
  }
  if (!e->description.empty()) {
    std::string pl;
    put16(pl, info_description);
    pl += e->description;
    reply(out, rep_info, pl);
  }
  {
    std::string pl;
    put16(pl, info_block_size);
    uint32_t min = (opt_ == opt_info || block_size) ? e->min_block : 1;
    put32(pl, min);
    put32(pl, std::max<uint32_t>(4096, min));
    put32(pl, std::min<uint32_t>(e->max_block, max_buffer_size));
    reply(out, rep_info, pl);
  }
  uint16_t f = flags_for(*e, opt_ == opt_info);
  {
    std::string pl;
    put16(pl, info_export);
    put64(pl, e->size);
    put16(pl, f);
    reply(out, rep_info, pl);
  }
  if (opt_ == opt_info && !block_size && e->min_block > 1)
    return reply_err(out, rep_err_block_size_reqd, "request NBD_INFO_BLOCK_SIZE to use this export");
  reply(out, rep_ack);
  if (opt_ == opt_go) {
    chosen_ = name;
    tflags_ = f;
    block_size_ = block_size;
    state_ = state::transmission;
  }
}

void handshake::handle_meta(const uint8_t* p, size_t n, std::string& out) {
  const char* on = opt_name(opt_);
  bool list = opt_ == opt_list_meta_context;
  if (!list && mode_ == reply_mode::simple)
    return reply_err(out, rep_err_invalid,
                     std::string("request option '") + on + "' when structured reply is not negotiated");
  meta_selection sel;
  if (!list) {
    // SET replaces the selection even when it then fails (QEMU clears it first).
    contexts_ = {};
    contexts_export_.clear();
  }
  cursor c{p, n};
  uint32_t len = 0;
  const uint8_t* name_p = nullptr;
  if (!c.u32(len)) return reply_err(out, rep_err_invalid, std::string("Inconsistent lengths in option ") + on);
  if (len > max_string_size) return reply_err(out, rep_err_invalid, "Invalid name length: " + std::to_string(len));
  if (!c.take(len, name_p)) return reply_err(out, rep_err_invalid, std::string("Inconsistent lengths in option ") + on);
  std::string name(reinterpret_cast<const char*>(name_p), len);
  const export_view* e = catalog_.find(name);
  if (!e) return reply_err(out, rep_err_unknown, "export '" + sanitize(name) + "' not present");
  sel.bitmaps.assign(e->bitmaps.size(), false);
  uint32_t queries = 0;
  if (!c.u32(queries)) return reply_err(out, rep_err_invalid, std::string("Inconsistent lengths in option ") + on);
  auto all_qemu = [&] {
    sel.allocation_depth = e->allocation_depth;
    std::fill(sel.bitmaps.begin(), sel.bitmaps.end(), true);
  };
  if (list && queries == 0) {
    sel.base_allocation = true;
    all_qemu();
  }
  for (uint32_t i = 0; i < queries && !(list && queries == 0); ++i) {
    uint32_t qlen = 0;
    const uint8_t* q = nullptr;
    if (!c.u32(qlen) || !c.take(qlen, q))
      return reply_err(out, rep_err_invalid, std::string("Inconsistent lengths in option ") + on);
    // Queries that are too long or in another namespace are skipped, not refused (spec and QEMU).
    if (qlen > max_string_size || qlen < 5) continue;
    std::string query(reinterpret_cast<const char*>(q), qlen);
    std::string ns = query.substr(0, 5), rest = query.substr(5);
    if (ns == "base:") {
      if ((rest.empty() && list) || rest == "allocation") sel.base_allocation = true;
    } else if (ns == "qemu:") {
      if (rest.empty()) {
        if (list) all_qemu();
      } else if (rest == "allocation-depth") {
        sel.allocation_depth = e->allocation_depth;
      } else if (rest.rfind("dirty-bitmap:", 0) == 0) {
        std::string bm = rest.substr(13);
        for (size_t b = 0; b < e->bitmaps.size(); ++b)
          if ((bm.empty() && list) || e->bitmaps[b] == bm) sel.bitmaps[b] = true;
      }
    }
  }
  if (c.left) return reply_err(out, rep_err_invalid, std::string("option '") + on + "' has unexpected length");
  auto send_ctx = [&](uint32_t id, const std::string& ctx) {
    std::string pl;
    put32(pl, id);
    pl += ctx;
    reply(out, rep_meta_context, pl);
  };
  if (sel.base_allocation) send_ctx(meta_id_base_allocation, "base:allocation");
  if (sel.allocation_depth) send_ctx(meta_id_allocation_depth, "qemu:allocation-depth");
  for (size_t b = 0; b < sel.bitmaps.size(); ++b)
    if (sel.bitmaps[b]) send_ctx(meta_id_dirty_bitmap + uint32_t(b), "qemu:dirty-bitmap:" + e->bitmaps[b]);
  reply(out, rep_ack);
  if (!list) {
    contexts_ = sel;
    contexts_export_ = name;
  }
}

const char* opt_name(uint32_t o) {
  switch (o) {
    case opt_export_name: return "export name";
    case opt_abort: return "abort";
    case opt_list: return "list";
    case opt_peek_export: return "peek export";
    case opt_starttls: return "starttls";
    case opt_info: return "info";
    case opt_go: return "go";
    case opt_structured_reply: return "structured reply";
    case opt_list_meta_context: return "list meta context";
    case opt_set_meta_context: return "set meta context";
    case opt_extended_headers: return "extended headers";
  }
  return "<unknown>";
}

const char* cmd_name(uint16_t c) {
  switch (c) {
    case cmd_read: return "read";
    case cmd_write: return "write";
    case cmd_disc: return "disconnect";
    case cmd_flush: return "flush";
    case cmd_trim: return "trim";
    case cmd_cache: return "cache";
    case cmd_write_zeroes: return "write zeroes";
    case cmd_block_status: return "block status";
    case cmd_resize: return "resize";
  }
  return "<unknown>";
}

uint32_t errno_to_nbd(int e) {
  switch (-e) {
    case 0: return 0;
    case EPERM:
    case EROFS: return e_perm;
    case EIO: return e_io;
    case ENOMEM: return e_nomem;
    case EDQUOT:
    case EFBIG:
    case ENOSPC: return e_nospc;
    case EOVERFLOW: return e_overflow;
    case ENOTSUP: return e_notsup;
    case ESHUTDOWN: return e_shutdown;
  }
  return e_inval;
}

}  // namespace blockd::nbd

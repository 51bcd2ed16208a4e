// Server side of the NBD fixed-newstyle handshake as a pure state machine (bytes in, bytes out); plain C++, one connection's thread.
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace blockd::nbd {

// How one export looks to a client during negotiation. The server fills it from the export's
// options and its node; the handshake never touches the node.
struct export_view {
  std::string name;
  std::string description;
  uint64_t size = 0;           // already rounded down to 512, as QEMU advertises it
  uint16_t flags = 0;          // transmission flags before the per-connection additions (DF, BLOCK_STAT_PAYLOAD)
  uint32_t min_block = 1;      // the node's request alignment
  uint32_t max_block = 32u << 20;
  bool allocation_depth = false;
  std::vector<std::string> bitmaps;  // exported dirty bitmaps, context ids 2..
};

// Finds exports by name and lists them. Called during feed(), on the connection's thread.
struct export_catalog {
  virtual const export_view* find(const std::string& name) const = 0;
  virtual std::vector<const export_view*> all() const = 0;

 protected:
  ~export_catalog() = default;
};

enum class reply_mode { simple, structured, extended };

// The negotiated metadata contexts of the export the client went to.
struct meta_selection {
  bool base_allocation = false;
  bool allocation_depth = false;
  std::vector<bool> bitmaps;
  size_t count() const {
    size_t n = base_allocation + allocation_depth;
    for (bool b : bitmaps) n += b;
    return n;
  }
};

class handshake {
 public:
  // starttls: the client's STARTTLS was acknowledged; the caller runs the TLS handshake over the
  // socket, then calls tls_started() and feeds decrypted bytes from then on.
  enum class state { negotiating, starttls, transmission, closed };

  struct settings {
    // Options larger than this are drained and answered NBD_REP_ERR_TOO_BIG instead of buffered;
    // QEMU's hard cap (32 MiB) still disconnects.
    uint32_t buffered_option_limit = 64u << 10;
    // The server has tls-creds: every option but STARTTLS is refused until TLS is up (QEMU's rule).
    bool tls_required = false;
  };

  handshake(const export_catalog& catalog, settings s);

  // The server's greeting; call once, first.
  void start(std::string& out);

  // Consumes what it can of `n` bytes and appends replies to `out`; returns the bytes consumed.
  // It consumes a header or a buffered payload only when all of it is there, so when it returns
  // less than `n` (or 0), the caller keeps the rest and waits until at least need() bytes are
  // available before calling again. After state() leaves negotiating, it consumes nothing more:
  // bytes left over belong to the transmission phase.
  size_t feed(const uint8_t* p, size_t n, std::string& out);
  size_t need() const;

  state current() const { return state_; }
  // The TLS handshake after STARTTLS succeeded: negotiation goes on (encrypted by the caller).
  void tls_started();
  bool tls_active() const { return tls_active_; }
  // Why the connection closes (client abort, protocol violation), for the trace.
  const std::string& close_reason() const { return reason_; }

  // Valid once in transmission.
  const std::string& export_name() const { return chosen_; }
  reply_mode mode() const { return mode_; }
  const meta_selection& contexts() const { return contexts_; }
  // Whether the client asked for block sizes (QEMU then checks alignment, and so do we, in the trace).
  bool block_size_negotiated() const { return block_size_; }
  // The export's flags as sent to the client (DF and BLOCK_STAT_PAYLOAD folded in).
  uint16_t transmission_flags() const { return tflags_; }

 private:
  enum class phase { client_flags, option_header, option_payload, drain };

  void handle_option(const uint8_t* p, size_t n, std::string& out);
  void reply(std::string& out, uint32_t type, const std::string& payload = {});
  void reply_err(std::string& out, uint32_t type, const std::string& msg);
  void handle_export_name(const uint8_t* p, size_t n, std::string& out);
  void handle_info(const uint8_t* p, size_t n, std::string& out);
  void handle_meta(const uint8_t* p, size_t n, std::string& out);
  void handle_list(std::string& out);
  uint16_t flags_for(const export_view& e, bool info) const;
  void close(std::string why);

  const export_catalog& catalog_;
  settings s_;
  state state_ = state::negotiating;
  phase phase_ = phase::client_flags;
  bool fixed_ = false;
  bool tls_active_ = false;
  bool close_after_drain_ = false;  // ABORT before TLS: refused, then the connection ends
  bool no_zeroes_ = false;
  uint32_t opt_ = 0;
  uint32_t optlen_ = 0;
  uint64_t drain_left_ = 0;
  uint32_t drain_reply_ = 0;
  std::string drain_msg_;
  reply_mode mode_ = reply_mode::simple;
  meta_selection contexts_;
  std::string contexts_export_;  // the export SET_META_CONTEXT chose contexts for
  std::string chosen_;
  bool block_size_ = false;
  uint16_t tflags_ = 0;
  std::string reason_;
};

}  // namespace blockd::nbd

// Telnet and TN3270 server-side option handling for socket chardevs (QEMU's telnet=on/tn3270=on); plain C++, the chardev's thread.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace blockd::chr {

// The negotiation a telnet server sends right after accepting a client: character mode without
// local echo (telnet) or binary mode with end-of-record plus a terminal-type request (tn3270).
// Nothing waits for the client's answers, as in QEMU.
std::string_view telnet_init_sequence(bool tn3270);

// Removes the telnet commands from a client's byte stream, keeping state across reads (a command
// may be split between two reads). The rules are QEMU's, which are simpler than RFC 854:
//  - IAC IAC is one data byte 0xFF;
//  - IAC BREAK is a break for the frontend (two bytes);
//  - in tn3270 mode IAC EOR, IAC SB and IAC SE stay in the data (record boundaries for the
//    3270 frontend) and IAC IP, IAC NOP are dropped (two bytes);
//  - any other IAC x is taken as a three-byte option command (IAC x option) and dropped; so the
//    payload of a subnegotiation is delivered as data and its IAC SE eats one more byte.
class telnet_filter {
 public:
  explicit telnet_filter(bool tn3270) : tn3270_(tn3270) {}

  // Filters `in` and appends the data bytes to `out`; returns how many breaks the input held.
  unsigned filter(std::string_view in, std::string& out);
  void reset() { state_ = state::data; }

 private:
  enum class state { data, command, option };
  bool tn3270_;
  state state_ = state::data;
};

}  // namespace blockd::chr

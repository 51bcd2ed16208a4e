// Telnet/TN3270 negotiation bytes and the input command filter for socket chardevs; plain C++, the chardev's thread.
#include "protocol/chardev/telnet.h"

namespace blockd::chr {
namespace {

constexpr uint8_t iac = 255, will = 251, do_ = 253, sb = 250, se = 240;
constexpr uint8_t cmd_break = 243, cmd_ip = 244, cmd_nop = 241, cmd_eor = 239;
constexpr uint8_t opt_binary = 0, opt_echo = 1, opt_sga = 3, opt_ttype = 24, opt_eor = 25;

}  // namespace

std::string_view telnet_init_sequence(bool tn3270) {
  static const uint8_t telnet_bytes[] = {iac, will, opt_echo, iac, will, opt_sga, iac, will, opt_binary,
                                         iac, do_,  opt_binary};
  // TN3270 (RFC 1576): EOR both ways, binary both ways, and "send your terminal type".
  static const uint8_t tn3270_bytes[] = {iac, do_, opt_eor,    iac, will, opt_eor,   iac, do_, opt_binary,
                                         iac, will, opt_binary, iac, do_,  opt_ttype, iac, sb,  opt_ttype,
                                         1,   iac, se};
  if (tn3270) return {reinterpret_cast<const char*>(tn3270_bytes), sizeof tn3270_bytes};
  return {reinterpret_cast<const char*>(telnet_bytes), sizeof telnet_bytes};
}

unsigned telnet_filter::filter(std::string_view in, std::string& out) {
  unsigned breaks = 0;
  for (char ch : in) {
    auto c = static_cast<uint8_t>(ch);
    switch (state_) {
      case state::data:
        if (c == iac)
          state_ = state::command;
        else
          out.push_back(ch);
        break;
      case state::command:
        state_ = state::data;
        if (c == iac) {
          out.push_back(ch);
        } else if (c == cmd_break) {
          ++breaks;
        } else if (tn3270_ && (c == cmd_eor || c == sb || c == se)) {
          out.push_back(static_cast<char>(iac));
          out.push_back(ch);
        } else if (tn3270_ && (c == cmd_ip || c == cmd_nop)) {
          // dropped: QEMU has no use for them either
        } else {
          state_ = state::option;  // WILL/WONT/DO/DONT and the rest: one option byte follows
        }
        break;
      case state::option: state_ = state::data; break;
    }
  }
  return breaks;
}

}  // namespace blockd::chr

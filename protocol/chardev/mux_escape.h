// The mux chardev's keyboard escapes (Ctrl-A commands) and console timestamps, as QEMU's mux has them; plain C++, the chardev's thread.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>

namespace blockd::chr {

constexpr uint8_t mux_escape_char = 0x01;  // Ctrl-A; QSD has no option to change it

// Recognises "C-a <key>" in the input of a mux. Every byte fed yields what to do with it.
class mux_escape {
 public:
  enum class action {
    deliver,           // an ordinary byte (or the C-a of "C-a C-a") for the focused frontend
    swallow,           // consumed: the escape itself or an unknown key after it
    help,              // C-a h or C-a ?: print mux_help_text()
    exit,              // C-a x
    save,              // C-a s
    send_break,        // C-a b
    switch_focus,      // C-a c
    toggle_timestamps  // C-a t
  };
  action feed(uint8_t c);

 private:
  bool escaped_ = false;
};

// The text C-a h prints (QEMU's, lines ending in "\n\r").
std::string mux_help_text();
// What C-a x prints before QEMU would stop.
std::string_view mux_exit_text();

// Prefixes each output line with "[hh:mm:ss.mmm] " (time since the first stamp) while enabled.
// Toggling on does not stamp the line under way; the first stamp is the next line's.
class mux_timestamps {
 public:
  void toggle();
  bool on() const { return on_; }
  // Returns `out` with stamps inserted; `now_ms` is a monotonic clock in milliseconds.
  std::string apply(std::string_view out, int64_t now_ms);

 private:
  bool on_ = false;
  bool line_start_ = false;
  int64_t start_ms_ = -1;
};

}  // namespace blockd::chr

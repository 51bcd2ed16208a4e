// Mux escape keys, help text and console timestamps; plain C++, the chardev's thread.
#include "protocol/chardev/mux_escape.h"

#include <cstdio>

namespace blockd::chr {

mux_escape::action mux_escape::feed(uint8_t c) {
  if (!escaped_) {
    if (c == mux_escape_char) {
      escaped_ = true;
      return action::swallow;
    }
    return action::deliver;
  }
  escaped_ = false;
  switch (c) {
    case mux_escape_char: return action::deliver;
    case '?':
    case 'h': return action::help;
    case 'x': return action::exit;
    case 's': return action::save;
    case 'b': return action::send_break;
    case 'c': return action::switch_focus;
    case 't': return action::toggle_timestamps;
    default: return action::swallow;
  }
}

std::string mux_help_text() {
  static const char* lines[] = {"C-a h    print this help",
                                "C-a x    exit emulator",
                                "C-a s    save disk data back to file (if -snapshot)",
                                "C-a t    toggle console timestamps",
                                "C-a b    send break (magic sysrq)",
                                "C-a c    switch between console and monitor",
                                "C-a C-a  sends C-a"};
  std::string text = "\n\r";
  for (const char* l : lines) {
    text += l;
    text += "\n\r";
  }
  return text;
}

std::string_view mux_exit_text() { return "QEMU: Terminated\n\r"; }

void mux_timestamps::toggle() {
  on_ = !on_;
  start_ms_ = -1;
  line_start_ = false;
}

std::string mux_timestamps::apply(std::string_view out, int64_t now_ms) {
  if (!on_) return std::string(out);
  std::string r;
  r.reserve(out.size() + 16);
  for (char c : out) {
    if (line_start_) {
      if (start_ms_ < 0) start_ms_ = now_ms;
      int64_t t = now_ms - start_ms_;
      int64_t secs = t / 1000;
      char stamp[48];
      std::snprintf(stamp, sizeof stamp, "[%02d:%02d:%02d.%03d] ", int(secs / 3600), int((secs / 60) % 60),
                    int(secs % 60), int(t % 1000));
      r += stamp;
      line_start_ = false;
    }
    r.push_back(c);
    if (c == '\n') line_start_ = true;
  }
  return r;
}

}  // namespace blockd::chr

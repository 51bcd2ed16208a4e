// Ring buffer storage and QEMU's UTF-8 sanitising of ringbuf-read; plain C++, the chardev's thread.
#include "protocol/chardev/ringbuf.h"

#include <algorithm>

#include "protocol/qmp/utf8.h"

namespace blockd::chr {

void ring_buffer::write(std::string_view bytes) {
  if (size_ == 0) return;
  if (bytes.size() >= size_) {
    data_.assign(bytes.substr(bytes.size() - size_));
    start_ = 0;
    return;
  }
  data_.append(bytes);
  if (count() > size_) start_ = data_.size() - size_;
  // Reclaim the consumed front once it dominates, so the string does not grow forever.
  if (start_ > 4096 && start_ > data_.size() / 2) {
    data_.erase(0, start_);
    start_ = 0;
  }
}

std::string ring_buffer::read(uint64_t max) {
  size_t n = static_cast<size_t>(std::min<uint64_t>(max, count()));
  std::string out = data_.substr(start_, n);
  start_ += n;
  if (start_ == data_.size()) {
    data_.clear();
    start_ = 0;
  }
  return out;
}

result<void> check_ringbuf_size(int64_t size) {
  // QEMU tests the value as an unsigned size, so negative sizes fail the same check.
  auto u = static_cast<uint64_t>(size);
  if (size < 0 || (u & (u - 1)) != 0) return fail("size of ringbuf chardev must be power of two");
  return {};
}

std::string qemu_utf8_text(std::string_view s) {
  // QEMU's JSON writer cleans the text; the ring's bytes end at the first NUL (a C string there).
  std::string out;
  size_t i = 0;
  while (i < s.size() && s[i] != '\0') {
    uint32_t cp = qmp::next_qemu_codepoint(s, i);
    if (cp == 0)
      out.push_back('\0');  // C0 80: the encoded NUL QEMU uses inside strings
    else
      qmp::append_utf8(out, cp);
  }
  return out;
}

std::string qemu_utf8_bytes(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  for (char c : text) {
    if (c == '\0')
      out += "\xC0\x80";
    else
      out.push_back(c);
  }
  return out;
}

}  // namespace blockd::chr

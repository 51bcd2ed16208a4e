// The ringbuf/memory chardev's buffer and the text rules of ringbuf-read/-write (QEMU's UTF-8 and base64 handling); plain C++, the chardev's thread.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>

#include "protocol/error.h"

namespace blockd::chr {

// Keeps the last `size` bytes written, as QEMU's ring: a write larger than the free room drops
// the oldest bytes. Memory grows with the contents, not with `size`, so a 4 GiB ring costs
// nothing until it is filled. Size 0 keeps nothing.
class ring_buffer {
 public:
  explicit ring_buffer(uint64_t size) : size_(size) {}
  void write(std::string_view bytes);
  // Removes and returns up to `max` of the oldest bytes.
  std::string read(uint64_t max);
  uint64_t count() const { return data_.size() - start_; }
  uint64_t size() const { return size_; }

 private:
  uint64_t size_;
  std::string data_;
  size_t start_ = 0;  // bytes before this offset were read or dropped
};

// QEMU's size check for ringbuf chardevs (a power of two; 0 passes the check, as in QEMU).
result<void> check_ringbuf_size(int64_t size);

// What ringbuf-read returns for format=utf8: QEMU hands the bytes to its JSON writer as a C
// string, so the text ends at the first NUL byte, every invalid sequence (stray continuation,
// truncated or overlong sequence, surrogate, noncharacter, beyond U+10FFFF) becomes one U+FFFD,
// and the two-byte C0 80 is a NUL character. The result is valid UTF-8 (NUL included).
std::string qemu_utf8_text(std::string_view bytes);

// The bytes ringbuf-write puts in the ring for format=utf8: QEMU keeps U+0000 inside its strings
// as C0 80, so that is what gets written.
std::string qemu_utf8_bytes(std::string_view text);


}  // namespace blockd::chr

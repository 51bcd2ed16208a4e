// Base64 as QMP arguments carry it (QEMU's qbase64_decode: its character check, then GLib's decoding); plain C++, any thread.
#pragma once
#include <string>
#include <string_view>

#include "protocol/error.h"

namespace blockd::qmp {

// Only the alphabet and '=' are allowed anywhere ("Base64 data contains invalid characters");
// decoding then follows GLib, which turns each full group of four into bytes (an '=' as third or
// fourth character drops the last bytes) and ignores a trailing partial group. ringbuf-write and
// secret objects (data, iv) both decode this way in QEMU.
result<std::string> glib_base64_decode(std::string_view text);

}  // namespace blockd::qmp

// The descriptors blockd inherited from whoever started it, the only ones a command may name by number; main thread at start-up, then the supervisor's.
#pragma once
#include <string>

#include "protocol/error.h"

namespace blockd {

// Records every descriptor above stderr that is open before blockd opens anything of its own.
void capture_inherited_fds();
// Hands out inherited descriptor `str` (a decimal number) once: a number out of range, one that
// was not inherited (one of blockd's own sockets, say) or one already taken is refused.
result<int> take_inherited_fd(const std::string& str);

}  // namespace blockd

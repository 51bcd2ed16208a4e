// Anchor translation unit for protocol/error.h so the core library is never empty; plain C++, any thread.
#include "protocol/error.h"

// Process-level start-up duties: daemonize handshake, pid file, signal wait; main thread only.
#pragma once
#include <string>

#include "protocol/error.h"

namespace blockd::process {

// Forks when asked. The parent stays in this call until the child reports its start-up status,
// then exits with 0 (started) or 1 (failed). Must run before any thread exists.
void daemonize_begin();
// Child side: start-up succeeded; detach stdio (stderr stays for diagnostics) and chdir("/").
void daemonize_ready();
bool daemonized();

// Creates and locks the pid file, writing our pid; the lock is held until exit.
result<void> write_pidfile(const std::string& path);
void remove_pidfile();

// Blocks SIGTERM, SIGINT and SIGHUP in every thread created afterwards and ignores SIGPIPE.
void block_signals();
// Waits until a termination signal arrives or `quit_fd` (an eventfd) becomes readable.
// Returns the signal number, or 0 for quit.
int wait_for_stop(int quit_fd);

}  // namespace blockd::process

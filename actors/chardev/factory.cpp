// chardev::open: picks the backend for a spec and opens its logfile first, as QEMU does; the chardev's iothread.
#include <fcntl.h>

#include <cerrno>
#include <cstring>

#include "actors/chardev/backends.h"
#include "actors/chardev/fd_stream.h"

namespace blockd::chr {

result<std::shared_ptr<chardev>> chardev::open(const chardev_spec& spec, const env& e) {
  // The logfile comes first: a backend is not made when its log cannot be.
  int log_fd = -1;
  if (!spec.logfile.empty()) {
    int flags = O_WRONLY | O_CREAT | O_CLOEXEC | (spec.logappend ? O_APPEND : O_TRUNC);
    log_fd = ::open(spec.logfile.c_str(), flags, 0666);
    if (log_fd < 0) return fail("Could not create '" + spec.logfile + "': " + std::strerror(errno));
  }
  const std::string& b = spec.backend;
  opened r = fail("'" + b + "' is not a valid char driver name");
  if (b == "null") r = open_null(spec, e);
  else if (b == "file") r = open_file(spec, e);
  else if (b == "pipe") r = open_pipe(spec, e);
  else if (b == "serial") r = open_serial(spec, e);
  else if (b == "parallel") r = open_parallel(spec, e);
  else if (b == "stdio") r = open_stdio(spec, e);
  else if (b == "ringbuf" || b == "memory") r = open_ringbuf(spec, e);
  else if (b == "pty") r = open_pty(spec, e);
  else if (b == "socket") r = open_socket(spec, e);
  else if (b == "udp") r = open_udp(spec, e);
  else if (b == "mux") r = open_mux(spec, e);
  else if (b == "hub") r = open_hub(spec, e);
  if (!r) {
    if (log_fd >= 0) ::close(log_fd);
    return r;
  }
  if (log_fd >= 0) (*r)->log_ = fd_stream::create(*e.reactor, -1, log_fd, fd_stream::mode::file);
  return r;
}

}  // namespace blockd::chr

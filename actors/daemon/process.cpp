// Daemonize, pid file and signal handling for blockd's main thread; main thread only.
#include "actors/daemon/process.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace blockd::process {
namespace {
int ready_pipe = -1;
bool is_daemon = false;
std::string pid_path;
int pid_fd = -1;
}  // namespace

void daemonize_begin() {
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) < 0) {
    std::fprintf(stderr, "blockd: cannot daemonize: %s\n", std::strerror(errno));
    std::exit(1);
  }
  pid_t pid = ::fork();
  if (pid < 0) {
    std::fprintf(stderr, "blockd: cannot daemonize: %s\n", std::strerror(errno));
    std::exit(1);
  }
  if (pid > 0) {
    ::close(fds[1]);
    char status = 1;
    ssize_t n;
    do n = ::read(fds[0], &status, 1);
    while (n < 0 && errno == EINTR);
    // No byte means the child died during start-up (it printed why on the shared stderr).
    std::_Exit(n == 1 && status == 0 ? 0 : 1);
  }
  ::close(fds[0]);
  ready_pipe = fds[1];
  is_daemon = true;
  ::setsid();
  // A second fork makes sure the daemon can never reacquire a controlling terminal.
  pid = ::fork();
  if (pid < 0) std::_Exit(1);
  if (pid > 0) std::_Exit(0);
  ::umask(027);
}

void daemonize_ready() {
  if (!is_daemon) return;
  if (::chdir("/") != 0) { /* keep going: the cwd only matters for relative paths */ }
  int null = ::open("/dev/null", O_RDWR | O_CLOEXEC);
  if (null >= 0) {
    ::dup2(null, STDIN_FILENO);
    ::dup2(null, STDOUT_FILENO);
    ::dup2(null, STDERR_FILENO);
    if (null > STDERR_FILENO) ::close(null);
  }
  char ok = 0;
  ssize_t n;
  do n = ::write(ready_pipe, &ok, 1);
  while (n < 0 && errno == EINTR);
  ::close(ready_pipe);
  ready_pipe = -1;
}

bool daemonized() { return is_daemon; }

result<void> write_pidfile(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (fd < 0) return fail("Could not create '" + path + "': " + std::strerror(errno));
  struct flock lk{};
  lk.l_type = F_WRLCK;
  lk.l_whence = SEEK_SET;
  if (::fcntl(fd, F_SETLK, &lk) < 0) {
    int e = errno;
    ::close(fd);
    return fail(std::string("Cannot lock pid file: ") + std::strerror(e));
  }
  char buf[32];
  int len = std::snprintf(buf, sizeof buf, "%d\n", static_cast<int>(::getpid()));
  if (::ftruncate(fd, 0) < 0 || ::write(fd, buf, static_cast<size_t>(len)) != len) {
    int e = errno;
    ::close(fd);
    return fail("Failed to write pid file: " + std::string(std::strerror(e)));
  }
  pid_fd = fd;
  pid_path = path;
  return {};
}

void remove_pidfile() {
  if (pid_fd < 0) return;
  ::unlink(pid_path.c_str());
  ::close(pid_fd);
  pid_fd = -1;
}

void block_signals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGHUP);
  ::pthread_sigmask(SIG_BLOCK, &set, nullptr);
  ::signal(SIGPIPE, SIG_IGN);
}

int wait_for_stop(int quit_fd) {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGHUP);
  int sfd = ::signalfd(-1, &set, SFD_CLOEXEC);
  pollfd fds[2] = {{sfd, POLLIN, 0}, {quit_fd, POLLIN, 0}};
  for (;;) {
    int n = ::poll(fds, 2, -1);
    if (n < 0 && errno == EINTR) continue;
    if (fds[0].revents & POLLIN) {
      signalfd_siginfo si{};
      ssize_t r = ::read(sfd, &si, sizeof si);
      ::close(sfd);
      return r == sizeof si ? static_cast<int>(si.ssi_signo) : SIGTERM;
    }
    if (fds[1].revents & POLLIN) {
      ::close(sfd);
      return 0;
    }
  }
}

}  // namespace blockd::process

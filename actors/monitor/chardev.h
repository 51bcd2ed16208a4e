// A live character device (listening/connected socket, stdio, null) owned by the supervisor; main iothread only.
#pragma once
#include <memory>
#include <string>

#include "config/chardev_spec.h"
#include "protocol/error.h"

namespace blockd {

// The chardev owns the OS handles; its frontend (a monitor) drives the I/O on them through its
// iothread's reactor. One client at a time, as in QEMU: further connects wait in the listen backlog.
class chardev {
 public:
  enum class kind { socket_server, socket_client, stdio, null };

  // Creates the device. A server socket with wait=on blocks here until the first client connects
  // (QSD's behaviour), printing `waiting_note` first so the user knows why start-up paused.
  static result<std::unique_ptr<chardev>> open(const chardev_spec& spec, const std::string& waiting_note_prefix);
  ~chardev();

  const std::string& id() const { return spec_.id; }
  const chardev_spec& spec() const { return spec_; }
  kind type() const { return kind_; }

  int listen_fd() const { return listen_fd_; }
  // The current connection: input and output descriptors (equal for sockets), -1 when none.
  int in_fd() const { return in_fd_; }
  int out_fd() const { return out_fd_; }
  bool connected() const { return in_fd_ >= 0; }

  void adopt_connection(int fd);  // an accepted/reconnected socket
  void drop_connection();         // closes the socket (stdio stays open but is marked gone)
  result<void> reconnect_now();   // client sockets: one blocking connect attempt

  bool has_frontend() const { return has_frontend_; }
  void set_frontend(bool v) { has_frontend_ = v; }

  std::string filename() const;  // as QEMU's query-chardev reports it

 private:
  explicit chardev(chardev_spec spec) : spec_(std::move(spec)) {}
  result<void> setup();

  chardev_spec spec_;
  kind kind_ = kind::null;
  int listen_fd_ = -1;
  int in_fd_ = -1;
  int out_fd_ = -1;
  bool has_frontend_ = false;
  std::string unlink_on_close_;
};

}  // namespace blockd

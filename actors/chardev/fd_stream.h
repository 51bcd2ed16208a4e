// Byte streams over one or two descriptors through the reactor (reads, ordered writes, orderly release) for chardev backends; the chardev's iothread.
#pragma once
#include <array>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include "actors/chardev/chardev.h"

namespace blockd::chr {

// One connection or device: reads from `in_fd`, writes to `out_fd` (either may be -1), one
// operation of each kind in flight, writes kept in order. The stream owns its descriptors (unless
// told otherwise) and closes them in its destructor, which runs only once no operation is in
// flight: every operation holds the stream.
class fd_stream : public std::enable_shared_from_this<fd_stream> {
 public:
  // recv/send; read/write at the current position; or a connected datagram socket, where each
  // write is one datagram and errors (a refused datagram) are not the end of anything.
  enum class mode { socket, file, datagram };

  struct handler {
    virtual ~handler() = default;
    virtual bool stream_wants_input() = 0;
    virtual void stream_data(std::string_view bytes) = 0;
    // End of input (0) or a read error (-errno): reading stops; writing goes on.
    virtual void stream_end(int err) = 0;
    // A write failed (-errno): the queued output is dropped and later writes are ignored.
    virtual void stream_write_failed(int err) { stream_end(err); }
    virtual void stream_drained() {}
  };

  static std::shared_ptr<fd_stream> create(io::reactor& r, int in_fd, int out_fd, mode m, bool owns_fds = true);
  ~fd_stream();

  void set_handler(handler* h) { h_ = h; }
  // Posts a read unless one is in flight, the stream stopped, or the handler has no room.
  void read_more();
  void write(std::string_view bytes);
  size_t backlog() const;
  // Calls `done` when the write queue is empty (at once if it is), or when the stream fails.
  void when_drained(std::function<void()> done);
  // Stops for good: no more callbacks, reads cancelled. Queued output still goes out when
  // `finish_output` (an orderly close), else it is cancelled too.
  void shutdown(bool finish_output = false);

  int in_fd() const { return in_fd_; }
  int out_fd() const { return out_fd_; }

 private:
  fd_stream(io::reactor& r, int in_fd, int out_fd, mode m, bool owns);
  void on_read(int res);
  void on_write(int res);
  void start_write();
  void fail_read(int err);
  void fail_write(int err);
  void drained();

  io::reactor& r_;
  int in_fd_, out_fd_;
  mode mode_;
  bool owns_;
  handler* h_ = nullptr;
  bool stopped_ = false;
  bool in_ended_ = false, out_ended_ = false;
  op read_op_, write_op_;
  std::array<char, 16384> in_buf_{};
  std::string out_, sending_;
  std::deque<std::string> datagrams_;
  std::vector<std::function<void()>> drain_waiters_;
};

}  // namespace blockd::chr

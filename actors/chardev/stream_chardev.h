// A chardev whose backend is one fd_stream (descriptors, pty, udp): the plumbing between the stream and the chardev's frontend; the chardev's iothread.
#pragma once
#include <functional>
#include <memory>
#include <string_view>

#include "actors/chardev/backends.h"
#include "actors/chardev/fd_stream.h"

namespace blockd::chr {

// Output goes to the stream in order, input is read while the frontend wants it, and closing shuts
// the stream (finishing queued output when `finish_output_on_close_`). Backends say only how the
// stream starts, ends and fails.
class stream_chardev : public chardev, public fd_stream::handler {
 public:
  using chardev::chardev;
  size_t backlog() const override { return stream_ ? stream_->backlog() : 0; }
  void flush(std::function<void()> done) override {
    if (stream_)
      stream_->when_drained(std::move(done));
    else
      done();
  }

 protected:
  void backend_write(std::string_view bytes) override {
    if (stream_) stream_->write(bytes);
  }
  void resume_reading() override {
    if (stream_) stream_->read_more();
  }
  void on_close() override {
    if (stream_) stream_->shutdown(finish_output_on_close_);
    stream_.reset();
  }
  bool stream_wants_input() override { return wants_input(); }
  void stream_data(std::string_view bytes) override { deliver_input(bytes); }

  std::shared_ptr<fd_stream> stream_;
  bool finish_output_on_close_ = true;
};

}  // namespace blockd::chr

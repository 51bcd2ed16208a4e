// Reactor-driven reads and ordered writes on chardev descriptors; the chardev's iothread.
#include "actors/chardev/fd_stream.h"

#include <unistd.h>

#include <cerrno>

namespace blockd::chr {

std::shared_ptr<fd_stream> fd_stream::create(io::reactor& r, int in_fd, int out_fd, mode m, bool owns) {
  return std::shared_ptr<fd_stream>(new fd_stream(r, in_fd, out_fd, m, owns));
}

fd_stream::fd_stream(io::reactor& r, int in_fd, int out_fd, mode m, bool owns)
    : r_(r), in_fd_(in_fd), out_fd_(out_fd), mode_(m), owns_(owns) {
  read_op_.on_done = [this](int res) { on_read(res); };
  write_op_.on_done = [this](int res) { on_write(res); };
}

fd_stream::~fd_stream() {
  if (!owns_) return;
  if (in_fd_ >= 0) ::close(in_fd_);
  if (out_fd_ >= 0 && out_fd_ != in_fd_) ::close(out_fd_);
}

void fd_stream::read_more() {
  if (stopped_ || in_ended_ || read_op_.busy || in_fd_ < 0 || !h_ || !h_->stream_wants_input()) return;
  read_op_.arm(shared_from_this());
  if (mode_ != mode::file)
    r_.recv(in_fd_, in_buf_.data(), in_buf_.size(), &read_op_);
  else
    r_.read(in_fd_, in_buf_.data(), in_buf_.size(), -1, &read_op_);
}

size_t fd_stream::backlog() const {
  size_t n = out_.size() + sending_.size();
  for (auto& d : datagrams_) n += d.size();
  return n;
}

void fd_stream::on_read(int res) {
  if (stopped_ || in_ended_) return;
  if (mode_ == mode::datagram && res <= 0 && res != -ECANCELED && res != -EBADF) {
    read_more();  // an empty datagram or an ICMP error for an earlier send
    return;
  }
  if (res > 0) {
    if (h_) h_->stream_data(std::string_view(in_buf_.data(), static_cast<size_t>(res)));
    read_more();
    return;
  }
  if (res == -EINTR || res == -EAGAIN) {
    read_more();
    return;
  }
  fail_read(res);
}

void fd_stream::write(std::string_view bytes) {
  if (stopped_ || out_ended_ || out_fd_ < 0 || bytes.empty()) return;
  if (mode_ == mode::datagram)
    datagrams_.emplace_back(bytes);
  else
    out_.append(bytes);
  start_write();
}

void fd_stream::start_write() {
  if (write_op_.busy || out_ended_ || out_fd_ < 0) return;
  // The kernel reads from sending_ until the operation completes, so new output goes to out_
  // and the two swap only when nothing is in flight.
  if (sending_.empty()) {
    if (mode_ == mode::datagram) {
      if (!datagrams_.empty()) {
        sending_ = std::move(datagrams_.front());
        datagrams_.pop_front();
      }
    } else {
      sending_.swap(out_);
    }
  }
  if (sending_.empty()) {
    drained();
    return;
  }
  write_op_.arm(shared_from_this());
  if (mode_ != mode::file)
    r_.send(out_fd_, sending_.data(), sending_.size(), &write_op_);
  else
    r_.write(out_fd_, sending_.data(), sending_.size(), -1, &write_op_);
}

void fd_stream::on_write(int res) {
  if (out_ended_) return;
  if (res < 0) {
    if (res == -EINTR || res == -EAGAIN) {
      start_write();
      return;
    }
    if (mode_ == mode::datagram && res != -ECANCELED) {
      sending_.clear();  // this datagram is lost, as UDP loses them; the next one may arrive
      start_write();
      return;
    }
    fail_write(res);
    return;
  }
  if (mode_ == mode::datagram)
    sending_.clear();
  else
    sending_.erase(0, static_cast<size_t>(res));
  start_write();
}

void fd_stream::when_drained(std::function<void()> done) {
  if (out_ended_ || backlog() == 0) {
    done();
    return;
  }
  drain_waiters_.push_back(std::move(done));
}

void fd_stream::drained() {
  auto waiters = std::move(drain_waiters_);
  drain_waiters_.clear();
  for (auto& w : waiters) w();
  if (!stopped_ && h_) h_->stream_drained();
}

void fd_stream::fail_read(int err) {
  in_ended_ = true;
  if (!stopped_ && h_) h_->stream_end(err);
}

void fd_stream::fail_write(int err) {
  out_ended_ = true;
  out_.clear();
  datagrams_.clear();
  sending_.clear();
  auto waiters = std::move(drain_waiters_);
  drain_waiters_.clear();
  for (auto& w : waiters) w();
  if (!stopped_ && h_) h_->stream_write_failed(err);
}

void fd_stream::shutdown(bool finish_output) {
  if (stopped_) return;
  stopped_ = true;
  h_ = nullptr;
  in_ended_ = true;
  if (read_op_.busy) r_.cancel(&read_op_);
  if (!finish_output) {
    out_ended_ = true;
    out_.clear();
    datagrams_.clear();
    if (write_op_.busy) r_.cancel(&write_op_);
  }
  if (out_ended_ || backlog() == 0) {
    auto waiters = std::move(drain_waiters_);
    drain_waiters_.clear();
    for (auto& w : waiters) w();
  }
}

}  // namespace blockd::chr

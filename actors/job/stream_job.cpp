// block-stream's copy loop (top node's home iothread) and its runner (job actor's thread): chunk by chunk, block status picks what lies above the base, a read through the copy-on-read filter copies it up.
#include "actors/job/stream_job.h"

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "storage/block/rate_limit.h"
#include "storage/io/reactor.h"

namespace blockd {

// QEMU's stream works in 512 KiB pieces; progress moves by the same steps.
constexpr int64_t stream_chunk = 512 * 1024;

// Home iothread only. Owned by the runner and by every closure posted to the home.
class stream_loop final : public block::io_waiter, public std::enable_shared_from_this<stream_loop> {
 public:
  stream_loop(const stream_plan& p, job_port port, std::weak_ptr<stream_runner> runner)
      : top_(p.top), filter_(p.filter), last_depth_(p.last_depth), port_(std::move(port)), runner_(std::move(runner)) {
    buf_ = static_cast<char*>(std::aligned_alloc(4096, stream_chunk));
    timer_.owner = this;
  }
  ~stream_loop() { std::free(buf_); }

  void start() {
    len_ = top_->length();
    if (len_ < 0) return finish(int(len_));
    port_.post([len = len_](job::core& j) { j.progress_set_remaining(len); });
    step();
  }
  void pause(std::function<void()> parked) {
    parked_cb_ = std::move(parked);
    // Waiting for the speed limit is a pause point (QEMU's job sleep): the job parks at once.
    if (timer_.armed) top_->env().reactor->cancel(&timer_);
    step();
  }
  void resume() {
    paused_ = false;
    step();
  }
  void cancel() {
    cancel_ = true;
    if (timer_.armed) top_->env().reactor->cancel(&timer_);
    step();
  }
  void set_speed(int64_t s) {
    limit_.set_speed(s);
    // A faster (or no) limit applies now, not at the end of a long wait.
    if (timer_.armed) top_->env().reactor->cancel(&timer_);
  }
  // The job's answer to a failed request: go on past it (ignore), retry it later (stop: the job
  // pauses first), or end with it (report).
  void error_decided(job_error_action a, int err) {
    error_wait_ = false;
    if (a == job_error_action::report) return finish(err);
    if (a == job_error_action::ignore) advance(chunk_len_, false);
    step();
  }

 private:
  struct wait_timer final : io::completion {
    stream_loop* owner = nullptr;
    bool armed = false;
    void complete(int) override {
      auto self = std::move(owner->keep_);  // the loop stays alive through this step
      armed = false;
      owner->step();
    }
  };

  void step() {
    if (done_ || busy_ || timer_.armed) return;
    if (cancel_) return finish(0);
    if (parked_cb_) {
      paused_ = true;
      auto cb = std::move(parked_cb_);
      parked_cb_ = nullptr;
      cb();
      return;
    }
    if (paused_ || error_wait_) return;
    if (pos_ >= len_) return finish(0);
    if (int64_t d = limit_.delay(block::node::now_ns()); d > 0) {
      timer_.armed = true;
      // Keep the loop alive while the timer is queued.
      keep_ = shared_from_this();
      top_->env().reactor->timeout(uint64_t(d), &timer_);
      return;
    }
    busy_ = true;
    probing_ = true;
    req_.reset();
    req_.op = block::io_op::block_status;
    req_.offset = pos_;
    req_.length = std::min(stream_chunk, len_ - pos_);
    req_.waiter = this;
    keep_ = shared_from_this();
    top_->submit(req_);
  }

  void io_done(block::io_request& r) override {
    auto self = std::move(keep_);
    busy_ = false;
    if (probing_) {
      probing_ = false;
      if (r.result < 0) return failed(true, r.result, r.length);
      int64_t n = std::clamp<int64_t>(r.status_length, 1, r.length);
      // Depth 1 is the top's own data, 0 nothing anywhere: neither is copied; the rest is, down to
      // the base (whose depth is last + 1).
      bool copy = r.depth >= 2 && (last_depth_ == 0 || r.depth <= last_depth_);
      if (!copy) {
        advance(n, false);
        return step();
      }
      busy_ = true;
      req_.reset();
      req_.op = block::io_op::read;
      req_.offset = pos_;
      req_.set_buffer(buf_, n);
      req_.waiter = this;
      keep_ = self;
      filter_->submit(req_);
      return;
    }
    if (r.result < 0) return failed(true, r.result, r.length);
    advance(r.length, true);
    step();
  }

  void advance(int64_t n, bool copied) {
    pos_ += n;
    if (copied) limit_.account(n, block::node::now_ns());
    port_.progress(n);
  }

  void failed(bool is_read, int err, int64_t n) {
    error_wait_ = true;
    chunk_len_ = n;
    auto weak = runner_;
    port_.post([weak, is_read, err](job::core& j) {
      if (auto r = weak.lock()) r->loop_error(j, is_read, err);
    });
  }

  void finish(int rc) {
    if (done_) return;
    done_ = true;
    keep_.reset();
    port_.done(rc, {});
  }

  block::node* top_;
  block::node* filter_;
  int last_depth_;
  job_port port_;
  std::weak_ptr<stream_runner> runner_;
  char* buf_ = nullptr;
  block::io_request req_;
  wait_timer timer_;
  block::rate_limit limit_;
  std::shared_ptr<stream_loop> keep_;  // set while a request or the timer is out
  int64_t len_ = 0, pos_ = 0, chunk_len_ = 0;
  bool busy_ = false, probing_ = false, paused_ = false, cancel_ = false, done_ = false, error_wait_ = false;
  std::function<void()> parked_cb_;
};

// ---- stream_runner: the job actor's thread --------------------------------------------------

stream_runner::~stream_runner() = default;

void stream_runner::to_loop(std::function<void(stream_loop&)> fn) {
  if (!loop_ || !plan_.home) return;
  plan_.home->post([l = loop_, fn = std::move(fn)] { fn(*l); });
}

void stream_runner::body_start(job::core& j) {
  // Nothing lies above the base: the job is over before the command returns, as in QEMU, where
  // its body ends without ever yielding.
  if (plan_.last_depth < 0) return j.work_done(0);
  auto self = std::static_pointer_cast<stream_runner>(shared_from_this());
  loop_ = std::make_shared<stream_loop>(plan_, port(), self);
  int64_t s = speed();
  to_loop([s](stream_loop& l) {
    l.set_speed(s);
    l.start();
  });
}

void stream_runner::body_pause(std::function<void()> parked) {
  to_loop([parked = std::move(parked)](stream_loop& l) { l.pause(parked); });
}

void stream_runner::body_resume() {
  to_loop([](stream_loop& l) { l.resume(); });
}

void stream_runner::body_cancel() {
  to_loop([](stream_loop& l) { l.cancel(); });
}

void stream_runner::speed_changed(int64_t speed) {
  to_loop([speed](stream_loop& l) { l.set_speed(speed); });
}

void stream_runner::loop_error(job::core& j, bool is_read, int err) {
  auto a = error_action(j, plan_.on_error, is_read, err);
  to_loop([a, err](stream_loop& l) { l.error_decided(a, err); });
}

void stream_runner::prepare_async(job::core& j, std::function<void(result<void>)> done) {
  (void)j;
  if (!plan_.finish) return done({});
  plan_.finish(std::move(done));
}

void stream_runner::clean(job::core& j) {
  (void)j;
  if (cleaned_) return;
  cleaned_ = true;
  if (plan_.clean) plan_.clean();
}

void stream_runner::abandon() {
  body_cancel();
}

}  // namespace blockd

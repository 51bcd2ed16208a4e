// The mux backend: up to four frontends share one chardev, input goes to the focused one, Ctrl-A keys as QEMU's mux; the chardev's iothread.
#include <algorithm>
#include <chrono>

#include "actors/chardev/backends.h"
#include "protocol/chardev/mux_escape.h"

namespace blockd::chr {
namespace {

constexpr size_t max_mux = 4;  // QEMU's MAX_MUX

class mux_chardev final : public chardev, public frontend {
 public:
  mux_chardev(chardev_spec s, env e, std::shared_ptr<chardev> base)
      : chardev(std::move(s), std::move(e)), base_(std::move(base)) {
    // QSD opens muxes at once (QEMU's muxes_opened holds from the start): a frontend gets OPENED
    // when it attaches, and again whenever the base (re)opens.
    be_open_ = true;
  }
  ~mux_chardev() override {
    if (base_) base_->detach(this);
  }
  result<void> attach_base() { return base_->attach(this); }

  // ---- as a chardev, towards its frontends --------------------------------------------------
  result<void> attach(frontend* f) override {
    if (frontends_.size() >= max_mux)
      return fail("too many uses of multiplexed chardev '" + spec_.id + "' (maximum is " + std::to_string(max_mux) + ")");
    frontends_.push_back(f);
    // The newest frontend takes the focus, as QEMU's set_handlers does.
    set_focus(frontends_.size() - 1);
    if (be_open_) f->chr_event(event::opened);
    base_->input_ready();
    return {};
  }
  void detach(frontend* f) override {
    auto it = std::find(frontends_.begin(), frontends_.end(), f);
    if (it == frontends_.end()) return;
    size_t idx = static_cast<size_t>(it - frontends_.begin());
    frontends_.erase(it);
    if (focus_ >= frontends_.size() || idx < focus_) focus_ = frontends_.empty() ? 0 : std::min(focus_, frontends_.size() - 1);
  }
  // QEMU counts a mux as busy from its creation on: it can never be removed.
  bool busy() const override { return true; }
  std::string filename() const override { return "mux"; }
  size_t backlog() const override { return base_ ? base_->backlog() : 0; }
  void flush(std::function<void()> done) override {
    if (base_)
      base_->flush(std::move(done));
    else
      done();
  }
  void send_break() override { broadcast(event::brk); }

  // ---- as the base's frontend ---------------------------------------------------------------
  bool chr_fe_open() const override { return !frontends_.empty(); }
  void chr_event(event e) override {
    if (e == event::opened || e == event::closed || e == event::brk) broadcast(e);
  }
  size_t chr_can_read() override {
    // One byte at a time through the escape recogniser, as QEMU's mux reads; the focused
    // frontend's room decides (commands and the escape itself need none).
    return wants_input() ? 4096 : 0;
  }
  void chr_read(std::string_view bytes) override {
    std::string pass;
    for (char ch : bytes) {
      switch (escape_.feed(static_cast<uint8_t>(ch))) {
        case mux_escape::action::deliver: pass.push_back(ch); break;
        case mux_escape::action::swallow: break;
        case mux_escape::action::help: flush_pass(pass), mux_print(mux_help_text()); break;
        // QSD 7.2 prints the text and goes on: its shutdown request has no effect outside an emulator.
        case mux_escape::action::exit: flush_pass(pass), mux_print(std::string(mux_exit_text())); break;
        // QEMU commits block devices opened with -snapshot; QSD and blockd have no such devices.
        case mux_escape::action::save: break;
        case mux_escape::action::send_break:
          flush_pass(pass);
          if (!frontends_.empty()) frontends_[focus_]->chr_event(event::brk);
          break;
        case mux_escape::action::switch_focus:
          flush_pass(pass);
          if (!frontends_.empty()) set_focus((focus_ + 1) % frontends_.size());
          break;
        case mux_escape::action::toggle_timestamps: stamps_.toggle(); break;
      }
    }
    flush_pass(pass);
  }

 protected:
  void backend_write(std::string_view bytes) override {
    if (!base_) return;
    base_->write(stamps_.apply(bytes, now_ms()));
  }
  void resume_reading() override {
    if (base_) base_->input_ready();
  }
  void on_close() override {
    if (base_) base_->detach(this);
    base_.reset();
  }
  size_t route_room() override { return frontends_.empty() ? 0 : frontends_[focus_]->chr_can_read(); }
  void route_input(std::string_view bytes) override {
    if (!frontends_.empty()) frontends_[focus_]->chr_read(bytes);
  }

 private:
  static int64_t now_ms() {
    using namespace std::chrono;
    return duration_cast<milliseconds>(steady_clock::now().time_since_epoch()).count();
  }
  void mux_print(const std::string& text) { write(text); }
  void flush_pass(std::string& pass) {
    if (pass.empty()) return;
    deliver_input(pass);
    pass.clear();
  }
  void broadcast(event e) {
    if (e == event::opened) be_open_ = true;
    if (e == event::closed) be_open_ = false;
    auto fes = frontends_;
    for (auto* f : fes) f->chr_event(e);
  }
  void set_focus(size_t idx) {
    if (idx == focus_ && focused_once_) return;
    if (focused_once_ && focus_ < frontends_.size()) frontends_[focus_]->chr_event(event::mux_out);
    focus_ = idx;
    focused_once_ = true;
    frontends_[focus_]->chr_event(event::mux_in);
  }

  std::shared_ptr<chardev> base_;
  size_t focus_ = 0;
  bool focused_once_ = false;
  mux_escape escape_;
  mux_timestamps stamps_;
};

}  // namespace

opened open_mux(const chardev_spec& s, const env& e) {
  auto base = e.find ? e.find(s.chardev) : nullptr;
  if (!base) return fail("mux: base chardev " + s.chardev + " not found");
  auto m = std::make_shared<mux_chardev>(s, e, base);
  if (auto r = m->attach_base(); !r) return std::unexpected(r.error());
  return std::shared_ptr<chardev>(m);
}

}  // namespace blockd::chr

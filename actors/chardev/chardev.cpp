// The chardev base: frontends, held input, output logging, close; the chardev's iothread.
#include "actors/chardev/chardev.h"

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "actors/chardev/fd_stream.h"
#include "config/qom/object.h"

namespace blockd::chr {

chardev::chardev(chardev_spec spec, env e) : spec_(std::move(spec)), env_(std::move(e)) {}

chardev::~chardev() {
  if (log_) log_->shutdown(true);
}

result<void> chardev::attach(frontend* f) {
  if (!frontends_.empty()) return fail("Device '" + spec_.id + "' is in use");
  frontends_.push_back(f);
  // QEMU sends OPENED to a frontend that joins an open backend, so it greets at once.
  if (be_open_) f->chr_event(event::opened);
  resume_reading();
  return {};
}

void chardev::detach(frontend* f) {
  frontends_.erase(std::remove(frontends_.begin(), frontends_.end(), f), frontends_.end());
  if (frontends_.empty()) held_input_.clear();
}

bool chardev::frontend_open() const {
  return std::any_of(frontends_.begin(), frontends_.end(), [](frontend* f) { return f->chr_fe_open(); });
}

bool chardev::frontends_can_change() const {
  return std::all_of(frontends_.begin(), frontends_.end(), [](frontend* f) { return f->chr_can_change(); });
}

void chardev::write(std::string_view bytes) {
  if (closed_ || bytes.empty()) return;
  if (log_) log_->write(bytes);
  backend_write(bytes);
}

void chardev::deliver_event(event e) {
  if (e == event::opened) be_open_ = true;
  if (e == event::closed) {
    be_open_ = false;
    held_input_.clear();
  }
  // A frontend may detach itself while handling the event; iterate over a copy.
  auto fes = frontends_;
  for (auto* f : fes)
    if (std::find(frontends_.begin(), frontends_.end(), f) != frontends_.end()) f->chr_event(e);
}

size_t chardev::route_room() { return frontends_.empty() ? 0 : frontends_.front()->chr_can_read(); }

void chardev::route_input(std::string_view bytes) {
  if (!frontends_.empty()) frontends_.front()->chr_read(bytes);
}

void chardev::deliver_input(std::string_view bytes) {
  // Without a frontend input is dropped, as QEMU's backends do when nobody reads.
  if (frontends_.empty() || closed_) return;
  held_input_.append(bytes);
  while (!held_input_.empty() && !frontends_.empty()) {
    size_t room = route_room();
    if (room == 0) break;
    size_t n = std::min(room, held_input_.size());
    std::string chunk = held_input_.substr(0, n);
    held_input_.erase(0, n);
    route_input(chunk);
  }
}

bool chardev::wants_input() { return !closed_ && held_input_.empty() && !frontends_.empty() && route_room() > 0; }

void chardev::input_ready() {
  if (closed_) return;
  deliver_input({});
  if (held_input_.empty()) resume_reading();
}

std::unique_ptr<qom::object> chardev::qom_object() { return std::make_unique<qom::object>(); }

void chardev::close() {
  if (closed_) return;
  closed_ = true;
  frontends_.clear();
  held_input_.clear();
  on_close();
  if (log_) {
    log_->shutdown(true);
    log_.reset();
  }
}

}  // namespace blockd::chr

// The hub backend (QSD 10.2): one frontend over up to four chardevs; output goes to all, input comes from any; the chardev's iothread.
#include <algorithm>

#include "actors/chardev/backends.h"

namespace blockd::chr {
namespace {

constexpr size_t max_hub = 4;

class hub_chardev final : public chardev {
 public:
  hub_chardev(chardev_spec s, env e) : chardev(std::move(s), std::move(e)) {}
  ~hub_chardev() override { detach_all(); }

  result<void> add(std::shared_ptr<chardev> c) {
    auto p = std::make_unique<port>(this, c);
    if (auto r = c->attach(p.get()); !r) return r;
    ports_.push_back(std::move(p));
    if (c->be_open()) be_open_ = true;
    return {};
  }
  std::string filename() const override { return "hub"; }
  size_t backlog() const override {
    size_t n = 0;
    for (auto& p : ports_) n = std::max(n, p->dev->backlog());
    return n;
  }

 protected:
  void backend_write(std::string_view bytes) override {
    for (auto& p : ports_) p->dev->write(bytes);
  }
  void resume_reading() override {
    for (auto& p : ports_) p->dev->input_ready();
  }
  void on_close() override { detach_all(); }

 private:
  // The hub's place as the frontend of one of its chardevs.
  struct port final : frontend {
    port(hub_chardev* h, std::shared_ptr<chardev> d) : hub(h), dev(std::move(d)) {}
    void chr_event(event e) override { hub->port_event(e); }
    void chr_read(std::string_view bytes) override { hub->deliver_input(bytes); }
    size_t chr_can_read() override { return hub->wants_input() ? 4096 : 0; }
    bool chr_fe_open() const override { return hub->has_frontend(); }
    hub_chardev* hub;
    std::shared_ptr<chardev> dev;
  };

  void port_event(event e) {
    if (e == event::closed) {
      // Closed only when none of its chardevs is open any more.
      for (auto& p : ports_)
        if (p->dev->be_open()) return;
    } else if (e == event::opened && be_open_) {
      return;
    }
    deliver_event(e);
  }
  void detach_all() {
    for (auto& p : ports_) p->dev->detach(p.get());
    ports_.clear();
  }

  std::vector<std::unique_ptr<port>> ports_;
};

}  // namespace

opened open_hub(const chardev_spec& s, const env& e) {
  if (s.hub.size() > max_hub)
    return fail("hub '" + s.id + "' takes at most " + std::to_string(max_hub) + " chardevs; remove some from 'chardevs'");
  auto h = std::make_shared<hub_chardev>(s, e);
  for (auto& id : s.hub) {
    auto c = e.find ? e.find(id) : nullptr;
    if (!c) return fail("hub: chardev '" + id + "' not found");
    if (c->spec().backend == "mux" || c->spec().backend == "hub")
      return fail("hub: multiplexers and hub devices are not supported");
    if (auto r = h->add(c); !r) return std::unexpected(r.error());
  }
  return std::shared_ptr<chardev>(h);
}

}  // namespace blockd::chr

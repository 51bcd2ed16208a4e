// The chardev backend base (QEMU's Chardev) and the frontend interface its users implement; the iothread whose reactor the chardev uses (the main one).
#pragma once
#include <cstddef>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "config/chardev_spec.h"
#include "protocol/error.h"
#include "protocol/tls/tls.h"
#include "storage/io/reactor.h"

namespace blockd::qom {
class object;
}

namespace blockd::chr {

// What a backend tells its frontends (QEMU's QEMUChrEvent).
enum class event { opened, closed, brk, mux_in, mux_out };

// The user of a chardev: a QMP monitor, or a mux/hub that is itself a chardev. Called on the
// chardev's loop; none of these may destroy the chardev.
class frontend {
 public:
  virtual ~frontend() = default;
  virtual void chr_event(event e) = 0;
  virtual void chr_read(std::string_view bytes) = 0;
  // How many bytes the frontend takes now; 0 holds input back until it calls input_ready().
  virtual size_t chr_can_read() = 0;
  // chardev-change: whether the frontend can follow its chardev to a new backend (QEMU's
  // be_change handler). Monitors cannot.
  virtual bool chr_can_change() const { return false; }
  // query-chardev's frontend-open of the chardev below: a mux counts as open once it has a
  // frontend of its own, as QEMU's mux sets its handlers on the base only then.
  virtual bool chr_fe_open() const { return true; }
};

// A reactor operation owned by an object that must outlive it: `keep` holds the owner while the
// operation is in flight, so a chardev removed meanwhile is freed only after its last completion
// (and its descriptors close only then, so a recycled fd number never sees a stale completion).
struct op final : io::completion {
  std::function<void(int)> on_done;
  std::shared_ptr<void> keep;
  bool busy = false;
  void arm(std::shared_ptr<void> owner) {
    keep = std::move(owner);
    busy = true;
  }
  void complete(int res) override {
    busy = false;
    auto k = std::move(keep);
    on_done(res);
  }
};

class chardev;

// What opening a chardev needs from the daemon.
struct env {
  io::reactor* reactor = nullptr;  // the loop every operation of the chardev runs on
  // A descriptor named by number (SocketAddress type fd): only at start-up, as in QSD.
  std::function<result<int>(const std::string& str)> take_fd;
  // TLS credentials object `id`, checked for the endpoint (QEMU's texts).
  std::function<result<std::shared_ptr<const tls::credentials>>(const std::string& id, bool server)> tls_creds;
  // tls-authz, resolved each time a client presents its identity.
  std::function<result<bool>(const std::string& authz_id, const std::string& identity)> authorize;
  // Another chardev, for mux and hub.
  std::function<std::shared_ptr<chardev>(const std::string& id)> find;
  // QEMU's error_report: notes printed on stderr (reconnect failures).
  std::function<void(const std::string&)> report;
  std::string note_prefix;  // "blockd: --chardev ...: " for start-up notes
  bool daemonized = false;
};

class chardev : public std::enable_shared_from_this<chardev> {
 public:
  // Creates and opens the backend `spec` describes (all backends QSD has); QSD's error texts.
  // A chardev with I/O to do starts it at once on `e.reactor`.
  static result<std::shared_ptr<chardev>> open(const chardev_spec& spec, const env& e);
  virtual ~chardev();
  chardev(const chardev&) = delete;
  chardev& operator=(const chardev&) = delete;

  const std::string& id() const { return spec_.id; }
  const chardev_spec& spec() const { return spec_; }
  // The QOM class name ("chardev-socket", "chardev-memory", ...).
  std::string qom_type() const { return "chardev-" + spec_.backend; }

  // ---- frontends (QEMU's qemu_chr_fe_*) ----------------------------------------------------------
  // Attaches a user; a chardev takes one ("Device 'X' is in use"), a mux several. If the
  // backend is open the new frontend gets `opened` at once, as QEMU sends it on attach.
  virtual result<void> attach(frontend* f);
  virtual void detach(frontend* f);
  bool has_frontend() const { return !frontends_.empty(); }
  // chardev-remove refuses a busy chardev: one with a frontend (a mux, always, as in QEMU).
  virtual bool busy() const { return has_frontend(); }
  // query-chardev's frontend-open.
  bool frontend_open() const;
  // chardev-change with a frontend: only if every frontend can follow.
  bool frontends_can_change() const;

  // Output from the frontend: logged, then sent (or dropped while the backend is not connected,
  // as QEMU's sockets do). Never blocks.
  void write(std::string_view bytes);
  // Bytes accepted but not yet handed to the OS.
  virtual size_t backlog() const { return 0; }
  // Calls `done` once everything written so far went out (or the connection is gone).
  virtual void flush(std::function<void()> done) { done(); }
  // The frontend has room again: held input is delivered and reading resumes.
  void input_ready();
  // Drops the current client of a connection-based backend (a socket); others ignore it.
  virtual void hangup() {}

  // query-chardev's filename, as QEMU prints it for this backend and state.
  virtual std::string filename() const { return spec_.backend; }
  // chardev-send-break: a break for the frontend (QEMU sends CHR_EVENT_BREAK to it).
  virtual void send_break() { deliver_event(event::brk); }
  // Whether the backend side is open (QEMU's be_open): connected socket, opened pty slave.
  bool be_open() const { return be_open_; }
  // The QOM object that stands for this chardev under /chardevs (its type's properties).
  virtual std::unique_ptr<qom::object> qom_object();
  // Creation that finishes later (a server waiting for its first client, a client's first
  // connection): `cb` runs once the chardev is ready, or with the error that ends it.
  virtual void wait_ready(std::function<void(result<void>)> cb) { cb({}); }
  // ChardevReturn of chardev-add/-change ({} or {"pty": path}).
  virtual std::string pty_path() const { return {}; }
  // Ends all I/O and detaches the frontends; operations in flight finish on their own and keep
  // the object alive until then. Idempotent.
  void close();
  bool closed() const { return closed_; }

 protected:
  explicit chardev(chardev_spec spec, env e);

  // Backend output; `bytes` were already logged.
  virtual void backend_write(std::string_view bytes) = 0;
  // Reading was held back for lack of room and may resume.
  virtual void resume_reading() {}
  virtual void on_close() {}

  // For backends: events and input towards the frontend(s). OPENED and CLOSED also keep be_open().
  void deliver_event(event e);
  // Input beyond what the frontend takes now is held here and delivered by input_ready().
  void deliver_input(std::string_view bytes);
  // Room for more input: the backend reads only while this is true.
  bool wants_input();
  // Which frontend input goes to (a mux overrides the routing).
  virtual void route_input(std::string_view bytes);
  virtual size_t route_room();

  chardev_spec spec_;
  env env_;
  std::vector<frontend*> frontends_;
  bool be_open_ = false;
  bool closed_ = false;

 private:
  std::string held_input_;
  std::shared_ptr<class fd_stream> log_;
};

}  // namespace blockd::chr

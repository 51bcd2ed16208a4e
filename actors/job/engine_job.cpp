// The copy engine's host on the home iothread (its callbacks become job reports through the port) and the engine job runner on the job actor's thread.
#include "actors/job/engine_job.h"

#include <cerrno>

#include "storage/block/mirror_hook.h"
#include "storage/block/node.h"

namespace blockd {

// Home iothread only, except where marked. Owned by the runner and by closures posted home.
class engine_host final : public std::enable_shared_from_this<engine_host> {
 public:
  engine_host(engine_job_plan plan, job_port port, std::weak_ptr<block_job_runner> runner)
      : plan_(std::move(plan)), port_(std::move(port)), runner_(std::move(runner)) {}

  void start(int64_t speed) {
    if (done_) return;
    block::copy_settings s = plan_.settings ? plan_.settings() : block::copy_settings{};
    s.speed = uint64_t(speed);
    block::copy_callbacks cb;
    cb.on_progress = [this](int64_t done, int64_t skipped) {
      port_.progress(done + (plan_.skipped_is_progress ? skipped : 0));
      if (skipped > 0 && plan_.skip_lowers_total && engine_)
        port_.post([rem = engine_->remaining()](job::core& j) { j.progress_set_remaining(rem); });
    };
    cb.on_idle = [this] { idle(); };
    cb.on_error = [this](const block::copy_error& e) { return error(e); };
    cb.on_paused = [this] {
      if (cancel_wait_) {
        cancel_wait_ = false;
        return finish(0);
      }
      engine_paused_ = true;
      // A flush of the target in flight is waited for: the job parks with nothing of its own in flight.
      if (parked_ && flushing_ == 0) std::exchange(parked_, nullptr)();
    };
    cb.on_finished = [this](int err) { finish(err); };
    cb.on_sleep = [this](bool s) { sleeping(s); };
    cb.on_cancelled = [this] {
      if (released_) return drop_engine();
      finish(0);
    };
    if (plan_.borrow) {
      engine_ = plan_.borrow();
      if (!engine_) {
        fail_text_ = "The backup's copy-before-write filter is gone";
        done_ = true;
        return port_.done(-ENODEV, fail_text_);
      }
      s = engine_->settings();
      engine_->set_callbacks(std::move(cb));
      engine_->set_speed(uint64_t(speed));
    }
    source_ = s.source;
    block::node* target = s.target;
    flush_node_ = s.target ? s.target : s.source;  // copy_up (stream) writes into the source itself
    if (!plan_.borrow) {
      owned_ = std::make_unique<block::copy_engine>(std::move(s), std::move(cb));
      engine_ = owned_.get();
    }
    if (plan_.ready_when_idle && target) {
      block::mirror_hook::callbacks hc;
      hc.synced = [this](int64_t n) { add_active_progress(n); };
      hc.target_failed = [this](int err) { active_write_failed(err); };
      hc.dirtied = [this] { grown(); };
      hc.drained = [this] {
        if (hook_drained_) std::exchange(hook_drained_, nullptr)();
      };
      hook_ = std::make_unique<block::mirror_hook>(*source_, *target, *engine_, std::move(hc));
      if (plan_.mirror && plan_.mirror->write_blocking) hook_->set_write_blocking();
      source_->add_write_hook(hook_.get());
    }
    auto self = shared_from_this();
    auto go = [self](int rc) {
      self->filling_ = false;
      if (rc < 0) {
        self->fail_text_ = self->plan_.failure_text;
        return self->finish(rc);
      }
      if (self->done_) return;
      self->port_.post([rem = self->engine_->remaining()](job::core& j) { j.progress_set_remaining(rem); });
      self->started_ = true;
      if (self->cancel_) return self->cancel();
      if (self->held_) return;  // paused before it started: resume() starts it
      if (!self->plan_.background) return;  // sync=none: only the filter's copies, until cancelled
      self->engine_->start();
    };
    if (plan_.fill) {
      filling_ = true;
      return plan_.fill(*engine_, go);
    }
    // A borrowed engine's map is the filter's (what it has not copied yet since it was opened).
    if (!plan_.borrow) engine_->work_map().set(0, engine_->work_map().size());
    go(0);
  }

  void pause(std::function<void()> parked) {
    if (done_ || !started_ || engine_paused_ || !plan_.background) {
      held_ = !started_;
      return parked();
    }
    parked_ = std::move(parked);
    engine_->pause();
  }

  void resume() {
    if (done_ || !plan_.background) return;
    if (!started_ || (held_ && !engine_paused_)) {
      bool was_held = held_;
      held_ = false;
      if (started_ && was_held) engine_->start();
      return;
    }
    engine_paused_ = false;
    sleeping_ = false;  // the job's pause reset its flag
    engine_->resume();
    // A resumed engine reports idle again: READY is offered again then, in case the job was paused
    // when it converged (the job takes it only while running, so a READY job is not told twice).
    ready_sent_ = false;
  }

  void cancel() {
    cancel_ = true;
    if (done_) return;
    // The fill (an allocation scan) has a request out on the source: the engine may not go before it is
    // back, so its end (go) takes the cancel.
    if (filling_) return;
    if (!engine_ || !started_) return finish(0);
    if (plan_.borrow) {
      // The filter's engine stays usable: its background copy stops, copy_now goes on.
      if (engine_->running()) {
        cancel_wait_ = true;
        return engine_->pause();
      }
      if (engine_->pausing()) {
        cancel_wait_ = true;
        return;
      }
      // A report drains: its on_finished ends the job (with the error) and re-arms the engine for the
      // filter; finishing now would leave the engine finished, refusing the filter's copies.
      if (engine_->stopping()) return;
      return finish(0);
    }
    engine_->cancel();
  }

  void set_speed(int64_t s) {
    if (engine_) engine_->set_speed(uint64_t(s));
  }

  // block-job-change copy-mode=write-blocking (the runner set plan_.mirror's mode already).
  void set_write_blocking() {
    if (!hook_ || done_) return;
    hook_->set_write_blocking();
    // Converged already (READY, nothing dirty): every write from now on goes to both sides. A
    // background write still in flight dirties its range and the next convergence says so.
    if (ready_sent_ && engine_ && engine_->idle() && hook_->settled()) plan_.mirror->actively_synced = true;
  }

  // job-complete: the work ends once converged (the engine keeps following writes until clean).
  void complete() {
    completing_ = true;
    if (engine_ && engine_->idle() && !engine_->paused()) flush_then([this] { finish(0); });
  }

  // On the home, writers stopped: what they dirtied last goes to the target now.
  void final_sync(std::function<void(int)> done) {
    if (!engine_) return done(-ECANCELED);
    // What the pivot hands over must be on the target's disk, not in its caches (QEMU's mirror flushes
    // the target before it completes).
    engine_->copy_now(0, source_->length(), [this, done = std::move(done)](int rc) {
      if (rc < 0) return done(rc);
      flush(done);
    });
  }

  // The job is over (clean): nothing watches the source's writes any more.
  void release() {
    unhook();
    released_ = true;
    if (plan_.borrow) return drop_engine();
    if (engine_) engine_->cancel();  // on_cancelled drops it once nothing is in flight
  }

 private:
  block::copy_error_action error(const block::copy_error& e) {
    auto policy = e.is_read ? plan_.on_source_error : plan_.on_target_error;
    int err = -e.err;
    auto a = block_job_runner::decide(policy, err);
    auto weak = runner_;
    bool is_read = e.is_read;
    // The event, io-status and the user pause of a stop belong to the job's thread.
    port_.post([weak, a, is_read, err](job::core& j) {
      if (auto r = weak.lock()) r->report_error(j, a, is_read, err);
    });
    switch (a) {
      case job_error_action::report: return block::copy_error_action::report;
      case job_error_action::stop: return block::copy_error_action::stop;
      case job_error_action::ignore:
        if (!plan_.ignore_skips) return block::copy_error_action::retry;
        if (!first_err_) first_err_ = err;
        return block::copy_error_action::skip;
    }
    return block::copy_error_action::report;
  }

  // The total grows with what the guest writes meanwhile: one report per round of copying.
  void grown() {
    if (growth_posted_ || !engine_) return;
    growth_posted_ = true;
    sleeping(false);
    port_.post([rem = engine_->remaining()](job::core& j) { j.progress_set_remaining(rem); });
  }

  // Active writes count as done work, as QEMU's do (both len and offset grow by them). Many writes
  // share one message to the job's thread.
  struct active_bytes {
    std::atomic<int64_t> bytes{0};
    std::atomic<bool> posted{false};
  };
  void add_active_progress(int64_t n) {
    active_->bytes.fetch_add(n, std::memory_order_relaxed);
    if (active_->posted.exchange(true)) return;
    port_.post([a = active_](job::core& j) {
      a->posted = false;
      int64_t n = a->bytes.exchange(0);
      j.progress_increase_remaining(n);
      j.progress_update(n);
    });
  }

  // The job's busy flag follows the engine: one message per change, not per request.
  void sleeping(bool s) {
    if (s == sleeping_) return;
    sleeping_ = s;
    port_.post([s](job::core& j) { j.set_sleeping(s); });
  }

  // An active write's target half failed: on-target-error decides, as for the engine's own writes.
  void active_write_failed(int err) {
    if (plan_.mirror) plan_.mirror->actively_synced = false;
    if (!engine_ || done_) return;
    block::copy_error e;
    e.is_read = false;
    e.err = err;
    engine_->external_error(error(e), err);
  }

  void idle() {
    // The last skip's report counted the operation it was in: nothing is left now.
    if (plan_.skip_lowers_total) port_.post([](job::core& j) { j.progress_set_remaining(0); });
    if (!plan_.ready_when_idle) return flush_then([this] { finish(first_err_); });
    // Converged: the total is what was copied. In write-blocking mode the target follows every
    // write from now on (QEMU sets actively-synced at each convergence in that mode).
    if (plan_.mirror && hook_ && hook_->write_blocking() && hook_->settled()) plan_.mirror->actively_synced = true;
    growth_posted_ = false;
    port_.post([](job::core& j) { j.progress_set_remaining(0); });
    sleeping(true);  // converged: the job waits for new writes (busy false, as QEMU's READY mirror)
    // Completing (job-complete, or a soft cancel when READY): what was copied is flushed first.
    if (completing_) return flush_then([this] { finish(0); });
    if (ready_sent_) return;
    flush_then([this] {
      if (ready_sent_ || done_) return;
      ready_sent_ = true;
      port_.post([](job::core& j) {
        if (j.state() == job::status::running) j.transition_to_ready();
      });
    });
  }

  // Everything copied is made durable before the job says it is done (stream, commit) or READY (mirror,
  // active commit): a target whose metadata write fails in its cache would otherwise lose what the job
  // reported as copied, and the job's prepare (a rebase, a pivot) would then drop the only other copy.
  // A failed flush is a target error under the job's policy: report ends the job with it, ignore tries
  // again (stream: ends with it, as its other errors), stop pauses the job (the resumed engine reports
  // idle again, which flushes again).
  void flush_then(std::function<void()> ok) {
    if (done_) return;
    ++flushing_;
    flush([this, ok = std::move(ok)](int rc) {
      --flushing_;
      if (done_ || finish_waits_) return;
      if (engine_paused_) {
        // The job paused meanwhile: it parks now; the resumed engine's idle flushes again.
        if (parked_ && flushing_ == 0) std::exchange(parked_, nullptr)();
        return;
      }
      if (rc >= 0) return ok();
      switch (error(block::copy_error{0, 0, false, -rc})) {
        case block::copy_error_action::report: return finish(rc);
        case block::copy_error_action::skip:
          if (!first_err_) first_err_ = rc;
          return ok();
        case block::copy_error_action::retry:
          return source_->env().defer([self = shared_from_this(), ok] { self->flush_then(ok); });
        case block::copy_error_action::stop: return;  // paused by the error's effects; idle() again on resume
      }
    });
  }

  // One flush of the node the job writes to; the request holds the host while it is in flight.
  struct flush_waiter final : block::io_waiter {
    std::shared_ptr<engine_host> host;
    block::io_request req;
    std::function<void(int)> done;
    void io_done(block::io_request& r) override {
      std::unique_ptr<flush_waiter> self(this);
      auto d = std::move(done);
      auto h = std::move(host);  // destroyed first after d ran: it may be the host's last reference
      d(r.result);
    }
  };
  // The job does not end while one is out (its nodes may close right after): a finish meanwhile waits.
  void flush(std::function<void(int)> done) {
    auto* w = new flush_waiter;
    w->host = shared_from_this();
    ++flushes_out_;
    w->done = [this, done = std::move(done)](int rc) {
      --flushes_out_;
      done(rc);
      if (finish_waits_ && flushes_out_ == 0) {
        finish_waits_ = false;
        finish(finish_rc_);
      }
    };
    w->req.op = block::io_op::flush;
    w->req.waiter = w;
    flush_node_->submit(w->req);
  }

  // The hook stops at once, but leaves the node (and lets the engine go) only once the guest
  // writes it holds are done: they use the engine's locks and the target.
  void unhook() {
    if (!hook_ || unhooking_) return;
    unhooking_ = true;
    auto self = shared_from_this();
    hook_drained_ = [self] { self->source_->env().defer([self] { self->hook_gone(); }); };
    hook_->stop();  // drained at once when nothing is in flight, else when the last write ends
  }

  void hook_gone() {
    if (!hook_) return;
    source_->remove_write_hook(hook_.get());
    // Freed on a later turn: a node may be walking its hook list right now.
    std::shared_ptr<block::mirror_hook> old(hook_.release());
    source_->env().defer([old] {});
    if (drop_wanted_) drop_engine();
  }

  void finish(int rc) {
    if (done_) return;
    if (flushes_out_ > 0) {
      // A cancel (or an error) came while a flush is out: the job ends once it is back.
      if (!finish_waits_) finish_rc_ = rc;
      finish_waits_ = true;
      return;
    }
    done_ = true;
    if (plan_.borrow && engine_) {
      engine_->rearm();  // a report finished it: guest writes still need copy_now
      engine_->pause();  // and no background copy runs after the job
    }
    if (plan_.at_end) plan_.at_end(engine_, cancel_ && rc == 0 ? -ECANCELED : rc);
    port_.done(rc, rc < 0 ? fail_text_ : std::string());
    // A converged mirror keeps its engine (and hook) for the pivot's last sync; others are idle
    // now, and the engine may be destroyed from its own final callbacks.
    if (plan_.ready_when_idle && rc == 0 && !cancel_) return;
    unhook();
    drop_engine();
  }

  // The engine goes on a later turn: finish may run inside one of its callbacks (a scan's end).
  void drop_engine() {
    if (!engine_) return;
    if (hook_) {
      drop_wanted_ = true;  // hook_gone() drops it
      return unhook();
    }
    if (plan_.borrow) {
      // The filter keeps its engine: only the job's callbacks leave it, on a later turn (this may
      // run inside one of them). The filter goes only after the job's clean, later still.
      auto self = shared_from_this();
      source_->env().defer([self] {
        if (self->engine_) self->engine_->set_callbacks({});
        self->engine_ = nullptr;
      });
      return;
    }
    auto self = shared_from_this();
    source_->env().defer([self] {
      self->owned_.reset();
      self->engine_ = nullptr;
    });
  }

  engine_job_plan plan_;
  job_port port_;
  std::weak_ptr<block_job_runner> runner_;
  std::unique_ptr<block::copy_engine> owned_;
  block::copy_engine* engine_ = nullptr;  // owned_, or the filter's (plan_.borrow)
  bool cancel_wait_ = false;  // a borrowed engine pauses for a cancel: on_paused ends the job
  std::function<void()> parked_;
  block::node* source_ = nullptr;
  std::unique_ptr<block::mirror_hook> hook_;
  std::function<void()> hook_drained_;
  std::shared_ptr<active_bytes> active_ = std::make_shared<active_bytes>();
  block::node* flush_node_ = nullptr;
  int flushing_ = 0;  // flush_then's flushes in flight
  int flushes_out_ = 0;       // every flush in flight
  bool finish_waits_ = false;  // finish came while flushes were out: finish_rc_ once they are back
  int finish_rc_ = 0;
  bool filling_ = false;   // plan_.fill runs (its requests are out on the source)
  int first_err_ = 0;
  bool sleeping_ = false;  // what the job was last told
  std::string fail_text_;
  bool unhooking_ = false, drop_wanted_ = false, growth_posted_ = false, ready_sent_ = false, completing_ = false, released_ = false;
  bool started_ = false, held_ = false, engine_paused_ = false, cancel_ = false, done_ = false;
};

// ---- engine_job_runner: the job actor's thread ---------------------------------------------

engine_job_runner::~engine_job_runner() = default;

void engine_job_runner::to_host(std::function<void(engine_host&)> fn) {
  if (!host_ || !plan_.home) return;
  plan_.home->post([h = host_, fn = std::move(fn)] { fn(*h); });
}

void engine_job_runner::body_start(job::core& j) {
  if (plan_.nothing_to_do) return j.work_done(0);
  auto self = std::static_pointer_cast<block_job_runner>(shared_from_this());
  host_ = std::make_shared<engine_host>(plan_, port(), self);
  to_host([s = speed()](engine_host& h) { h.start(s); });
}

void engine_job_runner::body_pause(std::function<void()> parked) {
  to_host([parked = std::move(parked)](engine_host& h) { h.pause(parked); });
}

void engine_job_runner::body_resume() {
  to_host([](engine_host& h) { h.resume(); });
}

void engine_job_runner::body_cancel() {
  // A soft cancel of a READY mirror or active commit completes the job without a pivot, but like a
  // completion it converges first (QEMU's mirror_run leaves its loop only with nothing dirty), so the
  // target holds every write acknowledged before the cancel. A force cancel stops at once.
  if (plan_.ready_when_idle && core() && !core()->is_cancelled()) return to_host([](engine_host& h) { h.complete(); });
  to_host([](engine_host& h) { h.cancel(); });
}

void engine_job_runner::speed_changed(int64_t speed) {
  to_host([speed](engine_host& h) { h.set_speed(speed); });
}

result<void> engine_job_runner::complete(job::core& j) {
  (void)j;
  to_host([](engine_host& h) { h.complete(); });
  return {};
}

bool engine_job_runner::cancel(job::core& j, bool force) {
  if (!plan_.ready_when_idle) return true;
  return force || !(j.state() == job::status::ready || j.state() == job::status::standby);
}

void engine_job_runner::prepare_async(job::core& j, std::function<void(result<void>)> done) {
  // A soft cancel of a READY job ends it as completed, without its graph change.
  if (!plan_.finish || j.cancel_requested()) return done({});
  // The supervisor answers on its own turn; the outcome comes back here through the port.
  std::weak_ptr<engine_host> host = host_;
  auto sync = [host](std::function<void(int)> d) {
    if (auto h = host.lock()) return h->final_sync(std::move(d));
    d(-ECANCELED);
  };
  plan_.finish(sync, [port = port(), done = std::move(done)](result<void> r) {
    port.post([done, r](job::core&) { done(r); });
  });
}

void engine_job_runner::clean(job::core& j) {
  (void)j;
  if (cleaned_) return;
  cleaned_ = true;
  to_host([](engine_host& h) { h.release(); });
  if (plan_.clean) plan_.clean();
}

void engine_job_runner::abandon() {
  to_host([](engine_host& h) { h.cancel(); });
}

result<void> engine_job_runner::change_kind(job::core& j, const boost::json::object& opts) {
  if (!plan_.mirror) return block_job_runner::change_kind(j, opts);
  // QEMU's mirror_change: the same mode is accepted and changes nothing; only background ->
  // write-blocking is implemented.
  auto* v = opts.if_contains("copy-mode");
  std::string mode = v && v->is_string() ? std::string(v->as_string()) : "";
  bool blocking = plan_.mirror->write_blocking;
  if (mode == (blocking ? "write-blocking" : "background")) return {};
  if (mode != "write-blocking") return fail("Change to copy mode '" + mode + "' is not implemented");
  plan_.mirror->write_blocking = true;
  to_host([](engine_host& h) { h.set_write_blocking(); });
  return {};
}

void engine_job_runner::info_extra(boost::json::object& o) const {
  if (!plan_.mirror) return;
  // QEMU's actively_synced is only ever set once the job is READY; a standby job keeps it.
  bool ready = core() && (core()->state() == job::status::ready || core()->state() == job::status::standby);
  o["actively-synced"] = ready && plan_.mirror->actively_synced.load();
}

}  // namespace blockd

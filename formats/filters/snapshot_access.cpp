// snapshot-access: the read-only point-in-time view of a copy-before-write node (what its disk held when the filter was opened: copied chunks from the target, the rest from the disk); home iothread only.
#include <algorithm>
#include <cerrno>

#include "formats/filters/copy_before_write.h"
#include "protocol/qmp/schema.h"
#include "storage/block/co.h"
#include "storage/block/copy_engine.h"
#include "storage/block/driver.h"
#include "storage/block/iov.h"
#include "storage/block/node.h"

namespace blockd::block {
namespace {

class snapshot_access final : public block_driver {
 public:
  snapshot_access(child_ref file, driver_env env) : file_(file), env_(std::move(env)) {}

  uint32_t caps() const override { return cap_block_status | cap_discard; }
  driver_limits limits() const override {
    driver_limits l;
    if (cbw_state* c = cbw()) {
      if (c->source()) l.request_alignment = std::max(l.request_alignment, c->source()->driver().limits().request_alignment);
      if (c->target()) l.request_alignment = std::max(l.request_alignment, c->target()->driver().limits().request_alignment);
    }
    return l;
  }
  int64_t length() const override { return file_->length(); }
  void rehome(const driver_env& env) override { env_ = env; }
  image_facts facts() const override { return {.virtual_size = length()}; }

  void child_perm(const std::string&, bool, uint32_t, uint32_t, uint32_t& perm, uint32_t& shared) const override {
    // The view reads the filter's children directly; of the filter itself it needs nothing
    // (QEMU's snapshot-access takes no permission on its file).
    perm = 0;
    shared = perm_all;
  }

  void submit(io_request& r) override {
    auto sync = std::make_shared<bool>(true);
    co::start(run(r), [this, &r, sync](int rc) {
      if (*sync) return env_.defer([&r, rc] { r.complete(rc); });  // never inside submit
      r.complete(rc);
    });
    *sync = false;
  }

 private:
  cbw_state* cbw() const {
    node* n = file_.get();
    return n ? static_cast<cbw_state*>(n->driver().driver_extension(cbw_state::id)) : nullptr;
  }

  co::task<int> run(io_request& r) {
    cbw_state* c = cbw();
    if (!c) co_return -ENOTSUP;
    switch (r.op) {
      case io_op::write:
      case io_op::write_zeroes: co_return -ENOTSUP;  // the view is read-only
      case io_op::flush: co_return 0;
      case io_op::discard: {
        // The callback may come before snapshot_discard returns (nothing to discard): then no suspend.
        struct aw {
          cbw_state* c;
          int64_t off, len;
          int rc = 0;
          bool done = false, suspended = false;
          std::coroutine_handle<> h;
          bool await_ready() const noexcept { return false; }
          bool await_suspend(std::coroutine_handle<> hh) {
            h = hh;
            c->snapshot_discard(off, len, [this](int x) {
              rc = x;
              done = true;
              if (suspended) h.resume();
            });
            if (done) return false;
            suspended = true;
            return true;
          }
          int await_resume() const noexcept { return rc; }
        };
        aw discard{c, r.offset, r.length};  // named: see copy_before_write.cpp (GCC 12 and prvalue awaiters)
        co_return co_await discard;
      }
      case io_op::block_status: {
        if (c->snapshot_error()) co_return -EACCES;
        int64_t run = 0;
        auto w = c->lookup(r.offset, r.length, run);
        if (w == cbw_state::where::none) co_return -EACCES;
        node* from = w == cbw_state::where::target ? c->target() : c->source();
        uint64_t t = w == cbw_state::where::source ? c->read_lock(r.offset, run) : 0;
        // A source request made under a read lock passes a drain of the source (io_control): a guest
        // write waits for the lock while it counts as in flight on the filter, so a held request here
        // would keep that drain from ever ending.
        co::child_io q(*from, io_op::block_status, r.offset, run, t ? uint32_t(io_control) : 0u);
        int rc = co_await q;
        if (t) c->read_unlock(t);
        if (rc < 0) co_return rc;
        r.status = q.request().status;
        r.status_length = std::min(q.request().status_length > 0 ? q.request().status_length : run, run);
        r.depth = q.request().depth;
        if (w == cbw_state::where::target) {
          // Only what the filter wrote is read from the target: allocated there, whatever its chain says.
          r.status |= bs_allocated;
          r.depth = 1;
        }
        co_return 0;
      }
      case io_op::read: {
        int64_t pos = 0;
        while (pos < r.length) {
          if (c->snapshot_error()) co_return -EACCES;
          int64_t run = 0;
          auto w = c->lookup(r.offset + pos, r.length - pos, run);
          if (w == cbw_state::where::none) co_return -EACCES;
          run = std::min(run, r.length - pos);
          node* from = w == cbw_state::where::target ? c->target() : c->source();
          uint64_t t = w == cbw_state::where::source ? c->read_lock(r.offset + pos, run) : 0;
          iov_part p(r.iov, r.iovcnt, pos, run);
          int rc = co_await co::child_io(*from, io_op::read, r.offset + pos, run, t ? uint32_t(io_control) : 0u)
                       .vector(p.v, p.n);  // io_control: as for block status above
          if (t) c->read_unlock(t);
          if (rc < 0) co_return rc;
          pos += run;
        }
        co_return 0;
      }
    }
    co_return -EINVAL;
  }

  child_ref file_;
  driver_env env_;
};

result<std::unique_ptr<block_driver>> open_snapshot_access(open_args& a) {
  node* file = a.find_child("file");
  if (!file) return fail("snapshot-access node needs a file child");
  if (!file->driver().driver_extension(cbw_state::id))
    return fail("Node '" + file->name() + "' is a " + file->settings().driver +
                " node; snapshot-access reads the point-in-time view of a copy-before-write node: name one as 'file'");
  // A backup's sync=top filter marks what the top layer does not hold as done without copying it: the
  // view would read those ranges from the target, where the old data never went.
  auto* c = static_cast<cbw_state*>(file->driver().driver_extension(cbw_state::id));
  if (!c->engine().copies_everything())
    return fail("Node '" + file->name() + "' is the filter of a backup job with sync=top, which copies only the top "
                "layer, so its point-in-time view would be incomplete; fleece through a copy-before-write node of "
                "your own, or a backup with sync=full or none");
  return std::unique_ptr<block_driver>(new snapshot_access(child_ref(a.edge("file")), a.env));
}

}  // namespace

void register_snapshot_access_driver() {
  driver_entry e{"snapshot-access", false, {"file"}, open_snapshot_access, nullptr};
  e.options_type = "BlockdevOptionsGenericFormat";
  e.define_options = [](qmp::schema& s) {
    if (!s.find_type("BlockdevOptionsGenericFormat")) s.object("BlockdevOptionsGenericFormat", "file:BlockdevRef");
  };
  register_driver(std::move(e));
}

}  // namespace blockd::block

// copy-on-read: a filter whose reads copy what they find in the backing chain into its file child (with `bottom` limiting how deep); home iothread only.
#include "protocol/qmp/schema.h"
#include "storage/block/co.h"
#include "storage/block/filter.h"
#include "storage/block/iov.h"

namespace blockd::block {
namespace {

// Which reads copy is decided here, by the child's block status (the allocation depth of the data);
// the copying itself is the format's (io_copy_up): it reads the clusters from its backing chain and
// writes them into the image under its own cluster locks, so a guest write cannot slip between the
// copy's read and its write. Data that lives in the child already, or nowhere in the chain, or
// only below `bottom`, is read as it is.
class cor_filter final : public filter_driver {
 public:
  cor_filter(child_ref child, driver_env env, std::string bottom)
      : filter_driver(child), env_(std::move(env)), bottom_(std::move(bottom)) {}

  uint32_t caps() const override { return filter_driver::caps() | (child_->driver().caps() & cap_compress); }
  void rehome(const driver_env& env) override { env_ = env; }

  void child_perm(const std::string&, bool read_only, uint32_t node_perm, uint32_t node_shared, uint32_t& perm,
                  uint32_t& shared) const override {
    // Copying rewrites data the guest already sees: WRITE_UNCHANGED, as QEMU's filter takes it.
    perm = node_perm | perm_write_unchanged;
    shared = node_shared;
  }

  void submit(io_request& r) override {
    if (r.op != io_op::read) return pass_down(r, 0, 0);
    io_request* s = probes_.get();
    s->op = io_op::block_status;
    s->offset = r.offset;
    s->length = r.length;
    s->user = &r;
    s->waiter = &probe_done_;
    child_->submit(*s);
  }

  // Whether data at allocation depth `depth` (1: the child itself, 2: its backing file, ...; 0:
  // nowhere) is copied: from any backing layer, or only down to `bottom`.
  bool copies(int depth) const {
    if (depth < 2) return false;
    if (bottom_.empty()) return true;
    return depth <= bottom_depth();
  }

 private:
  // The depth of `bottom` below the child, found again each time: snapshots and stream change the
  // chain under the filter. Compared by name, which the graph keeps unique.
  int bottom_depth() const {
    int d = 1;
    const node* at = child_.get();
    for (int hops = 0; at && hops < 256; ++hops) {
      if (at->name() == bottom_) return d;
      const node* next = nullptr;
      bool deeper = false;
      for (child_edge* e : at->children()) {
        if (e->role == "backing" && e->child) {
          next = e->child;
          deeper = true;
        }
      }
      if (!next) {
        const driver_entry* de = find_driver(at->settings().driver);
        if (de && de->is_filter)
          for (child_edge* e : at->children())
            if (e->role == "file") next = e->child;
      }
      if (deeper) ++d;
      at = next;
    }
    return 0;  // no longer in the chain: copy nothing
  }

  struct probe_waiter final : io_waiter {
    cor_filter* f;
    explicit probe_waiter(cor_filter* o) : f(o) {}
    void io_done(io_request& s) override { f->probed(s); }
  };

  void probed(io_request& s) {
    io_request& r = *static_cast<io_request*>(s.user);
    int res = s.result;
    int64_t len = s.status_length;
    int depth = s.depth;
    probes_.put(&s);
    if (res < 0) return r.complete(res);
    // The common case: one extent covers the read and nothing is to be copied (allocated data).
    if (len >= r.length || len <= 0) return pass_down(r, 0, copies(depth) ? uint32_t(io_copy_up) : 0u);
    co::start(read_extents(r, len, depth), [&r](int rc) { r.complete(rc); });
  }

  // A read over extents of different depths: each extent is read on its own, copying where it should.
  co::task<int> read_extents(io_request& r, int64_t len, int depth) {
    int64_t pos = 0;
    uint32_t a = std::max<uint32_t>(1, child_->driver().limits().request_alignment);
    while (pos < r.length) {
      if (pos > 0) {
        co::child_io probe(*child_, io_op::block_status, r.offset + pos, r.length - pos);
        int rc = co_await probe;
        if (rc < 0) co_return rc;
        len = probe.request().status_length;
        depth = probe.request().depth;
      }
      len = std::clamp<int64_t>((len + a - 1) / a * a, a, r.length - pos);
      iov_part p(r.iov, r.iovcnt, pos, len);
      int rc = co_await co::child_io(*child_, io_op::read, r.offset + pos, len, copies(depth) ? uint32_t(io_copy_up) : 0u)
                   .vector(p.v, p.n);
      if (rc < 0) co_return rc;
      pos += len;
    }
    co_return 0;
  }

  driver_env env_;
  std::string bottom_;
  request_pool probes_;
  probe_waiter probe_done_{this};
};

// The chain below `from` (backing files, through filters), for checking `bottom` at open.
bool in_chain(const node* from, const node* target) {
  for (int hops = 0; from && hops < 256; ++hops) {
    if (from == target) return true;
    const node* next = nullptr;
    for (child_edge* e : from->children())
      if (e->role == "backing" && e->child) next = e->child;
    if (!next) {
      const driver_entry* de = find_driver(from->settings().driver);
      if (de && de->is_filter)
        for (child_edge* e : from->children())
          if (e->role == "file") next = e->child;
    }
    from = next;
  }
  return false;
}

result<std::unique_ptr<block_driver>> open_cor(open_args& a) {
  node* child = a.find_child("file");
  if (!child) return fail("copy-on-read node needs a file child");
  std::string bottom;
  if (auto* v = a.options.if_contains("bottom")) {
    bottom = std::string(v->as_string());
    node* b = a.find_node ? a.find_node(bottom) : nullptr;
    if (!b) return fail("Bottom node '" + bottom + "' not found");
    const driver_entry* de = find_driver(b->settings().driver);
    if (de && de->is_filter) return fail("Bottom node '" + bottom + "' is a filter");
    // QSD loops forever on a bottom outside the chain; blockd refuses it.
    if (!in_chain(child, b))
      return fail("Bottom node '" + bottom + "' is not in the backing chain of node '" + child->name() +
                  "'; name '" + child->name() + "' or a node below it");
  }
  return std::unique_ptr<block_driver>(new cor_filter(child_ref(a.edge("file")), a.env, bottom));
}

}  // namespace

void register_cor_driver() {
  driver_entry e{"copy-on-read", false, {"file"}, open_cor, nullptr};
  e.is_filter = true;
  e.weak_options = {"bottom"};
  e.options_type = "BlockdevOptionsCor";
  e.define_options = [](qmp::schema& s) { s.object("BlockdevOptionsCor", "file:BlockdevRef *bottom:str"); };
  register_driver(std::move(e));
}

}  // namespace blockd::block

// blkdebug: a filter over `image` that injects errors on the events formats above it raise, and imposes alignment and transfer limits; home iothread only.
#include <cerrno>
#include <climits>
#include <memory>
#include <optional>

#include "formats/filters/blkdebug_rules.h"
#include "protocol/qmp/schema.h"
#include "storage/block/filter.h"
#include "storage/block/iov.h"

namespace blockd::block {
namespace {

struct blkdebug_limits {
  int64_t align = 0, max_transfer = 0, opt_write_zero = 0, max_write_zero = 0, opt_discard = 0, max_discard = 0;
};

uint32_t perms_of(const boost::json::object& o, const char* key) {
  uint32_t bits = 0;
  auto* v = o.if_contains(key);
  if (!v || !v->is_array()) return 0;
  for (auto& p : v->as_array()) {
    if (!p.is_string()) continue;
    auto s = p.as_string();
    if (s == "consistent-read") bits |= perm_consistent_read;
    if (s == "write") bits |= perm_write;
    if (s == "write-unchanged") bits |= perm_write_unchanged;
    if (s == "resize") bits |= perm_resize;
  }
  return bits;
}

class blkdebug_driver final : public filter_driver {
 public:
  blkdebug_driver(child_ref child, rule_set rules, blkdebug_limits lim, uint32_t take, uint32_t unshare,
                  driver_env env)
      : filter_driver(child), engine_(std::move(rules)), lim_(lim), take_(take), unshare_(unshare), env_(std::move(env)) {
    splitter_.owner = this;
  }

  // No FUA of its own (QEMU's blkdebug has it only where its image's driver has; QEMU's file driver does
  // not): the node emulates a FUA write with a flush, which the rules see as a flush.
  uint32_t caps() const override { return filter_driver::caps() & ~uint32_t(cap_fua); }

  driver_limits limits() const override {
    driver_limits l = child_->driver().limits();
    if (lim_.align) l.request_alignment = uint32_t(lim_.align);
    if (lim_.max_transfer) l.max_transfer = lim_.max_transfer;
    if (lim_.opt_write_zero) l.opt_write_zeroes = lim_.opt_write_zero;
    if (lim_.max_write_zero) l.max_write_zeroes = lim_.max_write_zero;
    if (lim_.opt_discard) l.opt_discard = lim_.opt_discard;
    if (lim_.max_discard) l.max_discard = lim_.max_discard;
    return l;
  }

  // Events stop here (as in QEMU): a blkdebug node acts on what the format above announces.
  void debug_event(blkdebug_event e) override { engine_.event(e); }

  void submit(io_request& r) override {
    // QEMU's block layer announces every write and zero write a blkdebug node gets on the node
    // itself (pwritev / pwritev_zero before the driver sees it, pwritev_done once it returned,
    // failed or not); its rules may act on them like on any other event.
    bool w = r.op == io_op::write || r.op == io_op::write_zeroes;
    if (w) engine_.event(r.op == io_op::write ? blkdebug_event::pwritev : blkdebug_event::pwritev_zero);
    if (refused(r)) return fail_later(r, -ENOTSUP, true);
    auto v = engine_.check(r.op, r.offset, r.length);
    // Never inside submit: an immediate failure comes on the next loop turn, any other one turn
    // later (QEMU fails it after rescheduling the request once).
    if (v.error) return fail_later(r, v.error, v.immediately);
    bool payload = r.op == io_op::read || r.op == io_op::write;
    if (payload && lim_.max_transfer && r.length > lim_.max_transfer) return split(r);
    pass_down(r, 0);
  }

  void child_perm(const std::string&, bool, uint32_t node_perm, uint32_t node_shared, uint32_t& perm,
                  uint32_t& shared) const override {
    perm = node_perm | take_;
    shared = node_shared & ~unshare_;
  }

  void rehome(const driver_env& env) override { env_ = env; }

  const blkdebug_engine& engine() const { return engine_; }

 private:
  void completed(io_request& r) override { done(r, r.result); }
  // Every request ends here: a write's pwritev_done, then the layer above hears of it.
  void done(io_request& r, int res) {
    if (r.op == io_op::write || r.op == io_op::write_zeroes) engine_.event(blkdebug_event::pwritev_done);
    r.complete(res);
  }
  void fail_later(io_request& r, int err, bool immediately) {
    if (immediately)
      env_.defer([this, &r, err] { done(r, err); });
    else
      env_.defer([this, &r, err] { env_.defer([this, &r, err] { done(r, err); }); });
  }
  // QEMU's blkdebug passes on only write_zeroes of at least its zero alignment and discards of at
  // least its request alignment; smaller pieces (a split request's head or tail) get -ENOTSUP, which
  // the node above turns into a zero-buffer write or a skipped discard. The rules never see them.
  bool refused(const io_request& r) const {
    if (r.op != io_op::write_zeroes && r.op != io_op::discard) return false;
    if (!lim_.opt_write_zero && !lim_.max_write_zero && !lim_.opt_discard && !lim_.max_discard && !lim_.align)
      return false;  // nothing set: no limits() call down the chain on this path
    driver_limits l = limits();
    int64_t ra = std::max<int64_t>(1, l.request_alignment);
    if (r.op == io_op::write_zeroes) return r.length < std::max<int64_t>(ra, l.opt_write_zeroes);
    return r.length < ra;
  }

  // A payload request longer than max-transfer (a caller that ignored the limit): its pieces go to
  // the child one after another, each at most max-transfer long.
  struct split_state {
    io_request* orig = nullptr;
    io_request* piece = nullptr;
    int64_t done = 0;
    std::optional<iov_part> part;
  };
  struct split_waiter final : io_waiter {
    blkdebug_driver* owner = nullptr;
    void io_done(io_request& p) override { owner->piece_done(p); }
  };

  void split(io_request& r) {
    auto* st = new split_state;
    st->orig = &r;
    st->piece = pieces_.get();
    st->piece->user = st;
    st->piece->waiter = &splitter_;
    next_piece(*st);
  }
  void next_piece(split_state& st) {
    io_request& r = *st.orig;
    io_request& p = *st.piece;
    int64_t n = std::min(lim_.max_transfer, r.length - st.done);
    st.part.emplace(r.iov, r.iovcnt, st.done, n);
    p.op = r.op;
    p.flags = r.flags;
    p.offset = r.offset + st.done;
    p.length = n;
    p.iov = st.part->v;
    p.iovcnt = st.part->n;
    p.result = 0;
    p.nlayers = 0;
    st.done += n;
    child_->submit(p);
  }
  void piece_done(io_request& p) {
    auto* st = static_cast<split_state*>(p.user);
    if (p.result == 0 && st->done < st->orig->length) return next_piece(*st);
    int res = p.result;
    io_request* orig = st->orig;
    pieces_.put(st->piece);
    delete st;
    done(*orig, res);
  }

  blkdebug_engine engine_;
  blkdebug_limits lim_;
  uint32_t take_, unshare_;
  driver_env env_;
  request_pool pieces_;
  split_waiter splitter_;
};

int64_t get_int(const boost::json::object& o, const char* key) {
  auto* v = o.if_contains(key);
  if (!v) return 0;
  return v->is_uint64() ? int64_t(v->as_uint64()) : v->is_int64() ? v->as_int64() : 0;
}

bool aligned(int64_t v, int64_t a) { return a <= 1 || v % a == 0; }

// QEMU's checks, in its order, with its texts.
result<blkdebug_limits> check_limits(const boost::json::object& o, uint32_t child_align) {
  for (const char* k : {"align", "max-transfer", "opt-write-zero", "max-write-zero", "opt-discard", "max-discard"})
    if (get_int(o, k) < 0) return fail(std::string("Parameter '") + k + "' expects a non-negative number below 2^64");
  blkdebug_limits l;
  l.align = get_int(o, "align");
  if (l.align && (l.align >= INT_MAX || (l.align & (l.align - 1))))
    return fail("Cannot meet constraints with align " + std::to_string(l.align));
  int64_t align = std::max<int64_t>(l.align, child_align);
  auto check = [&](const char* name, int64_t v, int64_t multiple_of) -> result<void> {
    if (v && (v >= INT_MAX || !aligned(v, multiple_of)))
      return fail(std::string("Cannot meet constraints with ") + name + " " + std::to_string(v));
    return {};
  };
  l.max_transfer = get_int(o, "max-transfer");
  if (auto ok = check("max-transfer", l.max_transfer, align); !ok) return std::unexpected(ok.error());
  l.opt_write_zero = get_int(o, "opt-write-zero");
  if (auto ok = check("opt-write-zero", l.opt_write_zero, align); !ok) return std::unexpected(ok.error());
  l.max_write_zero = get_int(o, "max-write-zero");
  if (auto ok = check("max-write-zero", l.max_write_zero, std::max(l.opt_write_zero, align)); !ok)
    return std::unexpected(ok.error());
  l.opt_discard = get_int(o, "opt-discard");
  if (auto ok = check("opt-discard", l.opt_discard, align); !ok) return std::unexpected(ok.error());
  l.max_discard = get_int(o, "max-discard");
  if (auto ok = check("max-discard", l.max_discard, std::max(l.opt_discard, align)); !ok)
    return std::unexpected(ok.error());
  return l;
}

result<std::unique_ptr<block_driver>> open_blkdebug(open_args& a) {
  // The config file is read first, then the options' rules, as QEMU does.
  rule_set rules;
  if (auto* c = a.options.if_contains("config"); c && c->is_string()) {
    auto ok = read_blkdebug_config(std::string(c->as_string()), rules);
    if (!ok) return std::unexpected(ok.error());
  }
  if (auto ok = parse_blkdebug_options(a.options, rules); !ok) return std::unexpected(ok.error());
  node* child = a.find_child("image");
  if (!child) return fail("blkdebug node needs an image child");
  auto lim = check_limits(a.options, std::max<uint32_t>(1, child->driver().limits().request_alignment));
  if (!lim) return std::unexpected(lim.error());
  return std::unique_ptr<block_driver>(new blkdebug_driver(child_ref(a.edge("image")), std::move(rules), *lim,
                                                           perms_of(a.options, "take-child-perms"),
                                                           perms_of(a.options, "unshare-child-perms"), a.env));
}

// "blkdebug:CONFIG:IMAGE" while the node has no options but these two and the image has a plain
// name (QEMU's filename refresh); otherwise the graph's json: description.
std::string blkdebug_filename(const boost::json::object& o,
                              const std::function<std::string(const std::string&)>& child_filename) {
  for (auto& kv : o)
    if (kv.key() != "image" && kv.key() != "config") return "";
  std::string image = child_filename("image");
  if (image.empty() || image.rfind("json:", 0) == 0) return "";
  std::string config;
  if (auto* c = o.if_contains("config"); c && c->is_string()) config = std::string(c->as_string());
  return "blkdebug:" + config + ":" + image;
}

}  // namespace

void register_blkdebug_driver() {
  driver_entry e{"blkdebug", false, {"image"}, open_blkdebug, nullptr};
  e.options_type = "BlockdevOptionsBlkdebug";
  e.define_options = [](qmp::schema& s) {
    std::string events;
    for (auto n : blkdebug_event_names) events += std::string(n) + " ";
    s.enumeration("BlkdebugEvent", events);
    s.enumeration("BlkdebugIOType", "read write write-zeroes discard flush block-status");
    s.object("BlkdebugInjectErrorOptions",
             "event:BlkdebugEvent *state:int *iotype:BlkdebugIOType *errno:int *sector:int *once:bool *immediately:bool");
    s.object("BlkdebugSetStateOptions", "event:BlkdebugEvent *state:int new_state:int");
    s.object("BlockdevOptionsBlkdebug",
             "image:BlockdevRef *config:str *align:int *max-transfer:int32 *opt-write-zero:int32 *max-write-zero:int32 "
             "*opt-discard:int32 *max-discard:int32 *inject-error:[BlkdebugInjectErrorOptions] "
             "*set-state:[BlkdebugSetStateOptions] *take-child-perms:[BlockPermission] "
             "*unshare-child-perms:[BlockPermission]");
  };
  e.composite_filename = blkdebug_filename;
  register_driver(std::move(e));
}

}  // namespace blockd::block

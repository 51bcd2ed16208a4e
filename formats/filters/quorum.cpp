// quorum: N children kept identical; reads are voted on by content (or read in order: fifo), writes and flushes go to all; home iothread only.
#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "formats/filters/quorum.h"
#include "protocol/qmp/schema.h"
#include "storage/block/iov.h"
#include "storage/block/node.h"

namespace blockd::block {
namespace {

constexpr int64_t sector = 512;

// One buffer per child for a voted read: each child's version is kept until the vote is over.
struct aligned_buf {
  void* p = nullptr;
  explicit aligned_buf(int64_t n) {
    size_t sz = size_t((n + 4095) / 4096 * 4096);
    p = std::aligned_alloc(4096, sz ? sz : 4096);
  }
  ~aligned_buf() { std::free(p); }
  aligned_buf(const aligned_buf&) = delete;
  aligned_buf& operator=(const aligned_buf&) = delete;
};

class quorum_driver final : public block_driver, private io_waiter {
 public:
  quorum_driver(std::vector<child_ref> kids, quorum_settings s, driver_env env, std::string name)
      : kids_(std::move(kids)), s_(s), env_(std::move(env)), name_(std::move(name)) {}

  uint32_t caps() const override { return cap_write_zeroes | cap_fua; }
  driver_limits limits() const override {
    driver_limits l;
    for (auto& k : kids_) {
      auto cl = k->driver().limits();
      l.request_alignment = std::max(l.request_alignment, cl.request_alignment);
      if (cl.max_transfer && (!l.max_transfer || cl.max_transfer < l.max_transfer)) l.max_transfer = cl.max_transfer;
    }
    return l;
  }
  int64_t length() const override { return kids_.empty() ? 0 : kids_.front()->length(); }
  image_facts facts() const override { return {.virtual_size = length()}; }

  // QEMU's default permissions for data children: what the users need; others may only read and
  // write without changing content (the children must stay identical).
  void child_perm(const std::string&, bool, uint32_t node_perm, uint32_t node_shared, uint32_t& perm,
                  uint32_t& shared) const override {
    perm = node_perm;
    shared = node_shared & (perm_consistent_read | perm_write_unchanged);
  }

  result<std::unique_ptr<reopen_state>> reopen_prepare(const reopen_args&, std::vector<std::string>&) override {
    return fail("Block format 'quorum' used by node '" + name_ + "' does not support reopening files");
  }

  // x-blockdev-change (quorum_children_api).
  bool has_child_list() const override { return true; }
  result<std::string> child_add_role() override {
    if (s_.blkverify) return fail("Cannot add a child to a quorum in blkverify mode");
    return "children." + std::to_string(next_index_);
  }
  void child_added(child_ref c) override {
    kids_.push_back(c);
    ++next_index_;
  }
  result<void> child_del_check(const std::string& role) override {
    (void)role;
    if (int(kids_.size()) <= s_.threshold)
      return fail("The number of children cannot be lower than the vote threshold " + std::to_string(s_.threshold));
    return {};
  }
  void child_deleted(child_edge* e) override {
    // The newest index may be given out again once its child is gone (QEMU's next_child_index).
    if (e->role == "children." + std::to_string(next_index_ - 1)) --next_index_;
    std::erase_if(kids_, [&](const child_ref& k) { return k.edge() == e; });
  }
  void set_next_index(unsigned n) { next_index_ = n; }
  void rehome(const driver_env& env) override { env_ = env; }

  void submit(io_request& r) override;

 private:
  struct op;
  struct sub_result {
    int ret = 0;
    std::unique_ptr<aligned_buf> buf;  // voted reads
  };
  // One request of the layer above, spread over the children.
  struct op {
    io_request* parent = nullptr;
    int pending = 0;
    int fifo_next = 0;  // fifo: the next child to try
    bool rewriting = false;
    std::vector<sub_result> subs;
  };

  void io_done(io_request& sub) override;
  void start_sub(op& o, size_t i, io_op kind, uint32_t flags, const iovec* iov, int iovcnt);
  void finish(op& o);
  void finish_read(op& o);
  void finish_write(op& o);
  void finish_flush(op& o);
  void done(op& o, int res);
  int most_common_error(const op& o) const;
  void report_bad(const char* type, int64_t off, int64_t len, const std::string& node, int ret);
  void report_failure(int64_t off, int64_t len);

  std::vector<child_ref> kids_;
  quorum_settings s_;
  driver_env env_;
  std::string name_;
  unsigned next_index_ = 0;
  request_pool pool_;
};

void quorum_driver::start_sub(op& o, size_t i, io_op kind, uint32_t flags, const iovec* iov, int iovcnt) {
  io_request* c = pool_.get();
  c->op = kind;
  c->flags = flags;
  c->offset = o.parent->offset;
  c->length = kind == io_op::flush ? 0 : o.parent->length;
  c->iov = iov;
  c->iovcnt = iovcnt;
  c->user = &o;
  c->tag = i;
  c->waiter = this;
  ++o.pending;
  kids_[i]->submit(*c);
}

void quorum_driver::submit(io_request& r) {
  auto* o = new op;
  o->parent = &r;
  o->subs.resize(kids_.size());
  size_t n = kids_.size();
  switch (r.op) {
    case io_op::read:
      if (s_.fifo) {
        o->fifo_next = 1;
        start_sub(*o, 0, io_op::read, 0, r.iov, r.iovcnt);
        return;
      }
      // Every child reads into a buffer of its own; the vote picks the version the caller gets.
      for (size_t i = 0; i < n; ++i) o->subs[i].buf = std::make_unique<aligned_buf>(r.length);
      for (size_t i = 0; i < n; ++i) {
        io_request* c = pool_.get();
        c->op = io_op::read;
        c->offset = r.offset;
        c->set_buffer(o->subs[i].buf->p, r.length);
        c->user = o;
        c->tag = i;
        c->waiter = this;
        ++o->pending;
        kids_[i]->submit(*c);
      }
      return;
    case io_op::write:
    case io_op::write_zeroes:
      for (size_t i = 0; i < n; ++i) start_sub(*o, i, r.op, r.flags, r.iov, r.iovcnt);
      return;
    case io_op::flush:
      for (size_t i = 0; i < n; ++i) start_sub(*o, i, io_op::flush, 0, nullptr, 0);
      return;
    case io_op::discard:
      // QEMU's quorum has no discard: the generic layer answers success and nothing is discarded.
      delete o;
      env_.defer([&r] { r.complete(0); });
      return;
    default:
      // Nor block status: everything is data, allocated here (QEMU's answer for such a driver).
      delete o;
      env_.defer([&r] {
        r.status = bs_data | bs_allocated;
        r.status_length = r.length;
        r.depth = 1;
        r.complete(0);
      });
      return;
  }
}

void quorum_driver::io_done(io_request& sub) {
  auto& o = *static_cast<op*>(sub.user);
  size_t i = size_t(sub.tag);
  int ret = sub.result;
  io_op kind = sub.op;
  pool_.put(&sub);
  if (o.rewriting) {
    // A repair write finished; its result does not change the read's (QEMU ignores it too).
    if (--o.pending == 0) done(o, 0);
    return;
  }
  o.subs[i].ret = ret;
  io_request& r = *o.parent;
  if (r.op == io_op::read && s_.fifo) {
    --o.pending;
    if (ret < 0) {
      report_bad("read", r.offset, r.length, kids_[i]->name(), ret);
      if (o.fifo_next < int(kids_.size())) {
        start_sub(o, size_t(o.fifo_next++), io_op::read, 0, r.iov, r.iovcnt);
        return;
      }
    }
    return done(o, ret);
  }
  (void)kind;
  if (ret < 0) {
    if (r.op == io_op::flush)
      report_bad("flush", 0, kids_[i]->length(), kids_[i]->name(), ret);
    else
      report_bad(r.op == io_op::read ? "read" : "write", r.offset, r.length, kids_[i]->name(), ret);
  }
  if (--o.pending == 0) finish(o);
}

void quorum_driver::finish(op& o) {
  switch (o.parent->op) {
    case io_op::read: return finish_read(o);
    case io_op::flush: return finish_flush(o);
    default: return finish_write(o);
  }
}

int quorum_driver::most_common_error(const op& o) const {
  // Votes among the errors; a tie goes to the error seen last (QEMU's vote list puts new versions first).
  std::vector<std::pair<int, int>> votes;  // error, count, in order of first appearance
  for (auto& s : o.subs) {
    if (s.ret >= 0) continue;
    auto it = std::find_if(votes.begin(), votes.end(), [&](auto& v) { return v.first == s.ret; });
    if (it == votes.end()) votes.push_back({s.ret, 1});
    else ++it->second;
  }
  int best = -EIO, max = 0;
  for (auto it = votes.rbegin(); it != votes.rend(); ++it)
    if (it->second > max) {
      max = it->second;
      best = it->first;
    }
  return best;
}

void quorum_driver::finish_write(op& o) {
  int ok = 0;
  for (auto& s : o.subs) ok += s.ret == 0;
  if (ok >= s_.threshold) return done(o, 0);
  report_failure(o.parent->offset, o.parent->length);
  done(o, most_common_error(o));
}

void quorum_driver::finish_flush(op& o) {
  int ok = 0;
  for (auto& s : o.subs) ok += s.ret == 0;
  done(o, ok >= s_.threshold ? 0 : most_common_error(o));
}

void quorum_driver::finish_read(op& o) {
  io_request& r = *o.parent;
  int ok = 0;
  for (auto& s : o.subs) ok += s.ret == 0;
  if (ok < s_.threshold) {
    report_failure(r.offset, r.length);
    return done(o, most_common_error(o));
  }
  // Versions by content, in order of first appearance; each lists its children.
  struct version {
    size_t first;
    std::vector<size_t> items;
  };
  std::vector<version> versions;
  for (size_t i = 0; i < o.subs.size(); ++i) {
    if (o.subs[i].ret != 0) continue;
    auto same = std::find_if(versions.begin(), versions.end(), [&](const version& v) {
      return std::memcmp(o.subs[v.first].buf->p, o.subs[i].buf->p, size_t(r.length)) == 0;
    });
    if (same == versions.end()) versions.push_back({i, {i}});
    else same->items.push_back(i);
  }
  if (versions.size() > 1 && s_.blkverify) {
    // QEMU prints the mismatch and exits; a daemon serving other nodes fails the read instead.
    std::fprintf(stderr, "quorum: offset=%lld bytes=%lld contents mismatch in node '%s'\n", (long long)r.offset,
                 (long long)r.length, name_.c_str());
    return done(o, -EIO);
  }
  // The most voted version wins; a tie goes to the version that appeared last (QEMU's list order).
  size_t win = 0;
  size_t max = 0;
  for (size_t v = versions.size(); v-- > 0;)
    if (versions[v].items.size() > max) {
      max = versions[v].items.size();
      win = v;
    }
  if (int(max) < s_.threshold) {
    report_failure(r.offset, r.length);
    return done(o, -EIO);
  }
  const void* winner = o.subs[versions[win].first].buf->p;
  copy_to_iov(r.iov, r.iovcnt, 0, winner, r.length);
  // The losers, newest version first and within one the last child first (QEMU's report order).
  std::vector<size_t> bad;
  for (size_t v = versions.size(); v-- > 0;) {
    if (v == win) continue;
    for (auto it = versions[v].items.rbegin(); it != versions[v].items.rend(); ++it) bad.push_back(*it);
  }
  for (size_t i : bad) report_bad("read", r.offset, r.length, kids_[i]->name(), 0);
  if (!s_.rewrite_corrupted || bad.empty()) return done(o, 0);
  // Repair: the winner's data goes back to every child that disagreed; the read completes after.
  o.rewriting = true;
  for (size_t i : bad) {
    io_request* c = pool_.get();
    c->op = io_op::write;
    c->offset = r.offset;
    c->set_buffer(const_cast<void*>(winner), r.length);
    c->user = &o;
    c->tag = i;
    c->waiter = this;
    ++o.pending;
    kids_[i]->submit(*c);
  }
}

void quorum_driver::done(op& o, int res) {
  io_request* r = o.parent;
  delete &o;
  r->complete(res);
}

void quorum_driver::report_bad(const char* type, int64_t off, int64_t len, const std::string& node, int ret) {
  if (!env_.emit) return;
  boost::json::object d;
  d["type"] = type;
  if (ret < 0) d["error"] = std::strerror(-ret);
  d["node-name"] = node;
  int64_t start = off / sector, end = (off + len + sector - 1) / sector;
  d["sector-num"] = start;
  d["sectors-count"] = end - start;
  env_.emit("QUORUM_REPORT_BAD", std::move(d));
}

void quorum_driver::report_failure(int64_t off, int64_t len) {
  if (!env_.emit) return;
  boost::json::object d;
  d["reference"] = name_;
  int64_t start = off / sector, end = (off + len + sector - 1) / sector;
  d["sector-num"] = start;
  d["sectors-count"] = end - start;
  env_.emit("QUORUM_FAILURE", std::move(d));
}

int64_t get_int(const boost::json::object& o, const char* key, int64_t dflt) {
  auto* v = o.if_contains(key);
  if (!v) return dflt;
  return v->is_uint64() ? int64_t(v->as_uint64()) : v->as_int64();
}

bool get_flag(const boost::json::object& o, const char* key) {
  auto* v = o.if_contains(key);
  return v && v->is_bool() && v->as_bool();
}

result<std::unique_ptr<block_driver>> open_quorum(open_args& a) {
  std::vector<child_ref> kids;
  for (auto& e : a.edges)
    if (e->role.rfind("children.", 0) == 0 && e->child) kids.emplace_back(e.get());
  quorum_settings s;
  s.threshold = int(get_int(a.options, "vote-threshold", 0));
  s.blkverify = get_flag(a.options, "blkverify");
  s.rewrite_corrupted = get_flag(a.options, "rewrite-corrupted");
  auto* rp = a.options.if_contains("read-pattern");
  s.fifo = rp && rp->is_string() && rp->as_string() == "fifo";
  if (auto r = check_quorum_settings(s, int(kids.size())); !r) return std::unexpected(r.error());
  auto d = std::make_unique<quorum_driver>(std::move(kids), s, a.env, a.node_name);
  d->set_next_index(unsigned(a.edges.size()));
  return std::unique_ptr<block_driver>(std::move(d));
}

}  // namespace

result<void> check_quorum_settings(quorum_settings& s, int children) {
  if (children < 1) return fail("Number of provided children must be 1 or more");
  if (s.threshold < 1) return fail("Parameter 'vote-threshold' expects a value >= 1");
  if (s.threshold > children) return fail("threshold may not exceed children count");
  if (s.fifo) {
    // QEMU reads blkverify and rewrite-corrupted only in quorum mode: with fifo they are ignored.
    s.blkverify = false;
    s.rewrite_corrupted = false;
    return {};
  }
  if (s.blkverify && (children != 2 || s.threshold != 2))
    return fail("blkverify=on can only be set if there are exactly two files and vote-threshold is 2");
  if (s.rewrite_corrupted && s.blkverify) return fail("rewrite-corrupted=on cannot be used with blkverify=on");
  return {};
}

std::unique_ptr<block_driver> make_quorum_driver(std::vector<child_ref> kids, quorum_settings s, driver_env env,
                                                 std::string name) {
  unsigned n = unsigned(kids.size());
  auto d = std::make_unique<quorum_driver>(std::move(kids), s, std::move(env), std::move(name));
  d->set_next_index(n);
  return d;
}

void register_quorum_driver() {
  driver_entry e{"quorum", false, {}, open_quorum, nullptr};
  e.child_list_roles = {"children"};
  e.options_type = "BlockdevOptionsQuorum";
  e.define_options = [](qmp::schema& s) {
    s.enumeration("QuorumReadPattern", "quorum fifo");
    s.object("BlockdevOptionsQuorum",
             "*blkverify:bool children:[BlockdevRef] vote-threshold:int *rewrite-corrupted:bool "
             "*read-pattern:QuorumReadPattern");
  };
  register_driver(std::move(e));
}

}  // namespace blockd::block

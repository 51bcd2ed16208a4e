// blkverify: every request goes to both `test` and `raw`; reads are compared and a mismatch fails the read; home iothread only.
#include <cerrno>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>

#include "protocol/qmp/schema.h"
#include "storage/block/driver.h"
#include "storage/block/iov.h"
#include "storage/block/node.h"

namespace blockd::block {
namespace {

// Deliberate difference: QEMU prints its message and exits the whole process on a mismatch; blockd
// prints the same text on stderr and fails only the request (EIO), so one bad read does not take
// every other export down.
class blkverify_driver final : public block_driver, private io_waiter {
 public:
  blkverify_driver(child_ref test, child_ref raw) : test_(test), raw_(raw) {}

  uint32_t caps() const override {
    uint32_t both = test_->driver().caps() & raw_->driver().caps();
    return (both & (cap_write_zeroes | cap_discard | cap_fua)) | (test_->driver().caps() & cap_block_status);
  }
  driver_limits limits() const override {
    driver_limits t = test_->driver().limits(), r = raw_->driver().limits();
    driver_limits l;
    l.request_alignment = std::max(std::max<uint32_t>(t.request_alignment, 1), r.request_alignment);
    l.max_transfer = t.max_transfer && r.max_transfer ? std::min(t.max_transfer, r.max_transfer)
                                                      : std::max(t.max_transfer, r.max_transfer);
    return l;
  }
  int64_t length() const override { return test_->length(); }
  image_facts facts() const override {
    auto f = test_->facts();
    return {.virtual_size = length(), .actual_size = f->actual_size, .has_dirty_flag = f->has_dirty_flag};
  }
  void debug_event(blkdebug_event e) override { test_->driver().debug_event(e); }

  void submit(io_request& r) override {
    // Flushes and block status concern the image under test only (QEMU flushes only it).
    if (r.op == io_op::flush || r.op == io_op::block_status) return send(r, nullptr, 1);
    auto* st = new pair_state;
    st->orig = &r;
    if (r.op == io_op::read) {
      // The test image reads into the caller's buffer, the reference into a bounce buffer.
      size_t align = std::max<size_t>(4096, limits().request_alignment);
      size_t n = size_t(r.length) ? (size_t(r.length) + align - 1) / align * align : align;
      st->bounce.reset(static_cast<char*>(std::aligned_alloc(align, n)));
    }
    send(r, st, 2);
  }

  void child_perm(const std::string&, bool, uint32_t node_perm, uint32_t node_shared, uint32_t& perm,
                  uint32_t& shared) const override {
    perm = node_perm;
    shared = node_shared;
  }

 private:
  struct pair_state {
    io_request* orig = nullptr;
    std::unique_ptr<char, decltype(&std::free)> bounce{nullptr, &std::free};
    int pending = 0;
    int test_result = 0, raw_result = 0;
  };

  io_request* copy_of(io_request& r) {
    io_request* c = pool_.get();
    c->op = r.op;
    c->flags = r.flags;
    c->offset = r.offset;
    c->length = r.length;
    c->iov = r.iov;
    c->iovcnt = r.iovcnt;
    c->waiter = this;
    return c;
  }

  // `st` null: one request to test, its answer passed back as it is.
  void send(io_request& r, pair_state* st, int n) {
    io_request* t = copy_of(r);
    t->tag = 0;
    t->user = st ? static_cast<void*>(st) : static_cast<void*>(&r);
    t->tag = st ? 1 : 0;
    if (!st) return test_->submit(*t);
    st->pending = n;
    io_request* w = copy_of(r);
    w->user = st;
    w->tag = 2;
    if (r.op == io_op::read) w->set_buffer(st->bounce.get(), r.length);
    test_->submit(*t);
    raw_->submit(*w);
  }

  void io_done(io_request& c) override {
    if (c.tag == 0) {
      auto& orig = *static_cast<io_request*>(c.user);
      orig.status = c.status;
      orig.status_length = c.status_length;
      orig.depth = c.depth;
      int res = c.result;
      pool_.put(&c);
      return orig.complete(res);
    }
    auto* st = static_cast<pair_state*>(c.user);
    (c.tag == 1 ? st->test_result : st->raw_result) = c.result;
    pool_.put(&c);
    if (--st->pending > 0) return;
    io_request& r = *st->orig;
    int res = verify(r, *st);
    delete st;
    r.complete(res);
  }

  static void report(const io_request& r, const std::string& what) {
    std::fprintf(stderr, "blkverify: %s offset=%" PRId64 " bytes=%" PRId64 " %s\n",
                 r.op == io_op::read ? "read" : "write", r.offset, r.length, what.c_str());
    std::fflush(stderr);
  }

  int verify(const io_request& r, const pair_state& st) {
    if (st.test_result != st.raw_result) {
      report(r, "return value mismatch " + std::to_string(st.test_result) + " != " + std::to_string(st.raw_result));
      return st.test_result ? st.test_result : -EIO;
    }
    if (st.test_result || r.op != io_op::read) return st.test_result;
    const char* ref = st.bounce.get();
    int64_t at = 0, bad = -1;
    for_each_piece(r.iov, r.iovcnt, 0, r.length, [&](char* p, int64_t k) {
      if (bad < 0 && std::memcmp(p, ref + at, size_t(k)) != 0)
        for (int64_t i = 0; i < k; ++i)
          if (p[i] != ref[at + i]) {
            bad = at + i;
            break;
          }
      at += k;
    });
    if (bad < 0) return 0;
    report(r, "contents mismatch at offset " + std::to_string(r.offset + bad));
    return -EIO;
  }

  child_ref test_, raw_;
  request_pool pool_;
};

result<std::unique_ptr<block_driver>> open_blkverify(open_args& a) {
  if (!a.find_child("test")) return fail("blkverify node needs a test child");
  if (!a.find_child("raw")) return fail("blkverify node needs a raw child");
  return std::unique_ptr<block_driver>(new blkverify_driver(child_ref(a.edge("test")), child_ref(a.edge("raw"))));
}

// QEMU names the node after its two images, "blkverify:RAW:TEST", when both have plain names.
std::string blkverify_filename(const boost::json::object& o,
                               const std::function<std::string(const std::string&)>& child_filename) {
  for (auto& kv : o)
    if (kv.key() != "test" && kv.key() != "raw") return "";
  std::string test = child_filename("test"), raw = child_filename("raw");
  if (test.empty() || raw.empty() || test.rfind("json:", 0) == 0 || raw.rfind("json:", 0) == 0) return "";
  return "blkverify:" + raw + ":" + test;
}

}  // namespace

void register_blkverify_driver() {
  driver_entry e{"blkverify", false, {"test", "raw"}, open_blkverify, nullptr};
  e.options_type = "BlockdevOptionsBlkverify";
  e.define_options = [](qmp::schema& s) { s.object("BlockdevOptionsBlkverify", "test:BlockdevRef raw:BlockdevRef"); };
  e.composite_filename = blkverify_filename;
  register_driver(std::move(e));
}

}  // namespace blockd::block

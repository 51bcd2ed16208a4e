// raw: the child's bytes as they are, optionally a window (offset, size) into it; home iothread only.
#include <cerrno>

#include "protocol/qmp/schema.h"
#include "storage/block/filter.h"

namespace blockd::block {
namespace {

// raw is a filter with a window: requests pass down shifted by the window's offset.
class raw_driver final : public filter_driver {
 public:
  raw_driver(child_ref child, int64_t offset, int64_t size, bool windowed)
      : filter_driver(child), offset_(offset), size_(size), windowed_(windowed) {}

  int64_t length() const override {
    if (size_ >= 0) return size_;
    int64_t n = child_->length() - offset_;
    return n < 0 ? 0 : n;
  }
  void submit(io_request& r) override {
    // QEMU's raw format announces its reads and writes to the node below (blkdebug acts on them).
    if (r.op == io_op::read) child_->driver().debug_event(blkdebug_event::read_aio);
    if (r.op == io_op::write) child_->driver().debug_event(blkdebug_event::write_aio);
    pass_down(r, offset_);
  }

  // offset and size may change, and the child may be replaced (the slot then holds the new one);
  // the window is checked against the child the node will have, as at open.
  result<std::unique_ptr<reopen_state>> reopen_prepare(const reopen_args& a, std::vector<std::string>& consumed) override {
    consumed = {"offset", "size"};
    node* child = a.find_child("file");
    if (!child) return fail("raw node needs a file child");
    auto w = check_window(a.options, child->length());
    if (!w) return std::unexpected(w.error());
    struct state final : reopen_state {
      raw_driver* d;
      window w;
      void child_perm(const block_driver&, const std::string&, bool, uint32_t node_perm, uint32_t node_shared,
                      uint32_t& perm, uint32_t& shared) const override {
        window_perm(w.windowed, node_perm, node_shared, perm, shared);
      }
      void commit() override {
        d->offset_ = w.offset;
        d->size_ = w.size;
        d->windowed_ = w.windowed;
      }
    };
    auto st = std::make_unique<state>();
    st->d = this;
    st->w = *w;
    return std::unique_ptr<reopen_state>(std::move(st));
  }
  std::vector<std::string> reopen_resettable() const override { return {"offset", "size"}; }

  struct window {
    int64_t offset = 0, size = -1;
    bool windowed = false;
  };
  static result<window> check_window(const boost::json::object& o, int64_t clen);

  result<void> truncate(int64_t size) override {
    if (windowed_) return fail("Cannot resize fixed-size raw disks");
    return child_->driver().truncate(size + offset_);
  }

  void child_perm(const std::string&, bool, uint32_t node_perm, uint32_t node_shared, uint32_t& perm,
                  uint32_t& shared) const override {
    window_perm(windowed_, node_perm, node_shared, perm, shared);
  }
  // A window cannot follow the child's size, so nobody may resize it underneath.
  static void window_perm(bool windowed, uint32_t node_perm, uint32_t node_shared, uint32_t& perm, uint32_t& shared) {
    perm = node_perm;
    shared = windowed ? node_shared & ~uint32_t(perm_resize) : node_shared;
  }

 private:
  int64_t offset_;
  int64_t size_;
  bool windowed_;
};

int64_t get_int(const boost::json::object& o, const char* key, int64_t dflt) {
  auto* v = o.if_contains(key);
  if (!v) return dflt;
  return v->is_uint64() ? int64_t(v->as_uint64()) : v->as_int64();
}

result<raw_driver::window> raw_driver::check_window(const boost::json::object& o, int64_t clen) {
  bool has_off = o.contains("offset"), has_size = o.contains("size");
  int64_t off = get_int(o, "offset", 0);
  int64_t size = get_int(o, "size", -1);
  if (off < 0) return fail("Parameter 'offset' expects a non-negative number below 2^64");
  if (has_size && size < 0) return fail("Parameter 'size' expects a non-negative number below 2^64");
  if (off > clen)
    return fail("Offset (" + std::to_string(off) + ") cannot be greater than size of the containing file (" +
                std::to_string(clen) + ")");
  if (has_size && off + size > clen)
    return fail("The sum of offset (" + std::to_string(off) + ") and size (" + std::to_string(size) +
                ") has to be smaller or equal to the  actual size of the containing file (" + std::to_string(clen) + ")");
  return window{off, size, has_off || has_size};
}

result<std::unique_ptr<block_driver>> open_raw(open_args& a) {
  node* child = a.find_child("file");
  if (!child) return fail("raw node needs a file child");
  auto w = raw_driver::check_window(a.options, child->length());
  if (!w) return std::unexpected(w.error());
  return std::unique_ptr<block_driver>(new raw_driver(child_ref(a.edge("file")), w->offset, w->size, w->windowed));
}

}  // namespace

void register_raw_driver() {
  driver_entry e{"raw", false, {"file"}, open_raw, nullptr};
  e.options_type = "BlockdevOptionsRaw";
  e.define_options = [](qmp::schema& s) { s.object("BlockdevOptionsRaw", "file:BlockdevRef *offset:int *size:int"); };
  register_driver(std::move(e));
}

}  // namespace blockd::block

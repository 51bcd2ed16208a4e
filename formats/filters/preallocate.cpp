// preallocate: a filter that grows its file child in large reserved steps and gives the unused tail back when it closes; home iothread only.
#include "protocol/qmp/schema.h"
#include "storage/block/filter.h"

namespace blockd::block {

namespace {

int64_t align_up(int64_t v, int64_t a) { return (v + a - 1) / a * a; }

// Formats above grow their image file through truncate() before writing past its end. Here such a
// growth reserves prealloc-size more than asked (rounded to prealloc-align) with one fallocate, so
// the file system allocates big extents instead of one cluster at a time, and the next growths fall
// inside the reservation and cost nothing. The node's length stays what was asked (data_end_); the
// file is cut back to it at close and inactivation. Only a writer that holds the file alone may do
// this (the permissions below), as in QEMU.
class preallocate_filter final : public filter_driver {
 public:
  preallocate_filter(child_ref child, int64_t align, int64_t size)
      : filter_driver(child), align_(align), size_(size), data_end_(child->length()), file_end_(data_end_) {}

  int64_t length() const override { return data_end_; }

  void child_perm(const std::string&, bool, uint32_t node_perm, uint32_t node_shared, uint32_t& perm,
                  uint32_t& shared) const override {
    perm = node_perm;
    shared = node_shared;
    if (node_perm & perm_write) {
      // Growing and cutting back the file needs it to ourselves.
      perm |= perm_resize;
      shared &= ~uint32_t(perm_write | perm_resize);
    }
  }

  result<void> truncate(int64_t size) override {
    if (size < data_end_ || !enabled_ || file_end_ < data_end_) {
      // Shrinking (or preallocation off): exactly what is asked, and the reservation goes with it.
      if (auto r = cut_back(); !r) return r;
      if (auto r = child_->driver().truncate(size); !r) return r;
      data_end_ = file_end_ = size;
      return {};
    }
    if (size <= file_end_) {
      data_end_ = size;  // inside the reservation: nothing to do
      return {};
    }
    int64_t end = align_up(size + size_, align_);
    if (auto r = child_->driver().preallocate(file_end_, end - file_end_); !r) {
      // The file system cannot reserve (tmpfs without fallocate, a device): plain growth from now on.
      enabled_ = false;
      if (auto t = child_->driver().truncate(size); !t) return t;
      data_end_ = file_end_ = size;
      return {};
    }
    file_end_ = end;
    data_end_ = size;
    return {};
  }

  void close() override { (void)cut_back(); }
  void inactivate() override { (void)cut_back(); }

  result<std::unique_ptr<reopen_state>> reopen_prepare(const reopen_args& a, std::vector<std::string>& consumed) override {
    consumed = {"prealloc-align", "prealloc-size"};
    auto o = parse(a.options, a.find_child("file"));
    if (!o) return std::unexpected(o.error());
    struct state final : reopen_state {
      preallocate_filter* f;
      int64_t align, size;
      void commit() override {
        f->align_ = align;
        f->size_ = size;
      }
    };
    auto st = std::make_unique<state>();
    st->f = this;
    st->align = o->first;
    st->size = o->second;
    return std::unique_ptr<reopen_state>(std::move(st));
  }
  std::vector<std::string> reopen_resettable() const override { return {"prealloc-align", "prealloc-size"}; }

  // prealloc-align and prealloc-size, checked as QEMU checks them (the child's alignment).
  static result<std::pair<int64_t, int64_t>> parse(const boost::json::object& o, node* child) {
    auto num = [&](const char* k, int64_t dflt) -> int64_t {
      auto* v = o.if_contains(k);
      if (!v) return dflt;
      return v->is_uint64() ? int64_t(std::min<uint64_t>(v->as_uint64(), INT64_MAX)) : v->as_int64();
    };
    int64_t align = num("prealloc-align", 1 << 20), size = num("prealloc-size", 128 << 20);
    // QSD 7.2 hangs on a zero alignment; blockd refuses it.
    if (align <= 0) return fail("prealloc-align parameter of preallocate filter must be positive");
    if (size < 0) return fail("prealloc-size parameter of preallocate filter must not be negative");
    uint32_t ra = child ? std::max<uint32_t>(1, child->driver().limits().request_alignment) : 1;
    // QEMU measures against the child's request alignment, at least a sector.
    int64_t need = std::max<int64_t>(ra, 512);
    if (align % need)
      return fail("prealloc-align parameter of preallocate filter is not aligned to " + std::to_string(need));
    return std::pair{align, size};
  }

 private:
  // The file back to the length the node shows, giving up what was reserved and never used.
  result<void> cut_back() {
    if (file_end_ <= data_end_) return {};
    if (auto r = child_->driver().truncate(data_end_); !r) return r;
    file_end_ = data_end_;
    return {};
  }

  int64_t align_, size_;
  int64_t data_end_, file_end_;
  bool enabled_ = true;
};

result<std::unique_ptr<block_driver>> open_preallocate(open_args& a) {
  node* child = a.find_child("file");
  if (!child) return fail("preallocate node needs a file child");
  auto o = preallocate_filter::parse(a.options, child);
  if (!o) return std::unexpected(o.error());
  return std::unique_ptr<block_driver>(new preallocate_filter(child_ref(a.edge("file")), o->first, o->second));
}

}  // namespace

void register_preallocate_driver() {
  driver_entry e{"preallocate", false, {"file"}, open_preallocate, nullptr};
  e.is_filter = true;
  e.weak_options = {"prealloc-align", "prealloc-size"};
  e.options_type = "BlockdevOptionsPreallocate";
  e.define_options = [](qmp::schema& s) {
    s.object("BlockdevOptionsPreallocate", "file:BlockdevRef *prealloc-align:int *prealloc-size:int");
  };
  register_driver(std::move(e));
}

}  // namespace blockd::block

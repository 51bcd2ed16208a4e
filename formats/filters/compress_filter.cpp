// compress: a filter that stores every write as compressed clusters of the format below it (qcow2); home iothread only.
#include "protocol/qmp/schema.h"
#include "storage/block/filter.h"

namespace blockd::block {
namespace {

// Writes pass down with io_compress; the node below refuses them unless its driver stores
// compressed clusters. Requests are aligned to the child's cluster size (the format compresses
// whole clusters), which NBD clients learn as the export's minimum block size. Like QEMU's filter,
// it is meant for images written once (a conversion or backup target): the format refuses to
// compress over a cluster that already holds data.
class compress_filter final : public filter_driver {
 public:
  compress_filter(child_ref child, uint32_t align) : filter_driver(child), align_(align) {}

  driver_limits limits() const override {
    driver_limits l = child_->driver().limits();
    l.request_alignment = std::max(l.request_alignment, align_);
    return l;
  }
  void submit(io_request& r) override { pass_down(r, 0, r.op == io_op::write ? uint32_t(io_compress) : 0u); }

 private:
  uint32_t align_;
};

result<std::unique_ptr<block_driver>> open_compress(open_args& a) {
  node* child = a.find_child("file");
  if (!child) return fail("compress node needs a file child");
  if (!(child->driver().caps() & cap_compress))
    return fail("Compression is not supported for underlying format: " + child->settings().driver);
  int64_t cs = child->facts()->cluster_size;
  uint32_t align = cs > 0 && cs <= (int64_t(1) << 30) ? uint32_t(cs) : 1;
  return std::unique_ptr<block_driver>(new compress_filter(child_ref(a.edge("file")), align));
}

}  // namespace

void register_compress_driver() {
  driver_entry e{"compress", false, {"file"}, open_compress, nullptr};
  e.is_filter = true;
  e.options_type = "BlockdevOptionsGenericFormat";
  e.define_options = [](qmp::schema& s) { s.object("BlockdevOptionsGenericFormat", "file:BlockdevRef"); };
  register_driver(std::move(e));
}

}  // namespace blockd::block

// The qcow2 driver's backing file name in the header (change-backing-file); home iothread only, node drained.
#include "formats/qcow2/driver_impl.h"

namespace blockd::qcow2 {
namespace impl {

// Only the header changes: the node keeps reading through the backing child it has, as in QEMU,
// where the new name takes effect when the image is next opened.
result<void> qcow2_driver::change_backing_file(const std::string& file, const std::string& format) {
  if (read_only_ || corrupt_) return fail("Read-only file system");
  if (file.size() > max_backing_name) return fail("Invalid argument");
  std::string old_file = h_.backing_file, old_format = h_.backing_format;
  h_.backing_file = file;
  h_.backing_format = format;
  int r = run_sync([](qcow2_driver* d) -> task<int> {
    int rc = co_await d->write_header();
    if (rc >= 0) rc = co_await d->io(*d->file_, io_op::flush, 0, 0);
    co_return rc;
  }(this));
  if (r < 0) {
    // The header did not fit in its cluster (or could not be written): the old name stays.
    h_.backing_file = std::move(old_file);
    h_.backing_format = std::move(old_format);
    return fail(r == -EINVAL ? "No space left on device" : std::strerror(-r));
  }
  return {};
}

}  // namespace impl
}  // namespace blockd::qcow2

// One data-path request (read, write, zeroes, discard, flush, block status) and its pool; home iothread only.
#pragma once
#include <sys/uio.h>

#include <cstdint>
#include <memory>
#include <vector>

namespace blockd::block {

enum class io_op : uint8_t { read, write, write_zeroes, discard, flush, block_status };

enum io_flag : uint32_t {
  io_fua = 1u << 0,          // write/zeroes: durable before completion
  io_may_unmap = 1u << 1,    // write_zeroes: the range may be deallocated
  io_no_fallback = 1u << 2,  // write_zeroes: fail with -ENOTSUP instead of writing zero buffers
  // Issued by a parent driver's control path (open, close, reopen, snapshot) while the node may be
  // quiesced for that very change: it bypasses the quiesce hold. The node strips it before its driver.
  io_control = 1u << 3,
};

// Block-status answer bits (the NBD base:allocation view plus QEMU's allocation depth needs).
enum bs_flag : uint32_t {
  bs_data = 1u << 0,       // the range holds data (reads may return non-zero)
  bs_zero = 1u << 1,       // the range reads as zeroes
  bs_allocated = 1u << 2,  // allocated in this node (not inherited from a backing file)
};

struct io_request;

// Whoever submitted a request is told exactly once, on the home iothread, never from inside submit().
struct io_waiter {
  virtual void io_done(io_request& r) = 0;

 protected:
  ~io_waiter() = default;
};

struct io_request {
  io_op op = io_op::read;
  uint32_t flags = 0;
  int64_t offset = 0;
  int64_t length = 0;
  // read/write payload: a scatter list covering `length` bytes. `one` serves single-buffer requests.
  const iovec* iov = nullptr;
  int iovcnt = 0;
  iovec one{};
  // results
  int result = 0;              // 0 or -errno
  uint32_t status = 0;         // block_status: bs_* of the first extent
  int64_t status_length = 0;   // block_status: length of that extent (<= length)
  int depth = 0;               // block_status: 1 = allocated here, 2 = in the first backing file, ...
  io_waiter* waiter = nullptr;
  io_waiter* outer = nullptr;  // reserved for the node layer (the submitter's waiter while in the node)
  uint64_t tag = 0;            // free for the submitter
  void* user = nullptr;        // free for the submitter
  int64_t start_ns = 0;        // set by the node for accounting
  bool unaccounted = false;    // reserved for the node layer
  bool fua_emulated = false;   // reserved for the node layer: FUA it adds a flush for (no cap_fua)
  bool hooked = false;         // reserved for the node layer: a write its hooks see complete
  uint8_t hook_pos = 0;        // reserved for the node layer: the gating hook holding it
  io_request* next_free = nullptr;

  void set_buffer(void* buf, int64_t len) {
    one.iov_base = buf;
    one.iov_len = static_cast<size_t>(len);
    iov = &one;
    iovcnt = 1;
    length = len;
  }
  void complete(int res) {
    result = res;
    waiter->io_done(*this);
  }
};

// Free list of requests, grown in chunks; never shrinks, never fails (a full pool grows: the number
// of live requests is bounded by the submitters' queue depths, not here).
class request_pool {
 public:
  io_request* get() {
    if (!free_) grow();
    io_request* r = free_;
    free_ = r->next_free;
    *r = io_request{};
    ++live_;
    return r;
  }
  void put(io_request* r) {
    r->next_free = free_;
    free_ = r;
    --live_;
  }
  size_t live() const { return live_; }

 private:
  void grow() {
    auto chunk = std::make_unique<io_request[]>(64);
    for (int i = 0; i < 64; ++i) {
      chunk[i].next_free = free_;
      free_ = &chunk[i];
    }
    chunks_.push_back(std::move(chunk));
  }
  std::vector<std::unique_ptr<io_request[]>> chunks_;
  io_request* free_ = nullptr;
  size_t live_ = 0;
};

}  // namespace blockd::block

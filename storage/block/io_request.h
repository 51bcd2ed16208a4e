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
  // write: store the data compressed (qcow2 compressed clusters). Only to drivers with cap_compress;
  // whole clusters, or the image's last partial one. Set by the compress filter and by backup.
  io_compress = 1u << 4,
  // read: copy what the read finds in backing files into this image on the way (copy-on-read), under
  // the format's own locks so no write races the copy. Only to drivers with cap_copy_on_read; the
  // node drops it for others (they have no backing files to copy from).
  io_copy_up = 1u << 5,
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
  uint64_t tag = 0;            // free for the submitter
  void* user = nullptr;        // free for the submitter

  // The layers the request is passing through (nodes, filter drivers), innermost last. Each keeps
  // here what it changes (waiter, offset, flags, op) and its own per-request state, and puts the
  // request back as it got it on the way out, so one request object serves a whole chain of
  // layers with nothing allocated per layer. A pass-through layer that finds fewer than
  // `layers_reserve` free entries copies the request instead (filter_driver does), so a node
  // always has room for its own.
  struct layer {
    layer() {}  // left uninitialised: push() fills what it uses
    io_waiter* waiter;  // the layer above, told when this layer is done
    void* user;         // the layer's own word
    int64_t offset;     // as the layer above sent them
    uint32_t flags;
    io_op op;
    // Node layers: accounting start and the node's per-request marks.
    bool unaccounted, fua_emulated, hooked;
    uint8_t hook_pos;  // the gating hook holding the write
    int64_t start_ns;
  };
  static constexpr int max_layers = 12;
  static constexpr int layers_reserve = 2;  // a filter's own layer and its child node's
  layer layers[max_layers];
  uint8_t nlayers = 0;
  bool layer_room() const { return nlayers + layers_reserve <= max_layers; }
  layer& push_layer(io_waiter* self) {
    layer& l = layers[nlayers++];
    l.waiter = waiter;
    l.user = nullptr;
    l.offset = offset;
    l.flags = flags;
    l.op = op;
    l.unaccounted = l.fua_emulated = l.hooked = false;
    l.hook_pos = 0;
    l.start_ns = 0;
    waiter = self;
    return l;
  }
  layer& top_layer() { return layers[nlayers - 1]; }
  // Back to what the layer above sent (results stay); the caller then tells `waiter`.
  void pop_layer() {
    layer& l = layers[--nlayers];
    waiter = l.waiter;
    offset = l.offset;
    flags = l.flags;
    op = l.op;
  }
  io_request* next_free = nullptr;

  // A fresh request (the pool's get): every field but the layer entries, which push_layer fills.
  void reset() {
    op = io_op::read;
    flags = 0;
    offset = 0;
    length = 0;
    iov = nullptr;
    iovcnt = 0;
    one = {};
    result = 0;
    status = 0;
    status_length = 0;
    depth = 0;
    waiter = nullptr;
    tag = 0;
    user = nullptr;
    nlayers = 0;
  }
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
    r->reset();
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

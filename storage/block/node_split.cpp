// A node's write_zeroes and discard cut to its driver's opt/max limits (QEMU's bdrv_co_do_pwrite_zeroes and bdrv_co_pdiscard); home iothread only.
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>

#include "storage/block/node.h"

namespace blockd::block {

namespace {
constexpr int64_t max_zero_bounce = int64_t(16) << 20;  // QEMU's MAX_WRITE_ZEROES_BOUNCE_BUFFER
int64_t align_down(int64_t v, int64_t a) { return v / a * a; }
int64_t min_nonzero(int64_t a, int64_t b) { return !a ? b : !b ? a : std::min(a, b); }
struct free_deleter {
  void operator()(void* p) const { std::free(p); }
};
}  // namespace

// One request's walk over its range, piece by piece, one piece in the driver at a time (QEMU's
// loop is sequential too, and the order of pieces is what blkdebug rules and logs observe). The
// cut follows QEMU's: a head piece up to the first `align` boundary, the aligned bulk in pieces of
// at most `max`, and the tail from the last boundary. A write_zeroes piece the driver refuses with
// -ENOTSUP (blkdebug does for pieces below its alignment) is written as zero buffers unless the
// request says io_no_fallback; a discard piece it refuses is skipped, discard being advisory.
struct node::split_job final : io_waiter {
  node* owner = nullptr;
  io_request* orig = nullptr;
  io_request* piece = nullptr;
  bool zeroes = false;
  int64_t offset = 0, bytes = 0;  // what is left
  int64_t head = 0, tail = 0;     // QEMU's running head/tail remainders
  int64_t align = 1, max = 0, ra = 1, max_transfer = 0;
  int64_t num = 0;        // the current piece's length
  bool fallback = false;  // the current piece is the zero-buffer write of a refused one
  std::unique_ptr<char, free_deleter> zeros;
  int64_t zeros_len = 0;

  void next() {
    if (bytes <= 0) return end(0);
    num = bytes;
    if (zeroes) {
      if (head) {
        // Limited to max_transfer too, so a fallback write covers it in one go.
        num = std::min({bytes, max_transfer, align - head});
        head = (head + num) % align;
      } else if (tail && num > align) {
        num -= tail;
      }
    } else if (head) {
      num = std::min(bytes, align - head);
      if (num % ra) num %= ra;  // the part below the driver's own alignment first
      head = (head + num) % align;
    } else if (tail) {
      if (num > align) {
        num -= tail;
      } else if (tail % ra && tail > ra) {
        tail %= ra;
        num -= tail;
      }
    }
    num = std::min(num, max);
    send(zeroes ? io_op::write_zeroes : io_op::discard, orig->flags);
  }

  void send(io_op op, uint32_t flags) {
    io_request& p = *piece;
    p.reset();
    p.op = op;
    p.flags = flags;
    p.offset = offset;
    p.length = num;
    p.waiter = this;
    if (op == io_op::write) p.set_buffer(zeros.get(), num);
    owner->drv_->submit(p);
  }

  void io_done(io_request& p) override {
    int res = p.result;
    if (zeroes && !fallback && res == -ENOTSUP && !(orig->flags & io_no_fallback)) return write_zeros();
    fallback = false;
    if (res && !zeroes) {
      // Discard is advisory: a refused piece, or a rejected unaligned head or tail, is left as it is.
      if (res == -ENOTSUP || (res == -EINVAL && (offset % align || num % align))) res = 0;
    }
    if (res) return end(res);
    offset += num;
    bytes -= num;
    next();
  }

  // The refused piece as a plain write of zeroes, at most max_transfer of it (the rest is the next
  // piece's). Only where the driver takes a write there: its alignment (QEMU pads the whole request
  // to it first; blockd's node leaves an unaligned write_zeroes to the driver, so it can only get here
  // for one that was unaligned to begin with, which then fails as the driver answered).
  void write_zeros() {
    num = std::min(num, max_transfer);
    if (offset % ra || num % ra) return end(-ENOTSUP);
    if (zeros_len < num) {
      int64_t n = (num + 4095) / 4096 * 4096;
      zeros.reset(static_cast<char*>(std::aligned_alloc(4096, size_t(n))));
      if (!zeros) return end(-ENOMEM);
      std::memset(zeros.get(), 0, size_t(n));
      zeros_len = n;
    }
    fallback = true;
    send(io_op::write, orig->flags & io_fua);
  }

  void end(int res) {
    node* n = owner;
    io_request* r = orig;
    n->pool_.put(piece);
    delete this;
    r->result = res;
    n->io_done(*r);
  }
};

void node::split_to_driver(io_request& r, const driver_limits& l) {
  auto* j = new split_job;
  j->owner = this;
  j->orig = &r;
  j->piece = pool_.get();
  j->zeroes = r.op == io_op::write_zeroes;
  j->offset = r.offset;
  j->bytes = r.length;
  j->ra = std::max<int64_t>(1, l.request_alignment);
  j->align = std::max(j->zeroes ? l.opt_write_zeroes : l.opt_discard, j->ra);
  int64_t max = (j->zeroes ? l.max_write_zeroes : l.max_discard);
  j->max = align_down(max ? max : std::numeric_limits<int64_t>::max(), j->align);
  if (j->max <= 0) j->max = j->align;
  j->max_transfer = align_down(min_nonzero(l.max_transfer, max_zero_bounce), j->ra);
  if (j->max_transfer <= 0) j->max_transfer = j->ra;
  j->head = j->offset % j->align;
  j->tail = (j->offset + j->bytes) % j->align;
  j->next();
}

}  // namespace blockd::block

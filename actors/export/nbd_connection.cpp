// NBD transmission: requests from the socket to the node actor by pointer, replies batched back; runs only on the export's home iothread.
#include "actors/export/nbd_connection.h"

#include <caf/all.hpp>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "actors/node/node_actor.h"
#include "protocol/nbd/bitmap_extents.h"
#include "protocol/nbd/wire.h"

namespace blockd {
namespace {

using finish_atom = caf::atom_constant<caf::atom("nbdfinish")>;
using handed_atom = caf::atom_constant<caf::atom("nbdhanded")>;

constexpr size_t in_buffer_size = 256u << 10;
// QEMU serves at most 16 requests of one client at once; blockd allows 64 so deep queues keep the
// node busy, and stops reading the socket beyond that (the client's own queue then waits).
constexpr size_t max_in_flight = 64;
// Payloads up to this size are copied into the batched reply buffer (a small copy costs less than
// an iovec entry); larger ones are sent from their own buffer, gathered with the headers.
constexpr size_t copy_limit = 4u << 10;
// Write payloads at least this large are received into their own buffer; while they come, the
// request stream is read in windows of header_window bytes.
constexpr uint64_t direct_payload_min = 32u << 10;
constexpr size_t header_window = 4u << 10;
// Plaintext encrypted per TLS batch: bounds the ciphertext buffered per client.
constexpr size_t tls_batch_max = 1u << 20;
// Segments in one gathered send (IOV_MAX is 1024).
constexpr size_t max_send_iov = 256;
// Structured reads at least this large ask for block status first, to send holes as hole chunks.
constexpr uint64_t sparse_read_min = 64u << 10;
// Extents per context in one BLOCK_STATUS reply (QEMU allows 128 Ki; clients ask again for the rest).
constexpr size_t max_extents = 1024;
constexpr size_t keep_buffer_max = 1u << 20;

}  // namespace

struct nbd_connection::op {
  nbd::request req;
  uint8_t* buf = nullptr;
  size_t cap = 0;
  block::io_request* io = nullptr;
  int phase = 0;  // read: 0 = block status, 1 = data; trim: 1 = the FUA flush
  // block status
  uint64_t pos = 0, end = 0;
  bool want_base = false, want_depth = false;
  std::vector<uint8_t> want_bitmaps;  // per exported bitmap: its context is asked for
  std::vector<nbd::extent> base, depth;

  ~op() { std::free(buf); }
  bool reserve(size_t n) {
    if (cap >= n && cap <= keep_buffer_max) return true;
    std::free(buf);
    cap = (std::max<size_t>(n, 4096) + 4095) & ~size_t(4095);
    buf = static_cast<uint8_t*>(std::aligned_alloc(4096, cap));
    if (!buf) cap = 0;
    return buf != nullptr;
  }
};

void nbd_connection::io_cb::complete(int res) {
  if (is_recv) self->on_recv(res);
  else self->on_send(res);
}

nbd_connection::nbd_connection(caf::actor_config& cfg, iothread* home, nbd_client_setup setup)
    : caf::event_based_actor(cfg), home_(home), s_(std::move(setup)), reactor_(home->reactor()) {
  recv_cb_.self = send_cb_.self = this;
  recv_cb_.is_recv = true;
  in_.resize(in_buffer_size);
}

nbd_connection::~nbd_connection() {
  if (s_.fd >= 0) ::close(s_.fd);
}

caf::behavior nbd_connection::make_behavior() {
  // Exit messages (a link, the system shutting down) must not drop the actor while the ring or the
  // node still hold pointers into it: they start the same orderly close as a hard export delete.
  set_exit_handler([this](const caf::exit_msg&) { begin_close("export shutting down"); });
  if (s_.tls && !s_.pending_out.empty()) tls_wire_.push_back(std::move(s_.pending_out));  // encrypted already
  else if (!s_.pending_out.empty()) queue_bytes(s_.pending_out);
  // A client handed over in the middle of a write brings its payload so far: the buffer takes it all.
  if (s_.leftover_in.size() > in_.size()) in_.resize(s_.leftover_in.size());
  size_t n = s_.leftover_in.size();
  std::memcpy(in_.data(), s_.leftover_in.data(), n);
  in_end_ = n;
  s_.leftover_in.clear();
  flush_out();
  pump_input();
  return {
      [this](close_atom) { begin_close("export removed"); },
      [this](handed_atom) {
        handoff_rp_.deliver(std::move(handed_));
        quit();
      },
      [this](handoff_atom) -> caf::result<nbd_client_setup> {
        if (closing_ || draining_ || handoff_) return caf::make_error(caf::sec::request_receiver_down);
        handoff_ = true;
        handoff_rp_ = make_response_promise();
        auto rp = handoff_rp_;
        try_handoff();
        return rp;
      },
      [this](finish_atom) {
        if (s_.fd >= 0) ::close(s_.fd);
        s_.fd = -1;
        send(s_.supervisor, nbd_gone_atom::value, s_.export_id, s_.client_id);
        quit();
      },
  };
}

// ---- input ----------------------------------------------------------------------------------

void nbd_connection::post_recv() {
  if (recv_pending_ || closing_ || gone_) return;
  if (handoff_) return try_handoff();  // input waits for the next home
  recv_pending_ = true;
  if (s_.tls) {
    // Ciphertext only: pump_loop takes plaintext out of the session through tls_fill().
    if (cin_.empty()) cin_.resize(64u << 10);
    reactor_.recv(s_.fd, cin_.data(), cin_.size(), &recv_cb_);
    return;
  }
  if (payload_op_ && !payload_drop_) {
    size_t left = size_t(payload_op_->req.length - payload_got_);
    reactor_.recv(s_.fd, payload_op_->buf + payload_got_, left, &recv_cb_);
    return;
  }
  if (payload_op_ && payload_drop_) {
    if (drop_buf_.empty()) drop_buf_.resize(64u << 10);
    size_t left = size_t(std::min<uint64_t>(payload_op_->req.length - payload_got_, drop_buf_.size()));
    reactor_.recv(s_.fd, drop_buf_.data(), left, &recv_cb_);
    return;
  }
  if (in_start_ > 0) {
    // Keep the unparsed tail at the front so a header never wraps.
    std::memmove(in_.data(), in_.data() + in_start_, in_end_ - in_start_);
    in_end_ -= in_start_;
    in_start_ = 0;
  }
  // After a large write, the next one is likely large too: take little more than its header, so
  // its payload is received straight into its own buffer rather than copied out of this one.
  size_t room = in_.size() - in_end_;
  if (big_payloads_) room = std::min(room, header_window);
  reactor_.recv(s_.fd, in_.data() + in_end_, room, &recv_cb_);
}

void nbd_connection::on_recv(int res) {
  recv_pending_ = false;
  if (closing_) return maybe_finish();
  if (handoff_ && res == -ECANCELED) return try_handoff();
  if (res <= 0) {
    // The client hung up (or the socket failed): finish what is in flight, then close.
    draining_ = true;
    begin_close(res == 0 ? "client closed the connection" : "receive failed");
    return;
  }
  if (s_.tls) s_.tls->feed(cin_.data(), size_t(res));
  else if (payload_op_) payload_got_ += uint64_t(res);
  else in_end_ += size_t(res);
  pump_input();
}

void nbd_connection::pump_input() {
  // A reply sent from inside this loop may free a slot and call back in: the running loop goes on.
  if (pumping_ || gone_) return;
  pumping_ = true;
  pump_loop();
  pumping_ = false;
  try_handoff();
}

void nbd_connection::pump_loop() {
  while (!closing_ && !draining_) {
    if (payload_op_) {
      // Bytes of the payload already buffered behind the header are taken first (the one copy).
      uint64_t want = payload_op_->req.length - payload_got_;
      size_t avail = std::min<uint64_t>(in_end_ - in_start_, want);
      if (avail) {
        if (!payload_drop_) std::memcpy(payload_op_->buf + payload_got_, in_.data() + in_start_, avail);
        in_start_ += avail;
        payload_got_ += avail;
      }
      if (payload_got_ < payload_op_->req.length) {
        if (s_.tls && tls_fill()) continue;
        return post_recv();
      }
      op* o = payload_op_;
      payload_op_ = nullptr;
      if (payload_drop_) {
        payload_drop_ = false;
        // The request was refused; its payload is consumed, the stream stays in step.
        auto chk = nbd::check_request(o->req, s_.xs);
        reply_error(o, chk.error, chk.message);
      } else {
        dispatch(o);
      }
      continue;
    }
    if (handoff_) return;  // pump_input hands off once this loop is left
    if (in_flight_ >= max_in_flight) return;  // resumed when a reply goes out
    nbd::request r;
    size_t used = 0;
    auto st = nbd::parse_request(in_.data() + in_start_, in_end_ - in_start_, s_.xs.mode, r, used);
    if (st == nbd::parse_status::need_more) {
      if (s_.tls && tls_fill()) continue;
      return post_recv();
    }
    if (st == nbd::parse_status::bad_magic) return begin_close("bad request magic");
    in_start_ += used;
    auto chk = nbd::check_request(r, s_.xs);
    if (chk.disc) {
      draining_ = true;
      maybe_finish();
      return;
    }
    op* o = get_op();
    o->req = r;
    ++in_flight_;
    if (chk.error && chk.disconnect) {
      // The payload cannot be read: answer, then hang up once the answer is out.
      reply_error(o, chk.error, chk.message);
      draining_ = true;
      maybe_finish();
      return;
    }
    if (chk.payload > 0) {
      if (!chk.error && !o->reserve(size_t(chk.payload))) {
        reply_error(o, nbd::e_nomem, "cannot allocate the payload buffer");
        draining_ = true;
        maybe_finish();
        return;
      }
      payload_op_ = o;
      payload_got_ = 0;
      payload_drop_ = chk.error != 0;
      big_payloads_ = chk.payload >= direct_payload_min;
      continue;
    }
    big_payloads_ = false;
    if (chk.error) {
      reply_error(o, chk.error, chk.message);
      continue;
    }
    dispatch(o);
  }
}

// ---- requests -------------------------------------------------------------------------------

nbd_connection::op* nbd_connection::get_op() {
  if (free_ops_.empty()) {
    ops_.push_back(std::make_unique<op>());
    free_ops_.push_back(ops_.back().get());
  }
  op* o = free_ops_.back();
  free_ops_.pop_back();
  o->phase = 0;
  o->io = nullptr;
  return o;
}

void nbd_connection::put_op(op* o) {
  free_ops_.push_back(o);
  --in_flight_;
  if (!recv_pending_ && !payload_op_ && !draining_ && !closing_ && in_flight_ + 1 == max_in_flight) pump_input();
  maybe_finish();
  try_handoff();
}

void nbd_connection::submit(op* o, block::io_op kind, uint64_t off, uint64_t len, uint32_t flags) {
  block::io_request* r = pool_.get();
  r->op = kind;
  r->flags = flags;
  r->offset = int64_t(off);
  r->length = int64_t(len);
  if (kind == block::io_op::read || kind == block::io_op::write) r->set_buffer(o->buf, int64_t(len));
  r->waiter = this;
  r->user = o;
  o->io = r;
  send(s_.node, io_atom::value, io_request_ref{r});
}

void nbd_connection::dispatch(op* o) {
  const auto& q = o->req;
  bool fua = (q.flags & nbd::cf_fua) || s_.writethrough;
  switch (q.type) {
    case nbd::cmd_read:
      if (q.length == 0) {
        // Nothing to read: a data chunk may not be empty, so structured replies end with a NONE chunk.
        std::string out;
        nbd::put_read_done(out, s_.xs.mode, q.cookie, q.offset);
        queue_bytes(out);
        put_op(o);
        return flush_out();
      }
      if (!o->reserve(size_t(q.length))) return reply_error(o, nbd::e_nomem, "cannot allocate the read buffer");
      if (s_.xs.mode != nbd::reply_mode::simple && !(q.flags & nbd::cf_df) && s_.sparse_reads &&
          q.length >= sparse_read_min) {
        o->phase = 0;
        return submit(o, block::io_op::block_status, q.offset, q.length, 0);
      }
      o->phase = 1;
      return submit(o, block::io_op::read, q.offset, q.length, 0);
    case nbd::cmd_write:
      return submit(o, block::io_op::write, q.offset, q.length, fua ? uint32_t(block::io_fua) : 0u);
    case nbd::cmd_flush: return submit(o, block::io_op::flush, 0, 0, 0);
    case nbd::cmd_trim: return submit(o, block::io_op::discard, q.offset, q.length, 0);
    case nbd::cmd_write_zeroes: {
      uint32_t f = fua ? uint32_t(block::io_fua) : 0u;
      if (!(q.flags & nbd::cf_no_hole)) f |= block::io_may_unmap;
      if (q.flags & nbd::cf_fast_zero) f |= block::io_no_fallback;
      return submit(o, block::io_op::write_zeroes, q.offset, q.length, f);
    }
    case nbd::cmd_cache:
      // A prefetch hint: blockd keeps no read cache of its own to fill.
      return reply_done(o);
    case nbd::cmd_block_status: {
      if (s_.contexts.count() == 0) return reply_error(o, nbd::e_inval, "CMD_BLOCK_STATUS not negotiated");
      o->want_base = s_.contexts.base_allocation;
      o->want_depth = s_.contexts.allocation_depth;
      o->want_bitmaps.assign(s_.contexts.bitmaps.begin(), s_.contexts.bitmaps.end());
      o->want_bitmaps.resize(s_.bitmaps.size(), 0);  // the handshake offered exactly these
      uint64_t len = q.length;
      if (s_.xs.mode == nbd::reply_mode::extended && (q.flags & nbd::cf_payload_len)) {
        nbd::block_status_payload p;
        if (!nbd::parse_block_status_payload(o->buf, size_t(q.length), p))
          return reply_error(o, nbd::e_inval, "invalid block status payload");
        len = p.effect_length;
        if (q.offset > s_.xs.size || len > s_.xs.size - q.offset)
          return reply_error(o, nbd::e_inval, "operation past EOF");
        // The client names the negotiated contexts it wants this time.
        bool b = false, d = false;
        std::vector<uint8_t> chosen(o->want_bitmaps.size(), 0);
        for (uint32_t id : p.ids) {
          b = b || id == nbd::meta_id_base_allocation;
          d = d || id == nbd::meta_id_allocation_depth;
          if (id >= nbd::meta_id_dirty_bitmap && id - nbd::meta_id_dirty_bitmap < chosen.size())
            chosen[id - nbd::meta_id_dirty_bitmap] = 1;
        }
        o->want_base = o->want_base && b;
        o->want_depth = o->want_depth && d;
        bool any_bitmap = false;
        for (size_t i = 0; i < chosen.size(); ++i) {
          o->want_bitmaps[i] = o->want_bitmaps[i] && chosen[i];
          any_bitmap = any_bitmap || o->want_bitmaps[i];
        }
        if (!o->want_base && !o->want_depth && !any_bitmap)
          return reply_error(o, nbd::e_inval, "no negotiated context selected");
      }
      // A reply must describe at least one byte (QEMU refuses the request, with its text).
      if (len == 0) return reply_error(o, nbd::e_inval, "need non-zero length");
      o->pos = q.offset;
      o->end = q.offset + len;
      o->base.clear();
      o->depth.clear();
      // Bitmap contexts alone need nothing from the node: the bitmaps answer at once.
      if (!o->want_base && !o->want_depth) return finish_block_status(o);
      return step_block_status(o);
    }
  }
  reply_error(o, nbd::e_inval, "invalid request type (" + std::to_string(q.type) + ") received");
}

void nbd_connection::step_block_status(op* o) { submit(o, block::io_op::block_status, o->pos, o->end - o->pos, 0); }

void nbd_connection::finish_block_status(op* o) {
  // One chunk per context in id order (QEMU's order); the last one carries DONE.
  size_t left = size_t(o->want_base) + size_t(o->want_depth);
  for (uint8_t w : o->want_bitmaps) left += w;
  std::string out;
  if (o->want_base)
    nbd::put_block_status(out, s_.xs.mode, o->req.cookie, o->req.offset, nbd::meta_id_base_allocation, o->base,
                          --left == 0);
  if (o->want_depth)
    nbd::put_block_status(out, s_.xs.mode, o->req.cookie, o->req.offset, nbd::meta_id_allocation_depth, o->depth,
                          --left == 0);
  // The bitmaps are read now, on the home where writes dirty them: a write that completed before
  // this point shows, one still in flight may or may not (as with QEMU).
  bool one = o->req.flags & nbd::cf_req_one;
  bool extended = s_.xs.mode == nbd::reply_mode::extended;
  for (size_t i = 0; i < o->want_bitmaps.size(); ++i) {
    if (!o->want_bitmaps[i]) continue;
    bitmap_scratch_.clear();
    nbd::bitmap_extents(*s_.bitmaps[i], o->req.offset, o->end - o->req.offset, one ? 1 : nbd::max_bitmap_extents,
                        extended, bitmap_scratch_);
    nbd::put_block_status(out, s_.xs.mode, o->req.cookie, o->req.offset, nbd::meta_id_dirty_bitmap + uint32_t(i),
                          bitmap_scratch_, --left == 0);
  }
  queue_bytes(out);
  put_op(o);
  flush_out();
}

void nbd_connection::io_done(block::io_request& r) {
  op* o = static_cast<op*>(r.user);
  int res = r.result;
  block::io_op kind = r.op;
  uint32_t status = r.status;
  int64_t status_len = r.status_length;
  int depth = r.depth;
  pool_.put(&r);
  o->io = nullptr;
  if (closing_) {
    // The socket is gone: nothing to answer.
    put_op(o);
    return;
  }
  const auto& q = o->req;
  if (res < 0) {
    const char* what = "I/O failed";
    switch (kind) {
      case block::io_op::read: what = "reading from file failed"; break;
      case block::io_op::write:
      case block::io_op::write_zeroes: what = "writing to file failed"; break;
      case block::io_op::flush: what = "flush failed"; break;
      case block::io_op::discard: what = "discard failed"; break;
      case block::io_op::block_status: what = "can't get block status"; break;
    }
    if (kind == block::io_op::block_status && q.type == nbd::cmd_read) {
      // Block status is only an optimisation of the read: fall back to reading the data.
      o->phase = 1;
      return submit(o, block::io_op::read, q.offset, q.length, 0);
    }
    return reply_error(o, nbd::errno_to_nbd(res), what);
  }
  switch (q.type) {
    case nbd::cmd_read: {
      if (o->phase == 0) {
        if (status_len >= int64_t(q.length) && (status & block::bs_zero)) {
          std::string out;
          nbd::put_hole(out, s_.xs.mode, q.cookie, q.offset, uint32_t(q.length), true);
          queue_bytes(out);
          put_op(o);
          return flush_out();
        }
        o->phase = 1;
        return submit(o, block::io_op::read, q.offset, q.length, 0);
      }
      std::string hdr;
      nbd::put_read_header(hdr, s_.xs.mode, q.cookie, q.offset, q.length, true);
      queue_bytes(hdr);
      queue_data(o->buf, size_t(q.length), o);
      return flush_out();
    }
    case nbd::cmd_trim:
      if (o->phase == 0 && ((q.flags & nbd::cf_fua) || s_.writethrough)) {
        o->phase = 1;
        return submit(o, block::io_op::flush, 0, 0, 0);
      }
      return reply_done(o);
    case nbd::cmd_block_status: {
      uint64_t len = std::max<int64_t>(status_len, 1);
      len = std::min(len, o->end - o->pos);
      uint32_t bf = ((status & block::bs_data) ? 0 : nbd::state_hole) | ((status & block::bs_zero) ? nbd::state_zero : 0);
      auto add = [](std::vector<nbd::extent>& v, uint64_t l, uint32_t f) {
        if (!v.empty() && v.back().flags == f && v.back().length + l <= 0xffffffffull - 511) v.back().length += l;
        else v.push_back({l, f});
      };
      add(o->base, len, bf);
      add(o->depth, len, uint32_t(std::max(depth, 0)));
      o->pos += len;
      bool one = q.flags & nbd::cf_req_one;
      bool full = o->base.size() >= max_extents || o->depth.size() >= max_extents;
      // REQ_ONE: one extent per context, each its own first run, merged over as many node answers as
      // keep the same flags (as QEMU reports it); the first change of flags ends it.
      bool one_done = one && (o->base.size() > 1 || o->depth.size() > 1);
      if (one_done || full || o->pos >= o->end) {
        // A stop at the extent cap leaves both contexts covering the same prefix of the range; the
        // client asks again for the rest.
        if (one) {
          o->base.resize(1);
          o->depth.resize(1);
        }
        return finish_block_status(o);
      }
      return step_block_status(o);
    }
    default: return reply_done(o);
  }
}

// ---- replies --------------------------------------------------------------------------------

void nbd_connection::reply_error(op* o, uint32_t err, const std::string& msg) {
  // A failed simple read carries no data: the client knows the length from its own request.
  std::string out;
  nbd::put_error(out, s_.xs.mode, o->req.cookie, o->req.offset, err, msg);
  queue_bytes(out);
  put_op(o);
  flush_out();
}

void nbd_connection::reply_done(op* o) {
  std::string out;
  nbd::put_done(out, s_.xs.mode, o->req.cookie, o->req.offset);
  queue_bytes(out);
  put_op(o);
  flush_out();
}

void nbd_connection::queue_bytes(const std::string& b) {
  // Appends to the last batch unless that batch is being sent right now (its buffer must not move).
  bool can_append = !outq_.empty() && !outq_.back().data && outq_.size() > segs_in_flight_;
  if (can_append) outq_.back().bytes += b;
  else outq_.push_back(seg{b});
}

void nbd_connection::queue_data(const uint8_t* p, size_t n, op* owner) {
  if (n <= copy_limit) {
    bool can_append = !outq_.empty() && !outq_.back().data && outq_.size() > segs_in_flight_;
    if (can_append) outq_.back().bytes.append(reinterpret_cast<const char*>(p), n);
    else outq_.push_back(seg{std::string(reinterpret_cast<const char*>(p), n)});
    put_op(owner);
    return;
  }
  outq_.push_back(seg{{}, p, n, owner});
}

bool nbd_connection::tls_fill() {
  if (in_start_ > 0) {
    std::memmove(in_.data(), in_.data() + in_start_, in_end_ - in_start_);
    in_end_ -= in_start_;
    in_start_ = 0;
  }
  if (in_end_ >= in_.size()) return false;
  long n = s_.tls->read(in_.data() + in_end_, in_.size() - in_end_);
  if (n < 0) {
    // close_notify or a broken record: the same as the client hanging up.
    draining_ = true;
    begin_close("TLS session ended");
    return false;
  }
  in_end_ += size_t(n);
  return n > 0;
}

void nbd_connection::flush_tls() {
  if (send_pending_ || closing_ || tls_flushing_) return;
  tls_flushing_ = true;
  // Queued segments are encrypted in batches of about tls_batch_max bytes (one copy, as the
  // plaintext path's batching), so a deep queue of large reads does not double in memory; a reply
  // finished meanwhile (put_op may pump input) joins the queue and this loop.
  bool ok = true;
  while (!outq_.empty() && ok && s_.tls->out().size() < tls_batch_max) {
    seg& f = outq_.front();
    const uint8_t* p = f.data ? f.data : reinterpret_cast<const uint8_t*>(f.bytes.data());
    size_t total = f.data ? f.len : f.bytes.size();
    size_t n = std::min(total - front_sent_, tls_batch_max);
    ok = s_.tls->write(p + front_sent_, n);
    front_sent_ += n;
    if (front_sent_ < total) continue;
    op* owner = f.owner;
    outq_.pop_front();
    front_sent_ = 0;
    if (owner) put_op(owner);
    if (closing_) break;
  }
  if (!s_.tls->out().empty()) {
    std::string chunk;
    if (!tls_spare_.empty()) {
      chunk = std::move(tls_spare_.back());
      tls_spare_.pop_back();
      chunk.clear();
    }
    s_.tls->take_out(chunk);  // swaps: the session encrypts into the spare's memory next time
    tls_wire_.push_back(std::move(chunk));
  }
  tls_flushing_ = false;
  if (!ok) return begin_close("TLS encryption failed");
  if (closing_) return;
  if (tls_wire_.empty()) return maybe_finish();
  send_iov_.clear();
  for (auto& c : tls_wire_) {
    if (send_iov_.size() == max_send_iov) break;
    size_t skip = send_iov_.empty() ? tls_wire_sent_ : 0;
    send_iov_.push_back({c.data() + skip, c.size() - skip});
  }
  send_msg_ = {};
  send_msg_.msg_iov = send_iov_.data();
  send_msg_.msg_iovlen = send_iov_.size();
  send_pending_ = true;
  reactor_.sendmsg(s_.fd, &send_msg_, &send_cb_);
}

void nbd_connection::tls_sent(size_t n) {
  tls_wire_sent_ += n;
  while (!tls_wire_.empty() && tls_wire_sent_ >= tls_wire_.front().size()) {
    tls_wire_sent_ -= tls_wire_.front().size();
    if (tls_spare_.size() < 2) tls_spare_.push_back(std::move(tls_wire_.front()));
    tls_wire_.pop_front();
  }
}

void nbd_connection::flush_out() {
  if (gone_) return;
  if (s_.tls) return flush_tls();
  if (send_pending_ || closing_) return;
  while (!outq_.empty()) {
    seg& f = outq_.front();
    size_t total = f.data ? f.len : f.bytes.size();
    if (front_sent_ < total) break;
    op* owner = f.owner;
    front_sent_ -= total;
    outq_.pop_front();
    if (owner) put_op(owner);  // may queue and send more replies itself
    if (closing_ || send_pending_) return;
  }
  if (outq_.empty()) return maybe_finish();
  // Every queued segment goes out in one gathered send: batched headers and read payloads in place,
  // so a read's bytes are not copied again on their way to the socket.
  send_iov_.clear();
  for (auto& f : outq_) {
    if (send_iov_.size() == max_send_iov) break;
    const uint8_t* p = f.data ? f.data : reinterpret_cast<const uint8_t*>(f.bytes.data());
    size_t total = f.data ? f.len : f.bytes.size();
    size_t skip = send_iov_.empty() ? front_sent_ : 0;
    send_iov_.push_back({const_cast<uint8_t*>(p) + skip, total - skip});
  }
  segs_in_flight_ = send_iov_.size();
  send_msg_ = {};
  send_msg_.msg_iov = send_iov_.data();
  send_msg_.msg_iovlen = send_iov_.size();
  send_pending_ = true;
  reactor_.sendmsg(s_.fd, &send_msg_, &send_cb_);
}

void nbd_connection::on_send(int res) {
  send_pending_ = false;
  segs_in_flight_ = 0;
  if (closing_) return maybe_finish();
  if (res <= 0) return begin_close("send failed");
  if (s_.tls) {
    tls_sent(size_t(res));
    flush_out();
    return try_handoff();
  }
  front_sent_ += size_t(res);
  flush_out();
  try_handoff();
}

// ---- moving to another iothread ----------------------------------------------------------------

void nbd_connection::try_handoff() {
  if (!handoff_ || closing_ || gone_ || pumping_) return;
  // Everything parsed is answered and on the wire, except a write whose payload is still arriving:
  // its header and the bytes it has so far travel with the client (a slow sender holds nothing).
  bool wire_idle = tls_wire_idle();
  if (in_flight_ > (payload_op_ ? 1u : 0u) || send_pending_ || !outq_.empty() || !wire_idle) return;
  if (recv_pending_) {
    // The receive completes with -ECANCELED, or with bytes that arrived first (kept below).
    reactor_.cancel(&recv_cb_);
    return;
  }
  nbd_client_setup out = s_;
  out.leftover_in.clear();
  if (op* o = payload_op_) {
    nbd::put_request(out.leftover_in, s_.xs.mode, o->req);
    // A refused request's payload is dropped, whatever its bytes: the next connection refuses it again.
    if (payload_drop_) out.leftover_in.append(size_t(payload_got_), '\0');
    else out.leftover_in.append(reinterpret_cast<const char*>(o->buf), size_t(payload_got_));
    payload_op_ = nullptr;
    free_ops_.push_back(o);
    --in_flight_;
  }
  out.leftover_in.append(reinterpret_cast<const char*>(in_.data()) + in_start_, in_end_ - in_start_);
  out.pending_out.clear();
  s_.fd = -1;  // the socket now belongs to the next connection actor
  s_.tls.reset();
  gone_ = true;  // nothing of this actor touches the socket or the ring again
  handed_ = std::move(out);
  // The answer goes out from a message handler: once the supervisor has it, it drops its handle on
  // this actor, which must then not be running outside a handler (this may be a ring completion).
  send(caf::actor_cast<caf::actor>(this), handed_atom::value);
}

// ---- closing --------------------------------------------------------------------------------

void nbd_connection::begin_close(const char* why) {
  if (closing_) return maybe_finish();
  closing_ = true;
  if (handoff_ && !gone_) {
    handoff_ = false;
    handoff_rp_.deliver(caf::make_error(caf::sec::request_receiver_down));
  }
  draining_ = true;
  // Wakes a pending receive or send; each completes (with 0 or an error) and is not renewed.
  if (s_.fd >= 0) ::shutdown(s_.fd, SHUT_RDWR);
  // Replies nobody will read: their requests are done.
  if (!send_pending_) {
    while (!outq_.empty()) {
      op* owner = outq_.front().owner;
      outq_.pop_front();
      if (owner) put_op(owner);
    }
  }
  if (payload_op_) {
    op* o = payload_op_;
    payload_op_ = nullptr;
    put_op(o);
  }
  maybe_finish();
}

void nbd_connection::maybe_finish() {
  if (gone_) return;
  if (!closing_) {
    // After DISC (or a fatal request): close once every answer is out.
    bool wire_idle = tls_wire_idle();
    if (draining_ && in_flight_ == 0 && outq_.empty() && !send_pending_ && wire_idle) begin_close("client disconnected");
    return;
  }
  if (send_pending_ || recv_pending_) return;
  if (!outq_.empty()) {
    while (!outq_.empty()) {
      op* owner = outq_.front().owner;
      outq_.pop_front();
      if (owner) put_op(owner);
    }
  }
  if (in_flight_ > 0) return;
  gone_ = true;
  send(caf::actor_cast<caf::actor>(this), finish_atom::value);
}

}  // namespace blockd

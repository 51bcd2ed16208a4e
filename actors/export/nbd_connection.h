// One NBD client in the transmission phase: a pinned actor on its export's node home iothread.
#pragma once
#include <caf/event_based_actor.hpp>

#include <sys/socket.h>
#include <sys/uio.h>

#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <vector>

#include "actors/messages.h"
#include "actors/runtime/iothread.h"
#include "protocol/nbd/handshake.h"
#include "protocol/nbd/transmission.h"
#include "protocol/tls/tls.h"
#include "storage/block/dirty_bitmap.h"
#include "storage/block/io_request.h"
#include "storage/io/reactor.h"

namespace blockd {

// Everything a client brings from its handshake (run on the main iothread) to its home.
struct nbd_client_setup {
  int fd = -1;
  uint64_t client_id = 0;
  std::string export_id;
  nbd::export_state xs;          // size, read-only, reply mode
  nbd::meta_selection contexts;  // negotiated metadata contexts
  // The export's dirty bitmaps, in context order (qemu:dirty-bitmap:NAME, ids from 2). They belong
  // to nodes of the exported node's graph, which shares its home: the connection reads them on
  // its own thread, where every write that dirties them completes.
  std::vector<std::shared_ptr<const block::dirty_bitmap>> bitmaps;
  bool writethrough = false;
  bool sparse_reads = false;     // the node answers block status cheaply: holes go out as hole chunks
  std::string pending_out;       // the tail of the handshake not yet sent (ciphertext under TLS)
  std::string leftover_in;       // requests that arrived together with the handshake (plaintext)
  std::shared_ptr<tls::session> tls;  // the client's TLS session, if it negotiated one
  caf::actor node;               // the exported node's actor (same iothread)
  caf::actor supervisor;         // told when the client is gone
};

// supervisor <- connection: (export id, client id) once the socket is closed and nothing is in flight.
using nbd_gone_atom = caf::atom_constant<caf::atom("nbdgone")>;
// supervisor -> connection, before its export's node moves to another iothread: stop taking new
// requests, let those in flight finish and their replies go out, then answer with the client's
// state (socket, unparsed input, TLS session) and stop without closing the socket; the supervisor
// starts the client again on the node's new home. Answers an error if the client is closing.
using handoff_atom = caf::atom_constant<caf::atom("handoff")>;

class nbd_connection : public caf::event_based_actor, private block::io_waiter {
 public:
  nbd_connection(caf::actor_config& cfg, iothread* home, nbd_client_setup setup);
  ~nbd_connection() override;
  caf::behavior make_behavior() override;

 private:
  struct op;
  struct io_cb final : io::completion {
    nbd_connection* self = nullptr;
    bool is_recv = false;
    void complete(int res) override;
  };
  // One reply segment: batched header bytes (and small payloads), or a large payload sent in place.
  struct seg {
    std::string bytes;
    const uint8_t* data = nullptr;
    size_t len = 0;
    op* owner = nullptr;  // released once this segment is sent
  };

  void io_done(block::io_request& r) override;
  void on_recv(int res);
  void on_send(int res);
  void pump_input();
  void pump_loop();
  void post_recv();
  void dispatch(op* o);
  void submit(op* o, block::io_op kind, uint64_t off, uint64_t len, uint32_t flags);
  void step_block_status(op* o);
  void finish_block_status(op* o);
  std::vector<nbd::extent> bitmap_scratch_;  // one bitmap context's extents, reused per reply
  void reply_error(op* o, uint32_t err, const std::string& msg);
  void reply_done(op* o);
  void queue_bytes(const std::string& b);
  void queue_data(const uint8_t* p, size_t n, op* owner);
  void flush_out();
  // TLS: the socket carries ciphertext; plaintext requests are decrypted into in_ and replies
  // encrypted into tls_wire_ chunks, so everything above keeps working on plaintext.
  bool tls_fill();
  void flush_tls();
  void tls_sent(size_t n);
  op* get_op();
  void put_op(op* o);
  void begin_close(const char* why);
  void try_handoff();
  void maybe_finish();

  iothread* home_;
  nbd_client_setup s_;
  io::reactor& reactor_;
  block::request_pool pool_;
  std::vector<std::unique_ptr<op>> ops_;
  std::vector<op*> free_ops_;
  size_t in_flight_ = 0;  // requests received and not yet fully answered

  std::vector<uint8_t> in_;
  size_t in_start_ = 0, in_end_ = 0;
  op* payload_op_ = nullptr;  // a WRITE (or block-status payload) still arriving
  uint64_t payload_got_ = 0;
  bool payload_drop_ = false;
  bool big_payloads_ = false;  // the last request carried a large payload (see post_recv)
  std::vector<uint8_t> drop_buf_;

  std::deque<seg> outq_;
  size_t front_sent_ = 0;      // bytes of outq_.front() already on the wire
  size_t segs_in_flight_ = 0;  // the first segments of outq_, handed to one gathered send (must not change)
  std::vector<struct iovec> send_iov_;
  struct msghdr send_msg_ {};

  io_cb recv_cb_, send_cb_;
  bool recv_pending_ = false, send_pending_ = false;
  bool draining_ = false;  // DISC or a fatal error: no new requests; close once replies are out
  bool closing_ = false;   // the socket is shut down; waiting for in-flight work
  bool gone_ = false;     // the final message to self is sent
  bool pumping_ = false;
  bool handoff_ = false;  // a handoff is asked for: no new requests are parsed
  caf::response_promise handoff_rp_;
  nbd_client_setup handed_;  // the client's state, packed; answered from the next message handler

  std::vector<uint8_t> cin_;   // ciphertext received
  // Ciphertext to send, one chunk per encryption batch (chunks in flight are not touched); sent
  // chunks are kept as spares so their memory is reused rather than faulted in again.
  std::deque<std::string> tls_wire_;
  size_t tls_wire_sent_ = 0;  // bytes of tls_wire_.front() already on the wire
  std::vector<std::string> tls_spare_;
  bool tls_wire_idle() const { return !tls_flushing_ && tls_wire_.empty(); }
  bool tls_flushing_ = false;
};

}  // namespace blockd

CAF_ALLOW_UNSAFE_MESSAGE_TYPE(blockd::nbd_client_setup)

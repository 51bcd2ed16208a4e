// The luks format driver: unlocks the LUKS1 header at open, decrypts after reads and encrypts (into a bounce buffer) before writes, sector by sector; home iothread only.
#include "formats/luks/luks_driver.h"

#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "formats/luks/luks_header.h"
#include "protocol/qmp/schema.h"
#include "storage/block/iov.h"
#include "storage/block/node.h"
#include "storage/block/sync_io.h"

namespace blockd::luks {
namespace {

using namespace blockd::block;

constexpr int64_t zero_chunk = 1 << 20;  // bytes of encrypted zeroes written per child request

uint8_t* alloc_bounce(int64_t len) {
  size_t n = size_t((len + 4095) / 4096 * 4096);
  return static_cast<uint8_t*>(std::aligned_alloc(4096, n ? n : 4096));
}

// A write_zeroes turned into writes of encrypted zeroes, one chunk at a time.
struct zero_run {
  io_request* orig;
  int64_t done = 0;
  uint8_t* buf = nullptr;
};

// A request not on sector boundaries: the covering sectors [a0, a1) are read and decrypted; a write
// then lays its bytes (or zeroes) over them, encrypts and writes them back.
struct padded {
  io_request* orig;
  int64_t a0, a1;
  uint8_t* buf;
};

// Child request tags: which path a completion belongs to.
enum : uint64_t { t_direct = 0, t_bounce = 1, t_zero = 2, t_padded_read = 3, t_rmw_read = 4, t_rmw_write = 5 };

class luks_driver final : public block_driver, io_waiter {
 public:
  luks_driver(child_ref file, child_ref hdr, header h, std::unique_ptr<sector_cipher> c, driver_env env,
              std::string secret)
      : file_(file), hdr_(hdr), h_(std::move(h)), cipher_(std::move(c)), env_(std::move(env)), secret_(std::move(secret)) {
    payload_ = hdr_ ? 0 : int64_t(h_.payload_offset) * int64_t(sector);
  }

  uint32_t caps() const override { return cap_fua | cap_block_status | cap_resize; }
  // The cipher works on 512-byte sectors (QEMU's request_alignment 512), but this driver pads
  // unaligned requests itself (read-modify-write), so callers may send any byte range: the node
  // layer refuses requests off the alignment a driver states.
  driver_limits limits() const override { return file_->driver().limits(); }
  int64_t length() const override {
    int64_t n = file_->length() - payload_;
    return n < 0 ? 0 : n;
  }
  image_facts facts() const override {
    image_facts f{.virtual_size = length()};
    f.actual_size = file_->facts()->actual_size;
    f.encrypted = true;
    f.has_dirty_flag = true;  // QSD shows "dirty-flag": false for luks nodes
    f.format_specific = boost::json::object{{"type", "luks"}, {"data", info_json(h_, bool(hdr_))}};
    return f;
  }
  result<void> truncate(int64_t size) override { return file_->driver().truncate(size + payload_); }
  void rehome(const driver_env& env) override { env_ = env; }
  result<void> amend(const boost::json::object& options, bool force, const object_refs& objects) override {
    sync_io io(hdr_ ? *hdr_ : *file_);
    return amend_luks(h_, io, options, force, objects, secret_);
  }

  void submit(io_request& r) override {
    switch (r.op) {
      case io_op::read:
        if (r.length == 0) return finish_later(r, 0);
        if (unaligned(r)) return start_padded(r, t_padded_read);
        return start_read(r);
      case io_op::write:
        if (r.length == 0) return finish_later(r, 0);
        if (unaligned(r)) return queue_rmw(r);
        return start_write(r);
      case io_op::write_zeroes: {
        if (r.length == 0) return finish_later(r, 0);
        // Plaintext zeroes are not zeroes on disk: they must be written encrypted, never unmapped.
        if (r.flags & io_no_fallback) return finish_later(r, -ENOTSUP);
        if (unaligned(r)) return queue_rmw(r);
        auto* z = new zero_run{&r};
        z->buf = alloc_bounce(std::min(r.length, zero_chunk));
        return next_zero(z);
      }
      case io_op::discard:
        // QEMU's luks driver has no discard: the request succeeds and nothing changes.
        return finish_later(r, 0);
      case io_op::flush: {
        io_request* c = child_req(r, io_op::flush);
        return file_->submit(*c);
      }
      case io_op::block_status:
        // Everything reads as data here (QEMU's default for a format without block status).
        r.status = bs_data | bs_allocated;
        r.status_length = r.length;
        r.depth = 1;
        return finish_later(r, 0);
    }
  }

 private:
  io_request* child_req(io_request& r, io_op op) {
    io_request* c = pool_.get();
    c->op = op;
    c->flags = r.flags & io_fua;
    c->offset = r.offset + payload_;
    c->length = r.length;
    c->user = &r;
    c->waiter = this;
    return c;
  }
  void finish_later(io_request& r, int res) {
    env_.defer([&r, res] { r.complete(res); });
  }

  static bool unaligned(const io_request& r) { return r.offset % int64_t(sector) || r.length % int64_t(sector); }

  void start_padded(io_request& r, uint64_t tag) {
    auto* p = new padded{&r, r.offset / int64_t(sector) * int64_t(sector),
                         (r.offset + r.length + int64_t(sector) - 1) / int64_t(sector) * int64_t(sector), nullptr};
    p->buf = alloc_bounce(p->a1 - p->a0);
    io_request* c = pool_.get();
    c->op = io_op::read;
    c->offset = p->a0 + payload_;
    c->set_buffer(p->buf, p->a1 - p->a0);
    c->user = p;
    c->tag = tag;
    c->waiter = this;
    file_->submit(*c);
  }
  // Read-modify-write cycles run one at a time, so two writes into one sector never lose each
  // other's bytes (an aligned write racing a cycle's edge sector is the caller's overlap, as in QEMU
  // without serialisation).
  void queue_rmw(io_request& r) {
    rmw_queue_.push_back(&r);
    if (rmw_queue_.size() == 1) start_padded(r, t_rmw_read);
  }
  void rmw_done() {
    rmw_queue_.erase(rmw_queue_.begin());
    if (!rmw_queue_.empty()) start_padded(*rmw_queue_.front(), t_rmw_read);
  }
  void padded_done(io_request& c) {
    auto* p = static_cast<padded*>(c.user);
    io_request& r = *p->orig;
    int res = c.result;
    uint64_t tag = c.tag;
    pool_.put(&c);
    size_t n = size_t(p->a1 - p->a0);
    if (res == 0 && tag != t_rmw_write) cipher_->decrypt(uint64_t(p->a0) / sector, p->buf, n);
    if (res == 0 && tag == t_padded_read) copy_to_iov(r.iov, r.iovcnt, 0, p->buf + (r.offset - p->a0), r.length);
    if (res == 0 && tag == t_rmw_read) {
      if (r.op == io_op::write) copy_from_iov(r.iov, r.iovcnt, 0, p->buf + (r.offset - p->a0), r.length);
      else std::memset(p->buf + (r.offset - p->a0), 0, size_t(r.length));
      cipher_->encrypt(uint64_t(p->a0) / sector, p->buf, n);
      io_request* w = pool_.get();
      w->op = io_op::write;
      w->flags = r.flags & io_fua;
      w->offset = p->a0 + payload_;
      w->set_buffer(p->buf, int64_t(n));
      w->user = p;
      w->tag = t_rmw_write;
      w->waiter = this;
      return file_->submit(*w);
    }
    std::free(p->buf);
    delete p;
    if (tag != t_padded_read) rmw_done();
    r.complete(res);
  }

  void start_read(io_request& r) {
    io_request* c = child_req(r, io_op::read);
    if (r.iovcnt == 1) {
      c->iov = r.iov;
      c->iovcnt = 1;
    } else {
      // Sectors may straddle the caller's pieces: read whole into a bounce buffer, decrypt, copy out.
      c->set_buffer(alloc_bounce(r.length), r.length);
      c->tag = t_bounce;
    }
    file_->submit(*c);
  }

  void start_write(io_request& r) {
    // Never encrypt the caller's buffer in place: it may be reused (retries, mirrors of the same data).
    io_request* c = child_req(r, io_op::write);
    uint8_t* b = alloc_bounce(r.length);
    copy_from_iov(r.iov, r.iovcnt, 0, b, r.length);
    cipher_->encrypt(uint64_t(r.offset) / sector, b, size_t(r.length));
    c->set_buffer(b, r.length);
    c->tag = t_bounce;
    file_->submit(*c);
  }

  void next_zero(zero_run* z) {
    io_request& r = *z->orig;
    int64_t n = std::min(r.length - z->done, zero_chunk);
    std::memset(z->buf, 0, size_t(n));
    cipher_->encrypt(uint64_t(r.offset + z->done) / sector, z->buf, size_t(n));
    io_request* c = pool_.get();
    c->op = io_op::write;
    c->flags = r.flags & io_fua;
    c->offset = r.offset + z->done + payload_;
    c->set_buffer(z->buf, n);
    c->user = z;
    c->tag = t_zero;
    c->waiter = this;
    file_->submit(*c);
  }

  void io_done(io_request& c) override {
    if (c.tag >= t_padded_read) return padded_done(c);
    int res = c.result;
    if (c.tag == t_zero) {
      auto* z = static_cast<zero_run*>(c.user);
      z->done += c.length;
      pool_.put(&c);
      if (res == 0 && z->done < z->orig->length) return next_zero(z);
      io_request& r = *z->orig;
      std::free(z->buf);
      delete z;
      return r.complete(res);
    }
    io_request& r = *static_cast<io_request*>(c.user);
    if (r.op == io_op::read && res == 0) {
      if (c.tag == t_bounce) {
        auto* b = static_cast<uint8_t*>(c.one.iov_base);
        cipher_->decrypt(uint64_t(r.offset) / sector, b, size_t(r.length));
        copy_to_iov(r.iov, r.iovcnt, 0, b, r.length);
      } else {
        cipher_->decrypt(uint64_t(r.offset) / sector, static_cast<uint8_t*>(r.iov[0].iov_base), size_t(r.length));
      }
    }
    if (c.tag == t_bounce) std::free(c.one.iov_base);
    pool_.put(&c);
    r.complete(res);
  }

  child_ref file_, hdr_;
  header h_;
  std::unique_ptr<sector_cipher> cipher_;
  driver_env env_;
  std::string secret_;  // the open's key-secret: amend unlocks with it when no "secret" is given
  int64_t payload_ = 0;
  request_pool pool_;
  std::vector<io_request*> rmw_queue_;  // unaligned writes; the front one is in its cycle
};

result<std::unique_ptr<block_driver>> open_luks(open_args& a) {
  node* file = a.find_child("file");
  if (!file) return fail("luks node needs a file child");
  node* hdr = a.find_child("header");
  node* hnode = hdr ? hdr : file;
  // QEMU's order: the secret first, then the header.
  auto* ks = a.options.if_contains("key-secret");
  if (!ks || !ks->is_string()) return fail("Parameter 'key-secret' is required for cipher");
  auto secret = a.objects->secret_bytes(std::string(ks->get_string()));
  if (!secret) return std::unexpected(secret.error());
  auto buf = read_header_bytes(*hnode);
  if (!buf) return std::unexpected(buf.error());
  auto h = parse_header(buf->data(), buf->size(), uint64_t(std::max<int64_t>(hnode->length(), 0)), hdr != nullptr);
  if (!h) return std::unexpected(h.error());
  sync_io io(*hnode);
  auto key = unlock(*h, *secret, [&](uint64_t off, size_t len, uint8_t* out) {
    return io.read(out, int64_t(len), int64_t(off));
  });
  if (!key) return std::unexpected(key.error());
  auto c = sector_cipher::make(h->alg, h->mode, h->ivgen, h->ivhash, key->data(), key->size());
  if (!c) return std::unexpected(c.error());
  if (!hdr && int64_t(h->payload_offset) * int64_t(sector) > file->length())
    return fail("LUKS payload is overlapping with the header");
  return std::unique_ptr<block_driver>(new luks_driver(child_ref(a.edge("file")),
                                                       hdr ? child_ref(a.edge("header")) : child_ref(), std::move(*h),
                                                       std::move(*c), a.env, *secret));
}

}  // namespace

result<std::vector<uint8_t>> read_header_bytes(block::node& n) {
  int64_t len = std::min<int64_t>(std::max<int64_t>(n.length(), 0), 4096);
  std::vector<uint8_t> buf(4096, 0);
  // A file shorter than a header reads as zeroes past its end, which then fails the magic check.
  int64_t want = (len + 511) / 512 * 512;
  if (want > n.length()) want = len;
  if (want > 0) {
    uint8_t* b = alloc_bounce(4096);
    block::sync_io io(n);
    int rc = io.read(b, want, 0);
    if (rc == 0) std::memcpy(buf.data(), b, size_t(want));
    std::free(b);
    if (rc < 0) return fail(std::string("Unable to read LUKS header: ") + std::strerror(-rc));
  }
  return buf;
}

void register_luks_driver() {
  block::driver_entry e{"luks", false, {"file", "header"}, open_luks, nullptr};
  e.options_type = "BlockdevOptionsLUKS";
  e.define_options = [](qmp::schema& s) {
    s.object("BlockdevOptionsLUKS", "file:BlockdevRef *key-secret:str *header:BlockdevRef");
  };
  e.create = create_luks;
  e.create_options_type = "BlockdevCreateOptionsLUKS";
  e.define_create_options = [](qmp::schema& s) {
    s.object("BlockdevCreateOptionsLUKS",
             "*key-secret:str *cipher-alg:QCryptoCipherAlgo *cipher-mode:QCryptoCipherMode "
             "*ivgen-alg:QCryptoIVGenAlgo *ivgen-hash-alg:QCryptoHashAlgo *hash-alg:QCryptoHashAlgo *iter-time:int "
             "*file:BlockdevRef *header:BlockdevRef size:size *preallocation:PreallocMode");
  };
  block::register_driver(std::move(e));
}

}  // namespace blockd::luks

// blklogwrites: passes I/O to `file` and records every write, zero write, discard and flush in `log` in the dm-log-writes format; home iothread only.
#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "formats/filters/blklogwrites.h"
#include "protocol/qmp/schema.h"
#include "storage/block/filter.h"
#include "storage/block/iov.h"
#include "storage/block/sync_io.h"

namespace blockd::block {
namespace {

void put_le64(unsigned char* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = uint8_t(v >> (8 * i));
}
void put_le32(unsigned char* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = uint8_t(v >> (8 * i));
}
uint64_t get_le64(const unsigned char* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}
uint32_t get_le32(const unsigned char* p) {
  uint32_t v = 0;
  for (int i = 3; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

// A zeroed sector-sized buffer for an entry or the super block (aligned: the log may use O_DIRECT).
struct sector_buf {
  unsigned char* p;
  explicit sector_buf(uint32_t n) : p(static_cast<unsigned char*>(std::aligned_alloc(4096, (n + 4095) / 4096 * 4096))) {
    std::memset(p, 0, n);
  }
  ~sector_buf() { std::free(p); }
  sector_buf(const sector_buf&) = delete;
  sector_buf& operator=(const sector_buf&) = delete;
};

// Reads go to `file` unchanged (filter_driver); writes, zero writes, discards and flushes go to
// `file` and, at the same time, as one entry to the log (QEMU runs both side by side).
class blklogwrites_driver final : public filter_driver {
 public:
  blklogwrites_driver(child_ref file, child_ref log, log_state st)
      : filter_driver(file), log_(log), st_(st), file_waiter_(this, part::file), log_waiter_(this, part::log), rmw_waiter_(this, part::rmw) {}

  // FUA is taken here only to follow a FUA write with a flush the way QEMU's block layer does for
  // blklogwrites (which has no native FUA): the write is logged plain, then flushed as a flush request
  // would be, and only then counts as written (finish_part).
  uint32_t caps() const override { return cap_write_zeroes | cap_discard | cap_fua; }
  driver_limits limits() const override {
    // Unaligned writes are padded here (submit), so the file's own limits apply.
    return child_->driver().limits();
  }
  void child_perm(const std::string& role, bool read_only, uint32_t node_perm, uint32_t node_shared, uint32_t& perm,
                  uint32_t& shared) const override {
    if (role == "log") {
      // The log is metadata: written whenever the node may be, grown by every entry, and nobody
      // else may change it under us.
      perm = perm_consistent_read | (read_only ? 0u : uint32_t(perm_write | perm_resize));
      shared = (node_shared & perm_consistent_read) | perm_write_unchanged;
      return;
    }
    perm = node_perm;
    shared = node_shared;
  }
  result<void> truncate(int64_t size) override { return child_->driver().truncate(size); }

  void submit(io_request& r) override;
  void set_env(driver_env env) { env_ = std::move(env); }
  void rehome(const driver_env& env) override { env_ = env; }

 private:
  enum class stage : uint8_t { entry, zeroes, super, flush };
  struct op {
    io_request* parent = nullptr;
    int pending = 0;  // the file's part and the log's chain
    int file_ret = 0, log_ret = 0;
    uint64_t entry_flags = 0;
    int64_t zero_offset = 0, zero_len = 0;  // a zero write's data area in the log
    stage st = stage::entry;
    std::unique_ptr<sector_buf> hdr;
    std::vector<iovec> iov;
    std::unique_ptr<sector_buf> rmw;  // an unaligned write's whole sectors
    iovec rmw_iov{};
    int64_t rmw_off = 0;
    uint64_t gen = 0;     // the write generation a flush covers
    bool flush = false;
    bool data = false;    // a write, zero write or discard: counts as written when it ends
    bool fua = false;     // a FUA write or zero write: flushed before it ends
  };
  enum class part : uint8_t { file, log, rmw };
  struct waiter final : io_waiter {
    waiter(blklogwrites_driver* d, part p) : d(d), p(p) {}
    void io_done(io_request& r) override { d->sub_done(r, p); }
    blklogwrites_driver* d;
    part p;
  };

  void sub_done(io_request& sub, part p);
  void start_logged(op& o, io_op kind, uint32_t flags, int64_t off, int64_t len, const iovec* iov, int iovcnt);
  void log_step(op& o, int ret);
  io_request* sub(op& o, io_op kind, bool file);
  int grow_log(int64_t end);
  void finish_part(op& o);
  void fua_flush(op& o);

  child_ref log_;
  log_state st_;
  // Writes ended, and the newest count a flush made durable: QEMU's write_gen / flushed_gen, which
  // its block layer bumps as a write ends, after the flush that emulates its FUA; so that flush covers
  // the writes before it but not its own, and the next flush logs an entry for it.
  uint64_t write_gen_ = 0, flushed_gen_ = 0;
  driver_env env_;
  waiter file_waiter_, log_waiter_, rmw_waiter_;
  request_pool pool_;
};

io_request* blklogwrites_driver::sub(op& o, io_op kind, bool file) {
  io_request* c = pool_.get();
  c->op = kind;
  c->user = &o;
  c->waiter = file ? &file_waiter_ : &log_waiter_;
  return c;
}

int blklogwrites_driver::grow_log(int64_t end) {
  // A protocol file grows when written past its end in QEMU; here the log is extended first.
  if (end <= log_->length()) return 0;
  auto r = log_->driver().truncate(end);
  return r ? 0 : -EIO;
}

void blklogwrites_driver::submit(io_request& r) {
  if (r.op == io_op::read || r.op == io_op::block_status) return pass_down(r, 0);
  // A flush with nothing written since the last one is not logged (QEMU skips it, as its block
  // layer does for any driver whose data were flushed already); the file still gets it.
  if (r.op == io_op::flush && write_gen_ == flushed_gen_) return pass_down(r, 0);
  auto* o = new op;
  o->parent = &r;
  uint32_t flags = r.flags;
  if (r.op == io_op::flush) {
    o->flush = true;
    o->gen = write_gen_;
  } else {
    o->data = true;
    o->fua = flags & io_fua;
    flags &= ~uint32_t(io_fua);
  }
  int64_t ss = st_.sector_size;
  int64_t end = r.offset + r.length;
  if (r.op == io_op::discard) {
    // Only whole log sectors are discarded (QEMU's discard alignment); nothing left is success.
    int64_t a = (r.offset + ss - 1) / ss * ss, b = end / ss * ss;
    if (b <= a) {
      delete o;
      ++write_gen_;
      env_.defer([&r] { r.complete(0); });
      return;
    }
    return start_logged(*o, r.op, flags, a, b - a, nullptr, 0);
  }
  bool payload = r.op == io_op::write || r.op == io_op::write_zeroes;
  if (payload && (r.offset % ss || r.length % ss)) {
    // Entries count whole sectors: read the partial ones first and log the padded write (QEMU's
    // block layer pads the same way before blklogwrites sees the request).
    o->rmw_off = r.offset / ss * ss;
    int64_t len = (end + ss - 1) / ss * ss - o->rmw_off;
    o->rmw = std::make_unique<sector_buf>(uint32_t(len));
    o->rmw_iov = {o->rmw->p, size_t(len)};
    io_request* c = pool_.get();
    c->op = io_op::read;
    c->user = o;
    c->waiter = &rmw_waiter_;
    c->offset = o->rmw_off;
    c->set_buffer(o->rmw->p, len);
    child_->submit(*c);
    return;
  }
  start_logged(*o, r.op, flags, r.offset, r.length, r.iov, r.iovcnt);
}

void blklogwrites_driver::start_logged(op& o, io_op kind, uint32_t flags, int64_t off, int64_t len,
                                       const iovec* iov, int iovcnt) {
  uint64_t sector = 0, nr = 0;
  switch (kind) {
    case io_op::write:
      o.entry_flags = (flags & io_fua) ? log_fua_flag : 0;
      sector = uint64_t(off) >> st_.sector_bits;
      nr = uint64_t(len) >> st_.sector_bits;
      break;
    case io_op::write_zeroes:
      sector = uint64_t(off) >> st_.sector_bits;
      nr = uint64_t(len) >> st_.sector_bits;
      break;
    case io_op::discard:
      o.entry_flags = log_discard_flag;
      sector = uint64_t(off) >> st_.sector_bits;
      nr = uint64_t(len) >> st_.sector_bits;
      break;
    default:  // flush
      o.entry_flags = log_flush_flag;
      break;
  }
  // The file's part.
  io_request* f = sub(o, kind, true);
  f->flags = flags;
  f->offset = off;
  f->length = kind == io_op::flush ? 0 : len;
  f->iov = iov;
  f->iovcnt = iovcnt;
  ++o.pending;
  child_->submit(*f);

  // The log's part: the entry in a sector of its own, then a write's data (data_len stays 0, as
  // QEMU leaves it), or for a zero write the same number of zeroed sectors after the entry.
  o.hdr = std::make_unique<sector_buf>(st_.sector_size);
  put_le64(o.hdr->p, sector);
  put_le64(o.hdr->p + 8, nr);
  put_le64(o.hdr->p + 16, o.entry_flags);
  put_le64(o.hdr->p + 24, 0);
  o.iov.push_back({o.hdr->p, st_.sector_size});
  int64_t data = 0;
  if (kind == io_op::write) {
    for (int i = 0; i < iovcnt; ++i) o.iov.push_back(iov[i]);
    data = len;
  }
  int64_t at = int64_t(st_.cur_log_sector << st_.sector_bits);
  int64_t llen = st_.sector_size + data;
  ++st_.nr_entries;
  st_.cur_log_sector += uint64_t(llen + st_.sector_size - 1) >> st_.sector_bits;
  if (kind == io_op::write_zeroes) {
    o.zero_offset = int64_t(st_.cur_log_sector << st_.sector_bits);
    o.zero_len = len;
    st_.cur_log_sector += uint64_t(len + st_.sector_size - 1) >> st_.sector_bits;
  }
  ++o.pending;
  int g = grow_log(at + llen);
  io_request* l = sub(o, io_op::write, false);
  l->offset = at;
  l->length = llen;
  l->iov = o.iov.data();
  l->iovcnt = int(o.iov.size());
  if (g < 0) {
    // Never complete inside submit: the failure is told on a later turn.
    env_.defer([l, g] { l->complete(g); });
    return;
  }
  log_->submit(*l);
}

void blklogwrites_driver::sub_done(io_request& s, part p) {
  auto& o = *static_cast<op*>(s.user);
  int ret = s.result;
  pool_.put(&s);
  if (p == part::file) {
    o.file_ret = ret;
    return finish_part(o);
  }
  if (p == part::log) return log_step(o, ret);
  // The padding read is back: merge the request into it and log the whole sectors.
  io_request& r = *o.parent;
  if (ret < 0) {
    delete &o;
    return r.complete(ret);
  }
  int64_t at = r.offset - o.rmw_off;
  if (r.op == io_op::write)
    copy_from_iov(r.iov, r.iovcnt, 0, o.rmw->p + at, r.length);
  else
    std::memset(o.rmw->p + at, 0, size_t(r.length));
  start_logged(o, io_op::write, 0, o.rmw_off, int64_t(o.rmw_iov.iov_len), &o.rmw_iov, 1);
}

void blklogwrites_driver::log_step(op& o, int ret) {
  o.log_ret = ret;
  auto next = [&](io_op kind, int64_t off, int64_t len) {
    io_request* l = sub(o, kind, false);
    l->offset = off;
    l->length = len;
    if (kind == io_op::write) {
      o.iov.assign(1, {o.hdr->p, st_.sector_size});
      l->iov = o.iov.data();
      l->iovcnt = 1;
    }
    log_->submit(*l);
  };
  if (ret < 0) return finish_part(o);
  if (o.st == stage::entry && o.zero_len) {
    o.st = stage::zeroes;
    if (int g = grow_log(o.zero_offset + o.zero_len); g < 0) {
      o.log_ret = g;
      return finish_part(o);
    }
    return next(io_op::write_zeroes, o.zero_offset, o.zero_len);
  }
  if (o.st == stage::entry || o.st == stage::zeroes) {
    // The super block is rewritten on a flush and every update-interval entries, then made durable.
    if ((o.entry_flags & log_flush_flag) || st_.nr_entries % st_.update_interval == 0) {
      o.st = stage::super;
      std::memset(o.hdr->p, 0, st_.sector_size);
      put_le64(o.hdr->p, log_magic);
      put_le64(o.hdr->p + 8, log_version);
      put_le64(o.hdr->p + 16, st_.nr_entries);
      put_le32(o.hdr->p + 24, st_.sector_size);
      return next(io_op::write, 0, st_.sector_size);
    }
    return finish_part(o);
  }
  if (o.st == stage::super) {
    o.st = stage::flush;
    return next(io_op::flush, 0, 0);
  }
  finish_part(o);
}

void blklogwrites_driver::finish_part(op& o) {
  if (--o.pending > 0) return;
  io_request* r = o.parent;
  int res = o.file_ret < 0 ? o.file_ret : o.log_ret;
  if (o.flush && res == 0) flushed_gen_ = std::max(flushed_gen_, o.gen);
  if (o.fua && res == 0) return fua_flush(o);
  if (o.data) ++write_gen_;
  delete &o;
  r->complete(res);
}

void blklogwrites_driver::fua_flush(op& o) {
  // The same op goes on as a flush of the node: an entry only if a write ended since the last
  // flush (this one has not yet), the file flushed either way.
  o.fua = false;
  o.flush = true;
  o.gen = write_gen_;
  o.file_ret = o.log_ret = 0;
  o.entry_flags = 0;
  o.zero_offset = o.zero_len = 0;
  o.st = stage::entry;
  o.iov.clear();
  if (write_gen_ != flushed_gen_) return start_logged(o, io_op::flush, 0, 0, 0, nullptr, 0);
  ++o.pending;
  child_->submit(*sub(o, io_op::flush, true));
}

result<std::unique_ptr<block_driver>> open_blklogwrites(open_args& a) {
  node* file = a.find_child("file");
  node* log = a.find_child("log");
  if (!file || !log) return fail("blklogwrites needs a file and a log child");
  auto st = read_log_state(a.options, *log);
  if (!st) return std::unexpected(st.error());
  auto d = std::make_unique<blklogwrites_driver>(child_ref(a.edge("file")), child_ref(a.edge("log")), *st);
  d->set_env(a.env);
  return std::unique_ptr<block_driver>(std::move(d));
}

}  // namespace

bool log_sector_size_valid(uint64_t s) {
  return s && (s & (s - 1)) == 0 && s >= log_super_size && s <= (1ull << 23);
}

result<log_state> read_log_state(const boost::json::object& o, node& log) {
  auto num = [&](const char* k, uint64_t dflt) -> uint64_t {
    auto* v = o.if_contains(k);
    if (!v) return dflt;
    return v->is_uint64() ? v->as_uint64() : uint64_t(v->as_int64());
  };
  log_state st;
  bool append = o.contains("log-append") && o.at("log-append").as_bool();
  uint64_t sector_size = 512;
  if (append) {
    if (o.contains("log-sector-size")) return fail("log-append and log-sector-size are mutually exclusive");
    sync_io io(log);
    unsigned char sb[log_super_size] = {};
    if (io.length() == 0) {
      // An empty log reads as one with no entries yet.
      put_le64(sb, log_magic);
      put_le64(sb + 8, log_version);
      put_le32(sb + 24, 512);
    } else {
      // Whole sectors: the log may be opened with O_DIRECT.
      sector_buf buf(4096);
      int64_t n = std::min<int64_t>(4096, io.length());
      if (int r = io.read(buf.p, n, 0); r < 0) return fail(std::string("Could not read log superblock: ") + std::strerror(-r));
      std::memcpy(sb, buf.p, sizeof sb);
    }
    if (get_le64(sb) != log_magic) return fail("Invalid log superblock magic");
    if (get_le64(sb + 8) != log_version)
      return fail("Unsupported log version " + std::to_string(get_le64(sb + 8)));
    sector_size = get_le32(sb + 24);
    st.cur_log_sector = 1;
    st.nr_entries = 0;
    if (log_sector_size_valid(sector_size)) {
      // Walk the entries the super block counts to find where the next one goes.
      uint64_t nr = get_le64(sb + 16), cur = 1;
      unsigned bits = 0;
      while ((1ull << bits) < sector_size) ++bits;
      sector_buf ent{uint32_t(sector_size)};
      for (uint64_t i = 0; i < nr; ++i) {
        int64_t off = int64_t(cur << bits);
        int r = off + int64_t(sector_size) <= io.length() ? io.read(ent.p, int64_t(sector_size), off) : -EIO;
        if (r < 0) return fail("Failed to read log entry " + std::to_string(i) + ": " + std::strerror(-r));
        uint64_t flags = get_le64(ent.p + 16);
        if (flags & ~log_flag_mask) {
          char hex[32];
          std::snprintf(hex, sizeof hex, "0x%llx", (unsigned long long)flags);
          return fail("Invalid flags " + std::string(hex) + " in log entry " + std::to_string(i));
        }
        ++cur;
        if (!(flags & log_discard_flag)) cur += get_le64(ent.p + 8);
      }
      st.cur_log_sector = cur;
      st.nr_entries = nr;
    }
  } else {
    sector_size = num("log-sector-size", 512);
  }
  st.update_interval = num("log-super-update-interval", 4096);
  if (!st.update_interval) return fail("Invalid log superblock update interval 0");
  if (!log_sector_size_valid(sector_size)) return fail("Invalid log sector size " + std::to_string(sector_size));
  st.sector_size = uint32_t(sector_size);
  while ((1u << st.sector_bits) < st.sector_size) ++st.sector_bits;
  return st;
}

void register_blklogwrites_driver() {
  driver_entry e{"blklogwrites", false, {"file", "log"}, open_blklogwrites, nullptr};
  e.options_type = "BlockdevOptionsBlklogwrites";
  e.define_options = [](qmp::schema& s) {
    s.object("BlockdevOptionsBlklogwrites",
             "file:BlockdevRef log:BlockdevRef *log-sector-size:uint32 *log-append:bool "
             "*log-super-update-interval:uint64");
  };
  register_driver(std::move(e));
}

}  // namespace blockd::block

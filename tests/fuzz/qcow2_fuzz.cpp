// The qcow2 fuzz harness: a hostile image opened through block::graph, a bounded set of operations, close and invariant checks; the calling thread only (it turns its own loop).
#include "tests/fuzz/qcow2_fuzz.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <boost/json.hpp>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "formats/qcow2/layout.h"
#include "storage/block/contract.h"
#include "storage/block/graph.h"
#include "storage/block/local_loop.h"
#include "storage/block/node.h"
#include "storage/block/sync_io.h"
#include "storage/io/reactor.h"

namespace blockd::fuzz {
namespace {

namespace json = boost::json;

// Files the scratch directory holds. The image names one of them (relative) to reach it; any
// other name in a hostile header is never opened (see open_options_for).
constexpr const char* image_name = "image.qcow2";
constexpr const char* backing_raw_name = "backing.raw";
constexpr const char* backing_qcow2_name = "backing.qcow2";
constexpr const char* data_name = "data.raw";

constexpr int64_t max_io_bytes = 4 << 20;      // one operation moves at most this much
constexpr int64_t max_truncate = int64_t(1) << 40;
constexpr int64_t data_file_bytes = 1 << 20;   // the external data file's starting size
constexpr int64_t backing_raw_bytes = 1 << 20;

std::string scratch_dir;
bool have_backing_qcow2 = false;

std::vector<uint8_t> read_file(const std::string& path, size_t limit = SIZE_MAX);
bool write_file(const std::string& path, const uint8_t* p, size_t n);
std::string path_of(const char* name);

// Stops the run on a broken rule. With BLOCKD_FUZZ_KEEP=PATH in the environment the image as the
// driver left it is copied to PATH first (for triage with qemu-img check).
[[noreturn]] void finding(const std::string& what) {
  std::fprintf(stderr, "qcow2_fuzz: FINDING: %s\n", what.c_str());
  if (const char* keep = std::getenv("BLOCKD_FUZZ_KEEP")) {
    auto b = read_file(path_of(image_name), size_t(64) << 20);
    write_file(keep, b.data(), b.size());
  }
  std::fflush(stderr);
  std::abort();
}

std::string path_of(const char* name) { return scratch_dir + "/" + name; }

bool write_file(const std::string& path, const uint8_t* p, size_t n) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) return false;
  size_t done = 0;
  while (done < n) {
    ssize_t w = ::write(fd, p + done, n - done);
    if (w <= 0) {
      ::close(fd);
      return false;
    }
    done += size_t(w);
  }
  ::close(fd);
  return true;
}

// The first `limit` bytes of a file (a file the driver grew may be huge and sparse).
std::vector<uint8_t> read_file(const std::string& path, size_t limit) {
  std::vector<uint8_t> out;
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return out;
  uint8_t buf[65536];
  ssize_t n;
  while (out.size() < limit && (n = ::read(fd, buf, std::min(sizeof buf, limit - out.size()))) > 0)
    out.insert(out.end(), buf, buf + n);
  ::close(fd);
  return out;
}

// A raw file of `len` bytes whose every 512-byte sector carries its own index (so a wrong offset
// through a backing or data file reads visibly wrong data, and never uninitialized memory).
void make_patterned(const std::string& path, int64_t len) {
  std::vector<uint8_t> b(static_cast<size_t>(len));
  for (int64_t i = 0; i < len; ++i) b[size_t(i)] = uint8_t((i / 512) * 7 + 1);
  write_file(path, b.data(), b.size());
}

std::string scratch_for(int pid) { return "/dev/shm/blockd-qcow2-fuzz-" + std::to_string(pid); }

void remove_dir(const std::string& dir) {
  for (const char* n : {image_name, backing_raw_name, backing_qcow2_name, data_name}) ::unlink((dir + "/" + n).c_str());
  ::rmdir(dir.c_str());
}

void remove_scratch() {
  if (!scratch_dir.empty()) remove_dir(scratch_dir);
}

// Scratch directories of processes that are gone (a crash or a kill skips the atexit cleanup;
// a fuzzing campaign leaves hundreds, some holding what a runaway driver wrote).
void sweep_stale_scratch() {
  DIR* d = ::opendir("/dev/shm");
  if (!d) return;
  const std::string prefix = "blockd-qcow2-fuzz-";
  std::vector<int> gone;
  while (dirent* e = ::readdir(d)) {
    std::string n = e->d_name;
    if (n.rfind(prefix, 0) != 0) continue;
    int pid = std::atoi(n.c_str() + prefix.size());
    if (pid > 0 && ::kill(pid, 0) != 0 && errno == ESRCH) gone.push_back(pid);
  }
  ::closedir(d);
  for (int pid : gone) remove_dir(scratch_for(pid));
}

// The loop every input's graph runs on: one reactor for the process (setting up io_uring per input
// would dominate the cost of an input).
block::local_loop& loop() {
  static block::local_loop l{io::reactor::create(256, nullptr)};
  return l;
}

// Little-endian reads from the trailer.
uint16_t u16_at(const uint8_t* p) { return uint16_t(p[0] | p[1] << 8); }

// Parses the header exactly as the driver's open does (the first cluster, or 4 KiB when the
// cluster size is out of range), to learn which files the header would make the driver open.
// `img` holds the first `len` bytes of a file of `file_size` bytes (at least one cluster's worth).
std::optional<qcow2::header> peek_header(const uint8_t* img, size_t len, uint64_t file_size) {
  uint32_t cbits = len >= 24 ? qcow2::be32(img + 20) : 0;
  uint64_t want = cbits >= qcow2::min_cluster_bits && cbits <= qcow2::max_cluster_bits
                      ? std::min<uint64_t>(len, uint64_t(1) << cbits)
                      : std::min<uint64_t>(len, 4096);
  auto h = qcow2::parse_header(std::span<const uint8_t>(img, size_t(want)), file_size);
  if (!h) return std::nullopt;
  return std::move(*h);
}

// The blockdev-add options for this input. A header may name any file as its backing or data
// file: only the scratch directory's own files are ever reached, others are replaced by an
// explicit choice (backing: null, or the scratch data file as an inline data-file node).
json::object open_options_for(uint8_t mode, const std::optional<qcow2::header>& h, const char* node_name) {
  json::object o{{"driver", "qcow2"},
                 {"node-name", node_name},
                 {"file", json::object{{"driver", "file"}, {"filename", path_of(image_name)}}}};
  if (mode & mode_read_only) o["read-only"] = true;
  if (mode & mode_discard_unmap) o["discard"] = "unmap";
  static const char* const overlap[] = {"cached", "none", "constant", "all"};
  int ov = (mode >> 3) & 3;
  if (ov) o["overlap-check"] = overlap[ov];
  if (mode & mode_small_caches) {
    o["l2-cache-size"] = 1;
    o["l2-cache-entry-size"] = 512;
    o["refcount-cache-size"] = 1;
  }
  if (mode & mode_lazy_option) o["lazy-refcounts"] = true;
  if (h) {
    auto allowed_backing = [](const std::string& n) {
      return n == backing_raw_name || (n == backing_qcow2_name && have_backing_qcow2) || n == image_name;
    };
    if (!h->backing_file.empty() && !((mode & mode_follow_backing) && allowed_backing(h->backing_file)))
      o["backing"] = nullptr;
    if (h->has_data_file() && h->data_file != data_name) {
      json::object df{{"driver", "file"}, {"filename", path_of(data_name)}};
      if (mode & mode_read_only) df["read-only"] = true;
      o["data-file"] = std::move(df);
    }
  } else {
    // The driver will refuse this header; whatever it might name is never reached.
    o["backing"] = nullptr;
  }
  return o;
}

void check_result(int r, const char* op, int64_t off, int64_t len) {
  if (r == 0 || (r < 0 && r >= -4095)) return;
  finding(std::string(op) + " at " + std::to_string(off) + "+" + std::to_string(len) + " returned " +
          std::to_string(r) + ", not 0 or -errno");
}

// One operation record of the trailer (4 bytes):
//   [0] bits 0-2 kind: read, write, write_zeroes, discard, block_status, flush, big read, truncate
//       bit 3 byte-granular offset and length; bit 4 FUA (write) or may-unmap (zeroes);
//       bit 5 no-fallback (zeroes); bits 6-7 how [1..2] places the offset: 512-byte units from
//       the start, a fraction of the disk, 512-byte units back from the end, 64 KiB units
//   [1..2] position; [3] length: (low 7 bits + 1) units of 512 bytes, or of 32 KiB with bit 7.
struct op_record {
  uint8_t k, p0, p1, l;
};

struct range {
  int64_t off = 0, len = 0;
};

range place(const op_record& rec, int64_t size) {
  range r;
  uint64_t pos = u16_at(&rec.p0);
  int64_t unit = (rec.l & 0x80) ? 32768 : 512;
  r.len = (int64_t(rec.l & 0x7f) + 1) * unit;
  switch (rec.k >> 6) {
    case 0: r.off = int64_t(pos) * 512; break;
    case 1: r.off = int64_t((unsigned __int128)uint64_t(size) * pos >> 16) / 512 * 512; break;
    case 2: r.off = size - int64_t(pos) * 512; break;
    default: r.off = int64_t(pos) * 65536; break;
  }
  if (rec.k & 0x08) {
    r.off += rec.p1 * 7 % 512;
    r.len -= rec.p0 % 512;
    if (r.len < 1) r.len = 1;
  }
  if (r.off < 0) r.off = 0;
  if (r.off >= size) r.off = size > r.len ? (size - r.len) / 512 * 512 : 0;
  r.len = std::min<int64_t>(std::min<int64_t>(r.len, max_io_bytes), size - r.off);
  return r;
}

uint8_t* io_buffer() {
  static uint8_t* buf = [] {
    void* p = nullptr;
    if (posix_memalign(&p, 4096, size_t(max_io_bytes)) != 0) std::abort();
    return static_cast<uint8_t*>(p);
  }();
  return buf;
}

void run_ops(block::node& n, const uint8_t* trailer, int& ok, int& failed) {
  block::sync_io io(n);
  uint8_t* buf = io_buffer();
  int count = trailer[1] % 12;
  uint8_t fill = trailer[2];
  static const bool verbose = std::getenv("BLOCKD_FUZZ_VERBOSE") != nullptr;
  static const char* const names[] = {"read",         "write", "write_zeroes", "discard",
                                      "block_status", "flush", "read",         "truncate"};
  int kind = 0;
  range rg;
  auto tally = [&](int r) {
    (r == 0 ? ok : failed)++;
    if (verbose) std::fprintf(stderr, "qcow2_fuzz: %s %lld+%lld -> %d%s%s\n", names[kind], (long long)rg.off,
                              (long long)rg.len, r, r < 0 ? " " : "", r < 0 ? std::strerror(-r) : "");
  };
  for (int i = 0; i < count; ++i) {
    const uint8_t* p = trailer + 4 + 4 * i;
    op_record rec{p[0], p[1], p[2], p[3]};
    int64_t size = io.length();
    rg = place(rec, size);
    kind = rec.k & 7;
    if (kind == 5) {
      int r = io.flush();
      check_result(r, "flush", 0, 0);
      tally(r);
      continue;
    }
    if (kind == 7) {
      // Grow (bit 7 of the length byte) or shrink by a bounded amount, in whole sectors.
      int64_t delta = (int64_t(u16_at(&rec.p0)) + 1) * 512 * ((rec.l & 0x7f) + 1);
      int64_t target = (rec.l & 0x80) ? std::min(size + delta, max_truncate) : std::max<int64_t>(size - delta, 0);
      target = target / 512 * 512;
      auto r = io.truncate(target);
      if (!r && r.error().desc.empty()) finding("truncate to " + std::to_string(target) + " failed without a message");
      if (verbose && !r)
        std::fprintf(stderr, "qcow2_fuzz: truncate to %lld: %s\n", (long long)target, r.error().desc.c_str());
      rg = {target, 0};
      tally(r ? 0 : -EINVAL);
      continue;
    }
    if (rg.len <= 0) continue;
    int r = 0;
    switch (kind) {
      case 0:
        r = io.read(buf, rg.len, rg.off);
        check_result(r, "read", rg.off, rg.len);
        break;
      case 6: {
        // A big read from the start of the range: crosses many clusters and L2 slices.
        rg.len = std::min<int64_t>(max_io_bytes, size - rg.off);
        r = io.read(buf, rg.len, rg.off);
        check_result(r, "read", rg.off, rg.len);
        break;
      }
      case 1: {
        for (int64_t j = 0; j < rg.len; ++j) buf[j] = uint8_t(fill + i + (j >> 9));
        r = io.write(buf, rg.len, rg.off, (rec.k & 0x10) ? uint32_t(block::io_fua) : 0u);
        check_result(r, "write", rg.off, rg.len);
        break;
      }
      case 2: {
        uint32_t flags = (rec.k & 0x10) ? uint32_t(block::io_may_unmap) : 0u;
        if (rec.k & 0x20) flags |= block::io_no_fallback;
        r = io.write_zeroes(rg.off, rg.len, flags);
        check_result(r, "write_zeroes", rg.off, rg.len);
        break;
      }
      case 3:
        r = io.discard(rg.off, rg.len);
        check_result(r, "discard", rg.off, rg.len);
        break;
      case 4: {
        uint32_t status = 0;
        int64_t slen = 0;
        r = io.block_status(rg.off, rg.len, status, slen);
        check_result(r, "block_status", rg.off, rg.len);
        if (r == 0 && (slen <= 0 || slen > rg.len))
          finding("block_status at " + std::to_string(rg.off) + "+" + std::to_string(rg.len) + " answered length " +
                  std::to_string(slen));
        break;
      }
    }
    tally(r);
  }
  // A final flush, so the writeback paths run even when the trailer asked for none; bit 0 of
  // trailer[3] leaves it out (close then writes back what is still dirty).
  if (trailer[3] & 1) return;
  kind = 5;
  rg = {};
  int r = io.flush();
  check_result(r, "flush", 0, 0);
  tally(r);
}

}  // namespace

void qcow2_fuzz_init() {
  if (!scratch_dir.empty()) return;
  sweep_stale_scratch();
  scratch_dir = scratch_for(::getpid());
  ::mkdir(scratch_dir.c_str(), 0700);
  make_patterned(path_of(backing_raw_name), backing_raw_bytes);
#ifdef BLOCKD_FUZZ_DATA_DIR
  auto b = read_file(std::string(BLOCKD_FUZZ_DATA_DIR) + "/backing.qcow2");
  have_backing_qcow2 = !b.empty() && write_file(path_of(backing_qcow2_name), b.data(), b.size());
#endif
  std::atexit(remove_scratch);
  // The contract checker is on unless BLOCKD_FUZZ_NO_CONTRACTS is set (to see what a violation
  // does in a build without the checker, e.g. a use after free under ASan).
  block::set_contract_checks(std::getenv("BLOCKD_FUZZ_NO_CONTRACTS") == nullptr);
  block::set_contract_handler({});  // a contract violation aborts: a finding
  (void)loop();
}

void qcow2_fuzz_remove_scratch(int pid) { remove_dir(scratch_for(pid)); }

qcow2_outcome qcow2_fuzz_one(const uint8_t* data, size_t size) {
  qcow2_fuzz_init();
  qcow2_outcome out;
  static const uint8_t zero_trailer[qcow2_trailer_bytes] = {};
  const uint8_t* trailer = zero_trailer;
  size_t img_len = size;
  if (size >= qcow2_trailer_bytes) {
    img_len = size - qcow2_trailer_bytes;
    trailer = data + img_len;
  }
  uint8_t mode = trailer[0];
  const uint8_t* img = data;
  std::vector<uint8_t> patched;
  if (std::getenv("BLOCKD_FUZZ_NO_DIRTY") && img_len >= 80 && (data[79] & 1)) {
    // Fuzzing past the refcount rebuild's known findings: the dirty bit goes (byte 79 is the low
    // byte of the incompatible features) so a read-write open does not rebuild.
    patched.assign(data, data + img_len);
    patched[79] &= uint8_t(~1u);
    img = patched.data();
  }
  if (!write_file(path_of(image_name), img, img_len)) finding("cannot write the scratch image");
  // The external data file starts the same for every input (writes of the last one are gone).
  make_patterned(path_of(data_name), data_file_bytes);

  auto h = peek_header(img, img_len, img_len);
  auto& l = loop();
  {
    block::graph g{[&l] { return l.env(); }};
    auto r = g.add(open_options_for(mode, h, "fz"));
    if (!r) {
      if (std::getenv("BLOCKD_FUZZ_VERBOSE"))
        std::fprintf(stderr, "qcow2_fuzz: open: %s\n", r.error().desc.c_str());
      if (r.error().desc.empty()) finding("open failed without a message");
      return out;
    }
    out.opened = true;
    run_ops(**r, trailer, out.ops_ok, out.ops_failed);
    g.del("fz");
  }
  if (!l.deferred.empty() || l.reactor->in_flight()) {
    // Let the leftovers run first: what they touch after the close is what a daemon's iothread
    // (which keeps turning) would touch, and ASan reports it.
    size_t flight = l.reactor->in_flight(), deferred = l.deferred.size();
    for (int i = 0; i < 1000 && (!l.deferred.empty() || l.reactor->in_flight()); ++i) l.turn();
    finding("work left on the loop after the image was closed (" + std::to_string(flight) + " I/O in flight, " +
            std::to_string(deferred) + " deferred functions)");
  }

  if (std::getenv("BLOCKD_FUZZ_VERBOSE")) {
    struct stat st {};
    ::stat(path_of(image_name).c_str(), &st);
    std::fprintf(stderr, "qcow2_fuzz: image file %zu -> %lld bytes (%lld allocated)\n", img_len, (long long)st.st_size,
                 (long long)st.st_blocks * 512);
  }
  if (mode & mode_read_only) {
    auto now = read_file(path_of(image_name), img_len + 1);
    if (now.size() != img_len || !std::equal(now.begin(), now.end(), img))
      finding("a read-only open changed the image file");
  } else if ((mode & mode_reopen_check) && ((mode >> 3) & 3) != 1 && !std::getenv("BLOCKD_FUZZ_NO_REOPEN_CHECK")) {
    // What a read-write session left behind must open again (read-only, so the corrupt flag the
    // driver may have set on a bad image does not count against it). Not with overlap-check=none:
    // there the driver may, as QEMU does, allocate over tables a hostile image gave refcount 0.
    // BLOCKD_FUZZ_NO_REOPEN_CHECK turns the check off, to fuzz past a known finding of this kind.
    struct stat st {};
    ::stat(path_of(image_name).c_str(), &st);
    auto h2 = read_file(path_of(image_name), size_t(1) << qcow2::max_cluster_bits);
    auto hh = peek_header(h2.data(), h2.size(), uint64_t(st.st_size));
    block::graph g{[&l] { return l.env(); }};
    auto r = g.add(open_options_for(uint8_t(mode | mode_read_only), hh, "re"));
    // The closed session's file may still be referenced by an io_uring worker for a moment after
    // its last completion (the kernel drops that reference on its own time), and its OFD lock with
    // it: a lock refusal is retried until the kernel let go (bounded), anything else is a finding.
    for (int i = 0; i < 200 && !r && r.error().desc.find("lock") != std::string::npos; ++i) {
      ::usleep(5000);
      r = g.add(open_options_for(uint8_t(mode | mode_read_only), hh, "re"));
    }
    if (!r) finding("the image no longer opens after a read-write session: " + r.error().desc);
    g.del("re");
  }
  return out;
}

}  // namespace blockd::fuzz

// Node-path micro-benchmark: keeps qd reads in flight through one block::node on the calling thread's loop; main thread only.
//
// It measures what the data path costs below the export layer: node::submit (checks, accounting),
// the driver, and the reactor's io_uring turn. No CAF, no sockets, so the figures compare directly
// with fio's io_uring engine (file) or with the bare loop overhead (null-co).
// Output: one JSON line on stdout.
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/time.h>
#include <time.h>

#include <boost/json.hpp>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "storage/block/driver.h"
#include "storage/block/graph.h"
#include "storage/block/local_loop.h"
#include "storage/block/node.h"
#include "storage/io/reactor.h"

namespace {

using namespace blockd;

struct options {
  std::string driver = "null-co";
  std::string file;
  std::string rw = "randread";
  int64_t bs = 4096;
  int qd = 32;
  double seconds = 5;
  bool direct = false;
  int64_t null_size = int64_t(1) << 30;
  int64_t step = 0;    // sequential patterns: offset increment (default: bs), like qemu-img bench -S
  int64_t count = 0;   // stop after this many requests (0: run for --seconds), like qemu-img bench -c
};

[[noreturn]] void usage(const char* why) {
  std::fprintf(stderr,
               "bench_node_path: %s\n"
               "usage: bench_node_path [--driver null-co|file|qcow2] [--file PATH] [--rw randread|read|randwrite|write]\n"
               "                       [--bs BYTES] [--qd N] [--seconds S] [--count N] [--step BYTES]\n"
               "                       [--direct 0|1] [--size BYTES (null-co)]\n",
               why);
  std::exit(2);
}

options parse(int argc, char** argv) {
  options o;
  for (int i = 1; i < argc; ++i) {
    std::string k = argv[i];
    if (k == "-h" || k == "--help") usage("help");
    if (i + 1 >= argc) usage(("missing value for " + k).c_str());
    std::string v = argv[++i];
    if (k == "--driver") o.driver = v;
    else if (k == "--file") o.file = v;
    else if (k == "--rw") o.rw = v;
    else if (k == "--bs") o.bs = std::stoll(v);
    else if (k == "--qd") o.qd = std::stoi(v);
    else if (k == "--seconds") o.seconds = std::stod(v);
    else if (k == "--direct") o.direct = v != "0";
    else if (k == "--size") o.null_size = std::stoll(v);
    else if (k == "--step") o.step = std::stoll(v);
    else if (k == "--count") o.count = std::stoll(v);
    else usage(("unknown option " + k).c_str());
  }
  if (o.driver != "null-co" && o.driver != "file" && o.driver != "qcow2") usage("--driver must be null-co, file or qcow2");
  if (o.driver != "null-co" && o.file.empty()) usage("--driver file/qcow2 needs --file");
  if (o.rw != "randread" && o.rw != "read" && o.rw != "randwrite" && o.rw != "write")
    usage("--rw must be randread, read, randwrite or write");
  if (o.bs <= 0 || o.bs % 512) usage("--bs must be a positive multiple of 512");
  if (o.qd <= 0) usage("--qd must be positive");
  return o;
}

double now_s() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return double(ts.tv_sec) + double(ts.tv_nsec) * 1e-9;
}

double tv_s(const timeval& t) { return double(t.tv_sec) + double(t.tv_usec) * 1e-6; }

// xorshift64*: a few cycles per offset, so the generator never shows up next to the I/O path.
struct xorshift {
  uint64_t s = 0x9e3779b97f4a7c15ull;
  uint64_t next() {
    s ^= s >> 12;
    s ^= s << 25;
    s ^= s >> 27;
    return s * 0x2545f4914f6cdd1dull;
  }
};

// Keeps qd requests in flight: every completion immediately resubmits its slot until the deadline.
class driver_loop final : public block::io_waiter {
 public:
  driver_loop(block::node& n, const options& o)
      : node_(n), o_(o), sequential_(o.rw == "read" || o.rw == "write"), writes_(o.rw == "randwrite" || o.rw == "write") {
    blocks_ = n.length() / o.bs;
    step_blocks_ = o.step > 0 ? o.step / o.bs : 1;
    slots_.resize(size_t(o.qd));
    for (auto& s : slots_) {
      void* p = nullptr;
      // 4 KiB alignment satisfies any O_DIRECT request alignment the file driver can probe.
      if (posix_memalign(&p, 4096, size_t(o.bs)) != 0) usage("out of memory for buffers");
      // Touch the buffer so first-use page faults are not charged to the measured window.
      std::memset(p, 0xa5, size_t(o.bs));
      s.buf = p;
    }
  }
  ~driver_loop() {
    for (auto& s : slots_) free(s.buf);
  }

  int64_t blocks() const { return blocks_; }

  void start() {
    for (auto& s : slots_) issue(s);
  }
  bool stopping() const { return stopping_; }
  void stop() { stopping_ = true; }
  int in_flight() const { return in_flight_; }
  uint64_t ios() const { return ios_; }
  uint64_t errors() const { return errors_; }
  int first_error() const { return first_error_; }

 private:
  struct slot {
    block::io_request r;
    void* buf = nullptr;
  };

  void issue(slot& s) {
    int64_t blk;
    if (sequential_) {
      blk = seq_next_;
      seq_next_ += step_blocks_;
      if (seq_next_ >= blocks_) seq_next_ = 0;  // wrap like fio's time_based sequential job
    } else {
      blk = int64_t(rng_.next() % uint64_t(blocks_));
    }
    s.r.reset();
    s.r.op = writes_ ? block::io_op::write : block::io_op::read;
    s.r.offset = blk * o_.bs;
    s.r.set_buffer(s.buf, o_.bs);
    s.r.waiter = this;
    s.r.user = &s;
    ++in_flight_;
    ++issued_;
    node_.submit(s.r);
  }

  void io_done(block::io_request& r) override {
    --in_flight_;
    ++ios_;
    if (r.result != 0) {
      if (!errors_++) first_error_ = r.result;
      stopping_ = true;  // a failing path would measure nothing useful
    }
    if (o_.count > 0 && int64_t(issued_) >= o_.count) stopping_ = true;
    if (!stopping_) issue(*static_cast<slot*>(r.user));
  }

  block::node& node_;
  const options& o_;
  bool sequential_;  // decided once: a string compare per request would show in the null-co figure
  bool writes_;
  int64_t step_blocks_ = 1;
  uint64_t issued_ = 0;
  std::vector<slot> slots_;
  int64_t blocks_ = 0;
  int64_t seq_next_ = 0;
  xorshift rng_;
  bool stopping_ = false;
  int in_flight_ = 0;
  uint64_t ios_ = 0, errors_ = 0;
  int first_error_ = 0;
};

}  // namespace

int main(int argc, char** argv) {
  options o = parse(argc, argv);

  std::string note;
  // 256 entries like the conformance loop; qd beyond that waits in the reactor's overflow list.
  block::local_loop lp(io::reactor::create(256, &note));
  if (!note.empty()) std::fprintf(stderr, "bench_node_path: %s\n", note.c_str());

  block::register_builtin_drivers();
  const block::driver_entry* e = block::find_driver(o.driver);
  if (!e) usage(("driver not registered: " + o.driver).c_str());
  bool writes = o.rw == "randwrite" || o.rw == "write";
  boost::json::object opts;
  boost::json::object cache{{"direct", o.direct}};
  if (o.driver == "file") {
    opts = {{"driver", "file"}, {"filename", o.file}, {"locking", "off"}};
  } else if (o.driver == "qcow2") {
    opts = {{"driver", "qcow2"},
            {"file", boost::json::object{{"driver", "file"}, {"filename", o.file}, {"locking", "off"}}}};
  } else {
    // read-zeroes off: the null path then costs only the node and the loop, which is the point.
    opts = {{"driver", "null-co"}, {"size", o.null_size}, {"read-zeroes", false}};
  }
  opts["node-name"] = "bench0";
  opts["read-only"] = !writes;
  opts["cache"] = cache;
  // The graph opens the stack exactly as blockdev-add would (a qcow2 node gets its file child).
  block::graph g([&lp] { return lp.env(); });
  auto added = g.add(opts);
  if (!added) {
    std::fprintf(stderr, "bench_node_path: open failed: %s\n", added.error().desc.c_str());
    return 1;
  }
  block::node& n = **added;
  if (n.length() < o.bs) usage("the device is smaller than one block");

  driver_loop d(n, o);
  rusage ru0{}, ru1{};
  getrusage(RUSAGE_SELF, &ru0);
  double t0 = now_s();
  double deadline = t0 + o.seconds;
  d.start();
  // Checking the clock once per turn costs ~20 ns against a turn that completes up to qd requests.
  while (d.in_flight() > 0) {
    lp.turn();
    if (!d.stopping() && now_s() >= deadline) d.stop();
  }
  double t1 = now_s();
  getrusage(RUSAGE_SELF, &ru1);

  if (d.errors()) {
    std::fprintf(stderr, "bench_node_path: %llu requests failed, first: %s\n", (unsigned long long)d.errors(),
                 std::strerror(-d.first_error()));
    return 1;
  }
  double secs = t1 - t0;
  double user = tv_s(ru1.ru_utime) - tv_s(ru0.ru_utime);
  double sys = tv_s(ru1.ru_stime) - tv_s(ru0.ru_stime);
  double gib = double(d.ios()) * double(o.bs) / double(1 << 30);
  boost::json::object out{
      {"driver", o.driver},
      {"reactor", lp.reactor->kind()},
      {"rw", o.rw},
      {"bs", o.bs},
      {"qd", o.qd},
      {"direct", o.direct},
      {"ios", d.ios()},
      {"seconds", secs},
      {"iops", double(d.ios()) / secs},
      {"mib_s", gib * 1024 / secs},
      {"cpu_user_s", user},
      {"cpu_sys_s", sys},
      {"cpu_s_per_gib", gib > 0 ? (user + sys) / gib : 0.0},
      {"cpu_s_per_mio", d.ios() ? (user + sys) * 1e6 / double(d.ios()) : 0.0},
      {"node_reads", n.stats().rd.operations},
      {"node_writes", n.stats().wr.operations},
  };
  std::printf("%s\n", boost::json::serialize(out).c_str());
  return 0;
}

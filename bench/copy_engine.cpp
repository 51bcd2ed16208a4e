// Copy-engine benchmark: copies one image into another through two block::node stacks on the calling thread's loop with the block-copy engine; main thread only.
//
// What a backup or mirror job's copy costs without the job layer: block status, reads, writes and
// write-zeroes through the nodes and the reactor. Output: one JSON line on stdout.
#include <sys/resource.h>
#include <time.h>

#include <boost/json.hpp>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "storage/block/copy_engine.h"
#include "storage/block/driver.h"
#include "storage/block/graph.h"
#include "storage/block/local_loop.h"
#include "storage/block/node.h"
#include "storage/io/reactor.h"

namespace {

using namespace blockd;

struct options {
  std::string src, dst, format = "qcow2";
  int64_t granularity = 65536, max_chunk = 1 << 20, buf_size = 16 << 20;
  int workers = 64;
  bool target_zeroed = false, direct = false;
};

[[noreturn]] void usage(const char* why) {
  std::fprintf(stderr,
               "bench_copy_engine: %s\n"
               "usage: bench_copy_engine --src PATH --dst PATH [--format qcow2|raw] [--granularity B]\n"
               "                         [--max-chunk B] [--buf-size B] [--workers N] [--target-zeroed 0|1]\n"
               "                         [--direct 0|1]\n",
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
    if (k == "--src") o.src = v;
    else if (k == "--dst") o.dst = v;
    else if (k == "--format") o.format = v;
    else if (k == "--granularity") o.granularity = std::stoll(v);
    else if (k == "--max-chunk") o.max_chunk = std::stoll(v);
    else if (k == "--buf-size") o.buf_size = std::stoll(v);
    else if (k == "--workers") o.workers = std::stoi(v);
    else if (k == "--target-zeroed") o.target_zeroed = v != "0";
    else if (k == "--direct") o.direct = v != "0";
    else usage(("unknown option " + k).c_str());
  }
  if (o.src.empty() || o.dst.empty()) usage("--src and --dst are required");
  if (o.format != "qcow2" && o.format != "raw") usage("--format must be qcow2 or raw");
  return o;
}

double now_s() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return double(ts.tv_sec) + double(ts.tv_nsec) * 1e-9;
}
double tv_s(const timeval& t) { return double(t.tv_sec) + double(t.tv_usec) * 1e-6; }

}  // namespace

int main(int argc, char** argv) {
  options o = parse(argc, argv);
  std::string note;
  block::local_loop lp(io::reactor::create(256, &note));
  if (!note.empty()) std::fprintf(stderr, "bench_copy_engine: %s\n", note.c_str());
  block::register_builtin_drivers();
  block::graph g([&lp] { return lp.env(); });
  auto open = [&](const std::string& name, const std::string& path, bool ro) -> block::node* {
    boost::json::object f{{"driver", "file"}, {"filename", path}, {"locking", "off"}};
    boost::json::object opts = o.format == "qcow2" ? boost::json::object{{"driver", "qcow2"}, {"file", f}} : f;
    opts["node-name"] = name;
    opts["read-only"] = ro;
    opts["cache"] = boost::json::object{{"direct", o.direct}};
    auto n = g.add(opts);
    if (!n) {
      std::fprintf(stderr, "bench_copy_engine: open %s failed: %s\n", path.c_str(), n.error().desc.c_str());
      std::exit(1);
    }
    return *n;
  };
  block::node* src = open("src", o.src, true);
  block::node* dst = open("dst", o.dst, false);
  if (dst->length() < src->length()) {
    std::fprintf(stderr, "bench_copy_engine: the target is smaller than the source\n");
    return 1;
  }

  bool idle = false;
  int err = 0;
  block::copy_callbacks cb;
  cb.on_idle = [&] { idle = true; };
  cb.on_finished = [&](int e) {
    err = e;
    idle = true;
  };
  block::copy_engine e({.source = src,
                        .target = dst,
                        .granularity = o.granularity,
                        .max_chunk = o.max_chunk,
                        .buf_size = o.buf_size,
                        .max_workers = o.workers,
                        .target_zeroed = o.target_zeroed},
                       cb);
  e.work_map().set(0, src->length());
  rusage ru0{}, ru1{};
  getrusage(RUSAGE_SELF, &ru0);
  double t0 = now_s();
  e.start();
  while (!idle) lp.turn();
  // The copy is only done once the target is flushed (a qcow2 writes its metadata back then).
  int flushed = 1;
  struct flush_waiter final : block::io_waiter {
    int* res;
    void io_done(block::io_request& r) override { *res = r.result; }
  } fw;
  fw.res = &flushed;
  block::io_request fr;
  fr.op = block::io_op::flush;
  fr.waiter = &fw;
  dst->submit(fr);
  while (flushed == 1) lp.turn();
  double t1 = now_s();
  getrusage(RUSAGE_SELF, &ru1);
  if (err || flushed) {
    std::fprintf(stderr, "bench_copy_engine: copy failed: %s\n", std::strerror(-(err ? err : flushed)));
    return 1;
  }
  double secs = t1 - t0;
  double mib = double(src->length()) / double(1 << 20);
  double cpu = tv_s(ru1.ru_utime) - tv_s(ru0.ru_utime) + tv_s(ru1.ru_stime) - tv_s(ru0.ru_stime);
  boost::json::object out{{"format", o.format},
                          {"reactor", lp.reactor->kind()},
                          {"bytes", src->length()},
                          {"seconds", secs},
                          {"mib_s", mib / secs},
                          {"cpu_s", cpu},
                          {"cpu_s_per_gib", cpu / (mib / 1024)},
                          {"largest_request", e.largest_request()},
                          {"buffer_peak", e.buffer_bytes_peak()},
                          {"in_flight_peak", e.in_flight_peak()},
                          {"src_reads", src->stats().rd.operations.get()},
                          {"dst_writes", dst->stats().wr.operations.get()}};
  std::printf("%s\n", boost::json::serialize(out).c_str());
  return 0;
}

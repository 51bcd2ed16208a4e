// null-co / null-aio: a sized device that stores nothing (benchmarks, tests); home iothread only.
#include <cerrno>
#include <cstdint>
#include <cstring>

#include "protocol/qmp/schema.h"
#include "storage/block/driver.h"
#include "storage/io/reactor.h"

namespace blockd::block {
namespace {

class null_driver final : public block_driver {
 public:
  null_driver(driver_env env, int64_t size, int64_t latency_ns, bool read_zeroes)
      : env_(std::move(env)), size_(size), latency_ns_(latency_ns), read_zeroes_(read_zeroes) {}

  uint32_t caps() const override { return cap_write_zeroes | cap_discard | cap_fua | cap_block_status; }
  int64_t length() const override { return size_; }
  void rehome(const driver_env& env) override { env_ = env; }

  void submit(io_request& r) override {
    if (r.op == io_op::read && read_zeroes_)
      for (int i = 0; i < r.iovcnt; ++i) std::memset(r.iov[i].iov_base, 0, r.iov[i].iov_len);
    if (r.op == io_op::block_status) {
      // Reads return zeroes only with read-zeroes; otherwise the buffer is left as it was (QSD's rule).
      r.status = (read_zeroes_ ? bs_zero : bs_data) | bs_allocated;
      r.status_length = r.length;
      r.depth = 1;
    }
    if (latency_ns_ > 0) {
      auto* t = new timer(r);
      env_.reactor->timeout(uint64_t(latency_ns_), t);
      return;
    }
    env_.defer([&r] { r.complete(0); });
  }

 private:
  struct timer final : io::completion {
    explicit timer(io_request& r) : req(r) {}
    io_request& req;
    void complete(int) override {
      auto& r = req;
      delete this;
      r.complete(0);
    }
  };
  driver_env env_;
  int64_t size_;
  int64_t latency_ns_;
  bool read_zeroes_;
};

result<std::unique_ptr<block_driver>> open_null(open_args& a) {
  int64_t size = int64_t(1) << 30;
  if (auto* v = a.options.if_contains("size")) {
    // QSD 7.2 aborts on a negative size; blockd refuses it with the message QSD prints first.
    if (v->is_int64() && v->as_int64() < 0) return fail("Parameter 'size' expects a non-negative number below 2^64");
    if (v->is_uint64() && v->as_uint64() > uint64_t(INT64_MAX))
      return fail("Parameter 'size' must be at most 9223372036854775807 for a null node");
    size = v->is_uint64() ? int64_t(v->as_uint64()) : v->as_int64();
  }
  int64_t latency = 0;
  if (auto* v = a.options.if_contains("latency-ns")) {
    uint64_t u = v->is_uint64() ? v->as_uint64() : uint64_t(v->as_int64());
    if (u > uint64_t(INT64_MAX)) return fail("latency-ns is invalid");
    latency = int64_t(u);
  }
  bool zeroes = false;
  if (auto* v = a.options.if_contains("read-zeroes")) zeroes = v->as_bool();
  return std::unique_ptr<block_driver>(new null_driver(a.env, size, latency, zeroes));
}

}  // namespace

void register_null_drivers() {
  for (const char* name : {"null-co", "null-aio"}) {
    std::string n = name;
    driver_entry e{n, true, {}, open_null, [n](const boost::json::object& o) -> std::string {
                     // QEMU names a null node "null-co://" unless an option makes it "json:{...}".
                     return o.size() == 0 ? n + "://" : std::string();
                   }};
    e.options_type = "BlockdevOptionsNull";
    e.define_options = [](qmp::schema& s) {
      s.object("BlockdevOptionsNull", "*size:int *latency-ns:uint64 *read-zeroes:bool");
    };
    register_driver(std::move(e));
  }
}

}  // namespace blockd::block

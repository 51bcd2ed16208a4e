// A node of the block graph: one driver instance plus the checks, accounting and quiescing around it; home iothread.
#pragma once
#include <boost/json.hpp>

#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "storage/block/counter.h"
#include "storage/block/dirty_bitmap.h"
#include "storage/block/driver.h"
#include "storage/block/edge.h"
#include "storage/block/io_request.h"
#include "storage/block/perm.h"

namespace blockd::block {

enum class detect_zeroes_mode { off, on, unmap };

// Per-operation counters, as query-blockstats reports them. Written on the node's home thread only;
// the supervisor reads them from its own (see counter.h).
struct op_stats {
  counter operations, bytes, failed, invalid, total_time_ns;
};

struct node_stats {
  op_stats rd, wr, unmap, flush, zone_append;
  counter wr_highest_offset;
  stat_counter<int64_t> last_op_ns{-1};  // monotonic time of the last completed operation; -1 = none yet
};

struct node_settings {
  std::string name;
  bool auto_named = false;
  std::string driver;
  bool read_only = false;
  bool auto_read_only = false;
  bool force_share = false;
  bool direct = false;
  bool no_flush = false;
  bool discard_unmap = false;  // discard=unmap: pass discards down (ignore: complete them as no-ops)
  detect_zeroes_mode detect_zeroes = detect_zeroes_mode::off;
  bool active = true;           // blockdev-set-active / BlockdevOptions.active
  boost::json::object options;  // the validated options, with what an inline child inherited
  boost::json::object given;    // the options as the user gave them (an inline child's own dict)
};

class node final : private io_waiter {
 public:
  // `bitmaps`: the set the driver was opened with (open_args::bitmaps); null makes an empty one.
  node(node_settings s, std::unique_ptr<block_driver> drv, driver_env env, std::shared_ptr<bitmap_set> bitmaps = nullptr);
  ~node();

  const node_settings& settings() const { return s_; }
  const driver_env& env() const { return env_; }
  // Moves the node to another iothread. Only with nothing in the driver (quiesced and drained);
  // requests held while quiesced go out on the new home when it resumes there.
  void rehome(driver_env env);
  // A committed reopen or activation change (the graph calls it with the node quiesced).
  void update_settings(node_settings s) { s_ = std::move(s); }
  const std::string& name() const { return s_.name; }
  block_driver& driver() { return *drv_; }
  const block_driver& driver() const { return *drv_; }
  int64_t length() const { return drv_->length(); }

  // Data path. Checks the request against the node (range, read-only, alignment contract), accounts
  // it and hands it to the driver; while quiesced, requests wait and go out on resume.
  void submit(io_request& r);

  // Quiescing: stop admission and call `drained` once nothing is in flight (at once if idle).
  void quiesce(std::function<void()> drained);
  void resume();
  bool quiesced() const { return quiesce_depth_ > 0; }
  size_t in_flight() const { return in_flight_; }  // admitted, including those held while quiesced
  size_t in_driver() const { return in_flight_ - held_.size(); }

  const node_stats& stats() const { return stats_; }

  // What queries show of the image (sizes, format-specific data, snapshots, dirty flag), as the
  // home last published it: after open, after every control task and when a query asks for a
  // refresh. Any thread may read it; only the home computes it, because drivers answer facts()
  // from state their data path changes (a qcow2 header, its snapshot table).
  std::shared_ptr<const image_facts> facts() const { return facts_.load(std::memory_order_acquire); }
  void publish_facts();  // home thread only
  // False once the node is destroyed. Node actors keep a copy: a message queued for a node that a
  // task on the same home has just closed finds it gone instead of touching freed memory.
  std::shared_ptr<const bool> life() const { return life_; }

  // Write threshold: called (once, on the home thread) when a write ends beyond it; 0 disables.
  // Any thread may set it; on_threshold is set before the node takes requests and must be safe to
  // call from the home thread.
  void set_write_threshold(uint64_t t) { write_threshold_.store(t, std::memory_order_relaxed); }
  uint64_t write_threshold() const { return write_threshold_.load(std::memory_order_relaxed); }
  std::function<void(uint64_t exceeded, uint64_t threshold)> on_threshold;

  // Write hooks (write_hook.h), home thread only; a hook stays registered until removed.
  void add_write_hook(write_hook* h);
  void remove_write_hook(write_hook* h);
  // A gating hook that held `r` lets it go on (home thread).
  void release_write(io_request& r);
  // A gating hook that held the completion of `r` (write_hook::hold_completion) lets it go on.
  void release_completion(io_request& r);
  // The node's dirty bitmaps (home thread; the driver of a format that stores them has the same
  // set, see open_args::bitmaps). sync_bitmap_hook() registers the set as a hook while one records;
  // call it after enabling, disabling, adding or removing a bitmap.
  bitmap_set& bitmaps() { return *bitmaps_; }
  const bitmap_set& bitmaps() const { return *bitmaps_; }
  void sync_bitmap_hook();

  // Graph bookkeeping, owned by the graph (changed on the supervisor's thread, with the node
  // quiesced where a driver could see it): one slot per child role of the driver (see edge.h),
  // the filled slots of parents that hold this node, and the roots (exports, jobs, commands).
  std::vector<std::unique_ptr<child_edge>> slots;  // in the driver's role order
  std::vector<child_edge*> parents;
  std::vector<root*> roots;
  // The filled slots, in the order they were attached (QEMU's listing reverses it).
  std::vector<child_edge*> children() const;
  child_edge* slot(const std::string& role) const;
  bool has_users() const { return !parents.empty() || !roots.empty(); }
  uint32_t cum_perm = 0, cum_shared = perm_all;
  bool monitor_owned = false;  // added by blockdev-add / --blockdev as a top-level node

  static int64_t now_ns();

 private:
  struct fua_flush_waiter final : io_waiter {
    node* owner = nullptr;
    void io_done(io_request& f) override;
  };

  void io_done(io_request& r) override;
  void start(io_request& r);
  void finish_later(io_request& r, int res);
  void finish(io_request& r);
  void completion_hooks(io_request& r, size_t from);
  void finish_rest(io_request& r);
  void account(const io_request& r, int64_t start_ns, int64_t end_ns);
  void check_drained();
  void run_hooks(io_request& r, size_t from);
  void to_driver(io_request& r);  // FUA emulation, then the driver
  // A write_zeroes or discard the driver takes in pieces (its opt/max limits, QEMU's
  // bdrv_co_do_pwrite_zeroes and bdrv_co_pdiscard): node_split.cpp. The pieces go out one after
  // another; the request finishes through io_done once all did, or the first one failed.
  struct split_job;
  void split_to_driver(io_request& r, const driver_limits& l);

  node_settings s_;
  std::unique_ptr<block_driver> drv_;
  driver_env env_;
  fua_flush_waiter fua_waiter_;
  node_stats stats_;
  size_t in_flight_ = 0;
  int quiesce_depth_ = 0;
  std::deque<io_request*> held_;
  std::vector<std::function<void()>> drained_;
  std::atomic<uint64_t> write_threshold_{0};
  std::atomic<std::shared_ptr<const image_facts>> facts_;
  std::shared_ptr<bool> life_ = std::make_shared<bool>(true);
  request_pool pool_;
  std::vector<write_hook*> hooks_;
  std::shared_ptr<bitmap_set> bitmaps_;
};

}  // namespace blockd::block

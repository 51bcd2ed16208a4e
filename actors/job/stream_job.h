// block-stream's job: copies what the chain above the base holds into the top image through a copy-on-read filter; the runner on the job actor's thread, the copy loop on the top node's home iothread.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>

#include "actors/job/block_job.h"
#include "storage/block/node.h"

namespace blockd {

class stream_loop;

struct stream_plan {
  block::node* top = nullptr;     // the image that receives the data
  block::node* filter = nullptr;  // the copy-on-read filter above it (the loop reads through it)
  iothread* home = nullptr;       // where both live
  // Allocation depths (as block status counts them from the top) that are copied: 2 .. last.
  // With a base, the base's own depth is last + 1; streaming the whole chain copies every depth.
  int last_depth = 0;             // 0: no limit
  on_error_policy on_error = on_error_policy::report;
  // The graph work of the job's prepare and clean, done by the supervisor (its thread):
  // prepare: the top's backing becomes the base (and its header says so); clean: the filter goes.
  std::function<void(std::function<void(result<void>)> done)> finish;
  std::function<void()> clean;
};

class stream_runner final : public block_job_runner {
 public:
  explicit stream_runner(stream_plan p) : block_job_runner(job::type::stream), plan_(std::move(p)) {}
  ~stream_runner() override;

  void prepare_async(job::core& j, std::function<void(result<void>)> done) override;
  void clean(job::core& j) override;
  void abandon() override;

  // From the loop (through the port): a request failed; the policy decides what the loop does.
  void loop_error(job::core& j, bool is_read, int err);

 protected:
  void body_start(job::core& j) override;
  void body_pause(std::function<void()> parked) override;
  void body_resume() override;
  void body_cancel() override;
  void speed_changed(int64_t speed) override;

 private:
  void to_loop(std::function<void(stream_loop&)> fn);

  stream_plan plan_;
  std::shared_ptr<stream_loop> loop_;
  bool cleaned_ = false;
};

}  // namespace blockd

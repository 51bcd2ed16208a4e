// Image jobs: create on a worker thread with graph access through the supervisor, amend as one step; threads as marked per function.
#include "actors/job/create_job.h"

#include <caf/all.hpp>

#include <cerrno>
#include <cstring>

namespace blockd {

// Worker thread.
result<block::node*> ask_supervisor(const caf::actor& supervisor, job_graph_request r) {
  r.reply = std::make_shared<std::promise<result<block::node*>>>();
  auto answer = r.reply->get_future();
  caf::anon_send(supervisor, job_graph_atom::value, std::move(r));
  try {
    return answer.get();
  } catch (const std::future_error&) {
    return fail("blockd is shutting down");
  }
}

// Job's thread (main iothread).
void create_runner::run(job::core& j) {
  // QEMU's blockdev_create_run: one unit of work, done when the driver returns.
  j.progress_set_remaining(1);
  worker_runner::run(j);
}

// Worker thread.
result<void> create_runner::work(const std::atomic<bool>& cancelled) {
  caf::actor sup = supervisor();
  std::string id = job_id_;
  block::create_args a{options_,
                       [this, sup, id](const boost::json::value& ref) -> result<block::node*> {
                         if (ref.is_null()) return fail("internal error: no node reference to resolve");
                         for (auto& [known, answer] : known_)
                           if (known == ref) return answer;
                         return ask_supervisor(sup, {job_graph_request::op::resolve, id, ref, nullptr});
                       },
                       [&cancelled] { return cancelled.load(); },
                       objects_};
  auto r = entry_->create(a);
  // A creation that stopped for the cancel reports it as QEMU does for every cancelled job.
  if (!r && cancelled.load()) r = fail(std::strerror(ECANCELED));
  // Whatever the outcome, the job lets go of its nodes before it reports (a blockdev-del right
  // after the job concluded must find them free, as in QEMU).
  (void)ask_supervisor(sup, {job_graph_request::op::release, id, nullptr, nullptr});
  return r;
}

// Job's thread (main iothread).
void amend_runner::run(job::core& j) {
  j.progress_set_remaining(1);
  result<void> r;
  if (done_) r = *done_;
  else if (options_.contains("encrypt")) r = fail("image is not encrypted, can't amend");
  j.progress_update(1);
  if (r)
    j.work_done(0);
  else
    j.work_done(-EOPNOTSUPP, r.error().desc);
}

}  // namespace blockd

// The image jobs: blockdev-create (a worker thread calling the driver's create) and x-blockdev-amend (one step on the job's thread); see each member for its thread.
#pragma once
#include <boost/json.hpp>

#include <future>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "actors/job/job_actor.h"
#include "storage/block/driver.h"

namespace blockd {

// Graph work a job body asks of the supervisor (the graph's only writer) from a worker thread. The
// supervisor runs it between commands, never inside one, and answers through the promise.
struct job_graph_request {
  enum class op { resolve, release };
  op what = op::resolve;
  std::string job_id;
  boost::json::value ref;  // resolve: a BlockdevRef (node name or inline BlockdevOptions)
  // Only the message holds the promise: if the supervisor is gone the message is dropped, the
  // promise breaks, and the waiting worker wakes up with an error instead of hanging.
  std::shared_ptr<std::promise<result<block::node*>>> reply;
};

using job_graph_atom = caf::atom_constant<caf::atom("jobgraph")>;  // body -> supervisor: job_graph_request

// Worker thread only (it blocks until the supervisor answered).
result<block::node*> ask_supervisor(const caf::actor& supervisor, job_graph_request r);

// blockdev-create: the driver's create function on a thread of its own. Nodes the options name are
// resolved (and held for writing) by the supervisor; QEMU's create drops them before it returns,
// and so does this job, before it reports back.
class create_runner final : public worker_runner {
 public:
  create_runner(const block::driver_entry* entry, boost::json::object options, std::string job_id)
      : entry_(entry), options_(std::move(options)), job_id_(std::move(job_id)) {}
  void run(job::core& j) override;
  // Answers the supervisor found while it started the job, for the references the options name;
  // resolve() hands them out, errors included, when the driver asks. Set before run().
  using known_refs = std::vector<std::pair<boost::json::value, result<block::node*>>>;
  void preresolve(known_refs known) { known_ = std::move(known); }
  // The secrets the options may name, taken by the supervisor when the command ran. Set before run().
  void set_objects(std::shared_ptr<const block::object_refs> o) { objects_ = std::move(o); }

 protected:
  result<void> work(const std::atomic<bool>& cancelled) override;
  void finished(job::core& j) override { j.progress_update(1); }

 private:
  const block::driver_entry* entry_;
  known_refs known_;
  std::shared_ptr<const block::object_refs> objects_ = std::make_shared<block::object_refs>();
  boost::json::object options_;
  std::string job_id_;
};

// x-blockdev-amend: QEMU's qcow2 amend changes nothing but encryption, so a qcow2 amend without
// "encrypt" succeeds here; keyslot changes (luks, qcow2 with "encrypt") run in the driver first and
// the job reports their outcome. It runs inside start() on the job's thread, so (as in QSD) all its events come
// before the command's return.
class amend_runner final : public job_runner {
 public:
  explicit amend_runner(boost::json::object options) : options_(std::move(options)) {}
  // A driver's amend the supervisor already ran on the node's home (luks): the job only reports it.
  amend_runner(boost::json::object options, result<void> done) : options_(std::move(options)), done_(std::move(done)) {}
  void run(job::core& j) override;

 private:
  boost::json::object options_;
  std::optional<result<void>> done_;
};

}  // namespace blockd

CAF_ALLOW_UNSAFE_MESSAGE_TYPE(blockd::job_graph_request)

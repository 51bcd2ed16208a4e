// iothread and main-loop objects: their tunables with QSD's checks, and the hooks the supervisor's factories fill; plain C++, the model's thread.
#pragma once
#include <string>

#include "config/objects/thread_context.h"
#include "config/qom/model.h"
#include "config/qom/object.h"

namespace blockd::qom {

// The tunables of an event loop (actors/runtime/iothread.h uses this as iothread_params).
struct event_loop_params {
  int64_t poll_max_ns = 32768;
  int64_t poll_grow = 0;
  int64_t poll_shrink = 0;
  int64_t aio_max_batch = 0;
  int64_t thread_pool_min = 0;
  int64_t thread_pool_max = 64;
  // blockd's extension of the iothread object: the id of a thread-context object whose CPUs the
  // loop thread and its worker threads run on ("" = none). Resolved by event_loop_object.
  std::string thread_context;
};

// An iothread or the main-loop object. Without an installed factory the model makes this plain
// object, which records the tunables (unit tests, --object help). The supervisor installs
// factories (type_registry::install_factory) that return a subclass: it starts the thread in
// complete(), applies changed tunables in params_changed(), and moves nodes away before
// finish_delete (see model::prepare_delete).
class event_loop_object : public object {
 public:
  explicit event_loop_object(bool is_main_loop, event_loop_params p) : main_(is_main_loop), p_(p) {}
  // The setter phase of object-add for either type ("X value must be in range [0, ...]").
  static result<event_loop_params> parse(bool is_main_loop, const boost::json::object& props);
  // The default factories (no thread), and the registrations.
  static factory plain_factory(bool is_main_loop);

  const event_loop_params& params() const { return p_; }
  bool is_main_loop() const { return main_; }
  // The thread-context named by the thread-context property, once complete() resolved it; null
  // when none is named. The object holds a reference on it, so it cannot be deleted meanwhile.
  const thread_context_object* thread_context() const { return ctx_; }

  result<boost::json::value> get(const std::string& prop) const override;
  result<void> set(const std::string& prop, const boost::json::value& v) override;
  // Checks thread-pool-min/max and the main-loop singleton (QSD's checks, in its order), then
  // resolves thread-context; subclasses call it first and then pin their thread to
  // thread_context()->cpu_set().
  result<void> complete(model& m) override;
  result<void> can_delete() const override;

 protected:
  // After a successful qom-set: the running loop may pick the new values up.
  virtual void params_changed() {}
  // After qom-set of thread-context resolved the new object (thread_context() tells which, null
  // for ""): the running loop re-pins its threads. An error refuses the change and restores the
  // previous object.
  virtual result<void> thread_context_changed() { return {}; }

 private:
  result<void> resolve_thread_context(model& m, const std::string& tc_id);

  bool main_;
  event_loop_params p_;
  model* model_ = nullptr;  // set by complete(); the model outlives its objects
  const thread_context_object* ctx_ = nullptr;
  ref_handle ctx_ref_;
};

}  // namespace blockd::qom

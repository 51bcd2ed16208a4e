// One structural change of the block graph with prepare / commit / abort / clean, and lists of them run as a transaction; supervisor's thread.
#pragma once
#include <functional>
#include <memory>
#include <vector>

#include "protocol/error.h"

namespace blockd::block {

class node;

// Every structural change (blockdev-add/del/reopen, a child replaced, a filter inserted, later
// snapshots, bitmaps, job starts, export changes) is an action. prepare() makes the change in a
// way that can be undone and may fail (a failed prepare has undone its own part); commit() makes
// it final and cannot fail; abort() undoes a prepared action; clean() runs last either way.
// Permissions are not taken by an action: graph::run updates them once over every node in
// `perm_seeds` of every prepared action, between the prepares and the commits, so a list of
// actions is checked as the graph will be at the end, never halfway.
class action {
 public:
  virtual ~action() = default;
  virtual result<void> prepare() { return {}; }
  virtual void commit() {}
  virtual void abort() {}
  virtual void clean() {}
  std::vector<node*> perm_seeds;

  // Actions whose steps wait for another thread (a driver call sent to a node's home, nodes to
  // drain) override these; each calls `done` exactly once, now or later, on the thread that runs
  // the list. The defaults run the plain steps above. Only run_steps() uses them: graph::run is
  // for lists whose every step is immediate.
  using prepared_fn = std::function<void(result<void>)>;
  virtual void prepare_steps(prepared_fn done) { done(prepare()); }
  virtual void commit_steps(std::function<void()> done) {
    commit();
    done();
  }
  virtual void abort_steps(std::function<void()> done) {
    abort();
    done();
  }
};

// An action with steps from functions (each may be empty: that step succeeds at once). The
// functions may send work to other threads and call their `done` later.
class step_lambda_action final : public action {
 public:
  std::function<void(prepared_fn)> on_prepare;
  std::function<void(std::function<void()>)> on_commit, on_abort;
  std::function<void()> on_clean;
  void prepare_steps(prepared_fn done) override {
    if (!on_prepare) return done({});
    on_prepare(std::move(done));
  }
  void commit_steps(std::function<void()> done) override {
    if (!on_commit) return done();
    on_commit(std::move(done));
  }
  void abort_steps(std::function<void()> done) override {
    if (!on_abort) return done();
    on_abort(std::move(done));
  }
  void clean() override {
    if (on_clean) on_clean();
  }
};

// graph::run for actions with steps: prepare each in order (the next starts once the previous
// reported), one permission update over every prepared action's seeds (`update_perms`), then
// commit all in order or abort the prepared ones in reverse; clean last either way; then `done`.
void run_steps(std::vector<std::unique_ptr<action>> actions,
               std::function<result<void>(const std::vector<node*>&)> update_perms,
               std::function<void(result<void>)> done);

// An action from functions, for changes that need nothing more (each may be empty).
class lambda_action final : public action {
 public:
  std::function<result<void>()> on_prepare;
  std::function<void()> on_commit, on_abort, on_clean;
  result<void> prepare() override { return on_prepare ? on_prepare() : result<void>{}; }
  void commit() override {
    if (on_commit) on_commit();
  }
  void abort() override {
    if (on_abort) on_abort();
  }
  void clean() override {
    if (on_clean) on_clean();
  }
};

}  // namespace blockd::block

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
  virtual result<void> prepare() = 0;
  virtual void commit() {}
  virtual void abort() {}
  virtual void clean() {}
  std::vector<node*> perm_seeds;
};

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

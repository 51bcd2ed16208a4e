// The step runner for action lists whose steps wait for other threads (see action.h); the thread that runs the list.
#include "storage/block/action.h"

#include <memory>

namespace blockd::block {

namespace {

struct step_run : std::enable_shared_from_this<step_run> {
  std::vector<std::unique_ptr<action>> actions;
  std::function<result<void>(const std::vector<node*>&)> update_perms;
  std::function<void(result<void>)> done;
  size_t prepared = 0;
  result<void> res;

  void prepare_next() {
    if (prepared == actions.size()) return decide();
    auto self = shared_from_this();
    actions[prepared]->prepare_steps([self](result<void> r) {
      if (!r) {
        self->res = std::move(r);
        return self->abort_next();
      }
      ++self->prepared;
      self->prepare_next();
    });
  }
  void decide() {
    std::vector<node*> seeds;
    for (auto& a : actions) seeds.insert(seeds.end(), a->perm_seeds.begin(), a->perm_seeds.end());
    if (update_perms && !seeds.empty()) res = update_perms(seeds);
    if (!res) return abort_next();
    commit_from(0);
  }
  void commit_from(size_t i) {
    if (i == actions.size()) return finish();
    auto self = shared_from_this();
    actions[i]->commit_steps([self, i] { self->commit_from(i + 1); });
  }
  void abort_next() {
    if (prepared == 0) return finish();
    auto self = shared_from_this();
    actions[--prepared]->abort_steps([self] { self->abort_next(); });
  }
  void finish() {
    for (auto& a : actions) a->clean();
    auto d = std::move(done);
    auto r = std::move(res);
    actions.clear();
    d(std::move(r));
  }
};

}  // namespace

void run_steps(std::vector<std::unique_ptr<action>> actions,
               std::function<result<void>(const std::vector<node*>&)> update_perms,
               std::function<void(result<void>)> done) {
  auto run = std::make_shared<step_run>();
  run->actions = std::move(actions);
  run->update_perms = std::move(update_perms);
  run->done = std::move(done);
  run->prepare_next();
}

}  // namespace blockd::block

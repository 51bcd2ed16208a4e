// QMP `transaction`: action kinds by name, lists of them run as one control-plane transaction (all prepare, then all commit or all abort in reverse); main iothread only.
#include <caf/all.hpp>

#include "actors/node/node_actor.h"
#include "actors/supervisor/supervisor.h"

namespace blockd {

void supervisor_actor::register_transaction_commands() {
  // `abort` fails in prepare, so everything before it is undone (QEMU's way to test rollback).
  txn_kinds_["abort"].build = [](const boost::json::object&) {
    auto a = std::make_unique<block::lambda_action>();
    a->on_prepare = []() -> result<void> { return fail("Transaction aborted using Abort action"); };
    return std::unique_ptr<block::action>(std::move(a));
  };
  // Every kind the schema's TransactionAction names must be built here (as verify() does for
  // commands), or a client could send one nobody runs.
  if (const qmp::type_def* kinds = qmp::qsd_schema().find_type("TransactionActionKind"))
    for (const std::string& k : kinds->values)
      if (!txn_kinds_.count(k))
        throw std::logic_error("transaction action kind '" + k + "' has no builder; register it or drop it from the schema");

  commands_.add("transaction", [this](boost::json::object& args, reply_fn reply) {
    const auto& actions = args.at("actions").as_array();
    bool grouped = false;
    if (auto* p = args.if_contains("properties"))
      if (auto* m = p->as_object().if_contains("completion-mode")) grouped = m->as_string() == "grouped";
    // completion-mode grouped ties jobs' fates together; a kind without jobs refuses it in its own
    // prepare, in list order as QEMU checks it (so an earlier failure, an abort, answers first).
    std::vector<std::unique_ptr<block::action>> list;
    // The jobs the actions start share one group (their builders take it from here).
    building_group_ = grouped ? job::txn::make() : nullptr;
    auto held = std::make_shared<std::vector<caf::actor>>();
    building_held_ = held;
    for (const auto& v : actions) {
      const auto& o = v.as_object();
      std::string kind(o.at("type").as_string());
      if (grouped && !txn_kinds_.at(kind).grouped && kind != "abort") {
        auto refuse = std::make_unique<block::lambda_action>();
        refuse->on_prepare = [kind]() -> result<void> {
          return fail("Action '" + kind + "' does not support Transaction property completion-mode = grouped");
        };
        list.push_back(std::move(refuse));
        continue;
      }
      static const boost::json::object empty;
      const auto* data = o.if_contains("data");
      list.push_back(txn_kinds_.at(kind).build(data && data->is_object() ? data->as_object() : empty));
    }
    building_group_ = nullptr;
    building_held_ = nullptr;
    // The jobs started at commit run once every action is done, the last started first (its drain of
    // the shared source ends last in QEMU, and that end resumes the newest user first); then the reply.
    run_actions(std::move(list), [this, held, reply = std::move(reply)](command_outcome out) {
      auto left = std::make_shared<size_t>(held->size() + 1);
      auto one = [left, reply, out] {
        if (--*left == 0) reply(out);
      };
      for (auto it = held->rbegin(); it != held->rend(); ++it)
        request(*it, caf::infinite, job_undrain_atom::value).then([one](bool) { one(); }, [one](const caf::error&) { one(); });
      one();
    });
  });
}

void supervisor_actor::run_actions(std::vector<std::unique_ptr<block::action>> list, reply_fn reply) {
  block::run_steps(
      std::move(list),
      [this](const std::vector<block::node*>& seeds) -> result<void> {
        if (!graph_) return fail("blockd is shutting down");
        return graph_->update_perms(seeds);
      },
      [reply = std::move(reply)](result<void> r) {
        reply(r ? command_outcome::success() : command_outcome::failure(r.error()));
      });
}

void supervisor_actor::run_one(const std::string& kind, const boost::json::object& data, reply_fn reply) {
  std::vector<std::unique_ptr<block::action>> list;
  list.push_back(txn_kinds_.at(kind).build(data));
  run_actions(std::move(list), std::move(reply));
}

void supervisor_actor::node_step(const std::string& name, node_fn fn, std::function<void(command_outcome)> then) {
  block::node* n = graph_ ? graph_->find(name) : nullptr;
  if (!n) return then(command_outcome::failure(error("Node '" + name + "' not found")));
  run_on_node(n, std::move(fn), std::move(then));
}

void supervisor_actor::quiesce_nodes(const std::vector<block::node*>& nodes, std::function<void()> then) {
  if (nodes.empty()) return then();
  auto left = std::make_shared<size_t>(nodes.size());
  auto one_done = [left, then = std::move(then)] {
    if (--*left == 0) then();
  };
  for (auto* n : nodes)
    request(node_actors_.at(n->name()).actor, caf::infinite, quiesce_atom::value)
        .then([one_done](bool) { one_done(); }, [one_done](const caf::error&) { one_done(); });
}

void supervisor_actor::resume_nodes(const std::vector<std::string>& names) {
  sync_node_actors();
  for (auto& name : names)
    if (auto it = node_actors_.find(name); it != node_actors_.end()) send(it->second.actor, resume_atom::value);
}

}  // namespace blockd

// The blockd extension x-block-export-add: block-export-add as a transaction action, so an export of a point in time (the node an external snapshot froze) and its checkpoint bitmaps start in the same transaction; main iothread only.
#include "actors/supervisor/supervisor.h"

namespace blockd {

void supervisor_actor::register_export_actions() {
  // Prepare adds the export with every check block-export-add makes; abort deletes it again (its
  // clients, if any connected meanwhile, are closed). Nothing to do at commit.
  txn_kinds_["x-block-export-add"].build = [this](const boost::json::object& d) {
    auto id = std::make_shared<std::string>();
    auto a = std::make_unique<block::step_lambda_action>();
    a->on_prepare = [this, d, id](block::action::prepared_fn done) {
      block_export_add_async(d, [id, d, done](command_outcome o) {
        if (!o.ok) return done(std::unexpected(o.err));
        *id = std::string(d.at("id").as_string());
        done({});
      });
    };
    a->on_abort = [this, id](std::function<void()> done) {
      if (id->empty()) return done();
      shutdown_export(*id, std::move(done));
    };
    return std::unique_ptr<block::action>(std::move(a));
  };
}

}  // namespace blockd

// The supervisor actor: owner of objects, chardevs, monitors and the event bus; pinned to the main iothread.
#pragma once
#include <caf/event_based_actor.hpp>

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "actors/messages.h"
#include "actors/monitor/chardev.h"
#include "actors/runtime/iothread.h"
#include "storage/block/graph.h"

namespace blockd {

struct supervisor_hooks {
  std::function<void()> quit_requested;  // called on the main iothread when a client sends quit
  std::string cli_note_prefix;           // prefix for start-up notes ("blockd: --chardev ...: ")
};

class supervisor_actor : public caf::event_based_actor {
 public:
  supervisor_actor(caf::actor_config& cfg, iothread* home, supervisor_hooks hooks);
  ~supervisor_actor() override;
  caf::behavior make_behavior() override;

  // Emits a QMP event to every subscribed monitor, stamped now.
  void emit(std::string name, boost::json::object data);

 private:
  struct object_entry {
    std::string id;
    std::string type;  // "iothread" or "main-loop"
    iothread_params params;
    std::unique_ptr<iothread> thread;  // iothreads only
  };

  caf::result<command_outcome> run_command(const std::string& name, boost::json::object& args);
  command_outcome blockdev_add(const boost::json::object& args);
  caf::result<command_outcome> blockdev_del(const std::string& name);
  caf::result<command_outcome> block_resize(const boost::json::object& args);
  command_outcome set_write_threshold(const boost::json::object& args);
  // Runs `fn` with `n` quiesced (no request in flight, new ones held), then resumes it and answers.
  caf::result<command_outcome> with_quiesced(block::node& n, std::function<command_outcome()> fn);
  caf::result<command_outcome> with_quiesced(const std::vector<block::node*>& nodes,
                                             std::function<command_outcome()> fn);
  caf::result<command_outcome> blockdev_reopen(const boost::json::object& args);
  caf::result<command_outcome> blockdev_set_active(const boost::json::object& args);
  command_outcome object_add(boost::json::object& args);
  command_outcome object_del(const std::string& id);
  command_outcome add_chardev(const chardev_spec& spec, const std::string& note_prefix);
  command_outcome add_monitor(const std::string& chardev_id, bool pretty, const std::string& id);
  object_entry* find_object(const std::string& id);

  iothread* home_;
  supervisor_hooks hooks_;
  std::vector<object_entry> objects_;  // in creation order, as qom-list shows them
  std::vector<std::unique_ptr<chardev>> chardevs_;
  std::vector<caf::actor> monitors_;
  std::vector<caf::actor> subscribers_;
  bool shutting_down_ = false;
  std::unique_ptr<block::graph> graph_;
  struct node_entry {
    block::node* n;
    caf::actor actor;
  };
  std::map<std::string, node_entry> node_actors_;  // by node name
  void sync_node_actors();
};

}  // namespace blockd

CAF_ALLOW_UNSAFE_MESSAGE_TYPE(blockd::chardev_spec)

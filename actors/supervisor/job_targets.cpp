// Supervisor: the images drive-mirror and drive-backup make and open for their jobs (probe, create, open as the job's own node, close again when the job is refused); main iothread only, image creation on the source's home.
#include <caf/all.hpp>

#include <fstream>

#include "actors/supervisor/supervisor.h"
#include "storage/block/image_create.h"

namespace blockd {

block::node* cow_backing(block::node* n) {
  auto is_filter = [](const block::node& x) {
    auto* e = block::find_driver(x.settings().driver);
    return e && e->is_filter;
  };
  while (n && is_filter(*n)) {
    auto kids = n->children();
    n = kids.empty() ? nullptr : kids.front()->child;
  }
  if (!n) return nullptr;
  auto* b = n->slot("backing");
  return b ? b->child : nullptr;
}

// As QEMU's probe sees the two formats blockd opens: qcow2 by its magic, raw otherwise (the file's own
// errors come from the open that follows).
std::string probe_format(const std::string& file) {
  std::ifstream f(file, std::ios::binary);
  char magic[4] = {};
  if (f && f.read(magic, 4) && magic[0] == 'Q' && magic[1] == 'F' && magic[2] == 'I' && uint8_t(magic[3]) == 0xfb)
    return "qcow2";
  return "raw";
}

void supervisor_actor::create_job_image(bool existing, block::node* src, const block::overlay_image& img,
                                        reply_fn then) {
  if (existing) return then(command_outcome::success());
  block::driver_env env = env_for(home_of(src));
  // The file is written on the source's home: its thread owns that iothread's ring.
  run_on_node(src, [img, env](block::node&) {
    auto r = block::create_image(img, env);
    return r ? command_outcome::success() : command_outcome::failure(r.error());
  }, std::move(then));
}

void supervisor_actor::open_job_target(iothread* home, const boost::json::object& opts, reply_fn failed,
                                       std::function<void(block::node&)> opened) {
  auto staged = graph_->begin_add(opts, env_for(home));
  staged->auto_name = true;
  block::graph* g = graph_.get();
  run_at(home, [g, staged] {
    auto r = g->open_staged(*staged);
    return r ? command_outcome::success() : command_outcome::failure(r.error());
  }, [this, staged, home, failed = std::move(failed), opened = std::move(opened)](command_outcome o) {
    if (!o.ok) return failed(o);
    for (block::node* x : staged->created) homes_[x] = home;
    auto n = graph_->commit_staged(*staged);
    if (!n) return when_closed([failed, e = n.error()] { failed(command_outcome::failure(e)); });
    adopt_new_nodes(home);
    (*n)->monitor_owned = false;  // the job's node: it stays only if the job gives it users
    opened(**n);
  });
}

reply_fn supervisor_actor::drop_target_if_refused(std::string target, reply_fn reply) {
  // A refused start closes the target again (QEMU's bdrv_unref); the image file stays.
  return [this, target = std::move(target), reply = std::move(reply)](command_outcome out) {
    if (out.ok) return reply(out);
    block::node* t = graph_->find(target);
    if (!t || t->has_users()) return reply(out);
    graph_->del(target);
    sync_node_actors();
    when_closed([reply, out] { reply(out); });
  };
}

}  // namespace blockd

// QMP dirty bitmap commands and their transaction actions: lookups here, every bitmap change as a node task on the node's home (where writes dirty the bitmaps); main iothread only.
#include "actors/supervisor/supervisor.h"
#include "storage/block/bitmap_ops.h"

namespace blockd {
namespace {

using block::dirty_bitmap;

std::string str(const boost::json::object& o, const char* key) {
  auto* v = o.if_contains(key);
  return v && v->is_string() ? std::string(v->as_string()) : std::string();
}

// A bitmap's state before an action changed it, for abort (the action's steps share it).
struct bitmap_undo {
  dirty_bitmap* bitmap = nullptr;
  std::shared_ptr<dirty_bitmap> backup;  // bits before a clear or merge
  bool enabled = false;
};

}  // namespace

void supervisor_actor::register_bitmap_commands() {
  using block::step_lambda_action;
  using prepared_fn = block::action::prepared_fn;
  using done_fn = std::function<void()>;
  auto reply_as = [](prepared_fn done) { return [done](command_outcome o) { done(o.as_result()); }; };
  auto ignore = [](done_fn done) { return [done](command_outcome) { done(); }; };

  // ---- block-dirty-bitmap-add --------------------------------------------------------------
  txn_kinds_["block-dirty-bitmap-add"].build = [this, reply_as, ignore](const boost::json::object& d) {
    block::bitmap_add_request req;
    req.name = str(d, "name");
    if (auto* g = d.if_contains("granularity")) req.granularity = g->to_number<uint64_t>();
    if (auto* p = d.if_contains("persistent")) req.persistent = p->as_bool();
    if (auto* x = d.if_contains("disabled")) req.disabled = x->as_bool();
    if (auto* x = d.if_contains("x-exist-ok")) req.exist_ok = x->as_bool();
    std::string node = str(d, "node");
    auto a = std::make_unique<step_lambda_action>();
    auto added = std::make_shared<std::string>();  // the node it went to, once added
    a->on_prepare = [this, req, node, added, reply_as](prepared_fn done) {
      if (req.name.empty()) return done(fail("Bitmap name cannot be empty"));
      auto n = graph_->lookup(&node, &node);
      if (!n) return done(std::unexpected<error>(n.error()));
      run_on_node(*n, [req, added](block::node& x) {
        bool made = false;
        auto r = block::add_bitmap(x, req, &made);
        if (!r) return command_outcome::failure(r.error());
        if (made) *added = x.name();  // an existing one (x-exist-ok) is not undone
        return command_outcome::success();
      }, reply_as(done));
    };
    a->on_abort = [this, req, added, ignore](done_fn done) {
      if (added->empty()) return done();
      node_step(*added, [req](block::node& x) {
        block::release_bitmap(x, req.name);
        return command_outcome::success();
      }, ignore(done));
    };
    return std::unique_ptr<block::action>(std::move(a));
  };

  // ---- block-dirty-bitmap-remove: the stored copy goes in prepare, the bitmap at commit -------
  txn_kinds_["block-dirty-bitmap-remove"].build = [this, reply_as, ignore](const boost::json::object& d) {
    std::string node = str(d, "node"), name = str(d, "name");
    auto* mo = d.if_contains("x-missing-ok");
    bool missing_ok = mo && mo->as_bool();
    auto a = std::make_unique<step_lambda_action>();
    a->on_prepare = [this, node, name, missing_ok, reply_as](prepared_fn done) {
      node_step(node, [name, missing_ok](block::node& x) {
        // x-missing-ok (a blockd extension): a bitmap already gone is what a retry wants.
        if (missing_ok && !x.bitmaps().find(name)) return command_outcome::success();
        auto b = block::prepare_remove(x, name);
        if (!b) return command_outcome::failure(b.error());
        // Until the transaction ends nothing else may use it, and a close would not store it.
        (*b)->skip_store = true;
        (*b)->busy = true;
        return command_outcome::success();
      }, reply_as(done));
    };
    a->on_commit = [this, node, name, ignore](done_fn done) {
      node_step(node, [name](block::node& x) {
        block::release_bitmap(x, name);
        return command_outcome::success();
      }, ignore(done));
    };
    a->on_abort = [this, node, name, ignore](done_fn done) {
      node_step(node, [name](block::node& x) {
        if (dirty_bitmap* b = x.bitmaps().find(name)) {
          b->skip_store = false;
          b->busy = false;
        }
        return command_outcome::success();
      }, ignore(done));
    };
    return std::unique_ptr<block::action>(std::move(a));
  };

  // ---- clear, enable, disable: one change with its undo -------------------------------------
  enum class change { clear, enable, disable };
  auto simple = [this, reply_as, ignore](change c) {
    return [this, c, reply_as, ignore](const boost::json::object& d) {
      std::string node = str(d, "node"), name = str(d, "name");
      auto undo = std::make_shared<bitmap_undo>();
      auto a = std::make_unique<step_lambda_action>();
      a->on_prepare = [this, c, node, name, undo, reply_as](prepared_fn done) {
        node_step(node, [c, name, undo](block::node& x) {
          auto b = block::find_bitmap(x, name);
          if (!b) return command_outcome::failure(b.error());
          dirty_bitmap& bm = **b;
          if (auto r = block::check_bitmap(bm, c == change::clear ? block::need_default : block::need_allow_ro); !r)
            return command_outcome::failure(r.error());
          undo->bitmap = &bm;
          undo->enabled = bm.enabled;
          if (c == change::clear) {
            undo->backup = std::make_shared<dirty_bitmap>(bm);
            bm.clear();
          } else {
            bm.enabled = c == change::enable;
            x.sync_bitmap_hook();
          }
          return command_outcome::success();
        }, reply_as(done));
      };
      a->on_abort = [this, node, undo, ignore](done_fn done) {
        node_step(node, [undo](block::node& x) {
          if (undo->backup) undo->bitmap->copy_bits_from(*undo->backup);
          undo->bitmap->enabled = undo->enabled;
          x.sync_bitmap_hook();
          return command_outcome::success();
        }, ignore(done));
      };
      return std::unique_ptr<block::action>(std::move(a));
    };
  };
  txn_kinds_["block-dirty-bitmap-clear"].build = simple(change::clear);
  txn_kinds_["block-dirty-bitmap-enable"].build = simple(change::enable);
  txn_kinds_["block-dirty-bitmap-disable"].build = simple(change::disable);

  // ---- block-dirty-bitmap-merge ---------------------------------------------------------------
  // The sources are gathered into a scratch bitmap shaped like the target, each on its own node's
  // home (a source may live on another iothread), and the target takes the scratch bits last, so
  // a failure anywhere leaves the target as it was. Errors come in QEMU's order: the target's
  // lookup, then per source its lookup, the target's state (checked with the first source), the
  // source's state and its size.
  txn_kinds_["block-dirty-bitmap-merge"].build = [this, reply_as, ignore](const boost::json::object& d) {
    struct merge_state {
      std::string node, target;
      std::vector<std::pair<std::string, std::string>> sources;  // (node, name); node empty = the target's
      std::shared_ptr<dirty_bitmap> scratch;
      std::optional<error> target_refused;  // the target's state check, reported after the first lookup
      bitmap_undo undo;
    };
    auto st = std::make_shared<merge_state>();
    st->node = str(d, "node");
    st->target = str(d, "target");
    if (auto* l = d.if_contains("bitmaps"))
      for (auto& v : l->as_array()) {
        if (v.is_string())
          st->sources.emplace_back("", std::string(v.as_string()));
        else
          st->sources.emplace_back(str(v.as_object(), "node"), str(v.as_object(), "name"));
      }
    auto a = std::make_unique<step_lambda_action>();
    a->on_prepare = [this, st, reply_as](prepared_fn done) {
      auto step = std::make_shared<std::function<void(size_t)>>();
      // Steps: the target (scratch made), each source in order, then the target takes the bits.
      *step = [this, st, step, done, reply_as](size_t i) {
        if (i == st->sources.size()) {
          return node_step(st->node, [st](block::node& x) {
            auto b = block::find_bitmap(x, st->target);
            if (!b) return command_outcome::failure(b.error());
            if (auto r = block::check_bitmap(**b, block::need_default); !r) return command_outcome::failure(r.error());
            st->undo.bitmap = *b;
            st->undo.backup = std::make_shared<dirty_bitmap>(**b);
            (*b)->merge_from(*st->scratch);
            return command_outcome::success();
          }, [step, done](command_outcome o) {
            *step = nullptr;  // breaks the self-reference
            done(o.as_result());
          });
        }
        auto& [src_node, src_name] = st->sources[i];
        auto merge_src = [st, name = src_name](block::node& x) {
          auto b = block::find_bitmap(x, name);
          if (!b) return command_outcome::failure(b.error());
          if (st->target_refused) return command_outcome::failure(*st->target_refused);
          // A source may be read-only, but not busy (a transaction's remove holds it) nor inconsistent.
          if (auto r = block::check_bitmap(**b, block::need_allow_ro); !r) return command_outcome::failure(r.error());
          if ((*b)->size() != st->scratch->size())
            return command_outcome::failure(error("Bitmaps are of different sizes (destination size is " +
                                                  std::to_string(st->scratch->size()) + ", source size is " +
                                                  std::to_string((*b)->size()) + ") and can't be merged"));
          st->scratch->merge_from(**b);
          return command_outcome::success();
        };
        node_step(src_node.empty() ? st->node : src_node, merge_src, [step, i, done](command_outcome o) {
          if (!o.ok) {
            *step = nullptr;
            return done(o.as_result());
          }
          (*step)(i + 1);
        });
      };
      node_step(st->node, [st](block::node& x) {
        auto b = block::find_bitmap(x, st->target);
        if (!b) return command_outcome::failure(b.error());
        // QSD 7.2 (and upstream QEMU as read, same code) crashes on an empty list once the merge would
        // commit (it frees the backup of a target no source touched); blockd refuses it instead.
        if (st->sources.empty()) return command_outcome::failure(error("Parameter 'bitmaps' must list at least one bitmap"));
        // The target is judged before any source's state, but after the first source's lookup (QSD 7.2
        // answers a missing first source before a busy target).
        if (auto r = block::check_bitmap(**b, block::need_default); !r) st->target_refused = r.error();
        st->scratch = std::make_shared<dirty_bitmap>("", (*b)->granularity(), (*b)->size());
        return command_outcome::success();
      }, [step, done](command_outcome o) {
        if (!o.ok) {
          *step = nullptr;
          return done(o.as_result());
        }
        (*step)(0);
      });
    };
    a->on_abort = [this, st, ignore](done_fn done) {
      node_step(st->node, [st](block::node&) {
        if (st->undo.backup) st->undo.bitmap->copy_bits_from(*st->undo.backup);
        return command_outcome::success();
      }, ignore(done));
    };
    return std::unique_ptr<block::action>(std::move(a));
  };

  // ---- the plain commands: each one action run alone -------------------------------------------
  for (const char* kind : {"block-dirty-bitmap-add", "block-dirty-bitmap-remove", "block-dirty-bitmap-clear",
                           "block-dirty-bitmap-enable", "block-dirty-bitmap-disable", "block-dirty-bitmap-merge"})
    commands_.add(kind, [this, kind = std::string(kind)](boost::json::object& a, reply_fn r) { run_one(kind, a, std::move(r)); });

  commands_.add("x-debug-block-dirty-bitmap-sha256", [this](boost::json::object& a, reply_fn reply) {
    std::string name = str(a, "name");
    node_step(str(a, "node"), [name](block::node& x) {
      auto b = block::find_bitmap(x, name);
      if (!b) return command_outcome::failure(b.error());
      return command_outcome::success(boost::json::object{{"sha256", (*b)->sha256()}});
    }, std::move(reply));
  });
}

}  // namespace blockd

// Unit tests of the graph editing core: slots, roots, replace/insert/remove, two-phase permissions, transactions; test thread only.
#include <gtest/gtest.h>
#include <unistd.h>

#include <boost/json.hpp>
#include <cstdlib>
#include <string>

#include "storage/block/contract.h"
#include "storage/block/graph.h"
#include "storage/block/local_loop.h"
#include "storage/block/node.h"
#include "storage/block/sync_io.h"
#include "storage/io/reactor.h"

namespace blockd::block {
namespace {

namespace json = boost::json;

struct stack {
  local_loop loop{io::reactor::create(64, nullptr)};
  graph g{[this] { return loop.env(); }};
  stack() {
    set_contract_checks(true);
    set_contract_handler([](const std::string& what) { ADD_FAILURE() << what; });
  }
  node* null(const std::string& name) {
    auto r = g.add(json::object{{"driver", "null-co"}, {"node-name", name}, {"size", 1 << 20}});
    EXPECT_TRUE(r) << (r ? "" : r.error().desc);
    return r ? *r : nullptr;
  }
  node* raw(const std::string& name, const std::string& file, json::object extra = {}) {
    json::object o{{"driver", "raw"}, {"node-name", name}, {"file", file}};
    for (auto& kv : extra) o[kv.key()] = kv.value();
    auto r = g.add(o);
    EXPECT_TRUE(r) << (r ? "" : r.error().desc);
    return r ? *r : nullptr;
  }
};

root writer(const std::string& key, uint32_t shared = perm_all) {
  root r;
  r.key = key;
  r.description = "export '" + key + "'";
  r.perm = perm_consistent_read | perm_write;
  r.shared = shared;
  return r;
}

TEST(graph_edit, a_slot_follows_a_replaced_child) {
  stack s;
  node* a = s.null("a");
  node* b = s.null("b");
  node* top = s.raw("top", "a");
  child_edge* e = top->slot("file");
  ASSERT_NE(e, nullptr);
  ASSERT_TRUE(s.g.set_child(*e, b));
  EXPECT_EQ(e->child, b);
  EXPECT_TRUE(a->parents.empty());
  ASSERT_EQ(b->parents.size(), 1u);
  // Reads now go to b: the driver reached it through its slot without being told.
  std::vector<char> buf(512, 1);
  EXPECT_EQ(sync_io(*top).read(buf.data(), 512, 0), 0);
  EXPECT_EQ(b->stats().rd.operations.get(), 1u);
  EXPECT_EQ(a->stats().rd.operations.get(), 0u);
  // A cycle is refused and changes nothing.
  auto r = s.g.set_child(*e, top);
  EXPECT_FALSE(r);
  EXPECT_EQ(e->child, b);
}

TEST(graph_edit, a_refused_root_changes_no_permission) {
  stack s;
  node* a = s.null("a");
  root w1 = writer("e1", perm_consistent_read | perm_write_unchanged | perm_resize);  // does not share write
  ASSERT_TRUE(s.g.attach_root(w1, *a));
  uint32_t perm = a->cum_perm, shared = a->cum_shared;
  root w2 = writer("e2");
  auto r = s.g.attach_root(w2, *a);
  ASSERT_FALSE(r);
  EXPECT_NE(r.error().desc.find("Permission conflict on node 'a'"), std::string::npos) << r.error().desc;
  EXPECT_NE(r.error().desc.find("export 'e2'"), std::string::npos) << r.error().desc;
  EXPECT_EQ(a->roots.size(), 1u);
  EXPECT_EQ(a->cum_perm, perm);
  EXPECT_EQ(a->cum_shared, shared);
  EXPECT_EQ(w2.target, nullptr);
  s.g.detach_root(w1);
  EXPECT_EQ(a->cum_perm, 0u);
  ASSERT_TRUE(s.g.attach_root(w2, *a));
  s.g.detach_root(w2);
}

TEST(graph_edit, repoint_moves_permissions_all_or_nothing) {
  stack s;
  node* a = s.null("a");
  node* b = s.null("b");
  root w = writer("e0");
  ASSERT_TRUE(s.g.attach_root(w, *a));
  ASSERT_TRUE(s.g.repoint_root(w, *b));
  EXPECT_EQ(w.target, b);
  EXPECT_EQ(a->cum_perm, 0u);
  EXPECT_EQ(b->cum_perm, uint32_t(perm_consistent_read | perm_write));
  // b is held by a user that does not share writing: moving back onto... a user on a that refuses writers.
  root ro = writer("e1", perm_consistent_read);
  ro.perm = perm_consistent_read;
  ASSERT_TRUE(s.g.attach_root(ro, *a));
  EXPECT_FALSE(s.g.repoint_root(w, *a));
  EXPECT_EQ(w.target, b);
  EXPECT_EQ(b->cum_perm, uint32_t(perm_consistent_read | perm_write));
  EXPECT_EQ(a->cum_perm, uint32_t(perm_consistent_read));
  s.g.detach_root(ro);
  s.g.detach_root(w);
}

TEST(graph_edit, filters_go_in_above_a_node_and_come_out_again) {
  stack s;
  node* base = s.null("base");
  node* fmt = s.raw("fmt", "base");
  root w = writer("e0");
  ASSERT_TRUE(s.g.attach_root(w, *base));
  node* filter = s.raw("flt", "base");
  ASSERT_TRUE(s.g.insert_filter(*filter, *base));
  // Every other user of base now holds the filter; the filter itself keeps base.
  EXPECT_EQ(fmt->slot("file")->child, filter);
  EXPECT_EQ(w.target, filter);
  ASSERT_EQ(base->parents.size(), 1u);
  EXPECT_EQ(base->parents[0]->parent, filter);
  EXPECT_EQ(base->cum_perm, uint32_t(perm_consistent_read | perm_write));
  ASSERT_TRUE(s.g.remove_filter(*filter));
  EXPECT_EQ(fmt->slot("file")->child, base);
  EXPECT_EQ(w.target, base);
  EXPECT_TRUE(s.g.alive(filter));  // the monitor added it: it stays until blockdev-del
  s.g.detach_root(w);
}

TEST(graph_edit, a_transaction_aborts_every_prepared_action) {
  stack s;
  node* a = s.null("a");
  int committed = 0, aborted = 0, cleaned = 0;
  std::vector<std::unique_ptr<action>> list;
  node* added = nullptr;
  list.push_back(s.g.add_action(json::object{{"driver", "raw"}, {"node-name", "r0"}, {"file", "a"}}, &added));
  auto ok = std::make_unique<lambda_action>();
  ok->on_commit = [&] { ++committed; };
  ok->on_abort = [&] { ++aborted; };
  ok->on_clean = [&] { ++cleaned; };
  list.push_back(std::move(ok));
  auto bad = std::make_unique<lambda_action>();
  bad->on_prepare = [] { return result<void>(fail("refused")); };
  bad->on_clean = [&] { ++cleaned; };
  list.push_back(std::move(bad));
  auto r = s.g.run(std::move(list));
  ASSERT_FALSE(r);
  EXPECT_EQ(committed, 0);
  EXPECT_EQ(aborted, 1);
  EXPECT_EQ(cleaned, 2);
  EXPECT_EQ(added, nullptr);
  EXPECT_EQ(s.g.find("r0"), nullptr);  // the node the first action opened is closed again
  EXPECT_TRUE(a->parents.empty());
}

TEST(graph_edit, reopen_can_empty_and_fill_a_backing_slot_and_closes_a_replaced_inline_child) {
  stack s;
  node* b = s.null("b");
  auto top = s.g.add(json::object{{"driver", "raw"}, {"node-name", "top"},
                                  {"file", json::object{{"driver", "null-co"}, {"size", 1 << 20}}}});
  ASSERT_TRUE(top);
  node* inline_child = (*top)->slot("file")->child;
  ASSERT_NE(inline_child, nullptr);
  auto r = s.g.reopen(json::array{json::object{{"driver", "raw"}, {"node-name", "top"}, {"file", "b"}}});
  ASSERT_TRUE(r) << r.error().desc;
  EXPECT_EQ((*top)->slot("file")->child, b);
  EXPECT_FALSE(s.g.alive(inline_child));
  EXPECT_EQ(s.g.nodes_newest_first().size(), 2u);
}

}  // namespace
}  // namespace blockd::block

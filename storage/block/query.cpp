// Builds QSD's query replies from the graph, the facts each node's home published and relaxed counters; supervisor's thread.
#include "storage/block/query.h"

#include <map>
#include <optional>
#include <string>
#include <vector>

namespace blockd::block {
namespace {

const node* child_of(const node& n, const char* role) {
  for (const child_edge* e : n.children())
    if (e->role == role) return e->child;
  return nullptr;
}

// The child whose data this node presents (QEMU's "primary child"): a format's or filter's file.
const node* primary_child(const node& n) {
  if (auto* f = child_of(n, "file")) return f;
  return nullptr;
}

// A node's children in QEMU's bs->children order: each attach inserts at the head, so the newest edge comes
// first (a qcow2 node lists backing, data-file, file). The graph keeps them in attachment order.
std::vector<const child_edge*> qemu_children(const node& n) {
  auto kids = n.children();
  return std::vector<const child_edge*>(kids.rbegin(), kids.rend());
}

// QEMU's path_has_protocol: a ':' before any '/'.
bool has_protocol(const std::string& p) {
  auto i = p.find_first_of(":/");
  return i != std::string::npos && p[i] == ':';
}

// bdrv_get_full_backing_filename: the image's own backing file name made absolute against the directory of
// the node's primary child (its image file), as bdrv_dirname finds it; none where that has no directory
// (a "json:" filename).
std::optional<std::string> full_backing_filename(const graph& g, const node& n, const std::string& name) {
  if (name.empty()) return std::nullopt;
  if (name[0] == '/' || has_protocol(name)) return name;
  const node* at = &n;
  while (const node* c = primary_child(*at)) at = c;
  std::string base = g.filename(*at);
  if (base.rfind("json:", 0) == 0) return std::nullopt;
  auto slash = base.rfind('/');
  return (slash == std::string::npos ? std::string() : base.substr(0, slash + 1)) + name;
}

// virtual-size is bdrv_getlength(): whole 512-byte sectors, so a file's odd length rounds up.
int64_t sectors_rounded(int64_t size) { return size < 0 ? size : (size + 511) / 512 * 512; }

// ImageInfo. The backing-filename members come from the image's own header (bs->backing_file), whatever
// backing node is attached or not (backing: null, or given by node name); backing-image follows the
// attached backing node. Members go in in QAPI schema order, as QEMU's output visitor adds them: the
// writer orders them by QDict bucket, and within a shared bucket the newest comes first.
boost::json::object image_info(const graph& g, const node& n, bool flat) {
  // Never the driver: it belongs to the node's home, which published this copy.
  auto published = n.facts();
  const image_facts& f = *published;
  boost::json::object img;
  img["filename"] = g.filename(n);
  img["format"] = n.settings().driver;
  if (f.has_dirty_flag) img["dirty-flag"] = f.dirty;
  img["actual-size"] = f.actual_size;
  img["virtual-size"] = sectors_rounded(f.virtual_size);
  if (f.cluster_size) img["cluster-size"] = f.cluster_size;
  if (!f.backing_filename.empty()) {
    img["backing-filename"] = f.backing_filename;
    if (auto full = full_backing_filename(g, n, f.backing_filename)) img["full-backing-filename"] = *full;
    if (!f.backing_format.empty()) img["backing-filename-format"] = f.backing_format;
  }
  if (f.has_snapshots && !f.snapshots.empty()) img["snapshots"] = f.snapshots;
  if (!f.format_specific.is_null()) img["format-specific"] = f.format_specific;
  if (!flat) {
    const node* b = child_of(n, "backing");
    if (!b)
      if (const driver_entry* e = find_driver(n.settings().driver); e && e->is_filter) b = primary_child(n);
    if (b) img["backing-image"] = image_info(g, *b, flat);
  }
  return img;
}

const char* detect_zeroes_name(detect_zeroes_mode m) {
  switch (m) {
    case detect_zeroes_mode::on: return "on";
    case detect_zeroes_mode::unmap: return "unmap";
    default: return "off";
  }
}

boost::json::object device_info(const graph& g, const node& n, bool flat) {
  const auto& s = n.settings();
  boost::json::object o;
  o["iops_rd"] = 0;
  o["detect_zeroes"] = detect_zeroes_name(s.detect_zeroes);
  o["image"] = image_info(g, n, flat);
  o["iops_wr"] = 0;
  o["ro"] = s.read_only;
  o["node-name"] = s.name;
  // Counts the backing images the reply nests, so a flat reply says 0 (QEMU counts image.backing-image).
  int depth = 0;
  for (const boost::json::value* b = o["image"].as_object().if_contains("backing-image"); b;
       b = b->as_object().if_contains("backing-image"))
    ++depth;
  // backing_file shares its QDict bucket with write_threshold and goes in first (schema order), so it
  // prints after it, as in QSD.
  if (const node* b = child_of(n, "backing")) o["backing_file"] = g.filename(*b);
  o["backing_file_depth"] = depth;
  o["drv"] = s.driver;
  o["iops"] = 0;
  o["bps_wr"] = 0;
  o["write_threshold"] = n.write_threshold();
  // Present only on a node with bitmaps, as in QSD (newest first).
  if (auto f = n.facts(); !f->bitmaps.empty()) {
    boost::json::array bms;
    for (const bitmap_fact& b : f->bitmaps) bms.push_back(to_json(b));
    o["dirty-bitmaps"] = std::move(bms);
  }
  o["encrypted"] = false;
  o["bps"] = 0;
  o["bps_rd"] = 0;
  o["cache"] = boost::json::object{{"no-flush", s.no_flush}, {"direct", s.direct}, {"writeback", true}};
  o["file"] = g.filename(n);
  boost::json::array children;
  for (auto* e : qemu_children(n))
    children.push_back(boost::json::object{{"child", e->role}, {"node-name", e->child->name()}});
  o["children"] = std::move(children);
  o["active"] = s.active;
  return o;
}

// One operation kind's counters; flushes move no bytes and are never merged, so QEMU has no such members.
void put_op(boost::json::object& st, const char* prefix, const op_stats& op) {
  std::string p(prefix);
  bool moves_data = p != "flush";
  if (moves_data) st[p + "_bytes"] = op.bytes.get();
  st[p + "_operations"] = op.operations.get();
  st[p + "_total_time_ns"] = op.total_time_ns.get();
  if (moves_data) st[p + "_merged"] = 0;
  st["failed_" + p + "_operations"] = op.failed.get();
  st["invalid_" + p + "_operations"] = op.invalid.get();
}

boost::json::object device_stats(const node& n) {
  const node_stats& ns = n.stats();
  boost::json::object st;
  put_op(st, "rd", ns.rd);
  put_op(st, "wr", ns.wr);
  put_op(st, "zone_append", ns.zone_append);
  put_op(st, "unmap", ns.unmap);
  put_op(st, "flush", ns.flush);
  st["wr_highest_offset"] = ns.wr_highest_offset.get();
  // blockd accounts failed and invalid requests of every node (QEMU only does it on block backends).
  st["account_invalid"] = true;
  st["account_failed"] = true;
  st["timed_stats"] = boost::json::array();
  if (int64_t last = ns.last_op_ns; last >= 0) st["idle_time_ns"] = node::now_ns() - last;
  return st;
}

// BlockStats.parent: the primary child where it holds the data, else the one child that does (QEMU's
// bdrv_query_bds_stats). A qcow2 image with an external data file keeps only metadata in its file, so the
// data file is its parent there.
const node* stats_parent(const node& n) {
  if (auto* d = child_of(n, "data-file")) return d;
  return primary_child(n);
}

boost::json::object node_stats_entry(const node& n) {
  boost::json::object o;
  o["stats"] = device_stats(n);
  o["node-name"] = n.name();
  auto ds = n.driver().driver_stats();
  if (!ds.is_null()) o["driver-specific"] = std::move(ds);
  if (const node* p = stats_parent(n)) o["parent"] = node_stats_entry(*p);
  return o;
}

}  // namespace

boost::json::array named_block_nodes(const graph& g, bool flat) {
  boost::json::array out;
  for (const node* n : g.nodes_newest_first()) out.push_back(device_info(g, *n, flat));
  return out;
}

boost::json::array node_blockstats(const graph& g) {
  boost::json::array out;
  auto nodes = g.nodes_newest_first();
  for (auto it = nodes.rbegin(); it != nodes.rend(); ++it) out.push_back(node_stats_entry(**it));
  return out;
}

boost::json::object block_graph_dump(const graph& g) {
  // Ids follow creation order (oldest is 1); both lists come out newest first, children of one
  // parent in reverse, which is how QSD builds them (prepending while walking oldest first).
  auto nodes = g.nodes_newest_first();
  std::map<const node*, uint64_t> id;
  uint64_t next = 1;
  for (auto it = nodes.rbegin(); it != nodes.rend(); ++it) id[*it] = next++;
  boost::json::array out_nodes, out_edges;
  std::vector<boost::json::object> user_nodes, user_edges;
  for (auto it = nodes.rbegin(); it != nodes.rend(); ++it) {
    const node& n = **it;
    out_nodes.insert(out_nodes.begin(),
                     boost::json::object{{"name", n.name()}, {"type", "block-driver"}, {"id", id[&n]}});
    for (auto* e : qemu_children(n)) {
      boost::json::array perm, shared;
      for (auto& p : perm_list(e->perm)) perm.push_back(boost::json::value(p));
      for (auto& p : perm_list(e->shared)) shared.push_back(boost::json::value(p));
      out_edges.insert(out_edges.begin(), boost::json::object{{"name", e->role},
                                                              {"parent", id[&n]},
                                                              {"shared-perm", std::move(shared)},
                                                              {"perm", std::move(perm)},
                                                              {"child", id[e->child]}});
    }
  }
  // Users that are not nodes (exports, jobs, commands) appear as block backends attached as 'root'.
  for (auto it = nodes.rbegin(); it != nodes.rend(); ++it) {
    const node& n = **it;
    for (const root* u : n.roots) {
      uint64_t uid = next++;
      out_nodes.insert(out_nodes.begin(), boost::json::object{{"name", ""}, {"type", "block-backend"}, {"id", uid}});
      boost::json::array perm, shared;
      for (auto& p : perm_list(u->perm)) perm.push_back(boost::json::value(p));
      for (auto& p : perm_list(u->shared)) shared.push_back(boost::json::value(p));
      out_edges.insert(out_edges.begin(), boost::json::object{{"name", "root"},
                                                              {"parent", uid},
                                                              {"shared-perm", std::move(shared)},
                                                              {"perm", std::move(perm)},
                                                              {"child", id[&n]}});
    }
  }
  return boost::json::object{{"edges", std::move(out_edges)}, {"nodes", std::move(out_nodes)}};
}

}  // namespace blockd::block

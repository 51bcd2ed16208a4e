// Read-only views of the block graph for QMP queries (named nodes, blockstats, graph dump); supervisor's thread, reading only graph structure, published node facts and relaxed counters.
#pragma once
#include <boost/json.hpp>

#include "storage/block/graph.h"

namespace blockd::block {

// query-named-block-nodes: BlockDeviceInfo per node, newest first. `flat` leaves out backing images.
// Image facts are what each node last published (the caller asks the homes to refresh them first
// where it wants actual sizes of now).
boost::json::array named_block_nodes(const graph& g, bool flat);
// query-blockstats with query-nodes=true: BlockStats per node, oldest first.
boost::json::array node_blockstats(const graph& g);
// x-debug-query-block-graph: XDbgBlockGraph (nodes, users and edges with permissions).
boost::json::object block_graph_dump(const graph& g);

}  // namespace blockd::block

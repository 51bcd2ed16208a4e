// Edges of the block graph: child edges between nodes, roots (users that are not nodes) and the handle drivers hold; changed on the supervisor's thread, read at the node's home.
#pragma once
#include <cstdint>
#include <string>

#include "storage/block/perm.h"

namespace blockd::block {

class node;

// One child slot of a parent node. The graph makes a slot for every child role of the parent's
// driver when the node opens, filled or empty (`child == nullptr`: no backing file, no data file),
// and keeps it for the parent's life. Replacing a child, attaching a backing file later or
// dropping it only changes `child`, so drivers reach their children through the slot and follow
// every graph edit without being told. `child` changes only while the parent is quiesced.
struct child_edge {
  node* parent = nullptr;
  node* child = nullptr;
  std::string role;                  // "file", "backing", "data-file", ...
  uint32_t perm = 0, shared = perm_all;  // what the parent takes on the child and lets others do
  uint64_t attached_seq = 0;         // when `child` was set (QEMU lists the newest edge first)
};

// A user of a node that is not a node: an export, a job, a command holding a node for a while.
// The user owns it; the graph records it on its target. Re-pointing a root to another node
// (graph::repoint_root) moves its permissions with it, all or nothing.
struct root {
  std::string key;          // unique among a node's roots: "export:e0", "job:j0", "command:block_resize"
  std::string description;  // for conflict messages: "export 'e0'", "block job 'j0'"
  node* target = nullptr;
  uint32_t perm = 0, shared = perm_all;
  bool allows_inactive = false;  // the node may be inactivated under it (an export with allow-inactive)
  bool block_backend = true;     // QEMU would give it a BlockBackend: x-blockdev-set-iothread asks for force
  uint64_t attached_seq = 0;     // when it was attached (the graph sets it)
};

// What a driver keeps for a child: a handle on its slot. Dereferencing gives the node the slot
// holds now, so a replaced child is used from the next request on.
class child_ref {
 public:
  child_ref() = default;
  explicit child_ref(child_edge* e) : e_(e) {}
  node* get() const { return e_ ? e_->child : nullptr; }
  node* operator->() const { return get(); }
  node& operator*() const { return *get(); }
  explicit operator bool() const { return get() != nullptr; }
  bool operator==(const node* n) const { return get() == n; }
  // Two handles are the same child when they hold the same slot (a qcow2 image without an
  // external data file uses its file slot for data too).
  bool operator==(const child_ref& o) const { return e_ == o.e_; }
  child_edge* edge() const { return e_; }

 private:
  child_edge* e_ = nullptr;
};

}  // namespace blockd::block

// The rules of the dirty bitmap commands (QEMU's checks, texts and order) applied to one node's bitmap set; the node's home iothread only.
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "protocol/error.h"
#include "storage/block/dirty_bitmap.h"

namespace blockd::block {

class node;

// What an operation needs of a bitmap (QEMU's busy / read-only / inconsistent checks).
enum bitmap_need : unsigned {
  need_not_busy = 1u << 0,
  need_writable = 1u << 1,
  need_consistent = 1u << 2,
  need_default = need_not_busy | need_writable | need_consistent,  // clear, merge target
  need_allow_ro = need_not_busy | need_consistent,                 // enable, disable, export
};
result<void> check_bitmap(const dirty_bitmap& b, unsigned need);

// The bitmap `name` of `n`, or QEMU's "not found" text.
result<dirty_bitmap*> find_bitmap(node& n, const std::string& name);

struct bitmap_add_request {
  std::string name{};
  std::optional<uint64_t> granularity{};
  bool persistent = false;
  bool disabled = false;
  // x-exist-ok (a blockd extension): a bitmap of that name with the same settings is success and
  // nothing changes, so a backup tool may retry a checkpoint that may or may not have been made.
  bool exist_ok = false;
};
// block-dirty-bitmap-add after the node was found: granularity, persistence (asks the driver),
// name; on success the bitmap is in the set, newest first, and recording unless disabled.
// With exist_ok, an existing bitmap with the same settings is returned unchanged and `added` is
// false; one with other settings is refused naming them.
result<dirty_bitmap*> add_bitmap(node& n, const bitmap_add_request& a, bool* added = nullptr);
// The default granularity for `n`: its cluster size within [4 KiB, 64 KiB], else 64 KiB.
uint64_t default_granularity(const node& n);
// Takes `name` out of the set (the caller checked it may); the node stops recording for it.
std::shared_ptr<dirty_bitmap> release_bitmap(node& n, const std::string& name);
// The first half of block-dirty-bitmap-remove: checks, and the stored copy leaves the image.
result<dirty_bitmap*> prepare_remove(node& n, const std::string& name);

// ---- bitmaps of an export (QEMU's nbd_export_create) ------------------------------------------
// One entry of an export's `bitmaps`, as the supervisor resolved it from the graph it owns.
struct export_bitmap_ref {
  std::string name;
  // A plain name: the exported node, then down its backing chain (QEMU's bdrv_filter_or_cow_bs).
  std::vector<node*> chain;
  // {node, name}: the bitmap's node, or an error for its turn (the node is missing).
  node* owner = nullptr;
  std::string error;
};
// Looks every entry up and checks it in order (the first failure wins, QEMU's texts), then marks
// them all busy: while an export uses a bitmap, nothing else may change or remove it. On failure
// nothing is marked. Runs on the home of the nodes named (an export's graph shares one).
result<std::vector<std::shared_ptr<dirty_bitmap>>> hold_export_bitmaps(const std::vector<export_bitmap_ref>& refs,
                                                                      bool readonly_export);
// The export is gone (or its add failed after the hold): each bitmap is free again once no export
// uses it any more. Home of the bitmaps' node.
void release_export_bitmaps(const std::vector<std::shared_ptr<dirty_bitmap>>& held);

}  // namespace blockd::block

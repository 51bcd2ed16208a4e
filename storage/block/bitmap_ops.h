// The rules of the dirty bitmap commands (QEMU's checks, texts and order) applied to one node's bitmap set; the node's home iothread only.
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <string>

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

}  // namespace blockd::block

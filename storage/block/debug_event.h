// QEMU's BlkdebugEvent names: points in a format's work that it announces to the node below (blkdebug acts on them); any thread, no state.
#pragma once
#include <cstdint>
#include <optional>
#include <string_view>

namespace blockd::block {

// In QEMU's order (the BlkdebugEvent enum of the QAPI schema). A format raises one on its child with
// child->driver().debug_event(e) right before the I/O it names; filters pass it on, and only blkdebug
// acts on it. Names blockd never raises are still valid in blkdebug rules (which then never fire).
enum class blkdebug_event : uint8_t {
  l1_update,
  l1_grow_alloc_table,
  l1_grow_write_table,
  l1_grow_activate_table,
  l2_load,
  l2_update,
  l2_update_compressed,
  l2_alloc_cow_read,
  l2_alloc_write,
  read_aio,
  read_backing_aio,
  read_compressed,
  write_aio,
  write_compressed,
  vmstate_load,
  vmstate_save,
  cow_read,
  cow_write,
  reftable_load,
  reftable_grow,
  reftable_update,
  refblock_load,
  refblock_update,
  refblock_update_part,
  refblock_alloc,
  refblock_alloc_hookup,
  refblock_alloc_write,
  refblock_alloc_write_blocks,
  refblock_alloc_write_table,
  refblock_alloc_switch_table,
  cluster_alloc,
  cluster_alloc_bytes,
  cluster_free,
  flush_to_os,
  flush_to_disk,
  pwritev_rmw_head,
  pwritev_rmw_after_head,
  pwritev_rmw_tail,
  pwritev_rmw_after_tail,
  pwritev,
  pwritev_zero,
  pwritev_done,
  empty_image_prepare,
  l1_shrink_write_table,
  l1_shrink_free_l2_clusters,
  cor_write,
  cluster_alloc_space,
  none,
};
inline constexpr int blkdebug_event_count = 48;

inline constexpr std::string_view blkdebug_event_names[blkdebug_event_count] = {
    "l1_update",
    "l1_grow_alloc_table",
    "l1_grow_write_table",
    "l1_grow_activate_table",
    "l2_load",
    "l2_update",
    "l2_update_compressed",
    "l2_alloc_cow_read",
    "l2_alloc_write",
    "read_aio",
    "read_backing_aio",
    "read_compressed",
    "write_aio",
    "write_compressed",
    "vmstate_load",
    "vmstate_save",
    "cow_read",
    "cow_write",
    "reftable_load",
    "reftable_grow",
    "reftable_update",
    "refblock_load",
    "refblock_update",
    "refblock_update_part",
    "refblock_alloc",
    "refblock_alloc_hookup",
    "refblock_alloc_write",
    "refblock_alloc_write_blocks",
    "refblock_alloc_write_table",
    "refblock_alloc_switch_table",
    "cluster_alloc",
    "cluster_alloc_bytes",
    "cluster_free",
    "flush_to_os",
    "flush_to_disk",
    "pwritev_rmw_head",
    "pwritev_rmw_after_head",
    "pwritev_rmw_tail",
    "pwritev_rmw_after_tail",
    "pwritev",
    "pwritev_zero",
    "pwritev_done",
    "empty_image_prepare",
    "l1_shrink_write_table",
    "l1_shrink_free_l2_clusters",
    "cor_write",
    "cluster_alloc_space",
    "none",
};

inline std::string_view blkdebug_event_name(blkdebug_event e) { return blkdebug_event_names[int(e)]; }

inline std::optional<blkdebug_event> parse_blkdebug_event(std::string_view s) {
  for (int i = 0; i < blkdebug_event_count; ++i)
    if (blkdebug_event_names[i] == s) return blkdebug_event(i);
  return std::nullopt;
}

}  // namespace blockd::block

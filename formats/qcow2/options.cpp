// qcow2 open options (BlockdevOptionsQcow2) checked and resolved to cache sizes and flags; pure functions, any thread.
#include <climits>

#include "formats/qcow2/qcow2.h"

namespace blockd::qcow2 {
namespace {

int64_t get_int(const boost::json::object& o, const char* key, int64_t dflt, bool* given = nullptr) {
  auto* v = o.if_contains(key);
  if (given) *given = v != nullptr;
  if (!v) return dflt;
  return v->is_uint64() ? int64_t(v->as_uint64()) : v->as_int64();
}

bool get_bool(const boost::json::object& o, const char* key, bool dflt) {
  auto* v = o.if_contains(key);
  return v ? v->as_bool() : dflt;
}

uint32_t template_bits(std::string_view mode) {
  const uint32_t constant =
      overlap_main_header | overlap_active_l1 | overlap_refcount_table | overlap_snapshot_table | overlap_bitmap_directory;
  if (mode == "none") return 0;
  if (mode == "constant") return constant;
  if (mode == "all") return ~0u & ((1u << 9) - 1);
  return constant | overlap_active_l2 | overlap_refcount_block | overlap_inactive_l1;  // cached
}

}  // namespace

result<open_options> parse_open_options(const boost::json::object& o, const header& h, uint64_t virtual_size,
                                        bool discard_unmap) {
  open_options r;
  uint64_t cs = h.cluster_size();
  r.lazy_refcounts = get_bool(o, "lazy-refcounts", h.compatible_features & compat_lazy_refcounts);
  if (r.lazy_refcounts && h.version < 3)
    return fail("Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level");
  r.pass_discard_request = get_bool(o, "pass-discard-request", discard_unmap);
  r.pass_discard_snapshot = get_bool(o, "pass-discard-snapshot", true);
  r.pass_discard_other = get_bool(o, "pass-discard-other", false);
  r.discard_no_unref = get_bool(o, "discard-no-unref", false);

  r.overlap = template_bits("cached");
  if (auto* v = o.if_contains("overlap-check")) {
    if (v->is_string()) {
      r.overlap = template_bits(v->as_string());
    } else {
      auto& f = v->as_object();
      r.overlap = template_bits(f.contains("template") ? std::string_view(f.at("template").as_string()) : "cached");
      const std::pair<const char*, uint32_t> flags[] = {
          {"main-header", overlap_main_header},       {"active-l1", overlap_active_l1},
          {"active-l2", overlap_active_l2},           {"refcount-table", overlap_refcount_table},
          {"refcount-block", overlap_refcount_block}, {"snapshot-table", overlap_snapshot_table},
          {"inactive-l1", overlap_inactive_l1},       {"inactive-l2", overlap_inactive_l2},
          {"bitmap-directory", overlap_bitmap_directory}};
      for (auto& [name, bit] : flags)
        if (auto* b = f.if_contains(name)) r.overlap = b->as_bool() ? r.overlap | bit : r.overlap & ~bit;
    }
  }

  // Cache sizes, as QEMU derives them: by default the L2 cache covers the whole disk (up to 32 MiB
  // of tables) and the refcount cache holds four blocks.
  bool has_combined = false, has_l2 = false, has_rc = false, has_entry = false;
  int64_t combined = get_int(o, "cache-size", 0, &has_combined);
  int64_t l2 = get_int(o, "l2-cache-size", 0, &has_l2);
  int64_t rc = get_int(o, "refcount-cache-size", 0, &has_rc);
  int64_t entry = get_int(o, "l2-cache-entry-size", int64_t(cs), &has_entry);
  if (combined < 0 || l2 < 0 || rc < 0) return fail("Cache size must not be negative");
  uint64_t max_l2_cache = ((virtual_size + cs - 1) / cs * h.l2_entry_size() + cs - 1) / cs * cs;
  uint64_t min_rc = 4 * cs;
  if (has_combined) {
    if (has_l2 && has_rc) return fail("cache-size, l2-cache-size and refcount-cache-size may not be set at the same time");
    if (l2 > combined) return fail("l2-cache-size may not exceed cache-size");
    if (rc > combined) return fail("refcount-cache-size may not exceed cache-size");
    if (has_l2) rc = combined - l2;
    else if (has_rc) l2 = combined - rc;
    else if (uint64_t(combined) >= max_l2_cache + min_rc) {
      l2 = int64_t(max_l2_cache);
      rc = combined - l2;
    } else {
      rc = std::min<int64_t>(combined, int64_t(min_rc));
      l2 = combined - rc;
    }
  } else {
    if (!has_l2) l2 = int64_t(std::min<uint64_t>(max_l2_cache, 32u << 20));
    if (!has_rc) rc = int64_t(min_rc);
  }
  if (entry < 512 || uint64_t(entry) > cs || (entry & (entry - 1)))
    return fail("L2 cache entry size must be a power of two between 512 and the cluster size (" + std::to_string(cs) +
                ")");
  r.l2_slice_bytes = uint64_t(entry);
  uint64_t l2_entries = std::max<uint64_t>(uint64_t(l2) / r.l2_slice_bytes, 2);
  if (l2_entries > INT_MAX) return fail("L2 cache size too big");
  uint64_t rc_entries = std::max<uint64_t>(uint64_t(rc) / cs, 4);
  if (rc_entries > INT_MAX) return fail("Refcount cache size too big");
  r.l2_cache_bytes = l2_entries * r.l2_slice_bytes;
  r.refcount_cache_bytes = rc_entries * cs;
  int64_t interval = get_int(o, "cache-clean-interval", 600);
  if (interval < 0 || interval > int64_t(UINT_MAX)) return fail("Cache clean interval too big");
  r.cache_clean_interval = interval;
  return r;
}

}  // namespace blockd::qcow2

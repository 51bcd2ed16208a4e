// Reproduces the iteration order of a GLib string-keyed hash table, so listings match QSD's; plain C++, owner's thread.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace blockd::qom {

// QEMU keeps an object's properties (and so a container's children) in a GHashTable keyed by name
// and qom-list prints them in the table's slot order, reversed. QSD's order is therefore a
// function of the names and of the insertions and removals that led there. This table models
// GLib 2.74's open addressing (djb2 hash, index (hash*11) mod prime, quadratic probing,
// tombstones, in-place resize at 15/16 load and shrink under 1/4) so blockd lists children in the
// same order as QSD. It stores only names; the caller keeps the values in its own map.
class glib_order {
 public:
  glib_order();
  void insert(const std::string& key);  // no-op if present
  void remove(const std::string& key);  // no-op if absent
  bool contains(const std::string& key) const;
  // Names in slot order (GLib's iteration order).
  std::vector<std::string> slots() const;
  size_t size() const { return nnodes_; }

  static uint32_t str_hash(const std::string& s);

 private:
  void set_shift(int shift);
  uint32_t index_of(uint32_t hash) const;
  uint32_t lookup(const std::string& key, uint32_t hash) const;
  void maybe_resize();
  void resize();

  uint32_t size_ = 0, mod_ = 0, mask_ = 0;
  size_t nnodes_ = 0, noccupied_ = 0;
  std::vector<uint32_t> hashes_;  // 0 unused, 1 tombstone, else the key's hash
  std::vector<std::string> keys_;
};

}  // namespace blockd::qom

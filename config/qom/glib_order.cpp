// GLib hash-table order model (see glib_order.h); plain C++, owner's thread.
#include "config/qom/glib_order.h"

#include <algorithm>

namespace blockd::qom {
namespace {

constexpr int min_shift = 3;
// GLib's table of the largest prime below each power of two.
constexpr uint32_t prime_mod[] = {1,       2,       3,       7,        13,       31,       61,        127,
                                  251,     509,     1021,    2039,     4093,     8191,     16381,     32749,
                                  65521,   131071,  262139,  524287,   1048573,  2097143,  4194301,   8388593,
                                  16777213, 33554393, 67108859, 134217689, 268435399, 536870909, 1073741789,
                                  2147483647};

}  // namespace

uint32_t glib_order::str_hash(const std::string& s) {
  // djb2 over signed chars, as g_str_hash; 0 and 1 are reserved for empty and tombstone slots.
  uint32_t h = 5381;
  for (char c : s) h = h * 33 + static_cast<uint32_t>(static_cast<int32_t>(static_cast<signed char>(c)));
  return h <= 1 ? 2 : h;
}

glib_order::glib_order() {
  set_shift(min_shift);
  hashes_.assign(size_, 0);
  keys_.assign(size_, {});
}

void glib_order::set_shift(int shift) {
  size_ = 1u << shift;
  mod_ = prime_mod[shift];
  mask_ = size_ - 1;
}

uint32_t glib_order::index_of(uint32_t hash) const { return (hash * 11u) % mod_; }

uint32_t glib_order::lookup(const std::string& key, uint32_t hash) const {
  uint32_t i = index_of(hash), step = 0;
  bool have_tomb = false;
  uint32_t tomb = 0;
  while (hashes_[i] != 0) {
    if (hashes_[i] == hash && keys_[i] == key) return i;
    if (hashes_[i] == 1 && !have_tomb) {
      tomb = i;
      have_tomb = true;
    }
    ++step;
    i = (i + step) & mask_;
  }
  return have_tomb ? tomb : i;
}

bool glib_order::contains(const std::string& key) const {
  uint32_t i = lookup(key, str_hash(key));
  return hashes_[i] > 1;
}

void glib_order::insert(const std::string& key) {
  uint32_t h = str_hash(key);
  uint32_t i = lookup(key, h);
  if (hashes_[i] > 1) return;
  bool was_unused = hashes_[i] == 0;
  hashes_[i] = h;
  keys_[i] = key;
  ++nnodes_;
  if (was_unused) {
    ++noccupied_;
    maybe_resize();
  }
}

void glib_order::remove(const std::string& key) {
  uint32_t i = lookup(key, str_hash(key));
  if (hashes_[i] <= 1) return;
  hashes_[i] = 1;
  keys_[i].clear();
  --nnodes_;
  maybe_resize();
}

void glib_order::maybe_resize() {
  if ((size_ > nnodes_ * 4 && size_ > (1u << min_shift)) || size_ <= noccupied_ + noccupied_ / 16) resize();
}

void glib_order::resize() {
  // GLib rehashes in place: entries are visited in old slot order and each one evicts whatever
  // sits in its new slot, which then moves on; a bitmap marks slots already settled.
  uint32_t old_size = size_;
  int n = static_cast<int>(static_cast<double>(nnodes_) * 1.333), shift = 0;
  while (n) {
    ++shift;
    n >>= 1;
  }
  set_shift(std::max(shift, min_shift));
  if (size_ > old_size) {
    hashes_.resize(size_, 0);
    keys_.resize(size_);
  }
  std::vector<bool> settled(std::max(size_, old_size), false);
  for (uint32_t i = 0; i < old_size; ++i) {
    uint32_t h = hashes_[i];
    if (h <= 1) {
      hashes_[i] = 0;
      continue;
    }
    if (settled[i]) continue;
    hashes_[i] = 0;
    std::string key = std::move(keys_[i]);
    keys_[i].clear();
    for (;;) {
      uint32_t j = index_of(h), step = 0;
      while (settled[j]) {
        ++step;
        j = (j + step) & mask_;
      }
      settled[j] = true;
      uint32_t replaced = hashes_[j];
      hashes_[j] = h;
      if (replaced <= 1) {
        keys_[j] = std::move(key);
        break;
      }
      h = replaced;
      std::swap(key, keys_[j]);
    }
  }
  if (size_ < old_size) {
    hashes_.resize(size_);
    keys_.resize(size_);
  }
  noccupied_ = nnodes_;
}

std::vector<std::string> glib_order::slots() const {
  std::vector<std::string> out;
  for (uint32_t i = 0; i < size_; ++i)
    if (hashes_[i] > 1) out.push_back(keys_[i]);
  return out;
}

}  // namespace blockd::qom

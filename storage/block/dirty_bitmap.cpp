// Dirty bitmaps and a node's bitmap set (see dirty_bitmap.h); home iothread only.
#include "storage/block/dirty_bitmap.h"

#include <gnutls/crypto.h>

#include <algorithm>
#include <bit>

namespace blockd::block {

namespace {
uint64_t granules_for(int64_t size, unsigned shift) {
  return size <= 0 ? 0 : (uint64_t(size) + (uint64_t(1) << shift) - 1) >> shift;
}
}  // namespace

dirty_bitmap::dirty_bitmap(std::string name, uint64_t granularity, int64_t size)
    : name_(std::move(name)), gran_(granularity), shift_(unsigned(std::countr_zero(granularity))), size_(0) {
  resize(size);
}

int64_t dirty_bitmap::dirty_bytes() const {
  // Whole granules, a partial last one included: QEMU's count (QSD 7.2 reports 2 * 65536 for the
  // first and the partial last granule of a 1000000-byte node).
  return int64_t(set_count_ << shift_);
}

void dirty_bitmap::set_bits(uint64_t first, uint64_t last, bool v) {
  last = std::min(last, bits_);
  while (first < last) {
    uint64_t w = first >> 6;
    unsigned lo = unsigned(first & 63);
    unsigned n = unsigned(std::min<uint64_t>(64 - lo, last - first));
    uint64_t mask = (n == 64 ? ~uint64_t(0) : ((uint64_t(1) << n) - 1)) << lo;
    uint64_t before = words_[w];
    uint64_t after = v ? (before | mask) : (before & ~mask);
    set_count_ += uint64_t(std::popcount(after)) - uint64_t(std::popcount(before));
    words_[w] = after;
    first += n;
  }
}

void dirty_bitmap::set(int64_t offset, int64_t length) {
  if (length <= 0 || offset >= size_) return;
  set_bits(granule(offset), granule(offset + length - 1) + 1, true);
}

void dirty_bitmap::reset(int64_t offset, int64_t length) {
  if (length <= 0 || offset >= size_) return;
  // Only granules the range covers whole are cleaned, except the partial last one of the bitmap.
  uint64_t first = (uint64_t(offset) + gran_ - 1) >> shift_;
  int64_t end = std::min(offset + length, size_);
  uint64_t last = end == size_ ? bits_ : granule(end);
  set_bits(first, last, false);
}

void dirty_bitmap::clear() {
  std::fill(words_.begin(), words_.end(), 0);
  set_count_ = 0;
}

bool dirty_bitmap::get(int64_t offset) const {
  if (offset < 0 || offset >= size_) return false;
  return bit(granule(offset));
}

int64_t dirty_bitmap::run_end(int64_t offset, int64_t limit, bool& dirty) const {
  limit = std::min(limit, size_);
  if (offset >= limit) {
    dirty = false;
    return limit;
  }
  uint64_t i = granule(offset);
  dirty = bit(i);
  uint64_t last = granule(limit - 1) + 1;
  ++i;
  while (i < last) {
    if ((i & 63) == 0) {
      // Skip whole words of the same state.
      uint64_t w = words_[i >> 6];
      if ((dirty && w == ~uint64_t(0)) || (!dirty && w == 0)) {
        i += 64;
        continue;
      }
    }
    if (bit(i) != dirty) break;
    ++i;
  }
  return std::min<int64_t>(int64_t(std::min(i, last) << shift_), limit);
}

int64_t dirty_bitmap::next_dirty(int64_t offset) const {
  if (offset < 0) offset = 0;
  if (offset >= size_ || set_count_ == 0) return -1;
  uint64_t i = granule(offset);
  while (i < bits_) {
    uint64_t w = words_[i >> 6] >> (i & 63);
    if (w) {
      i += uint64_t(std::countr_zero(w));
      return i < bits_ ? std::max<int64_t>(int64_t(i << shift_), offset) : -1;
    }
    i = (i | 63) + 1;
  }
  return -1;
}

void dirty_bitmap::resize(int64_t size) {
  if (size < 0) size = 0;
  uint64_t nbits = granules_for(size, shift_);
  if (nbits < bits_) set_bits(nbits, bits_, false);  // dropped bits leave the count
  // At least one word: QEMU's digest of an empty bitmap hashes one.
  words_.resize(std::max<uint64_t>(1, (nbits + 63) / 64), 0);
  bits_ = nbits;
  size_ = size;
}

void dirty_bitmap::merge_from(const dirty_bitmap& o) {
  if (o.gran_ == gran_) {
    size_t n = std::min(words_.size(), o.words_.size());
    for (size_t w = 0; w < n; ++w) {
      uint64_t after = words_[w] | o.words_[w];
      set_count_ += uint64_t(std::popcount(after)) - uint64_t(std::popcount(words_[w]));
      words_[w] = after;
    }
    if (bits_ & 63 && !words_.empty()) {  // nothing past the last granule
      uint64_t keep = (uint64_t(1) << (bits_ & 63)) - 1;
      uint64_t& last = words_[(bits_ - 1) >> 6];
      set_count_ -= uint64_t(std::popcount(last & ~keep));
      last &= keep;
    }
    return;
  }
  for (int64_t off = o.next_dirty(0); off >= 0;) {
    bool d;
    int64_t end = o.run_end(off, o.size_, d);
    set(off, end - off);
    off = o.next_dirty(end);
  }
}

std::vector<uint8_t> dirty_bitmap::to_bytes(uint64_t first, uint64_t granules) const {
  std::vector<uint8_t> out((granules + 7) / 8, 0);
  for (uint64_t k = 0; k < granules && first + k < bits_; ++k)
    if (bit(first + k)) out[k >> 3] |= uint8_t(1u << (k & 7));
  return out;
}

void dirty_bitmap::load_bytes(uint64_t first, const uint8_t* p, uint64_t granules) {
  for (uint64_t k = 0; k < granules && first + k < bits_; ++k) {
    bool v = (p[k >> 3] >> (k & 7)) & 1;
    if (v != bit(first + k)) set_bits(first + k, first + k + 1, v);
  }
}

void dirty_bitmap::fill(uint64_t first, uint64_t granules, bool dirty) { set_bits(first, first + granules, dirty); }

std::string dirty_bitmap::sha256() const {
  // The words as the host stores them (little-endian here, as on QEMU's x86-64 and arm64 hosts).
  unsigned char digest[32];
  gnutls_hash_fast(GNUTLS_DIG_SHA256, words_.data(), words_.size() * sizeof(uint64_t), digest);
  static const char* hex = "0123456789abcdef";
  std::string out;
  for (unsigned char c : digest) {
    out += hex[c >> 4];
    out += hex[c & 15];
  }
  return out;
}

boost::json::object to_json(const bitmap_fact& f) {
  // BlockDirtyInfo, in QEMU's member order; "inconsistent" only when true.
  boost::json::object o;
  o["name"] = f.name;
  o["recording"] = f.recording;
  o["persistent"] = f.persistent;
  o["busy"] = f.busy;
  if (f.inconsistent) o["inconsistent"] = true;
  o["granularity"] = f.granularity;
  o["count"] = f.count;
  return o;
}

// ---- bitmap_set ------------------------------------------------------------------------------

dirty_bitmap* bitmap_set::find(const std::string& name) const {
  for (auto& b : list_)
    if (b->name() == name) return b.get();
  return nullptr;
}

dirty_bitmap& bitmap_set::add(std::shared_ptr<dirty_bitmap> b) {
  list_.insert(list_.begin(), std::move(b));
  return *list_.front();
}

std::shared_ptr<dirty_bitmap> bitmap_set::take(const std::string& name) {
  for (auto it = list_.begin(); it != list_.end(); ++it)
    if ((*it)->name() == name) {
      auto b = std::move(*it);
      list_.erase(it);
      return b;
    }
  return nullptr;
}

bool bitmap_set::recording() const {
  return std::any_of(list_.begin(), list_.end(), [](auto& b) { return b->enabled && !b->readonly; });
}

void bitmap_set::resize(int64_t size) {
  for (auto& b : list_)
    if (b->size() != size) b->resize(size);
}

std::vector<bitmap_fact> bitmap_set::facts() const {
  std::vector<bitmap_fact> out;
  for (auto& b : list_)
    out.push_back({.name = b->name(),
                   .count = b->dirty_bytes(),
                   .granularity = b->granularity(),
                   .recording = b->enabled,
                   .busy = b->busy,
                   .persistent = b->persistent,
                   .inconsistent = b->inconsistent});
  return out;
}

void bitmap_set::after_write(const io_request& r) {
  for (auto& b : list_)
    if (b->enabled && !b->readonly) {
      // The node may have grown under the request (a format extending its file): the bitmap
      // grows with it, so the new range is recorded too.
      if (r.offset + r.length > b->size()) b->resize(r.offset + r.length);
      b->set(r.offset, r.length);
    }
}

}  // namespace blockd::block

// Scatter-list helpers for requests' payloads, the one set every driver and filter uses (walk, copy in and out, sub-lists, zero test); any thread, no state.
#pragma once
#include <sys/uio.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace blockd::block {

// Walks `n` bytes of a scatter list from byte `skip` on, one contiguous piece at a time.
template <class Piece>
void for_each_piece(const iovec* iov, int iovcnt, int64_t skip, int64_t n, Piece piece) {
  for (int i = 0; i < iovcnt && n > 0; ++i) {
    int64_t len = int64_t(iov[i].iov_len);
    if (skip >= len) {
      skip -= len;
      continue;
    }
    int64_t k = std::min(len - skip, n);
    piece(static_cast<char*>(iov[i].iov_base) + skip, k);
    n -= k;
    skip = 0;
  }
}

// Copies `n` bytes from byte `skip` of a scatter list into a flat buffer.
inline void copy_from_iov(const iovec* iov, int iovcnt, int64_t skip, void* dst, int64_t n) {
  auto* d = static_cast<char*>(dst);
  for_each_piece(iov, iovcnt, skip, n, [&](char* p, int64_t k) {
    std::memcpy(d, p, size_t(k));
    d += k;
  });
}

// Copies a flat buffer into `n` bytes of a scatter list from byte `skip` on; a null source writes zeroes.
inline void copy_to_iov(const iovec* iov, int iovcnt, int64_t skip, const void* src, int64_t n) {
  auto* s = static_cast<const char*>(src);
  for_each_piece(iov, iovcnt, skip, n, [&](char* p, int64_t k) {
    if (s) {
      std::memcpy(p, s, size_t(k));
      s += k;
    } else {
      std::memset(p, 0, size_t(k));
    }
  });
}

// Whether every byte of the scatter list is zero (detect-zeroes).
inline bool iov_is_zero(const iovec* iov, int iovcnt) {
  for (int i = 0; i < iovcnt; ++i) {
    auto* p = static_cast<const unsigned char*>(iov[i].iov_base);
    size_t n = iov[i].iov_len;
    if (n && (p[0] != 0 || std::memcmp(p, p + 1, n - 1) != 0)) return false;
  }
  return true;
}

// The part [off, off+len) of a scatter list as a scatter list of its own (four entries inline,
// more on the heap), for a driver that splits one request into several.
struct iov_part {
  iovec inl[4];
  std::vector<iovec> heap;
  iovec* v = inl;
  int n = 0;
  iov_part(const iovec* iov, int iovcnt, int64_t off, int64_t len) {
    for_each_piece(iov, iovcnt, off, len, [&](char* p, int64_t k) { push({p, size_t(k)}); });
  }
  void push(iovec e) {
    if (n < 4 && heap.empty()) {
      inl[n++] = e;
      return;
    }
    if (heap.empty()) heap.assign(inl, inl + n);
    heap.push_back(e);
    v = heap.data();
    n = int(heap.size());
  }
};

}  // namespace blockd::block

// blockdev-create for "file": QEMU's raw_co_create step by step (create, lock, empty, flags, size, preallocate); the create job's worker thread.
#include "storage/file/file_create.h"

#include <fcntl.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "storage/file/ofd_lock.h"

namespace blockd::block {
namespace {

// A creation takes QEMU's lock bytes (ofd_lock.h) so that it cannot empty a file another user writes.

std::string errno_text(const std::string& what, int err) { return what + ": " + std::strerror(err); }

// raw_apply_lock_bytes: read-locks the bytes of `perm` and of the permissions not `shared`.
result<void> apply_locks(int fd, uint32_t perm, uint32_t shared) {
  for (int i = 0; i < 4; ++i) {
    if ((perm & (1u << i)) && ofd::lock(fd, ofd::perm_base + i, F_RDLCK) < 0)
      return fail("Failed to lock byte " + std::to_string(ofd::perm_base + i));
    if (!(shared & (1u << i)) && ofd::lock(fd, ofd::shared_base + i, F_RDLCK) < 0)
      return fail("Failed to lock byte " + std::to_string(ofd::shared_base + i));
  }
  return {};
}

void release_locks(int fd) {
  for (int i = 0; i < 4; ++i) {
    ofd::lock(fd, ofd::perm_base + i, F_UNLCK);
    ofd::lock(fd, ofd::shared_base + i, F_UNLCK);
  }
}

// raw_check_lock_bytes: someone else refuses what we need, or needs what we refuse.
result<void> check_locks(int fd, uint32_t perm, uint32_t shared) {
  for (int i = 0; i < 4; ++i) {
    if ((perm & (1u << i)) && ofd::taken_by_other(fd, ofd::shared_base + i))
      return fail(std::string("Failed to get \"") + ofd::names[i] + "\" lock");
    if (!(shared & (1u << i)) && ofd::taken_by_other(fd, ofd::perm_base + i))
      return fail(std::string("Failed to get shared \"") + ofd::names[i] + "\" lock");
  }
  return {};
}

// QEMU writes the first block of a new image so that O_DIRECT alignment probing later finds an
// allocated block (commit "block: posix: Always allocate the first block"); failures are ignored.
void allocate_first_block(int fd, int64_t size) {
  size_t n = size < 4096 ? 512 : 4096;
  std::vector<char> zeros(n, 0);
  while (pwrite(fd, zeros.data(), n, 0) < 0 && errno == EINTR) {
  }
}

// handle_aiocb_truncate: grows or sets the size with the preallocation mode, undoing a partial
// preallocation on failure. A cancelled job stops a "full" preallocation between chunks (QEMU
// cannot; it writes the whole file before the cancel takes effect).
result<void> regular_truncate(int fd, int64_t offset, const std::string& prealloc, const create_args& a) {
  struct stat st {};
  if (fstat(fd, &st) < 0) return fail(errno_text("Could not stat file", errno));
  int64_t current = st.st_size;
  if (current > offset && prealloc != "off") return fail("Cannot use preallocation for shrinking files");

  result<void> r;
  if (prealloc == "off") {
    if (ftruncate(fd, offset) != 0) return fail(errno_text("Could not resize file", errno));
    if (current == 0 && offset > current) allocate_first_block(fd, offset);
    return {};
  } else if (prealloc == "falloc") {
    if (offset != current) {
      int err = posix_fallocate(fd, current, offset - current);
      if (err != 0)
        r = fail(errno_text("Could not preallocate new data", err));
      else if (current == 0)
        allocate_first_block(fd, offset);
    }
  } else if (prealloc == "full") {
    if (ftruncate(fd, offset) != 0) {
      r = fail(errno_text("Could not resize file", errno));
    } else if (lseek(fd, current, SEEK_SET) < 0) {
      r = fail(errno_text("Failed to seek to the old end of file", errno));
    } else {
      // QEMU writes 64 KiB at a time; larger chunks cost fewer syscalls and check for a cancel as often.
      constexpr int64_t chunk = 1 << 20;
      std::vector<char> zeros(chunk, 0);
      int64_t left = offset - current;
      while (left > 0 && r) {
        if (a.cancelled()) {
          r = fail(std::strerror(ECANCELED));
          break;
        }
        ssize_t n = write(fd, zeros.data(), size_t(std::min(left, chunk)));
        if (n < 0) {
          if (errno == EINTR) continue;
          r = fail(errno_text("Could not write zeros for preallocation", errno));
          break;
        }
        left -= n;
      }
      if (r && fsync(fd) < 0) r = fail(errno_text("Could not flush file to disk", errno));
    }
  } else {
    return fail("Unsupported preallocation mode: " + prealloc);
  }
  // Undo a partial preallocation. QEMU only reports a failure here on stderr: the creation failed anyway.
  if (!r) (void)!ftruncate(fd, current);
  return r;
}

uint64_t as_u64(const boost::json::value& v) {
  // The QMP visitor wraps negative numbers for unsigned members (QAPI's compatibility rule).
  return v.is_uint64() ? v.get_uint64() : static_cast<uint64_t>(v.as_int64());
}

}  // namespace

result<void> create_file(const create_args& a) {
  const auto& o = a.options;
  std::string filename(o.at("filename").as_string());
  uint64_t size = as_u64(o.at("size"));
  std::string prealloc = o.if_contains("preallocation") ? std::string(o.at("preallocation").as_string()) : "off";
  bool nocow = o.if_contains("nocow") && o.at("nocow").as_bool();
  bool hint_given = o.if_contains("extent-size-hint");
  uint64_t hint = hint_given ? as_u64(o.at("extent-size-hint")) : 1 << 20;
  if (hint > UINT32_MAX) return fail("Extent size hint is too large");

  int fd = ::open(filename.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) return fail(errno_text("Could not create '" + filename + "'", errno));

  // Write and resize, sharing everything but resize: after this the file has the size asked for,
  // which nobody may change meanwhile (QEMU's reasoning in raw_co_create).
  uint32_t perm = perm_write | perm_resize;
  uint32_t shared = perm_all & ~perm_resize;
  result<void> r = apply_locks(fd, perm, shared);
  if (r) {
    r = check_locks(fd, perm, shared);
    if (r) r = regular_truncate(fd, 0, "off", a);  // empty it: an existing file is overwritten
    if (r) {
      if (nocow) {
        // Only an optimisation for btrfs: failures do not fail the creation.
        int attr = 0;
        if (ioctl(fd, FS_IOC_GETFLAGS, &attr) == 0) {
          attr |= FS_NOCOW_FL;
          ioctl(fd, FS_IOC_SETFLAGS, &attr);
        }
      }
      // Also only a hint (XFS): QEMU warns on stderr when an explicit hint cannot be set.
      struct fsxattr fx {};
      if (ioctl(fd, FS_IOC_FSGETXATTR, &fx) == 0) {
        fx.fsx_xflags |= FS_XFLAG_EXTSIZE;
        fx.fsx_extsize = uint32_t(hint);
        ioctl(fd, FS_IOC_FSSETXATTR, &fx);
      }
      r = regular_truncate(fd, static_cast<int64_t>(size), prealloc, a);
    }
    release_locks(fd);
  }
  if (::close(fd) != 0 && r) return fail(errno_text("Could not close the new file", errno));
  return r;
}

}  // namespace blockd::block

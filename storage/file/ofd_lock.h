// QEMU's image locking protocol on open file descriptions (OFD locks on bytes 100+ and 200+); any thread.
#pragma once
#include <fcntl.h>
#include <sys/types.h>

#include <cerrno>

namespace blockd::block::ofd {

// Byte 100+i is read-locked while permission i (perm.h bit order) is used, 200+i while it is not
// shared: qemu-img, QEMU and blockd all honour the same bytes, so they see each other's use.
inline constexpr off_t perm_base = 100;
inline constexpr off_t shared_base = 200;
inline constexpr const char* names[] = {"consistent read", "write", "write unchanged", "resize"};

// Sets (F_RDLCK/F_WRLCK) or drops (F_UNLCK) the lock on one byte; 0 or -errno.
inline int lock(int fd, off_t byte, short type) {
  struct flock fl {};
  fl.l_type = type;
  fl.l_whence = SEEK_SET;
  fl.l_start = byte;
  fl.l_len = 1;
  return fcntl(fd, F_OFD_SETLK, &fl) == 0 ? 0 : -errno;
}

// Whether another open file description holds a lock on the byte.
inline bool taken_by_other(int fd, off_t byte) {
  struct flock fl {};
  fl.l_type = F_WRLCK;
  fl.l_whence = SEEK_SET;
  fl.l_start = byte;
  fl.l_len = 1;
  if (fcntl(fd, F_OFD_GETLK, &fl) != 0) return false;
  return fl.l_type != F_UNLCK;
}

}  // namespace blockd::block::ofd

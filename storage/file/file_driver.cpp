// file / host_device: POSIX files and block devices on the iothread's io_uring, QEMU-compatible OFD locks; home iothread.
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <memory>
#include <vector>

#include "storage/block/driver.h"
#include "storage/io/reactor.h"

namespace blockd::block {
namespace {

// QEMU's lock layout: byte 100+i is read-locked while this image is used with permission i, byte
// 200+i while permission i is not shared. Another process (qemu-img, QSD, a second blockd) sees the
// same bytes, so neither can take a permission the other refuses.
constexpr off_t lock_perm_base = 100;
constexpr off_t lock_shared_base = 200;
const char* const lock_names[] = {"consistent read", "write", "write unchanged", "resize"};

int ofd_lock(int fd, off_t byte, short type) {
  struct flock fl {};
  fl.l_type = type;
  fl.l_whence = SEEK_SET;
  fl.l_start = byte;
  fl.l_len = 1;
  return fcntl(fd, F_OFD_SETLK, &fl) == 0 ? 0 : -errno;
}

bool ofd_taken_by_other(int fd, off_t byte) {
  struct flock fl {};
  fl.l_type = F_WRLCK;
  fl.l_whence = SEEK_SET;
  fl.l_start = byte;
  fl.l_len = 1;
  if (fcntl(fd, F_OFD_GETLK, &fl) != 0) return false;
  return fl.l_type != F_UNLCK;
}

class file_driver final : public block_driver {
 public:
  file_driver(driver_env env, int fd, std::string path, bool blockdev, bool locking, bool direct, uint32_t align)
      : env_(std::move(env)), fd_(fd), path_(std::move(path)), blockdev_(blockdev), locking_(locking),
        direct_(direct), align_(align) {}
  ~file_driver() override {
    if (fd_ >= 0) ::close(fd_);
  }

  uint32_t caps() const override { return cap_write_zeroes | cap_discard | cap_block_status | cap_resize; }
  driver_limits limits() const override { return {direct_ ? align_ : 1u, 0}; }

  int64_t length() const override {
    if (blockdev_) {
      uint64_t n = 0;
      if (ioctl(fd_, BLKGETSIZE64, &n) == 0) return int64_t(n);
      return 0;
    }
    struct stat st {};
    if (fstat(fd_, &st) != 0) return 0;
    return st.st_size;
  }

  image_facts facts() const override {
    struct stat st {};
    fstat(fd_, &st);
    return {length(), blockdev_ ? 0 : int64_t(st.st_blocks) * 512, true};
  }

  boost::json::value driver_stats() const override {
    return boost::json::object{{"driver", "file"},
                               {"discard-nb-ok", discard_ok_},
                               {"discard-nb-failed", discard_failed_},
                               {"discard-bytes-ok", discard_bytes_}};
  }

  void submit(io_request& r) override {
    auto* j = get_job(r);
    switch (r.op) {
      case io_op::read: env_.reactor->readv(fd_, r.iov, r.iovcnt, r.offset, j); return;
      case io_op::write: env_.reactor->writev(fd_, r.iov, r.iovcnt, r.offset, j); return;
      case io_op::flush: env_.reactor->fsync(fd_, true, j); return;
      case io_op::discard:
        if (blockdev_) return finish_sync(j, ioctl_range(BLKDISCARD, r));
        env_.reactor->fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, r.offset, r.length, j);
        return;
      case io_op::write_zeroes:
        if (blockdev_) return finish_sync(j, ioctl_range(BLKZEROOUT, r));
        j->stage = (r.flags & io_may_unmap) ? stage_punch : stage_zero_range;
        env_.reactor->fallocate(fd_, (r.flags & io_may_unmap) ? FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
                                                                 : FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
                                r.offset, r.length, j);
        return;
      case io_op::block_status: return finish_sync(j, block_status(r));
    }
  }

  result<void> truncate(int64_t size) override {
    if (blockdev_) {
      if (size > length()) return fail("Cannot grow device files");
      return {};
    }
    if (::ftruncate(fd_, size) != 0) return fail(std::string("Failed to resize '") + path_ + "': " + std::strerror(errno));
    return {};
  }

  result<void> set_perm(uint32_t perm, uint32_t shared) override {
    if (!locking_) return {};
    // Check first, then lock: a refused permission leaves the old locks in place.
    for (int i = 0; i < 4; ++i) {
      if ((perm & (1u << i)) && ofd_taken_by_other(fd_, lock_shared_base + i))
        return lock_error(std::string("Failed to get \"") + lock_names[i] + "\" lock");
      if (!(shared & (1u << i)) && ofd_taken_by_other(fd_, lock_perm_base + i))
        return lock_error(std::string("Failed to get shared \"") + lock_names[i] + "\" lock");
    }
    for (int i = 0; i < 4; ++i) {
      ofd_lock(fd_, lock_perm_base + i, (perm & (1u << i)) ? F_RDLCK : F_UNLCK);
      ofd_lock(fd_, lock_shared_base + i, (shared & (1u << i)) ? F_UNLCK : F_RDLCK);
    }
    return {};
  }

 private:
  enum stage { stage_io, stage_zero_range, stage_punch, stage_realloc, stage_write_zero_buffer };

  struct job final : io::completion {
    file_driver* d = nullptr;
    io_request* r = nullptr;
    int stage = stage_io;
    std::unique_ptr<char[]> zero_buf;
    iovec zero_iov{};
    void complete(int res) override { d->on_complete(this, res); }
  };

  job* get_job(io_request& r) {
    job* j;
    if (free_.empty()) {
      j = new job;
      j->d = this;
      all_.emplace_back(j);
    } else {
      j = free_.back();
      free_.pop_back();
    }
    j->r = &r;
    j->stage = stage_io;
    return j;
  }

  void finish(job* j, int res) {
    io_request& r = *j->r;
    j->zero_buf.reset();
    free_.push_back(j);
    r.complete(res);
  }

  void finish_sync(job* j, int res) {
    // Synchronous system calls still complete on a later turn.
    env_.defer([this, j, res] { finish(j, res); });
  }

  void on_complete(job* j, int res) {
    io_request& r = *j->r;
    switch (r.op) {
      case io_op::read:
      case io_op::write: {
        if (res < 0) return finish(j, res);
        if (res < r.length) res = short_transfer(r, res);
        return finish(j, res < 0 ? res : 0);
      }
      case io_op::discard:
        if (res == 0) {
          discard_ok_++;
          discard_bytes_ += r.length;
        } else {
          discard_failed_++;
          // Discard is advisory: a file system without hole punching still succeeds.
          if (res == -EOPNOTSUPP || res == -ENOTSUP) res = 0;
        }
        return finish(j, res);
      case io_op::write_zeroes:
        if (res == -EOPNOTSUPP || res == -ENOTSUP || res == -EINVAL) {
          if (j->stage == stage_zero_range) {
            // No ZERO_RANGE here (tmpfs): punch the range, then allocate it again.
            j->stage = stage_realloc;
            env_.reactor->fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, r.offset, r.length, j);
            return;
          }
          if (j->stage == stage_punch || j->stage == stage_realloc) {
            if (r.flags & io_no_fallback) return finish(j, -ENOTSUP);
            return write_zero_buffer(j);
          }
        }
        if (res == 0 && j->stage == stage_realloc) {
          j->stage = stage_io;
          env_.reactor->fallocate(fd_, FALLOC_FL_KEEP_SIZE, r.offset, r.length, j);
          return;
        }
        if (res == 0 && j->stage == stage_write_zero_buffer && r.offset + r.length > 0) {
          // written in one go below; short writes are handled by the sync tail
        }
        return finish(j, res < 0 ? res : 0);
      default: return finish(j, res < 0 ? res : 0);
    }
  }

  void write_zero_buffer(job* j) {
    io_request& r = *j->r;
    j->stage = stage_write_zero_buffer;
    j->zero_buf.reset(new char[size_t(r.length)]());
    j->zero_iov = {j->zero_buf.get(), size_t(r.length)};
    env_.reactor->writev(fd_, &j->zero_iov, 1, r.offset, j);
  }

  // A regular file reads short only at its end (zero-fill the rest, as QEMU does); anything else
  // (a signal, a full device) finishes synchronously here.
  int short_transfer(io_request& r, int done) {
    int64_t pos = done;
    while (pos < r.length) {
      // Locate the iovec holding byte `pos`.
      int64_t skip = pos;
      int i = 0;
      while (i < r.iovcnt && skip >= int64_t(r.iov[i].iov_len)) skip -= int64_t(r.iov[i++].iov_len);
      char* base = static_cast<char*>(r.iov[i].iov_base) + skip;
      size_t n = r.iov[i].iov_len - size_t(skip);
      ssize_t got = r.op == io_op::read ? ::pread(fd_, base, n, r.offset + pos) : ::pwrite(fd_, base, n, r.offset + pos);
      if (got < 0) {
        if (errno == EINTR) continue;
        return -errno;
      }
      if (got == 0) {
        if (r.op == io_op::write) return -EIO;
        std::memset(base, 0, n);
        got = ssize_t(n);
      }
      pos += got;
    }
    return 0;
  }

  int ioctl_range(unsigned long req, io_request& r) {
    uint64_t range[2] = {uint64_t(r.offset), uint64_t(r.length)};
    if (ioctl(fd_, req, range) != 0) return -errno;
    return 0;
  }

  int block_status(io_request& r) {
    r.depth = 1;
    r.status_length = r.length;
    if (blockdev_) {
      r.status = bs_data | bs_allocated;
      return 0;
    }
    off_t data = lseek(fd_, r.offset, SEEK_DATA);
    if (data < 0 && errno == ENXIO) {  // only a hole until EOF
      r.status = bs_zero | bs_allocated;
      return 0;
    }
    if (data < 0) {  // no SEEK_DATA support: everything is data
      r.status = bs_data | bs_allocated;
      return 0;
    }
    if (data > r.offset) {
      r.status = bs_zero | bs_allocated;
      r.status_length = std::min<int64_t>(data - r.offset, r.length);
      return 0;
    }
    off_t hole = lseek(fd_, r.offset, SEEK_HOLE);
    r.status = bs_data | bs_allocated;
    if (hole > r.offset) r.status_length = std::min<int64_t>(hole - r.offset, r.length);
    return 0;
  }

  std::unexpected<error> lock_error(std::string msg) {
    error e(std::move(msg));
    e.hint = "Is another process using the image [" + path_ + "]?";
    // QMP shows only the first line; the hint reaches the command line as QEMU prints it.
    return std::unexpected(e);
  }

  driver_env env_;
  int fd_;
  std::string path_;
  bool blockdev_;
  bool locking_;
  bool direct_;
  uint32_t align_;
  std::vector<std::unique_ptr<job>> all_;
  std::vector<job*> free_;
  uint64_t discard_ok_ = 0, discard_failed_ = 0, discard_bytes_ = 0;
};

uint32_t probe_alignment(int fd) {
  // O_DIRECT needs the device's logical block size; for files, probe reads of growing size.
  int bs = 0;
  if (ioctl(fd, BLKSSZGET, &bs) == 0 && bs > 0) return uint32_t(bs);
  void* buf = nullptr;
  if (posix_memalign(&buf, 4096, 4096) != 0) return 4096;
  uint32_t found = 4096;
  for (uint32_t a : {512u, 1024u, 2048u, 4096u}) {
    if (pread(fd, buf, a, 0) >= 0) {
      found = a;
      break;
    }
  }
  free(buf);
  return found;
}

result<std::unique_ptr<block_driver>> open_file(open_args& a, bool host_device) {
  std::string path(a.options.at("filename").as_string());
  std::string aio = a.options.if_contains("aio") ? std::string(a.options.at("aio").as_string()) : "threads";
  if (aio == "native" && !a.direct)
    return fail("aio=native was specified, but it requires cache.direct=on, which was not specified.");
  std::string locking = a.options.if_contains("locking") ? std::string(a.options.at("locking").as_string()) : "auto";
  int flags = O_CLOEXEC | (a.read_only ? O_RDONLY : O_RDWR) | (a.direct ? O_DIRECT : 0);
  int fd = ::open(path.c_str(), flags);
  if (fd < 0 && !a.read_only && a.auto_read_only && (errno == EACCES || errno == EROFS)) {
    fd = ::open(path.c_str(), (flags & ~O_RDWR) | O_RDONLY);
    if (fd >= 0) a.read_only = true;
  }
  if (fd < 0) return fail("Could not open '" + path + "': " + std::strerror(errno));
  struct stat st {};
  fstat(fd, &st);
  bool is_dev = S_ISBLK(st.st_mode) || S_ISCHR(st.st_mode);
  if (host_device && !is_dev) {
    ::close(fd);
    return fail("'host_device' driver requires '" + path + "' to be either a character or block device");
  }
  if (!host_device && S_ISBLK(st.st_mode)) {
    ::close(fd);
    return fail("'file' driver requires '" + path + "' to be a regular file; use driver 'host_device' for a "
                "block device");
  }
  if (!host_device && S_ISDIR(st.st_mode)) {
    ::close(fd);
    return fail("Could not open '" + path + "': Is a directory");
  }
  uint32_t align = a.direct ? probe_alignment(fd) : 1;
  return std::unique_ptr<block_driver>(
      new file_driver(a.env, fd, path, S_ISBLK(st.st_mode), locking != "off", a.direct, align));
}

}  // namespace

void register_file_drivers() {
  auto plain = [](const boost::json::object& o) { return std::string(o.at("filename").as_string()); };
  register_driver({"file", true, {}, [](open_args& a) { return open_file(a, false); }, plain});
  register_driver({"host_device", true, {}, [](open_args& a) { return open_file(a, true); }, plain});
}

}  // namespace blockd::block

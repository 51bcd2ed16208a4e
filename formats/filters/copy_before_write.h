// The copy-before-write filter's state as its snapshot-access view and a backup job reach it (block_driver::driver_extension(cbw_state::id)); home iothread only.
#pragma once
#include <cstdint>
#include <functional>

namespace blockd::block {

class node;
class copy_engine;

// A copy-before-write node keeps, for each chunk of its file child (the copy engine's
// granularity), whether the data of the moment the filter was opened is still to be copied
// (the engine's work map), whether the filter copied it to the target (done), and whether the
// point-in-time view may be read there at all (access: everything, or only a given bitmap's
// dirty chunks; a snapshot-access discard takes chunks out).
class cbw_state {
 public:
  static constexpr const char* id = "copy-before-write";

  virtual copy_engine& engine() = 0;
  virtual node* source() const = 0;  // the file child: the disk the guest writes
  virtual node* target() const = 0;  // where old data goes before it is overwritten
  virtual int64_t cluster_size() const = 0;

  // Where the point-in-time view of [offset, offset+length) reads from, for the first run of
  // chunks that share one answer; `run` gets its length (at least one byte, at most `length`).
  enum class where : uint8_t { source, target, none };  // none: not accessible (EACCES)
  virtual where lookup(int64_t offset, int64_t length, int64_t& run) const = 0;
  // 0, or the negative errno of the copy that broke the snapshot (on-cbw-error=break-snapshot):
  // every read of the view fails from then on.
  virtual int snapshot_error() const = 0;
  // A read of the view from the source holds back guest writes to its range until it is done
  // (they would otherwise overwrite the old data under it). Returns a ticket for read_unlock.
  virtual uint64_t read_lock(int64_t offset, int64_t length) = 0;
  virtual void read_unlock(uint64_t ticket) = 0;
  // snapshot-access discard: the whole chunks of the range leave the view (not readable any more,
  // never copied again) and are discarded on the target; done(0 or -errno).
  virtual void snapshot_discard(int64_t offset, int64_t length, std::function<void(int)> done) = 0;

 protected:
  ~cbw_state() = default;
};

}  // namespace blockd::block

// The block driver interface (one instance per node) and the driver registry; data path on the home iothread, control as documented per call.
#pragma once
#include <boost/json.hpp>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "protocol/error.h"
#include "storage/block/debug_event.h"
#include "storage/block/dirty_bitmap.h"
#include "storage/block/edge.h"
#include "storage/block/io_request.h"
#include "storage/block/object_refs.h"
#include "storage/block/perm.h"

namespace blockd::io {
class reactor;
}

namespace blockd::block {

class node;
struct reopen_args;

// What a driver may use from its home iothread. `defer` runs a function on a later loop turn: the
// way a driver without real I/O completes requests without completing them synchronously.
struct driver_env {
  io::reactor* reactor = nullptr;
  std::function<void(std::function<void()>)> defer;
  // Whether the calling thread is this loop's (the contract checker asks); empty = cannot tell.
  std::function<bool()> on_home = nullptr;
  // Control path only, never the data path: runs `start(done)` on this loop and blocks the caller until
  // done(result) has been called there. Called on the loop's own thread, it turns the loop meanwhile
  // (completions and posted functions; actors wait), the nested wait QEMU's open and close also do.
  // Returns -ESHUTDOWN when the loop is stopping. See sync_io.h for the request-level helper.
  using start_fn = std::function<void(std::function<void(int)> done)>;
  std::function<int(start_fn)> block_on = nullptr;
  // Emits a QMP event (BLOCK_IMAGE_CORRUPTED, ...) from any thread; empty = events are dropped (tests).
  std::function<void(std::string name, boost::json::object data)> emit = nullptr;
};

enum driver_cap : uint32_t {
  cap_write_zeroes = 1u << 0,  // efficient zeroing (no buffer write)
  cap_discard = 1u << 1,
  cap_fua = 1u << 2,           // honours io_fua natively (else the node adds a flush)
  cap_block_status = 1u << 3,
  cap_resize = 1u << 4,
  cap_compress = 1u << 5,  // takes io_compress writes (compressed clusters)
  cap_copy_on_read = 1u << 6,  // takes io_copy_up reads (copies backing data into the image)
};

struct driver_limits {
  uint32_t request_alignment = 1;  // offsets and lengths of read/write must be multiples of this
  int64_t max_transfer = 0;        // 0 = unlimited
  // Preferred granularity and largest single request for write_zeroes and discard (0 = none);
  // blkdebug's opt-/max-write-zero and opt-/max-discard set them. A node whose driver has any of
  // them cuts those requests into pieces as QEMU's block layer does (node_split.cpp).
  int64_t opt_write_zeroes = 0, max_write_zeroes = 0;
  int64_t opt_discard = 0, max_discard = 0;
};

// Image information for query-named-block-nodes ("image" member) and the node's filename.
struct image_facts {
  int64_t virtual_size = 0;
  int64_t actual_size = 0;
  bool has_dirty_flag = false;  // QSD shows "dirty-flag": false for file-backed nodes
  bool dirty = false;           // the value of "dirty-flag" (a qcow2 image with the dirty bit set)
  bool encrypted = false;       // "encrypted" (luks, qcow2 with encryption): image and node level
  boost::json::value format_specific = nullptr;  // ImageInfoSpecific ("format-specific"), or null
  int64_t cluster_size = 0;     // formats with clusters ("cluster-size"); 0 = none
  std::string backing_filename{};  // as the image names its backing file (empty: none, or not from the image)
  std::string backing_format{};
  boost::json::array snapshots{};  // SnapshotInfo list for internal snapshots (formats that have them)
  bool has_snapshots = false;
  // Filled by the node, not the driver: its dirty bitmaps as queries show them.
  std::vector<bitmap_fact> bitmaps{};
};

// Every virtual added here must also be forwarded by the contract checker (contract.cpp).
class block_driver {
 public:
  virtual ~block_driver() = default;

  virtual uint32_t caps() const { return 0; }
  virtual driver_limits limits() const { return {}; }
  virtual int64_t length() const = 0;

  // Starts `r`; completes it later through r.complete(). Never blocks, never completes inside submit.
  virtual void submit(io_request& r) = 0;
  // A format announces a point of its work on this child (QEMU's BLKDBG_EVENT), just before the
  // request it names; filters pass it down, blkdebug acts on it, everything else ignores it.
  virtual void debug_event(blkdebug_event e) { (void)e; }

  // Control path: called on the home iothread only (the supervisor sends a node task there; the
  // contract checker verifies it), with the node drained. A driver's own I/O then waits through
  // env.block_on, a nested turn of its home loop. Growing (size >= length) may also be done on the
  // home iothread with requests in flight: a format extends its image file that way before writing
  // past the end.
  virtual result<void> truncate(int64_t size) { (void)size; return fail("Image format driver does not support resize"); }
  // The caller is about to write up to `end`, past the current end, and that write itself
  // lengthens the image (a regular file does): true when the length counts as `end` from now on
  // with no resize. Home iothread, under I/O. A format calls it before a write past the end of its
  // file: a resize there waits for the file's inode lock behind every write in flight, stalling the
  // loop. false (the default): resize with truncate() first.
  virtual bool extend_by_write(int64_t end) {
    (void)end;
    return false;
  }
  // Reserves storage for [offset, offset+len), growing the image to offset+len if it is shorter,
  // without changing any byte it holds (fallocate mode 0), so writes may run meanwhile. Home
  // iothread, synchronous like a growing truncate. The preallocate filter uses it.
  virtual result<void> preallocate(int64_t offset, int64_t len) {
    (void)offset;
    (void)len;
    return fail("Operation not supported");
  }
  // Permission changes are two-phase over the whole affected subgraph (graph::update_perms):
  // check_perm() says whether the node can take the new cumulative permissions (a file asks whether
  // another process holds conflicting OFD locks) without changing anything; once every node of the
  // change agreed, set_perm() takes them (a file updates its locks). Either may come from the
  // supervisor while requests run, so they must not touch what the data path uses.
  virtual result<void> check_perm(uint32_t perm, uint32_t shared) { (void)perm; (void)shared; return {}; }
  virtual void set_perm(uint32_t perm, uint32_t shared) { (void)perm; (void)shared; }
  // What this driver asks of its child `role`, given what the node's users need and share and
  // whether the node is read-only (the graph's view, which a pending reopen may already have changed).
  virtual void child_perm(const std::string& role, bool read_only, uint32_t node_perm, uint32_t node_shared,
                          uint32_t& perm, uint32_t& shared) const {
    (void)role;
    (void)read_only;
    perm = node_perm;
    shared = node_shared;
  }
  // Home thread only. The node publishes the result after open and after every control task
  // (node::facts), and queries read that copy, so a driver may answer from state its data path
  // changes.
  virtual image_facts facts() const { return {.virtual_size = length()}; }
  // Driver-specific statistics for query-blockstats ("driver-specific"), or null. Any thread: only
  // relaxed atomics (stat_counter) and fixed identity may be read here.
  virtual boost::json::value driver_stats() const { return nullptr; }

  // Reopen (blockdev-reopen), in two phases so a list of nodes changes all or nothing. prepare()
  // checks the new state and readies it without disturbing the current one; it names in `consumed`
  // the options it applies (the graph refuses a change to any other one). The returned object
  // then gets exactly one of commit() or abort(), with the node quiesced. All three run on the home
  // thread (graph::prepare_driver, commit_driver, abort_driver).
  struct reopen_state {
    virtual ~reopen_state() = default;
    virtual void commit() {}
    virtual void abort() {}
    // The permissions are taken for the state after the reopen, before commit(): a driver whose
    // child permissions depend on what the reopen changes (a raw window) answers for that state.
    virtual void child_perm(const block_driver& d, const std::string& role, bool read_only, uint32_t node_perm,
                            uint32_t node_shared, uint32_t& perm, uint32_t& shared) const {
      d.child_perm(role, read_only, node_perm, node_shared, perm, shared);
    }
  };
  virtual result<std::unique_ptr<reopen_state>> reopen_prepare(const reopen_args& a,
                                                               std::vector<std::string>& consumed) {
    (void)a;
    (void)consumed;
    return std::make_unique<reopen_state>();
  }
  // Driver options a reopen may leave out, resetting them to their defaults (QEMU's mutable options).
  // A fixed list (any thread may ask; the graph does while it checks a reopen).
  virtual std::vector<std::string> reopen_resettable() const { return {}; }

  // blockdev-set-active: an inactive node gives up its hold on the image (locks) so another process
  // may take it over; activating takes it back and drops cached data another writer made stale.
  // Home thread, node drained.
  virtual result<void> activate() { return {}; }
  virtual void inactivate() {}

  // Internal snapshots (formats that keep them inside the image). Home thread, node drained. `date_sec/nsec` stamp the new snapshot; delete matches by id and/or name (at least
  // one given) and returns the deleted snapshot's SnapshotInfo.
  virtual bool supports_snapshots() const { return false; }
  virtual result<void> snapshot_create(const std::string& name, int64_t date_sec, int64_t date_nsec) {
    (void)name;
    (void)date_sec;
    (void)date_nsec;
    return fail("internal snapshots are not supported by this driver");
  }
  virtual result<boost::json::object> snapshot_delete(const std::string* id, const std::string* name) {
    (void)id;
    (void)name;
    return fail("internal snapshots are not supported by this driver");
  }

  // change-backing-file: the backing file name (and format) the image's header records, nothing
  // else; the node keeps the backing child it has. Home thread, node drained, image writable.
  virtual result<void> change_backing_file(const std::string& file, const std::string& format) {
    (void)file;
    (void)format;
    return fail("Operation not supported");
  }

  // x-blockdev-amend: `options` is the driver's BlockdevAmendOptions branch (with "driver"), `objects`
  // the secrets it may name. Home thread, node drained. The error text is the job's.
  virtual result<void> amend(const boost::json::object& options, bool force, const object_refs& objects) {
    (void)options;
    (void)force;
    (void)objects;
    return fail("Driver does not support x-blockdev-amend");
  }

  // Persistent dirty bitmaps (formats that keep them in the image: qcow2). The driver is opened
  // with its node's bitmap set (open_args::bitmaps): it loads the stored bitmaps into it at open
  // and writes the persistent ones back at close, inactivation and a reopen to read-only (the
  // points where QEMU stores them). Home thread.
  virtual bool stores_bitmaps() const { return false; }
  // Whether a new persistent bitmap could be stored; the error says why, without a prefix.
  virtual result<void> can_store_bitmap(const std::string& name, uint64_t granularity) {
    (void)name;
    (void)granularity;
    return fail("Operation not supported");
  }
  // Removes a stored bitmap from the image now (block-dirty-bitmap-remove of a persistent bitmap);
  // one the image does not hold yet is no error.
  virtual result<void> remove_stored_bitmap(const std::string& name) { (void)name; return {}; }

  // x-blockdev-change, for drivers with a list of children (quorum). Home thread, node drained.
  // child_add_role names the slot a new child gets, or says why none may be added; child_added
  // follows once the graph filled that slot. child_del_check says whether the child in `role` may
  // go; child_deleted follows before the graph empties and drops the slot.
  virtual bool has_child_list() const { return false; }
  virtual result<std::string> child_add_role() { return fail("Operation not supported"); }
  virtual void child_added(child_ref c) { (void)c; }
  virtual result<void> child_del_check(const std::string& role) {
    (void)role;
    return fail("Operation not supported");
  }
  virtual void child_deleted(child_edge* e) { (void)e; }

  // Called once before the driver is destroyed, on the home thread, with nothing in flight and the
  // children still open (parents close first). A format writes back what it caches and marks its
  // image clean here.
  virtual void close() {}

  // The node moves to another iothread (x-blockdev-set-iothread, an export's iothread): from now on
  // use `env`. Called with nothing in flight; a driver keeping loop-bound state rebinds it here.
  virtual void rehome(const driver_env& env) { (void)env; }

  // The node starts quiescing (its users wait until nothing is in flight): a driver that holds
  // requests back on purpose (throttle) lets them go now, as QEMU's bdrv_drain_begin makes it;
  // drain_end when the node resumes. Home thread.
  virtual void drain_begin() {}
  virtual void drain_end() {}

  // A driver-specific interface another driver or a job reaches through the node (a
  // snapshot-access filter finds its copy-before-write node's state, a backup job the filter's
  // copy engine): the object named `id`, or null. Home thread.
  virtual void* driver_extension(const char* id) { (void)id; return nullptr; }
};

// What a reopen asks of a driver: its own new options (children resolved away), the children it
// will have after the reopen (a child may be replaced), and the new common flags.
// Children are given as the nodes each role will hold after the commit (null: none); the driver's
// slots (child_ref) then hold them without the driver doing anything, so a driver only checks here
// that it can work with them (a raw window must fit in a new file child).
struct reopen_args {
  const boost::json::object& options;
  std::vector<std::pair<std::string, node*>> children;
  bool read_only = false;
  bool direct = false;
  bool no_flush = false;
  std::shared_ptr<const object_refs> objects = nullptr;  // the objects the options may name; null in tests
  node* find_child(const std::string& role) const {
    for (auto& [r, n] : children)
      if (r == role) return n;
    return nullptr;
  }
};

// Everything a driver's open sees: validated options (typed JSON), the resolved children, the env.
struct open_args {
  const boost::json::object& options;
  // One slot per child role (filled or empty), made by the graph before the driver opens; the
  // driver keeps child_ref handles on them (edge()) and the graph moves them into the node.
  std::vector<std::unique_ptr<child_edge>> edges{};
  driver_env env;
  bool read_only = false;  // a driver may set it (auto-read-only fallback)
  bool auto_read_only = false;
  bool direct = false;    // cache.direct
  bool no_flush = false;  // cache.no-flush
  bool discard_unmap = false;  // discard=unmap (a format's default for passing discards down)
  // Opened inactive (active=off): another process may own the image, so a format leaves what it
  // would write at open (persistent bitmaps' in-use marks) to activate().
  bool inactive = false;
  std::string node_name{};  // the name the node will have (for events and messages)
  // The objects the options may name (key-secret, throttle-group); never null.
  std::shared_ptr<const object_refs> objects = std::make_shared<object_refs>();
  // The node's dirty bitmaps, made before the driver opens so a format can load its stored ones.
  std::shared_ptr<bitmap_set> bitmaps = std::make_shared<bitmap_set>();
  // Opens a child the options did not name but the image does (a qcow2 backing file from its header):
  // the graph opens `options` as an automatically named node and adds it as `role`. Empty in tests.
  std::function<result<node*>(const std::string& role, const boost::json::object& options)> open_child = nullptr;
  // The filename QEMU would show for a node (to resolve a backing file name relative to the image).
  std::function<std::string(const node&)> filename_of = nullptr;
  // The slot of `role`, or null when the driver has no such role.
  child_edge* edge(const std::string& role) const {
    for (auto& e : edges)
      if (e->role == role) return e.get();
    return nullptr;
  }
  // Any node of the graph by name (a copy-on-read filter's `bottom`); null when there is none.
  std::function<node*(const std::string&)> find_node = nullptr;
  // The node `role` holds now (null: empty or no such slot).
  node* find_child(const std::string& role) const {
    child_edge* e = edge(role);
    return e ? e->child : nullptr;
  }
  // Fills (or makes) the slot of `role` with `n`: the graph does this, and tests that build nodes by hand.
  child_edge* set_child(const std::string& role, node* n) {
    child_edge* e = edge(role);
    if (!e) {
      edges.push_back(std::make_unique<child_edge>());
      e = edges.back().get();
      e->role = role;
    }
    e->child = n;
    return e;
  }
};

// What blockdev-create hands a driver's create function. It runs on the create job's own worker
// thread (never a loop: creation blocks), reaching nodes only through sync_io.
struct create_args {
  const boost::json::object& options;  // validated BlockdevCreateOptions (with "driver")
  // Resolves a BlockdevRef member of `options` (a node name or inline options) to an open node the
  // job holds for writing; null member = error. The job releases what it opened when it ends.
  std::function<result<node*>(const boost::json::value& ref)> resolve;
  // Set when the job is cancelled: a long creation (preallocation) stops at its next check.
  std::function<bool()> cancelled = [] { return false; };
  // The objects the options may name (luks key-secret), as they were when the command ran; never null.
  std::shared_ptr<const object_refs> objects = std::make_shared<object_refs>();
};

}  // namespace blockd::block
namespace blockd::qmp {
class schema;
}
namespace blockd::block {

struct driver_entry {
  std::string name;
  bool protocol = false;                // a leaf that talks to the OS
  std::vector<std::string> child_roles;  // option members holding a BlockdevRef, e.g. {"file"}
  std::function<result<std::unique_ptr<block_driver>>(open_args&)> open;
  // The filename QEMU reports for a node of this driver: plain for protocol nodes with a filename,
  // otherwise "json:{...}" built from the options (see node_filename in graph).
  std::function<std::string(const boost::json::object& options)> plain_filename;
  // blockdev-create for this driver; null when the driver cannot create images.
  std::function<result<void>(const create_args&)> create = nullptr;
  // Options that only tune how the node runs (caches, discard passing): a format node with nothing
  // but these over a protocol node is named after its file, as QEMU's filename refresh does.
  std::vector<std::string> runtime_options = {};
  // The image names its backing file itself (qcow2): an explicit backing that differs, or null
  // while the image names one, makes the node's filename a json: description.
  bool backing_from_image = false;
  // A filter (QEMU's is_filter): its node presents its `file` child's data unchanged in place, so
  // queries show that child as the node's backing image, and its filename is always a json: one.
  bool is_filter = false;
  // Options a json: filename leaves out (QEMU names a node by its strong options only: those that
  // change what the data is, not how it is served).
  std::vector<std::string> weak_options = {};
  // The driver's branch of BlockdevOptions: its QAPI type, and a function that defines the type
  // (and the types only it uses) in the schema the monitor validates blockdev-add with. Drivers
  // that share a type (file and host_device) name it; the first one registered defines it.
  std::string options_type = {};
  std::function<void(qmp::schema&)> define_options = nullptr;
  // The same for blockdev-create's BlockdevCreateOptions (drivers with `create` only).
  std::string create_options_type = {};
  std::function<void(qmp::schema&)> define_create_options = nullptr;
  // Option members holding a list of BlockdevRef (quorum's "children"): element N opens as role
  // "<member>.N" (QEMU's names), after the fixed roles; x-blockdev-change may add or drop such slots.
  std::vector<std::string> child_list_roles = {};
  // A filename made from the children's (blkdebug:CONFIG:IMAGE, blkverify:TEST:RAW): given the own
  // options and each child role's filename; empty = the usual rules (json: or the file's name).
  std::function<std::string(const boost::json::object& options,
                            const std::function<std::string(const std::string& role)>& child_filename)>
      composite_filename = nullptr;
};

// The list member a role belongs to ("children" for "children.2"), or empty for a fixed role.
inline std::string list_member_of(const driver_entry& e, const std::string& role) {
  for (auto& m : e.child_list_roles)
    if (role.size() > m.size() + 1 && role.compare(0, m.size(), m) == 0 && role[m.size()] == '.') return m;
  return {};
}

// The drivers this build has (registered at start-up by each driver's translation unit).
const driver_entry* find_driver(const std::string& name);
void register_driver(driver_entry e);
// Every registered driver, in registration order (the schema builds blockdev-add's union from it).
std::vector<const driver_entry*> registered_drivers();
void register_builtin_drivers();  // idempotent

}  // namespace blockd::block

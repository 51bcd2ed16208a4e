// The driver registry: name -> entry, filled once at start-up; read from any thread after that.
#include <mutex>
#include <vector>

#include "storage/block/driver.h"

namespace blockd::block {

void register_null_drivers();
void register_file_drivers();
void register_raw_driver();
void register_compress_driver();
void register_cor_driver();
void register_preallocate_driver();
void register_quorum_driver();
void register_blklogwrites_driver();
void register_throttle_driver();
void register_cbw_driver();
void register_snapshot_access_driver();
void register_blkdebug_driver();
void register_blkverify_driver();
}  // namespace blockd::block
namespace blockd::qcow2 {
void register_qcow2_driver();
}  // namespace blockd::qcow2
namespace blockd::luks {
void register_luks_driver();
}  // namespace blockd::luks
namespace blockd::block {

namespace {
std::vector<driver_entry>& table() {
  static std::vector<driver_entry> t;
  return t;
}
}  // namespace

void register_driver(driver_entry e) { table().push_back(std::move(e)); }

void register_builtin_drivers() {
  static std::once_flag once;
  std::call_once(once, [] {
    register_file_drivers();
    register_null_drivers();
    register_raw_driver();
    register_blkdebug_driver();
    register_blkverify_driver();
    qcow2::register_qcow2_driver();
    register_compress_driver();
    register_cor_driver();
    register_preallocate_driver();
    luks::register_luks_driver();
    register_quorum_driver();
    register_blklogwrites_driver();
    register_throttle_driver();
    register_cbw_driver();
    register_snapshot_access_driver();
  });
}

std::vector<const driver_entry*> registered_drivers() {
  register_builtin_drivers();
  std::vector<const driver_entry*> out;
  for (auto& e : table()) out.push_back(&e);
  return out;
}

const driver_entry* find_driver(const std::string& name) {
  register_builtin_drivers();
  for (auto& e : table())
    if (e.name == name) return &e;
  return nullptr;
}

}  // namespace blockd::block

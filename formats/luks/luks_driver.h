// The luks format driver's entry points (registration, creation, header reading shared by open and amend); home iothread or the create job's worker as noted.
#pragma once
#include <cstdint>
#include <vector>

#include "formats/luks/luks_header.h"
#include "protocol/error.h"
#include "storage/block/driver.h"

namespace blockd::block {
class node;
class sync_io;
}

namespace blockd::luks {

void register_luks_driver();
// blockdev-create driver=luks (the create job's worker thread; blocks).
result<void> create_luks(const block::create_args& a);
// The first 4096 bytes of `n` (zeroes past its end), through sync_io; control path only.
result<std::vector<uint8_t>> read_header_bytes(block::node& n);

// Creation pieces (also used by qcow2's luks encryption): a new header from QCryptoBlockCreateOptionsLUKS
// members `o` with slot 0 for `secret` (its material in `slot0`, the master key in `master`); the
// bytes the header and its key material take; writing the header block at offset `base` (0; qcow2:
// where its header area starts).
result<header> new_header(const boost::json::object& o, const std::string& secret, std::vector<uint8_t>& master,
                          std::vector<uint8_t>& slot0, bool detached);
uint64_t header_area_bytes(const header& h);
result<void> write_header(block::sync_io& io, const header& h, uint64_t base = 0);

// x-blockdev-amend on an open image: changes `h` and its image through `io` (the header's node);
// `open_secret` unlocks the master key when the options name no "secret". `base`: where the LUKS
// header starts in that node (0; qcow2: its header area's cluster), every offset being relative to it.
result<void> amend_luks(header& h, block::sync_io& io, const boost::json::object& o, bool force,
                        const block::object_refs& objects, const std::string& open_secret, uint64_t base = 0);

}  // namespace blockd::luks

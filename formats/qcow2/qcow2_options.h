// The qcow2 driver's blockdev-add options in the QMP schema (BlockdevOptionsQcow2 and its types); start-up, any thread.
#pragma once

namespace blockd::qmp {
class schema;
}

namespace blockd::qcow2 {

void define_qcow2_options(qmp::schema& s);

}  // namespace blockd::qcow2

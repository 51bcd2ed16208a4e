// The qcow2 driver's blockdev-add and blockdev-create options in the QMP schema, with QSD 10.2's names; start-up, any thread.
#pragma once

namespace blockd::qmp {
class schema;
}

namespace blockd::qcow2 {

void define_qcow2_options(qmp::schema& s);
void define_qcow2_create_options(qmp::schema& s);  // BlockdevCreateOptionsQcow2

}  // namespace blockd::qcow2

// The qcow2 driver's blockdev-add and blockdev-create options in the QMP schema, with QSD 10.2's names; start-up, any thread.
#include "formats/qcow2/qcow2_options.h"

#include "protocol/qmp/schema.h"

namespace blockd::qcow2 {

void define_qcow2_options(qmp::schema& s) {
  s.enumeration("Qcow2OverlapCheckMode", "none constant cached all");
  s.object("Qcow2OverlapCheckFlags",
           "*template:Qcow2OverlapCheckMode *main-header:bool *active-l1:bool *active-l2:bool *refcount-table:bool "
           "*refcount-block:bool *snapshot-table:bool *inactive-l1:bool *inactive-l2:bool *bitmap-directory:bool");
  s.alternate("Qcow2OverlapChecks", {"Qcow2OverlapCheckFlags", "Qcow2OverlapCheckMode"});
  s.enumeration("BlockdevQcow2EncryptionFormat", "aes luks");
  // QCryptoBlockOptions* are crypto.json's, shared with blockdev-create (schema_defs.cpp).
  s.flat_union("BlockdevQcow2Encryption", "format:BlockdevQcow2EncryptionFormat", "format",
               {{"aes", "QCryptoBlockOptionsQCow"}, {"luks", "QCryptoBlockOptionsLUKS"}});
  s.object("BlockdevOptionsQcow2",
           "file:BlockdevRef *backing:BlockdevRefOrNull *lazy-refcounts:bool *pass-discard-request:bool "
           "*pass-discard-snapshot:bool *pass-discard-other:bool *discard-no-unref:bool "
           "*overlap-check:Qcow2OverlapChecks *cache-size:int *l2-cache-size:int *l2-cache-entry-size:int "
           "*refcount-cache-size:int *cache-clean-interval:int *encrypt:BlockdevQcow2Encryption "
           "*data-file:BlockdevRef");
}

void define_qcow2_create_options(qmp::schema& s) {
  // QCryptoBlockCreateOptions, PreallocMode and Qcow2CompressionType are shared (schema_defs.cpp).
  s.enumeration("BlockdevQcow2Version", "v2 v3");
  s.object("BlockdevCreateOptionsQcow2",
           "file:BlockdevRef *data-file:BlockdevRef *data-file-raw:bool *extended-l2:bool size:size "
           "*version:BlockdevQcow2Version *backing-file:str *backing-fmt:BlockdevDriver "
           "*encrypt:QCryptoBlockCreateOptions *cluster-size:size *preallocation:PreallocMode *lazy-refcounts:bool "
           "*refcount-bits:int *compression-type:Qcow2CompressionType");
}

}  // namespace blockd::qcow2

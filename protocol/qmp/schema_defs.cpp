// The definitions of blockd's QMP schema (QSD 10.2 names and types for what blockd implements); any thread.
#include "protocol/qmp/schema.h"

#include <algorithm>

#include "storage/block/driver.h"

namespace blockd::qmp {
namespace {

// Events QSD can emit; their types are fixed now so later components raise them unchanged.
void define_events(schema& s) {
  s.enumeration("IoOperationType", "read write");
  s.enumeration("BlockErrorAction", "ignore report stop");
  s.enumeration("JobType", "commit stream mirror backup create amend snapshot-load snapshot-save snapshot-delete");
  s.enumeration("JobStatus", "undefined created running paused ready standby waiting pending aborting concluded null");
  s.enumeration("QuorumOpType", "read write flush");
  s.event("BLOCK_IMAGE_CORRUPTED", "device:str *node-name:str msg:str *offset:int *size:int fatal:bool");
  s.event("BLOCK_IO_ERROR",
          "qom-path:str device:str *node-name:str operation:IoOperationType action:BlockErrorAction *nospace:bool "
          "reason:str");
  s.event("BLOCK_JOB_COMPLETED", "type:JobType device:str len:int offset:int speed:int *error:str");
  s.event("BLOCK_JOB_CANCELLED", "type:JobType device:str len:int offset:int speed:int");
  s.event("BLOCK_JOB_ERROR", "device:str operation:IoOperationType action:BlockErrorAction");
  s.event("BLOCK_JOB_READY", "type:JobType device:str len:int offset:int speed:int");
  s.event("BLOCK_JOB_PENDING", "type:JobType id:str");
  s.event("BLOCK_WRITE_THRESHOLD", "node-name:str amount-exceeded:uint64 write-threshold:uint64");
  s.event("QUORUM_FAILURE", "reference:str sector-num:int sectors-count:int");
  s.event("QUORUM_REPORT_BAD", "type:QuorumOpType *error:str node-name:str sector-num:int sectors-count:int");
  s.event("JOB_STATUS_CHANGE", "id:str status:JobStatus");
  s.event("BLOCK_EXPORT_DELETED", "id:str");
  s.event("VSERPORT_CHANGE", "id:str open:bool");
}

void define_control(schema& s) {
  s.enumeration("QMPCapability", "oob");
  s.command("qmp_capabilities", "*enable:[QMPCapability]");
  s.object("VersionTriple", "major:int minor:int micro:int");
  s.object("VersionInfo", "qemu:VersionTriple package:str");
  s.command("query-version", "", "VersionInfo");
  s.object("CommandInfo", "name:str");
  s.command("query-commands", "", "[CommandInfo]");
  s.command("quit", "");
}

void define_introspection(schema& s) {
  s.enumeration("SchemaMetaType", "builtin enum array object alternate command event");
  s.enumeration("JSONType", "string number int boolean null object array value");
  s.object("SchemaInfoBuiltin", "json-type:JSONType");
  s.object("SchemaInfoEnumMember", "name:str *features:[str]");
  s.object("SchemaInfoEnum", "members:[SchemaInfoEnumMember] values:[str]@deprecated");
  s.object("SchemaInfoArray", "element-type:str");
  s.object("SchemaInfoObjectMember", "name:str type:str *default:any *features:[str]");
  s.object("SchemaInfoObjectVariant", "case:str type:str");
  s.object("SchemaInfoObject", "members:[SchemaInfoObjectMember] *tag:str *variants:[SchemaInfoObjectVariant]");
  s.object("SchemaInfoAlternateMember", "type:str");
  s.object("SchemaInfoAlternate", "members:[SchemaInfoAlternateMember]");
  s.object("SchemaInfoCommand", "arg-type:str ret-type:str *allow-oob:bool");
  s.object("SchemaInfoEvent", "arg-type:str");
  s.flat_union("SchemaInfo", "name:str meta-type:SchemaMetaType *features:[str]", "meta-type",
               {{"builtin", "SchemaInfoBuiltin"},
                {"enum", "SchemaInfoEnum"},
                {"array", "SchemaInfoArray"},
                {"object", "SchemaInfoObject"},
                {"alternate", "SchemaInfoAlternate"},
                {"command", "SchemaInfoCommand"},
                {"event", "SchemaInfoEvent"}});
  s.command("query-qmp-schema", "", "[SchemaInfo]");
}

void define_objects(schema& s) {
  // QSD 10.2's ObjectType. Types QSD links in get their property structs; the emulator-only types
  // have no branch in blockd (object-add refuses them, as QSD does, with "invalid object type").
  s.enumeration("ObjectType",
                "acpi-generic-initiator acpi-generic-port authz-list authz-listfile authz-pam authz-simple can-bus "
                "can-host-socketcan colo-compare cryptodev-backend cryptodev-backend-builtin cryptodev-backend-lkcf "
                "cryptodev-vhost-user dbus-vmstate filter-buffer filter-dump filter-mirror filter-redirector "
                "filter-replay filter-rewriter igvm-cfg input-barrier input-linux iommufd iothread main-loop "
                "memory-backend-epc memory-backend-file memory-backend-memfd memory-backend-ram memory-backend-shm "
                "pef-guest pr-manager-helper qtest rng-builtin rng-egd rng-random secret secret_keyring sev-guest "
                "sev-snp-guest thread-context s390-pv-guest tdx-guest throttle-group tls-creds-anon tls-creds-psk "
                "tls-creds-x509 tls-cipher-suites x-remote-object x-vfio-user-server");
  s.enumeration("QAuthZListPolicy", "deny allow");
  s.enumeration("QAuthZListFormat", "exact glob");
  s.object("QAuthZListRule", "match:str policy:QAuthZListPolicy *format:QAuthZListFormat");
  s.object("AuthZListProperties", "*policy:QAuthZListPolicy *rules:[QAuthZListRule]");
  s.object("AuthZListFileProperties", "filename:str *refresh:bool");
  s.object("AuthZPAMProperties", "service:str");
  s.object("AuthZSimpleProperties", "identity:str");
  s.object("EventLoopBaseProperties", "*aio-max-batch:int *thread-pool-min:int *thread-pool-max:int");
  // thread-context is blockd's extension: the iothread runs on that thread-context's CPUs.
  s.object("IothreadProperties", "*poll-max-ns:int *poll-grow:int *poll-shrink:int *thread-context:str",
           "EventLoopBaseProperties");
  s.object("MainLoopProperties", "", "EventLoopBaseProperties");
  s.object("PrManagerHelperProperties", "path:str");
  s.enumeration("QCryptoSecretFormat", "raw base64");
  s.object("SecretCommonProperties", "*format:QCryptoSecretFormat *keyid:str *iv:str");
  s.object("SecretProperties", "*data:str *file:str", "SecretCommonProperties");
  s.object("SecretKeyringProperties", "serial:int32", "SecretCommonProperties");
  s.object("ThreadContextProperties", "*cpu-affinity:[uint16] *node-affinity:[uint16]");
  s.object("ThrottleLimits",
           "*iops-total:int *iops-total-max:int *iops-total-max-length:int *iops-read:int *iops-read-max:int "
           "*iops-read-max-length:int *iops-write:int *iops-write-max:int *iops-write-max-length:int *bps-total:int "
           "*bps-total-max:int *bps-total-max-length:int *bps-read:int *bps-read-max:int *bps-read-max-length:int "
           "*bps-write:int *bps-write-max:int *bps-write-max-length:int *iops-size:int");
  s.object("ThrottleGroupProperties",
           "*limits:ThrottleLimits *x-iops-total:int@unstable *x-iops-total-max:int@unstable "
           "*x-iops-total-max-length:int@unstable *x-iops-read:int@unstable *x-iops-read-max:int@unstable "
           "*x-iops-read-max-length:int@unstable *x-iops-write:int@unstable *x-iops-write-max:int@unstable "
           "*x-iops-write-max-length:int@unstable *x-bps-total:int@unstable *x-bps-total-max:int@unstable "
           "*x-bps-total-max-length:int@unstable *x-bps-read:int@unstable *x-bps-read-max:int@unstable "
           "*x-bps-read-max-length:int@unstable *x-bps-write:int@unstable *x-bps-write-max:int@unstable "
           "*x-bps-write-max-length:int@unstable *x-iops-size:int@unstable");
  s.enumeration("QCryptoTLSCredsEndpoint", "client server");
  s.object("TlsCredsProperties", "*verify-peer:bool *dir:str *endpoint:QCryptoTLSCredsEndpoint *priority:str");
  s.object("TlsCredsAnonProperties", "", "TlsCredsProperties");
  s.object("TlsCredsPskProperties", "*username:str", "TlsCredsProperties");
  s.object("TlsCredsX509Properties", "*sanity-check:bool *passwordid:str", "TlsCredsProperties");
  s.flat_union("ObjectOptions", "qom-type:ObjectType id:str", "qom-type",
               {{"authz-list", "AuthZListProperties"},
                {"authz-listfile", "AuthZListFileProperties"},
                {"authz-pam", "AuthZPAMProperties"},
                {"authz-simple", "AuthZSimpleProperties"},
                {"iothread", "IothreadProperties"},
                {"main-loop", "MainLoopProperties"},
                {"pr-manager-helper", "PrManagerHelperProperties"},
                {"secret", "SecretProperties"},
                {"secret_keyring", "SecretKeyringProperties"},
                {"thread-context", "ThreadContextProperties"},
                {"throttle-group", "ThrottleGroupProperties"},
                {"tls-creds-anon", "TlsCredsAnonProperties"},
                {"tls-creds-psk", "TlsCredsPskProperties"},
                {"tls-creds-x509", "TlsCredsX509Properties"},
                {"tls-cipher-suites", "TlsCredsProperties"}},
               /*open_branches=*/true);
  s.command("object-add", "ObjectOptions", "", true);
  s.command("object-del", "id:str");
  // qom.json's commands over the tree (config/qom/model.h).
  s.object("ObjectPropertyInfo", "name:str type:str *description:str *default-value:any");
  s.object("ObjectTypeInfo", "name:str *abstract:bool *parent:str");
  s.object("ObjectPropertyValue", "name:str type:str *value:any");
  s.object("ObjectPropertiesValues", "properties:[ObjectPropertyValue]");
  s.command("qom-list", "path:str", "[ObjectPropertyInfo]");
  s.command("qom-get", "path:str property:str", "any");
  s.command("qom-set", "path:str property:str value:any");
  s.command("qom-list-types", "*implements:str *abstract:bool", "[ObjectTypeInfo]");
  s.command("qom-list-properties", "typename:str", "[ObjectPropertyInfo]");
  s.command("qom-list-get", "paths:[str]", "[ObjectPropertiesValues]");
}

// job.json: the generic job commands, for every job type (JobType and JobStatus come with the events).
void define_jobs(schema& s) {
  s.enumeration("JobVerb", "cancel pause resume set-speed complete dismiss finalize change");
  s.command("job-pause", "id:str");
  s.command("job-resume", "id:str");
  s.command("job-cancel", "id:str");
  s.command("job-complete", "id:str");
  s.command("job-dismiss", "id:str");
  s.command("job-finalize", "id:str");
  s.object("JobInfo", "id:str type:JobType status:JobStatus current-progress:int total-progress:int *error:str");
  s.command("query-jobs", "", "[JobInfo]");
}

// block-core.json's block jobs: the block-job-* verbs, query-block-jobs and the job starters.
void define_block_jobs(schema& s) {
  s.enumeration("BlockdevOnError", "report ignore enospc stop auto");
  s.object("BlockJobInfoMirror", "actively-synced:bool");
  s.flat_union("BlockJobInfo",
               "type:JobType device:str len:int offset:int busy:bool paused:bool speed:int "
               "io-status:BlockDeviceIoStatus ready:bool status:JobStatus auto-finalize:bool auto-dismiss:bool *error:str",
               "type", {{"mirror", "BlockJobInfoMirror"}});
  s.command("query-block-jobs", "", "[BlockJobInfo]");
  s.command("block-job-set-speed", "device:str speed:int");
  s.command("block-job-cancel", "device:str *force:bool");
  s.command("block-job-pause", "device:str");
  s.command("block-job-resume", "device:str");
  s.command("block-job-complete", "device:str");
  s.command("block-job-dismiss", "id:str");
  s.command("block-job-finalize", "id:str");
  // 8.2+: only mirror has options to change (its copy mode); the other job types' branches are empty.
  s.enumeration("MirrorCopyMode", "background write-blocking");
  s.object("BlockJobChangeOptionsMirror", "copy-mode:MirrorCopyMode");
  s.flat_union("BlockJobChangeOptions", "id:str type:JobType", "type", {{"mirror", "BlockJobChangeOptionsMirror"}});
  s.command("block-job-change", "BlockJobChangeOptions", "", true);
  for (const char* c : {"block-job-pause", "block-job-resume", "block-job-complete", "block-job-dismiss", "block-job-finalize"})
    s.command_features(c, {"deprecated"});
  s.command("block-commit",
            "*job-id:str device:str *base-node:str *base:str@deprecated *top-node:str *top:str@deprecated "
            "*backing-file:str *backing-mask-protocol:bool *speed:int *on-error:BlockdevOnError "
            "*filter-node-name:str *auto-finalize:bool *auto-dismiss:bool");
  s.enumeration("MirrorSyncMode", "top full none incremental bitmap");
  s.object("DriveMirror",
           "*job-id:str device:str target:str *format:str *node-name:str *replaces:str sync:MirrorSyncMode "
           "*mode:NewImageMode *speed:int *granularity:uint32 *buf-size:int *on-source-error:BlockdevOnError "
           "*on-target-error:BlockdevOnError *unmap:bool *copy-mode:MirrorCopyMode *auto-finalize:bool "
           "*auto-dismiss:bool");
  s.command("drive-mirror", "DriveMirror", "", true);
  s.command("blockdev-mirror",
            "*job-id:str device:str target:str *replaces:str sync:MirrorSyncMode *speed:int *granularity:uint32 "
            "*buf-size:int *on-source-error:BlockdevOnError *on-target-error:BlockdevOnError *filter-node-name:str "
            "*copy-mode:MirrorCopyMode *auto-finalize:bool *auto-dismiss:bool *target-is-zero:bool");
  // Backup (block-core.json BackupCommon, 10.2: on-cbw-error, discard-source, x-perf min-cluster-size).
  s.enumeration("BitmapSyncMode", "on-success never always");
  if (!s.find_type("OnCbwError")) s.enumeration("OnCbwError", "break-guest-write break-snapshot");
  s.object("BackupPerf", "*use-copy-range:bool *max-workers:int *max-chunk:int *min-cluster-size:size");
  const std::string backup_common =
      "*job-id:str device:str sync:MirrorSyncMode *speed:int *bitmap:str *bitmap-mode:BitmapSyncMode "
      "*compress:bool *on-source-error:BlockdevOnError *on-target-error:BlockdevOnError *on-cbw-error:OnCbwError "
      "*auto-finalize:bool *auto-dismiss:bool *filter-node-name:str *discard-source:bool *x-perf:BackupPerf@unstable "
      "target:str";
  s.object("BlockdevBackup", backup_common);
  s.object("DriveBackup", backup_common + " *format:str *mode:NewImageMode");
  s.command("blockdev-backup", "BlockdevBackup", "", true);
  s.command("drive-backup", "DriveBackup", "", true);
  s.command_features("drive-backup", {"deprecated"});
  s.command("block-stream",
            "*job-id:str device:str *base:str *base-node:str *backing-file:str *backing-mask-protocol:bool *bottom:str "
            "*speed:int *on-error:BlockdevOnError *filter-node-name:str *auto-finalize:bool *auto-dismiss:bool");
}

// The block graph (block-core.json): node options for every QSD 10.2 driver name; the drivers blockd
// builds have their exact option structs, the others an open branch (blockdev-add then refuses them).
// Return types of the block queries (QSD 10.2 layout; introspection masks the names).
void define_block_info_types(schema& s) {
  s.object("SnapshotInfo",
           "id:str name:str vm-state-size:int date-sec:int date-nsec:int vm-clock-sec:int vm-clock-nsec:int "
           "*icount:int");
  s.enumeration("ImageInfoSpecificKind", "qcow2 vmdk luks rbd file");
  s.enumeration("QCryptoCipherAlgo",
                "aes-128 aes-192 aes-256 des 3des cast5-128 serpent-128 serpent-192 serpent-256 twofish-128 "
                "twofish-192 twofish-256 sm4");
  s.enumeration("QCryptoCipherMode", "ecb cbc xts ctr");
  s.enumeration("QCryptoIVGenAlgo", "plain plain64 essiv");
  s.enumeration("QCryptoHashAlgo", "md5 sha1 sha224 sha256 sha384 sha512 ripemd160 sm3");
  s.object("QCryptoBlockInfoLUKSSlot", "active:bool *iters:int *stripes:int key-offset:int");
  s.object("QCryptoBlockInfoLUKS",
           "cipher-alg:QCryptoCipherAlgo cipher-mode:QCryptoCipherMode ivgen-alg:QCryptoIVGenAlgo "
           "*ivgen-hash-alg:QCryptoHashAlgo hash-alg:QCryptoHashAlgo detached-header:bool payload-offset:int "
           "master-key-iters:int uuid:str slots:[QCryptoBlockInfoLUKSSlot]");
  // QEMU's base is ImageInfoSpecificQCow2EncryptionBase {format: BlockdevQcow2EncryptionFormat}.
  s.flat_union("ImageInfoSpecificQCow2Encryption", "format:BlockdevQcow2EncryptionFormat", "format",
               {{"luks", "QCryptoBlockInfoLUKS"}});
  s.enumeration("Qcow2BitmapInfoFlags", "in-use auto");
  s.object("Qcow2BitmapInfo", "name:str granularity:int flags:[Qcow2BitmapInfoFlags]");
  s.enumeration("Qcow2CompressionType", "zlib zstd");
  s.object("ImageInfoSpecificQCow2",
           "compat:str *data-file:str *data-file-raw:bool *extended-l2:bool *lazy-refcounts:bool *corrupt:bool "
           "refcount-bits:int *encrypt:ImageInfoSpecificQCow2Encryption *bitmaps:[Qcow2BitmapInfo] "
           "compression-type:Qcow2CompressionType");
  s.object("ImageInfoSpecificQCow2Wrapper", "data:ImageInfoSpecificQCow2");
  s.object("VmdkExtentInfo", "filename:str format:str virtual-size:int *cluster-size:int *compressed:bool");
  s.object("ImageInfoSpecificVmdk", "create-type:str cid:int parent-cid:int extents:[VmdkExtentInfo]");
  s.object("ImageInfoSpecificVmdkWrapper", "data:ImageInfoSpecificVmdk");
  s.object("ImageInfoSpecificLUKSWrapper", "data:QCryptoBlockInfoLUKS");
  s.enumeration("RbdImageEncryptionFormat", "luks luks2 luks-any");
  s.object("ImageInfoSpecificRbd", "*encryption-format:RbdImageEncryptionFormat");
  s.object("ImageInfoSpecificRbdWrapper", "data:ImageInfoSpecificRbd");
  s.object("ImageInfoSpecificFile", "*extent-size-hint:size");
  s.object("ImageInfoSpecificFileWrapper", "data:ImageInfoSpecificFile");
  s.flat_union("ImageInfoSpecific", "type:ImageInfoSpecificKind", "type",
               {{"qcow2", "ImageInfoSpecificQCow2Wrapper"},
                {"vmdk", "ImageInfoSpecificVmdkWrapper"},
                {"luks", "ImageInfoSpecificLUKSWrapper"},
                {"rbd", "ImageInfoSpecificRbdWrapper"},
                {"file", "ImageInfoSpecificFileWrapper"}});
  s.object("BlockLimitsInfo",
           "request-alignment:uint32 *max-discard:uint64 *discard-alignment:uint32 *max-write-zeroes:uint64 "
           "*write-zeroes-alignment:uint32 *opt-transfer:uint32 *max-transfer:uint32 *max-hw-transfer:uint32 "
           "max-iov:int *max-hw-iov:int min-mem-alignment:size opt-mem-alignment:size");
  s.object("ImageInfo",
           "filename:str format:str *dirty-flag:bool *actual-size:int virtual-size:int *cluster-size:int "
           "*encrypted:bool *compressed:bool *backing-filename:str *full-backing-filename:str "
           "*backing-filename-format:str *snapshots:[SnapshotInfo] *limits:BlockLimitsInfo "
           "*format-specific:ImageInfoSpecific *backing-image:ImageInfo");
  s.object("BlockdevCacheInfo", "writeback:bool direct:bool no-flush:bool");
  s.object("BlockDirtyInfo",
           "*name:str count:int granularity:uint32 recording:bool busy:bool persistent:bool *inconsistent:bool");
  s.object("BlockdevChild", "child:str node-name:str");
  s.object("BlockDeviceInfo",
           "file:str node-name:str ro:bool drv:str *backing_file:str backing_file_depth:int "
           "children:[BlockdevChild] active:bool encrypted:bool detect_zeroes:BlockdevDetectZeroesOptions bps:int "
           "bps_rd:int bps_wr:int iops:int iops_rd:int iops_wr:int image:ImageInfo *bps_max:int *bps_rd_max:int "
           "*bps_wr_max:int *iops_max:int *iops_rd_max:int *iops_wr_max:int *bps_max_length:int "
           "*bps_rd_max_length:int *bps_wr_max_length:int *iops_max_length:int *iops_rd_max_length:int "
           "*iops_wr_max_length:int *iops_size:int *group:str cache:BlockdevCacheInfo write_threshold:int "
           "*dirty-bitmaps:[BlockDirtyInfo]");
}

void define_block_queries(schema& s) {
  define_block_info_types(s);
  s.command("query-named-block-nodes", "*flat:bool", "[BlockDeviceInfo]");
  s.enumeration("BlockDeviceIoStatus", "ok failed nospace");
  s.object("BlockInfo",
           "device:str *qdev:str type:str removable:bool locked:bool *inserted:BlockDeviceInfo *tray_open:bool "
           "*io-status:BlockDeviceIoStatus");
  s.command("query-block", "", "[BlockInfo]");
  s.object("BlockDeviceTimedStats",
           "interval_length:int min_rd_latency_ns:int max_rd_latency_ns:int avg_rd_latency_ns:int "
           "min_wr_latency_ns:int max_wr_latency_ns:int avg_wr_latency_ns:int min_zone_append_latency_ns:int "
           "max_zone_append_latency_ns:int avg_zone_append_latency_ns:int min_flush_latency_ns:int "
           "max_flush_latency_ns:int avg_flush_latency_ns:int avg_rd_queue_depth:number avg_wr_queue_depth:number "
           "avg_zone_append_queue_depth:number");
  s.object("BlockLatencyHistogramInfo", "boundaries:[uint64] bins:[uint64]");
  s.object("BlockDeviceStats",
           "rd_bytes:int wr_bytes:int zone_append_bytes:int unmap_bytes:int rd_operations:int wr_operations:int "
           "zone_append_operations:int flush_operations:int unmap_operations:int rd_total_time_ns:int "
           "wr_total_time_ns:int zone_append_total_time_ns:int flush_total_time_ns:int unmap_total_time_ns:int "
           "wr_highest_offset:int rd_merged:int wr_merged:int zone_append_merged:int unmap_merged:int "
           "*idle_time_ns:int failed_rd_operations:int failed_wr_operations:int failed_zone_append_operations:int "
           "failed_flush_operations:int failed_unmap_operations:int invalid_rd_operations:int "
           "invalid_wr_operations:int invalid_zone_append_operations:int invalid_flush_operations:int "
           "invalid_unmap_operations:int account_invalid:bool account_failed:bool "
           "timed_stats:[BlockDeviceTimedStats] *rd_latency_histogram:BlockLatencyHistogramInfo "
           "*wr_latency_histogram:BlockLatencyHistogramInfo *zone_append_latency_histogram:BlockLatencyHistogramInfo "
           "*flush_latency_histogram:BlockLatencyHistogramInfo");
  s.object("BlockStatsSpecificFile", "discard-nb-ok:uint64 discard-nb-failed:uint64 discard-bytes-ok:uint64");
  s.object("BlockStatsSpecificNvme", "completion-errors:uint64 aligned-accesses:uint64 unaligned-accesses:uint64");
  s.flat_union("BlockStatsSpecific", "driver:BlockdevDriver", "driver",
               {{"file", "BlockStatsSpecificFile"},
                {"host_device", "BlockStatsSpecificFile"},
                {"nvme", "BlockStatsSpecificNvme"}});
  s.object("BlockStats",
           "*device:str *qdev:str *node-name:str stats:BlockDeviceStats *driver-specific:BlockStatsSpecific "
           "*parent:BlockStats *backing:BlockStats");
  s.command("query-blockstats", "*query-nodes:bool", "[BlockStats]");
  s.enumeration("XDbgBlockGraphNodeType", "block-backend block-job block-driver");
  s.object("XDbgBlockGraphNode", "id:uint64 type:XDbgBlockGraphNodeType name:str");
  s.enumeration("BlockPermission", "consistent-read write write-unchanged resize");
  s.object("XDbgBlockGraphEdge",
           "parent:uint64 child:uint64 name:str perm:[BlockPermission] shared-perm:[BlockPermission]");
  s.object("XDbgBlockGraph", "nodes:[XDbgBlockGraphNode] edges:[XDbgBlockGraphEdge]");
  s.command("x-debug-query-block-graph", "", "XDbgBlockGraph");
  s.command_features("x-debug-query-block-graph", {"unstable"});
}

// Image creation and amend (block-core.json): the create and amend jobs' options. blockd creates with
// the file and qcow2 drivers; QSD's other creatable drivers are open branches, which blockdev-create
// refuses by name (their option structs would only be validated to be refused).
void define_create_amend(schema& s) {
  s.enumeration("PreallocMode", "off metadata falloc full");
  s.enumeration("QCryptoBlockFormat", "qcow luks");
  s.object("QCryptoBlockCreateOptionsLUKS",
           "*key-secret:str *cipher-alg:QCryptoCipherAlgo *cipher-mode:QCryptoCipherMode *ivgen-alg:QCryptoIVGenAlgo "
           "*ivgen-hash-alg:QCryptoHashAlgo *hash-alg:QCryptoHashAlgo *iter-time:int");
  s.flat_union("QCryptoBlockCreateOptions", "format:QCryptoBlockFormat", "format",
               {{"qcow", "QCryptoBlockOptionsQCow"}, {"luks", "QCryptoBlockCreateOptionsLUKS"}});
  // Each driver that creates images defines its branch next to its code.
  std::vector<std::pair<std::string, std::string>> branches;
  for (const block::driver_entry* d : block::registered_drivers()) {
    if (d->create_options_type.empty()) continue;
    if (d->define_create_options && !s.find_type(d->create_options_type)) d->define_create_options(s);
    branches.emplace_back(d->name, d->create_options_type);
  }
  std::sort(branches.begin(), branches.end());
  s.flat_union("BlockdevCreateOptions", "driver:BlockdevDriver", "driver", std::move(branches),
               /*open_branches=*/true);
  s.command("blockdev-create", "job-id:str options:BlockdevCreateOptions");
  s.enumeration("QCryptoBlockLUKSKeyslotState", "active inactive");
  s.object("QCryptoBlockAmendOptionsLUKS",
           "state:QCryptoBlockLUKSKeyslotState *new-secret:str *old-secret:str *keyslot:int *iter-time:int *secret:str");
  s.flat_union("QCryptoBlockAmendOptions", "format:QCryptoBlockFormat", "format",
               {{"luks", "QCryptoBlockAmendOptionsLUKS"}});
  s.object("BlockdevAmendOptionsQcow2", "*encrypt:QCryptoBlockAmendOptions");
  // Only luks and qcow2 have branches in QSD too: every other driver value takes no members.
  s.flat_union("BlockdevAmendOptions", "driver:BlockdevDriver", "driver",
               {{"luks", "QCryptoBlockAmendOptionsLUKS"}, {"qcow2", "BlockdevAmendOptionsQcow2"}});
  s.command("x-blockdev-amend", "job-id:str node-name:str options:BlockdevAmendOptions *force:bool");
  s.command_features("x-blockdev-amend", {"unstable"});
}

void define_bitmaps(schema& s);  // below

void define_block(schema& s) {
  s.enumeration("BlockdevDriver",
                "blkdebug blklogwrites blkreplay blkverify bochs cloop compress copy-before-write copy-on-read dmg "
                "file snapshot-access ftp ftps gluster host_cdrom host_device http https io_uring iscsi luks nbd nfs "
                "null-aio null-co nvme nvme-io_uring parallels preallocate qcow qcow2 qed quorum raw rbd replication "
                "ssh throttle vdi vhdx virtio-blk-vfio-pci virtio-blk-vhost-user virtio-blk-vhost-vdpa vmdk vpc "
                "vvfat");
  s.enumeration("BlockdevDiscardOptions", "ignore unmap");
  s.object("BlockdevCacheOptions", "*direct:bool *no-flush:bool");
  s.enumeration("BlockdevDetectZeroesOptions", "off on unmap");
  s.enumeration("OnOffAuto", "auto on off");
  s.alternate("BlockdevRef", {"BlockdevOptions", "str"});
  s.alternate("BlockdevRefOrNull", {"BlockdevOptions", "str", "null"});
  s.object("QCryptoBlockOptionsQCow", "*key-secret:str");
  s.object("QCryptoBlockOptionsLUKS", "*key-secret:str");
  // Each driver defines its own branch next to its code (driver_entry::define_options).
  std::vector<std::pair<std::string, std::string>> branches;
  for (const block::driver_entry* d : block::registered_drivers()) {
    if (d->options_type.empty()) continue;
    if (d->define_options && !s.find_type(d->options_type)) d->define_options(s);
    branches.emplace_back(d->name, d->options_type);
  }
  std::sort(branches.begin(), branches.end());
  s.flat_union("BlockdevOptions",
               "driver:BlockdevDriver *node-name:str *discard:BlockdevDiscardOptions *cache:BlockdevCacheOptions "
               "*active:bool *read-only:bool *auto-read-only:bool *force-share:bool "
               "*detect-zeroes:BlockdevDetectZeroesOptions",
               "driver",
               std::move(branches),
               /*open_branches=*/true);
  s.command("blockdev-add", "BlockdevOptions", "", true);
  s.command("blockdev-del", "node-name:str");
  s.command("block_resize", "*device:str *node-name:str size:int");
  s.object("BlockdevSnapshotInternal", "device:str name:str");
  s.command("blockdev-snapshot-internal-sync", "BlockdevSnapshotInternal", "", true);
  s.command("blockdev-snapshot-delete-internal-sync", "device:str *id:str *name:str", "SnapshotInfo");
  // External snapshots (an overlay on top of a node) and the backing name in an image's header.
  s.enumeration("NewImageMode", "existing absolute-paths");
  s.object("BlockdevSnapshotSync",
           "*device:str *node-name:str snapshot-file:str *snapshot-node-name:str *format:str *mode:NewImageMode");
  s.command("blockdev-snapshot-sync", "BlockdevSnapshotSync", "", true);
  s.object("BlockdevSnapshot", "node:str overlay:str");
  s.command("blockdev-snapshot", "BlockdevSnapshot", "", true);
  s.command_features("blockdev-snapshot", {"allow-write-only-overlay"});
  s.command("change-backing-file", "device:str image-node-name:str backing-file:str");
  s.command("block-set-write-threshold", "node-name:str write-threshold:uint64");
  s.command("blockdev-reopen", "options:[BlockdevOptions]");
  s.command("blockdev-set-active", "*node-name:str active:bool");
  define_create_amend(s);
  s.alternate("StrOrNull", {"str", "null"});
  s.command("x-blockdev-set-iothread", "node-name:str iothread:StrOrNull *force:bool");
  s.command_features("x-blockdev-set-iothread", {"unstable"});
  s.command("x-blockdev-change", "parent:str *child:str *node:str");
  s.command_features("x-blockdev-change", {"unstable"});
  define_block_queries(s);
  define_bitmaps(s);
}

// Sockets (sockets.json) and exports (block-export.json): the NBD server and block exports.
void define_exports(schema& s) {
  s.object("InetSocketAddressBase", "host:str port:str");
  s.object("InetSocketAddress",
           "*numeric:bool *to:uint16 *ipv4:bool *ipv6:bool *keep-alive:bool *keep-alive-count:uint32 "
           "*keep-alive-idle:uint32 *keep-alive-interval:uint32 *mptcp:bool",
           "InetSocketAddressBase");
  s.object("UnixSocketAddress", "path:str *abstract:bool *tight:bool");
  s.object("VsockSocketAddress", "cid:str port:str");
  s.object("FdSocketAddress", "str:str");
  s.enumeration("SocketAddressType", "inet unix vsock fd");
  s.flat_union("SocketAddress", "type:SocketAddressType", "type",
               {{"inet", "InetSocketAddress"},
                {"unix", "UnixSocketAddress"},
                {"vsock", "VsockSocketAddress"},
                {"fd", "FdSocketAddress"}});
  s.object("InetSocketAddressWrapper", "data:InetSocketAddress");
  s.object("UnixSocketAddressWrapper", "data:UnixSocketAddress");
  s.object("VsockSocketAddressWrapper", "data:VsockSocketAddress");
  s.object("FdSocketAddressWrapper", "data:FdSocketAddress");
  s.flat_union("SocketAddressLegacy", "type:SocketAddressType", "type",
               {{"inet", "InetSocketAddressWrapper"},
                {"unix", "UnixSocketAddressWrapper"},
                {"vsock", "VsockSocketAddressWrapper"},
                {"fd", "FdSocketAddressWrapper"}});
  s.object("NbdServerOptionsBase", "*handshake-max-seconds:uint32 *tls-creds:str *tls-authz:str *max-connections:uint32");
  s.object("NbdServerOptions", "addr:SocketAddress", "NbdServerOptionsBase");
  s.object("NbdServerOptionsLegacy", "addr:SocketAddressLegacy", "NbdServerOptionsBase");
  s.command("nbd-server-start", "NbdServerOptionsLegacy", "", true);
  s.object("BlockExportOptionsNbdBase", "*name:str *description:str");
  s.object("BlockExportOptionsNbd", "*bitmaps:[BlockDirtyBitmapOrStr] *allocation-depth:bool",
           "BlockExportOptionsNbdBase");
  s.object("BlockExportOptionsVhostUserBlk", "addr:SocketAddress *logical-block-size:size *num-queues:uint16");
  s.enumeration("FuseExportAllowOther", "off on auto");
  s.object("BlockExportOptionsFuse", "mountpoint:str *growable:bool *allow-other:FuseExportAllowOther");
  s.object("BlockExportOptionsVduseBlk",
           "name:str *num-queues:uint16 *queue-size:uint16 *logical-block-size:size *serial:str");
  s.object("NbdServerAddOptions", "device:str *writable:bool *bitmap:str", "BlockExportOptionsNbdBase");
  s.command("nbd-server-add", "NbdServerAddOptions", "", true);
  s.command_features("nbd-server-add", {"deprecated"});
  s.enumeration("BlockExportRemoveMode", "safe hard");
  s.command("nbd-server-remove", "name:str *mode:BlockExportRemoveMode");
  s.command_features("nbd-server-remove", {"deprecated"});
  s.command("nbd-server-stop", "");
  s.enumeration("BlockExportType", "nbd vhost-user-blk fuse vduse-blk");
  s.flat_union("BlockExportOptions",
               "type:BlockExportType id:str *fixed-iothread:bool *iothread:str node-name:str *writable:bool "
               "*writethrough:bool *allow-inactive:bool",
               "type",
               {{"nbd", "BlockExportOptionsNbd"},
                {"vhost-user-blk", "BlockExportOptionsVhostUserBlk"},
                {"fuse", "BlockExportOptionsFuse"},
                {"vduse-blk", "BlockExportOptionsVduseBlk"}});
  s.command("block-export-add", "BlockExportOptions", "", true);
  s.command("block-export-del", "id:str *mode:BlockExportRemoveMode");
  s.object("BlockExportInfo", "id:str type:BlockExportType node-name:str shutting-down:bool");
  s.command("query-block-exports", "", "[BlockExportInfo]");
}

// char.json (QSD 10.2): chardev backends and the commands over them.
// Dirty bitmaps (block-core.json). Each transaction action kind
// is one entry of `kinds` (its data type's wrapper); the supervisor refuses to start when a kind
// has no action builder, as it does for commands.
void define_bitmaps(schema& s) {
  if (!s.find_type("BlockDirtyBitmap")) s.object("BlockDirtyBitmap", "node:str name:str");  // copy-before-write may have
  s.alternate("BlockDirtyBitmapOrStr", {"str", "BlockDirtyBitmap"});
  // x-exist-ok and x-missing-ok: blockd's idempotent add and remove for retried checkpoints
  // (README, "Beyond QSD"); absent, everything is as in QSD.
  s.object("BlockDirtyBitmapAdd",
           "node:str name:str *granularity:uint32 *persistent:bool *disabled:bool *x-exist-ok:bool");
  s.command("block-dirty-bitmap-add", "BlockDirtyBitmapAdd", "", true);
  s.object("BlockDirtyBitmapRemove", "node:str name:str *x-missing-ok:bool");
  s.command("block-dirty-bitmap-remove", "BlockDirtyBitmapRemove", "", true);
  for (const char* c : {"block-dirty-bitmap-clear", "block-dirty-bitmap-enable", "block-dirty-bitmap-disable"})
    s.command(c, "BlockDirtyBitmap", "", true);
  s.object("BlockDirtyBitmapMerge", "node:str target:str bitmaps:[BlockDirtyBitmapOrStr]");
  s.command("block-dirty-bitmap-merge", "BlockDirtyBitmapMerge", "", true);
  s.object("BlockDirtyBitmapSha256", "sha256:str");
  s.command("x-debug-block-dirty-bitmap-sha256", "BlockDirtyBitmap", "BlockDirtyBitmapSha256", true);
  s.command_features("x-debug-block-dirty-bitmap-sha256", {"unstable"});
}

// transaction (transaction.json).
void define_transaction(schema& s) {
  s.object("Abort", "");
  std::vector<std::pair<std::string, std::string>> kinds = {
      {"abort", "Abort"},
      {"block-dirty-bitmap-add", "BlockDirtyBitmapAdd"},
      {"block-dirty-bitmap-remove", "BlockDirtyBitmapRemove"},
      {"block-dirty-bitmap-clear", "BlockDirtyBitmap"},
      {"block-dirty-bitmap-enable", "BlockDirtyBitmap"},
      {"block-dirty-bitmap-disable", "BlockDirtyBitmap"},
      {"block-dirty-bitmap-merge", "BlockDirtyBitmapMerge"},
      {"blockdev-backup", "BlockdevBackup"},
      {"blockdev-snapshot", "BlockdevSnapshot"},
      {"blockdev-snapshot-internal-sync", "BlockdevSnapshotInternal"},
      {"blockdev-snapshot-sync", "BlockdevSnapshotSync"},
      {"drive-backup", "DriveBackup"},
      // blockd's extension: an export started with the rest of the list (README, "Beyond QSD").
      {"x-block-export-add", "BlockExportOptions"},
  };
  std::string values;
  std::vector<std::pair<std::string, std::string>> branches;
  for (auto& [kind, type] : kinds) {
    values += (values.empty() ? "" : " ") + kind;
    std::string wrapper = type + "Wrapper";
    if (!s.find_type(wrapper)) s.object(wrapper, "data:" + type);
    branches.emplace_back(kind, wrapper);
  }
  s.enumeration("TransactionActionKind", values);
  s.flat_union("TransactionAction", "type:TransactionActionKind", "type", std::move(branches));
  s.enumeration("ActionCompletionMode", "individual grouped");
  s.object("TransactionProperties", "*completion-mode:ActionCompletionMode");
  s.command("transaction", "actions:[TransactionAction] *properties:TransactionProperties");
}

void define_char(schema& s) {
  s.object("ChardevInfo", "label:str filename:str frontend-open:bool");
  s.command("query-chardev", "", "[ChardevInfo]");
  s.object("ChardevBackendInfo", "name:str");
  s.command("query-chardev-backends", "", "[ChardevBackendInfo]");
  s.enumeration("DataFormat", "utf8 base64");
  s.command("ringbuf-write", "device:str data:str *format:DataFormat");
  s.command("ringbuf-read", "device:str size:int *format:DataFormat", "str");
  s.object("ChardevCommon", "*logfile:str *logappend:bool");
  s.object("ChardevFile", "*in:str out:str *append:bool", "ChardevCommon");
  s.object("ChardevHostdev", "device:str", "ChardevCommon");
  s.object("ChardevSocket",
           "addr:SocketAddressLegacy *tls-creds:str *tls-authz:str *server:bool *wait:bool *nodelay:bool "
           "*telnet:bool *tn3270:bool *websocket:bool *reconnect-ms:int",
           "ChardevCommon");
  s.object("ChardevUdp", "remote:SocketAddressLegacy *local:SocketAddressLegacy", "ChardevCommon");
  s.object("ChardevMux", "chardev:str", "ChardevCommon");
  s.object("ChardevHub", "chardevs:[str]", "ChardevCommon");
  s.object("ChardevStdio", "*signal:bool", "ChardevCommon");
  s.object("ChardevSpiceChannel", "type:str", "ChardevCommon");
  s.object("ChardevSpicePort", "fqdn:str", "ChardevCommon");
  s.object("ChardevDBus", "name:str", "ChardevCommon");
  s.object("ChardevVC", "*width:int *height:int *cols:int *rows:int", "ChardevCommon");
  s.object("ChardevRingbuf", "*size:int", "ChardevCommon");
  s.object("ChardevQemuVDAgent", "*mouse:bool *clipboard:bool", "ChardevCommon");
  s.object("ChardevPty", "*path:str", "ChardevCommon");
  // The kinds of a Linux build; console is Windows-only in 10.2.
  s.enumeration("ChardevBackendKind",
                "file serial parallel pipe socket udp pty null mux hub msmouse wctablet braille testdev stdio "
                "spicevmc spiceport qemu-vdagent dbus vc ringbuf memory");
  for (const char* w : {"File", "Hostdev", "Socket", "Udp", "Common", "Mux", "Hub", "Stdio", "SpiceChannel",
                        "SpicePort", "QemuVDAgent", "DBus", "VC", "Ringbuf", "Pty"})
    s.object(std::string("Chardev") + w + "Wrapper", "data:Chardev" + std::string(w));
  s.flat_union("ChardevBackend", "type:ChardevBackendKind", "type",
               {{"file", "ChardevFileWrapper"},
                {"serial", "ChardevHostdevWrapper"},
                {"parallel", "ChardevHostdevWrapper"},
                {"pipe", "ChardevHostdevWrapper"},
                {"socket", "ChardevSocketWrapper"},
                {"udp", "ChardevUdpWrapper"},
                {"pty", "ChardevPtyWrapper"},
                {"null", "ChardevCommonWrapper"},
                {"mux", "ChardevMuxWrapper"},
                {"hub", "ChardevHubWrapper"},
                {"msmouse", "ChardevCommonWrapper"},
                {"wctablet", "ChardevCommonWrapper"},
                {"braille", "ChardevCommonWrapper"},
                {"testdev", "ChardevCommonWrapper"},
                {"stdio", "ChardevStdioWrapper"},
                {"spicevmc", "ChardevSpiceChannelWrapper"},
                {"spiceport", "ChardevSpicePortWrapper"},
                {"qemu-vdagent", "ChardevQemuVDAgentWrapper"},
                {"dbus", "ChardevDBusWrapper"},
                {"vc", "ChardevVCWrapper"},
                {"ringbuf", "ChardevRingbufWrapper"},
                {"memory", "ChardevRingbufWrapper"}});
  s.object("ChardevReturn", "*pty:str");
  s.command("chardev-add", "id:str backend:ChardevBackend", "ChardevReturn");
  s.command("chardev-change", "id:str backend:ChardevBackend", "ChardevReturn");
  s.command("chardev-remove", "id:str");
  s.command("chardev-send-break", "id:str");
}

// Types used only by the command line (never reachable from a command, so never introspected).
void define_cli(schema& s) {
  s.enumeration("MonitorMode", "readline control");
  s.object("MonitorOptions", "*id:str *mode:MonitorMode *pretty:bool chardev:str");
}

schema build() {
  schema s;
  // Module order follows QSD's schema: block-core/job/export/char events, control, introspect, qom;
  // then job.json before block-core.json, as 10.2 includes them (query-commands lists newest first).
  define_events(s);
  define_control(s);
  define_introspection(s);
  define_objects(s);
  define_jobs(s);
  define_block(s);
  define_block_jobs(s);
  define_exports(s);
  define_char(s);
  define_transaction(s);
  define_cli(s);
  return s;
}

}  // namespace

const schema& qsd_schema() {
  static const schema s = build();
  return s;
}

}  // namespace blockd::qmp

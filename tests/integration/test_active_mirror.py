# Active mirror (copy-mode write-blocking), block-job-change and drive-mirror, against qemu-storage-daemon 7.2, QEMU's tools and fio; ctest runs it in one process.
"""Cases:
- drive-mirror's argument errors equal QSD's, reply for reply (paths normalised);
- drive-mirror sync full / top / none with mode absolute-paths, and mode existing: READY and COMPLETED as QSD's,
  the target node after the pivot (format, backing file) and the new image's header as QSD's, data as the source's;
- write-blocking: with the READY job paused (no background copy runs), a write that completed to the NBD client is
  already on the target (raw images, read from outside), on QSD and on blockd;
- write-blocking with a failing target (blkdebug, on-target-error report / ignore): the guest's write succeeds,
  BLOCK_JOB_ERROR and the job's end as QSD's, and with ignore the range is copied again;
- write-blocking under a concurrent fio randwrite (crc32c verify): READY, actively-synced, a soft cancel leaves the
  target equal to the source (qemu-img compare); a second run pivots mid-load and fio's verify reads the target;
- block-job-change: lookups and texts, background -> write-blocking mid-job, actively-synced false until READY and
  true after; it is in query-commands and query-qmp-schema (QSD 7.2 has neither, so no oracle here).
Exit 77 when qemu-img/qemu-io/qemu-storage-daemon/fio are missing."""
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qmp_harness import run_cases  # noqa: E402
from test_block_stream import sh, QSD, same_as_qsd, start  # noqa: E402


def chain(tmp, size="32M"):
    b, t = os.path.join(tmp, "base.qcow2"), os.path.join(tmp, "top.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", b, size)
    sh("qemu-io", "-c", "write -P 0x11 0 1M", "-c", "write -P 0x12 6M 512k", b)
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", b, "-F", "qcow2", t)
    sh("qemu-io", "-c", "write -P 0x22 4M 1M", "-c", "write -z 6M 64k", t)
    return b, t


def add_chain(m, b, t):
    assert m.cmd("blockdev-add", {"driver": "qcow2", "node-name": "base",
                                  "file": {"driver": "file", "filename": b}}) == {"return": {}}
    assert m.cmd("blockdev-add", {"driver": "qcow2", "node-name": "top", "backing": "base",
                                  "file": {"driver": "file", "filename": t}}) == {"return": {}}


def norm(x, tmp):
    return json.loads(json.dumps(x).replace(tmp, "TMP"))


def run_drive_errors(binary, tmp):
    os.makedirs(tmp)
    b, t = chain(tmp)
    raw = os.path.join(tmp, "r.img")
    sh("qemu-img", "create", "-q", "-f", "raw", raw, "32M")
    d, m = start(binary, tmp)
    out = []
    tg = lambda n: os.path.join(tmp, n)  # noqa: E731
    try:
        add_chain(m, b, t)
        assert m.cmd("blockdev-add", {"driver": "raw", "node-name": "r", "file": {"driver": "file", "filename": raw}}) == {"return": {}}
        for args in ({"device": "nope", "target": tg("a"), "sync": "full"},
                     {"device": "base", "target": tg("a"), "sync": "full"},
                     {"job-id": "m", "device": "top", "target": tg("a"), "sync": "full", "replaces": "top"},
                     {"job-id": "m", "device": "top", "target": tg("a"), "sync": "full", "format": "nope"},
                     {"job-id": "m", "device": "top", "target": tg("a"), "sync": "top", "format": "raw"},
                     {"job-id": "m", "device": "top", "target": tg("missing"), "sync": "full", "mode": "existing"},
                     {"job-id": "m", "device": "top", "target": tg("b"), "sync": "full", "granularity": 1000},
                     {"job-id": "m", "device": "top", "target": tg("c"), "sync": "incremental"},
                     {"job-id": "m", "device": "top", "target": tg("d"), "sync": "full", "node-name": "base"},
                     {"job-id": "m", "device": "top", "target": tg("e"), "sync": "full", "node-name": "#bad"},
                     {"job-id": "m", "device": "top", "target": tg("f"), "sync": "full", "buf-size": -1},
                     {"job-id": "m", "device": "top", "target": tg("g"), "sync": "full", "speed": -1},
                     {"job-id": "m", "device": "top", "target": tg("h"), "sync": "full", "node-name": "n",
                      "replaces": "nope"}):
            out.append(norm(m.cmd("drive-mirror", args), tmp))
            out.append(m.names())
        # A mirror running on the source: the next one is refused before any file is made.
        assert m.cmd("drive-mirror", {"job-id": "m", "device": "r", "target": tg("i"), "sync": "full"}) == {"return": {}}
        m.wait("BLOCK_JOB_READY")
        out.append(norm(m.cmd("drive-mirror", {"job-id": "m2", "device": "r", "target": tg("j"), "sync": "full"}), tmp))
        out.append(norm(m.cmd("drive-mirror", {"job-id": "m", "device": "top", "target": tg("k"), "sync": "full"}), tmp))
        out.append(os.path.exists(tg("j")))
        assert m.cmd("job-cancel", {"id": "m"}) == {"return": {}}
        m.wait("JOB_STATUS_CHANGE", lambda x: x == {"id": "m", "status": "null"})
        # The cancelled job's target node is gone with it.
        out.append(sorted(n["node-name"] for n in m.cmd("query-named-block-nodes")["return"] if not n["node-name"].startswith("#")))
    finally:
        d.stop()
    return out


def case_drive_mirror_errors_equal_qsd(binary, tmp):
    same_as_qsd(run_drive_errors, binary, tmp)


def drive(binary, tmp, sync, mode):
    os.makedirs(tmp)
    b, t = chain(tmp)
    tgt = os.path.join(tmp, "tgt.qcow2")
    if mode == "existing":
        if sync == "top":
            sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", b, "-F", "qcow2", tgt)
        else:
            sh("qemu-img", "create", "-q", "-f", "qcow2", tgt, "32M")
    sock = os.path.join(tmp, "nbd.sock")
    d, m = start(binary, tmp)
    try:
        add_chain(m, b, t)
        assert m.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}}) == {"return": {}}
        assert m.cmd("block-export-add", {"type": "nbd", "id": "e", "node-name": "top", "writable": True}) == {"return": {}}
        args = {"job-id": "m", "device": "top", "target": tgt, "sync": sync, "node-name": "tn"}
        if mode:
            args["mode"] = mode
        assert m.cmd("drive-mirror", args) == {"return": {}}
        ready = m.wait("BLOCK_JOB_READY")
        sh("qemu-io", "-f", "raw", "-c", "write -P 0x55 8M 64k", f"nbd+unix:///top?socket={sock}")
        assert m.cmd("job-complete", {"id": "m"}) == {"return": {}}
        end = m.wait("BLOCK_JOB_COMPLETED")
        m.wait("JOB_STATUS_CHANGE", lambda x: x == {"id": "m", "status": "null"})
        exports = [e["node-name"] for e in m.cmd("query-block-exports")["return"]]
        node = [n for n in m.cmd("query-named-block-nodes")["return"] if n["node-name"] == "tn"]
        node = [{k: n.get(k) for k in ("node-name", "drv", "file", "backing_file", "backing_file_depth", "ro")} for n in node]
    finally:
        d.stop()
    info = json.loads(sh("qemu-img", "info", "--output=json", tgt))
    header = {k: info.get(k) for k in ("format", "virtual-size", "backing-filename", "backing-filename-format")}
    return norm([ready, {k: v for k, v in end.items() if k not in ("len", "offset")}, exports, node, header], tmp), b, t, tgt


def case_drive_mirror_modes_equal_qsd(binary, tmp):
    for sync, mode in (("full", None), ("top", None), ("none", "absolute-paths"), ("full", "existing"), ("top", "existing")):
        sub = os.path.join(tmp, f"{sync}-{mode}")
        got, b, t, tgt = drive(binary, os.path.join(sub, "blockd"), sync, mode)
        if (sync, mode) != ("top", "existing"):
            want, *_ = drive(QSD, os.path.join(sub, "qsd"), sync, mode)
            assert want == got, (sync, mode, want, got)
        else:
            # QSD 7.2 pivots but then fails to open the backing chain of an existing image whose
            # backing file the source's chain holds ("Invalid argument", the target left without
            # its backing): blockd links that node instead, so the guest keeps seeing its data.
            assert got[3][0]["backing_file"] == "TMP/base.qcow2" and "error" not in got[1], got
        sh("qemu-img", "check", tgt)
        # What the guest sees through the target chain is what it saw through the source, plus its write.
        sh("qemu-io", "-c", "write -P 0x55 8M 64k", t)
        sh("qemu-img", "compare", t, tgt)


def active_paused(binary, tmp):
    """Raw images: the target file is read from outside while the READY job is paused."""
    os.makedirs(tmp)
    src, tgt = os.path.join(tmp, "src.img"), os.path.join(tmp, "tgt.img")
    sh("qemu-img", "create", "-q", "-f", "raw", src, "16M")
    sh("qemu-io", "-f", "raw", "-c", "write -P 0x11 0 2M", src)
    sh("qemu-img", "create", "-q", "-f", "raw", tgt, "16M")
    sock = os.path.join(tmp, "nbd.sock")
    d, m = start(binary, tmp)
    try:
        for n, f in (("src", src), ("tgt", tgt)):
            assert m.cmd("blockdev-add", {"driver": "raw", "node-name": n, "file": {"driver": "file", "filename": f}}) == {"return": {}}
        assert m.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}}) == {"return": {}}
        assert m.cmd("block-export-add", {"type": "nbd", "id": "e", "node-name": "src", "writable": True}) == {"return": {}}
        assert m.cmd("blockdev-mirror", {"job-id": "m", "device": "src", "target": "tgt", "sync": "full",
                                         "copy-mode": "write-blocking"}) == {"return": {}}
        m.wait("BLOCK_JOB_READY")
        assert m.cmd("block-job-pause", {"device": "m"}) == {"return": {}}
        m.wait("JOB_STATUS_CHANGE", lambda x: x == {"id": "m", "status": "standby"})
        uri = f"nbd+unix:///src?socket={sock}"
        sh("qemu-io", "-f", "raw", "-c", "write -P 0x66 1M 64k", "-c", "write -P 0x67 5M 4k", "-c", "write -P 0x68 9M 1536",
           "-c", "write -z 0 512k", "-c", "write -P 0x69 15M 1M", uri)
        # Completed to the client, so on the target already: nothing copies while the job is paused.
        with open(tgt, "rb") as f:  # raw: the file is the image (QSD holds its lock, so not through qemu-io)
            img = f.read()
        M = 1 << 20
        for off, n, byte in ((M, 65536, 0x66), (5 * M, 4096, 0x67), (9 * M, 1536, 0x68), (0, 512 << 10, 0),
                             (512 << 10, 512 << 10, 0x11), (15 * M, M, 0x69)):
            assert img[off:off + n] == bytes([byte]) * n, (off, n, byte)
        jobs = m.cmd("query-block-jobs")["return"]
        assert m.cmd("job-cancel", {"id": "m"}) == {"return": {}}
        m.wait("JOB_STATUS_CHANGE", lambda x: x == {"id": "m", "status": "null"})
    finally:
        d.stop()
    sh("qemu-img", "compare", "-f", "raw", "-F", "raw", src, tgt)
    return jobs


def case_active_write_is_on_target_before_it_completes(binary, tmp):
    want = active_paused(QSD, os.path.join(tmp, "qsd"))
    got = active_paused(binary, os.path.join(tmp, "blockd"))
    assert [j["status"] for j in want] == [j["status"] for j in got] == ["standby"], (want, got)
    assert got[0]["actively-synced"] is True, got  # 10.2's member; 7.2 has none


def active_target_error(binary, tmp, policy):
    """sync=none: nothing to copy, so the first target write is the guest's active one, and it fails."""
    os.makedirs(tmp)
    src, tgt = os.path.join(tmp, "src.qcow2"), os.path.join(tmp, "tgt.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", src, "16M")
    sh("qemu-img", "create", "-q", "-f", "qcow2", tgt, "16M")
    sock = os.path.join(tmp, "nbd.sock")
    d, m = start(binary, tmp)
    try:
        assert m.cmd("blockdev-add", {"driver": "qcow2", "node-name": "src", "file": {"driver": "file", "filename": src}}) == {"return": {}}
        assert m.cmd("blockdev-add", {"driver": "qcow2", "node-name": "tgt", "file": {
            "driver": "blkdebug", "inject-error": [{"event": "write_aio", "errno": 5, "once": True}],
            "image": {"driver": "file", "filename": tgt}}}) == {"return": {}}
        assert m.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}}) == {"return": {}}
        assert m.cmd("block-export-add", {"type": "nbd", "id": "e", "node-name": "src", "writable": True}) == {"return": {}}
        assert m.cmd("blockdev-mirror", {"job-id": "m", "device": "src", "target": "tgt", "sync": "none",
                                         "copy-mode": "write-blocking", "on-target-error": policy}) == {"return": {}}
        m.wait("BLOCK_JOB_READY")
        m.names()
        # The guest's write succeeds (the source has it) whatever the target did.
        sh("qemu-io", "-f", "raw", "-c", "write -P 0x77 1M 64k", f"nbd+unix:///src?socket={sock}")
        err = m.wait("BLOCK_JOB_ERROR")
        if policy == "report":
            end = m.wait("BLOCK_JOB_COMPLETED")
            end = {k: v for k, v in end.items() if k not in ("len", "offset")}
        else:
            # ignore: the chunk stays dirty and is copied again (the error was once only).
            j = m.cmd("query-block-jobs")["return"][0]
            end = j["status"]
            assert m.cmd("block-job-cancel", {"device": "m"}) == {"return": {}}
            m.wait("BLOCK_JOB_COMPLETED")
        m.wait("JOB_STATUS_CHANGE", lambda x: x == {"id": "m", "status": "null"})
    finally:
        d.stop()
    sh("qemu-io", "-c", "read -P 0x77 1M 64k", src)
    if policy == "ignore":
        sh("qemu-img", "compare", src, tgt)
    return err, end


def case_active_target_error_as_qsd(binary, tmp):
    for policy in ("report", "ignore"):
        want = active_target_error(QSD, os.path.join(tmp, policy, "qsd"), policy)
        got = active_target_error(binary, os.path.join(tmp, policy, "blockd"), policy)
        assert want == got, (policy, want, got)


def fio_cmd(sock, verify):
    return ["fio", "--name=w", "--ioengine=nbd", f"--uri=nbd+unix:///top?socket={sock}", "--rw=randwrite", "--bs=4k",
            "--size=48M", "--iodepth=16", "--randrepeat=0", "--output-format=terse", "--verify_state_save=0"] + \
        (["--verify=crc32c", "--do_verify=1", "--verify_fatal=1"] if verify else [])


def active_fio(binary, tmp, pivot):
    os.makedirs(tmp)
    b, t = chain(tmp, "64M")
    tgt = os.path.join(tmp, "tgt.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", tgt, "64M")
    sock = os.path.join(tmp, "nbd.sock")
    d, m = start(binary, tmp)
    try:
        add_chain(m, b, t)
        assert m.cmd("blockdev-add", {"driver": "qcow2", "node-name": "tgt", "file": {"driver": "file", "filename": tgt}}) == {"return": {}}
        assert m.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}}) == {"return": {}}
        assert m.cmd("block-export-add", {"type": "nbd", "id": "e", "node-name": "top", "writable": True}) == {"return": {}}
        fio = subprocess.Popen(fio_cmd(sock, True), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp)
        assert m.cmd("blockdev-mirror", {"job-id": "m", "device": "top", "target": "tgt", "sync": "full",
                                         "copy-mode": "write-blocking"}) == {"return": {}}
        m.wait("BLOCK_JOB_READY")
        if pivot:
            assert m.cmd("job-complete", {"id": "m"}) == {"return": {}}
            m.wait("BLOCK_JOB_COMPLETED")
            ex = m.cmd("query-block-exports")["return"]
            assert [e["node-name"] for e in ex] == ["tgt"], ex
        out, err = fio.communicate(timeout=240)
        assert fio.returncode == 0, f"fio failed: {out}{err}"
        if not pivot:
            j = m.cmd("query-block-jobs")["return"][0]
            assert j["status"] == "ready" and j["actively-synced"] is True, j
            assert m.cmd("block-job-cancel", {"device": "m"}) == {"return": {}}
            m.wait("BLOCK_JOB_COMPLETED")
        m.wait("JOB_STATUS_CHANGE", lambda x: x == {"id": "m", "status": "null"})
    finally:
        d.stop()
    sh("qemu-img", "check", tgt)
    if not pivot:
        sh("qemu-img", "compare", t, tgt)


def case_active_mirror_under_fio(binary, tmp):
    active_fio(binary, os.path.join(tmp, "cancel"), False)
    active_fio(binary, os.path.join(tmp, "pivot"), True)


def case_block_job_change(binary, tmp):
    b, t = chain(tmp)
    tgt = os.path.join(tmp, "tgt.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", tgt, "32M")
    sh("qemu-io", "-c", "write -P 0x33 8M 8M", t)
    d, m = start(binary, tmp)
    try:
        names = [c["name"] for c in m.cmd("query-commands")["return"]]
        assert "block-job-change" in names and "drive-mirror" in names
        schema = {e["name"]: e for e in m.cmd("query-qmp-schema")["return"]}
        assert schema["block-job-change"]["meta-type"] == "command"
        add_chain(m, b, t)
        assert m.cmd("blockdev-add", {"driver": "qcow2", "node-name": "tgt", "file": {"driver": "file", "filename": tgt}}) == {"return": {}}
        r = m.cmd("block-job-change", {"id": "m", "type": "mirror", "copy-mode": "write-blocking"})
        assert r["error"] == {"class": "DeviceNotActive", "desc": "Block job 'm' not found"}, r
        # Slow enough to be changed while it copies.
        assert m.cmd("blockdev-mirror", {"job-id": "m", "device": "top", "target": "tgt", "sync": "full",
                                         "speed": 1 << 20}) == {"return": {}}
        j = m.cmd("query-block-jobs")["return"][0]
        assert j["actively-synced"] is False and j["status"] == "running", j
        r = m.cmd("block-job-change", {"id": "m", "type": "stream"})
        assert r["error"]["desc"] == "Job 'm' is 'mirror' job, not 'stream'", r
        r = m.cmd("block-job-change", {"id": "m", "type": "mirror", "copy-mode": "fast"})
        assert r["error"]["class"] == "GenericError", r
        assert m.cmd("block-job-change", {"id": "m", "type": "mirror", "copy-mode": "background"}) == {"return": {}}
        assert m.cmd("block-job-change", {"id": "m", "type": "mirror", "copy-mode": "write-blocking"}) == {"return": {}}
        assert m.cmd("block-job-change", {"id": "m", "type": "mirror", "copy-mode": "write-blocking"}) == {"return": {}}
        r = m.cmd("block-job-change", {"id": "m", "type": "mirror", "copy-mode": "background"})
        assert r["error"]["desc"] == "Change to copy mode 'background' is not implemented", r
        j = m.cmd("query-block-jobs")["return"][0]
        assert j["actively-synced"] is False, j
        assert m.cmd("block-job-set-speed", {"device": "m", "speed": 0}) == {"return": {}}
        m.wait("BLOCK_JOB_READY")
        j = m.cmd("query-block-jobs")["return"][0]
        assert j["actively-synced"] is True and j["ready"] is True, j
        # A job of another kind has nothing to change.
        assert m.cmd("job-cancel", {"id": "m"}) == {"return": {}}
        m.wait("JOB_STATUS_CHANGE", lambda x: x == {"id": "m", "status": "null"})
        assert m.cmd("block-commit", {"job-id": "c", "device": "top", "speed": 1}) == {"return": {}}
        r = m.cmd("block-job-change", {"id": "c", "type": "commit"})
        assert r["error"]["desc"] == "Job type does not support change", r
        r = m.cmd("block-job-change", {"id": "c", "type": "mirror", "copy-mode": "write-blocking"})
        assert r["error"]["desc"] == "Job 'c' is 'commit' job, not 'mirror'", r
        assert m.cmd("job-cancel", {"id": "c"}) == {"return": {}}
        m.wait("JOB_STATUS_CHANGE", lambda x: x == {"id": "c", "status": "null"})
    finally:
        d.stop()
    sh("qemu-img", "check", tgt)


CASES = [case_drive_mirror_errors_equal_qsd, case_drive_mirror_modes_equal_qsd,
         case_active_write_is_on_target_before_it_completes, case_active_target_error_as_qsd,
         case_active_mirror_under_fio, case_block_job_change]


if __name__ == "__main__":
    sys.exit(run_cases(CASES, "blockd-active-mirror-", ("qemu-img", "qemu-io", QSD, "fio")))

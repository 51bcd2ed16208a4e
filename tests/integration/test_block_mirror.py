# blockdev-mirror against qemu-storage-daemon, QEMU's tools and a concurrent fio writer; ctest runs it in one process.
"""Cases:
- the argument errors of blockdev-mirror equal QSD's (lookups, itself, a backing file, sync modes, granularity,
  buf-size, replaces, a mirror of a mirrored node), and a mirror to a target of another size fails as QSD's does;
- sync full / top / none: READY with QSD's len, job-complete pivots the NBD export to the target, and the target
  equals the source's view (qemu-img compare; sync=top keeps the backing file's data out of the target);
- a converged (READY) job shows busy=false, ready=true in query-block-jobs, as QSD's;
- a soft cancel in READY completes without pivot (the export stays on the source);
- fio writes to the exported source (randwrite, crc32c verify) while the mirror copies, converges and pivots: the
  verify pass reads every block back from the target.
Exit 77 when qemu-img/qemu-io/qemu-storage-daemon (or fio with the nbd engine) are missing."""
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qmp_harness import run_cases  # noqa: E402
from test_block_stream import sh, QSD, same_as_qsd, start  # noqa: E402


def images(tmp, size="64M"):
    b, t, g, s = (os.path.join(tmp, n + ".qcow2") for n in ("base", "top", "tgt", "small"))
    sh("qemu-img", "create", "-q", "-f", "qcow2", b, size)
    sh("qemu-io", "-c", "write -P 0x11 0 1M", b)
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", b, "-F", "qcow2", t)
    sh("qemu-io", "-c", "write -P 0x22 4M 1M", t)
    sh("qemu-img", "create", "-q", "-f", "qcow2", g, size)
    sh("qemu-img", "create", "-q", "-f", "qcow2", s, "1M")
    return b, t, g, s


def add(m, b, t, g, s):
    for name, path, extra in (("base", b, {}), ("top", t, {"backing": "base"}), ("tgt", g, {}), ("small", s, {})):
        assert m.cmd("blockdev-add", {"driver": "qcow2", "node-name": name,
                                      "file": {"driver": "file", "filename": path}, **extra}) == {"return": {}}


def run_errors(binary, tmp):
    os.makedirs(tmp)
    b, t, g, s = images(tmp)
    d, m = start(binary, tmp)
    out = []
    try:
        add(m, b, t, g, s)
        for args in ({"device": "nope", "target": "tgt", "sync": "full"},
                     {"device": "top", "target": "nope", "sync": "full"},
                     {"device": "top", "target": "tgt", "sync": "full"},
                     {"job-id": "m", "device": "top", "target": "top", "sync": "full"},
                     {"job-id": "m", "device": "top", "target": "base", "sync": "full"},
                     {"job-id": "m", "device": "top", "target": "tgt", "sync": "incremental"},
                     {"job-id": "m", "device": "top", "target": "tgt", "sync": "bitmap"},
                     {"job-id": "m", "device": "top", "target": "tgt", "sync": "full", "granularity": 1000},
                     {"job-id": "m", "device": "top", "target": "tgt", "sync": "full", "granularity": 256},
                     {"job-id": "m", "device": "top", "target": "tgt", "sync": "full", "granularity": 134217728},
                     {"job-id": "m", "device": "top", "target": "tgt", "sync": "full", "buf-size": -1},
                     {"job-id": "m", "device": "top", "target": "tgt", "sync": "full", "replaces": "nope"},
                     {"job-id": "m", "device": "top", "target": "tgt", "sync": "full", "replaces": "base"},
                     {"job-id": "m", "device": "base", "target": "tgt", "sync": "full"},
                     {"job-id": "m", "device": "top", "target": "tgt", "sync": "full", "speed": -1}):
            out.append(m.cmd("blockdev-mirror", args))
            out.append(m.names())
        assert m.cmd("blockdev-mirror", {"job-id": "m", "device": "top", "target": "small", "sync": "full"}) == {"return": {}}
        m.wait("JOB_STATUS_CHANGE", lambda x: x == {"id": "m", "status": "null"})
        out.append(m.names())
        assert m.cmd("blockdev-mirror", {"job-id": "m", "device": "top", "target": "tgt", "sync": "full"}) == {"return": {}}
        m.wait("BLOCK_JOB_READY")
        out.append(m.cmd("blockdev-mirror", {"job-id": "m2", "device": "top", "target": "small", "sync": "full"}))
        out.append(m.cmd("blockdev-del", {"node-name": "tgt"}))
        out.append(m.cmd("job-dismiss", {"id": "m"}))
        assert m.cmd("job-cancel", {"id": "m"}) == {"return": {}}
        m.wait("JOB_STATUS_CHANGE", lambda x: x == {"id": "m", "status": "null"})
        out.append(m.names())
    finally:
        d.stop()
    return out


def case_errors_equal_qsd(binary, tmp):
    same_as_qsd(run_errors, binary, tmp)


def mirror(binary, tmp, sync, finish):
    os.makedirs(tmp)
    b, t, g, s = images(tmp)
    d, m = start(binary, tmp)
    sock = os.path.join(tmp, "nbd.sock")
    try:
        add(m, b, t, g, s)
        assert m.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}}) == {"return": {}}
        assert m.cmd("block-export-add", {"type": "nbd", "id": "e", "node-name": "top", "writable": True}) == {"return": {}}
        assert m.cmd("blockdev-mirror", {"job-id": "m", "device": "top", "target": "tgt", "sync": sync}) == {"return": {}}
        ready = m.wait("BLOCK_JOB_READY")
        # A converged mirror waits for writes: QSD shows it not busy (its coroutine sleeps).
        keys = ("busy", "ready", "status", "paused", "type", "io-status")
        ready = (ready, [{k: j[k] for k in keys} for j in m.cmd("query-block-jobs")["return"]])
        sh("qemu-io", "-f", "raw", "-c", "write -P 0x55 8M 64k", f"nbd+unix:///top?socket={sock}")
        if finish == "complete":
            assert m.cmd("job-complete", {"id": "m"}) == {"return": {}}
        else:
            assert m.cmd("block-job-cancel", {"device": "m"}) == {"return": {}}
        end = m.wait("BLOCK_JOB_COMPLETED")
        m.wait("JOB_STATUS_CHANGE", lambda x: x == {"id": "m", "status": "null"})
        exports = [e["node-name"] for e in m.cmd("query-block-exports")["return"]]
    finally:
        d.stop()
    return ready, end, exports, b, t, g


def case_sync_modes(binary, tmp):
    for sync, finish in (("full", "complete"), ("top", "complete"), ("none", "complete"), ("full", "soft")):
        sub = os.path.join(tmp, sync + finish)
        want = mirror(QSD, os.path.join(sub, "qsd"), sync, finish)
        got = mirror(binary, os.path.join(sub, "blockd"), sync, finish)
        assert want[0] == got[0], (sync, finish, want[0], got[0])
        assert want[2] == got[2], (sync, finish, want[2], got[2])
        assert {k: v for k, v in want[1].items() if k not in ("len", "offset")} == \
            {k: v for k, v in got[1].items() if k not in ("len", "offset")}, (want[1], got[1])
        _, _, _, b, t, g = got
        sh("qemu-img", "check", g)
        if sync == "full":
            sh("qemu-img", "compare", t, g)
        elif sync == "top":
            # The top's own data and the write; the base's cluster stays out of the target.
            sh("qemu-io", "-f", "qcow2", "-c", "read -P 0x22 4M 1M", "-c", "read -P 0x55 8M 64k", "-c", "read -P 0 0 1M", g)
        else:
            sh("qemu-io", "-f", "qcow2", "-c", "read -P 0x55 8M 64k", "-c", "read -P 0 4M 1M", g)


def case_fio_during_mirror(binary, tmp):
    b, t, g, s = images(tmp, "128M")
    d, m = start(binary, tmp)
    sock = os.path.join(tmp, "nbd.sock")
    try:
        add(m, b, t, g, s)
        assert m.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}}) == {"return": {}}
        assert m.cmd("block-export-add", {"type": "nbd", "id": "e", "node-name": "top", "writable": True}) == {"return": {}}
        fio = subprocess.Popen(["fio", "--name=w", "--ioengine=nbd", f"--uri=nbd+unix:///top?socket={sock}",
                                "--rw=randwrite", "--bs=4k", "--size=96M", "--iodepth=16", "--verify=crc32c",
                                "--do_verify=1", "--verify_fatal=1", "--randrepeat=0", "--output-format=terse",
                                "--verify_state_save=0"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp)
        assert m.cmd("blockdev-mirror", {"job-id": "m", "device": "top", "target": "tgt", "sync": "full"}) == {"return": {}}
        m.wait("BLOCK_JOB_READY")
        assert m.cmd("job-complete", {"id": "m"}) == {"return": {}}
        m.wait("BLOCK_JOB_COMPLETED")
        ex = m.cmd("query-block-exports")["return"]
        assert [e["node-name"] for e in ex] == ["tgt"], ex
        out, err = fio.communicate(timeout=240)
        assert fio.returncode == 0, f"fio failed (verify reads the target now): {out}{err}"
    finally:
        d.stop()
    sh("qemu-img", "check", g)


CASES = [case_errors_equal_qsd, case_sync_modes, case_fio_during_mirror]


if __name__ == "__main__":
    sys.exit(run_cases(CASES, "blockd-mirror-", ("qemu-img", "qemu-io", QSD, "fio")))

# block-commit (intermediate and active) against qemu-storage-daemon and QEMU's tools; ctest runs it in one process.
"""Cases:
- the argument errors of block-commit equal QSD's, reply for reply (chain checks, mutual exclusions, blockers);
- an intermediate commit (top-node=mid) leaves base holding mid's data, top rebased onto base (its header names the
  base, or the given backing-file), the guest view unchanged (qemu-img compare), images clean (qemu-img check);
- an active commit goes READY with QSD's events and len; writes through an NBD export of the top while READY reach
  the base; job-complete pivots the export to the base (query-block-exports), the data read over NBD after the pivot
  equals what was written, and the base alone equals the chain's view;
- a commit into a base smaller than the top grows the base first (intermediate and active), as QSD's does;
- backing-mask-protocol (9.0): a protocol node as the new backing file is recorded with format "raw" instead of
  the protocol's name (without it, the protocol's name, as QSD 7.2 writes it);
- a soft block-job-cancel of a READY active commit completes it (BLOCK_JOB_COMPLETED) without a pivot; a force
  cancel ends it with BLOCK_JOB_CANCELLED.
Exit 77 when qemu-img/qemu-io/qemu-storage-daemon are missing."""
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qmp_harness import run_cases  # noqa: E402
from test_block_stream import sh, make_chain, add_chain, backing_of, QSD, same_as_qsd, start  # noqa: E402


def run_errors(binary, tmp):
    os.makedirs(tmp, exist_ok=True)
    b, mid, t, _ = make_chain(tmp)
    lone = os.path.join(tmp, "lone.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", lone, "1M")
    d, m = start(binary, tmp)
    out = []
    try:
        add_chain(m, b, mid, t)
        assert m.cmd("blockdev-add", {"driver": "qcow2", "node-name": "lone",
                                      "file": {"driver": "file", "filename": lone}}) == {"return": {}}
        for args in ({"device": "nope"}, {"device": "top"},
                     {"job-id": "c", "device": "top", "base": "x", "base-node": "y"},
                     {"job-id": "c", "device": "top", "top": "x", "top-node": "y"},
                     {"job-id": "c", "device": "top", "top-node": "nope"},
                     {"job-id": "c", "device": "top", "base-node": "nope"},
                     {"job-id": "c", "device": "top", "top-node": "lone"},
                     {"job-id": "c", "device": "top", "base-node": "lone"},
                     {"job-id": "c", "device": "top", "top-node": "base"},
                     {"job-id": "c", "device": "top", "top-node": "mid", "base-node": "mid"},
                     {"job-id": "c", "device": "top", "top-node": "base", "base-node": "mid"},
                     {"job-id": "c", "device": "top", "top": "/nonexist"},
                     {"job-id": "c", "device": "top", "base": "/nonexist"},
                     {"job-id": "c", "device": "lone"},
                     {"job-id": "c", "device": "top", "backing-file": "x"},
                     {"job-id": "1bad", "device": "top"},
                     {"job-id": "c", "device": "top", "speed": -1}):
            out.append(m.cmd("block-commit", args))
            out.append(m.names())
    finally:
        d.stop()
    return out


def case_errors_equal_qsd(binary, tmp):
    same_as_qsd(run_errors, binary, tmp)


def intermediate(binary, tmp, backing_file):
    os.makedirs(tmp)
    b, mid, t, flat = make_chain(tmp)
    d, m = start(binary, tmp)
    try:
        add_chain(m, b, mid, t)
        args = {"job-id": "c", "device": "top", "top-node": "mid"}
        if backing_file:
            args["backing-file"] = backing_file
        assert m.cmd("block-commit", args) == {"return": {}}
        m.wait("JOB_STATUS_CHANGE", lambda x: x == {"id": "c", "status": "null"})
        events = [e for e, _ in m.names()]
        nodes = {n["node-name"]: n["image"].get("backing-filename") for n in m.cmd("query-named-block-nodes")["return"]
                 if not n["node-name"].startswith("#")}
    finally:
        d.stop()
    return events, nodes, b, t, flat


def case_intermediate(binary, tmp):
    for bf in (None, "renamed.qcow2"):
        sub = os.path.join(tmp, bf or "plain")
        want = intermediate(QSD, os.path.join(sub, "qsd"), bf)
        got = intermediate(binary, os.path.join(sub, "blockd"), bf)
        assert want[0] == got[0], (want[0], got[0])
        wn = {k: v.replace(os.path.join(sub, "qsd"), "T") if v else v for k, v in want[1].items()}
        gn = {k: v.replace(os.path.join(sub, "blockd"), "T") if v else v for k, v in got[1].items()}
        assert wn == gn, (wn, gn)
        _, _, b, t, flat = got
        sh("qemu-img", "check", b)
        if not bf:
            sh("qemu-img", "check", t)
            assert backing_of(t) == b
            sh("qemu-img", "compare", "-f", "qcow2", "-F", "raw", t, flat)
        else:
            assert backing_of(t) == bf
        # The base holds mid's data now (0x33 at 2M; base's own 0x11 at 0 outside mid's 0x44).
        sh("qemu-io", "-f", "qcow2", "-c", "read -P 0x33 2M 1M", "-c", "read -P 0x44 512k 64k", b)


def active(binary, tmp, finish):
    os.makedirs(tmp)
    b, mid, t, flat = make_chain(tmp)
    d, m = start(binary, tmp)
    sock = os.path.join(tmp, "nbd.sock")
    url = f"nbd+unix:///top?socket={sock}"
    try:
        add_chain(m, b, mid, t)
        assert m.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}}) == {"return": {}}
        assert m.cmd("block-export-add", {"type": "nbd", "id": "top", "node-name": "top", "writable": True}) == {"return": {}}
        assert m.cmd("block-commit", {"job-id": "a", "device": "top", "base-node": "base"}) == {"return": {}}
        ready = m.wait("BLOCK_JOB_READY")
        sh("qemu-io", "-f", "raw", "-c", "write -P 0x77 8M 128k", url)
        if finish == "complete":
            assert m.cmd("job-complete", {"id": "a"}) == {"return": {}}
            end = m.wait("BLOCK_JOB_COMPLETED")
        elif finish == "soft":
            assert m.cmd("block-job-cancel", {"device": "a"}) == {"return": {}}
            end = m.wait("BLOCK_JOB_COMPLETED")
        else:
            assert m.cmd("block-job-cancel", {"device": "a", "force": True}) == {"return": {}}
            end = m.wait("BLOCK_JOB_CANCELLED")
        m.wait("JOB_STATUS_CHANGE", lambda x: x == {"id": "a", "status": "null"})
        exports = m.cmd("query-block-exports")["return"]
        sh("qemu-io", "-f", "raw", "-c", "read -P 0x77 8M 128k", "-c", "read -P 0x22 4M 1M", "-c", "read -P 0x33 2M 1M", url)
    finally:
        d.stop()
    return ready, end, [e["node-name"] for e in exports], b, t, flat


def case_active(binary, tmp):
    for finish in ("complete", "soft", "force"):
        want = active(QSD, os.path.join(tmp, finish, "qsd"), finish)
        got = active(binary, os.path.join(tmp, finish, "blockd"), finish)
        assert want[0] == got[0], (finish, want[0], got[0])
        assert want[2] == got[2], (finish, want[2], got[2])
        if finish == "complete":
            assert want[1] == got[1], (finish, want[1], got[1])
        else:
            # Whether the write made while READY was copied before the cancel is a race in both.
            w, g = dict(want[1]), dict(got[1])
            assert g["len"] == g["offset"] and g["len"] in (w["len"], w["len"] + (128 << 10)), (finish, w, g)
            w.pop("len"), w.pop("offset"), g.pop("len"), g.pop("offset")
            assert w == g, (finish, w, g)
        _, _, _, b, t, flat = got
        sh("qemu-img", "check", b)
        sh("qemu-img", "check", t)
        if finish == "complete":
            # The base alone is the disk now: the chain's old view plus the write made while READY.
            out = os.path.join(tmp, finish, "want.raw")
            shutil.copy(flat, out)
            with open(out, "r+b") as f:
                f.seek(8 << 20)
                f.write(b"\x77" * (128 << 10))
            sh("qemu-img", "compare", "-f", "qcow2", "-F", "raw", b, out)


def grow(binary, tmp, mode):
    """base is 8 MiB, mid and top 16 MiB with data above 8 MiB; the commit must grow base to 16 MiB."""
    os.makedirs(tmp)
    b, mid, t = (os.path.join(tmp, n + ".qcow2") for n in ("base", "mid", "top"))
    sh("qemu-img", "create", "-q", "-f", "qcow2", b, "8M")
    sh("qemu-io", "-c", "write -P 0x11 0 1M", b)
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", b, "-F", "qcow2", mid, "16M")
    sh("qemu-io", "-c", "write -P 0x33 12M 1M", mid)
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", mid, "-F", "qcow2", t, "16M")
    sh("qemu-io", "-c", "write -P 0x22 14M 1M", t)
    flat = os.path.join(tmp, "flat.raw")
    sh("qemu-img", "convert", "-O", "raw", t, flat)
    d, m = start(binary, tmp)
    try:
        add_chain(m, b, mid, t)
        args = {"job-id": "g", "device": "top"}
        if mode == "intermediate":
            args["top-node"] = "mid"
        assert m.cmd("block-commit", args) == {"return": {}}
        if mode == "active":
            m.wait("BLOCK_JOB_READY")
            assert m.cmd("job-complete", {"id": "g"}) == {"return": {}}
        end = m.wait("BLOCK_JOB_COMPLETED")
        m.wait("JOB_STATUS_CHANGE", lambda x: x == {"id": "g", "status": "null"})
        sizes = {n["node-name"]: n["image"]["virtual-size"] for n in m.cmd("query-named-block-nodes")["return"]
                 if not n["node-name"].startswith("#")}
    finally:
        d.stop()
    sh("qemu-img", "check", b)
    if mode == "active":
        sh("qemu-img", "compare", "-f", "qcow2", "-F", "raw", b, flat)
    else:
        sh("qemu-img", "compare", "-f", "qcow2", "-F", "raw", t, flat)
        sh("qemu-io", "-f", "qcow2", "-c", "read -P 0x33 12M 1M", b)
    return end, sizes


def case_commit_grows_smaller_base(binary, tmp):
    for mode in ("intermediate", "active"):
        want = grow(QSD, os.path.join(tmp, mode, "qsd"), mode)
        got = grow(binary, os.path.join(tmp, mode, "blockd"), mode)
        assert want == got, (mode, want, got)
        assert got[1]["base"] == 16 << 20, got


def mask(binary, tmp, masked):
    """mid's backing is the protocol node 'bfile' (raw data); committing mid into it rebases top onto bfile."""
    os.makedirs(tmp)
    braw, mid, t = os.path.join(tmp, "base.raw"), os.path.join(tmp, "mid.qcow2"), os.path.join(tmp, "top.qcow2")
    sh("qemu-img", "create", "-q", "-f", "raw", braw, "4M")
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", braw, "-F", "raw", mid)
    sh("qemu-io", "-c", "write -P 0x33 1M 1M", mid)
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", mid, "-F", "qcow2", t)
    d, m = start(binary, tmp)
    try:
        assert m.cmd("blockdev-add", {"driver": "file", "node-name": "bfile", "filename": braw}) == {"return": {}}
        assert m.cmd("blockdev-add", {"driver": "qcow2", "node-name": "mid", "backing": "bfile",
                                      "file": {"driver": "file", "filename": mid}}) == {"return": {}}
        assert m.cmd("blockdev-add", {"driver": "qcow2", "node-name": "top", "backing": "mid",
                                      "file": {"driver": "file", "filename": t}}) == {"return": {}}
        args = {"job-id": "k", "device": "top", "top-node": "mid"}
        if masked is not None:
            args["backing-mask-protocol"] = masked
        assert m.cmd("block-commit", args) == {"return": {}}
        m.wait("JOB_STATUS_CHANGE", lambda x: x == {"id": "k", "status": "null"})
    finally:
        d.stop()
    info = json.loads(sh("qemu-img", "info", "--output=json", t))
    sh("qemu-io", "-f", "raw", "-c", "read -P 0x33 1M 1M", braw)
    return info.get("backing-filename-format")


def case_backing_mask_protocol(binary, tmp):
    want = mask(QSD, os.path.join(tmp, "qsd"), None)
    assert mask(binary, os.path.join(tmp, "plain"), None) == want == "file", want
    assert mask(binary, os.path.join(tmp, "masked"), True) == "raw"
    assert mask(binary, os.path.join(tmp, "unmasked"), False) == "file"


CASES = [case_errors_equal_qsd, case_intermediate, case_active, case_commit_grows_smaller_base,
         case_backing_mask_protocol]


if __name__ == "__main__":
    sys.exit(run_cases(CASES, "blockd-commit-", ("qemu-img", "qemu-io", QSD)))

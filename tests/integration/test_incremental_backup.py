#!/usr/bin/env python3
"""An incremental backup chain built by hand over NBD, as backup tools build it: a full copy, then rounds of
writes, a checkpoint (a new bitmap starts, the old one stops, in one transaction), the old bitmap exported and
read with qemu:dirty-bitmap:NAME, and only its dirty extents copied. The backup must equal the source
(qemu-img compare). Run against blockd and, as a check of the procedure itself, against qemu-storage-daemon;
a last round uses blockd's x-block-export-add to back up a frozen point in time while the guest keeps
writing."""
import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qmp_harness import Client, Daemon, import_libnbd, monitor_args  # noqa: E402

SIZE = 16 << 20
nbd = import_libnbd()


def ok(r, what):
    assert "return" in r, f"{what}: {r}"
    return r["return"]


def connect(sock, name, context=None):
    h = nbd.NBD()
    h.set_export_name(name)
    if context:
        h.add_meta_context(context)
    h.connect_unix(sock)
    return h


def dirty_extents(h, context):
    """The dirty extents of the whole export, from block status of `context` (flag 1 = dirty)."""
    assert h.can_meta_context(context), context
    out = []
    offset = 0
    while offset < SIZE:
        got = []

        def cb(meta, off, entries, err):
            if meta == context:
                got.extend(entries)
            return 0
        h.block_status(min(SIZE - offset, 1 << 30), offset, cb)
        assert got, "no extents for " + context
        for i in range(0, len(got), 2):
            length, flags = got[i], got[i + 1]
            if flags & 1:
                out.append((offset, length))
            offset += length
    return out


def copy_extents(h, extents, backup):
    with open(backup, "r+b") as f:
        for off, length in extents:
            f.seek(off)
            f.write(h.pread(length, off))


def random_writes(h, rng, n):
    for _ in range(n):
        length = rng.choice([512, 4096, 65536, 100000, 300000])
        off = rng.randrange(0, SIZE - length)
        h.pwrite(rng.randbytes(length), off)
    h.flush()


def run(binary, tmp, extension):
    rng = random.Random(1234)
    src = os.path.join(tmp, "src.qcow2")
    backup = os.path.join(tmp, "backup.raw")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", src, str(SIZE)], check=True)
    subprocess.run(["qemu-io", "-c", "write -P 0x5a 1M 3M", src], check=True, capture_output=True)
    args, qmp = monitor_args(tmp)
    d = Daemon(binary, args, tmp)
    sock = os.path.join(tmp, "nbd.sock")
    bad = 0
    try:
        c = Client.unix(qmp)
        c.negotiate()
        ok(c.cmd("blockdev-add", {"driver": "qcow2", "node-name": "disk",
                                  "file": {"driver": "file", "filename": src}}), "add")
        ok(c.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}}), "server")
        ok(c.cmd("block-dirty-bitmap-add", {"node": "disk", "name": "cp0"}), "cp0")
        ok(c.cmd("block-export-add", {"type": "nbd", "id": "live", "node-name": "disk", "name": "live",
                                      "writable": True}), "live")
        live = connect(sock, "live")
        # The full copy: everything written after it is in cp0.
        with open(backup, "wb") as f:
            for off in range(0, SIZE, 1 << 20):
                f.write(live.pread(1 << 20, off))
        for n in range(3):
            random_writes(live, rng, 40)
            cur, nxt = f"cp{n}", f"cp{n + 1}"
            ok(c.cmd("transaction", {"actions": [
                {"type": "block-dirty-bitmap-add", "data": {"node": "disk", "name": nxt}},
                {"type": "block-dirty-bitmap-disable", "data": {"node": "disk", "name": cur}}]}), "checkpoint")
            ok(c.cmd("block-export-add", {"type": "nbd", "id": "inc", "node-name": "disk", "name": "inc",
                                          "bitmaps": [cur]}), "inc export")
            ctx = "qemu:dirty-bitmap:" + cur
            h = connect(sock, "inc", ctx)
            ext = dirty_extents(h, ctx)
            if not ext:
                print(f"FAIL {binary} round {n}: no dirty extents after 40 writes")
                bad += 1
            copy_extents(h, ext, backup)
            h.shutdown()
            ok(c.cmd("block-export-del", {"id": "inc"}), "inc del")
            ok(c.cmd("block-dirty-bitmap-remove", {"node": "disk", "name": cur}), "remove")
        # With the extension round, `src` is the frozen point in time; without, the final state.
        top = src
        if extension:
            # The guest keeps writing while the backup reads a frozen point in time with its bitmap.
            random_writes(live, rng, 40)
            ov = os.path.join(tmp, "ov.qcow2")
            ok(c.cmd("transaction", {"actions": [
                {"type": "blockdev-snapshot-sync", "data": {"node-name": "disk", "snapshot-file": ov,
                                                            "snapshot-node-name": "ov"}},
                {"type": "block-dirty-bitmap-add", "data": {"node": "ov", "name": "cp4"}},
                {"type": "block-dirty-bitmap-disable", "data": {"node": "disk", "name": "cp3"}},
                {"type": "x-block-export-add", "data": {"type": "nbd", "id": "inc", "node-name": "disk",
                                                        "name": "inc", "bitmaps": ["cp3"]}}]}), "x-checkpoint")
            h = connect(sock, "inc", "qemu:dirty-bitmap:cp3")
            random_writes(live, rng, 40)  # after the point in time: not part of this backup
            copy_extents(h, dirty_extents(h, "qemu:dirty-bitmap:cp3"), backup)
            h.shutdown()
            ok(c.cmd("block-export-del", {"id": "inc"}), "inc del")
        live.shutdown()
        ok(c.cmd("quit"), "quit")
        d.proc.wait(10)
    finally:
        d.stop()
    r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", backup, top], capture_output=True, text=True)
    if r.returncode != 0:
        print(f"FAIL {binary}: backup differs from the source: {r.stdout}{r.stderr}")
        bad += 1
    return bad


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--blockd", required=True)
    a = ap.parse_args()
    if nbd is None or not shutil.which("qemu-img") or not shutil.which("qemu-io"):
        print("SKIP: python3-libnbd, qemu-img or qemu-io missing")
        return 77
    bad = 0
    targets = [(a.blockd, True)]
    if shutil.which("qemu-storage-daemon"):
        targets.append(("qemu-storage-daemon", False))
    for binary, ext in targets:
        tmp = tempfile.mkdtemp(prefix="incbk-", dir="/dev/shm")
        try:
            bad += run(binary, tmp, ext)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    print("incremental backup:", "FAILED" if bad else "ok")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

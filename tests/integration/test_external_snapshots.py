#!/usr/bin/env python3
"""External snapshots (blockdev-snapshot, blockdev-snapshot-sync), change-backing-file and their transactions,
blockd against qemu-storage-daemon: the same QMP scripts give the same normalized replies and graphs; an NBD
client connected across a snapshot keeps writing, now into the overlay, while the old image stays as it was;
a transaction that aborts leaves graph, exports, bitmaps, snapshot lists and files as they were."""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qmp_harness import Client, Daemon, graph_shape, norm_nodes, import_libnbd, monitor_args  # noqa: E402

QSD = shutil.which("qemu-storage-daemon")
norm = norm_nodes


def sh(tmp, cmd):
    return subprocess.run(cmd, shell=True, cwd=tmp, check=True, capture_output=True, text=True).stdout


def start(binary, tmp):
    args, sock = monitor_args(tmp)
    d = Daemon(binary, args, tmp)
    c = Client.unix(sock)
    c.negotiate()
    return d, c


def play(binary, tmp, setup, steps):
    for s in setup:
        sh(tmp, s)
    d, c = start(binary, tmp)
    out = []
    try:
        for st in steps:
            if isinstance(st, str):
                out.append(("sh", sh(tmp, st.replace("$D", tmp)).replace(tmp, "$D")))
                continue
            args = json.loads(json.dumps(st[1]).replace("$D", tmp)) if len(st) > 1 else None
            r = norm(c.cmd(st[0], args), tmp)
            out.append((st[0], graph_shape(r) if st[0] == "x-debug-query-block-graph" else r))
    finally:
        d.stop()
    return out


IMAGES = ["qemu-img create -f qcow2 base.qcow2 64M", "qemu-img create -f raw r.raw 64M",
          "qemu-img create -f qcow2 o3.qcow2 64M", "qemu-img create -f qcow2 -b r.raw -F raw o4.qcow2 64M"]


def qcow2(name, path, **kw):
    o = {"driver": "qcow2", "node-name": name, "file": {"driver": "file", "filename": path}}
    o.update(kw)
    return o


NBD = ["nbd-server-start", {"addr": {"type": "unix", "data": {"path": "$D/nbd.sock"}}}]

# Every check and text of both commands and of change-backing-file, then the graph they leave.
SNAPSHOT_SCRIPT = [
    ["blockdev-add", qcow2("b0", "$D/base.qcow2")],
    NBD,
    ["block-export-add", {"type": "nbd", "id": "e0", "node-name": "b0", "writable": True}],
    ["blockdev-snapshot-sync", {"node-name": "b0", "snapshot-file": "$D/o1.qcow2"}],
    ["blockdev-snapshot-sync", {"node-name": "b0", "snapshot-file": "$D/o1.qcow2", "snapshot-node-name": "b0"}],
    ["blockdev-snapshot-sync", {"device": "b0", "snapshot-file": "$D/o1.qcow2"}],
    ["blockdev-snapshot-sync", {"node-name": "nope", "snapshot-file": "$D/o1.qcow2", "snapshot-node-name": "o1"}],
    ["blockdev-snapshot-sync", {"node-name": "b0", "snapshot-file": "$D/o1.qcow2", "snapshot-node-name": "o1",
                                "format": "bogus"}],
    ["blockdev-snapshot-sync", {"node-name": "b0", "snapshot-file": "$D/o1.raw", "snapshot-node-name": "o1",
                                "format": "raw"}],
    ["blockdev-snapshot-sync", {"node-name": "b0", "snapshot-file": "$D/o1.qcow2", "snapshot-node-name": "o1",
                                "mode": "existing"}],
    ["blockdev-snapshot-sync", {"node-name": "b0", "snapshot-file": "$D/o1.qcow2", "snapshot-node-name": "o1"}],
    "qemu-img info -U --output=json $D/o1.qcow2 | grep -i backing",
    ["query-block-exports"],
    ["query-named-block-nodes"],
    ["blockdev-add", {"driver": "raw", "node-name": "rr", "file": {"driver": "file", "filename": "$D/r.raw"}}],
    ["blockdev-snapshot", {"node": "o1", "overlay": "rr"}],
    ["blockdev-snapshot", {"node": "o1", "overlay": "nope"}],
    ["blockdev-snapshot", {"node": "nope", "overlay": "rr"}],
    ["blockdev-snapshot", {"node": "o1", "overlay": "o1"}],
    ["blockdev-snapshot", {"node": "o1", "overlay": "b0"}],
    ["blockdev-add", qcow2("o4", "$D/o4.qcow2")],
    ["blockdev-snapshot", {"node": "o1", "overlay": "o4"}],
    ["blockdev-add", qcow2("o3", "$D/o3.qcow2", backing=None)],
    ["block-export-add", {"type": "nbd", "id": "e3", "node-name": "o3"}],
    ["blockdev-snapshot", {"node": "o1", "overlay": "o3"}],
    ["block-export-del", {"id": "e3"}],
    ["blockdev-snapshot", {"node": "o1", "overlay": "o3"}],
    ["blockdev-snapshot", {"node": "o1", "overlay": "o3"}],
    ["query-block-exports"],
    ["blockdev-del", {"node-name": "o1"}],
    ["blockdev-del", {"node-name": "b0"}],
    ["change-backing-file", {"device": "o3", "image-node-name": "o1", "backing-file": "/x/y"}],
    "qemu-img info -U --output=json $D/o1.qcow2 | grep -i backing",
    ["change-backing-file", {"device": "o1", "image-node-name": "o1", "backing-file": "/x/y"}],
    ["change-backing-file", {"device": "o3", "image-node-name": "b0", "backing-file": "/x/y"}],
    ["change-backing-file", {"device": "o3", "image-node-name": "nope", "backing-file": "/x/y"}],
    ["change-backing-file", {"device": "nope", "image-node-name": "b0", "backing-file": "/x/y"}],
    ["change-backing-file", {"device": "rr", "image-node-name": "rr", "backing-file": "/x/y"}],
    ["query-named-block-nodes", {"flat": True}],
]

# Formats QEMU refuses (in its order of checks), an existing overlay that names a backing file of its own
# (not opened: the snapshot gives it one), snapshots of a raw node and of the protocol node below it, a
# missing directory; then the graph with every edge's permissions, compared by structure.
FORMAT_SCRIPT = [
    ["blockdev-add", qcow2("b0", "$D/base.qcow2")],
    ["blockdev-add", {"driver": "raw", "node-name": "rr",
                      "file": {"driver": "file", "filename": "$D/r.raw", "node-name": "rf"}}],
    NBD,
    ["block-export-add", {"type": "nbd", "id": "e0", "node-name": "b0", "writable": True}],
    ["block-export-add", {"type": "nbd", "id": "e1", "node-name": "rr", "writable": True}],
    ["blockdev-snapshot-sync", {"node-name": "b0", "snapshot-file": "$D/x.img", "snapshot-node-name": "o1",
                                "format": "file"}],
    ["blockdev-snapshot-sync", {"node-name": "b0", "snapshot-file": "$D/x.img", "snapshot-node-name": "o1",
                                "format": "null-co"}],
    ["blockdev-snapshot-sync", {"node-name": "b0", "snapshot-file": "$D/o4.qcow2", "snapshot-node-name": "o1",
                                "mode": "existing"}],
    ["blockdev-snapshot-sync", {"node-name": "rr", "snapshot-file": "$D/o5.qcow2", "snapshot-node-name": "o5"}],
    "qemu-img info -U --output=json $D/o5.qcow2 | grep -i backing",
    ["blockdev-snapshot-sync", {"node-name": "rf", "snapshot-file": "$D/o6.qcow2", "snapshot-node-name": "o6"}],
    ["blockdev-snapshot-sync", {"node-name": "b0", "snapshot-file": "$D/nodir/o7.qcow2", "snapshot-node-name": "o7"}],
    ["blockdev-snapshot-sync", {"node-name": "o1", "snapshot-file": "$D/nodir/o7.qcow2", "snapshot-node-name": "o7"}],
    ["query-block-exports"],
    ["x-debug-query-block-graph"],
]

# Bitmaps stay on the node a snapshot freezes: stored at its reopen to read-only (persistent ones), readonly
# from then on, mergeable into the overlay's bitmaps.
BITMAP_SCRIPT = [
    ["blockdev-add", qcow2("b0", "$D/base.qcow2")],
    NBD,
    ["block-export-add", {"type": "nbd", "id": "e0", "node-name": "b0", "writable": True}],
    ["block-dirty-bitmap-add", {"node": "b0", "name": "p1", "persistent": True}],
    ["block-dirty-bitmap-add", {"node": "b0", "name": "t1"}],
    ["blockdev-snapshot-sync", {"node-name": "b0", "snapshot-file": "$D/o1.qcow2", "snapshot-node-name": "o1"}],
    "qemu-img info -U --output=json $D/base.qcow2 | grep -A8 bitmaps",
    ["block-dirty-bitmap-add", {"node": "b0", "name": "p2", "persistent": True}],
    ["block-dirty-bitmap-remove", {"node": "b0", "name": "p1"}],
    ["block-dirty-bitmap-clear", {"node": "b0", "name": "t1"}],
    ["block-dirty-bitmap-disable", {"node": "b0", "name": "p1"}],
    ["block-dirty-bitmap-merge", {"node": "o1", "target": "m", "bitmaps": [{"node": "b0", "name": "p1"}]}],
    ["block-dirty-bitmap-add", {"node": "o1", "name": "m"}],
    ["block-dirty-bitmap-merge", {"node": "o1", "target": "m", "bitmaps": [{"node": "b0", "name": "p1"}]}],
    ["query-named-block-nodes", {"flat": True}],
]

# A snapshot of a node nothing uses: the overlay has no user either and goes again (QEMU's refcounting),
# while the old node stays read-only.
UNUSED_SCRIPT = [
    ["blockdev-add", qcow2("b0", "$D/base.qcow2")],
    ["blockdev-snapshot-sync", {"node-name": "b0", "snapshot-file": "$D/o1.qcow2", "snapshot-node-name": "o1"}],
    ["query-named-block-nodes", {"flat": True}],
    "qemu-img check $D/o1.qcow2",
]

# Transactions: a list that aborts at the end leaves everything as it was; one that succeeds does all of it.
TXN_SCRIPT = [
    ["blockdev-add", qcow2("b0", "$D/base.qcow2")],
    ["blockdev-add", qcow2("o3", "$D/o3.qcow2", backing=None)],
    NBD,
    ["block-export-add", {"type": "nbd", "id": "e0", "node-name": "b0", "writable": True}],
    ["query-named-block-nodes", {"flat": True}],
    ["transaction", {"actions": [
        {"type": "block-dirty-bitmap-add", "data": {"node": "b0", "name": "bm"}},
        {"type": "blockdev-snapshot-internal-sync", "data": {"device": "o3", "name": "in1"}},
        {"type": "blockdev-snapshot-sync", "data": {"node-name": "b0", "snapshot-file": "$D/o1.qcow2",
                                                    "snapshot-node-name": "o1"}},
        {"type": "abort", "data": {}}]}],
    ["query-named-block-nodes", {"flat": True}],
    ["query-block-exports"],
    ["transaction", {"actions": [
        {"type": "blockdev-snapshot", "data": {"node": "b0", "overlay": "o3"}},
        {"type": "blockdev-snapshot-sync", "data": {"node-name": "b0", "snapshot-file": "$D/o2.qcow2",
                                                    "snapshot-node-name": "o2"}}]}],
    ["query-named-block-nodes", {"flat": True}],
    # Two snapshots stacked in one list: the second goes over the overlay the first put in place.
    ["transaction", {"actions": [
        {"type": "blockdev-snapshot", "data": {"node": "b0", "overlay": "o3"}},
        {"type": "blockdev-snapshot-sync", "data": {"node-name": "o3", "snapshot-file": "$D/o2.qcow2",
                                                    "snapshot-node-name": "o2"}}]}],
    ["query-named-block-nodes", {"flat": True}],
    ["query-block-exports"],
    ["transaction", {"actions": [
        {"type": "blockdev-snapshot-internal-sync", "data": {"device": "o2", "name": "s1"}},
        {"type": "blockdev-snapshot-internal-sync", "data": {"device": "o2", "name": "s1"}}]}],
    ["transaction", {"actions": [{"type": "blockdev-snapshot-sync", "data": {
        "node-name": "o2", "snapshot-file": "$D/o5.qcow2", "snapshot-node-name": "o5"}}],
        "properties": {"completion-mode": "grouped"}}],
    ["blockdev-snapshot-internal-sync", {"device": "o2", "name": "kept"}],
    ["transaction", {"actions": [
        {"type": "blockdev-snapshot-internal-sync", "data": {"device": "o2", "name": "gone"}},
        {"type": "abort", "data": {}}]}],
    ["query-named-block-nodes", {"flat": True}],
]


def differential(blockd, name, setup, script):
    results = []
    for binary in (QSD, blockd):
        tmp = tempfile.mkdtemp(prefix="xsnap-", dir="/dev/shm")
        try:
            results.append(play(binary, tmp, setup, script))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    bad = 0
    for i, ((c1, a), (_, b)) in enumerate(zip(*results)):
        if a != b:
            bad += 1
            print(f"FAIL {name} step {i} {c1}:\n  qsd:    {json.dumps(a)[:3000]}\n  blockd: {json.dumps(b)[:3000]}")
    assert len(results[0]) == len(results[1])
    return bad


def clients_follow(blockd, tmp):
    """A client connected before the snapshot writes after it: the data lands in the overlay."""
    nbd = import_libnbd()
    if nbd is None:
        print("SKIP clients_follow: python3-libnbd missing")
        return 0
    sh(tmp, "qemu-img create -f qcow2 base.qcow2 4M && qemu-io -c 'write -P 0xaa 0 4M' base.qcow2")
    d, c = start(blockd, tmp)
    bad = 0
    try:
        assert "return" in c.cmd("blockdev-add", qcow2("b0", tmp + "/base.qcow2")), "add"
        assert "return" in c.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": tmp + "/nbd.sock"}}})
        assert "return" in c.cmd("block-export-add", {"type": "nbd", "id": "e0", "node-name": "b0", "writable": True})
        h = nbd.NBD()
        h.set_export_name("b0")
        h.connect_unix(tmp + "/nbd.sock")
        h.pwrite(b"\x11" * 65536, 0)
        r = c.cmd("blockdev-snapshot-sync", {"node-name": "b0", "snapshot-file": tmp + "/o1.qcow2",
                                             "snapshot-node-name": "o1"})
        assert r == {"return": {}}, r
        h.pwrite(b"\x22" * 65536, 65536)
        h.flush()
        if h.pread(65536, 0) != b"\x11" * 65536 or h.pread(65536, 65536) != b"\x22" * 65536:
            print("FAIL clients_follow: the client reads back other data than it wrote")
            bad += 1
        h.shutdown()
        r = c.cmd("query-named-block-nodes")
        ro = {n["node-name"]: n["ro"] for n in r["return"]}
        if ro.get("b0") is not True or ro.get("o1") is not False:
            print("FAIL clients_follow: after the snapshot b0 must be read-only and o1 writable:", ro)
            bad += 1
    finally:
        d.stop()
    # The old image holds what was written before the snapshot, the overlay what came after.
    for cmd in ("qemu-io -r -c 'read -P 0x11 0 64k' -c 'read -P 0xaa 64k 64k' base.qcow2",
                "qemu-io -r -c 'read -P 0x11 0 64k' -c 'read -P 0x22 64k 64k' -c 'read -P 0xaa 128k 64k' o1.qcow2",
                "qemu-img check base.qcow2", "qemu-img check o1.qcow2"):
        out = subprocess.run(cmd, shell=True, cwd=tmp, capture_output=True, text=True)
        if out.returncode != 0 or "Pattern verification failed" in out.stdout:
            print("FAIL clients_follow:", cmd, out.stdout, out.stderr)
            bad += 1
    return bad


def failed_list_keeps_clients(blockd, tmp):
    """A transaction whose second snapshot fails after the first parked an export's client: the client
    goes on against the old node once everything is undone, and what it writes lands in that image."""
    nbd = import_libnbd()
    if nbd is None:
        print("SKIP failed_list_keeps_clients: python3-libnbd missing")
        return 0
    sh(tmp, "qemu-img create -f qcow2 a.qcow2 4M && qemu-img create -f qcow2 o.qcow2 4M && "
            "qemu-img create -f qcow2 x.qcow2 4M")
    d, c = start(blockd, tmp)
    bad = 0
    try:
        for name in ("a", "o", "x"):
            kw = {} if name == "a" else {"backing": None}
            assert "return" in c.cmd("blockdev-add", qcow2(name, f"{tmp}/{name}.qcow2", **kw)), name
        assert "return" in c.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": tmp + "/nbd.sock"}}})
        assert "return" in c.cmd("block-export-add", {"type": "nbd", "id": "e0", "node-name": "a", "writable": True})
        h = nbd.NBD()
        h.set_export_name("a")
        h.connect_unix(tmp + "/nbd.sock")
        h.pwrite(b"\x33" * 65536, 0)
        r = c.cmd("transaction", {"actions": [
            {"type": "blockdev-snapshot", "data": {"node": "a", "overlay": "o"}},
            {"type": "blockdev-snapshot", "data": {"node": "x", "overlay": "x"}}]})
        if "error" not in r:
            print("FAIL failed_list_keeps_clients: a snapshot of a node onto itself succeeded:", r)
            bad += 1
        h.pwrite(b"\x44" * 65536, 65536)
        h.flush()
        if h.pread(131072, 0) != b"\x33" * 65536 + b"\x44" * 65536:
            print("FAIL failed_list_keeps_clients: the client reads other data than it wrote")
            bad += 1
        h.shutdown()
        exports = c.cmd("query-block-exports")["return"]
        if [e["node-name"] for e in exports] != ["a"]:
            print("FAIL failed_list_keeps_clients: the export moved:", exports)
            bad += 1
    finally:
        d.stop()
    out = subprocess.run("qemu-io -r -c 'read -P 0x33 0 64k' -c 'read -P 0x44 64k 64k' a.qcow2", shell=True,
                         cwd=tmp, capture_output=True, text=True)
    if out.returncode != 0 or "Pattern verification failed" in out.stdout:
        print("FAIL failed_list_keeps_clients: the writes did not land in a.qcow2:", out.stdout, out.stderr)
        bad += 1
    return bad


def rollback_leaves_files(blockd, tmp):
    """An aborted transaction leaves the images as they were: no snapshot in the table, the old header."""
    sh(tmp, "qemu-img create -f qcow2 a.qcow2 4M && qemu-img create -f qcow2 b.qcow2 4M")
    before = sh(tmp, "qemu-img info --output=json a.qcow2; qemu-img snapshot -l b.qcow2")
    d, c = start(blockd, tmp)
    try:
        c.cmd("blockdev-add", qcow2("a", tmp + "/a.qcow2"))
        c.cmd("blockdev-add", qcow2("b", tmp + "/b.qcow2"))
        r = c.cmd("transaction", {"actions": [
            {"type": "blockdev-snapshot-internal-sync", "data": {"device": "b", "name": "s"}},
            {"type": "block-dirty-bitmap-add", "data": {"node": "a", "name": "bm"}},
            {"type": "blockdev-snapshot-sync", "data": {"node-name": "a", "snapshot-file": tmp + "/o.qcow2",
                                                        "snapshot-node-name": "o"}},
            {"type": "abort", "data": {}}]})
        assert r["error"]["desc"] == "Transaction aborted using Abort action", r
        names = sorted(n["node-name"] for n in c.cmd("query-named-block-nodes")["return"] if "#" not in n["node-name"])
        assert names == ["a", "b"], names
    finally:
        d.stop()
    after = sh(tmp, "qemu-img info --output=json a.qcow2; qemu-img snapshot -l b.qcow2")
    if json.dumps(before) != json.dumps(after):
        print("FAIL rollback_leaves_files:\n", before, "\n", after)
        return 1
    return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--blockd", required=True)
    a = ap.parse_args()
    if not QSD or not shutil.which("qemu-img") or not shutil.which("qemu-io"):
        print("SKIP: qemu-storage-daemon, qemu-img or qemu-io missing")
        return 77
    bad = differential(a.blockd, "snapshots", IMAGES, SNAPSHOT_SCRIPT)
    bad += differential(a.blockd, "formats", IMAGES, FORMAT_SCRIPT)
    bad += differential(a.blockd, "unused", IMAGES, UNUSED_SCRIPT)
    bad += differential(a.blockd, "bitmaps", IMAGES, BITMAP_SCRIPT)
    bad += differential(a.blockd, "transactions", IMAGES, TXN_SCRIPT)
    for t in (clients_follow, failed_list_keeps_clients, rollback_leaves_files):
        tmp = tempfile.mkdtemp(prefix="xsnap-", dir="/dev/shm")
        try:
            bad += t(a.blockd, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    print("external snapshots:", "FAILED" if bad else "ok")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

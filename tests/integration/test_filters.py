#!/usr/bin/env python3
"""The compress, copy-on-read and preallocate filters, blockd against qemu-storage-daemon and qemu-img: the same
QMP script gives the same normalized replies, node listing and graph; clusters written through compress are
compressed clusters qemu-img checks and reads back; reads through copy-on-read copy backing data into the
overlay (only down to `bottom`); preallocate grows the image file in reserved steps while it runs and cuts it
back at exit. The inputs QSD hangs on get clear errors."""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qmp_harness import Client, Daemon, graph_shape, norm_nodes, monitor_args  # noqa: E402

QSD = shutil.which("qemu-storage-daemon")
norm = norm_nodes


def sh(tmp, cmd, check=True):
    r = subprocess.run(cmd, shell=True, cwd=tmp, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{cmd}: {r.stdout}{r.stderr}")
    return r.stdout + r.stderr


def start(binary, tmp):
    args, sock = monitor_args(tmp)
    d = Daemon(binary, args, tmp)
    c = Client.unix(sock)
    c.negotiate()
    return d, c


def ok(c, cmd, args):
    r = c.cmd(cmd, args)
    if "return" not in r:
        raise RuntimeError(f"{cmd} {args}: {r}")
    return r["return"]


def f(path):
    return {"driver": "file", "filename": path}


def nbd(c, tmp, node, writable=True):
    ok(c, "nbd-server-start", {"addr": {"type": "unix", "data": {"path": tmp + "/nbd.sock"}}})
    ok(c, "block-export-add", {"type": "nbd", "id": "e0", "node-name": node, "writable": writable})
    return f"nbd+unix:///{node}?socket={tmp}/nbd.sock"


def qio(tmp, uri, *cmds, check=True):
    args = " ".join("-c '" + x + "'" for x in cmds)
    out = sh(tmp, f"qemu-io -f raw {args} '{uri}'", check=check)
    if check and ("failed" in out or "Pattern verification failed" in out):
        raise RuntimeError(f"qemu-io {cmds}: {out}")
    return out


# ---- the same script on both daemons --------------------------------------------------------------

SETUP = ["qemu-img create -f qcow2 base.qcow2 64M", "qemu-img create -f qcow2 -b base.qcow2 -F qcow2 top.qcow2",
         "qemu-img create -f raw r.raw 16M"]
SCRIPT = [
    ["blockdev-add", {"driver": "file", "node-name": "f", "filename": "$D/r.raw"}],
    ["blockdev-add", {"driver": "compress", "node-name": "c", "file": "f"}],
    ["blockdev-add", {"driver": "null-co", "node-name": "n", "size": 1048576}],
    ["blockdev-add", {"driver": "compress", "node-name": "cn", "file": "n"}],
    ["blockdev-add", {"driver": "qcow2", "node-name": "q", "file": f("$D/top.qcow2")}],
    ["blockdev-add", {"driver": "compress", "node-name": "c2", "file": "q"}],
    ["blockdev-add", {"driver": "copy-on-read", "node-name": "cor", "file": "c2"}],
    ["blockdev-add", {"driver": "copy-on-read", "node-name": "cor2", "file": "q", "bottom": "nope"}],
    ["blockdev-add", {"driver": "copy-on-read", "node-name": "cor3", "file": "q", "bottom": "cor"}],
    ["blockdev-add", {"driver": "copy-on-read", "node-name": "cor4", "file": "q", "bottom": "q"}],
    ["blockdev-add", {"driver": "preallocate", "node-name": "p9", "file": "f", "prealloc-align": 1000}],
    ["blockdev-add", {"driver": "preallocate", "node-name": "p", "file": "f", "prealloc-size": 1048576}],
    ["blockdev-add", {"driver": "preallocate", "node-name": "p3", "file": "f", "prealloc-align": 3072}],
    ["query-named-block-nodes"],
    ["x-debug-query-block-graph"],
    ["blockdev-del", {"node-name": "cor"}],
    ["blockdev-del", {"node-name": "c2"}],
    ["blockdev-del", {"node-name": "p"}],
    ["query-named-block-nodes", {"flat": True}],
]


def play(binary, tmp):
    for s in SETUP:
        sh(tmp, s)
    d, c = start(binary, tmp)
    out = []
    try:
        for st in SCRIPT:
            args = json.loads(json.dumps(st[1]).replace("$D", tmp)) if len(st) > 1 else None
            r = norm(c.cmd(st[0], args), tmp)
            out.append((st[0], graph_shape(r) if st[0] == "x-debug-query-block-graph" else r))
    finally:
        d.stop()
    return out


def differential(blockd):
    res = {}
    for name, b in (("qsd", QSD), ("blockd", blockd)):
        tmp = tempfile.mkdtemp(prefix="filt-", dir="/dev/shm")
        try:
            res[name] = play(b, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    bad = 0
    for i, (a, b) in enumerate(zip(res["qsd"], res["blockd"])):
        if a != b:
            bad += 1
            print(f"DIFF step {i} {a[0]}:\n  qsd    {json.dumps(a[1])[:4000]}\n  blockd {json.dumps(b[1])[:4000]}")
    return bad


# ---- compress ---------------------------------------------------------------------------------------

def compress_roundtrip(blockd, tmp, ctype):
    sh(tmp, f"qemu-img create -f qcow2 -o compression_type={ctype} c.qcow2 4M")
    sh(tmp, "head -c 65536 /dev/urandom > rand.bin")
    d, c = start(blockd, tmp)
    try:
        ok(c, "blockdev-add", {"driver": "qcow2", "node-name": "q", "file": f(tmp + "/c.qcow2")})
        ok(c, "blockdev-add", {"driver": "compress", "node-name": "c", "file": "q"})
        uri = nbd(c, tmp, "c")
        qio(tmp, uri, "write -P 0x11 0 1M", "write -P 0x22 1M 64k", "write -s rand.bin 2M 64k",
            "write -z 3M 64k", "flush")
        # A compressed cluster cannot be rewritten (the format refuses, as QEMU's does).
        out = qio(tmp, uri, "write -P 0x33 0 64k", check=False)
        if "Input/output error" not in out:
            print("FAIL compress: rewriting a compressed cluster did not fail:", out)
            return 1
        qio(tmp, uri, "read -P 0x11 0 1M", "read -P 0x22 1M 64k", "read -P 0 3M 64k")
    finally:
        d.stop()
    chk = json.loads(sh(tmp, "qemu-img check --output=json c.qcow2"))
    if chk.get("corruptions", 0) or chk.get("leaks", 0) or not chk.get("compressed-clusters"):
        print("FAIL compress: qemu-img check:", chk)
        return 1
    # 16 + 1 compressible clusters; the random one does not shrink and is stored plain.
    if chk["compressed-clusters"] != 17:
        print("FAIL compress: expected 17 compressed clusters:", chk)
        return 1
    sh(tmp, "qemu-io -f qcow2 -c 'read -P 0x11 0 1M' -c 'read -P 0x22 1M 64k' c.qcow2")
    sh(tmp, "qemu-img convert -O raw c.qcow2 out.raw")
    with open(tmp + "/out.raw", "rb") as a, open(tmp + "/rand.bin", "rb") as b:
        a.seek(2 << 20)
        if a.read(65536) != b.read():
            print("FAIL compress: incompressible cluster read back differs")
            return 1
    return 0


# ---- copy-on-read -----------------------------------------------------------------------------------

def map_top(tmp, img):
    """Ranges [start, end) whose data lives in `img` itself (depth 0 in qemu-img map)."""
    m = json.loads(sh(tmp, f"qemu-img map --output=json {img}"))
    return [(e["start"], e["start"] + e["length"]) for e in m if e["depth"] == 0 and e["data"]]


def cor_copies(blockd, tmp):
    sh(tmp, "qemu-img create -f qcow2 base.qcow2 4M && qemu-io -c 'write -P 0xaa 0 2M' base.qcow2")
    sh(tmp, "qemu-img create -f qcow2 -b base.qcow2 -F qcow2 top.qcow2")
    d, c = start(blockd, tmp)
    try:
        ok(c, "blockdev-add", {"driver": "qcow2", "node-name": "t", "file": f(tmp + "/top.qcow2")})
        ok(c, "blockdev-add", {"driver": "copy-on-read", "node-name": "cor", "file": "t"})
        uri = nbd(c, tmp, "cor")
        qio(tmp, uri, "read -P 0xaa 0 1536k")
        qio(tmp, uri, "read -P 0xaa 1536k 512k", "read -P 0 2M 2M")
    finally:
        d.stop()
    got = map_top(tmp, "top.qcow2")
    if got != [(0, 2 << 20)]:
        print("FAIL cor: data copied into the overlay:", got)
        return 1
    sh(tmp, "qemu-img check top.qcow2")
    sh(tmp, "qemu-img compare top.qcow2 base.qcow2")
    return 0


def cor_bottom(blockd, tmp):
    sh(tmp, "qemu-img create -f qcow2 base.qcow2 4M && qemu-io -c 'write -P 0xaa 0 1M' base.qcow2")
    sh(tmp, "qemu-img create -f qcow2 -b base.qcow2 -F qcow2 mid.qcow2 && "
            "qemu-io -c 'write -P 0xbb 1M 1M' mid.qcow2")
    sh(tmp, "qemu-img create -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2")
    d, c = start(blockd, tmp)
    try:
        ok(c, "blockdev-add", {"driver": "qcow2", "node-name": "t", "file": f(tmp + "/top.qcow2"),
                               "backing": {"driver": "qcow2", "node-name": "m", "file": f(tmp + "/mid.qcow2")}})
        ok(c, "blockdev-add", {"driver": "copy-on-read", "node-name": "cor", "file": "t", "bottom": "m"})
        uri = nbd(c, tmp, "cor", writable=True)
        # One read across both layers (split by depth), then a guest write to a copied range.
        qio(tmp, uri, "read -P 0xaa 0 1M", "read -P 0xbb 1M 1M")
        qio(tmp, uri, "read -P 0xaa 512k 512k", "read -P 0xbb 1M 64k")
        qio(tmp, uri, "write -P 0xcc 1M 4k", "read -P 0xcc 1M 4k", "read -P 0xbb 1028k 60k")
    finally:
        d.stop()
    got = map_top(tmp, "top.qcow2")
    if got != [(1 << 20, 2 << 20)]:
        print("FAIL cor bottom: only the middle layer's data belongs in the overlay:", got)
        return 1
    sh(tmp, "qemu-img check top.qcow2")
    return 0


# ---- preallocate ------------------------------------------------------------------------------------

def preallocate_steps(binary, tmp):
    """The file's length and allocation while a daemon writes through preallocate, and after it stops."""
    sh(tmp, "qemu-img create -f qcow2 p.qcow2 256M")
    d, c = start(binary, tmp)
    try:
        ok(c, "blockdev-add", {"driver": "file", "node-name": "pf", "filename": tmp + "/p.qcow2"})
        ok(c, "blockdev-add", {"driver": "preallocate", "node-name": "pa", "file": "pf",
                               "prealloc-size": 16 << 20})
        ok(c, "blockdev-add", {"driver": "qcow2", "node-name": "pq", "file": "pa"})
        uri = nbd(c, tmp, "pq")
        qio(tmp, uri, "write -P 0x33 0 4M", "flush")
        st = os.stat(tmp + "/p.qcow2")
        running = (st.st_size, st.st_blocks * 512)
    finally:
        d.stop()
    st = os.stat(tmp + "/p.qcow2")
    sh(tmp, "qemu-img check p.qcow2")
    sh(tmp, "qemu-io -f qcow2 -c 'read -P 0x33 0 4M' p.qcow2")
    return running, st.st_size


def preallocate_grows(blockd, tmp):
    (size, allocated), after = preallocate_steps(blockd, tmp)
    if size < 16 << 20 or allocated < 16 << 20:
        print("FAIL preallocate: the file was not grown in a reserved step:", size, allocated)
        return 1
    if after >= 8 << 20:
        print("FAIL preallocate: the reservation was not cut back at exit:", after)
        return 1
    q = tempfile.mkdtemp(prefix="filt-q-", dir="/dev/shm")
    try:
        (qsize, _), qafter = preallocate_steps(QSD, q)
    finally:
        shutil.rmtree(q, ignore_errors=True)
    # Both reserve past what the image needs while running and give it back; the exact steps are each's own.
    if (qsize >= 16 << 20) != (size >= 16 << 20) or (qafter < 8 << 20) != (after < 8 << 20):
        print("FAIL preallocate: differs from qemu-storage-daemon:", size, after, qsize, qafter)
        return 1
    return 0


def refusals(blockd, tmp):
    """Inputs qemu-storage-daemon 7.2 hangs on: blockd answers with an error and keeps running."""
    sh(tmp, "qemu-img create -f qcow2 top.qcow2 4M && qemu-img create -f raw r.raw 4M")
    d, c = start(blockd, tmp)
    try:
        ok(c, "blockdev-add", {"driver": "file", "node-name": "f", "filename": tmp + "/r.raw"})
        ok(c, "blockdev-add", {"driver": "qcow2", "node-name": "q", "file": f(tmp + "/top.qcow2")})
        want = {
            "p0": ({"driver": "preallocate", "node-name": "p0", "file": "f", "prealloc-align": 0},
                   "prealloc-align parameter of preallocate filter must be positive"),
            "cor": ({"driver": "copy-on-read", "node-name": "cor", "file": "q", "bottom": "f"},
                    "Bottom node 'f' is not in the backing chain of node 'q'"),
        }
        for name, (args, text) in want.items():
            r = c.cmd("blockdev-add", args)
            if "error" not in r or text not in r["error"]["desc"]:
                print("FAIL refusal", name, r)
                return 1
        ok(c, "query-named-block-nodes", None)
    finally:
        d.stop()
    return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--blockd", required=True)
    a = ap.parse_args()
    if not QSD or not shutil.which("qemu-img") or not shutil.which("qemu-io"):
        print("SKIP: qemu-storage-daemon, qemu-img or qemu-io missing")
        return 77
    bad = differential(a.blockd)
    tests = [lambda b, t: compress_roundtrip(b, t, "zlib"), lambda b, t: compress_roundtrip(b, t, "zstd"),
             cor_copies, cor_bottom, preallocate_grows, refusals]
    for t in tests:
        tmp = tempfile.mkdtemp(prefix="filt-", dir="/dev/shm")
        try:
            bad += t(a.blockd, tmp)
        except Exception as e:  # noqa: BLE001 -- a failed step is a failed test, reported with its output
            print("FAIL", getattr(t, "__name__", "test"), e)
            bad += 1
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    print("filters:", "FAILED" if bad else "ok")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

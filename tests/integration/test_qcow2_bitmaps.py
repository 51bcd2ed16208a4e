#!/usr/bin/env python3
"""Persistent dirty bitmaps in qcow2, both ways against QEMU: bitmaps qemu-img and qemu-io wrote are loaded by
blockd exactly as qemu-storage-daemon loads them (query-named-block-nodes, x-debug-block-dirty-bitmap-sha256);
bitmaps blockd creates and records writes into are read back by qemu-img and QSD with the same digests; every
`qemu-img bitmap` operation on a blockd image is seen by blockd; a killed blockd leaves its bitmaps in use
(inconsistent), SIGTERM and quit store them; hostile directories fail the open with QEMU's errors; 50 SIGKILL
trials during NBD writes (some while quit stores the bitmaps) each leave an image `qemu-img check` passes."""
import argparse
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qmp_harness import Client, Daemon, monitor_args, run_each  # noqa: E402
from test_qcow2_crash import connect, recv_exact  # noqa: E402

QSD = shutil.which("qemu-storage-daemon")
BITMAPS_EXT = 0x23852875


def qimg(*args, check=True):
    r = subprocess.run(["qemu-img", *args], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise AssertionError(f"qemu-img {' '.join(args)}: {r.stdout}{r.stderr}")
    return r


def stored(img):
    """The bitmaps the image's directory holds, as qemu-img info reports them ([] for none)."""
    out = json.loads(qimg("info", "-U", "--output=json", img).stdout)
    return out["format-specific"]["data"].get("bitmaps", [])


def check_clean(img, leaks_ok=False):
    # A killed process's io_uring may hold the file's lock a moment after wait(): retry while it does.
    deadline = time.monotonic() + 10
    while True:
        r = subprocess.run(["qemu-img", "check", "-U", "--output=json", img], capture_output=True, text=True)
        if "Failed to get" not in r.stderr or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    ok = (0, 3) if leaks_ok else (0,)
    assert r.returncode in ok, f"qemu-img check {img}: exit {r.returncode}: {r.stdout}{r.stderr}"
    return r


class Open:
    """One daemon (blockd or QSD) serving `img` as node d0 (file node f0), optionally over NBD as 'disk'."""

    def __init__(self, binary, tmp, img, nbd=False, ro=False, name="d"):
        self.tmp = os.path.join(tmp, name)
        os.makedirs(self.tmp, exist_ok=True)
        m, path = monitor_args(self.tmp)
        self.sock = os.path.join(self.tmp, "nbd.sock")
        ro_opt = ",read-only=on" if ro else ""
        args = m + ["--blockdev", f"driver=file,node-name=f0,filename={img}{ro_opt}",
                    "--blockdev", f"driver=qcow2,node-name=d0,file=f0{ro_opt}"]
        if nbd:
            args += ["--nbd-server", f"addr.type=unix,addr.path={self.sock}",
                     "--export", "type=nbd,id=e0,node-name=d0,name=disk,writable=on"]
        self.d = Daemon(binary, args, self.tmp)
        self.c = Client.unix(path)
        self.c.negotiate()

    def raw(self, name, args=None):
        return self.c.cmd(name, args or {})

    def ok(self, name, args=None):
        r = self.raw(name, args)
        assert "return" in r, f"{name} {args}: {r}"
        return r["return"]

    def err(self, name, args=None):
        r = self.raw(name, args)
        assert "error" in r, f"{name} {args} should fail: {r}"
        return r["error"]["desc"]

    def node(self):
        for n in self.ok("query-named-block-nodes", {"flat": True}):
            if n["node-name"] == "d0":
                return n
        raise AssertionError("no node d0")

    def view(self):
        """What a client learns about the node's bitmaps: the list, each digest, the image's directory."""
        n = self.node()
        bms = n.get("dirty-bitmaps", [])
        sha = {b["name"]: self.ok("x-debug-block-dirty-bitmap-sha256", {"node": "d0", "name": b["name"]})["sha256"]
               for b in bms}
        return {"dirty-bitmaps": bms, "sha256": sha,
                "stored": n["image"]["format-specific"]["data"].get("bitmaps", [])}

    def nbd_write(self, *cmds):
        url = f"nbd+unix:///disk?socket={self.sock}"
        a = ["qemu-io", "-f", "raw", url]
        for c in cmds:
            a += ["-c", c]
        r = subprocess.run(a, capture_output=True, text=True)
        assert r.returncode == 0 and "error" not in r.stdout.lower(), r.stdout + r.stderr

    def quit(self):
        self.ok("quit")
        assert self.d.proc.wait(10) == 0
        self.c.close()

    def stop(self, sig):
        self.d.proc.send_signal(sig)
        self.d.proc.wait(10)
        self.c.close()


def view_of(binary, tmp, img, ro=True, name="v"):
    o = Open(binary, tmp, img, ro=ro, name=name)
    try:
        return o.view()
    finally:
        o.quit()


def same_as_qsd(blockd, tmp, img, what):
    """blockd and QSD, each opening `img` read-only, report the same bitmaps and digests."""
    a = view_of(blockd, tmp, img, name="vb")
    b = view_of(QSD, tmp, img, name="vq")
    assert a == b, f"{what}: blockd and QSD differ\nblockd: {a}\nQSD:    {b}"
    return a


# ---- qemu-img -> blockd ----------------------------------------------------------------------------

def test_qemu_bitmaps_load_like_qsd(blockd, tmp):
    img = os.path.join(tmp, "q.qcow2")
    qimg("create", "-q", "-f", "qcow2", img, "64M")
    qimg("bitmap", "--add", img, "b1")
    qimg("bitmap", "--add", "-g", "4096", img, "b2")
    qimg("bitmap", "--add", "-g", "65536", "--disable", img, "b3")
    # qemu-io records into the enabled bitmaps and stores them when it closes the image.
    r = subprocess.run(["qemu-io", "-f", "qcow2", img, "-c", "write -P 1 0 1M", "-c", "write -P 2 10M 64k",
                        "-c", "write 40M 512", "-c", "write 63M 1M"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    qimg("bitmap", "--merge", "b2", img, "b3")
    check_clean(img)
    v = same_as_qsd(blockd, tmp, img, "read-only open")
    counts = {b["name"]: b["count"] for b in v["dirty-bitmaps"]}
    assert counts["b1"] > 0 and counts["b2"] > 0 and counts["b3"] == counts["b1"], v
    assert [b["name"] for b in v["dirty-bitmaps"]] == ["b3", "b2", "b1"], v  # newest first, as QSD lists them
    # Read-write: both mark every stored bitmap in use; blockd's quit stores them back unchanged.
    for binary, name in ((blockd, "b"), (QSD, "q")):
        copy = os.path.join(tmp, f"rw-{name}.qcow2")
        shutil.copy(img, copy)
        o = Open(binary, tmp, copy, name="rw" + name)
        w = o.view()
        assert all("in-use" in s["flags"] for s in stored(copy)), stored(copy)
        assert w["sha256"] == v["sha256"], (name, w, v)
        o.quit()
        check_clean(copy)
        assert stored(copy) == stored(img), (name, stored(copy), stored(img))
    assert view_of(QSD, tmp, os.path.join(tmp, "rw-b.qcow2"), name="vq2")["sha256"] == v["sha256"]


# ---- blockd -> qemu-img ----------------------------------------------------------------------------

def test_blockd_bitmaps_read_by_qemu(blockd, tmp):
    img = os.path.join(tmp, "b.qcow2")
    qimg("create", "-q", "-f", "qcow2", img, "64M")
    o = Open(blockd, tmp, img, nbd=True)
    o.ok("block-dirty-bitmap-add", {"node": "d0", "name": "p1", "persistent": True})
    o.ok("block-dirty-bitmap-add", {"node": "d0", "name": "p2", "persistent": True, "granularity": 4096})
    o.ok("block-dirty-bitmap-add", {"node": "d0", "name": "p3", "persistent": True, "granularity": 512})
    o.ok("block-dirty-bitmap-add", {"node": "d0", "name": "t1"})  # not persistent: never stored
    o.nbd_write("write -P 3 0 128k", "write 33M 4k", "write -z 50M 1M")
    o.ok("block-dirty-bitmap-disable", {"node": "d0", "name": "p2"})
    o.nbd_write("write 60M 64k")
    before = o.view()
    o.quit()
    check_clean(img)
    got = {s["name"]: s for s in stored(img)}
    assert set(got) == {"p1", "p2", "p3"}, got
    assert got["p1"]["flags"] == ["auto"] and got["p2"]["flags"] == [] and got["p3"]["flags"] == ["auto"], got
    assert got["p2"]["granularity"] == 4096 and got["p3"]["granularity"] == 512, got
    v = same_as_qsd(blockd, tmp, img, "bitmaps blockd stored")
    assert {k: before["sha256"][k] for k in ("p1", "p2", "p3")} == v["sha256"], (before, v)

    # A data cluster whose bits are all set is stored as an all-ones table entry: QEMU reads it too.
    small = os.path.join(tmp, "ones.qcow2")
    qimg("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", small, "40M")
    o = Open(blockd, tmp, small, nbd=True, name="ones")
    o.ok("block-dirty-bitmap-add", {"node": "d0", "name": "all", "persistent": True, "granularity": 512})
    o.nbd_write("write -z 0 16M", "write 20M 4k")  # one table entry covers 16 MiB at 512-byte granules
    sha = o.ok("x-debug-block-dirty-bitmap-sha256", {"node": "d0", "name": "all"})["sha256"]
    o.quit()
    check_clean(small)
    assert same_as_qsd(blockd, tmp, small, "all-ones entry")["sha256"] == {"all": sha}


def test_qemu_img_operations_on_blockd_images(blockd, tmp):
    img = os.path.join(tmp, "ops.qcow2")
    qimg("create", "-q", "-f", "qcow2", img, "32M")
    o = Open(blockd, tmp, img, nbd=True)
    for name, g in (("a", 65536), ("b", 8192)):
        o.ok("block-dirty-bitmap-add", {"node": "d0", "name": name, "persistent": True, "granularity": g})
    o.nbd_write("write 0 256k", "write 20M 8k")
    o.quit()
    steps = [("--clear", "a"), ("--disable", "b"), ("--add", "c"), ("--enable", "b"), ("--remove", "a")]
    for op, name in steps:
        qimg("bitmap", op, img, name)
        check_clean(img)
        v = same_as_qsd(blockd, tmp, img, f"after qemu-img bitmap {op} {name}")
        names = [b["name"] for b in v["dirty-bitmaps"]]
        if op == "--clear":
            assert [b["count"] for b in v["dirty-bitmaps"] if b["name"] == "a"] == [0], v
        if op == "--remove":
            assert "a" not in names, v
    qimg("bitmap", "--merge", "b", img, "c")
    qimg("bitmap", "--add", "-g", "1048576", img, "g")
    v = same_as_qsd(blockd, tmp, img, "after --merge and --add -g")
    assert v["sha256"]["c"] == same_as_qsd(blockd, tmp, img, "again")["sha256"]["c"]
    assert [b["granularity"] for b in v["dirty-bitmaps"] if b["name"] == "g"] == [1048576], v
    # blockd writes into them all, then removes one; qemu-img sees the result.
    o = Open(blockd, tmp, img, nbd=True)
    o.nbd_write("write 5M 1M")
    o.ok("block-dirty-bitmap-remove", {"node": "d0", "name": "b"})
    assert [s["name"] for s in stored(img)] == ["c", "g"], stored(img)  # gone from the image at once
    check_clean(img)
    shas = o.view()["sha256"]
    o.quit()
    check_clean(img)
    assert same_as_qsd(blockd, tmp, img, "after blockd wrote")["sha256"] == shas


# ---- crashes and clean exits -----------------------------------------------------------------------

def test_sigkill_leaves_bitmaps_in_use(blockd, tmp):
    img = os.path.join(tmp, "k.qcow2")
    qimg("create", "-q", "-f", "qcow2", img, "16M")
    qimg("bitmap", "--add", img, "b1")
    qimg("bitmap", "--add", "--disable", img, "b2")
    o = Open(blockd, tmp, img, nbd=True)
    assert [s["flags"] for s in stored(img)] == [["in-use", "auto"], ["in-use"]], stored(img)
    o.nbd_write("write 0 64k")
    o.stop(signal.SIGKILL)
    assert [s["flags"] for s in stored(img)] == [["in-use", "auto"], ["in-use"]], stored(img)
    check_clean(img, leaks_ok=True)
    v = same_as_qsd(blockd, tmp, img, "after SIGKILL")
    assert all(b.get("inconsistent") and not b["recording"] for b in v["dirty-bitmaps"]), v
    o = Open(blockd, tmp, img)
    msgs = {}
    q = Open(QSD, tmp, shutil.copy(img, os.path.join(tmp, "kq.qcow2")), name="q")
    for cmd, args in (("block-dirty-bitmap-clear", {"node": "d0", "name": "b1"}),
                      ("block-dirty-bitmap-enable", {"node": "d0", "name": "b2"}),
                      ("block-dirty-bitmap-merge", {"node": "d0", "target": "b1", "bitmaps": ["b2"]}),
                      ("block_resize", {"node-name": "d0", "size": 32 << 20})):
        msgs[cmd] = o.err(cmd, args)
        assert msgs[cmd] == q.err(cmd, args), (cmd, msgs[cmd])
    assert msgs["block-dirty-bitmap-clear"] == "Bitmap 'b1' is inconsistent and cannot be used", msgs
    for name in ("b1", "b2"):  # only removal is allowed
        o.ok("block-dirty-bitmap-remove", {"node": "d0", "name": name})
        q.ok("block-dirty-bitmap-remove", {"node": "d0", "name": name})
    o.ok("block_resize", {"node-name": "d0", "size": 32 << 20})
    q.quit()
    o.quit()
    assert stored(img) == [], stored(img)
    check_clean(img)


def test_sigterm_and_quit_store(blockd, tmp):
    for how in ("sigterm", "quit", "sigint"):
        img = os.path.join(tmp, f"{how}.qcow2")
        qimg("create", "-q", "-f", "qcow2", img, "16M")
        qimg("bitmap", "--add", "-g", "16384", img, "b1")
        o = Open(blockd, tmp, img, nbd=True, name=how)
        o.ok("block-dirty-bitmap-add", {"node": "d0", "name": "n1", "persistent": True, "disabled": True})
        o.nbd_write("write 1M 100k", "write 15M 1M")
        shas = o.view()["sha256"]
        if how == "quit":
            o.quit()
        else:
            o.stop(signal.SIGTERM if how == "sigterm" else signal.SIGINT)
            assert o.d.proc.returncode == 0, o.d.proc.returncode
        assert [(s["name"], s["flags"]) for s in stored(img)] == [("b1", ["auto"]), ("n1", [])], stored(img)
        check_clean(img)
        assert view_of(QSD, tmp, img, name="q" + how)["sha256"] == shas


def test_reopen_read_only_stores(blockd, tmp):
    img = os.path.join(tmp, "r.qcow2")
    qimg("create", "-q", "-f", "qcow2", img, "16M")
    qimg("bitmap", "--add", img, "b1")
    o = Open(blockd, tmp, img, nbd=True)
    o.nbd_write("write 0 64k")
    sha = o.view()["sha256"]
    ro = {"driver": "qcow2", "node-name": "d0", "file": "f0", "read-only": True}
    o.ok("block-export-del", {"id": "e0"})
    o.ok("blockdev-reopen", {"options": [ro]})
    assert stored(img) == [{"flags": ["auto"], "name": "b1", "granularity": 65536}], stored(img)
    check_clean(img)
    assert o.err("block-dirty-bitmap-clear", {"node": "d0", "name": "b1"}) == \
        "Bitmap 'b1' is readonly and cannot be modified"
    o.ok("blockdev-reopen", {"options": [dict(ro, **{"read-only": False})]})
    assert stored(img)[0]["flags"] == ["in-use", "auto"], stored(img)
    o.ok("block-dirty-bitmap-clear", {"node": "d0", "name": "b1"})
    assert o.view()["sha256"] != sha
    o.quit()
    check_clean(img)


def test_inactivation_stores_and_activation_loads(blockd, tmp):
    img = os.path.join(tmp, "a.qcow2")
    qimg("create", "-q", "-f", "qcow2", img, "16M")
    qimg("bitmap", "--add", img, "b1")
    o = Open(blockd, tmp, img, nbd=True)
    o.ok("block-dirty-bitmap-add", {"node": "d0", "name": "mem"})  # not persistent: stays in the node
    o.nbd_write("write 0 64k", "write 8M 4k")
    before = o.view()
    o.ok("block-export-del", {"id": "e0"})
    o.ok("blockdev-set-active", {"node-name": "d0", "active": False})
    # The image holds the persistent bitmap now, stored and consistent; the node keeps only its own.
    assert stored(img) == [{"flags": ["auto"], "name": "b1", "granularity": 65536}], stored(img)
    check_clean(img)
    assert [b["name"] for b in o.node().get("dirty-bitmaps", [])] == ["mem"], o.node()
    assert view_of(QSD, tmp, img, name="qi")["sha256"] == {"b1": before["sha256"]["b1"]}
    o.ok("blockdev-set-active", {"node-name": "d0", "active": True})
    assert stored(img)[0]["flags"] == ["in-use", "auto"], stored(img)
    after = o.view()
    assert after["sha256"] == before["sha256"], (before, after)
    assert [b["name"] for b in after["dirty-bitmaps"]] == ["b1", "mem"], after
    o.quit()
    check_clean(img)


def test_refcount_rebuild_counts_bitmap_clusters(blockd, tmp):
    # Lazy refcounts: a killed writer leaves the dirty bit, and the next read-write open rebuilds every
    # refcount; the bitmap directory, tables and data must be counted or they would be freed (and reused).
    img = os.path.join(tmp, "lazy.qcow2")
    qimg("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", img, "16M")
    qimg("bitmap", "--add", "-g", "512", img, "fine")
    qimg("bitmap", "--add", img, "coarse")
    subprocess.run(["qemu-io", "-f", "qcow2", img, "-c", "write 0 2M"], check=True, capture_output=True)
    o = Open(blockd, tmp, img, nbd=True)
    o.nbd_write("write 4M 1M", "write 10M 64k")
    o.stop(signal.SIGKILL)
    assert json.loads(qimg("info", "-U", "--output=json", img).stdout)["dirty-flag"], "no refcount rebuild to test"
    o = Open(blockd, tmp, img, nbd=True, name="again")
    o.nbd_write("write 12M 3M")  # allocates: would land on bitmap clusters a bad rebuild freed
    o.ok("block-dirty-bitmap-remove", {"node": "d0", "name": "coarse"})
    o.ok("block-dirty-bitmap-add", {"node": "d0", "name": "new", "persistent": True, "granularity": 512})
    o.nbd_write("write 1M 4k")
    o.quit()
    check_clean(img)
    got = {b["name"]: b["flags"] for b in stored(img)}
    assert got == {"fine": ["in-use", "auto"], "new": ["auto"]}, got
    assert view_of(QSD, tmp, img, name="ql")["dirty-bitmaps"] == view_of(blockd, tmp, img, name="bl")["dirty-bitmaps"]


def test_errors_match_qsd(blockd, tmp):
    v2 = os.path.join(tmp, "v2.qcow2")
    qimg("create", "-q", "-f", "qcow2", "-o", "compat=0.10", v2, "16M")
    big = os.path.join(tmp, "big.qcow2")
    qimg("create", "-q", "-f", "qcow2", big, "4T")
    qimg("bitmap", "--add", big, "stored")
    long_name = "n" * 1024
    cases = {
        v2: [{"name": "x", "persistent": True}],
        big: [{"name": "x", "persistent": True, "granularity": 512},
              {"name": long_name, "persistent": True},
              {"name": long_name},
              {"name": "stored", "persistent": True},
              {"name": "stored"},
              {"name": "x", "persistent": True, "granularity": 3000},
              {"name": "", "persistent": True}],
    }
    for img, adds in cases.items():
        b = Open(blockd, tmp, img, ro=True, name="eb")
        q = Open(QSD, tmp, img, ro=True, name="eq")
        for a in adds:
            args = dict(a, node="d0")
            rb, rq = b.raw("block-dirty-bitmap-add", args), q.raw("block-dirty-bitmap-add", args)
            assert rb == rq, f"{img} {a['name'][:10]}: blockd {rb} QSD {rq}"
        assert b.view() == q.view()
        b.quit()
        q.quit()


# ---- hostile directories ---------------------------------------------------------------------------

def ext_data_offset(buf):
    """Where the bitmaps extension's data starts in the header cluster."""
    off = struct.unpack(">I", buf[100:104])[0]
    while off + 8 <= len(buf):
        t, n = struct.unpack(">II", buf[off:off + 8])
        if t == 0:
            break
        if t == BITMAPS_EXT:
            return off + 8
        off += 8 + ((n + 7) & ~7)
    raise AssertionError("no bitmaps extension")


def patched(tmp, base, name, fn):
    img = os.path.join(tmp, name + ".qcow2")
    shutil.copy(base, img)
    with open(img, "r+b") as f:
        head = bytearray(f.read(65536))
        e = ext_data_offset(head)
        nb, _, dsize, doff = struct.unpack(">IIQQ", head[e:e + 24])
        f.seek(doff)
        d = bytearray(f.read(dsize))
        fn(head, e, d)
        f.seek(0)
        f.write(head)
        f.seek(doff)
        f.write(d)
    return img


def open_error(binary, tmp, img, name):
    where = os.path.join(tmp, name)
    os.makedirs(where, exist_ok=True)
    m, path = monitor_args(where)
    d = Daemon(binary, m, where)
    c = Client.unix(path)
    greeting = c.line()
    assert "QMP" in greeting, greeting
    r = c.cmd("qmp_capabilities")
    assert r == {"return": {}}, (binary, r)
    r = c.cmd("blockdev-add", {"driver": "qcow2", "node-name": "d0", "read-only": True,
                               "file": {"driver": "file", "filename": img, "read-only": True}})
    c.cmd("quit")
    d.proc.wait(10)
    return r.get("error", {}).get("desc")


def test_hostile_directories_fail_like_qemu(blockd, tmp):
    base = os.path.join(tmp, "base.qcow2")
    qimg("create", "-q", "-f", "qcow2", base, "16M")
    qimg("bitmap", "--add", base, "aa")
    qimg("bitmap", "--add", base, "bb")
    subprocess.run(["qemu-io", "-f", "qcow2", base, "-c", "write 0 64k"], check=True, capture_output=True)

    def ext(field_off, fmt, value):
        return lambda h, e, d: struct.pack_into(fmt, h, e + field_off, value)

    def entry(field_off, fmt, value, which=0):
        def fn(h, e, d):
            pos = 0
            for _ in range(which):
                nlen, extra = struct.unpack(">HI", d[pos + 18:pos + 24])
                pos += (24 + nlen + extra + 7) & ~7
            struct.pack_into(fmt, d, pos + field_off, value)
        return fn

    def table_entry(value):
        def fn(h, e, d):
            toff = struct.unpack(">Q", d[0:8])[0]
            with open(img_path[0], "r+b") as f:
                f.seek(toff)
                f.write(struct.pack(">Q", value))
        return fn

    cases = [
        ("reserved", ext(4, ">I", 1)),
        ("zero-bitmaps", ext(0, ">I", 0)),
        ("too-many", ext(0, ">I", 70000)),
        ("misaligned-dir", ext(16, ">Q", 4096 + 8)),
        ("dir-too-big", ext(8, ">Q", 1 << 30)),
        ("fewer-entries", ext(0, ">I", 3)),
        ("more-entries", ext(0, ">I", 1)),
        ("granularity", entry(17, ">B", 40)),
        ("flags", entry(12, ">I", 0x4)),
        ("type", entry(16, ">B", 2)),
        ("table-size", entry(8, ">I", 0)),
        ("table-misaligned", entry(0, ">Q", 512 * 3)),
        ("extra-data", entry(20, ">I", 8)),
        ("duplicate", entry(24, ">2s", b"aa", which=1)),
        ("name-size", entry(18, ">H", 4000)),
        ("table-reserved", table_entry(0x2)),
        ("table-unaligned", table_entry(0x10000 + 512)),
    ]
    img_path = [None]
    for name, fn in cases:
        img_path[0] = os.path.join(tmp, name + ".qcow2")
        img = patched(tmp, base, name, fn)
        eb = open_error(blockd, tmp, img, "b-" + name)
        eq = open_error(QSD, tmp, img, "q-" + name)
        assert eb is not None, f"{name}: blockd opened a hostile image"
        assert eb == eq, f"{name}: blockd '{eb}', QSD '{eq}'"
    # Past the end of the file: QEMU reads zeroes there; blockd refuses with a reason.
    for name, fn in (("data-past-eof", table_entry(1 << 40)), ("table-past-eof", entry(0, ">Q", 1 << 40))):
        img_path[0] = os.path.join(tmp, name + ".qcow2")
        img = patched(tmp, base, name, fn)
        eb = open_error(blockd, tmp, img, "b-" + name)
        assert eb and "beyond the end of the image file" in eb, (name, eb)
    # Without the autoclear bit the bitmaps are stale: ignored, and dropped by a read-write open.
    stale = os.path.join(tmp, "stale.qcow2")
    shutil.copy(base, stale)
    with open(stale, "r+b") as f:
        f.seek(88)
        bits = struct.unpack(">Q", f.read(8))[0]
        f.seek(88)
        f.write(struct.pack(">Q", bits & ~1))
    assert view_of(blockd, tmp, stale, name="st")["dirty-bitmaps"] == []
    view_of(blockd, tmp, stale, ro=False, name="st2")
    assert stored(stale) == [], stored(stale)
    check_clean(stale, leaks_ok=True)


# ---- SIGKILL trials --------------------------------------------------------------------------------

def kill_trial(blockd, tmp, template, rng, t):
    img = os.path.join(tmp, "trial.qcow2")
    shutil.copy(template, img)
    o = Open(blockd, tmp, img, nbd=True, name="t")
    if t % 3 == 0:
        o.ok("block-dirty-bitmap-add", {"node": "d0", "name": f"n{t}", "persistent": True, "granularity": 4096})
    if t % 7 == 0:
        o.ok("block-dirty-bitmap-remove", {"node": "d0", "name": "off"})
    s = connect(o.sock)
    cookie, pending = 0, 0
    stop_after = rng.randrange(5, 120)
    quit_first = t % 5 == 4  # the kill may then land while quit stores the bitmaps
    for _ in range(stop_after):
        while pending < 8:
            cookie += 1
            off = rng.randrange(0, (64 << 20) // 4096) * 4096
            s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 1, cookie, off, 4096) + bytes([cookie & 255]) * 4096)
            pending += 1
        magic, err, _ = struct.unpack(">IIQ", recv_exact(s, 16))
        assert magic == 0x67446698 and err == 0, err
        pending -= 1
    if quit_first:
        o.c.send(json.dumps({"execute": "quit"}) + "\n")
        time.sleep(rng.random() * 0.01)
    o.d.proc.send_signal(signal.SIGKILL)
    o.d.proc.wait()
    s.close()
    o.c.close()
    check_clean(img, leaks_ok=True)
    flags = {b["name"]: b["flags"] for b in stored(img)}
    if not quit_first:
        # Killed while it owned them: every bitmap blockd held is in use (the new one never reached the image).
        assert flags.get("rec") == ["in-use", "auto"], (t, flags)
        assert t % 7 == 0 or flags.get("off") == ["in-use"], (t, flags)
        assert f"n{t}" not in flags, (t, flags)
        return "in use"
    assert flags.get("rec") in (["in-use", "auto"], ["auto"]), (t, flags)
    return "stored" if flags["rec"] == ["auto"] else "in use"


def test_sigkill_trials(blockd, tmp, trials=50):
    template = os.path.join(tmp, "template.qcow2")
    qimg("create", "-q", "-f", "qcow2", template, "64M")
    qimg("bitmap", "--add", "-g", "4096", template, "rec")
    qimg("bitmap", "--add", "--disable", template, "off")
    rng = random.Random(20260417)
    outcomes = {}
    for t in range(trials):
        o = kill_trial(blockd, tmp, template, rng, t)
        outcomes[o] = outcomes.get(o, 0) + 1
    print(f"    {trials} SIGKILL trials: bitmaps {outcomes}")
    # The last image still opens, in blockd and in QSD alike, with every in-use bitmap inconsistent.
    img = os.path.join(tmp, "trial.qcow2")
    v = same_as_qsd(blockd, tmp, img, "after the trials")
    for b in v["dirty-bitmaps"]:
        assert b.get("inconsistent", False) == ("in-use" in {s["name"]: s for s in v["stored"]}[b["name"]]["flags"]), v


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--blockd", required=True)
    a = ap.parse_args()
    for tool in ("qemu-img", "qemu-io", "qemu-storage-daemon"):
        if not shutil.which(tool):
            print(f"SKIP: {tool} not installed")
            return 77
    tests = [test_qemu_bitmaps_load_like_qsd, test_blockd_bitmaps_read_by_qemu,
             test_qemu_img_operations_on_blockd_images, test_sigkill_leaves_bitmaps_in_use,
             test_sigterm_and_quit_store, test_reopen_read_only_stores, test_inactivation_stores_and_activation_loads,
             test_refcount_rebuild_counts_bitmap_clusters, test_errors_match_qsd,
             test_hostile_directories_fail_like_qemu, test_sigkill_trials]
    start = time.monotonic()
    for t in tests:
        t0 = time.monotonic()
        run_each([t], a.blockd, "bd-qbm-")
        print(f"ok {t.__name__} ({time.monotonic() - t0:.1f} s)")
    print(f"{len(tests)} passed in {time.monotonic() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

# Dirty bitmaps over NBD exports (qemu:dirty-bitmap:NAME contexts, busy bitmaps, QEMU's errors), blockd against qemu-storage-daemon; one test process.
"""Each case runs against qemu-storage-daemon and blockd, each with a fresh graph: 'q0' (a 16 MiB qcow2 whose
backing node is 'base', a read-only qcow2) and 'rr' (a raw node over the file 'rf'). A case returns what clients
observe (QMP replies, `nbdinfo --map` and `--list` output, libnbd block status extents); the two servers' results
must be equal, and each case also checks its own rules, so a run without qemu-storage-daemon still tests
something: the dirty extents must be the granules the writes touched (computed here from the writes), REQ_ONE
gives one extent per context, a bitmap is busy while exported and free after the export goes (deleted, deleted
with a client connected, nbd-server-stop, daemon exit), and block status read while writes arrive never fails
and converges to the written granules. blockd alone (QSD 7.2 lacks extended headers and the extension) also
runs: extended headers (64-bit extents, REQ_ONE, contexts chosen by payload), checkpoint bitmaps exported with
x-block-export-add in a transaction (and its abort), the README's backup of a frozen point, and the refusal of
a {node, name} bitmap from outside the exported node's graph. Readiness is the daemon's pid file; nothing
sleeps.

Needs nbdinfo, qemu-img, qemu-io and python3-libnbd (module 'nbd'; a Python without it re-runs this file with
/usr/bin/python3); skipped when one is missing."""
import argparse
import errno
import json
import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import threading
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qmp_harness import Client, Daemon, import_libnbd, monitor_args  # noqa: E402

nbd = import_libnbd()
for tool in ("nbdinfo", "qemu-img", "qemu-io"):
    if shutil.which(tool) is None:
        print(f"SKIP: {tool} not installed")
        sys.exit(77)
if nbd is None:
    print("SKIP: no libnbd Python bindings (apt-get install python3-libnbd)")
    sys.exit(77)

K, M = 1024, 1024 * 1024
SIZE = 16 * M
# (offset, length, zeroes): the writes of the pattern, made over NBD with qemu-io.
PATTERN = [(100 * K, 3 * K, False), (1 * M, 64 * K, False), (5000 * K, 1, False), (8 * M, 1 * M, True)]


def run(*cmd, check=True):
    r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=60)
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd} failed ({r.returncode}): {r.stdout}{r.stderr}")
    return r


def expected_extents(writes, granularity, start=0, end=SIZE):
    """The dirty-bitmap extents [[length, flags], ...] over [start, end) after `writes` (offset, length)."""
    dirty = set()
    for off, ln in writes:
        dirty.update(range(off // granularity, (off + ln - 1) // granularity + 1))
    out = []
    pos = start
    while pos < end:
        g = pos // granularity
        state = 1 if g in dirty else 0
        nxt = min(end, (g + 1) * granularity)
        if out and out[-1][1] == state:
            out[-1][0] += nxt - pos
        else:
            out.append([nxt - pos, state])
        pos = nxt
    return out


def map_lines(extents, start=0):
    """nbdinfo --map's lines for a dirty-bitmap context."""
    lines, pos = [], start
    for ln, fl in extents:
        lines.append((pos, ln, fl, "dirty" if fl else "clean"))
        pos += ln
    return lines


def parse_map(text):
    out = []
    for line in text.splitlines():
        f = line.split()
        if len(f) >= 3:
            out.append((int(f[0]), int(f[1]), int(f[2]), " ".join(f[3:])))
    return out


class Server:
    def __init__(self, binary, tmp, extra=()):
        self.tmp = tmp
        base = os.path.join(tmp, "base.qcow2")
        top = os.path.join(tmp, "top.qcow2")
        raw = os.path.join(tmp, "r.raw")
        run("qemu-img", "create", "-q", "-f", "qcow2", base, str(SIZE))
        run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
        run("qemu-img", "create", "-q", "-f", "raw", raw, "4M")
        margs, qmp = monitor_args(tmp)
        self.sock = os.path.join(tmp, "nbd.sock")
        self.d = Daemon(binary, margs + [
            "--blockdev", f"driver=file,node-name=bf,filename={base}",
            "--blockdev", "driver=qcow2,node-name=base,file=bf,read-only=on",
            "--blockdev", f"driver=file,node-name=f0,filename={top}",
            "--blockdev", "driver=qcow2,node-name=q0,file=f0,backing=base",
            "--blockdev", f"driver=file,node-name=rf,filename={raw}",
            "--blockdev", "driver=raw,node-name=rr,file=rf",
            "--nbd-server", f"addr.type=unix,addr.path={self.sock}", *extra], tmp)
        self.c = Client.unix(qmp)
        self.c.negotiate()

    def cmd(self, name, args=None):
        r = self.c.cmd(name, args)
        if "error" in r:
            return {"error": r["error"]["desc"]}
        return {"return": r["return"]}

    def ok(self, name, args=None):
        r = self.cmd(name, args)
        assert "return" in r, (name, args, r)
        return r["return"]

    def uri(self, export="q0"):
        return f"nbd+unix:///{export}?socket={self.sock}"

    def bitmap_info(self, node, name):
        for n in self.ok("query-named-block-nodes"):
            if n["node-name"] == node:
                for b in n.get("dirty-bitmaps", []):
                    if b["name"] == name:
                        return {k: b[k] for k in ("recording", "busy", "granularity", "count")}
        return None

    def write_pattern(self, export="q0"):
        args = []
        for off, ln, zero in PATTERN:
            args += ["-c", f"write {'-z ' if zero else '-P 1 '}{off} {ln}"]
        run("qemu-io", "-f", "raw", *args, self.uri(export))

    def handle(self, export="q0", contexts=()):
        h = nbd.NBD()
        h.set_export_name(export)
        for c in contexts:
            h.add_meta_context(c)
        h.connect_unix(self.sock)
        return h

    def stop(self):
        self.c.close()
        return self.d.stop()


def block_status(h, length, offset, flags=0):
    got = {}

    def cb(ctx, off, entries, err):
        got.setdefault(ctx, []).append([off, [list(entries[i:i + 2]) for i in range(0, len(entries), 2)]])
        return 0

    h.block_status(length, offset, cb, flags)
    return got


def writes_of_pattern():
    return [(off, ln) for off, ln, _ in PATTERN]


# ---- cases: each takes a started Server and returns what a client saw -------------------------


def case_map_and_list(s):
    """Two bitmaps (64 KiB and 512 B granules) on a writable export with allocation-depth: the pattern
    written over NBD shows in nbdinfo --map of each bitmap context; --list shows every context."""
    s.ok("block-dirty-bitmap-add", {"node": "q0", "name": "b0"})
    s.ok("block-dirty-bitmap-add", {"node": "q0", "name": "small", "granularity": 512})
    s.ok("block-export-add", {"type": "nbd", "id": "e0", "node-name": "q0", "writable": True,
                              "allocation-depth": True, "bitmaps": ["b0", "small"]})
    s.write_pattern()
    out = {}
    for name, gran in (("b0", 65536), ("small", 512)):
        r = run("nbdinfo", f"--map=qemu:dirty-bitmap:{name}", s.uri())
        got = parse_map(r.stdout)
        assert got == map_lines(expected_extents(writes_of_pattern(), gran)), (name, r.stdout)
        out[name] = r.stdout
        # The count query-named-block-nodes shows is the dirty bytes, in whole granules.
        info = s.bitmap_info("q0", name)
        assert info["busy"] and info["recording"], info
        assert info["count"] == sum(ln for ln, fl in expected_extents(writes_of_pattern(), gran) if fl), info
        out[name + "-info"] = info
    lst = json.loads(run("nbdinfo", "--list", "--json", f"nbd+unix://?socket={s.sock}").stdout)
    for e in lst["exports"]:
        e.pop("uri", None)
    assert lst["exports"][0]["contexts"] == ["base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:b0",
                                             "qemu:dirty-bitmap:small"], lst
    out["list"] = lst
    # A range that starts and ends inside dirty granules: cut there, aligned inside.
    h = s.handle(contexts=["qemu:dirty-bitmap:b0"])
    part = block_status(h, 1 * M + 20000 - 70000, 70000)
    want = expected_extents(writes_of_pattern(), 65536, 70000, 1 * M + 20000)
    assert [e for _, ents in part["qemu:dirty-bitmap:b0"] for e in ents] == want, part
    out["part"] = part
    h.shutdown()
    return out


def case_meta_context_queries(s):
    """LIST_META_CONTEXT with no query, 'qemu:', 'qemu:dirty-bitmap:', one bitmap's name and an unknown one."""
    s.ok("block-dirty-bitmap-add", {"node": "q0", "name": "b0", "disabled": True})
    s.ok("block-dirty-bitmap-add", {"node": "q0", "name": "b1", "disabled": True})
    s.ok("block-export-add", {"type": "nbd", "id": "e0", "node-name": "q0", "bitmaps": ["b1", "b0"]})
    out = {}
    for queries in ([], ["qemu:"], ["qemu:dirty-bitmap:"], ["qemu:dirty-bitmap:b0"], ["qemu:dirty-bitmap:nope"],
                    ["base:allocation", "qemu:dirty-bitmap:b1"]):
        h = nbd.NBD()
        h.set_opt_mode(True)
        h.set_export_name("q0")
        for q in queries:
            h.add_meta_context(q)
        h.connect_unix(s.sock)
        got = []
        h.opt_list_meta_context(lambda ctx: got.append(ctx) or 0)
        h.opt_abort()
        out[",".join(queries) or "(none)"] = got
    assert out["qemu:dirty-bitmap:"] == ["qemu:dirty-bitmap:b1", "qemu:dirty-bitmap:b0"], out
    assert out["qemu:dirty-bitmap:nope"] == [], out
    # SET_META_CONTEXT through GO: the client learns the contexts it may ask for.
    h = s.handle(contexts=["qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:nope"])
    out["can"] = [h.can_meta_context(c) for c in ("qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1", "base:allocation")]
    assert out["can"] == [True, False, False], out
    h.shutdown()
    return out


def case_req_one_and_several_contexts(s):
    """base:allocation with both bitmaps in one request, with and without NBD_CMD_FLAG_REQ_ONE."""
    s.ok("block-dirty-bitmap-add", {"node": "q0", "name": "b0"})
    s.ok("block-dirty-bitmap-add", {"node": "q0", "name": "small", "granularity": 512})
    s.ok("block-export-add", {"type": "nbd", "id": "e0", "node-name": "q0", "writable": True,
                              "bitmaps": ["b0", "small"]})
    s.write_pattern()
    h = s.handle(contexts=["base:allocation", "qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:small"])
    out = {}
    for off in (0, 65536, 100 * K + 1000, 1 * M + 10, 5000 * K, 8 * M, SIZE - 4096):
        one = block_status(h, SIZE - off, off, nbd.CMD_FLAG_REQ_ONE)
        full = block_status(h, SIZE - off, off)
        assert sorted(one) == ["base:allocation", "qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:small"], one
        for name, gran in (("b0", 65536), ("small", 512)):
            ents = one["qemu:dirty-bitmap:" + name][0][1]
            assert len(ents) == 1 and ents[0] == expected_extents(writes_of_pattern(), gran, off)[0], (off, one)
            assert [e for _, es in full["qemu:dirty-bitmap:" + name] for e in es] == \
                expected_extents(writes_of_pattern(), gran, off), (off, full)
        assert len(one["base:allocation"][0][1]) == 1, one
        out[str(off)] = {"req_one": one, "full": full}
    # A zero-length request is refused (the client's own check turned off to send it).
    h.set_strict_mode(0)
    try:
        block_status(h, 0, 0)
        out["zero-length"] = "answered"
    except nbd.Error as e:
        out["zero-length"] = errno.errorcode.get(e.errno, str(e.errno))
    assert out["zero-length"] == "EINVAL", out["zero-length"]
    h.shutdown()
    return out


def case_errors(s):
    """QEMU's texts: a missing bitmap (both forms, and through nbd-server-add), an enabled bitmap on a
    read-only export, a bitmap below a raw node or on a file child (not in the backing chain), the
    first failing entry of a list, a busy bitmap in a second export."""
    s.ok("block-dirty-bitmap-add", {"node": "q0", "name": "en"})
    s.ok("block-dirty-bitmap-add", {"node": "q0", "name": "dis", "disabled": True})
    s.ok("block-dirty-bitmap-add", {"node": "f0", "name": "fb"})
    s.ok("block-dirty-bitmap-add", {"node": "rf", "name": "rb"})
    s.ok("block-dirty-bitmap-add", {"node": "base", "name": "bb"})
    steps = [
        ("block-export-add", {"type": "nbd", "id": "x", "node-name": "q0", "bitmaps": ["nope"]}),
        ("block-export-add", {"type": "nbd", "id": "x", "node-name": "q0", "bitmaps": ["en"]}),
        ("block-export-add", {"type": "nbd", "id": "x", "node-name": "q0", "bitmaps": ["dis", "nope", "en"]}),
        ("block-export-add", {"type": "nbd", "id": "x", "node-name": "q0", "bitmaps": ["fb"]}),
        ("block-export-add", {"type": "nbd", "id": "x", "node-name": "rr", "writable": True, "bitmaps": ["rb"]}),
        ("block-export-add", {"type": "nbd", "id": "x", "node-name": "q0", "bitmaps": [{"node": "nope", "name": "en"}]}),
        ("block-export-add", {"type": "nbd", "id": "x", "node-name": "q0", "bitmaps": [{"node": "q0", "name": "fb"}]}),
        ("nbd-server-add", {"device": "q0", "bitmap": "nope"}),
        ("nbd-server-add", {"device": "q0", "bitmap": "en"}),
        # Found down the backing chain; the backing node is read-only, so an enabled bitmap is fine.
        ("block-export-add", {"type": "nbd", "id": "e0", "node-name": "q0", "name": "a", "bitmaps": ["bb", "dis"]}),
        ("block-export-add", {"type": "nbd", "id": "e1", "node-name": "q0", "name": "b", "bitmaps": ["dis"]}),
        ("block-export-add", {"type": "nbd", "id": "e1", "node-name": "q0", "name": "b", "writable": True,
                              "bitmaps": [{"node": "f0", "name": "fb"}, "en"]}),
        ("block-export-add", {"type": "nbd", "id": "e2", "node-name": "q0", "name": "c", "bitmaps": ["fb"]}),
        ("query-block-exports", None),
        ("nbd-server-add", {"device": "rr", "bitmap": "rb"}),
        ("block-export-add", {"type": "nbd", "id": "e3", "node-name": "q0", "name": "d", "bitmaps": []}),
    ]
    out = [[name, args, s.cmd(name, args)] for name, args in steps]
    texts = [o[2].get("error") for o in out]
    assert texts[0] == "Bitmap 'nope' is not found", texts
    assert texts[1] == "Enabled bitmap 'en' incompatible with readonly export", texts
    assert texts[2] == "Bitmap 'nope' is not found", texts
    assert texts[5] == "Node 'nope' not found", texts
    assert texts[6] == "Dirty bitmap 'fb' not found", texts
    assert texts[9] is None and texts[11] is None, texts
    assert texts[10] == "Bitmap 'dis' is currently in use by another operation and cannot be used", texts
    out.append(["busy", {b: s.bitmap_info("q0", b)["busy"] for b in ("en", "dis")}])
    assert out[-1][1] == {"en": True, "dis": True}, out[-1]
    # The deprecated form, end to end: export, busy, removed, free.
    s.ok("block-dirty-bitmap-add", {"node": "q0", "name": "srv", "disabled": True})
    out.append(["nbd-server-add", s.cmd("nbd-server-add", {"device": "q0", "bitmap": "srv"})])
    out.append(["srv busy", s.bitmap_info("q0", "srv")["busy"]])
    out.append(["nbd-server-remove", s.cmd("nbd-server-remove", {"name": "q0"})])
    out.append(["srv after", s.bitmap_info("q0", "srv")["busy"]])
    assert out[-4][1] == {"return": {}} and out[-3][1] is True and out[-1][1] is False, out[-4:]
    return out


def case_busy_while_exported(s):
    """While exported, the bitmap cannot be removed, cleared or merged into; the export's deletion (safe,
    then hard with a client connected) and nbd-server-stop free it again."""
    s.ok("block-dirty-bitmap-add", {"node": "q0", "name": "b0"})
    s.ok("block-dirty-bitmap-add", {"node": "q0", "name": "b1", "disabled": True})
    out = []

    def step(name, args=None):
        r = s.cmd(name, args)
        out.append([name, args, r])
        return r

    step("block-export-add", {"type": "nbd", "id": "e0", "node-name": "q0", "writable": True, "bitmaps": ["b0"]})
    busy = step("block-dirty-bitmap-remove", {"node": "q0", "name": "b0"})
    assert busy == {"error": "Bitmap 'b0' is currently in use by another operation and cannot be used"}, busy
    step("block-dirty-bitmap-clear", {"node": "q0", "name": "b0"})
    step("block-dirty-bitmap-merge", {"node": "q0", "target": "b0", "bitmaps": ["b1"]})
    step("block-dirty-bitmap-disable", {"node": "q0", "name": "b0"})
    step("transaction", {"actions": [{"type": "block-dirty-bitmap-remove", "data": {"node": "q0", "name": "b0"}}]})
    out.append(["info", s.bitmap_info("q0", "b0")])
    step("block-export-del", {"id": "e0"})
    out.append(["info-after-del", s.bitmap_info("q0", "b0")])
    assert out[-1][1]["busy"] is False, out[-1]
    # Again, with a client connected: a safe delete is refused, a hard one disconnects it.
    step("block-export-add", {"type": "nbd", "id": "e1", "node-name": "q0", "writable": True, "bitmaps": ["b0"]})
    h = s.handle(contexts=["qemu:dirty-bitmap:b0"])
    step("block-export-del", {"id": "e1"})
    step("block-export-del", {"id": "e1", "mode": "hard"})
    try:
        h.pread(512, 0)
        out.append(["client after hard delete", "still served"])
    except nbd.Error:
        out.append(["client after hard delete", "disconnected"])
    # blockd answers once the export is gone; QSD may answer first and delete it (and free the bitmap)
    # a moment later, so the state is polled until it settles (bounded).
    end = time.monotonic() + 10
    info = s.bitmap_info("q0", "b0")
    while info["busy"] and time.monotonic() < end:
        time.sleep(0.01)
        info = s.bitmap_info("q0", "b0")
    out.append(["info-after-hard-del", info])
    assert out[-1][1]["busy"] is False, out[-1]
    r = step("block-dirty-bitmap-remove", {"node": "q0", "name": "b0"})
    assert r == {"return": {}}, r
    # nbd-server-stop takes every export, and its bitmaps' busy state, with it.
    step("block-export-add", {"type": "nbd", "id": "e2", "node-name": "q0", "bitmaps": ["b1"]})
    h2 = s.handle(contexts=["qemu:dirty-bitmap:b1"])
    step("nbd-server-stop")
    out.append(["info-after-stop", s.bitmap_info("q0", "b1")])
    assert out[-1][1]["busy"] is False, out[-1]
    del h2
    step("block-dirty-bitmap-remove", {"node": "q0", "name": "b1"})
    return out


def case_daemon_stops_while_exported(s):
    """SIGTERM with a client connected to an export of a bitmap: a clean exit."""
    s.ok("block-dirty-bitmap-add", {"node": "q0", "name": "b0"})
    s.ok("block-export-add", {"type": "nbd", "id": "e0", "node-name": "q0", "writable": True, "bitmaps": ["b0"]})
    h = s.handle(contexts=["qemu:dirty-bitmap:b0"])
    h.pwrite(b"x" * 4096, 0)
    got = block_status(h, SIZE, 0)
    rc = s.stop()
    assert rc == 0, rc
    return {"rc": rc, "status": got}


def case_concurrent_writes(s):
    """One client writes at random places while another reads the bitmap's block status over and over:
    every reply is well formed (extents cover a prefix of the range, dirty runs granule-aligned, every
    earlier write's granules dirty), and once the writes are done the map is exactly their granules."""
    gran = 4096
    s.ok("block-dirty-bitmap-add", {"node": "q0", "name": "b0", "granularity": gran})
    s.ok("block-export-add", {"type": "nbd", "id": "e0", "node-name": "q0", "writable": True, "bitmaps": ["b0"],
                              "name": "q0"})
    rnd = random.Random(7)
    writes = [(rnd.randrange(0, SIZE - 70000), rnd.randrange(1, 65536)) for _ in range(400)]
    done = threading.Event()
    errors = []
    acked = []  # writes the writer saw complete, in order
    lock = threading.Lock()

    def writer():
        try:
            h = s.handle()
            for off, ln in writes:
                h.pwrite(b"\xa5" * ln, off)
                with lock:
                    acked.append((off, ln))
            h.shutdown()
        except Exception as e:  # noqa: BLE001
            errors.append("writer: " + repr(e))
        finally:
            done.set()

    rounds = 0
    t = threading.Thread(target=writer)
    h = s.handle(contexts=["qemu:dirty-bitmap:b0"])
    t.start()
    try:
        while not done.is_set() or rounds < 3:
            with lock:
                before = list(acked)
            got = block_status(h, SIZE, 0)["qemu:dirty-bitmap:b0"]
            rounds += 1
            pos, dirty = 0, set()
            for off, ents in got:
                assert off == pos == 0, got
                for ln, fl in ents:
                    assert fl in (0, 1) and ln > 0, ents
                    if fl:
                        assert pos % gran == 0 and (pos + ln) % gran == 0, (pos, ln)
                        dirty.update(range(pos // gran, (pos + ln) // gran))
                    pos += ln
            assert 0 < pos <= SIZE, pos
            for off, ln in before:
                if off + ln <= pos:
                    assert set(range(off // gran, (off + ln - 1) // gran + 1)) <= dirty, (off, ln)
    finally:
        t.join(30)
    assert not errors, errors
    final = block_status(h, SIZE, 0)["qemu:dirty-bitmap:b0"]
    flat = [e for _, es in final for e in es]
    assert flat == expected_extents(writes, gran), "the map did not converge to the written granules"
    sha = s.ok("x-debug-block-dirty-bitmap-sha256", {"node": "q0", "name": "b0"})
    h.shutdown()
    return {"final": flat, "sha256": sha, "reads": "several" if rounds >= 3 else rounds}


def case_export_on_an_iothread(s):
    """The export runs on an iothread (its node moves there); a client connected while the node moves
    back to the main loop keeps reading the bitmap, which keeps recording on the node's new home."""
    s.ok("object-add", {"qom-type": "iothread", "id": "io1"})
    s.ok("block-dirty-bitmap-add", {"node": "q0", "name": "b0", "granularity": 4096})
    s.ok("block-export-add", {"type": "nbd", "id": "e0", "node-name": "q0", "writable": True, "iothread": "io1",
                              "bitmaps": ["b0"]})
    h = s.handle(contexts=["qemu:dirty-bitmap:b0"])
    h.pwrite(b"a" * 4096, 0)
    first = block_status(h, SIZE, 0)
    assert [e for _, es in first["qemu:dirty-bitmap:b0"] for e in es] == expected_extents([(0, 4096)], 4096)
    moved = s.cmd("x-blockdev-set-iothread", {"node-name": "q0", "iothread": None, "force": True})
    h.pwrite(b"b" * 4096, 3 * M)
    second = block_status(h, SIZE, 0)
    assert [e for _, es in second["qemu:dirty-bitmap:b0"] for e in es] == \
        expected_extents([(0, 4096), (3 * M, 4096)], 4096), second
    h.shutdown()
    return {"moved": moved, "first": first, "second": second, "info": s.bitmap_info("q0", "b0")}


CASES = [(f.__name__[5:], f) for f in (case_map_and_list, case_meta_context_queries, case_req_one_and_several_contexts,
                                        case_errors, case_busy_while_exported, case_daemon_stops_while_exported,
                                        case_concurrent_writes, case_export_on_an_iothread)]


# ---- blockd only: what QSD 7.2 cannot do, or does differently by design ---------------------------


class Raw:
    """A byte-level client with extended headers (libnbd 1.14 cannot negotiate them)."""
    OPTS, REP = 0x49484156454F5054, 0x0003E889045565A9

    def __init__(self, path, export, queries):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.settimeout(10)
        self.s.connect(path)
        assert self.recv(18)[:8] == b"NBDMAGIC"
        self.s.sendall(struct.pack(">I", 3))
        self.opt(11)  # EXTENDED_HEADERS
        assert self.reply()[0] == 1
        name = export.encode()
        data = struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
        for q in queries:
            data += struct.pack(">I", len(q)) + q.encode()
        self.opt(10, data)  # SET_META_CONTEXT
        self.ids = {}
        while True:
            t, d = self.reply()
            if t != 4:
                assert t == 1, t
                break
            self.ids[d[4:].decode()] = struct.unpack(">I", d[:4])[0]
        self.opt(7, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))  # GO
        while True:
            t, _ = self.reply()
            if t != 3:
                assert t == 1, t
                break

    def recv(self, n):
        b = b""
        while len(b) < n:
            c = self.s.recv(n - len(b))
            if not c:
                raise EOFError("closed")
            b += c
        return b

    def opt(self, o, data=b""):
        self.s.sendall(struct.pack(">QII", self.OPTS, o, len(data)) + data)

    def reply(self):
        magic, _, t, ln = struct.unpack(">QIII", self.recv(20))
        assert magic == self.REP
        return t, self.recv(ln)

    def request(self, typ, off, ln, cookie, flags=0, payload=b""):
        self.s.sendall(struct.pack(">IHHQQQ", 0x21E41C71, flags, typ, cookie, off, ln) + payload)

    def block_status(self, off, ln, flags=0, ids=None):
        """{context id: [[length, flags], ...]} of one BLOCK_STATUS reply (64-bit descriptors)."""
        payload = b""
        if ids is not None:
            flags |= 1 << 5  # NBD_CMD_FLAG_PAYLOAD_LEN: the payload names the contexts
            payload = struct.pack(">Q", ln) + b"".join(struct.pack(">I", i) for i in ids)
            ln = len(payload)
        self.request(7, off, ln, 9, flags, payload)
        out = {}
        while True:
            magic, fl, typ, cookie, _, plen = struct.unpack(">IHHQQQ", self.recv(32))
            assert magic == 0x6E8A278C and cookie == 9, hex(magic)
            pl = self.recv(plen)
            assert typ == 6, (typ, pl)  # BLOCK_STATUS_EXT
            cid, count = struct.unpack(">II", pl[:8])
            out[cid] = [list(struct.unpack(">QQ", pl[8 + 16 * i:24 + 16 * i])) for i in range(count)]
            if fl & 1:
                return out


def blockd_extended_headers(s):
    """Extended headers: bitmap extents as 64-bit descriptors in context order, REQ_ONE, a payload that
    picks one context, and one extent longer than 4 GiB on an 8 GiB node."""
    s.ok("block-dirty-bitmap-add", {"node": "q0", "name": "b0"})
    s.ok("block-dirty-bitmap-add", {"node": "q0", "name": "small", "granularity": 512})
    s.ok("block-export-add", {"type": "nbd", "id": "e0", "node-name": "q0", "writable": True,
                              "bitmaps": ["b0", "small"]})
    s.write_pattern()
    r = Raw(s.sock, "q0", ["qemu:dirty-bitmap:small", "base:allocation", "qemu:dirty-bitmap:b0"])
    assert r.ids == {"base:allocation": 0, "qemu:dirty-bitmap:b0": 2, "qemu:dirty-bitmap:small": 3}, r.ids
    got = r.block_status(0, SIZE)
    assert sorted(got) == [0, 2, 3], got
    assert got[2] == expected_extents(writes_of_pattern(), 65536), got[2]
    assert got[3] == expected_extents(writes_of_pattern(), 512), got[3]
    one = r.block_status(65536, SIZE - 65536, flags=1 << 3)
    assert one[2] == [[65536, 1]] and one[3] == [[102400 - 65536, 0]] and len(one[0]) == 1, one
    picked = r.block_status(1 * M, 4 * M, ids=[3])
    assert picked == {3: expected_extents(writes_of_pattern(), 512, 1 * M, 5 * M)}, picked
    # 5 GiB of zeroes written into an 8 GiB node: one dirty extent that needs 64 bits.
    s.ok("block-dirty-bitmap-add", {"node": "big", "name": "bb"})
    s.ok("block-export-add", {"type": "nbd", "id": "e1", "node-name": "big", "writable": True, "bitmaps": ["bb"]})
    big = Raw(s.sock, "big", ["qemu:dirty-bitmap:bb"])
    big.request(6, 1 << 30, 5 << 30, 10)  # WRITE_ZEROES
    magic, fl, typ, cookie, _, plen = struct.unpack(">IHHQQQ", big.recv(32))
    assert (fl & 1, typ, cookie, plen) == (1, 0, 10, 0), (fl, typ, cookie, plen)
    assert big.block_status(0, 8 << 30) == {2: [[1 << 30, 0], [5 << 30, 1], [2 << 30, 0]]}
    return "ok"


def blockd_bitmap_outside_the_graph(s):
    """A {node, name} bitmap from a node outside the exported node's graph is refused (connections read
    bitmaps on their node's iothread without locks); one from the graph (the qcow2 node's file) is not."""
    s.ok("block-dirty-bitmap-add", {"node": "rf", "name": "rb"})
    s.ok("block-dirty-bitmap-add", {"node": "f0", "name": "fb"})
    r = s.cmd("block-export-add", {"type": "nbd", "id": "e0", "node-name": "q0",
                                   "bitmaps": [{"node": "rf", "name": "rb"}]})
    assert "must be in the exported node's graph" in r.get("error", ""), r
    assert s.bitmap_info("rf", "rb")["busy"] is False
    s.ok("block-export-add", {"type": "nbd", "id": "e0", "node-name": "q0", "bitmaps": [{"node": "f0", "name": "fb"}]})
    assert s.bitmap_info("f0", "fb")["busy"] is True
    return "ok"


def blockd_split_graph_does_not_move_apart(s):
    """After a reopen splits the exported node from the backing node whose bitmap it exports, neither part
    may move to another iothread on its own (a connection would read a bitmap another thread dirties);
    once the export is gone, the move is allowed."""
    s.ok("object-add", {"qom-type": "iothread", "id": "io1"})
    s.ok("block-dirty-bitmap-add", {"node": "base", "name": "b"})
    s.ok("block-dirty-bitmap-disable", {"node": "base", "name": "b"})
    s.ok("block-export-add", {"type": "nbd", "id": "e0", "node-name": "q0", "bitmaps": ["b"]})
    s.ok("blockdev-reopen", {"options": [{"driver": "qcow2", "node-name": "q0", "file": "f0", "backing": None}]})
    for node, extra in (("base", {}), ("q0", {"force": True})):
        r = s.cmd("x-blockdev-set-iothread", dict({"node-name": node, "iothread": "io1"}, **extra))
        assert "reads dirty bitmaps of nodes that would stay behind" in r.get("error", ""), (node, r)
    s.ok("block-export-del", {"id": "e0"})
    s.ok("x-blockdev-set-iothread", {"node-name": "base", "iothread": "io1"})
    # Only the nodes the bitmaps live on count: an export of q0's own bitmap lets base go anywhere.
    s.ok("x-blockdev-set-iothread", {"node-name": "base", "iothread": None})
    s.ok("block-dirty-bitmap-add", {"node": "q0", "name": "own", "disabled": True})
    s.ok("block-export-add", {"type": "nbd", "id": "e1", "node-name": "q0", "bitmaps": ["own"]})
    s.ok("x-blockdev-set-iothread", {"node-name": "base", "iothread": "io1"})
    return "ok"


def blockd_checkpoint_in_a_transaction(s):
    """x-block-export-add (a blockd extension) with a bitmap added earlier in the same transaction: the
    export serves it, busy; when the transaction aborts, the export goes and the bitmap with it."""
    r = s.cmd("transaction", {"actions": [
        {"type": "block-dirty-bitmap-add", "data": {"node": "q0", "name": "cp1", "disabled": True}},
        {"type": "x-block-export-add", "data": {"type": "nbd", "id": "e0", "node-name": "q0", "bitmaps": ["cp1"]}}]})
    assert r == {"return": {}}, r
    assert s.bitmap_info("q0", "cp1")["busy"] is True
    h = s.handle(contexts=["qemu:dirty-bitmap:cp1"])
    assert block_status(h, SIZE, 0) == {"qemu:dirty-bitmap:cp1": [[0, [[SIZE, 0]]]]}
    h.shutdown()
    r = s.cmd("transaction", {"actions": [
        {"type": "block-dirty-bitmap-add", "data": {"node": "q0", "name": "cp2", "disabled": True}},
        {"type": "x-block-export-add", "data": {"type": "nbd", "id": "e1", "node-name": "q0", "name": "n1",
                                                "bitmaps": ["cp2"]}},
        {"type": "abort", "data": {}}]})
    assert r == {"error": "Transaction aborted using Abort action"}, r
    assert s.bitmap_info("q0", "cp2") is None
    assert [e["id"] for e in s.ok("query-block-exports")] == ["e0"]
    s.ok("block-export-del", {"id": "e0"})
    s.ok("block-dirty-bitmap-remove", {"node": "q0", "name": "cp1"})
    return "ok"


def blockd_backup_of_a_frozen_point(s):
    """The README's incremental backup: one transaction freezes q0 under a new overlay, starts the next
    checkpoint there, stops the previous one and exports the frozen node with it. Guest writes after the
    transaction land in the new checkpoint only."""
    s.ok("block-dirty-bitmap-add", {"node": "q0", "name": "cp1"})
    s.ok("block-export-add", {"type": "nbd", "id": "guest", "node-name": "q0", "writable": True})
    s.write_pattern()
    s.ok("transaction", {"actions": [
        {"type": "blockdev-snapshot-sync", "data": {"node-name": "q0", "snapshot-file": os.path.join(s.tmp, "ov1.qcow2"),
                                                    "snapshot-node-name": "ov1"}},
        {"type": "block-dirty-bitmap-add", "data": {"node": "ov1", "name": "cp2"}},
        {"type": "block-dirty-bitmap-disable", "data": {"node": "q0", "name": "cp1"}},
        {"type": "x-block-export-add", "data": {"type": "nbd", "id": "backup", "node-name": "q0", "name": "backup",
                                                "bitmaps": ["cp1"]}}]})
    run("qemu-io", "-f", "raw", "-c", "write -P 7 12M 4k", s.uri("q0"))  # the guest goes on, on ov1
    got = parse_map(run("nbdinfo", "--map=qemu:dirty-bitmap:cp1", s.uri("backup")).stdout)
    assert got == map_lines(expected_extents(writes_of_pattern(), 65536)), got
    assert s.bitmap_info("ov1", "cp2")["count"] == 65536, s.bitmap_info("ov1", "cp2")
    assert s.bitmap_info("q0", "cp1")["busy"] is True
    return "ok"


def blockd_inactive_node(s):
    """QEMU 10's rules (QSD 7.2 has no blockdev-set-active): an inactive node is not writable, so with
    allow-inactive a read-only export takes its enabled bitmap; without it the export activates the node
    first, and the same bitmap is then refused."""
    s.ok("block-dirty-bitmap-add", {"node": "q0", "name": "b0"})
    s.ok("blockdev-set-active", {"node-name": "q0", "active": False})
    s.ok("block-export-add", {"type": "nbd", "id": "e0", "node-name": "q0", "bitmaps": ["b0"], "allow-inactive": True})
    s.ok("block-export-del", {"id": "e0"})
    r = s.cmd("block-export-add", {"type": "nbd", "id": "e1", "node-name": "q0", "bitmaps": ["b0"]})
    assert r == {"error": "Enabled bitmap 'b0' incompatible with readonly export"}, r
    assert s.bitmap_info("q0", "b0")["busy"] is False
    return "ok"


BLOCKD_ONLY = [("blockd_extended_headers", blockd_extended_headers),
               ("blockd_inactive_node", blockd_inactive_node),
               ("blockd_backup_of_a_frozen_point", blockd_backup_of_a_frozen_point),
               ("blockd_checkpoint_in_a_transaction", blockd_checkpoint_in_a_transaction),
               ("blockd_bitmap_outside_the_graph", blockd_bitmap_outside_the_graph),
               ("blockd_split_graph_does_not_move_apart", blockd_split_graph_does_not_move_apart)]
BIG = ["--blockdev", "driver=null-co,node-name=big,size=8589934592,read-zeroes=on"]


def collect(binary, base, cases=None):
    results = []
    for name, fn in cases or CASES:
        tmp = tempfile.mkdtemp(prefix=name + "-", dir=base)
        s = Server(binary, tmp, BIG if name.startswith("blockd_") else ())
        try:
            results.append((name, fn(s)))
        except Exception as e:  # noqa: BLE001
            results.append((name, {"exception": repr(e), "trace": traceback.format_exc()}))
        finally:
            try:
                s.stop()
            except Exception:  # noqa: BLE001
                pass
    return results


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--blockd", required=True)
    ap.add_argument("--qsd", default="qemu-storage-daemon")
    ap.add_argument("--only", help="run the cases whose name contains this")
    a = ap.parse_args()
    global CASES, BLOCKD_ONLY
    if a.only:
        CASES = [(n, f) for n, f in CASES if a.only in n]
        BLOCKD_ONLY = [(n, f) for n, f in BLOCKD_ONLY if a.only in n]
    have_qsd = shutil.which(a.qsd) is not None
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    t1, t2 = tempfile.mkdtemp(prefix="nbdbm-qsd-", dir=shm), tempfile.mkdtemp(prefix="nbdbm-blockd-", dir=shm)
    try:
        want = collect(a.qsd, t1) if have_qsd and CASES else None
        got = collect(a.blockd, t2) if CASES else []
        only = collect(a.blockd, t2, BLOCKD_ONLY) if BLOCKD_ONLY else []
    finally:
        shutil.rmtree(t1, ignore_errors=True)
        shutil.rmtree(t2, ignore_errors=True)
    failed = 0
    for i, (name, g) in enumerate(got):
        w = want[i][1] if want else None
        bad = []
        for who, r in (("qsd", w), ("blockd", g)):
            if isinstance(r, dict) and "exception" in r:
                bad.append(f"{who}: {r['trace']}")
        if want and w != g:
            bad.append("differs:\n   qsd:    " + json.dumps(w) + "\n   blockd: " + json.dumps(g))
        if bad:
            failed += 1
            print("FAIL", name, "\n  " + "\n  ".join(bad))
        else:
            print("PASS", name)
    for name, g in only:
        if isinstance(g, dict) and "exception" in g:
            failed += 1
            print("FAIL", name, "\n  " + g["trace"])
        else:
            print("PASS", name)
    if not have_qsd:
        print("(no qemu-storage-daemon: blockd's results were checked, not compared)")
    print(f"{len(got) + len(only) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

# NBD option haggling and error paths through libnbd's Python bindings (nbdsh's library), blockd against qemu-storage-daemon; one test process.
"""The same cases run against qemu-storage-daemon and blockd, each serving a fresh sparse qcow2 (data at 1-3 MiB,
a zeroed cluster run at 8 MiB, the rest unallocated) as three exports: 'disk0' (writable, allocation-depth),
'ro' (read-only, with a description) and 'small' (a 1 MiB raw file, 4 KiB logical blocks). Each case returns what
a client observes (values, errno names, chunk shapes, context lists); the two servers' results must be equal,
and both must meet the protocol's rules the case asserts. Cases: opt_list, opt_info, opt_go, opt_list_meta_context
with several queries, SET_META_CONTEXT through opt_go (base:allocation, qemu:allocation-depth, unknown contexts,
qemu:dirty-bitmap:x), structured replies off, out-of-range requests, writes to a read-only export,
flush/trim/zero/cache with FUA, NO_HOLE and FAST_ZERO, block status with and without REQ_ONE, pread_structured
chunks (data vs hole) with and without DF. Readiness is the daemon's pid file; nothing sleeps.

Needs python3-libnbd (Debian's name for the bindings, module 'nbd'); a Python without it re-runs this file with
/usr/bin/python3 when that one has it, and the test is skipped when neither does."""
import argparse
import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qmp_harness import Daemon, import_libnbd  # noqa: E402

nbd = import_libnbd()
if nbd is None:
    print("SKIP: no libnbd Python bindings (apt-get install python3-libnbd)")
    sys.exit(77)  # ctest: skipped (SKIP_RETURN_CODE)

MiB = 1 << 20
SIZE = 64 * MiB


def run(*cmd):
    r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise AssertionError(f"{cmd} failed ({r.returncode}): {r.stdout}{r.stderr}")
    return r


def errname(e):
    return errno.errorcode.get(e.errno, str(e.errno)) if e.errno else "no-errno"


def attempt(fn, *args):
    """("ok", value) or ("err", ERRNO-NAME): what the client saw."""
    try:
        return ["ok", fn(*args)]
    except nbd.Error as e:
        return ["err", errname(e)]


class Server:
    def __init__(self, binary, tmp):
        self.tmp = tmp
        img = os.path.join(tmp, "disk.qcow2")
        run("qemu-img", "create", "-q", "-f", "qcow2", img, str(SIZE))
        run("qemu-io", "-c", "write -P 0xab 1M 2M", "-c", "write -z 8M 1M", img)
        small = os.path.join(tmp, "small.raw")
        run("qemu-img", "create", "-q", "-f", "raw", small, "1M")
        self.sock = os.path.join(tmp, "nbd.sock")
        self.d = Daemon(binary, [
            "--blockdev", f"driver=file,node-name=f0,filename={img}",
            "--blockdev", "driver=qcow2,node-name=disk0,file=f0",
            "--blockdev", f"driver=file,node-name=small,filename={small}",
            "--nbd-server", f"addr.type=unix,addr.path={self.sock}",
            "--export", "nbd,id=e0,node-name=disk0,writable=on,allocation-depth=on",
            "--export", "nbd,id=e1,node-name=disk0,name=ro,description=read-only view",
            "--export", "nbd,id=e2,node-name=small,name=small,writable=on"], tmp)

    def handle(self, name="disk0", opt_mode=False, structured=True, contexts=(), strict=True):
        h = nbd.NBD()
        h.set_export_name(name)
        if opt_mode:
            h.set_opt_mode(True)
        if not structured:
            h.set_request_structured_replies(False)
        for c in contexts:
            h.add_meta_context(c)
        if not strict:
            h.set_strict_mode(0)
        h.connect_unix(self.sock)
        return h

    def stop(self):
        return self.d.stop()


def flags_of(h):
    return {k: getattr(h, k)() for k in ("is_read_only", "can_flush", "can_fua", "can_trim", "can_zero",
                                         "can_fast_zero", "can_cache", "can_df", "can_multi_conn")}


def sizes_of(h):
    return [h.get_block_size(k) for k in (nbd.SIZE_MINIMUM, nbd.SIZE_PREFERRED, nbd.SIZE_MAXIMUM)]


def extents(h, length, offset, flags=0):
    got = {}

    def cb(ctx, off, ents, err):
        got.setdefault(ctx, []).append([off] + list(ents))
        return 0
    h.block_status(length, offset, cb, flags)
    return got


def chunks(h, length, offset, flags=0):
    got = []

    def cb(buf, off, status, err):
        kind = {nbd.READ_DATA: "data", nbd.READ_HOLE: "hole", nbd.READ_ERROR: "error"}[status]
        got.append([kind, off, len(buf), len(set(buf))])
        return 0
    h.pread_structured(length, offset, cb, flags)
    return got


# ---- cases: each returns what a client observes -----------------------------------------------------------

def case_opt_list(s):
    h = s.handle(opt_mode=True)
    got = []
    n = h.opt_list(lambda name, desc: got.append([name, desc]) or 0)
    h.opt_abort()
    got.sort()
    assert [g[0] for g in got] == ["disk0", "ro", "small"] and n == 3, got
    return got


def case_opt_info(s):
    h = s.handle(opt_mode=True)
    out = {}
    for name in ("disk0", "ro", "small", "missing", ""):
        h.set_export_name(name)
        r = attempt(h.opt_info)
        if r[0] == "ok":
            r = ["ok", h.get_size(), flags_of(h), sizes_of(h), h.get_structured_replies_negotiated()]
        out[name] = r
    h.opt_abort()
    assert out["missing"] == ["err", "ENOENT"], out
    assert out["ro"][2]["is_read_only"] and not out["disk0"][2]["is_read_only"], out
    return out


def case_opt_go_missing_then_good(s):
    h = s.handle(name="missing", opt_mode=True)
    bad = attempt(h.opt_go)
    h.set_export_name("ro")
    good = attempt(h.opt_go)
    out = [bad, good[0], h.get_size(), h.is_read_only(), attempt(h.pread, 512, 1 * MiB)[0]]
    h.shutdown()
    assert bad == ["err", "ENOENT"] and good[0] == "ok", out
    return out


def case_list_meta_context(s):
    out = {}
    queries = {
        "all": [], "base:allocation": ["base:allocation"], "base:": ["base:"], "qemu:": ["qemu:"],
        "depth": ["qemu:allocation-depth"], "bitmap-x": ["qemu:dirty-bitmap:x"], "bitmap-ns": ["qemu:dirty-bitmap:"],
        "unknown": ["nope:nope", "x"], "mixed": ["qemu:allocation-depth", "base:allocation", "foo:bar"],
    }
    for export in ("disk0", "ro"):
        for label, q in queries.items():
            h = s.handle(name=export, opt_mode=True, contexts=q)
            got = []
            r = attempt(h.opt_list_meta_context, lambda ctx: got.append(ctx) or 0)
            out[f"{export}/{label}"] = [r[0], sorted(got)]
            h.opt_abort()
    assert out["disk0/all"][1] == ["base:allocation", "qemu:allocation-depth"], out
    assert out["ro/all"][1] == ["base:allocation"], out
    assert out["disk0/unknown"][1] == [] and out["disk0/bitmap-x"][1] == [], out
    return out


def case_set_meta_context_via_go(s):
    out = {}
    wanted = ["base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:x", "nope:nope"]
    for export in ("disk0", "ro"):
        h = s.handle(name=export, opt_mode=True, contexts=wanted)
        go = attempt(h.opt_go)
        out[export] = [go[0]] + [h.can_meta_context(c) for c in wanted]
        h.shutdown()
    assert out["disk0"] == ["ok", True, True, False, False], out
    assert out["ro"] == ["ok", True, False, False, False], out
    return out


def case_structured_off(s):
    h = s.handle(structured=False, contexts=["base:allocation"])
    out = {
        "structured": h.get_structured_replies_negotiated(),
        "can_df": h.can_df(),
        "meta": h.can_meta_context("base:allocation"),
        "pread": len(h.pread(4096, 1 * MiB)),
        "chunks": chunks(h, 131072, 0),
        "block_status": attempt(extents, h, 4096, 0),
    }
    h.shutdown()
    # Without structured replies a read is one data chunk, and there are no contexts.
    assert out["structured"] is False and out["meta"] is False and len(out["chunks"]) == 1, out
    return out


def case_structured_on_opt_mode(s):
    h = s.handle(opt_mode=True, structured=False)
    # Listing contexts needs structured replies negotiated (libnbd refuses without them, or the server does).
    r = attempt(h.opt_list_meta_context, lambda ctx: 0)
    go = attempt(h.opt_go)
    out = [r, go[0], h.get_structured_replies_negotiated()]
    h.shutdown()
    return out


def case_out_of_range(s):
    h = s.handle(strict=False)
    out = {}
    for label, fn, args in (
            ("read-past-end", h.pread, (4096, SIZE)),
            ("read-straddle", h.pread, (8192, SIZE - 4096)),
            ("read-huge-offset", h.pread, (512, 1 << 62)),
            ("write-past-end", h.pwrite, (b"\0" * 512, SIZE)),
            ("zero-straddle", h.zero, (65536, SIZE - 4096)),
            ("trim-past-end", h.trim, (4096, SIZE + 4096)),
            ("cache-past-end", h.cache, (4096, SIZE)),
            ("status-past-end", extents, (h, 4096, SIZE)),
            ("read-bad-flag", h.pread, (512, 0, nbd.CMD_FLAG_NO_HOLE)),
            ("read-last-byte", h.pread, (1, SIZE - 1))):
        r = attempt(fn, *args)
        out[label] = r if r[0] == "err" else ["ok"]
    # The connection is still usable after the refusals.
    out["after"] = len(h.pread(512, 0))
    h.shutdown()
    for k in ("read-past-end", "read-straddle", "read-huge-offset", "write-past-end", "trim-past-end"):
        assert out[k] == ["err", "EINVAL"], (k, out)
    return out


def case_read_only_writes(s):
    h = s.handle(name="ro", strict=False)
    out = {
        "write": attempt(h.pwrite, b"x" * 4096, 0),
        "write-fua": attempt(h.pwrite, b"x" * 4096, 0, nbd.CMD_FLAG_FUA),
        "zero": attempt(h.zero, 4096, 0),
        "trim": attempt(h.trim, 4096, 0),
        "flush": attempt(h.flush),
        "cache": attempt(h.cache, 4096, 0),
    }
    out["data-unchanged"] = set(h.pread(4096, 0)) == {0}
    h.shutdown()
    for k in ("write", "write-fua", "zero", "trim"):
        assert out[k][0] == "err", (k, out)
    assert out["data-unchanged"], out
    return out


def case_write_commands_with_flags(s):
    h = s.handle(contexts=["base:allocation"])
    out = {
        "write-fua": attempt(h.pwrite, b"\x11" * 65536, 16 * MiB, nbd.CMD_FLAG_FUA),
        "flush": attempt(h.flush),
        "zero": attempt(h.zero, 65536, 16 * MiB),
        "zero-fua": attempt(h.zero, 65536, 17 * MiB, nbd.CMD_FLAG_FUA),
        "zero-no-hole": attempt(h.zero, 65536, 18 * MiB, nbd.CMD_FLAG_NO_HOLE),
        "zero-fast": attempt(h.zero, 65536, 1 * MiB, nbd.CMD_FLAG_FAST_ZERO),
        "zero-fast-no-hole": attempt(h.zero, 65536, 20 * MiB, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE),
        "trim": attempt(h.trim, 65536, 2 * MiB),
        "trim-fua": attempt(h.trim, 65536, 2 * MiB + 65536, nbd.CMD_FLAG_FUA),
        "cache": attempt(h.cache, 1 * MiB, 0),
        "flush-again": attempt(h.flush),
    }
    out["read-zeroed"] = sorted(set(h.pread(65536, 16 * MiB)))
    out["read-trimmed"] = sorted(set(h.pread(131072, 2 * MiB)))
    out["map"] = extents(h, 24 * MiB, 0)
    h.shutdown()
    # A trim is advisory (the qcow2 node keeps discard=ignore): only the zeroed range must read as zeroes.
    assert out["read-zeroed"] == [0], out
    return out


def case_block_status_req_one(s):
    h = s.handle(contexts=["base:allocation", "qemu:allocation-depth"])
    out = {}
    for label, length, off in (("start", 4 * MiB, 0), ("data", 4 * MiB, 1 * MiB), ("zero", 2 * MiB, 8 * MiB),
                               ("tail", 1 * MiB, SIZE - 1 * MiB), ("short", 512, 1 * MiB + 512)):
        out[label] = extents(h, length, off)
        out[label + "/req-one"] = extents(h, length, off, nbd.CMD_FLAG_REQ_ONE)
    h.shutdown()
    for k, v in out.items():
        if k.endswith("/req-one"):
            for ctx, calls in v.items():
                # One extent (a length and flags pair) per context.
                assert all(len(c) == 3 for c in calls), (k, ctx, calls)
    assert out["data"]["base:allocation"][0][1:3] == [2 * MiB, 0], out["data"]
    return out


# blockd asks for block status only for structured reads of at least 64 KiB (a smaller read goes out as
# one data chunk, by design: nbd_connection.cpp's sparse_read_min); QEMU looks for holes in every read.
SPARSE_READ_MIN = 64 * 1024


def case_pread_structured_chunks(s):
    h = s.handle()
    out = {}
    for label, length, off in (("hole-small", 4096, 32 * MiB), ("hole-large", 256 * 1024, 32 * MiB),
                               ("data-large", 256 * 1024, 1 * MiB), ("across", 512 * 1024, 3 * MiB - 256 * 1024),
                               ("zeroed", 128 * 1024, 8 * MiB), ("across-small", 8192, 1 * MiB - 4096)):
        for suffix, flags in (("", 0), ("/df", nbd.CMD_FLAG_DF)):
            got = chunks(h, length, off, flags)
            # The chunks tile the range in order, whatever their kinds.
            pos = off
            for c in got:
                assert c[1] == pos and c[2] > 0, (label, got)
                pos += c[2]
            assert pos == off + length, (label, got)
            if suffix == "/df":
                assert len(got) == 1 and got[0][0] == "data", (label, got)
            if length < SPARSE_READ_MIN and not flags:
                got = ["tiled", length]
            if label.startswith("across"):
                # A range over data and a hole: QEMU splits it into data and hole chunks, blockd sends
                # one data chunk (zeroes included). Both are valid replies; the tiling is checked above.
                got = ["tiled", length]
            out[label + suffix] = got
    h.shutdown()
    return out


def case_zero_length_requests(s):
    out = {}
    for structured in (True, False):
        for label, fn, args in (("read@0", "pread", (0, 0)), ("read@end", "pread", (0, SIZE)),
                                ("read@0-df", "pread", (0, 0, nbd.CMD_FLAG_DF)), ("write", "pwrite", (b"", 0)),
                                ("zero", "zero", (0, 0)), ("trim", "trim", (0, 0)), ("cache", "cache", (0, 0)),
                                ("flush", "flush", ())):
            h = s.handle(strict=False, structured=structured)
            r = attempt(getattr(h, fn), *args)
            # Whether the connection survived: libnbd drops it on a reply it finds malformed.
            out[f"{'structured' if structured else 'simple'}/{label}"] = [
                r[0] if r[0] == "ok" else r, attempt(h.pread, 512, 0)[0]]
            attempt(h.shutdown)
            del h
    for k, v in out.items():
        assert v[1] == "ok", (k, out)
    return out


CASES = [(n[5:], f) for n, f in sorted(globals().items()) if n.startswith("case_")]


def collect(binary, tmp):
    s = Server(binary, tmp)
    results = []
    try:
        for name, fn in CASES:
            try:
                results.append((name, fn(s)))
            except Exception:
                results.append((name, {"exception": traceback.format_exc().strip().split("\n")[-1],
                                       "trace": traceback.format_exc()}))
    finally:
        rc = s.stop()
        results.append(("clean-exit", rc == 0))
    return results


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--blockd", required=True)
    ap.add_argument("--qsd", default="qemu-storage-daemon")
    ap.add_argument("--only", help="run the cases whose name contains this")
    a = ap.parse_args()
    global CASES
    if a.only:
        CASES = [(n, f) for n, f in CASES if a.only in n]
    have_qsd = shutil.which(a.qsd) is not None
    t1, t2 = tempfile.mkdtemp(prefix="nbdsh-qsd-"), tempfile.mkdtemp(prefix="nbdsh-blockd-")
    try:
        want = collect(a.qsd, t1) if have_qsd else None
        got = collect(a.blockd, t2)
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
    if not have_qsd:
        print("(no qemu-storage-daemon: blockd's results were checked, not compared)")
    print(f"{len(got) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

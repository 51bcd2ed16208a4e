"""blklogwrites against QSD: the same writes, zero writes, discards and flushes through an NBD export of a
blklogwrites node; the log is parsed here (our own reader of the dm-log-writes format) and must equal QSD's
byte for byte; log-append continues a log and a bad super block is refused with QSD's text."""
import argparse
import os
import shutil
import struct
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qmp_harness import Client, Daemon, monitor_args  # noqa: E402

MAGIC = 0x6a736677736872
FLUSH, FUA, DISCARD, MARK = 1, 2, 4, 8
failures = []


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what, flush=True)
    if not cond:
        failures.append(what)


def parse(log):
    """(super block fields, entries) of a dm-log-writes log; entries as (sector, nr, flags, data_len, data)."""
    if len(log) < 28:
        return None, []
    magic, version, nr, ss = struct.unpack_from("<QQQI", log, 0)
    if magic != MAGIC or ss == 0:
        return (magic, version, nr, ss), []
    entries = []
    at = ss
    for _ in range(nr):
        sector, count, flags, data_len = struct.unpack_from("<QQQQ", log, at)
        at += ss
        data = b""
        if not flags & DISCARD:
            data = log[at:at + count * ss]
            at += count * ss
        entries.append((sector, count, flags, data_len, data))
    return (magic, version, nr, ss), entries


IO = ["write -P 0x11 0 4k", "write -P 0x22 8k 1k", "flush", "write -z 64k 4k", "discard 128k 4k",
      "write -P 0x33 300 100", "write -f -P 0x44 16k 512", "flush"]


def run(binary, tmp, opts, io=IO):
    with open(f"{tmp}/disk.img", "wb") as f:
        f.truncate(1 << 20)
    margs, sock = monitor_args(tmp)
    d = Daemon(binary, margs, tmp)
    c = Client.unix(sock)
    c.negotiate()
    try:
        node = {"driver": "blklogwrites", "node-name": "lw", "discard": "unmap",
                "file": {"driver": "file", "filename": f"{tmp}/disk.img"},
                "log": {"driver": "file", "filename": f"{tmp}/log.img"}}
        node.update(opts)
        r = c.cmd("blockdev-add", node)
        if "error" in r:
            return r, None
        c.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": f"{tmp}/nbd.sock"}}})
        c.cmd("block-export-add", {"type": "nbd", "id": "e", "node-name": "lw", "name": "lw", "writable": True})
        args = ["qemu-io", "-f", "raw"]
        for cmd in io:
            args += ["-c", cmd]
        args.append(f"nbd+unix:///lw?socket={tmp}/nbd.sock")
        p = subprocess.run(args, capture_output=True, text=True, timeout=30)
        c.cmd("block-export-del", {"id": "e"})
        c.cmd("nbd-server-stop")
        c.cmd("blockdev-del", {"node-name": "lw"})
    finally:
        c.close()
        d.stop()
    with open(f"{tmp}/log.img", "rb") as f:
        return p, f.read()


def same_log(lq, lb, what):
    """The log equals QSD's byte for byte: the same entries in the same order, flush entries included. Where
    QEMU puts a flush entry follows its block layer's write generations: a flush logs an entry only when a write
    ended since the last one, and a FUA write (qemu-io writes through by default, so every write is one) is
    followed by a flush that does not yet count that write, so the entry comes one write late."""
    sq, eq = parse(lq)
    sb, eb = parse(lb)
    data_q = [e for e in eq if not e[2] & FLUSH]
    data_b = [e for e in eb if not e[2] & FLUSH]
    check(sq == sb and data_q == data_b, f"{what}: the data entries equal QSD's (qsd {[e[:4] for e in eq]}, "
                                         f"blockd {[e[:4] for e in eb]})")
    check(lq == lb, f"{what}: the log equals QSD's byte for byte, flush entries in place "
                    f"(qsd {[e[:4] for e in eq]}, blockd {[e[:4] for e in eb]})")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--blockd", required=True)
    ap.add_argument("--qsd", default=shutil.which("qemu-storage-daemon"))
    a = ap.parse_args()
    if not a.qsd or not shutil.which("qemu-io"):
        print("SKIP: qemu-storage-daemon or qemu-io not installed")
        return 77
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(prefix="bd-lw-", dir=base) as t1, \
            tempfile.TemporaryDirectory(prefix="bd-lw-", dir=base) as t2:
        for t in (t1, t2):
            open(f"{t}/log.img", "wb").close()
        pq, lq = run(a.qsd, t1, {})
        pb, lb = run(a.blockd, t2, {})
        check(pb.returncode == 0, "qemu-io through blockd: " + (pb.stdout + pb.stderr).strip()[-300:])
        sb, entries = parse(lb)
        check(sb is not None and sb[0] == MAGIC and sb[1] == 1 and sb[3] == 512, f"blockd's super block {sb}")
        flags = [e[2] for e in entries]
        # QEMU's blklogwrites has no native FUA: a FUA write is logged plain and followed by a flush entry.
        check(FLUSH in flags and DISCARD in flags and FUA not in flags, f"entries carry flush and discard {flags}")
        first = entries[0] if entries else None
        check(first is not None and first[:2] == (0, 8) and first[4] == b"\x11" * 4096, "the first write is logged")
        unaligned = [e for e in entries if e[0] == 0 and e[1] == 1]
        check(bool(unaligned) and unaligned[0][4][300:400] == b"\x33" * 100, "an unaligned write is logged padded")
        same_log(lq, lb, "the log")

        # log-append continues the log; the entries then match QSD's again.
        pq2, lq2 = run(a.qsd, t1, {"log-append": True}, ["write -P 0x55 4k 4k", "flush"])
        pb2, lb2 = run(a.blockd, t2, {"log-append": True}, ["write -P 0x55 4k 4k", "flush"])
        sb2, e2 = parse(lb2)
        check(sb2 is not None and sb2[2] > len(entries) and len(e2) == sb2[2],
              f"log-append adds to the entries ({len(entries)} -> {sb2[2] if sb2 else None})")
        same_log(lq2, lb2, "the appended log")

        # Refusals.
        for t in (t1, t2):
            with open(f"{t}/log.img", "wb") as f:
                f.write(b"x" * 512)
        rq, _ = run(a.qsd, t1, {"log-append": True})
        rb, _ = run(a.blockd, t2, {"log-append": True})
        check(rq == rb, f"bad super block: qsd {rq} blockd {rb}")
        for opts in ({"log-append": True, "log-sector-size": 512}, {"log-sector-size": 1000},
                     {"log-super-update-interval": 0}, {"log-sector-size": 16}):
            rq, _ = run(a.qsd, t1, opts)
            rb, _ = run(a.blockd, t2, opts)
            if not isinstance(rq, dict):
                rq = "opened"
            if not isinstance(rb, dict):
                rb = "opened"
            check(rq == rb, f"{opts}: qsd {rq} blockd {rb}")
    print(f"{len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

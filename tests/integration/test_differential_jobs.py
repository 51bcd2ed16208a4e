#!/usr/bin/env python3
"""Differential job tests: the same QMP conversation with qemu-storage-daemon and with blockd (blockdev-create,
x-blockdev-amend, the job-* verbs, query-jobs, quit with jobs). The replies must be byte-identical after normalizing
timestamps and the work directory, and so must the JOB_STATUS_CHANGE sequence. Where an asynchronous event lands
relative to the return of the command that started the job is timing (QSD returns before or after a failing create's
events depending on where the failure happens), so replies and events are compared as two sequences; test_jobs.py
checks blockd's own order."""
import argparse
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qmp_harness import Daemon, monitor_args  # noqa: E402

DEADLINE = 60.0
TS_RE = re.compile(rb'"seconds": \d+, "microseconds": \d+')


def ex(cmd, args=None, id=None):
    req = {"execute": cmd}
    if args is not None:
        req["arguments"] = args
    if id is not None:
        req["id"] = id
    return ("cmd", json.dumps(req))


def create(job, options, id=None):
    return ex("blockdev-create", {"job-id": job, "options": options}, id)


def wait(job, status):
    return ("wait", job, status)


def amend(job, node, options, id=None, **kw):
    return ex("x-blockdev-amend", dict({"job-id": job, "node-name": node, "options": options}, **kw), id)


W = "WORKDIR"
FILE = lambda name, size=0, **kw: dict({"driver": "file", "filename": f"{W}/{name}", "size": size}, **kw)  # noqa: E731

CASES = [
    ("T75 create file, query-jobs, dismiss; qcow2 on a node; amend", "", [
        create("c1", FILE("new.qcow2"), 2), wait("c1", "concluded"), ex("query-jobs", None, 3),
        ex("job-dismiss", {"id": "c1"}, 4),
        ex("blockdev-add", {"driver": "file", "node-name": "proto", "filename": f"{W}/new.qcow2"}, 1),
        create("c2", {"driver": "qcow2", "file": "proto", "size": 67108864}, 5), wait("c2", "concluded"),
        ex("query-jobs", None, 6), ex("job-dismiss", {"id": "c2"}, 7),
        ex("blockdev-add", {"driver": "qcow2", "node-name": "q", "file": "proto"}, 8),
        amend("a1", "q", {"driver": "qcow2"}, 9), wait("a1", "concluded"),
        amend("a2", "q", {"driver": "qcow2", "encrypt": {"format": "luks", "state": "active"}}, 10),
        wait("a2", "concluded"), amend("a3", "q", {"driver": "qcow2", "encrypt": {"format": "qcow"}}, 11),
        wait("a3", "concluded"), amend("a1", "q", {"driver": "qcow2"}, 12), ex("query-jobs", None, 13),
        ex("job-dismiss", {"id": "a1"}, 14), ex("job-dismiss", {"id": "a2"}, 15), ex("job-dismiss", {"id": "a3"}, 16),
        ex("blockdev-del", {"node-name": "q"}, 17), ex("query-jobs", None, 18),
        create("c3", {"driver": "qcow2", "file": "nope", "size": 1048576}, 19), wait("c3", "concluded"),
        create("c4", {"driver": "qcow2", "file": "proto", "size": 1048576}, 20), wait("c4", "concluded"),
        ex("query-jobs", None, 21)]),
    ("T76 failing creates, verbs refused in concluded", "", [
        create("c3", {"driver": "file", "filename": "/nonexistent/dir/x.img", "size": 0}, 7), wait("c3", "concluded"),
        ex("query-jobs", None, 8), ex("job-complete", {"id": "c3"}, 9), ex("job-finalize", {"id": "c3"}, 10),
        ex("job-pause", {"id": "c3"}, 11), ex("job-cancel", {"id": "c3"}, 12), ex("job-resume", {"id": "c3"}, 13),
        ex("job-dismiss", {"id": "c3"}, 14), ex("job-dismiss", {"id": "c3"}, 15),
        create("f1", FILE("m.img", 1000, preallocation="metadata"), 16), wait("f1", "concluded"),
        create("f2", FILE("m.img", -1), 17), wait("f2", "concluded"),
        create("f3", FILE("m.img", -1, preallocation="full"), 18), wait("f3", "concluded"),
        create("f4", FILE("m.img", 4096, **{"extent-size-hint": -1}), 19), wait("f4", "concluded"),
        create("f5", FILE("m.img", 4096, **{"extent-size-hint": 5000000000}), 20), wait("f5", "concluded"),
        create("f6", {"driver": "file", "filename": W, "size": 0}, 21), wait("f6", "concluded"),
        ex("query-jobs", None, 22)]),
    ("file creation options", "", [
        create("p1", FILE("off.img", 1048576), 1), wait("p1", "concluded"),
        create("p2", FILE("falloc.img", 1000, preallocation="falloc"), 2), wait("p2", "concluded"),
        create("p3", FILE("full.img", 100000, preallocation="full", **{"extent-size-hint": 4096}), 3),
        wait("p3", "concluded"),
        create("p4", FILE("opts.img", 4096, nocow=True, **{"extent-size-hint": 0}), 4), wait("p4", "concluded"),
        create("p5", FILE("off.img", 512), 5), wait("p5", "concluded"), ex("query-jobs", None, 6)]),
    ("refusals before a job exists", "", [
        create("1bad", FILE("a.img"), 1), create("", FILE("a.img"), 2),
        ex("blockdev-create", {"options": FILE("a.img")}, 3),
        create("c2", {"driver": "raw"}, 4), create("c2", {"driver": "null-co"}, 5),
        create("c2", {"driver": "raw", "file": "x"}, 6), create("c2", {"driver": "blkreplay"}, 7),
        create("c2", FILE("a.img", preallocation="some"), 8), create("c2", {"driver": "file", "size": 0}, 9),
        create("c2", {"driver": "file", "filename": "x", "size": "1"}, 10),
        create("c1", FILE("a.img"), 11), wait("c1", "concluded"), create("c1", FILE("a.img"), 12),
        create("1bad", {"driver": "raw"}, 13),
        ex("blockdev-add", {"driver": "file", "node-name": "f0", "filename": f"{W}/a.img"}, 14),
        amend("a1", "nope", {"driver": "qcow2"}, 15), amend("a1", "f0", {"driver": "blkreplay"}, 16),
        amend("a1", "f0", {"driver": "qcow2"}, 17), amend("a1", "f0", {"driver": "file"}, 18),
        amend("1bad", "f0", {"driver": "file"}, 19), amend("c1", "f0", {"driver": "raw"}, 20),
        amend("a1", "f0", {"driver": "file", "x": 1}, 21), amend("a1", "f0", {"driver": "qcow2", "encrypt": 1}, 22),
        ex("x-blockdev-amend", {"job-id": "a1", "node-name": "f0"}, 23),
        ex("job-pause", {"id": "nope"}, 24), ex("job-resume", {"id": "nope"}, 25),
        ex("job-cancel", {"id": "nope"}, 26), ex("job-complete", {"id": "nope"}, 27),
        ex("job-finalize", {"id": "nope"}, 28), ex("job-dismiss", {"id": "nope"}, 29),
        ex("job-dismiss", {}, 30), ex("query-jobs", {"x": 1}, 31), ex("query-jobs", None, 32)]),
    # QSD cannot stop a full preallocation early: it writes the whole file before the cancel shows.
    ("verbs while a create runs, cancel", "disk", [
        create("c1", FILE("big.img", 2 << 30, preallocation="full"), 1), ex("query-jobs", None, 2),
        ex("job-pause", {"id": "c1"}, 3), ex("job-pause", {"id": "c1"}, 4), ex("job-complete", {"id": "c1"}, 5),
        ex("job-finalize", {"id": "c1"}, 6), ex("job-dismiss", {"id": "c1"}, 7), ex("job-resume", {"id": "c1"}, 8),
        ex("job-resume", {"id": "c1"}, 9), ex("job-pause", {"id": "c1"}, 10), ex("query-jobs", None, 11),
        ex("job-cancel", {"id": "c1"}, 12), ex("job-resume", {"id": "c1"}, 13), wait("c1", "concluded"),
        ex("query-jobs", None, 14), ex("job-cancel", {"id": "c1"}, 15), ex("job-dismiss", {"id": "c1"}, 16)]),
    ("quit dismisses concluded jobs first", "", [
        create("c0", FILE("a.img"), 1), wait("c0", "concluded"), create("c1", FILE("b.img"), 2),
        wait("c1", "concluded"), ex("job-dismiss", {"id": "c0"}, 3), create("c2", FILE("c.img"), 4),
        wait("c2", "concluded"), ex("quit", None, "bye")]),
]


class Conn:
    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(DEADLINE)
        self.s.connect(path)
        self.buf = b""
        self.lines = []

    def line(self):
        while b"\r\n" not in self.buf:
            chunk = self.s.recv(65536)
            if not chunk:
                raise EOFError
            self.buf += chunk
        raw, self.buf = self.buf.split(b"\r\n", 1)
        self.lines.append(raw)
        return json.loads(raw)


def play(binary, tmp, steps):
    args, path = monitor_args(tmp, "m0")
    d = Daemon(binary, args, tmp)
    try:
        c = Conn(path)
        c.line()
        c.s.sendall(b'{"execute": "qmp_capabilities"}\n')
        c.line()
        c.lines.clear()
        seen = []
        for step in steps:
            if step[0] == "cmd":
                c.s.sendall(step[1].replace(W, tmp).encode() + b"\n")
                while True:
                    try:
                        msg = c.line()
                    except EOFError:
                        break
                    if "event" in msg:
                        seen.append(msg["data"])
                        continue
                    break
            else:
                _, job, status = step
                end = time.monotonic() + DEADLINE
                while {"id": job, "status": status} not in seen:
                    if time.monotonic() > end:
                        raise AssertionError(f"{binary}: no {status} for {job}")
                    msg = c.line()
                    if "event" in msg:
                        seen.append(msg["data"])
                seen.clear()
        if steps[-1][1].startswith('{"execute": "quit"'):
            try:
                while True:
                    c.line()
            except (EOFError, OSError):
                pass
        c.s.close()
        return [TS_RE.sub(b"<TS>", x).replace(tmp.encode(), b"WORKDIR") for x in c.lines]
    finally:
        d.stop()


def split(lines):
    replies = [x for x in lines if not x.startswith(b'{"timestamp"')]
    events = [x for x in lines if x.startswith(b'{"timestamp"')]
    return replies, events


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--blockd", required=True)
    ap.add_argument("--qsd", default=shutil.which("qemu-storage-daemon"))
    ap.add_argument("-k", default="")
    a = ap.parse_args()
    if not a.qsd:
        print("SKIP: qemu-storage-daemon not installed; nothing to compare against")
        print("0 passed, 0 failed")
        return 77  # ctest: skipped (SKIP_RETURN_CODE)
    passed = failed = 0
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    for name, where, steps in CASES:
        if a.k not in name:
            continue
        # A long preallocation goes to a disk-backed directory, not to memory.
        base = None if where == "disk" else shm
        with tempfile.TemporaryDirectory(prefix="bd-jq-", dir=base) as t1, \
                tempfile.TemporaryDirectory(prefix="bd-jb-", dir=base) as t2:
            want = split(play(a.qsd, t1, steps))
            got = split(play(a.blockd, t2, steps))
        if want == got:
            passed += 1
            print("PASS", name, flush=True)
            continue
        failed += 1
        print("FAIL", name, flush=True)
        for what, w, g in (("replies", want[0], got[0]), ("events", want[1], got[1])):
            for i in range(max(len(w), len(g))):
                wl = w[i] if i < len(w) else b"<none>"
                gl = g[i] if i < len(g) else b"<none>"
                if wl != gl:
                    print(f"   {what} #{i} qsd:   ", wl[:300])
                    print(f"   {what} #{i} blockd:", gl[:300])
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

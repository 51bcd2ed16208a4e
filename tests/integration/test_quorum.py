"""quorum against QSD: three raw children, one corrupted behind the daemon's back; an NBD read returns the
majority data and QUORUM_REPORT_BAD names the bad child with QSD's data; no majority gives QUORUM_FAILURE;
open refusals and x-blockdev-change (add, remove, every refusal) answer as QSD does."""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qmp_harness import Client, Daemon, monitor_args  # noqa: E402

SIZE = 1 << 20
failures = []


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what, flush=True)
    if not cond:
        failures.append(what)


class EvClient(Client):
    """A QMP client that keeps the events it reads instead of dropping them."""

    def __init__(self, sock):
        super().__init__(sock)
        self.events = []

    def cmd(self, name, args=None, id=None):
        req = {"execute": name}
        if args is not None:
            req["arguments"] = args
        self.send(json.dumps(req) + "\n")
        while True:
            msg = self.line()
            if "event" in msg:
                self.events.append(msg)
            else:
                return msg

    def wait_event(self, name, deadline=5.0):
        end = time.monotonic() + deadline
        while True:
            for i, e in enumerate(self.events):
                if e["event"] == name:
                    return self.events.pop(i)
            left = end - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                msg = self.line()
            except (TimeoutError, OSError):
                return None
            finally:
                self.sock.settimeout(10)
            if "event" in msg:
                self.events.append(msg)


def child(tmp, i, name=True):
    c = {"driver": "raw", "file": {"driver": "file", "filename": f"{tmp}/d{i}.img"}}
    if name:
        c["node-name"] = f"c{i}"
    return c


def start(binary, tmp):
    for i in range(5):
        with open(f"{tmp}/d{i}.img", "wb") as f:
            f.write(b"\x5a" * SIZE)
    margs, sock = monitor_args(tmp)
    d = Daemon(binary, margs, tmp)
    c = EvClient.unix(sock)
    c.negotiate()
    return d, c


def nbd_read(tmp, export, pattern_hex, length=65536):
    url = f"nbd+unix:///{export}?socket={tmp}/nbd.sock"
    r = subprocess.run(["qemu-io", "-r", "-f", "raw", "-c", f"read -P {pattern_hex} 0 {length}", url],
                       capture_output=True, text=True, timeout=30)
    return r.returncode == 0 and "verification failed" not in r.stdout and "failed" not in r.stdout.lower(), \
        r.stdout + r.stderr


def scenario_read(binary, tmp):
    """Majority read with one corrupted child; then no majority at all."""
    d, c = start(binary, tmp)
    out = {}
    try:
        r = c.cmd("blockdev-add", {"driver": "quorum", "node-name": "q", "vote-threshold": 2,
                                   "children": [child(tmp, 0), child(tmp, 1), child(tmp, 2)]})
        out["add"] = r
        c.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": f"{tmp}/nbd.sock"}}})
        out["export"] = c.cmd("block-export-add", {"type": "nbd", "id": "e", "node-name": "q", "name": "q"})
        # Behind the daemon's back: child 2's first 4 KiB become garbage.
        with open(f"{tmp}/d2.img", "r+b") as f:
            f.write(b"\xee" * 4096)
        out["read_ok"], out["read_log"] = nbd_read(tmp, "q", "0x5a")
        ev = c.wait_event("QUORUM_REPORT_BAD")
        out["bad"] = ev["data"] if ev else None
        # A second corruption makes every child differ in the first sector: no quorum. The event
        # rate limit (1/s per key) holds QUORUM_REPORT_BAD events; QUORUM_FAILURE has its own key.
        with open(f"{tmp}/d1.img", "r+b") as f:
            f.write(b"\x11" * 512)
        ok, log = nbd_read(tmp, "q", "0x5a", 512)
        out["noquorum_failed"] = not ok
        ev = c.wait_event("QUORUM_FAILURE")
        out["failure"] = ev["data"] if ev else None
        names = sorted(("#auto" if n["node-name"].startswith("#") else n["node-name"], n["drv"])
                       for n in c.cmd("query-named-block-nodes")["return"])
        out["nodes"] = names
        g = c.cmd("x-debug-query-block-graph")["return"]
        ids = {n["id"]: n["name"] for n in g["nodes"]}
        out["edges"] = sorted((ids[e["parent"]], e["name"], ids[e["child"]]) for e in g["edges"] if ids[e["parent"]] == "q")
        c.cmd("block-export-del", {"id": "e"})
    finally:
        c.close()
        d.stop()
    return out


REFUSALS = [
    {"vote-threshold": 3, "n": 2},
    {"vote-threshold": 0, "n": 2},
    {"vote-threshold": 1, "n": 0},
    {"vote-threshold": 2, "n": 3, "blkverify": True},
    {"vote-threshold": 1, "n": 2, "blkverify": True},
    {"vote-threshold": 2, "n": 2, "blkverify": True, "rewrite-corrupted": True},
    {"vote-threshold": 1, "n": 2, "read-pattern": "fifo", "rewrite-corrupted": True},
    {"vote-threshold": 2, "n": 2, "read-pattern": "fifo", "blkverify": True},
    {"vote-threshold": 1, "n": 2, "read-pattern": "bogus"},
    {"vote-threshold": 1, "n": 1, "names": ["nope"]},
]


def scenario_control(binary, tmp):
    """Open refusals, then x-blockdev-change on a quorum of two."""
    d, c = start(binary, tmp)
    out = []
    try:
        for k, case in enumerate(REFUSALS):
            case = dict(case)
            n = case.pop("n")
            kids = case.pop("names", None) or [child(tmp, i, name=False) for i in range(n)]
            args = {"driver": "quorum", "node-name": f"r{k}", "children": kids}
            args.update(case)
            r = c.cmd("blockdev-add", args)
            out.append(("open", json.dumps(case, sort_keys=True), r))
            if "return" in r:
                c.cmd("blockdev-del", {"node-name": f"r{k}"})
        out.append(("add", c.cmd("blockdev-add", {"driver": "quorum", "node-name": "q", "vote-threshold": 1,
                                                   "children": [child(tmp, 0), child(tmp, 1)]})))
        c.cmd("blockdev-add", dict(child(tmp, 3), **{"node-name": "n3"}))
        c.cmd("blockdev-add", {"driver": "raw", "node-name": "top4", "file": dict(child(tmp, 4), **{"node-name": "n4"})})
        steps = [
            {"parent": "q"},
            {"parent": "q", "child": "children.0", "node": "n3"},
            {"parent": "nope", "child": "children.0"},
            {"parent": "q", "child": "children.9"},
            {"parent": "q", "node": "nope"},
            {"parent": "q", "node": "n4"},       # already has a parent
            {"parent": "n3", "node": "q"},       # not a quorum
            {"parent": "top4", "child": "file"},  # not a quorum
            {"parent": "q", "node": "n3"},       # -> children.2
            {"parent": "q", "child": "children.1"},
            {"parent": "q", "child": "children.3"},
            {"parent": "q", "child": "children.0"},
            {"parent": "q", "child": "children.2"},  # would drop below the threshold
            {"parent": "q", "node": "n3"},       # still its child
        ]
        for s in steps:
            out.append(("change", json.dumps(s, sort_keys=True), c.cmd("x-blockdev-change", s)))
            g = c.cmd("x-debug-query-block-graph")["return"]
            ids = {n["id"]: n["name"] for n in g["nodes"]}
            out.append(("children", sorted((e["name"], ids[e["child"]]) for e in g["edges"]
                                           if ids[e["parent"]] == "q")))
        out.append(("reopen", c.cmd("blockdev-reopen", {"options": [
            {"driver": "quorum", "node-name": "q", "vote-threshold": 1, "children": ["n3"]}]})))
        # The remaining child still serves reads.
        c.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": f"{tmp}/nbd.sock"}}})
        c.cmd("block-export-add", {"type": "nbd", "id": "e", "node-name": "q", "name": "q"})
        ok, log = nbd_read(tmp, "q", "0x5a", 4096)
        out.append(("read after change", ok))
    finally:
        c.close()
        d.stop()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--blockd", required=True)
    ap.add_argument("--qsd", default=shutil.which("qemu-storage-daemon"))
    a = ap.parse_args()
    if not a.qsd or not shutil.which("qemu-io"):
        print("SKIP: qemu-storage-daemon or qemu-io not installed")
        return 77
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    results = {}
    for who, binary in (("qsd", a.qsd), ("blockd", a.blockd)):
        for name, fn in (("read", scenario_read), ("control", scenario_control)):
            with tempfile.TemporaryDirectory(prefix=f"bd-quorum-{who}-", dir=base) as tmp:
                results[(who, name)] = fn(binary, tmp)

    q, b = results[("qsd", "read")], results[("blockd", "read")]
    check(b["add"] == {"return": {}} and b["export"] == {"return": {}}, f"blockd opens and exports the quorum {b['add']}")
    check(b["read_ok"], "blockd: the NBD read returns the majority data " + b["read_log"].strip()[-200:])
    check(q["read_ok"], "QSD: the NBD read returns the majority data")
    check(b["bad"] is not None and b["bad"].get("node-name") == "c2", f"blockd: QUORUM_REPORT_BAD names c2: {b['bad']}")
    check(b["bad"] == q["bad"], f"QUORUM_REPORT_BAD data as QSD's: qsd {q['bad']} blockd {b['bad']}")
    check(b["noquorum_failed"] and q["noquorum_failed"], "no majority: the read fails on both")
    check(b["failure"] is not None and b["failure"] == q["failure"],
          f"QUORUM_FAILURE data as QSD's: qsd {q['failure']} blockd {b['failure']}")
    check(b["edges"] == q["edges"], f"child roles as QSD's: qsd {q['edges']} blockd {b['edges']}")
    check(b["nodes"] == q["nodes"], f"named nodes as QSD's: qsd {q['nodes']} blockd {b['nodes']}")

    q, b = results[("qsd", "control")], results[("blockd", "control")]
    for wq, wb in zip(q, b):
        check(wq == wb, f"{wq[0]} {wq[1] if len(wq) > 2 else ''}: qsd {wq[-1]} blockd {wb[-1]}")
    check(len(q) == len(b), "same number of steps")
    print(f"{len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

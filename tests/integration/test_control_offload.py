"""Control work off the main loop: while a slow internal snapshot runs on an iothread, the main loop still answers
QMP on another monitor, accepts a new monitor and completes an NBD handshake to another export; block_resize and
the snapshot commands run as node tasks and leave images qemu-img check calls clean. Runs the test process only."""
import argparse
import json
import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qmp_harness import Client, Daemon, monitor_args, run_each  # noqa: E402

failures = []

# The snapshot must outlast many round trips on the other monitor: a qcow2 image whose every cluster is
# allocated (preallocation=metadata) takes one refcount update per cluster. 256 GiB of 64 KiB clusters are
# 4 Mi clusters: seconds of work for blockd on a small machine, 40 MiB of metadata on tmpfs.
IMAGE_SIZE = "256G"
# Round trips the other monitor must complete while the snapshot runs. A main loop that waits for the
# snapshot answers at most the few that arrive before the snapshot starts.
MIN_ROUND_TRIPS = 20


def check(cond, what, detail=""):
    print(("PASS " if cond else "FAIL ") + what + ("" if cond else "\n   " + str(detail)))
    if not cond:
        failures.append(what)


def run(cmd):
    return subprocess.run(cmd, capture_output=True, text=True)


def ready(c):
    """Whether a whole message from `c` is waiting (buffered or on the socket), without blocking."""
    if b"\r\n" in c.buf:
        return True
    r, _, _ = select.select([c.sock], [], [], 0)
    if r:
        chunk = c.sock.recv(65536)
        if not chunk:
            return True
        c.buf += chunk
    return b"\r\n" in c.buf


def reply_of(c):
    while True:
        msg = c.line()
        if "event" not in msg:
            return msg


def nbd_handshake(path, name):
    """A fixed-newstyle handshake up to the export's size (NBD_OPT_EXPORT_NAME); returns the size."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(path)

    def recv_exactly(n):
        out = b""
        while len(out) < n:
            chunk = s.recv(n - len(out))
            if not chunk:
                raise EOFError("NBD server closed the connection")
            out += chunk
        return out

    hello = recv_exactly(18)
    assert hello[:16] == b"NBDMAGICIHAVEOPT", hello
    s.sendall(struct.pack(">I", 1 | 2))  # FIXED_NEWSTYLE | NO_ZEROES
    s.sendall(b"IHAVEOPT" + struct.pack(">II", 1, len(name)) + name.encode())
    size, _flags = struct.unpack(">QH", recv_exactly(10))
    s.close()
    return size


def test_main_loop_serves_during_a_slow_snapshot(blockd, tmp):
    img = os.path.join(tmp, "big.qcow2")
    r = run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", img, IMAGE_SIZE])
    check(r.returncode == 0, "large preallocated qcow2 created", r.stderr)
    margs_a, path_a = monitor_args(tmp, "qmpa")
    margs_b, path_b = monitor_args(tmp, "qmpb")
    margs_c, path_c = monitor_args(tmp, "qmpc")  # nobody connects to it until the snapshot runs
    nbd = os.path.join(tmp, "nbd.sock")
    d = Daemon(blockd, margs_a + margs_b + margs_c + ["--object", "iothread,id=io1"], tmp)
    try:
        a = Client.unix(path_a)
        a.negotiate()
        b = Client.unix(path_b)
        b.negotiate()
        ok = lambda r: r.get("return") == {}  # noqa: E731
        check(ok(a.cmd("blockdev-add", {"driver": "qcow2", "node-name": "big",
                                        "file": {"driver": "file", "filename": img}})), "qcow2 node added")
        r = a.cmd("x-blockdev-set-iothread", {"node-name": "big", "iothread": "io1"})
        check(ok(r), "qcow2 node moved to iothread io1", r)
        # Another export, on the main loop, for the handshake.
        check(ok(a.cmd("blockdev-add", {"driver": "null-co", "node-name": "other", "size": 1 << 20})), "null node")
        check(ok(a.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": nbd}}})), "NBD server up")
        check(ok(a.cmd("block-export-add", {"type": "nbd", "id": "e0", "node-name": "other"})), "export on main")

        a.send(json.dumps({"execute": "blockdev-snapshot-internal-sync",
                           "arguments": {"device": "big", "name": "snap0"}}) + "\n")
        start = time.monotonic()
        round_trips = 0
        handshake_first = greeting_first = None
        version_ok = True
        while not ready(a):
            v = b.cmd("query-version")
            version_ok = version_ok and "qemu" in v.get("return", {})
            round_trips += 1
            if round_trips == 5:
                size = nbd_handshake(nbd, "other")
                handshake_first = size == 1 << 20 and not ready(a)
            if round_trips == 6:
                # A new monitor connection: accepted and greeted by the main loop.
                c = Client.unix(path_c)
                greeting_first = "QMP" in c.line() and not ready(a)
                c.close()
        snap = reply_of(a)
        took = time.monotonic() - start
        print(f"     snapshot took {took:.2f} s; {round_trips} query-version round trips on the other monitor meanwhile")
        check(snap.get("return") == {}, "internal snapshot of the large image", snap)
        check(version_ok, "query-version answers during the snapshot")
        check(round_trips >= MIN_ROUND_TRIPS,
              f"the other monitor completed at least {MIN_ROUND_TRIPS} round trips before the snapshot's reply",
              f"{round_trips} round trips")
        check(handshake_first is True, "an NBD handshake to another export completed before the snapshot's reply",
              handshake_first)
        check(greeting_first is True, "a new monitor was greeted before the snapshot's reply", greeting_first)

        # Queries show what the home published: the snapshot is listed, with its name checked from there.
        nodes = {n["node-name"]: n for n in a.cmd("query-named-block-nodes").get("return", [])}
        snaps = [s["name"] for s in nodes.get("big", {}).get("image", {}).get("snapshots", [])]
        check(snaps == ["snap0"], "query-named-block-nodes lists the new snapshot", snaps)
        r = a.cmd("blockdev-snapshot-internal-sync", {"device": "big", "name": "snap0"})
        check("already exists" in r.get("error", {}).get("desc", ""), "a second snapshot of that name is refused", r)
        r = a.cmd("blockdev-snapshot-delete-internal-sync", {"device": "big", "name": "snap0"})
        check(r.get("return", {}).get("name") == "snap0", "the snapshot deleted", r)
        r = a.cmd("blockdev-snapshot-delete-internal-sync", {"device": "big", "name": "snap0"})
        check("does not exist" in r.get("error", {}).get("desc", ""), "deleting it again is refused", r)
        # qcow2 cannot resize an image that has snapshots (QEMU's rule): resize between the two.
        r = a.cmd("block_resize", {"node-name": "big", "size": 257 << 30})
        check(ok(r), "block_resize of the node on io1", r)
        nodes = {n["node-name"]: n for n in a.cmd("query-named-block-nodes").get("return", [])}
        check(nodes.get("big", {}).get("image", {}).get("virtual-size") == 257 << 30,
              "the new size is what the query shows", nodes.get("big", {}).get("image"))
        r = a.cmd("blockdev-snapshot-internal-sync", {"device": "big", "name": "snap1"})
        check(ok(r), "a second snapshot after the resize", r)
        a.close()
        b.close()
    finally:
        rc = d.stop()
        check(rc == 0, "clean stop", f"exit {rc}: " + d.proc.stderr.read().decode()[-2000:])
    r = run(["qemu-img", "check", img])
    check(r.returncode == 0, "qemu-img check is clean after snapshots and resize done at home", r.stdout + r.stderr)
    r = run(["qemu-img", "snapshot", "-l", img])
    check("snap1" in r.stdout and "snap0" not in r.stdout, "qemu-img lists exactly the remaining snapshot", r.stdout)
    r = run(["qemu-img", "info", "--output=json", img])
    size = json.loads(r.stdout).get("virtual-size") if r.returncode == 0 else None
    check(size == 257 << 30, "qemu-img sees the resized image", r.stdout + r.stderr)


def test_blockdev_add_and_del_on_an_iothread(blockd, tmp):
    """A qcow2 node whose file lives on an iothread opens there and closes there (the header reads and the
    clean mark are I/O of that loop); the image stays consistent."""
    img = os.path.join(tmp, "small.qcow2")
    run(["qemu-img", "create", "-q", "-f", "qcow2", img, "64M"])
    margs, path = monitor_args(tmp)
    d = Daemon(blockd, margs + ["--object", "iothread,id=io1"], tmp)
    try:
        c = Client.unix(path)
        c.negotiate()
        ok = lambda r: r.get("return") == {}  # noqa: E731
        check(ok(c.cmd("blockdev-add", {"driver": "file", "node-name": "f0", "filename": img})), "file node")
        check(ok(c.cmd("x-blockdev-set-iothread", {"node-name": "f0", "iothread": "io1"})), "file node on io1")
        r = c.cmd("blockdev-add", {"driver": "qcow2", "node-name": "q0", "file": "f0"})
        check(ok(r), "qcow2 node opened over it (on io1)", r)
        r = c.cmd("blockdev-add", {"driver": "qcow2", "node-name": "q1", "file": "f0"})
        check("Permission conflict" in r.get("error", {}).get("desc", ""),
              "a second writer of the same file is refused after opening at home", r)
        r = c.cmd("blockdev-add", {"driver": "qcow2", "node-name": "q0", "file": "f0"})
        check("Duplicate" in r.get("error", {}).get("desc", ""), "a duplicate name is refused", r)
        nodes = {n["node-name"]: n for n in c.cmd("query-named-block-nodes").get("return", [])}
        check(nodes.get("q0", {}).get("image", {}).get("virtual-size") == 64 << 20, "its facts are published",
              nodes.get("q0"))
        r = c.cmd("blockdev-set-active", {"node-name": "q0", "active": False})
        check(ok(r), "inactivated at home", r)
        r = c.cmd("blockdev-set-active", {"node-name": "q0", "active": True})
        check(ok(r), "activated at home", r)
        r = c.cmd("blockdev-reopen", {"options": [{"driver": "qcow2", "node-name": "q0", "file": "f0",
                                                   "read-only": True}]})
        check(ok(r), "reopened read-only at home", r)
        r = c.cmd("blockdev-reopen", {"options": [{"driver": "qcow2", "node-name": "q0", "file": "f0"}]})
        check(ok(r), "reopened read-write at home", r)
        check(ok(c.cmd("blockdev-del", {"node-name": "q0"})), "qcow2 node deleted (closed on io1)")
        r = run(["qemu-img", "check", "-U", img])
        check(r.returncode == 0, "the image is clean as soon as blockdev-del has answered", r.stdout + r.stderr)
        check(ok(c.cmd("blockdev-del", {"node-name": "f0"})), "file node deleted")
        c.close()
    finally:
        rc = d.stop()
        check(rc == 0, "clean stop", f"exit {rc}: " + d.proc.stderr.read().decode()[-2000:])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--blockd", required=True)
    a = ap.parse_args()
    if not shutil.which("qemu-img"):
        print("SKIP: no qemu-img (scripts/deps.sh --with-oracles installs it)")
        return 77
    run_each((test_main_loop_serves_during_a_slow_snapshot, test_blockdev_add_and_del_on_an_iothread), a.blockd,
             "blockd-off-")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

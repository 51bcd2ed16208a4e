# Differential NBD test: the same exports on qemu-storage-daemon and blockd, compared through nbdinfo and QMP texts.
"""For each daemon: a qcow2 image (data, a zeroed range, a hole) exported read-only and writable with
allocation-depth, then nbdinfo --json (normalized: the socket path) and nbdinfo --map / --map=qemu:allocation-depth
on each export, and the replies of the export commands' error paths. The 7.2 oracle differs from 10.2 where 10.2
changed on purpose; those members are listed in KNOWN_702 and dropped from both sides before comparing."""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qmp_harness import Client, Daemon, monitor_args  # noqa: E402

# QEMU 9.0 advertises CAN_MULTI_CONN on writable exports too (7.2 only on read-only ones): blockd follows 10.2.
KNOWN_702 = {"can_multi_conn"}

COMMANDS = [
    ("block-export-add", {"type": "nbd", "id": "x", "node-name": "q0"}),
    ("nbd-server-stop", None),
    # vsock: the parse errors, a bind this host refuses (or takes), and any-CID, which binds where
    # vsock exists at all (both daemons run on the same host, so they meet the same kernel).
    ("nbd-server-start", {"addr": {"type": "vsock", "data": {"cid": "x", "port": "10809"}}}),
    ("nbd-server-start", {"addr": {"type": "vsock", "data": {"cid": "1", "port": "p"}}}),
    ("nbd-server-start", {"addr": {"type": "vsock", "data": {"cid": "4294967296", "port": "1"}}}),
    ("nbd-server-start", {"addr": {"type": "vsock", "data": {"cid": "1", "port": "10809"}}}),
    ("nbd-server-start", {"addr": {"type": "vsock", "data": {"cid": "4294967295", "port": "10812"}}}),
    ("nbd-server-stop", None),
    ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "WORK/nbd.sock"}}}),
    ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "WORK/nbd.sock"}}}),
    ("block-export-add", {"type": "nbd", "id": "e 0", "node-name": "q0"}),
    ("block-export-add", {"type": "nbd", "id": "ro", "node-name": "q0"}),
    ("block-export-add", {"type": "nbd", "id": "rw", "node-name": "q0", "name": "rw", "writable": True,
                          "allocation-depth": True, "description": "writable one"}),
    ("block-export-add", {"type": "nbd", "id": "ro", "node-name": "q0"}),
    ("block-export-add", {"type": "nbd", "id": "r2", "node-name": "q0", "name": "rw"}),
    ("block-export-add", {"type": "nbd", "id": "r3", "node-name": "nope"}),
    ("block-export-add", {"type": "nbd", "id": "r3", "node-name": "q0", "bitmaps": ["b"]}),
    ("block-export-add", {"type": "nbd", "id": "r3", "node-name": "q0", "iothread": "t"}),
    ("block-export-add", {"type": "nbd", "id": "r3", "node-name": "q0", "description": "d" * 4097}),
    # iothread and fixed-iothread: an export moves its node unless a fixed export holds it there.
    ("blockdev-add", {"driver": "null-co", "node-name": "n1"}),
    ("blockdev-add", {"driver": "null-co", "node-name": "n2"}),
    ("block-export-add", {"type": "nbd", "id": "f0", "node-name": "n1", "iothread": "io1", "fixed-iothread": True}),
    ("x-blockdev-set-iothread", {"node-name": "n1", "iothread": None, "force": True}),
    ("x-blockdev-set-iothread", {"node-name": "n1", "iothread": "io2", "force": True}),
    ("block-export-add", {"type": "nbd", "id": "f1", "node-name": "n2", "iothread": "io1"}),
    ("x-blockdev-set-iothread", {"node-name": "n2", "iothread": None}),
    ("x-blockdev-set-iothread", {"node-name": "n2", "iothread": None, "force": True}),
    ("block-export-add", {"type": "nbd", "id": "f2", "node-name": "n1", "name": "x2", "iothread": "io2",
                          "fixed-iothread": True}),
    ("block-export-add", {"type": "nbd", "id": "f3", "node-name": "n1", "name": "x3", "iothread": "io2"}),
    ("block-export-add", {"type": "nbd", "id": "f4", "node-name": "n1", "name": "x4", "iothread": "nope"}),
    ("block-export-add", {"type": "nbd", "id": "f5", "node-name": "n1", "name": "x5", "fixed-iothread": True}),
    ("block-export-del", {"id": "f0"}),
    ("x-blockdev-set-iothread", {"node-name": "n1", "iothread": "io2", "force": True}),
    ("block-export-del", {"id": "f5"}),
    ("x-blockdev-set-iothread", {"node-name": "n1", "iothread": "io2", "force": True}),
    ("blockdev-del", {"node-name": "q0"}),
    ("nbd-server-remove", {"name": "zz"}),
    ("block-export-del", {"id": "zz"}),
    ("query-block-exports", None),
]


def run(*cmd):
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=60, check=True).stdout


def collect(binary, tmp):
    img = os.path.join(tmp, "d.qcow2")
    run("qemu-img", "create", "-f", "qcow2", img, "16M")
    run("qemu-io", "-c", "write -P 1 1M 1M", "-c", "write -z 4M 1M", img)
    args, qmp = monitor_args(tmp)
    d = Daemon(binary, args + ["--object", "iothread,id=io1", "--object", "iothread,id=io2",
                               "--blockdev", f"driver=file,node-name=f0,filename={img}",
                               "--blockdev", "driver=qcow2,node-name=q0,file=f0"], tmp)
    c = Client.unix(qmp)
    c.negotiate()
    out = []
    try:
        for name, a in COMMANDS:
            a = json.loads(json.dumps(a).replace("WORK", tmp)) if a else None
            out.append((name, c.cmd(name, a)))
        sock = os.path.join(tmp, "nbd.sock")
        for exp in ("q0", "rw"):
            uri = f"nbd+unix:///{exp}?socket={sock}"
            info = json.loads(run("nbdinfo", "--json", uri).replace(tmp, "WORK"))
            for e in info["exports"]:
                for k in KNOWN_702:
                    e.pop(k, None)
            out.append(("nbdinfo " + exp, info))
            out.append(("map " + exp, run("nbdinfo", "--map", uri)))
        out.append(("depth", run("nbdinfo", "--map=qemu:allocation-depth", f"nbd+unix:///rw?socket={sock}")))
        out.append(("list", json.loads(run("nbdinfo", "--json", "--list", f"nbd+unix://?socket={sock}")
                                       .replace(tmp, "WORK"))))
        c.cmd("quit")
    finally:
        d.stop()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--blockd", required=True)
    ap.add_argument("--qsd", default="qemu-storage-daemon")
    a = ap.parse_args()
    if not shutil.which(a.qsd):
        print("SKIP: no qemu-storage-daemon")
        return 77  # ctest: skipped (SKIP_RETURN_CODE)
    t1, t2 = tempfile.mkdtemp(prefix="nbd-qsd-"), tempfile.mkdtemp(prefix="nbd-blockd-")
    try:
        want = collect(a.qsd, t1)
        got = collect(a.blockd, t2)
    finally:
        shutil.rmtree(t1, ignore_errors=True)
        shutil.rmtree(t2, ignore_errors=True)
    failed = 0
    if len(want) != len(got) or [n for n, _ in want] != [n for n, _ in got]:
        # A missing or extra entry on one side is a failure, never a silent pass.
        failed += 1
        print("FAIL entry lists differ\n   qsd:   ", [n for n, _ in want], "\n   blockd:", [n for n, _ in got])
    for (n1, w), (n2, g) in zip(want, got):
        if w != g:
            failed += 1
            print("FAIL", n1, "\n   qsd:   ", json.dumps(w), "\n   blockd:", json.dumps(g))
        else:
            print("PASS", n1)
    print(f"{len(want) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

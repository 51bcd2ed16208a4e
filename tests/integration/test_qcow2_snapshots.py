#!/usr/bin/env python3
"""Internal snapshots over QMP, blockd against qemu-storage-daemon: the same commands on the same images give the
same replies (dates and clocks aside) and the same snapshot lists; the images blockd leaves check clean, and
qemu-img reads each snapshot's content."""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qmp_harness import Client, Daemon, monitor_args  # noqa: E402

TIMES = ("date-sec", "date-nsec", "vm-clock-sec", "vm-clock-nsec")


def norm(v):
    """Drops what differs by nature (timestamps) and the temp dir."""
    if isinstance(v, dict):
        return {k: ("T" if k in TIMES else norm(x)) for k, x in v.items() if k != "actual-size"}
    if isinstance(v, list):
        return [norm(x) for x in v]
    return v


def img(tmp, *args):
    subprocess.run(["qemu-img"] + list(args), cwd=tmp, check=True, capture_output=True)


SCRIPT = [
    ("blockdev-add", {"driver": "qcow2", "node-name": "q", "file": {"driver": "file", "filename": "IMG",
                                                                     "node-name": "qf"}}),
    ("blockdev-add", {"driver": "raw", "node-name": "r", "file": {"driver": "file", "filename": "RAW"}}),
    ("blockdev-snapshot-internal-sync", {"device": "nope", "name": "s"}),
    ("blockdev-snapshot-internal-sync", {"device": "r", "name": "s"}),
    ("blockdev-snapshot-internal-sync", {"device": "qf", "name": "s"}),
    ("blockdev-snapshot-internal-sync", {"device": "q", "name": ""}),
    ("blockdev-snapshot-internal-sync", {"device": "q", "name": "s1"}),
    ("blockdev-snapshot-internal-sync", {"device": "q", "name": "s1"}),
    ("blockdev-snapshot-internal-sync", {"device": "q", "name": "s2"}),
    ("query-named-block-nodes", {"flat": True}),
    ("blockdev-snapshot-delete-internal-sync", {"device": "q"}),
    ("blockdev-snapshot-delete-internal-sync", {"device": "q", "name": "zz"}),
    ("blockdev-snapshot-delete-internal-sync", {"device": "q", "id": "9"}),
    ("blockdev-snapshot-delete-internal-sync", {"device": "q", "id": "1", "name": "s2"}),
    ("blockdev-snapshot-delete-internal-sync", {"device": "q", "id": "1"}),
    ("blockdev-snapshot-delete-internal-sync", {"device": "r", "name": "s2"}),
    ("blockdev-snapshot-internal-sync", {"device": "q", "name": "s3"}),
    ("query-named-block-nodes", {"flat": True}),
    ("blockdev-del", {"node-name": "q"}),
]


def transcript(binary, tmp):
    image, raw = os.path.join(tmp, "a.qcow2"), os.path.join(tmp, "r.img")
    img(tmp, "create", "-q", "-f", "qcow2", image, "4M")
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 1M", image], check=True, capture_output=True)
    img(tmp, "create", "-q", "-f", "raw", raw, "1M")
    args, path = monitor_args(tmp)
    d = Daemon(binary, args, tmp)
    out = []
    try:
        c = Client.unix(path)
        c.negotiate()
        for name, a in SCRIPT:
            a = json.loads(json.dumps(a).replace("IMG", image).replace("RAW", raw))
            r = c.cmd(name, a)
            if name == "query-named-block-nodes":
                # The qcow2 node's image info (its snapshots); the rest of the reply has its own tests,
                # which also lift QSD 7.2's reply to 10.2's members.
                r = [n["image"] for n in r["return"] if n["node-name"] == "q"]
            out.append((name, norm(json.loads(json.dumps(r).replace(tmp, "TMP")))))
        c.close()
    finally:
        d.stop()
    check = subprocess.run(["qemu-img", "check", image], capture_output=True, text=True)
    listing = subprocess.run(["qemu-img", "snapshot", "-l", image], capture_output=True, text=True).stdout
    return out, check.returncode, listing, image


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--blockd", required=True)
    ap.add_argument("--qsd", default=shutil.which("qemu-storage-daemon"))
    a = ap.parse_args()
    if not shutil.which("qemu-img"):
        print("FAIL: qemu-img not installed (scripts/test installs it)")
        return 1
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    failed = 0
    with tempfile.TemporaryDirectory(prefix="bd-s-", dir=base) as t1, \
            tempfile.TemporaryDirectory(prefix="bd-s-", dir=base) as t2:
        ours, rc, listing, image = transcript(a.blockd, t1)
        if a.qsd:
            theirs, _, their_listing, _ = transcript(a.qsd, t2)
            if len(ours) != len(theirs):
                failed += 1
                print(f"FAIL transcript length: blockd {len(ours)}, qsd {len(theirs)}")
            for (name, x), (_, y) in zip(ours, theirs):
                if x != y:
                    failed += 1
                    print(f"FAIL {name}:\n  blockd: {json.dumps(x)}\n  qsd:    {json.dumps(y)}")
            if [l.split()[1] for l in listing.splitlines()[2:]] != [l.split()[1] for l in their_listing.splitlines()[2:]]:
                failed += 1
                print(f"FAIL snapshot lists differ:\n{listing}\n{their_listing}")
        else:
            print("SKIP differential part: qemu-storage-daemon not installed")
        if rc != 0:
            failed += 1
            print(f"FAIL qemu-img check after blockd: rc {rc}")
        # Snapshot s2 was taken after the 1 MiB write and before nothing else: its content is that write.
        raw = os.path.join(t1, "s2.raw")
        subprocess.run(["qemu-img", "convert", "-O", "raw", "-l", "snapshot.name=s2", image, raw], check=True)
        with open(raw, "rb") as f:
            data = f.read()
        if data[:1 << 20] != b"\x11" * (1 << 20) or data[1 << 20:] != b"\0" * (3 << 20):
            failed += 1
            print("FAIL snapshot s2 does not hold the disk as it was")
    print(f"{'FAIL' if failed else 'PASS'} internal snapshots ({failed} failures)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Block graph against real clients: the OFD locks blockd takes are the ones qemu-img honours, and they follow
the graph (a raw window forbids resizing its file until the window is deleted)."""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qmp_harness import Client, Daemon, monitor_args  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--blockd", required=True)
    a = ap.parse_args()
    if not shutil.which("qemu-img"):
        print("FAIL: qemu-img not installed (scripts/test installs it)")
        return 1
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(prefix="bd-g-", dir=base) as tmp:
        img = os.path.join(tmp, "disk.img")
        with open(img, "wb") as f:
            f.truncate(1 << 20)
        args, path = monitor_args(tmp)
        d = Daemon(a.blockd, args + ["--blockdev", f"file,node-name=f0,filename={img}",
                                     "--blockdev", "raw,node-name=w0,file=f0,offset=4096,size=65536"], tmp)
        try:
            r = subprocess.run(["qemu-img", "resize", "-f", "raw", img, "2M"], capture_output=True, text=True)
            assert r.returncode == 1, r
            assert r.stderr == (f"qemu-img: Could not open '{img}': Failed to get \"resize\" lock\n"
                                f"Is another process using the image [{img}]?\n"), r.stderr
            print("PASS qemu-img cannot resize under a raw window")
            c = Client.unix(path)
            c.negotiate()
            assert c.cmd("blockdev-del", {"node-name": "w0"}) == {"return": {}}
            r = subprocess.run(["qemu-img", "resize", "-f", "raw", img, "2M"], capture_output=True, text=True)
            assert r.returncode == 0, r
            print("PASS the lock goes with the window")
            # blockd sees the new size and can resize back itself.
            assert c.cmd("block_resize", {"node-name": "f0", "size": 1 << 20}) == {"return": {}}
            assert os.path.getsize(img) == 1 << 20
            print("PASS block_resize on the file node")
            c.close()
        finally:
            assert d.stop() == 0
    print("3 passed, 0 failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())

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

            # blockdev-set-active hands the image over: an inactive window holds no lock, and
            # activating takes it back (migration handover with a second process).
            def resize_ok():
                r = subprocess.run(["qemu-img", "resize", "-f", "raw", img, "1M"], capture_output=True, text=True)
                return r.returncode == 0
            assert c.cmd("blockdev-add", {"driver": "raw", "node-name": "w1", "file": "f0", "offset": 0,
                                          "size": 4096}) == {"return": {}}
            assert not resize_ok()
            err = c.cmd("blockdev-set-active", {"node-name": "f0", "active": False})
            assert err == {"error": {"class": "GenericError", "desc": "Node has active parent node"}}, err
            assert c.cmd("blockdev-set-active", {"node-name": "w1", "active": False}) == {"return": {}}
            nodes = {n["node-name"]: n["active"] for n in c.cmd("query-named-block-nodes")["return"]}
            assert nodes == {"w1": False, "f0": False}, nodes
            assert resize_ok()
            assert c.cmd("blockdev-set-active", {"active": True}) == {"return": {}}
            nodes = {n["node-name"]: n["active"] for n in c.cmd("query-named-block-nodes")["return"]}
            assert nodes == {"w1": True, "f0": True}, nodes
            # 10.2's BlockDeviceInfo.children (the differential suite drops it: QSD 7.2 lacks it).
            kids = {n["node-name"]: n["children"] for n in c.cmd("query-named-block-nodes")["return"]}
            assert kids == {"w1": [{"child": "file", "node-name": "f0"}], "f0": []}, kids
            fs = {n["node-name"]: n["image"].get("format-specific") for n in c.cmd("query-named-block-nodes")["return"]}
            assert fs["w1"] is None and fs["f0"]["type"] == "file", fs
            assert not resize_ok()
            print("PASS blockdev-set-active releases and retakes the image")

            # Placement: a component moves between iothreads as a whole, new parents join their
            # child's iothread, and deleting an iothread moves its nodes to the main loop first
            # (QSD 7.2 answers {} there too, then crashes on the nodes' next request).
            def threads():
                out = set()
                for t in os.listdir(f"/proc/{d.proc.pid}/task"):
                    with open(f"/proc/{d.proc.pid}/task/{t}/comm") as f:
                        out.add(f.read().strip())
                return out
            for i in ("io1", "io2"):
                assert c.cmd("object-add", {"qom-type": "iothread", "id": i}) == {"return": {}}
            assert {"io:io1", "io:io2"} <= threads(), threads()
            assert c.cmd("x-blockdev-set-iothread", {"node-name": "w1", "iothread": "io1"}) == {"return": {}}
            assert c.cmd("blockdev-add", {"driver": "raw", "node-name": "w2", "file": "f0", "offset": 4096,
                                          "size": 4096}) == {"return": {}}
            assert c.cmd("x-blockdev-set-iothread", {"node-name": "w2", "iothread": "io2"}) == {"return": {}}
            assert c.cmd("blockdev-set-active", {"active": False}) == {"return": {}}
            assert resize_ok()
            assert c.cmd("blockdev-set-active", {"active": True}) == {"return": {}}
            assert not resize_ok()
            assert c.cmd("object-del", {"id": "io2"}) == {"return": {}}
            assert "io:io2" not in threads(), threads()
            assert c.cmd("blockdev-del", {"node-name": "w2"}) == {"return": {}}
            assert c.cmd("block_resize", {"node-name": "w1", "size": 4096}) == {
                "error": {"class": "GenericError", "desc": "Cannot resize fixed-size raw disks"}}
            assert c.cmd("x-blockdev-set-iothread", {"node-name": "f0", "iothread": "io1"}) == {"return": {}}
            assert c.cmd("object-del", {"id": "io1"}) == {"return": {}}
            assert c.cmd("blockdev-reopen", {"options": [{"driver": "raw", "node-name": "w1", "file": "f0",
                                                          "offset": 0, "size": 8192}]}) == {"return": {}}
            assert c.cmd("query-version")["return"]["qemu"]["major"] >= 7
            print("PASS components move between iothreads and leave a deleted one")
            c.close()
        finally:
            assert d.stop() == 0
    print("5 passed, 0 failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())

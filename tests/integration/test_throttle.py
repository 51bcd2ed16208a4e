# Integration tests of the throttle filter and throttle groups: QMP replies and texts against qemu-storage-daemon, and fio (nbd engine) accuracy of iops, bps and burst limits; test process only.
"""Part 1 (differential, needs qemu-storage-daemon): the same QMP script runs against QSD and blockd: blockdev-add
of throttle nodes (missing group, a secret named as group, a good group, an inline file), query-named-block-nodes
(the throttle nodes' drv, filenames, image chain and legacy throttle fields), object-del of a group in use, qom-set
of limits, blockdev-reopen to another group and to a missing one, blockdev-del, object-del once free.
Normalized: automatic node names (#blockNNN); blockd's object-del refusal adds who holds the group and the way
out after QSD's text ("object 'tg0' is in use, can not be deleted"), compared up to QSD's text.

Part 2 (accuracy, needs fio): blockd exports a throttle node over null-co over NBD (unix socket); qom-set of the
group's limits resets its buckets before each run; fio --ioengine=nbd measures, after a ramp that absorbs the
bucket QEMU lets through at once:
  iops-total 2000 (4k randread QD16), bps-total 20 MiB/s (64k randwrite QD8),
  a burst: iops-total 500, iops-total-max 2000, iops-total-max-length 2: the rate during the burst, the total of
  a 6 s run (avg*T + max*length: the bucket holds max*length), and the rate once the burst is spent;
  two throttle nodes in one group on two iothreads, one fio each: the total holds the limit and the two halves
  are even (round robin).
Each measured rate must be within 5% of the configured one. BLOCKD_THROTTLE_LONG=1 doubles the run times."""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qmp_harness import Client, Daemon, monitor_args  # noqa: E402

SKIP = 77
AUTO_RE = re.compile(r"#block\d+")
IN_USE = "is in use, can not be deleted"

SCRIPT = [
    ("blockdev-add", {"driver": "null-co", "node-name": "n0", "size": 1048576}),
    ("blockdev-add", {"driver": "throttle", "node-name": "t0", "throttle-group": "nope", "file": "n0"}),
    ("blockdev-add", {"driver": "throttle", "node-name": "t0", "file": "n0"}),
    ("object-add", {"qom-type": "throttle-group", "id": "tg0", "limits": {"iops-total": 100}}),
    ("object-add", {"qom-type": "secret", "id": "s0", "data": "x"}),
    ("blockdev-add", {"driver": "throttle", "node-name": "t0", "throttle-group": "s0", "file": "n0"}),
    ("blockdev-add", {"driver": "throttle", "node-name": "t0", "throttle-group": "tg0", "file": "n0"}),
    ("blockdev-add", {"driver": "throttle", "node-name": "t1", "throttle-group": "tg0",
                      "file": {"driver": "null-co", "size": 4096}}),
    ("query-named-block-nodes", None),
    ("object-del", {"id": "tg0"}),
    ("qom-set", {"path": "tg0", "property": "limits", "value": {"bps-read": 1000}}),
    ("qom-get", {"path": "tg0", "property": "limits"}),
    ("blockdev-reopen", {"options": [{"driver": "throttle", "node-name": "t0", "throttle-group": "tg0", "file": "n0"}]}),
    ("object-add", {"qom-type": "throttle-group", "id": "tg1"}),
    ("blockdev-reopen", {"options": [{"driver": "throttle", "node-name": "t0", "throttle-group": "tg1", "file": "n0"}]}),
    ("blockdev-reopen", {"options": [{"driver": "throttle", "node-name": "t0", "file": "n0"}]}),
    ("blockdev-reopen", {"options": [{"driver": "throttle", "node-name": "t0", "throttle-group": "zz", "file": "n0"}]}),
    ("object-del", {"id": "tg1"}),
    ("blockdev-del", {"node-name": "t0"}),
    ("object-del", {"id": "tg1"}),
    ("blockdev-del", {"node-name": "t1"}),
    ("object-del", {"id": "tg0"}),
    ("query-named-block-nodes", None),
]

# The members of a node's BlockDeviceInfo this test compares (QSD 7.2 and 10.2 agree on them).
NODE_KEYS = ["node-name", "drv", "file", "ro", "backing_file_depth", "bps", "bps_rd", "bps_wr", "iops", "iops_rd",
             "iops_wr", "encrypted", "detect_zeroes", "write_threshold", "cache"]


def image_chain(img):
    out = []
    while img:
        out.append({k: img.get(k) for k in ("filename", "format", "virtual-size")})
        img = img.get("backing-image")
    return out


def normalize(name, reply):
    s = AUTO_RE.sub("#auto", json.dumps(reply, sort_keys=True))
    r = json.loads(s)
    if "error" in r and IN_USE in r["error"]["desc"]:
        d = r["error"]["desc"]
        r["error"]["desc"] = d[:d.index(IN_USE) + len(IN_USE)]
    if name == "query-named-block-nodes" and "return" in r:
        r["return"] = sorted(({**{k: n.get(k) for k in NODE_KEYS}, "image": image_chain(n.get("image"))}
                              for n in r["return"]), key=lambda n: n["node-name"])
    return r


def run_script(binary, tmp):
    args, path = monitor_args(tmp)
    d = Daemon(binary, args, tmp)
    try:
        c = Client.unix(path)
        c.negotiate()
        return [normalize(n, c.cmd(n, a)) for n, a in SCRIPT]
    finally:
        d.stop()


def test_differential(blockd, tmp):
    if not shutil.which("qemu-storage-daemon"):
        print("SKIP differential: qemu-storage-daemon not installed")
        return False
    os.makedirs(os.path.join(tmp, "q"))
    os.makedirs(os.path.join(tmp, "b"))
    want = run_script("qemu-storage-daemon", os.path.join(tmp, "q"))
    got = run_script(blockd, os.path.join(tmp, "b"))
    bad = 0
    for (name, a), w, g in zip(SCRIPT, want, got):
        if w != g:
            bad += 1
            print(f"DIFF {name} {json.dumps(a)}\n  qsd:    {json.dumps(w, sort_keys=True)}\n"
                  f"  blockd: {json.dumps(g, sort_keys=True)}")
    assert bad == 0, f"{bad} replies differ"
    print(f"ok differential: {len(SCRIPT)} replies match")
    return True


# ---- fio accuracy ---------------------------------------------------------------------------------------------

class Exported:
    """blockd exporting throttle nodes over null-co nodes through NBD (one export per node), with a monitor."""

    def __init__(self, binary, tmp, nodes=1, iothreads=False, throttle=True, backing="null-co", extra=()):
        self.tmp = tmp
        margs, mpath = monitor_args(tmp)
        sock = os.path.join(tmp, "nbd.sock")
        self.uri = lambda i: f"nbd+unix:///disk{i}?socket={sock}"
        argv = margs + ["--object", "throttle-group,id=tg0", "--nbd-server", f"addr.type=unix,addr.path={sock}"]
        for i in range(nodes):
            if iothreads:
                argv += ["--object", f"iothread,id=io{i}"]
            if backing == "file":
                img = os.path.join(tmp, f"img{i}.raw")
                with open(img, "wb") as f:
                    f.truncate(1 << 30)
                argv += ["--blockdev", f"driver=file,node-name=n{i},filename={img}"]
            else:
                argv += ["--blockdev", f"driver=null-co,node-name=n{i},size=1073741824"]
            top = f"n{i}"
            if throttle:
                argv += ["--blockdev", f"driver=throttle,node-name=t{i},throttle-group=tg0,file=n{i}"]
                top = f"t{i}"
            exp = f"type=nbd,id=e{i},node-name={top},name=disk{i},writable=on"
            if iothreads:
                exp += f",iothread=io{i}"
            argv += ["--export", exp]
        self.d = Daemon(binary, argv + list(extra), tmp)
        self.c = Client.unix(mpath)
        self.c.negotiate()

    def limits(self, **kw):
        lim = {k.replace("_", "-"): v for k, v in kw.items()}
        # Every member given, so the previous case's limits go and the buckets restart.
        full = {f"{p}{s}": (1 if s == "-max-length" else 0) for p in ("bps-total", "bps-read", "bps-write",
                "iops-total", "iops-read", "iops-write") for s in ("", "-max", "-max-length")}
        full["iops-size"] = 0
        full.update(lim)
        r = self.c.cmd("qom-set", {"path": "tg0", "property": "limits", "value": full})
        assert r == {"return": {}}, r

    def stop(self):
        self.c.close()
        assert self.d.stop() == 0


def fio(uri, rw, bs, depth, runtime, ramp=0.0, extra=()):
    cmd = ["fio", "--name=t", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}", f"--iodepth={depth}",
           "--time_based", f"--runtime={int(runtime * 1000)}ms", "--norandommap", "--output-format=json",
           *extra]
    if ramp:
        cmd.append(f"--ramp_time={int(ramp * 1000)}ms")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=runtime + ramp + 60)
    assert r.returncode == 0, r.stdout + r.stderr
    job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
    d = job["write" if "write" in rw else "read"]
    secs = d["runtime"] / 1000.0
    return {"iops": d["total_ios"] / secs, "bps": d["io_bytes"] / secs, "ios": d["total_ios"], "secs": secs}


def measure_cases(blockd, tmp, scale=1.0, report=print):
    """Runs every accuracy case; returns [(name, configured, measured)]."""
    rows = []
    e = Exported(blockd, tmp)
    try:
        e.limits(iops_total=2000)
        m = fio(e.uri(0), "randread", "4k", 16, 3 * scale, ramp=1)
        rows.append(("iops-total 2000, 4k randread QD16 (IOPS)", 2000, m["iops"]))
        e.limits(bps_total=20 << 20)
        m = fio(e.uri(0), "randwrite", "64k", 8, 3 * scale, ramp=1)
        rows.append(("bps-total 20 MiB/s, 64k randwrite QD8 (B/s)", 20 << 20, m["bps"]))
        e.limits(iops_read=5000, iops_size=16384)
        m = fio(e.uri(0), "randread", "64k", 16, 2 * scale, ramp=1)
        rows.append(("iops-read 5000 iops-size 16k, 64k randread (IOPS x4)", 5000, m["iops"] * 4))
        avg, mx, length = 500, 2000, 2
        burst = dict(iops_total=avg, iops_total_max=mx, iops_total_max_length=length)
        # The burst lasts max*length/(max-avg) s (2.67 s): measure 0.5 .. 2.0 s of it.
        e.limits(**burst)
        m = fio(e.uri(0), "randread", "4k", 32, 1.5, ramp=0.5)
        rows.append((f"burst iops-total-max {mx} (during the burst, IOPS)", mx, m["iops"]))
        e.limits(**burst)
        t = 6 * scale
        m = fio(e.uri(0), "randread", "4k", 32, t)
        rows.append((f"burst: ios in {m['secs']:.1f} s (avg*T + max*length)", avg * m["secs"] + mx * length, m["ios"]))
        # A shallow queue: at the end of a run fio waits for what is queued (depth/avg seconds).
        m = fio(e.uri(0), "randread", "4k", 8, 2 * scale, ramp=0.5)
        rows.append((f"burst spent: iops-total {avg} (IOPS)", avg, m["iops"]))
    finally:
        e.stop()
    # One group, two nodes on two iothreads: the total holds the limit, round robin splits it evenly.
    sub = os.path.join(tmp, "rr")
    os.makedirs(sub)
    e = Exported(blockd, sub, nodes=2, iothreads=True)
    try:
        e.limits(iops_total=3000)
        res = [None, None]

        def one(i, depth):
            res[i] = fio(e.uri(i), "randread", "4k", depth, 3 * scale, ramp=1)
        # Equal clients get equal shares. (QEMU's turn skips a member with nothing queued, so a client
        # that keeps fewer requests waiting gets less; that is the scheme, not an error.)
        ts = [threading.Thread(target=one, args=(0, 16)), threading.Thread(target=one, args=(1, 16))]
        for x in ts:
            x.start()
        for x in ts:
            x.join()
        rows.append(("two iothreads, one group iops-total 3000: total (IOPS)", 3000, res[0]["iops"] + res[1]["iops"]))
        rows.append(("  node on io0 (QD16): half (IOPS)", 1500, res[0]["iops"]))
        rows.append(("  node on io1 (QD16): half (IOPS)", 1500, res[1]["iops"]))
    finally:
        e.stop()
    for name, want, got in rows:
        report(f"{name:58s} configured {want:>12.0f} measured {got:>12.0f}  {100.0 * (got - want) / want:+.1f}%")
    return rows


def node_ops(c, name):
    r = c.cmd("query-blockstats", {"query-nodes": True})
    for s in r["return"]:
        if s.get("node-name") == name:
            return s["stats"]["rd_operations"]
    raise AssertionError(r)


def test_runtime_changes(blockd, tmp):
    """While fio runs against a throttle node held at 100 IOPS: the node moves to another iothread (the drain
    lets its waiting requests go, the group stays consistent), the limits rise to 2000 IOPS and take effect at
    once, and object-del of the group is refused with QSD's text."""
    if not shutil.which("fio"):
        print("SKIP runtime changes: fio not installed")
        return False
    import time
    e = Exported(blockd, tmp, extra=["--object", "iothread,id=io1"])
    try:
        e.limits(iops_total=100)
        res = {}
        th = threading.Thread(target=lambda: res.update(fio(e.uri(0), "randread", "4k", 16, 3)))
        th.start()
        deadline = time.monotonic() + 10
        while node_ops(e.c, "t0") < 20:  # fio is running and being throttled
            assert time.monotonic() < deadline, "fio did not start"
        t = time.monotonic()
        r = e.c.cmd("x-blockdev-set-iothread", {"node-name": "t0", "iothread": "io1", "force": True})
        assert r == {"return": {}}, r
        assert time.monotonic() - t < 1.0, "the move waited for the throttled requests"
        r = e.c.cmd("object-del", {"id": "tg0"})
        assert r["error"]["desc"].startswith("object 'tg0' is in use, can not be deleted"), r
        before, t0 = node_ops(e.c, "t0"), time.monotonic()
        e.limits(iops_total=2000)
        while time.monotonic() - t0 < 0.5 and th.is_alive():
            pass
        rate = (node_ops(e.c, "t0") - before) / (time.monotonic() - t0)
        th.join()
        assert res and res["ios"] > 0, res
        assert rate > 1000, f"new limits not in effect: {rate:.0f} IOPS"
        r = e.c.cmd("x-blockdev-set-iothread", {"node-name": "t0", "iothread": None, "force": True})
        assert r == {"return": {}}, r
        m = fio(e.uri(0), "randread", "4k", 16, 1, ramp=0.5)
        assert abs(m["iops"] - 2000) < 100, m
    finally:
        e.stop()
    print("ok runtime changes: move across iothreads, new limits at once, object-del refused")
    return True


def test_accuracy(blockd, tmp):
    if not shutil.which("fio"):
        print("SKIP accuracy: fio not installed")
        return False
    scale = 2.0 if os.environ.get("BLOCKD_THROTTLE_LONG") == "1" else 1.0
    rows = measure_cases(blockd, tmp, scale)
    def off(r):
        return abs(r[2] - r[1]) > 0.05 * r[1]
    bad = [r for r in rows if off(r)]
    if bad and all(r[2] < r[1] for r in bad):
        # Short of the limit only: on a loaded machine (ctest -j2 beside the job trials) fio itself may not
        # keep up for a second. Measured once more; a rate above its limit is never given a second chance.
        print(f"  short of the limit once ({bad}); measuring again", flush=True)
        again = measure_cases(blockd, tmp, scale)
        bad = [again[i] for i, r in enumerate(rows) if off(r) and off(again[i])]
    assert not bad, f"off by more than 5%: {bad}"
    print("ok accuracy: every rate within 5%")
    return True


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--blockd", required=True)
    args = ap.parse_args()
    ran = 0
    for t in (test_differential, test_runtime_changes, test_accuracy):
        tmp = tempfile.mkdtemp(prefix="blockd-throttle-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        try:
            ran += bool(t(args.blockd, tmp))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0 if ran else SKIP


if __name__ == "__main__":
    sys.exit(main())

# Image fleecing: copy-before-write + snapshot-access built by the user, and fleecing by a backup sync=none job; blockd and qemu-storage-daemon side by side, data checked with qemu-img compare over NBD.
"""Cases:
- user-built fleecing (QEMU's recipe): a temporary qcow2 backed by the disk as the cbw target, snapshot-access over
  the cbw node, an NBD export of each; while a writer keeps writing through the cbw export, qemu-img compare of
  the snapshot export against a copy of the disk taken before equals (during and after the writes); the disk
  holds the new data; the same run passes against QSD;
- fleecing by a backup sync=none job into a qcow2 backed by the disk: the target's export reads the disk as it was
  at the job's start while the guest writes through its (re-pointed) export;
- on-cbw-error with a target whose writes fail (blkdebug): break-guest-write fails the guest write and the view
  still reads the old data; break-snapshot lets the write through and every read of the view fails; the outcomes
  equal QSD's;
- the view is read-only (a write fails), and a discard on it takes chunks out of the view (reads there fail
  after it), as QSD's snapshot-access does;
- cbw's bitmap: only the bitmap's dirty chunks are copied and readable in the view (as QSD);
- push backup with fleecing: a backup from the view with discard-source=true empties the fleecing image as it
  copies, and the target equals the disk at the filter's opening (blockd only: QSD 7.2 has no discard-source).
Exit 77 when qemu-img/qemu-io/qemu-storage-daemon are missing."""
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qmp_harness import run_cases  # noqa: E402
from test_block_stream import sh, QSD, start  # noqa: E402

MB = 1 << 20


def ok(m, name, args):
    r = m.cmd(name, args)
    assert r == {"return": {}}, (name, args, r)


def make_disk(tmp):
    disk = os.path.join(tmp, "disk.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", disk, "32M")
    sh("qemu-io", "-c", "write -P 0x11 0 8M", "-c", "write -P 0x22 10M 6M", "-c", "write -z 20M 2M",
       "-c", "write -P 0x33 28M 4M", disk)
    ref = os.path.join(tmp, "ref.raw")
    sh("qemu-img", "convert", "-O", "raw", disk, ref)
    return disk, ref


def serve(m, tmp, node, name, writable):
    sock = os.path.join(tmp, "nbd.sock")
    if not os.path.exists(sock):
        ok(m, "nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
    ok(m, "block-export-add", {"type": "nbd", "id": name, "node-name": node, "name": name, "writable": writable})
    return f"nbd+unix:///{name}?socket={sock}"


WRITES = ["write -P 0x44 0 64k", "write -P 0x45 4M 3M", "write -z 10M 1M", "write -P 0x46 12M 4k",
          "write -P 0x47 21M 512k", "discard 28M 1M", "write -P 0x48 31M 1M", "write -P 0x49 2M 8M"]


def writer(url):
    args = ["qemu-io", "-f", "raw"]
    for c in WRITES:
        args += ["-c", c]
    return subprocess.Popen(args + [url], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def compare(url, ref):
    r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", url, ref], capture_output=True, text=True)
    return r.returncode, r.stdout.strip()


def user_fleecing(binary, tmp):
    os.makedirs(tmp, exist_ok=True)
    disk, ref = make_disk(tmp)
    fl = os.path.join(tmp, "fleece.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", disk, "-F", "qcow2", fl, "32M")
    d, m = start(binary, tmp)
    try:
        ok(m, "blockdev-add", {"driver": "qcow2", "node-name": "disk", "file": {"driver": "file", "filename": disk}})
        ok(m, "blockdev-add", {"driver": "qcow2", "node-name": "tmp", "backing": "disk",
                               "file": {"driver": "file", "filename": fl}})
        ok(m, "blockdev-add", {"driver": "copy-before-write", "node-name": "cbw", "file": "disk", "target": "tmp"})
        ok(m, "blockdev-add", {"driver": "snapshot-access", "node-name": "snap", "file": "cbw"})
        guest = serve(m, tmp, "cbw", "guest", True)
        snap = serve(m, tmp, "snap", "snap", False)
        w = writer(guest)
        during = compare(snap, ref)
        _, err = w.communicate()
        assert w.returncode == 0, err
        after = compare(snap, ref)
        sh("qemu-io", "-f", "raw", "-c", "read -P 0x49 2M 8M", "-c", "read -P 0x48 31M 1M", guest)
        for e in ("snap", "guest"):
            ok(m, "block-export-del", {"id": e})
    finally:
        d.stop()
    sh("qemu-img", "check", fl)
    sh("qemu-io", "-f", "qcow2", "-c", "read -P 0x49 2M 8M", disk)
    return during, after


def case_user_fleecing(binary, tmp):
    want = user_fleecing(QSD, os.path.join(tmp, "qsd"))
    got = user_fleecing(binary, os.path.join(tmp, "blockd"))
    assert want == got == ((0, "Images are identical."),) * 2, (want, got)


def case_fleecing_by_backup_job(binary, tmp):
    disk, ref = make_disk(tmp)
    fl = os.path.join(tmp, "fleece.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", disk, "-F", "qcow2", fl, "32M")
    d, m = start(binary, tmp)
    try:
        ok(m, "blockdev-add", {"driver": "qcow2", "node-name": "disk", "file": {"driver": "file", "filename": disk}})
        ok(m, "blockdev-add", {"driver": "qcow2", "node-name": "tmp", "backing": "disk",
                               "file": {"driver": "file", "filename": fl}})
        guest = serve(m, tmp, "disk", "guest", True)
        ok(m, "blockdev-backup", {"job-id": "fl", "device": "disk", "target": "tmp", "sync": "none",
                                  "filter-node-name": "fleece-cbw"})
        view = serve(m, tmp, "tmp", "view", False)
        w = writer(guest)
        during = compare(view, ref)
        _, err = w.communicate()
        assert w.returncode == 0, err
        after = compare(view, ref)
        assert during == after == (0, "Images are identical."), (during, after)
        ok(m, "block-export-del", {"id": "view"})
        ok(m, "block-job-cancel", {"device": "fl"})
        m.wait("BLOCK_JOB_CANCELLED")
        m.wait("JOB_STATUS_CHANGE", lambda x: x == {"id": "fl", "status": "null"})
        names = [n["node-name"] for n in m.cmd("query-named-block-nodes")["return"]]
        assert "fleece-cbw" not in names, names
        sh("qemu-io", "-f", "raw", "-c", "read -P 0x49 2M 8M", guest)  # the guest's export is on the disk again
    finally:
        d.stop()
    sh("qemu-img", "check", fl)


def cbw_errors(binary, tmp):
    os.makedirs(tmp, exist_ok=True)
    disk, _ = make_disk(tmp)
    out = []
    for i, mode in enumerate(("break-guest-write", "break-snapshot")):
        os.makedirs(os.path.join(tmp, mode))
        tgt = os.path.join(tmp, f"t{i}.raw")
        sh("qemu-img", "create", "-q", "-f", "raw", tgt, "32M")
        d, m = start(binary, os.path.join(tmp, mode))
        try:
            ok(m, "blockdev-add", {"driver": "qcow2", "node-name": "disk",
                                   "file": {"driver": "file", "filename": disk}})
            ok(m, "blockdev-add", {"driver": "raw", "node-name": "tmp",
                                   "file": {"driver": "blkdebug", "inject-error": [{"event": "write_aio", "errno": 5}],
                                            "image": {"driver": "file", "filename": tgt}}})
            ok(m, "blockdev-add", {"driver": "copy-before-write", "node-name": "cbw", "file": "disk", "target": "tmp",
                                   "on-cbw-error": mode})
            ok(m, "blockdev-add", {"driver": "snapshot-access", "node-name": "snap", "file": "cbw"})
            guest = serve(m, os.path.join(tmp, mode), "cbw", "guest", True)
            snap = serve(m, os.path.join(tmp, mode), "snap", "snap", False)
            res = []
            for url, c in ((snap, "read -P 0x11 0 64k"), (guest, "write -P 0x55 0 64k"), (snap, "read -P 0x11 0 64k"),
                           (snap, "read -P 0x22 10M 64k"), (guest, "read -P 0x55 0 64k")):
                ro = ["-r"] if url == snap else []
                r = subprocess.run(["qemu-io", "-f", "raw"] + ro + ["-c", c, url], capture_output=True, text=True)
                failed = r.returncode != 0 or "failed" in r.stdout + r.stderr or "error" in (r.stdout + r.stderr).lower()
                res.append((c, not failed))
            out.append(res)
        finally:
            d.stop()
    return out


def case_on_cbw_error_equal_qsd(binary, tmp):
    want = cbw_errors(QSD, os.path.join(tmp, "qsd"))
    got = cbw_errors(binary, os.path.join(tmp, "blockd"))
    assert want == got, f"\nQSD:    {want}\nblockd: {got}"
    # break-guest-write: the write fails, the view keeps the old data; break-snapshot: the write goes, the view fails.
    assert [ok for _, ok in got[0]] == [True, False, True, True, False], got[0]
    assert [ok for _, ok in got[1]] == [True, True, False, False, True], got[1]


def view_rules(binary, tmp):
    os.makedirs(tmp, exist_ok=True)
    disk, _ = make_disk(tmp)
    fl = os.path.join(tmp, "fleece.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", disk, "-F", "qcow2", fl, "32M")
    d, m = start(binary, tmp)
    res = []
    try:
        ok(m, "blockdev-add", {"driver": "qcow2", "node-name": "disk", "file": {"driver": "file", "filename": disk}})
        ok(m, "blockdev-add", {"driver": "qcow2", "node-name": "tmp", "backing": "disk",
                               "file": {"driver": "file", "filename": fl}})
        ok(m, "blockdev-add", {"driver": "copy-before-write", "node-name": "cbw", "file": "disk", "target": "tmp"})
        ok(m, "blockdev-add", {"driver": "snapshot-access", "node-name": "snap", "file": "cbw", "discard": "unmap"})
        snap = serve(m, tmp, "snap", "snap", True)
        for c in ("write -P 1 0 64k", "read -P 0x11 1M 64k", "discard 1M 128k", "read 1M 64k", "read -P 0x11 2M 64k"):
            r = subprocess.run(["qemu-io", "-f", "raw", "-c", c, snap], capture_output=True, text=True)
            failed = r.returncode != 0 or "failed" in r.stdout + r.stderr
            res.append((c, not failed))
    finally:
        d.stop()
    return res


def case_view_read_only_and_discard(binary, tmp):
    want = view_rules(QSD, os.path.join(tmp, "qsd"))
    got = view_rules(binary, os.path.join(tmp, "blockd"))
    assert want == got, f"\nQSD:    {want}\nblockd: {got}"
    assert [ok for _, ok in got] == [False, True, True, False, True], got


def case_push_backup_with_discard_source(binary, tmp):
    # QEMU's push backup with fleecing (10.2): the backup reads the snapshot-access view and discards on it
    # what it copied (discard-source), so the fleecing image gives the space back as the backup goes.
    # QSD 7.2 has no discard-source: blockd alone, checked by the data and the fleecing image's map.
    disk, ref = make_disk(tmp)
    fl = os.path.join(tmp, "fleece.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", fl, "32M")
    tgt = os.path.join(tmp, "tgt.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", tgt, "32M")
    d, m = start(binary, tmp)
    try:
        ok(m, "blockdev-add", {"driver": "qcow2", "node-name": "disk", "file": {"driver": "file", "filename": disk}})
        ok(m, "blockdev-add", {"driver": "qcow2", "node-name": "tmp", "backing": None, "discard": "unmap",
                               "file": {"driver": "file", "filename": fl, "discard": "unmap"}})
        ok(m, "blockdev-add", {"driver": "copy-before-write", "node-name": "cbw", "file": "disk", "target": "tmp"})
        ok(m, "blockdev-add", {"driver": "snapshot-access", "node-name": "snap", "file": "cbw", "discard": "unmap"})
        ok(m, "blockdev-add", {"driver": "qcow2", "node-name": "tgt", "file": {"driver": "file", "filename": tgt}})
        guest = serve(m, tmp, "cbw", "guest", True)
        sh("qemu-io", "-f", "raw", "-c", "write -P 0x61 0 2M", "-c", "write -P 0x62 12M 1M", guest)
        def fleece_size():
            return os.stat(fl).st_blocks * 512  # data clusters go to the file at once; metadata may be cached
        held = fleece_size()
        assert held >= 3 * MB, held  # the old data of what the guest overwrote
        ok(m, "blockdev-backup", {"job-id": "push", "device": "snap", "target": "tgt", "sync": "full",
                                  "discard-source": True})
        m.wait("BLOCK_JOB_COMPLETED", lambda x: x["device"] == "push" and "error" not in x)
        m.wait("JOB_STATUS_CHANGE", lambda x: x == {"id": "push", "status": "null"})
        ok(m, "block-export-del", {"id": "guest"})
    finally:
        d.stop()
    # Every chunk the backup copied was discarded on the view, so the fleecing image let its clusters go.
    left = fleece_size()
    assert left < MB, (held, left)
    mp = json.loads(sh("qemu-img", "map", "--output=json", fl))
    assert not any(e["data"] for e in mp), mp
    sh("qemu-img", "check", tgt)
    sh("qemu-img", "compare", "-f", "qcow2", "-F", "raw", tgt, ref)


def bitmap_view(binary, tmp):
    # cbw's bitmap: only the bitmap's dirty chunks are copied and readable in the view.
    os.makedirs(tmp, exist_ok=True)
    disk, _ = make_disk(tmp)
    fl = os.path.join(tmp, "fleece.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", fl, "32M")
    d, m = start(binary, tmp)
    res = []
    try:
        ok(m, "blockdev-add", {"driver": "qcow2", "node-name": "disk", "file": {"driver": "file", "filename": disk}})
        ok(m, "block-dirty-bitmap-add", {"node": "disk", "name": "bm", "granularity": 65536})
        url = serve(m, tmp, "disk", "pre", True)
        sh("qemu-io", "-f", "raw", "-c", "write -P 0x71 1M 128k", "-c", "write -P 0x72 12M 64k", url)
        ok(m, "block-export-del", {"id": "pre"})
        m.wait("BLOCK_EXPORT_DELETED")
        ok(m, "blockdev-add", {"driver": "qcow2", "node-name": "tmp", "backing": None,
                               "file": {"driver": "file", "filename": fl}})
        ok(m, "blockdev-add", {"driver": "copy-before-write", "node-name": "cbw", "file": "disk", "target": "tmp",
                               "bitmap": {"node": "disk", "name": "bm"}})
        ok(m, "blockdev-add", {"driver": "snapshot-access", "node-name": "snap", "file": "cbw"})
        guest = serve(m, tmp, "cbw", "guest", True)
        snap = serve(m, tmp, "snap", "snap", False)
        sh("qemu-io", "-f", "raw", "-c", "write -P 0x73 1M 64k", "-c", "write -P 0x74 4M 64k", guest)
        for c in ("read -P 0x71 1M 128k", "read -P 0x72 12M 64k", "read 4M 64k", "read 0 64k"):
            r = subprocess.run(["qemu-io", "-r", "-f", "raw", "-c", c, snap], capture_output=True, text=True)
            res.append((c, r.returncode == 0 and "failed" not in r.stdout + r.stderr))
    finally:
        d.stop()
    # Only the bitmap's chunk the guest overwrote went to the target (not 4M, outside the bitmap).
    mp = json.loads(sh("qemu-img", "map", "--output=json", fl))
    res.append(sum(e["length"] for e in mp if e["data"]))
    return res


def case_bitmap_limits_the_view_equal_qsd(binary, tmp):
    want = bitmap_view(QSD, os.path.join(tmp, "qsd"))
    got = bitmap_view(binary, os.path.join(tmp, "blockd"))
    assert want == got, f"\nQSD:    {want}\nblockd: {got}"
    assert [x[1] for x in got[:4]] == [True, True, False, False] and got[4] == 65536, got


CASES = [case_user_fleecing, case_fleecing_by_backup_job, case_on_cbw_error_equal_qsd, case_view_read_only_and_discard,
         case_push_backup_with_discard_source, case_bitmap_limits_the_view_equal_qsd]


if __name__ == "__main__":
    sys.exit(run_cases(CASES, "blockd-fleecing-", ("qemu-img", "qemu-io", QSD)))

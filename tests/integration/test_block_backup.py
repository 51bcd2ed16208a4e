# blockdev-backup / drive-backup against qemu-storage-daemon and QEMU's tools; ctest runs it in one process.
"""Cases:
- the argument errors of blockdev-backup equal QSD's, reply for reply (lookups, sync/bitmap rules, sizes, compress,
  x-perf, job id), and a backup's job events (defaults; auto-finalize/auto-dismiss off) come in QSD's order;
- sync=full while a writer keeps writing over NBD: the target equals the source at the job's start (qemu-img
  compare against a copy taken before), the source holds the new data; compress=on gives the same data in a
  smaller, clean target;
- sync=top copies only the top layer (target over the source's backing file equals the source); sync=none copies
  only what the guest overwrites (old data in the target there, nothing elsewhere);
- the bitmap modes: on-success leaves the bitmap with only the writes made during the job, never leaves it as it
  was, a cancelled always-job keeps what was not copied; counts equal QSD's for the deterministic ones;
- an incremental chain: a full backup and three incrementals (sync=incremental, writes over NBD between rounds),
  each target backed by the previous one, restore to the source's data (qemu-img compare), images clean;
- pause/resume/cancel with a speed limit: QSD's events, the filter leaves the graph after the job;
- drive-backup creates its target (sync=full) and the result equals the source;
- transactions: two grouped backups complete; a grouped member whose target fails ends with its error and the
  other is cancelled; an abort after a backup leaves no job; a non-job action refuses grouped (as QSD).
Exit 77 when qemu-img/qemu-io/qemu-storage-daemon are missing."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qmp_harness import run_cases  # noqa: E402
from test_block_stream import sh, QSD, same_as_qsd, start  # noqa: E402

MB = 1 << 20


def qcow2(tmp, name, size="16M", backing=None):
    p = os.path.join(tmp, name)
    cmd = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing:
        cmd += ["-b", backing, "-F", "qcow2"]
    sh(*cmd, p, size)
    return p


def add_qcow2(m, name, path):
    r = m.cmd("blockdev-add", {"driver": "qcow2", "node-name": name, "file": {"driver": "file", "filename": path}})
    assert r == {"return": {}}, r


def export(m, tmp, node, writable=True):
    sock = os.path.join(tmp, "nbd.sock")
    if not os.path.exists(sock):
        assert m.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}}) == {"return": {}}
    r = m.cmd("block-export-add", {"type": "nbd", "id": "e-" + node, "node-name": node, "writable": writable,
                                   "name": node})
    assert r == {"return": {}}, r
    return f"nbd+unix:///{node}?socket={sock}"


def nbd_write(url, *cmds):
    args = ["qemu-io", "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    sh(*args, url)


def wait_job(m, jid):
    m.wait("JOB_STATUS_CHANGE", lambda x: x == {"id": jid, "status": "null"})


def job_events(m):
    return [(e, d) for e, d in m.names() if e in ("JOB_STATUS_CHANGE", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED",
                                                  "BLOCK_JOB_PENDING", "BLOCK_JOB_ERROR")]


def run_errors(binary, tmp):
    os.makedirs(tmp, exist_ok=True)
    src, tgt = qcow2(tmp, "src.qcow2"), qcow2(tmp, "tgt.qcow2")
    d, m = start(binary, tmp)
    out = []
    try:
        add_qcow2(m, "src", src)
        add_qcow2(m, "tgt", tgt)
        assert m.cmd("blockdev-add", {"driver": "null-co", "node-name": "small", "size": MB}) == {"return": {}}
        assert m.cmd("blockdev-add", {"driver": "null-co", "node-name": "nul", "size": 16 * MB}) == {"return": {}}
        assert m.cmd("block-dirty-bitmap-add", {"node": "src", "name": "bm0"}) == {"return": {}}
        base = {"job-id": "b", "device": "src", "target": "tgt", "sync": "full"}
        for extra in ({"device": "nope"}, {"target": "nope"}, {"sync": "incremental"}, {"sync": "bitmap"},
                      {"sync": "incremental", "bitmap": "bm0", "bitmap-mode": "never"},
                      {"bitmap": "nope", "bitmap-mode": "on-success"}, {"bitmap": "bm0"},
                      {"sync": "none", "bitmap": "bm0", "bitmap-mode": "on-success"},
                      {"bitmap": "bm0", "bitmap-mode": "never"}, {"bitmap-mode": "always"},
                      {"target": "src"}, {"target": "small"}, {"target": "nul", "compress": True},
                      {"x-perf": {"max-workers": 0}}, {"x-perf": {"max-chunk": -1}}, {"x-perf": {"max-chunk": 4096}},
                      {"job-id": "1bad"}, {"speed": -1}):
            a = dict(base)
            a.update(extra)
            out.append(m.cmd("blockdev-backup", a))
            out.append([e for e, _ in m.names()])
        # A running backup blocks its target for another one; a second backup of the source is fine.
        assert m.cmd("blockdev-backup", dict(base, speed=1024)) == {"return": {}}
        out.append(m.cmd("blockdev-backup", dict(base, **{"job-id": "b2", "device": "nul"})))
        out.append(m.cmd("block-job-cancel", {"device": "b"}))
        wait_job(m, "b")
        out.append([e for e, _ in job_events(m)])
    finally:
        d.stop()
    return out


def case_errors_equal_qsd(binary, tmp):
    same_as_qsd(run_errors, binary, tmp)


def run_events(binary, tmp):
    os.makedirs(tmp, exist_ok=True)
    src = qcow2(tmp, "src.qcow2")
    sh("qemu-io", "-c", "write -P 0x11 0 4M", src)
    d, m = start(binary, tmp)
    out = []
    try:
        add_qcow2(m, "src", src)
        assert m.cmd("blockdev-add", {"driver": "null-co", "node-name": "tgt", "size": 16 * MB}) == {"return": {}}
        m.names()
        assert m.cmd("blockdev-backup", {"job-id": "b1", "device": "src", "target": "tgt", "sync": "full"}) == {"return": {}}
        wait_job(m, "b1")
        out.append(job_events(m))
        assert m.cmd("blockdev-backup", {"job-id": "b2", "device": "src", "target": "tgt", "sync": "full",
                                         "auto-finalize": False, "auto-dismiss": False}) == {"return": {}}
        m.wait("BLOCK_JOB_PENDING")
        q = m.cmd("query-block-jobs")["return"]
        out.append([{k: v for k, v in j.items() if k in ("type", "status", "len", "offset", "ready", "io-status")}
                    for j in q])
        out.append(m.cmd("job-dismiss", {"id": "b2"}))
        out.append(m.cmd("job-finalize", {"id": "b2"}))
        out.append(m.cmd("job-dismiss", {"id": "b2"}))
        out.append(job_events(m))
        nodes = sorted(n["node-name"] for n in m.cmd("query-named-block-nodes")["return"] if not n["node-name"].startswith("#"))
        out.append(nodes)
    finally:
        d.stop()
    return out


def case_events_equal_qsd(binary, tmp):
    want = run_events(QSD, os.path.join(tmp, "qsd"))
    got = run_events(binary, os.path.join(tmp, "blockd"))
    assert want == got, f"\nQSD:    {json.dumps(want)}\nblockd: {json.dumps(got)}"


def case_full_while_writing(binary, tmp):
    for compress in (False, True):
        sub = os.path.join(tmp, "c" if compress else "p")
        os.makedirs(sub)
        src = qcow2(sub, "src.qcow2", "32M")
        sh("qemu-io", "-c", "write -P 0x11 0 8M", "-c", "write -P 0x22 12M 4M", "-c", "write -z 20M 1M", src)
        ref = os.path.join(sub, "ref.raw")
        sh("qemu-img", "convert", "-O", "raw", src, ref)
        tgt = qcow2(sub, "tgt.qcow2", "32M")
        d, m = start(binary, sub)
        try:
            add_qcow2(m, "src", src)
            add_qcow2(m, "tgt", tgt)
            url = export(m, sub, "src")
            r = m.cmd("blockdev-backup", {"job-id": "b", "device": "src", "target": "tgt", "sync": "full",
                                          "speed": 8 * MB, "compress": compress})
            assert r == {"return": {}}, r
            # The guest overwrites old data, zeroes and holes while the job still copies.
            nbd_write(url, "write -P 0x33 0 64k", "write -P 0x44 7M 2M", "write -P 0x55 13M 64k",
                      "write -P 0x66 20M 512k", "write -P 0x77 30M 1M", "write -z 1M 1M")
            jobs = m.cmd("query-block-jobs")["return"]
            assert jobs and jobs[0]["type"] == "backup" and jobs[0]["status"] == "running", jobs
            assert m.cmd("block-job-set-speed", {"device": "b", "speed": 0}) == {"return": {}}
            m.wait("BLOCK_JOB_COMPLETED", lambda x: x["device"] == "b" and "error" not in x)
            wait_job(m, "b")
            names = [n["node-name"] for n in m.cmd("query-named-block-nodes")["return"]]
            assert not any(n.startswith("blockd-backup") for n in names), names
            nbd_write(url, "read -P 0x44 7M 2M")  # the export serves the source again, new data
        finally:
            d.stop()
        sh("qemu-img", "check", tgt)
        sh("qemu-img", "compare", "-f", "qcow2", "-F", "raw", tgt, ref)
        sh("qemu-io", "-f", "qcow2", "-c", "read -P 0x77 30M 1M", src)
        if compress:
            plain = os.path.getsize(os.path.join(tmp, "p", "tgt.qcow2"))
            assert os.path.getsize(tgt) < plain / 4, (os.path.getsize(tgt), plain)


def case_sync_top_and_none(binary, tmp):
    base = qcow2(tmp, "base.qcow2")
    sh("qemu-io", "-c", "write -P 0x11 0 4M", base)
    top = qcow2(tmp, "top.qcow2", backing=base)
    sh("qemu-io", "-c", "write -P 0x22 1M 1M", "-c", "write -P 0x23 8M 64k", top)
    ref = os.path.join(tmp, "ref.raw")
    sh("qemu-img", "convert", "-O", "raw", top, ref)
    ttop = qcow2(tmp, "ttop.qcow2", backing=base)
    tnone = qcow2(tmp, "tnone.qcow2")
    d, m = start(binary, tmp)
    try:
        add_qcow2(m, "top", top)
        add_qcow2(m, "ttop", ttop)
        assert m.cmd("blockdev-add", {"driver": "qcow2", "node-name": "tnone", "backing": None,
                                      "file": {"driver": "file", "filename": tnone}}) == {"return": {}}
        assert m.cmd("blockdev-backup", {"job-id": "t", "device": "top", "target": "ttop", "sync": "top",
                                         "filter-node-name": "tf", "speed": 1}) == {"return": {}}
        # The sync=top filter marks what the top does not hold as done without copying it: a point-in-time
        # view over it would be incomplete, so blockd refuses one.
        if binary != QSD:
            r = m.cmd("blockdev-add", {"driver": "snapshot-access", "node-name": "v", "file": "tf"})
            assert "backup job with sync=top" in r["error"]["desc"], r
        assert m.cmd("block-job-set-speed", {"device": "t", "speed": 0}) == {"return": {}}
        wait_job(m, "t")
        url = export(m, tmp, "top")
        assert m.cmd("blockdev-backup", {"job-id": "n", "device": "top", "target": "tnone", "sync": "none"}) == {"return": {}}
        nbd_write(url, "write -P 0x99 0 64k", "write -P 0x98 1M 64k", "write -P 0x97 15M 64k")
        jobs = m.cmd("query-block-jobs")["return"]
        assert jobs[0]["status"] == "running", jobs  # sync=none runs until cancelled
        assert m.cmd("block-job-cancel", {"device": "n"}) == {"return": {}}
        m.wait("BLOCK_JOB_CANCELLED")
        wait_job(m, "n")
    finally:
        d.stop()
    sh("qemu-img", "check", ttop)
    sh("qemu-img", "compare", "-f", "qcow2", "-F", "raw", ttop, ref)
    # Only the top's clusters were copied: the base's data is not in the target's own layer.
    mp = json.loads(sh("qemu-img", "map", "--output=json", ttop))
    own = sum(e["length"] for e in mp if e["depth"] == 0 and e["data"])
    assert own == MB + 65536, mp
    sh("qemu-img", "check", tnone)
    sh("qemu-io", "-f", "qcow2", "-c", "read -P 0x11 0 64k", "-c", "read -P 0x22 1M 64k", "-c", "read -P 0 15M 64k",
       "-c", "read -P 0 2M 1M", tnone)
    mp = json.loads(sh("qemu-img", "map", "--output=json", tnone))
    assert sum(e["length"] for e in mp if e["data"]) == 2 * 65536, mp


def bitmap_counts(binary, tmp):
    os.makedirs(tmp, exist_ok=True)
    src = qcow2(tmp, "src.qcow2")
    out = []
    d, m = start(binary, tmp)
    try:
        add_qcow2(m, "src", src)
        url = export(m, tmp, "src")
        assert m.cmd("block-dirty-bitmap-add", {"node": "src", "name": "bm", "granularity": 65536}) == {"return": {}}
        nbd_write(url, "write -P 1 0 1M", "write -P 2 4M 256k")
        for i, mode in enumerate(("never", "on-success", "always")):
            tgt = qcow2(tmp, f"t{i}.qcow2")
            add_qcow2(m, f"t{i}", tgt)
            if mode == "on-success":
                nbd_write(url, "write -P 3 8M 128k")
            r = m.cmd("blockdev-backup", {"job-id": f"j{i}", "device": "src", "target": f"t{i}", "sync": "bitmap",
                                          "bitmap": "bm", "bitmap-mode": mode})
            out.append(r)
            wait_job(m, f"j{i}")
            bm = [b for n in m.cmd("query-named-block-nodes")["return"] if n["node-name"] == "src"
                  for b in n.get("dirty-bitmaps", [])]
            out.append([(b["name"], b["count"], b["busy"], b["recording"]) for b in bm])
    finally:
        d.stop()
    for i in range(3):
        sh("qemu-img", "check", os.path.join(tmp, f"t{i}.qcow2"))
    # The first target holds exactly the bitmap's data: 1M of 1 and 256k of 2.
    sh("qemu-io", "-f", "qcow2", "-c", "read -P 1 0 1M", "-c", "read -P 2 4M 256k", "-c", "read -P 0 8M 128k",
       os.path.join(tmp, "t0.qcow2"))
    return out


def case_bitmap_modes_equal_qsd(binary, tmp):
    want = bitmap_counts(QSD, os.path.join(tmp, "qsd"))
    got = bitmap_counts(binary, os.path.join(tmp, "blockd"))
    assert want == got, f"\nQSD:    {want}\nblockd: {got}"
    # never keeps all, on-success empties it (nothing written during the job), always too (it succeeded).
    assert [x[0][1] for x in got[1::2]] == [MB + 256 * 1024, 0, 0], got


def case_always_keeps_uncopied_on_cancel(binary, tmp):
    src = qcow2(tmp, "src.qcow2")
    tgt = qcow2(tmp, "tgt.qcow2")
    d, m = start(binary, tmp)
    try:
        add_qcow2(m, "src", src)
        add_qcow2(m, "tgt", tgt)
        url = export(m, tmp, "src")
        assert m.cmd("block-dirty-bitmap-add", {"node": "src", "name": "bm", "granularity": 65536}) == {"return": {}}
        nbd_write(url, "write -P 1 0 8M")
        for mode, expect_all in (("on-success", True), ("always", False)):
            r = m.cmd("blockdev-backup", {"job-id": "j", "device": "src", "target": "tgt", "sync": "bitmap",
                                          "bitmap": "bm", "bitmap-mode": mode, "speed": 1 * MB})
            assert r == {"return": {}}, r
            bm = [b for n in m.cmd("query-named-block-nodes")["return"] if n["node-name"] == "src"
                  for b in n.get("dirty-bitmaps", [])][0]
            assert bm["busy"] is True, bm
            nbd_write(url, "write -P 5 12M 64k")  # a write during the job
            assert m.cmd("block-job-cancel", {"device": "j"}) == {"return": {}}
            m.wait("BLOCK_JOB_CANCELLED")
            wait_job(m, "j")
            bm = [b for n in m.cmd("query-named-block-nodes")["return"] if n["node-name"] == "src"
                  for b in n.get("dirty-bitmaps", [])][0]
            assert not bm["busy"], bm
            if expect_all:
                assert bm["count"] == 8 * MB + 65536, bm  # the failed on-success job changed nothing but records
            else:
                # what was not copied plus the write during the job; something was copied before the cancel
                assert 65536 < bm["count"] < 8 * MB + 65536, bm
    finally:
        d.stop()


def case_incremental_chain(binary, tmp):
    src = qcow2(tmp, "src.qcow2", "32M")
    sh("qemu-io", "-c", "write -P 0x10 0 6M", "-c", "write -P 0x1f 20M 2M", src)
    d, m = start(binary, tmp)
    chain = []
    try:
        add_qcow2(m, "src", src)
        url = export(m, tmp, "src")
        assert m.cmd("block-dirty-bitmap-add", {"node": "src", "name": "inc"}) == {"return": {}}
        full = qcow2(tmp, "full.qcow2", "32M")
        add_qcow2(m, "full", full)
        r = m.cmd("blockdev-backup", {"job-id": "full", "device": "src", "target": "full", "sync": "full",
                                      "bitmap": "inc", "bitmap-mode": "on-success"})
        assert r == {"return": {}}, r
        wait_job(m, "full")
        assert m.cmd("blockdev-del", {"node-name": "full"}) == {"return": {}}
        chain.append(full)
        prev = full
        writes = [("write -P 0x21 1M 128k", "write -P 0x22 10M 3M"),
                  ("write -P 0x31 10M 64k", "write -z 20M 1M", "write -P 0x32 31M 1M"),
                  ("write -P 0x41 0 4k", "discard 5M 1M", "write -P 0x42 16M 64k")]
        for i, w in enumerate(writes):
            nbd_write(url, *w)
            inc = qcow2(tmp, f"inc{i}.qcow2", "32M", backing=prev)
            add_qcow2(m, f"inc{i}", inc)
            r = m.cmd("blockdev-backup", {"job-id": f"i{i}", "device": "src", "target": f"inc{i}",
                                          "sync": "incremental", "bitmap": "inc"})
            assert r == {"return": {}}, r
            m.wait("BLOCK_JOB_COMPLETED", lambda x, i=i: x["device"] == f"i{i}" and "error" not in x)
            wait_job(m, f"i{i}")
            assert m.cmd("blockdev-del", {"node-name": f"inc{i}"}) == {"return": {}}
            chain.append(inc)
            prev = inc
    finally:
        d.stop()
    for p in chain:
        sh("qemu-img", "check", p)
    # Restored in order: the last incremental over the ones before it equals the source now.
    sh("qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", chain[-1], src)
    # And each incremental holds only what its round wrote (the first: 128k + 3M).
    mp = json.loads(sh("qemu-img", "map", "--output=json", chain[1]))
    assert sum(e["length"] for e in mp if e["depth"] == 0 and e["data"]) == 128 * 1024 + 3 * MB, mp


def case_pause_resume_cancel(binary, tmp):
    src = qcow2(tmp, "src.qcow2")
    sh("qemu-io", "-c", "write -P 0x11 0 16M", src)
    tgt = qcow2(tmp, "tgt.qcow2")
    d, m = start(binary, tmp)
    try:
        add_qcow2(m, "src", src)
        add_qcow2(m, "tgt", tgt)
        r = m.cmd("blockdev-backup", {"job-id": "b", "device": "src", "target": "tgt", "sync": "full",
                                      "speed": 2 * MB, "filter-node-name": "cbw0"})
        assert r == {"return": {}}, r
        m.names()  # created, running, paused, running (the start's drain) came before the return
        names = [n["node-name"] for n in m.cmd("query-named-block-nodes")["return"]]
        assert "cbw0" in names, names
        assert m.cmd("block-job-pause", {"device": "b"}) == {"return": {}}
        m.wait("JOB_STATUS_CHANGE", lambda x: x == {"id": "b", "status": "paused"})
        j = m.cmd("query-block-jobs")["return"][0]
        assert j["paused"] and j["status"] == "paused" and j["speed"] == 2 * MB, j
        off = j["offset"]
        assert off < 16 * MB, j
        assert m.cmd("block-job-resume", {"device": "b"}) == {"return": {}}
        m.wait("JOB_STATUS_CHANGE", lambda x: x == {"id": "b", "status": "running"})
        assert m.cmd("block-job-cancel", {"device": "b"}) == {"return": {}}
        ev = m.wait("BLOCK_JOB_CANCELLED")
        assert ev["type"] == "backup" and ev["len"] == 16 * MB and ev["offset"] < 16 * MB, ev
        wait_job(m, "b")
        names = [n["node-name"] for n in m.cmd("query-named-block-nodes")["return"]]
        assert "cbw0" not in names, names
        # The source is free again: another backup with the same filter name runs to the end.
        r = m.cmd("blockdev-backup", {"job-id": "b", "device": "src", "target": "tgt", "sync": "full",
                                      "filter-node-name": "cbw0"})
        assert r == {"return": {}}, r
        wait_job(m, "b")
    finally:
        d.stop()
    sh("qemu-img", "compare", src, tgt)


def case_drive_backup(binary, tmp):
    src = qcow2(tmp, "src.qcow2")
    sh("qemu-io", "-c", "write -P 0x5a 1M 3M", src)
    tgt = os.path.join(tmp, "new.qcow2")
    d, m = start(binary, tmp)
    try:
        add_qcow2(m, "src", src)
        r = m.cmd("drive-backup", {"job-id": "d", "device": "src", "target": tgt, "sync": "full"})
        assert r == {"return": {}}, r
        wait_job(m, "d")
        names = [n["node-name"] for n in m.cmd("query-named-block-nodes")["return"]]
        assert names == ["src", names[1]] and len(names) == 2, names  # the job's target node is closed
    finally:
        d.stop()
    sh("qemu-img", "check", tgt)
    sh("qemu-img", "compare", src, tgt)


def run_transactions(binary, tmp):
    os.makedirs(tmp, exist_ok=True)
    src = qcow2(tmp, "src.qcow2", "32M")
    sh("qemu-io", "-c", "write -P 0x11 0 8M", src)
    bad = os.path.join(tmp, "bad.raw")
    sh("qemu-img", "create", "-q", "-f", "raw", bad, "32M")
    d, m = start(binary, tmp)
    out = []

    def finals(*ids):
        seen, left = {}, set(ids)
        import time
        end = time.monotonic() + 30
        while left and time.monotonic() < end:
            msg = m.c.line() if not m.events else m.events.pop(0)
            if msg.get("event") in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"):
                seen[msg["data"]["device"]] = (msg["event"], "error" in msg["data"])
            if msg.get("event") == "JOB_STATUS_CHANGE" and msg["data"].get("status") == "null":
                left.discard(msg["data"]["id"])
        assert not left, left
        return sorted(seen.items())
    try:
        add_qcow2(m, "q0", src)
        for n in ("t0", "t1", "t2"):
            assert m.cmd("blockdev-add", {"driver": "null-co", "node-name": n, "size": 32 * MB}) == {"return": {}}
        assert m.cmd("blockdev-add", {"driver": "raw", "node-name": "tbad", "file": {
            "driver": "blkdebug", "inject-error": [{"event": "write_aio", "errno": 5}],
            "image": {"driver": "file", "filename": bad}}}) == {"return": {}}
        acts = [{"type": "blockdev-backup", "data": {"job-id": "j1", "device": "q0", "target": "t0", "sync": "full"}},
                {"type": "blockdev-backup", "data": {"job-id": "j2", "device": "q0", "target": "t1", "sync": "full"}}]
        out.append(m.cmd("transaction", {"actions": acts, "properties": {"completion-mode": "grouped"}}))
        # Before the return (QSD's T96): both created, each started under the drain, then let go.
        out.append([(e["event"], e["data"]) for e in m.events if e["event"] == "JOB_STATUS_CHANGE"])
        out.append(finals("j1", "j2"))
        # A failing member of a group takes the others with it.
        acts = [{"type": "blockdev-backup", "data": {"job-id": "j3", "device": "q0", "target": "t2", "sync": "full",
                                                      "speed": 4 * MB}},
                {"type": "blockdev-backup", "data": {"job-id": "j4", "device": "q0", "target": "tbad", "sync": "full"}}]
        out.append(m.cmd("transaction", {"actions": acts, "properties": {"completion-mode": "grouped"}}))
        out.append(finals("j3", "j4"))
        # A later action's failure undoes the backup before it; a non-job action refuses grouped.
        acts = [{"type": "blockdev-backup", "data": {"job-id": "j5", "device": "q0", "target": "t0", "sync": "full",
                                                      "speed": 1 * MB}},
                {"type": "abort", "data": {}}]
        out.append(m.cmd("transaction", {"actions": acts}))
        acts = [{"type": "block-dirty-bitmap-add", "data": {"node": "q0", "name": "bm0"}}] + acts[:1]
        out.append(m.cmd("transaction", {"actions": acts, "properties": {"completion-mode": "grouped"}}))
        # QSD never starts the aborted job; blockd started it in prepare and its abort cancelled it.
        # Either way no job is left once the cancelled one (if any) reached null.
        if [j["id"] for j in m.cmd("query-jobs")["return"]]:
            finals("j5")
        out.append(m.cmd("query-jobs")["return"])
        # And no filter of theirs is left in the graph.
        out.append(sorted(n["node-name"] for n in m.cmd("query-named-block-nodes")["return"]
                          if not n["node-name"].startswith("#")))
    finally:
        d.stop()
    return out


def case_transactions_equal_qsd(binary, tmp):
    want = run_transactions(QSD, os.path.join(tmp, "qsd"))
    got = run_transactions(binary, os.path.join(tmp, "blockd"))
    assert want == got, f"\nQSD:    {want}\nblockd: {got}"


def top_completion(binary, tmp):
    os.makedirs(tmp, exist_ok=True)
    base = qcow2(tmp, "base.qcow2")
    sh("qemu-io", "-c", "write -P 0x11 0 4M", base)
    top = qcow2(tmp, "top.qcow2", backing=base)
    sh("qemu-io", "-c", "write -P 0x22 1M 1M", "-c", "write -P 0x23 8M 64k", "-c", "write -z 12M 128k", top)
    ttop = qcow2(tmp, "ttop.qcow2", backing=base)
    d, m = start(binary, tmp)
    try:
        add_qcow2(m, "top", top)
        add_qcow2(m, "ttop", ttop)
        assert m.cmd("blockdev-backup", {"job-id": "t", "device": "top", "target": "ttop", "sync": "top"}) == {"return": {}}
        return m.wait("BLOCK_JOB_COMPLETED")
    finally:
        d.stop()


def case_sync_top_len_equal_qsd(binary, tmp):
    # sync=top: what the top does not hold leaves the job's total (QSD's len and offset are what it copied).
    want = top_completion(QSD, os.path.join(tmp, "qsd"))
    got = top_completion(binary, os.path.join(tmp, "blockd"))
    assert want == got, (want, got)


CASES = [case_errors_equal_qsd, case_events_equal_qsd, case_full_while_writing, case_sync_top_and_none,
         case_bitmap_modes_equal_qsd, case_always_keeps_uncopied_on_cancel, case_incremental_chain,
         case_pause_resume_cancel, case_drive_backup, case_transactions_equal_qsd, case_sync_top_len_equal_qsd]


if __name__ == "__main__":
    sys.exit(run_cases(CASES, "blockd-backup-", ("qemu-img", "qemu-io", QSD)))

# block-stream and the block-job verbs against qemu-storage-daemon and QEMU's tools; ctest runs it in one process.
"""Cases:
- the argument errors of block-stream, the block-job-* lookups and query-block-jobs equal QSD's, reply for reply;
- a stream with a base (and one of the whole chain) leaves an image that qemu-img check passes, whose backing file
  is the base (none), and whose guest view equals the chain's before the job (qemu-img compare); the job's events
  (auto-finalize off: PENDING, job-finalize, COMPLETED) come in QSD's order;
- a speed-limited stream pauses (paused event, paused/io-status in query-block-jobs as QSD), refuses a soft cancel
  while paused, and a force cancel ends it with BLOCK_JOB_CANCELLED, leaving the chain as it was;
- blockdev-del of an image the job copies from is refused with QSD's op-blocker text;
- a read error under on-error=stop pauses the job with BLOCK_JOB_ERROR and io-status failed, job-resume retries and
  the job completes; on-error=report ends it with the error.
Exit 77 when qemu-img/qemu-io/qemu-storage-daemon are missing."""
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qmp_harness import Client, Daemon, monitor_args, run_cases, DEADLINE  # noqa: E402

QSD = "qemu-storage-daemon"


class Mon:
    """QMP with an event log, so a job's steps are awaited by their events."""

    def __init__(self, path):
        self.c = Client.unix(path)
        self.c.negotiate()
        self.events = []

    def cmd(self, name, args=None):
        req = {"execute": name}
        if args is not None:
            req["arguments"] = args
        self.c.send(json.dumps(req) + "\n")
        while True:
            msg = self.c.line()
            if "event" in msg:
                self.events.append(msg)
                continue
            return msg

    def wait(self, name, pred=lambda d: True):
        """Waits for the event, consuming it and everything before it."""
        end = time.monotonic() + DEADLINE
        while True:
            for i, e in enumerate(self.events):
                if e["event"] == name and pred(e.get("data", {})):
                    del self.events[:i + 1]
                    return e.get("data", {})
            if time.monotonic() > end:
                raise AssertionError(f"no {name}: {self.events}")
            self.events.append(self.c.line())

    def names(self):
        """The events so far, without timestamps, consumed."""
        out = [(e["event"], e.get("data")) for e in self.events]
        self.events = []
        return out


def sh(*cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise AssertionError(f"{cmd} failed: {r.stdout}{r.stderr}")
    return r.stdout


def make_chain(tmp):
    """base (1 MiB of 0x11 at 0) <- mid (0x33 at 2M, and over base at 512K) <- top (0x22 at 4M)."""
    b, m, t = (os.path.join(tmp, n + ".qcow2") for n in ("base", "mid", "top"))
    sh("qemu-img", "create", "-q", "-f", "qcow2", b, "16M")
    sh("qemu-io", "-c", "write -P 0x11 0 1M", b)
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", b, "-F", "qcow2", m)
    sh("qemu-io", "-c", "write -P 0x33 2M 1M", "-c", "write -P 0x44 512k 64k", m)
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", m, "-F", "qcow2", t)
    sh("qemu-io", "-c", "write -P 0x22 4M 1M", t)
    flat = os.path.join(tmp, "flat.raw")
    sh("qemu-img", "convert", "-O", "raw", t, flat)
    return b, m, t, flat


def start(binary, tmp):
    args, path = monitor_args(tmp)
    d = Daemon(binary, args, tmp)
    return d, Mon(path)


def add_chain(m, b, mid, t, blkdebug_mid=None):
    assert m.cmd("blockdev-add", {"driver": "qcow2", "node-name": "base",
                                  "file": {"driver": "file", "filename": b}}) == {"return": {}}
    mfile = {"driver": "file", "filename": mid}
    if blkdebug_mid:
        mfile = {"driver": "blkdebug", "image": mfile, **blkdebug_mid}
    assert m.cmd("blockdev-add", {"driver": "qcow2", "node-name": "mid", "file": mfile, "backing": "base"}) == {"return": {}}
    assert m.cmd("blockdev-add", {"driver": "qcow2", "node-name": "top",
                                  "file": {"driver": "file", "filename": t}, "backing": "mid"}) == {"return": {}}


def backing_of(path):
    info = json.loads(sh("qemu-img", "info", "--output=json", path))
    return info.get("backing-filename")


def run_errors(binary, tmp):
    os.makedirs(tmp, exist_ok=True)
    b, mid, t, _ = make_chain(tmp)
    lone = os.path.join(tmp, "lone.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", lone, "1M")
    d, m = start(binary, tmp)
    out = []
    try:
        add_chain(m, b, mid, t)
        assert m.cmd("blockdev-add", {"driver": "qcow2", "node-name": "lone",
                                      "file": {"driver": "file", "filename": lone}}) == {"return": {}}
        for args in ({"device": "nope"}, {"device": "top"},
                     {"job-id": "s", "device": "top", "base": "x", "base-node": "y"},
                     {"job-id": "s", "device": "top", "bottom": "x", "base-node": "y"},
                     {"job-id": "s", "device": "top", "base-node": "nope"},
                     {"job-id": "s", "device": "top", "base-node": "lone"},
                     {"job-id": "s", "device": "top", "base-node": "top"},
                     {"job-id": "s", "device": "top", "base": "/nonexist"},
                     {"job-id": "s", "device": "top", "bottom": "nope"},
                     {"job-id": "s", "device": "top", "backing-file": "foo"},
                     {"job-id": "s", "device": "top", "filter-node-name": "1bad"},
                     {"job-id": "1bad", "device": "top"},
                     {"job-id": "s", "device": "top", "speed": -5}):
            out.append(m.cmd("block-stream", args))
            out.append(m.names())
        for cmd, args in (("block-job-set-speed", {"device": "nope", "speed": 1}),
                          ("block-job-cancel", {"device": "nope"}), ("block-job-pause", {"device": "nope"}),
                          ("block-job-resume", {"device": "nope"}), ("block-job-complete", {"device": "nope"}),
                          ("block-job-dismiss", {"id": "nope"}), ("block-job-finalize", {"id": "nope"}),
                          ("query-block-jobs", None)):
            out.append(m.cmd(cmd, args))
        # A job with nothing to copy ends before the command returns.
        out.append(m.cmd("block-stream", {"job-id": "s", "device": "lone"}))
        out.append(m.names())
    finally:
        d.stop()
    return out


def same_as_qsd(script, binary, tmp):
    """Runs script(daemon, dir) against QSD and blockd; their outputs (lists) must be equal item by item."""
    want = script(QSD, os.path.join(tmp, "qsd"))
    got = script(binary, os.path.join(tmp, "blockd"))
    bad = [(i, w, g) for i, (w, g) in enumerate(zip(want, got)) if w != g]
    assert not bad and len(want) == len(got), \
        "differences (index, QSD, blockd):\n" + "\n".join(json.dumps(x) for x in bad) + f"\nlengths {len(want)} {len(got)}"


def case_errors_equal_qsd(binary, tmp):
    same_as_qsd(run_errors, binary, tmp)


def stream_events(binary, tmp, base_node):
    os.makedirs(tmp, exist_ok=True)
    b, mid, t, flat = make_chain(tmp)
    d, m = start(binary, tmp)
    try:
        add_chain(m, b, mid, t)
        args = {"job-id": "s1", "device": "top", "auto-finalize": False}
        if base_node:
            args["base-node"] = base_node
        assert m.cmd("block-stream", args) == {"return": {}}
        m.wait("BLOCK_JOB_PENDING")
        info = m.cmd("query-block-jobs")["return"]
        assert m.cmd("job-finalize", {"id": "s1"}) == {"return": {}}
        m.wait("JOB_STATUS_CHANGE", lambda x: x == {"id": "s1", "status": "null"})
        assert m.cmd("query-block-jobs") == {"return": []}
    finally:
        d.stop()
    return info, t, flat, b


def case_stream_data_and_events(binary, tmp):
    for base_node in ("base", None):
        sub = os.path.join(tmp, "with-base" if base_node else "whole")
        want, _, _, _ = stream_events(QSD, os.path.join(sub, "qsd"), base_node)
        got, t, flat, b = stream_events(binary, os.path.join(sub, "blockd"), base_node)
        assert want == got, (want, got)
        sh("qemu-img", "check", t)
        assert backing_of(t) == (b if base_node else None), backing_of(t)
        sh("qemu-img", "compare", "-f", "qcow2", "-F", "raw", t, flat)
        if base_node:
            # Only what lay above the base was copied: the base's cluster at 0 still comes from it.
            m = json.loads(sh("qemu-img", "map", "--output=json", t))
            at0 = [e for e in m if e["start"] == 0][0]
            assert at0["depth"] == 1, m


def case_pause_cancel(binary, tmp):
    outs = []
    for name, bin_ in (("qsd", QSD), ("blockd", binary)):
        sub = os.path.join(tmp, name)
        os.makedirs(sub)
        b, mid, t, _ = make_chain(sub)
        d, m = start(bin_, sub)
        out = []
        try:
            add_chain(m, b, mid, t)
            assert m.cmd("block-stream", {"job-id": "s1", "device": "top", "base-node": "base",
                                          "speed": 1024}) == {"return": {}}
            out.append(m.cmd("blockdev-del", {"node-name": "mid"}))
            out.append(m.cmd("block-stream", {"job-id": "s2", "device": "mid"}))
            assert m.cmd("block-job-pause", {"device": "s1"}) == {"return": {}}
            m.wait("JOB_STATUS_CHANGE", lambda x: x == {"id": "s1", "status": "paused"})
            j = m.cmd("query-block-jobs")["return"][0]
            out.append({k: j[k] for k in ("status", "paused", "speed", "io-status", "ready", "type", "len")})
            out.append(m.cmd("block-job-pause", {"device": "s1"}))
            out.append(m.cmd("block-job-cancel", {"device": "s1"}))
            out.append(m.cmd("block-job-set-speed", {"device": "s1", "speed": -1}))
            out.append(m.cmd("block-job-cancel", {"device": "s1", "force": True}))
            m.wait("BLOCK_JOB_CANCELLED")
            m.wait("JOB_STATUS_CHANGE", lambda x: x == {"id": "s1", "status": "null"})
            out.append(m.cmd("query-block-jobs"))
        finally:
            d.stop()
        sh("qemu-img", "check", t)
        assert backing_of(t) == mid, backing_of(t)
        outs.append(out)
    assert outs[0] == outs[1], outs


def case_error_policies(binary, tmp):
    b, mid, t, flat = make_chain(tmp)
    # Reads of mid's data cluster fail once (blkdebug's read_aio event, one shot).
    rule = {"inject-error": [{"event": "read_aio", "errno": 5, "once": True}]}
    d, m = start(binary, tmp)
    try:
        add_chain(m, b, mid, t, blkdebug_mid=rule)
        assert m.cmd("block-stream", {"job-id": "s1", "device": "top", "on-error": "stop"}) == {"return": {}}
        e = m.wait("BLOCK_JOB_ERROR")
        assert e == {"device": "s1", "operation": "read", "action": "stop"}, e
        m.wait("JOB_STATUS_CHANGE", lambda x: x == {"id": "s1", "status": "paused"})
        j = m.cmd("query-block-jobs")["return"][0]
        assert j["io-status"] == "failed" and j["paused"], j
        assert m.cmd("job-resume", {"id": "s1"}) == {"return": {}}
        m.wait("BLOCK_JOB_COMPLETED")
        assert m.cmd("blockdev-del", {"node-name": "top"}) == {"return": {}}
        assert m.cmd("blockdev-del", {"node-name": "mid"}) == {"return": {}}
        # on-error=report: the job ends with the error.
        assert m.cmd("blockdev-add", {"driver": "qcow2", "node-name": "mid2", "file": {
            "driver": "blkdebug", "image": {"driver": "file", "filename": mid}, **rule}, "backing": "base"}) == {"return": {}}
        t2 = os.path.join(tmp, "top2.qcow2")
        sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", mid, "-F", "qcow2", t2)
        assert m.cmd("blockdev-add", {"driver": "qcow2", "node-name": "top2", "file": {
            "driver": "file", "filename": t2}, "backing": "mid2"}) == {"return": {}}
        assert m.cmd("block-stream", {"job-id": "s2", "device": "top2"}) == {"return": {}}
        e = m.wait("BLOCK_JOB_ERROR")
        assert e["action"] == "report", e
        c = m.wait("BLOCK_JOB_COMPLETED")
        assert c.get("error") == "Input/output error", c
    finally:
        d.stop()
    sh("qemu-img", "check", t)
    sh("qemu-img", "compare", "-f", "qcow2", "-F", "raw", t, flat)
    assert backing_of(t) is None


def case_iothread_and_quit(binary, tmp):
    """A stream on an iothread's node copies like one on the main loop; quit mid-job cancels it cleanly."""
    b, mid, t, flat = make_chain(tmp)
    args, path = monitor_args(tmp)
    d = Daemon(binary, args + ["--object", "iothread,id=io1"], tmp)
    m = Mon(path)
    try:
        add_chain(m, b, mid, t)
        for n in ("base", "mid", "top"):
            assert m.cmd("x-blockdev-set-iothread", {"node-name": n, "iothread": "io1"}) == {"return": {}}
        assert m.cmd("block-stream", {"job-id": "s1", "device": "top", "base-node": "base"}) == {"return": {}}
        m.wait("BLOCK_JOB_COMPLETED")
        m.wait("JOB_STATUS_CHANGE", lambda x: x == {"id": "s1", "status": "null"})
        # The filter is gone with the job: the top can go, and mid with it.
        assert m.cmd("blockdev-del", {"node-name": "top"}) == {"return": {}}
        sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", mid, "-F", "qcow2", t)
        assert m.cmd("blockdev-add", {"driver": "qcow2", "node-name": "top",
                                      "file": {"driver": "file", "filename": t}, "backing": "mid"}) == {"return": {}}
        assert m.cmd("block-stream", {"job-id": "s2", "device": "top", "speed": 1}) == {"return": {}}
        r = m.cmd("x-blockdev-set-iothread", {"node-name": "top", "iothread": None})
        assert "is busy: block device is in use by block job: stream" in r["error"]["desc"], r
        assert m.cmd("quit") == {"return": {}}
        names = [e for e, _ in m.names()]
        assert "BLOCK_JOB_CANCELLED" in names, names
        assert d.proc.wait(DEADLINE) == 0
    finally:
        d.stop()
    sh("qemu-img", "check", t)
    assert backing_of(t) == mid


CASES = [case_errors_equal_qsd, case_iothread_and_quit, case_stream_data_and_events, case_pause_cancel, case_error_policies]


if __name__ == "__main__":
    sys.exit(run_cases(CASES, "blockd-stream-", ("qemu-img", "qemu-io", QSD)))

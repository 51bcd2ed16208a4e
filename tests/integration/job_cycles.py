"""Job cycles for the RSS checks (tests/integration/test_job_rss.py, bench/job-rss): a daemon (blockd or
qemu-storage-daemon) in a temp dir, one kind of job cycle run N times over QMP (each cycle waits on the job's
concluded event, never a sleep, and dismisses it), and the daemon's resident memory read from /proc."""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qmp_harness import Client, Daemon, monitor_args, thread_names  # noqa: E402

DEADLINE = 30.0
SIZE = 1 << 20


class Mon:
    """QMP with the events kept apart: cmd() returns the reply, wait_concluded() consumes the job's events."""

    def __init__(self, path):
        self.c = Client.unix(path)
        self.c.sock.settimeout(DEADLINE)
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
            else:
                return msg

    def ok(self, name, args=None):
        r = self.cmd(name, args)
        if r != {"return": {}}:
            raise AssertionError(f"{name} {args}: {r}")

    def wait_concluded(self, job):
        end = time.monotonic() + DEADLINE
        while True:
            for i, e in enumerate(self.events):
                if e["event"] == "JOB_STATUS_CHANGE" and e["data"] == {"id": job, "status": "concluded"}:
                    del self.events[:i + 1]
                    return
            if time.monotonic() > end:
                raise AssertionError(f"job {job} did not conclude; events: {self.events[-10:]}")
            msg = self.c.line()
            if "event" in msg:
                self.events.append(msg)

    def run_job(self, command, args):
        """Starts a job, waits until it concluded, checks it had no error, dismisses it."""
        self.ok(command, args)
        self.wait_concluded(args["job-id"])
        jobs = self.cmd("query-jobs")["return"]
        mine = [j for j in jobs if j["id"] == args["job-id"]]
        if not mine or "error" in mine[0]:
            raise AssertionError(f"{command} {args}: {mine}")
        self.ok("job-dismiss", {"id": args["job-id"]})
        # Keep nothing of the cycle here either (the events the dismiss sent are not looked at).
        self.events.clear()


# ---- the kinds of cycle: setup(m, tmp) once, then cycle(m, tmp, i) N times -----------------------

def file_setup(m, tmp):
    pass


def file_cycle(m, tmp, i):
    # blockdev-create of a file by name (the driver creates and truncates it; no node involved).
    m.run_job("blockdev-create", {"job-id": "j", "options": {"driver": "file", "filename": f"{tmp}/f.img",
                                                             "size": SIZE}})


def qcow2_cycle(m, tmp, i):
    # The task's cycle: file created, a file node added over it, qcow2 created on the node, node deleted.
    img = f"{tmp}/q.qcow2"
    m.run_job("blockdev-create", {"job-id": "j", "options": {"driver": "file", "filename": img, "size": 0}})
    m.ok("blockdev-add", {"driver": "file", "filename": img, "node-name": "qf"})
    m.run_job("blockdev-create", {"job-id": "j", "options": {"driver": "qcow2", "file": "qf", "size": SIZE}})
    m.ok("blockdev-del", {"node-name": "qf"})


def qcow2_inline_setup(m, tmp):
    open(f"{tmp}/q.qcow2", "w").close()


def qcow2_inline_cycle(m, tmp, i):
    # qcow2 on inline file options: the job opens a node of its own and closes it when it lets go.
    m.run_job("blockdev-create", {"job-id": "j", "options": {
        "driver": "qcow2", "file": {"driver": "file", "filename": f"{tmp}/q.qcow2"}, "size": SIZE}})


def luks_setup(m, tmp):
    m.ok("object-add", {"qom-type": "secret", "id": "s0", "data": "pass0"})
    m.ok("object-add", {"qom-type": "secret", "id": "s1", "data": "pass1"})


def luks_cycle(m, tmp, i):
    img = f"{tmp}/l.luks"
    open(img, "w").close()
    m.ok("blockdev-add", {"driver": "file", "filename": img, "node-name": "lf"})
    m.run_job("blockdev-create", {"job-id": "j", "options": {"driver": "luks", "file": "lf", "size": SIZE,
                                                             "key-secret": "s0", "iter-time": 1}})
    m.ok("blockdev-del", {"node-name": "lf"})


def amend_qcow2_setup(m, tmp):
    qcow2_cycle(m, tmp, 0)
    m.ok("blockdev-add", {"driver": "qcow2", "node-name": "q0",
                          "file": {"driver": "file", "filename": f"{tmp}/q.qcow2"}})


def amend_qcow2_cycle(m, tmp, i):
    m.run_job("x-blockdev-amend", {"job-id": "j", "node-name": "q0", "options": {"driver": "qcow2"}})


def amend_luks_setup(m, tmp):
    luks_setup(m, tmp)
    luks_cycle(m, tmp, 0)
    m.ok("blockdev-add", {"driver": "luks", "node-name": "l0", "key-secret": "s0",
                          "file": {"driver": "file", "filename": f"{tmp}/l.luks"}})


def amend_luks_cycle(m, tmp, i):
    # Each cycle is two amend jobs: slot 1 added, then erased again (slot 0 keeps the image open).
    m.run_job("x-blockdev-amend", {"job-id": "j", "node-name": "l0", "options": {
        "driver": "luks", "state": "active", "new-secret": "s1", "keyslot": 1, "iter-time": 1}})
    m.run_job("x-blockdev-amend", {"job-id": "j", "node-name": "l0", "options": {
        "driver": "luks", "state": "inactive", "keyslot": 1}})


# ---- block jobs: the images are made once (qemu-img), the nodes added and deleted around every job --------

def _sh(*cmd):
    import subprocess
    subprocess.run(cmd, check=True, capture_output=True)


def chain_setup(m, tmp):
    """base (0x11 over 0..256K) <- mid (0x33 over 256K..768K) <- top (0x22 over 768K..1M)."""
    b, mid, t = (f"{tmp}/{n}.qcow2" for n in ("base", "mid", "top"))
    _sh("qemu-img", "create", "-q", "-f", "qcow2", b, str(SIZE))
    _sh("qemu-io", "-c", "write -P 0x11 0 256k", b)
    _sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", b, "-F", "qcow2", mid)
    _sh("qemu-io", "-c", "write -P 0x33 256k 512k", mid)
    _sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", mid, "-F", "qcow2", t)
    _sh("qemu-io", "-c", "write -P 0x22 768k 256k", t)
    _sh("qemu-img", "create", "-q", "-f", "qcow2", f"{tmp}/tgt.qcow2", str(SIZE))


def _add_chain(m, tmp):
    # The backing of each node is named, so the header's backing file (which a stream or commit rewrote in
    # an earlier cycle) does not matter: every cycle runs on the same three-image chain.
    m.ok("blockdev-add", {"driver": "qcow2", "node-name": "base", "file": {"driver": "file", "filename": f"{tmp}/base.qcow2"}})
    m.ok("blockdev-add", {"driver": "qcow2", "node-name": "mid", "backing": "base",
                          "file": {"driver": "file", "filename": f"{tmp}/mid.qcow2"}})
    m.ok("blockdev-add", {"driver": "qcow2", "node-name": "top", "backing": "mid",
                          "file": {"driver": "file", "filename": f"{tmp}/top.qcow2"}})


def _del(m, *names):
    for n in names:
        m.ok("blockdev-del", {"node-name": n})


def _wait_event(m, name):
    end = time.monotonic() + DEADLINE
    while True:
        for i, e in enumerate(m.events):
            if e["event"] == name:
                del m.events[:i + 1]
                return e
        if time.monotonic() > end:
            raise AssertionError(f"no {name}; events: {m.events[-10:]}")
        msg = m.c.line()
        if "event" in msg:
            m.events.append(msg)


def stream_cycle(m, tmp, i):
    # The stream copies mid's data into the top; the top's header then names the base.
    _add_chain(m, tmp)
    m.run_job("block-stream", {"job-id": "j", "device": "top", "base-node": "base", "auto-dismiss": False})
    _del(m, "top", "mid", "base")


def commit_cycle(m, tmp, i):
    # Intermediate commit: mid's data goes into the base, the top is rebased onto it.
    _add_chain(m, tmp)
    m.run_job("block-commit", {"job-id": "j", "device": "top", "top-node": "mid", "base-node": "base",
                               "auto-dismiss": False})
    _del(m, "top", "mid", "base")


def _ready_job(m, command, args):
    m.ok(command, dict(args, **{"auto-dismiss": False}))
    _wait_event(m, "BLOCK_JOB_READY")
    m.ok("job-complete", {"id": args["job-id"]})
    m.wait_concluded(args["job-id"])
    jobs = [j for j in m.cmd("query-jobs")["return"] if j["id"] == args["job-id"]]
    if not jobs or "error" in jobs[0]:
        raise AssertionError(f"{command} {args}: {jobs}")
    m.ok("job-dismiss", {"id": args["job-id"]})
    m.events.clear()


def commit_active_cycle(m, tmp, i):
    # Active commit of the whole chain into the base: READY, then job-complete pivots the top's users.
    _add_chain(m, tmp)
    _ready_job(m, "block-commit", {"job-id": "j", "device": "top", "base-node": "base"})
    _del(m, "top", "mid", "base")


def mirror_cycle(m, tmp, i):
    # A full mirror of the chain's top into a fresh target, completed (pivot) at READY.
    _add_chain(m, tmp)
    m.ok("blockdev-add", {"driver": "qcow2", "node-name": "tgt", "file": {"driver": "file", "filename": f"{tmp}/tgt.qcow2"}})
    _ready_job(m, "blockdev-mirror", {"job-id": "j", "device": "top", "target": "tgt", "sync": "full"})
    _del(m, "tgt", "top", "mid", "base")


def _end_job(m, job, want_event):
    """Waits until the job concluded after `want_event` (COMPLETED with an error, or CANCELLED), dismisses it."""
    e = _wait_event(m, want_event)
    m.wait_concluded(job)
    m.ok("job-dismiss", {"id": job})
    m.events.clear()
    return e


def mirror_cancel_cycle(m, tmp, i):
    # A slow mirror force-cancelled while it copies: the cancel path's engine, hook and filter go too.
    _add_chain(m, tmp)
    m.ok("blockdev-add", {"driver": "qcow2", "node-name": "tgt", "file": {"driver": "file", "filename": f"{tmp}/tgt.qcow2"}})
    m.ok("blockdev-mirror", {"job-id": "j", "device": "top", "target": "tgt", "sync": "full", "speed": 65536,
                             "auto-dismiss": False})
    m.ok("block-job-cancel", {"device": "j", "force": True})
    _end_job(m, "j", "BLOCK_JOB_CANCELLED")
    _del(m, "tgt", "top", "mid", "base")


def stream_error_cycle(m, tmp, i):
    # A stream whose read of mid fails (blkdebug, on-error=report): the job ends with the error.
    m.ok("blockdev-add", {"driver": "qcow2", "node-name": "base", "file": {"driver": "file", "filename": f"{tmp}/base.qcow2"}})
    m.ok("blockdev-add", {"driver": "qcow2", "node-name": "mid", "backing": "base", "file": {
        "driver": "blkdebug", "image": {"driver": "file", "filename": f"{tmp}/mid.qcow2"},
        "inject-error": [{"event": "read_aio", "errno": 5}]}})
    m.ok("blockdev-add", {"driver": "qcow2", "node-name": "top", "backing": "mid",
                          "file": {"driver": "file", "filename": f"{tmp}/top.qcow2"}})
    # A fresh top each time would need qemu-img: this one's own data is all it holds, so the stream reads mid.
    m.ok("block-stream", {"job-id": "j", "device": "top", "auto-dismiss": False})
    e = _end_job(m, "j", "BLOCK_JOB_COMPLETED")
    if "error" not in e["data"]:
        raise AssertionError(f"the stream did not fail: {e}")
    _del(m, "top", "mid", "base")


def backup_cycle(m, tmp, i):
    # A full backup of the chain's top into the target (its copy-before-write filter comes and goes), then
    # an incremental one with a bitmap, or a slow full one with a bitmap force-cancelled (successor, bitmap-mode).
    _add_chain(m, tmp)
    m.ok("blockdev-add", {"driver": "qcow2", "node-name": "tgt", "file": {"driver": "file", "filename": f"{tmp}/tgt.qcow2"}})
    m.ok("block-dirty-bitmap-add", {"node": "top", "name": "b"})
    m.run_job("blockdev-backup", {"job-id": "j", "device": "top", "target": "tgt", "sync": "full", "auto-dismiss": False})
    if i % 2:
        m.ok("blockdev-backup", {"job-id": "j", "device": "top", "target": "tgt", "sync": "full", "bitmap": "b",
                                 "bitmap-mode": "always", "speed": 65536, "x-perf": {"max-chunk": 65536},
                                 "auto-dismiss": False})
        m.ok("block-job-cancel", {"device": "j", "force": True})
        _end_job(m, "j", "BLOCK_JOB_CANCELLED")
    else:
        m.run_job("blockdev-backup", {"job-id": "j", "device": "top", "target": "tgt", "sync": "incremental",
                                      "bitmap": "b", "auto-dismiss": False})
    m.ok("block-dirty-bitmap-remove", {"node": "top", "name": "b"})
    _del(m, "tgt", "top", "mid", "base")


def stream_error_setup(m, tmp):
    # The stream never succeeds here, so the top stays as qemu-img made it (its data only).
    chain_setup(m, tmp)


KINDS = {
    "mirror-cancel": (chain_setup, mirror_cancel_cycle),
    "stream-error": (stream_error_setup, stream_error_cycle),
    "stream": (chain_setup, stream_cycle),
    "commit": (chain_setup, commit_cycle),
    "commit-active": (chain_setup, commit_active_cycle),
    "mirror": (chain_setup, mirror_cycle),
    "backup": (chain_setup, backup_cycle),
    "file": (file_setup, file_cycle),
    "qcow2": (file_setup, qcow2_cycle),
    "qcow2-inline": (qcow2_inline_setup, qcow2_inline_cycle),
    "luks": (luks_setup, luks_cycle),
    "amend-qcow2": (amend_qcow2_setup, amend_qcow2_cycle),
    "amend-luks": (amend_luks_setup, amend_luks_cycle),
}


# ---- memory ---------------------------------------------------------------------------------------

def memory(pid):
    """VmRSS and the smaps_rollup Rss/Anonymous (KiB) and the thread count of a process."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "Threads"):
                out[k] = int(v.split()[0])
    # The daemon's own threads: io_uring's kernel workers (iou-wrk-*) are listed as tasks of the process
    # too, and come and go with the kernel's load.
    out["own_threads"] = len([n for n in thread_names(pid) if not n.startswith("iou-")])
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("Rss", "Anonymous"):
                    out["smaps_" + k] = int(v.split()[0])
    except OSError:
        pass
    return out


def start(binary, tmp, extra_env=None):
    margs, path = monitor_args(tmp)
    d = Daemon(binary, margs, tmp, env=extra_env)
    return d, Mon(path)


def run_batches(binary, tmp, kind, warmup, batches, per_batch, report=None, extra_env=None):
    """Runs `warmup` cycles, then `batches` batches of `per_batch` cycles of one kind; returns the memory
    after the warm-up and after each batch. `report(label, mem)` sees each figure as it comes."""
    setup, cycle = KINDS[kind]
    d, m = start(binary, tmp, extra_env)
    try:
        setup(m, tmp)
        for i in range(warmup):
            cycle(m, tmp, i)
        figures = [memory(d.proc.pid)]
        if report:
            report("warm-up", figures[0])
        for b in range(batches):
            for i in range(per_batch):
                cycle(m, tmp, i)
            figures.append(memory(d.proc.pid))
            if report:
                report(f"batch {b + 1}", figures[-1])
        m.c.close()
    finally:
        d.stop()
    return figures

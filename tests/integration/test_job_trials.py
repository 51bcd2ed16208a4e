#!/usr/bin/env python3
# Random robustness trials of the block jobs (stream, commit, active commit, mirror): cancel, pause, quit, SIGTERM and injected I/O errors at random moments; runs the real binary, one daemon per trial.
"""Each trial (seeded: the seed is printed, and --seed/--trial replay one) builds a small qcow2 chain on
/dev/shm, starts one job of the kind (speed-limited so it is still copying when hit), waits for a random
moment of the job (right after the start command, mid-copy, while paused, at READY, while pending with
auto-finalize=false, during job-complete) and does a random action (soft or force block-job-cancel,
pause + resume, pause then cancel, quit, SIGTERM; or a trial whose image has a blkdebug rule that fails one
read or write, under on-error report, stop or ignore). It then drives the job to its end (speed lifted;
resume, complete, finalize as the state asks), with a deadline on every wait, and checks:
- the daemon answers, or (quit, SIGTERM) exits with status 0 within EXIT_BOUND seconds;
- the job's JOB_STATUS_CHANGE events follow QEMU's transition table, and a job that started ends with
  exactly one BLOCK_JOB_COMPLETED or BLOCK_JOB_CANCELLED before it concludes (also when the daemon quits);
- afterwards every image passes qemu-img check, the guest view of the source is unchanged (qemu-img
  compare), and where the job completed its result equals the expected content.
One ctest entry per kind (--kind). Adding a kind is one entry in KINDS: a function that makes the images and
nodes and returns the job's start command (see the marked place for backup)."""
import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qmp_harness import monitor_args  # noqa: E402

MiB = 1 << 20
SIZE = 32 * MiB
WAIT = 10.0          # the bound on any one wait for the daemon
EXIT_BOUND = 10.0    # quit / SIGTERM: exit within this
TRIALS = 20
KEEP = False         # --keep: leave each trial's directory (to look at a failure's images)
KEEP_FAILED = False  # --keep-failed: leave the directories of failed trials (images, stderr, a core file)
JOB = "j"


# ---- QMP with a full event log --------------------------------------------------------------------

class Mon:
    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(WAIT)
        self.sock.connect(path)
        self.buf = b""
        self.log = []      # every event, in order
        self.replies = []  # replies not yet taken
        self.unawaited = []  # commands sent with send_unawaited, whose replies come before the next ones
        self.late = []       # (command, reply) of those
        self.eof = False
        greeting = self._read(WAIT)
        assert greeting and "QMP" in greeting, greeting
        assert self.cmd("qmp_capabilities") == {"return": {}}

    def _read(self, timeout):
        """One message, or None when nothing came within timeout (or the connection closed)."""
        end = time.monotonic() + timeout
        while b"\r\n" not in self.buf:
            left = end - time.monotonic()
            if left <= 0 or self.eof:
                return None
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                return None
            except OSError:
                chunk = b""
            if not chunk:
                self.eof = True
                return None
            self.buf += chunk
        raw, self.buf = self.buf.split(b"\r\n", 1)
        return json.loads(raw)

    def pump(self, timeout):
        msg = self._read(timeout)
        if msg is None:
            return False
        if "event" in msg:
            self.log.append(msg)
        else:
            self.replies.append(msg)
        return True

    def send(self, name, args=None):
        req = {"execute": name}
        if args is not None:
            req["arguments"] = args
        self.sock.sendall((json.dumps(req) + "\n").encode())

    def send_unawaited(self, name, args=None):
        """Sends a command whose reply the next cmd() sets aside (QMP answers in order): the command after it
        goes out before this one was answered."""
        self.send(name, args)
        self.unawaited.append(name)

    def reply(self, what="reply"):
        end = time.monotonic() + WAIT
        while True:
            while not self.replies:
                if self.eof or time.monotonic() > end:
                    raise AssertionError(f"no reply to {what} within {WAIT} s (eof={self.eof}); events: {self.tail()}")
                self.pump(end - time.monotonic())
            r = self.replies.pop(0)
            if self.unawaited:
                self.late.append((self.unawaited.pop(0), r))
                continue
            return r

    def cmd(self, name, args=None):
        self.send(name, args)
        return self.reply(name)

    def ok(self, name, args=None):
        r = self.cmd(name, args)
        assert r == {"return": {}}, (name, args, r)

    def wait(self, pred, since=0, what="event"):
        """Waits for an event matching pred among the events from index `since` on; returns it."""
        end = time.monotonic() + WAIT
        while True:
            for e in self.log[since:]:
                if pred(e):
                    return e
            if self.eof or time.monotonic() > end:
                raise AssertionError(f"no {what} within {WAIT} s (eof={self.eof}); events: {self.tail()}")
            self.pump(end - time.monotonic())

    def drain_to_eof(self, timeout):
        end = time.monotonic() + timeout
        while not self.eof and time.monotonic() < end:
            self.pump(end - time.monotonic())
        return self.eof

    def tail(self, n=12):
        return [(e["event"], e.get("data")) for e in self.log[-n:]]


def status_is(*states):
    return lambda e: e["event"] == "JOB_STATUS_CHANGE" and e["data"]["id"] == JOB and e["data"]["status"] in states


def event_is(name):
    return lambda e: e["event"] == name and e.get("data", {}).get("device", JOB) == JOB


def job_state(m):
    r = m.cmd("query-jobs")
    for j in r["return"]:
        if j["id"] == JOB:
            return j["status"]
    return None


def block_job(m):
    for j in m.cmd("query-block-jobs")["return"]:
        if j["device"] == JOB:
            return j
    return None


# ---- images -------------------------------------------------------------------------------------

def sh(*cmd, ok=(0,)):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode not in ok:
        raise AssertionError(f"{' '.join(cmd)} exited {r.returncode}: {r.stdout}{r.stderr}")
    return r


def make_chain(tmp):
    """base (0x11 over 0..4M) <- mid (0x33 over 4M..12M, 0x44 at 1M+64k) <- top (0x22 over 12M..16M); flat = the
    guest view as raw."""
    b, mid, t = (os.path.join(tmp, n + ".qcow2") for n in ("base", "mid", "top"))
    sh("qemu-img", "create", "-q", "-f", "qcow2", b, str(SIZE))
    sh("qemu-io", "-c", "write -P 0x11 0 4M", b)
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", b, "-F", "qcow2", mid)
    sh("qemu-io", "-c", "write -P 0x33 4M 8M", "-c", "write -P 0x44 1M 64k", mid)
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", mid, "-F", "qcow2", t)
    sh("qemu-io", "-c", "write -P 0x22 12M 4M", t)
    flat = os.path.join(tmp, "flat.raw")
    sh("qemu-img", "convert", "-O", "raw", t, flat)
    return b, mid, t, flat


def file_node(path, rule):
    """The protocol node of an image: with a blkdebug rule above the file when the trial injects an error."""
    f = {"driver": "file", "filename": path}
    if rule:
        f = {"driver": "blkdebug", "image": f, "inject-error": [rule]}
    return f


def add_chain(m, b, mid, t, rules):
    m.ok("blockdev-add", {"driver": "qcow2", "node-name": "base", "file": file_node(b, rules.get("base"))})
    m.ok("blockdev-add", {"driver": "qcow2", "node-name": "mid", "file": file_node(mid, rules.get("mid")),
                          "backing": "base"})
    m.ok("blockdev-add", {"driver": "qcow2", "node-name": "top", "file": file_node(t, rules.get("top")),
                          "backing": "mid"})


def backing_of(path):
    """The backing file an image's header names; a blkdebug node's json: name is taken as its image's file
    (a job that rebased onto a node with an error rule wrote that node's json: name, as QEMU does)."""
    name = json.loads(sh("qemu-img", "info", "--output=json", path).stdout).get("backing-filename")
    if name and name.startswith("json:"):
        o = json.loads(name[5:])
        f = o.get("file", o)
        if f.get("driver") == "blkdebug":
            return f["image"]["filename"]
    return name


def without_rules(images):
    """Points headers that name a blkdebug node back at the plain file, so qemu-img reads without the rule."""
    for img in images:
        b = backing_of(img)
        raw = json.loads(sh("qemu-img", "info", "--output=json", img).stdout).get("backing-filename")
        if b and raw != b:
            sh("qemu-img", "rebase", "-u", "-F", "qcow2", "-b", b, img)


def error_rule(rng, path, write):
    """Fails one request touching a random sector of the image file's data area (a sector nothing touches
    leaves the trial without an error: recorded, not a failure)."""
    size = os.path.getsize(path)
    lo = 256 * 1024  # past the header, the L1 and refcount tables of a fresh image
    sector = rng.randrange(lo, max(lo + 512, size)) // 512
    return {"event": "write_aio" if write else "read_aio", "errno": 5, "sector": sector, "once": True}


# ---- the kinds of job: setup(m, tmp, t) returns the start command; check(t) looks at the images ----
# t is the trial: t.rng, t.error (None or (side, policy)), t.auto_finalize, t.speed; setup fills t.images
# (to qemu-img check), t.rules (the blkdebug rules, by node, chosen before the nodes are added) as it goes.

class Kind:
    def __init__(self, name, data, setup, check, ready, error_sides):
        # data: about how many MiB the job copies, for a speed that lets it run 0.25-1 s
        self.name, self.data, self.setup, self.check, self.ready = name, data, setup, check, ready
        self.error_sides = error_sides  # node -> "read" or "write": where an injected error may go


def chain_images(t, tmp):
    t.b, t.mid, t.top, t.flat = make_chain(tmp)
    t.images = [t.b, t.mid, t.top]


def pick_rules(t, paths):
    t.rules = {}
    if t.error:
        node, _ = t.error
        write = t.kind.error_sides[node] == "write"
        t.rules[node] = error_rule(t.rng, paths[node], write)


def stream_setup(m, tmp, t):
    chain_images(t, tmp)
    pick_rules(t, {"base": t.b, "mid": t.mid, "top": t.top})
    add_chain(m, t.b, t.mid, t.top, t.rules)
    t.with_base = t.rng.random() < 0.5
    args = {"job-id": JOB, "device": "top", "speed": t.speed}
    if t.with_base:
        args["base-node"] = "base"
    if t.error:
        args["on-error"] = t.error[1]
    return "block-stream", args


def stream_check(t):
    # The guest view never changes; a completed stream leaves the top on the base (or on nothing).
    sh("qemu-img", "compare", "-f", "qcow2", "-F", "raw", t.top, t.flat)
    want = (t.b if t.with_base else None) if t.completed_ok else t.mid
    assert backing_of(t.top) == want, (backing_of(t.top), want)


def commit_setup(m, tmp, t):
    chain_images(t, tmp)
    pick_rules(t, {"base": t.b, "mid": t.mid, "top": t.top})
    add_chain(m, t.b, t.mid, t.top, t.rules)
    args = {"job-id": JOB, "device": "top", "top-node": "mid", "base-node": "base", "speed": t.speed}
    if t.error:
        args["on-error"] = t.error[1]
    return "block-commit", args


def commit_check(t):
    sh("qemu-img", "compare", "-f", "qcow2", "-F", "raw", t.top, t.flat)
    want = t.b if t.completed_ok else t.mid
    assert backing_of(t.top) == want, (backing_of(t.top), want)
    if t.completed_ok:
        # The base alone now holds what mid held over it.
        sh("qemu-io", "-f", "qcow2", "-c", "read -P 0x33 4M 8M", "-c", "read -P 0x44 1M 64k", t.b)


def active_setup(m, tmp, t):
    chain_images(t, tmp)
    pick_rules(t, {"base": t.b, "mid": t.mid, "top": t.top})
    add_chain(m, t.b, t.mid, t.top, t.rules)
    args = {"job-id": JOB, "device": "top", "base-node": "base", "speed": t.speed}
    if t.error:
        args["on-error"] = t.error[1]
    return "block-commit", args


def active_check(t):
    # The chain keeps its view whatever happened; a completed job (pivoted, or cancelled when READY) leaves
    # the base holding the whole disk.
    sh("qemu-img", "compare", "-f", "qcow2", "-F", "raw", t.top, t.flat)
    if t.completed_ok:
        sh("qemu-img", "compare", "-f", "qcow2", "-F", "raw", t.b, t.flat)


def mirror_setup(m, tmp, t):
    chain_images(t, tmp)
    t.sync = t.rng.choice(["full", "top", "none"])
    t.tgt = os.path.join(tmp, "tgt.qcow2")
    if t.sync == "top":
        # The target shares the source's backing file (the usual live-migration set-up).
        sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", t.mid, "-F", "qcow2", t.tgt)
    else:
        sh("qemu-img", "create", "-q", "-f", "qcow2", t.tgt, str(SIZE))
    t.images.append(t.tgt)
    pick_rules(t, {"top": t.top, "tgt": t.tgt})
    add_chain(m, t.b, t.mid, t.top, t.rules)
    m.ok("blockdev-add", {"driver": "qcow2", "node-name": "tgt", "file": file_node(t.tgt, t.rules.get("tgt")),
                          "backing": None})
    t.nodes.append("tgt")
    args = {"job-id": JOB, "device": "top", "target": "tgt", "sync": t.sync, "speed": t.speed}
    if t.error:
        key = "on-source-error" if t.error[0] == "top" else "on-target-error"
        args[key] = t.error[1]
    return "blockdev-mirror", args


def mirror_check(t):
    sh("qemu-img", "compare", "-f", "qcow2", "-F", "raw", t.top, t.flat)
    if t.completed_ok and t.sync != "none":
        sh("qemu-img", "compare", "-f", "qcow2", "-F", "raw", t.tgt, t.flat)


def backup_setup(m, tmp, t):
    chain_images(t, tmp)
    # The backup is of the moment the job starts: guest writes after it (the trial's) are not in it.
    t.flat0 = os.path.join(tmp, "flat0.raw")
    shutil.copyfile(t.flat, t.flat0)
    t.sync = t.rng.choice(["full", "top"])
    t.tgt = os.path.join(tmp, "tgt.qcow2")
    if t.sync == "top":
        # sync=top copies the top's own clusters: the target shares the source's backing file.
        sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", t.mid, "-F", "qcow2", t.tgt)
    else:
        sh("qemu-img", "create", "-q", "-f", "qcow2", t.tgt, str(SIZE))
    t.images.append(t.tgt)
    pick_rules(t, {"top": t.top, "tgt": t.tgt})
    add_chain(m, t.b, t.mid, t.top, t.rules)
    m.ok("blockdev-add", {"driver": "qcow2", "node-name": "tgt", "file": file_node(t.tgt, t.rules.get("tgt")),
                          "backing": "mid" if t.sync == "top" else None})
    t.nodes.append("tgt")
    args = {"job-id": JOB, "device": "top", "target": "tgt", "sync": t.sync, "speed": t.speed}
    if t.error:
        key = "on-source-error" if t.error[0] == "top" else "on-target-error"
        args[key] = t.error[1]
    return "blockdev-backup", args


def backup_check(t):
    # The source has the guest's writes; a completed backup's target holds the view of the job's start.
    sh("qemu-img", "compare", "-f", "qcow2", "-F", "raw", t.top, t.flat)
    if t.completed_ok:
        sh("qemu-img", "compare", "-f", "qcow2", "-F", "raw", t.tgt, t.flat0)


KINDS = {
    "stream": Kind("stream", 12, stream_setup, stream_check, False, {"mid": "read", "base": "read", "top": "write"}),
    "commit": Kind("commit", 8, commit_setup, commit_check, False, {"mid": "read", "base": "write"}),
    "commit-active": Kind("commit-active", 12, active_setup, active_check, True,
                          {"top": "read", "mid": "read", "base": "write"}),
    "mirror": Kind("mirror", 24, mirror_setup, mirror_check, True, {"top": "read", "tgt": "write"}),
    "backup": Kind("backup", 24, backup_setup, backup_check, False, {"top": "read", "tgt": "write"}),
}


# ---- the job state machine (QEMU's transition table) and the event checks -----------------------

ALLOWED = {
    "undefined": {"created"},
    "created": {"running", "aborting", "null"},
    "running": {"paused", "ready", "waiting", "aborting"},
    "paused": {"running"},
    "ready": {"standby", "waiting", "aborting"},
    "standby": {"ready"},
    "waiting": {"pending", "aborting"},
    "pending": {"concluded", "aborting"},
    "aborting": {"concluded"},
    "concluded": {"null"},
    "null": set(),
}


def check_events(log, alive, auto_finalize):
    """Returns the job's end: 'completed', 'completed-error', 'cancelled', or None (the daemon quit first)."""
    states = ["undefined"]
    ends = []
    for e in log:
        name, data = e["event"], e.get("data", {})
        if name == "JOB_STATUS_CHANGE" and data["id"] == JOB:
            s = data["status"]
            assert s in ALLOWED[states[-1]], f"illegal transition {states[-1]} -> {s}: {states}"
            if s == "concluded":
                assert len(ends) == 1, f"concluded after {ends}: {states}"
            states.append(s)
        elif name in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED") and data.get("device") == JOB:
            assert states[-1] in ("aborting", "pending", "waiting", "ready", "running", "standby") or \
                states[-1] == "created", (name, states)
            ends.append((name, data))
        elif name == "BLOCK_JOB_READY" and data.get("device") == JOB:
            assert states[-1] == "ready", ("READY event while", states[-1])
        elif name == "BLOCK_JOB_PENDING" and data.get("device") == JOB:
            assert states[-1] == "pending" and not auto_finalize, ("PENDING event while", states[-1], auto_finalize)
    started = "running" in states
    assert len(ends) <= 1, f"more than one end: {ends}"
    if alive:
        assert states[-1] == "null", f"job not gone: {states}"
    if started:
        # quit and SIGTERM cancel a job still working, as QSD's job_cancel_sync_all: the end is always told.
        assert ends, f"a started job without BLOCK_JOB_COMPLETED/CANCELLED: {states}"
    if not ends:
        return None
    name, data = ends[0]
    if name == "BLOCK_JOB_CANCELLED":
        assert "aborting" in states, states
        return "cancelled"
    if "error" in data:
        assert "aborting" in states, (data, states)
        return "completed-error"
    assert "aborting" not in states and "pending" in states, (data, states)
    if not auto_finalize:
        assert any(e["event"] == "BLOCK_JOB_PENDING" for e in log), "no BLOCK_JOB_PENDING"
    return "completed"


# ---- one trial ----------------------------------------------------------------------------------

MOMENTS = ["start", "mid", "paused", "ready", "pending", "completing"]
ACTIONS = ["cancel", "cancel-force", "pause-resume", "pause-cancel", "quit", "sigterm", "error"]


class Trial:
    def __init__(self, kind, seed):
        self.kind = kind
        self.seed = seed
        self.rng = random.Random(seed)
        moments = [x for x in MOMENTS if kind.ready or x not in ("ready", "completing")]
        self.action = self.rng.choice(ACTIONS)
        self.moment = self.rng.choice(moments)
        self.error = None
        if self.action == "error":
            self.error = (self.rng.choice(sorted(kind.error_sides)), self.rng.choice(["report", "stop", "ignore"]))
        self.auto_finalize = self.moment != "pending" and self.rng.random() < 0.8
        # Long enough for the job to be hit mid-copy (it copies 4-16 MiB); lifted once the trial acted.
        self.speed = int(kind.data * MiB / self.rng.uniform(0.25, 1.0))
        self.iothread = self.rng.random() < 0.5
        # Guest writes during the job (not at the start moment: they go first, then the action).
        self.writes = []
        if self.moment != "start" and not self.error and self.rng.random() < 0.5:
            self.writes = [(self.rng.randrange(SIZE // 65536) * 65536, self.rng.randrange(1, 256))
                           for _ in range(self.rng.randrange(1, 16))]
        self.nodes = ["base", "mid", "top"]
        self.completed_ok = False
        self.notes = []

    def describe(self):
        err = f" error={self.error[0]}/{self.error[1]}" if self.error else ""
        return (f"kind={self.kind.name} seed={self.seed} moment={self.moment} action={self.action}{err} "
                f"auto-finalize={self.auto_finalize} speed={self.speed // 1024}K iothread={self.iothread} "
                f"writes={len(self.writes)}")


def until_state(m, states):
    """Waits for the job to reach one of `states` (or an end); a job an error stopped is resumed on the way,
    a READY one completed when READY is not awaited. Returns the state it reached (None: gone)."""
    end = time.monotonic() + WAIT
    completed = False
    while time.monotonic() < end:
        st = job_state(m)
        if st in states or st in ("concluded", "aborting", None):
            return st
        if st == "ready" and not completed:
            completed = True
            m.cmd("job-complete", {"id": JOB})
        if st == "paused" and (block_job(m) or {}).get("paused"):
            m.cmd("job-resume", {"id": JOB})
        m.pump(0.02)
    raise AssertionError(f"the job did not reach {states} within {WAIT} s: {m.tail()}")


def wait_moment(m, t, mark):
    """Waits for the trial's moment; returns False when the job ended before it came (nothing to hit)."""
    if t.moment == "start":
        return True
    if t.moment == "mid":
        # Poll the job's offset until it passed a random fraction of its length.
        frac = t.rng.uniform(0.05, 0.8)
        end = time.monotonic() + WAIT
        while time.monotonic() < end:
            j = block_job(m)
            if j is None or j["status"] not in ("running", "paused", "created"):
                return j is not None
            if j["len"] and j["offset"] >= frac * j["len"]:
                return True
            if j["paused"] and j["io-status"] != "ok":
                return True  # an error stopped it: the action hits a stopped job
            m.pump(0.01)
        raise AssertionError(f"the job did not progress within {WAIT} s: {block_job(m)}")
    if t.moment == "paused":
        r = m.cmd("job-pause", {"id": JOB})
        if "error" in r:
            return False
        # A job past its work (waiting, pending) takes the pause and has no pause point left.
        m.wait(status_is("paused", "standby", "waiting", "pending", "aborting", "concluded", "null"), mark, "paused")
        return job_state(m) in ("paused", "standby")
    if t.moment == "ready":
        return until_state(m, ("ready",)) == "ready"
    if t.moment == "pending":
        return until_state(m, ("pending",)) == "pending"
    if t.moment == "completing":
        if until_state(m, ("ready",)) != "ready":
            return False
        # job-complete goes out and the action follows at once, without waiting for the reply.
        m.send_unawaited("job-complete", {"id": JOB})
        return True
    raise AssertionError(t.moment)


def act(m, t, d):
    """The trial's action. Returns False when the daemon was told to go (quit, SIGTERM)."""
    a = t.action
    if a == "cancel":
        t.notes.append(("cancel", m.cmd("block-job-cancel", {"device": JOB})))
    elif a == "cancel-force":
        t.notes.append(("cancel-force", m.cmd("block-job-cancel", {"device": JOB, "force": True})))
    elif a in ("pause-resume", "pause-cancel"):
        mark = len(m.log)
        r = m.cmd("block-job-pause", {"device": JOB})
        t.notes.append(("pause", r))
        if "error" not in r and job_state(m) not in (None, "concluded"):
            st = job_state(m)
            if st in ("running", "ready", "paused", "standby"):
                m.wait(status_is("paused", "standby", "waiting", "pending", "concluded", "aborting", "null"), mark, "paused")
        if a == "pause-resume":
            t.notes.append(("resume", m.cmd("block-job-resume", {"device": JOB})))
        else:
            r = m.cmd("block-job-cancel", {"device": JOB})
            t.notes.append(("cancel", r))
            if "error" in r:
                t.notes.append(("cancel-force", m.cmd("block-job-cancel", {"device": JOB, "force": True})))
    elif a == "quit":
        m.send("quit")
        return False
    elif a == "sigterm":
        d.send_signal(signal.SIGTERM)
        return False
    elif a == "error":
        pass  # the rule is in place since the start
    return True


def drive_to_end(m, t):
    """Lifts the speed and moves the job on (resume, complete, finalize) until it is gone; bounded."""
    m.cmd("block-job-set-speed", {"device": JOB, "speed": 0})
    t.notes.extend(m.late)
    end = time.monotonic() + WAIT
    completed = finalized = False
    while True:
        st = job_state(m)
        if st is None:
            return
        if time.monotonic() > end:
            raise AssertionError(f"HANG: the job is still {st} after {WAIT} s: {block_job(m)}; events {m.tail()}")
        if st == "paused" or st == "standby":
            j = block_job(m)
            if j and j.get("paused"):
                m.cmd("job-resume", {"id": JOB})
        elif st == "ready" and not completed:
            completed = True
            m.cmd("job-complete", {"id": JOB})
        elif st == "pending" and not finalized:
            finalized = True
            m.cmd("job-finalize", {"id": JOB})
        elif st == "concluded":
            m.cmd("job-dismiss", {"id": JOB})
        m.pump(0.05)


def run_trial(binary, kind, seed, base):
    t = Trial(kind, seed)
    failed = False
    print("TRIAL", t.describe(), flush=True)
    tmp = tempfile.mkdtemp(prefix=f"blockd-trial-{kind.name}-", dir=base)
    margs, path = monitor_args(tmp)
    pidfile = os.path.join(tmp, "blockd.pid")
    errf = open(os.path.join(tmp, "stderr"), "w+")
    d = subprocess.Popen([binary] + margs + ["--object", "iothread,id=io1", "--pidfile", pidfile], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=errf, cwd=tmp)
    try:
        end = time.monotonic() + WAIT
        while not os.path.exists(pidfile):
            assert d.poll() is None, "daemon exited early"
            assert time.monotonic() < end, "daemon not ready"
            time.sleep(0.005)
        m = Mon(path)
        t.mon = m
        cmd, args = kind.setup(m, tmp, t)
        if t.iothread:
            # The nodes' component moves to an iothread: the copy runs there, the job actor on the main loop.
            for n in t.nodes:
                m.ok("x-blockdev-set-iothread", {"node-name": n, "iothread": "io1"})
        if not t.auto_finalize:
            args["auto-finalize"] = False
        if t.writes:
            sock = os.path.join(tmp, "nbd.sock")
            m.ok("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
            m.ok("block-export-add", {"type": "nbd", "id": "e", "node-name": "top", "writable": True})
        mark = len(m.log)
        r = m.cmd(cmd, args)
        assert r == {"return": {}}, (cmd, args, r)
        if t.writes:
            # A guest writes to the source while the job copies; the expected view takes the same writes.
            cmds = []
            for off, pat in t.writes:
                cmds += ["-c", f"write -P {pat:#x} {off} 64k"]
            w = subprocess.run(["qemu-io", "-f", "raw"] + cmds + [f"nbd+unix:///top?socket={sock}"],
                               capture_output=True, text=True, timeout=WAIT)
            assert w.returncode == 0 and "error" not in w.stdout.lower(), w.stdout + w.stderr
            with open(t.flat, "r+b") as f:
                for off, pat in t.writes:
                    f.seek(off)
                    f.write(bytes([pat]) * 65536)
        if t.moment in ("ready", "pending", "completing"):
            m.cmd("block-job-set-speed", {"device": JOB, "speed": 0})  # the moment is the job's end: get there
        alive = True
        if wait_moment(m, t, mark):
            alive = act(m, t, d)
        else:
            t.notes.append(("moment missed", job_state(m)))
        if alive:
            drive_to_end(m, t)
            assert d.poll() is None, "the daemon died"
            assert "return" in m.cmd("query-version"), "the daemon does not answer"
            m.send("quit")
        # Either way the daemon goes now: it must exit with 0 within the bound, the job told to end.
        assert m.drain_to_eof(EXIT_BOUND), f"HANG: the daemon did not close the monitor within {EXIT_BOUND} s"
        try:
            rc = d.wait(EXIT_BOUND)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"HANG: the daemon did not exit within {EXIT_BOUND} s")
        assert rc == 0, f"the daemon exited with {rc}"
        end_kind = check_events(m.log, alive, t.auto_finalize)
        t.completed_ok = end_kind == "completed"
        if t.action == "error":
            errs = [e["data"] for e in m.log if e["event"] == "BLOCK_JOB_ERROR"]
            t.notes.append(("errors", errs))
        # Image checks: leaks (exit 3) are tolerated only where a write was made to fail, as in QEMU.
        leak_ok = (0, 3) if t.error and kind.error_sides[t.error[0]] == "write" else (0,)
        for img in t.images:
            sh("qemu-img", "check", img, ok=leak_ok)
        without_rules(t.images)
        kind.check(t)
        print(f"  ok: end={end_kind} alive={alive} {t.notes}", flush=True)
    except Exception:
        failed = True
        print(f"  FAILED {t.describe()}; replay with --kind {kind.name} --seed {seed} --trials 1", flush=True)
        try:
            errf.seek(0)
            print("  daemon stderr:", errf.read()[-4000:], flush=True)
            if getattr(t, "mon", None):
                print("  events:", t.mon.tail(30), "notes:", t.notes, flush=True)
        except Exception:
            pass
        raise
    finally:
        if d.poll() is None:
            d.kill()
            d.wait()
        errf.close()
        if not KEEP and not (KEEP_FAILED and failed):
            shutil.rmtree(tmp, ignore_errors=True)
        elif failed:
            print("  kept", tmp, flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--blockd", required=True)
    ap.add_argument("--kind", action="append", help="job kind (repeatable); all by default")
    ap.add_argument("--seed", type=int, default=None, help="first trial's seed (random by default)")
    ap.add_argument("--trials", type=int, default=TRIALS)
    ap.add_argument("--keep", action="store_true", help="keep the trials' directories")
    ap.add_argument("--keep-failed", action="store_true", help="keep the directories of failed trials")
    a = ap.parse_args()
    global KEEP, KEEP_FAILED
    KEEP, KEEP_FAILED = a.keep, a.keep_failed
    a.blockd = os.path.abspath(a.blockd)  # the daemon runs in the trial's directory
    missing = [x for x in ("qemu-img", "qemu-io") if not shutil.which(x)]
    if missing:
        print("SKIP: missing " + ", ".join(missing))
        return 77
    seed = a.seed if a.seed is not None else int.from_bytes(os.urandom(4), "little")
    print(f"seed {seed} (replay: --seed {seed})", flush=True)
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    failed = 0
    t0 = time.monotonic()
    for name in a.kind or list(KINDS):
        for i in range(a.trials):
            try:
                run_trial(a.blockd, KINDS[name], seed + i, base)
            except Exception:
                failed += 1
                traceback.print_exc()
    print(f"{failed} failed, {time.monotonic() - t0:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

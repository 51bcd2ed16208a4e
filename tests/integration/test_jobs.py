#!/usr/bin/env python3
"""Jobs over QMP against the real binary: blockdev-create (file, and qcow2 where the build has it), x-blockdev-amend,
the job-* verbs in each state they can be seen in, query-jobs, JOB_STATUS_CHANGE order, node holds, shutdown with a job
running. Every wait is on an event or a reply, never a fixed sleep."""
import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qmp_harness import Client, Daemon, monitor_args  # noqa: E402

DEADLINE = 20.0
BIG = 8 << 30  # a full preallocation this large is still writing when the test acts (it cancels it)


class Mon:
    """A QMP client that keeps every event, in order, next to the replies."""

    def __init__(self, path):
        self.c = Client.unix(path)
        self.c.sock.settimeout(DEADLINE)
        self.c.negotiate()
        self.log = []  # ("event", status-or-name, data) and ("return"/"error", id, payload), in arrival order

    def _read(self):
        msg = self.c.line()
        if "event" in msg:
            d = msg["data"]
            self.log.append(("event", msg["event"], d))
        else:
            self.log.append(("reply", msg.get("id"), msg))
        return msg

    def cmd(self, name, args=None, id=None):
        req = {"execute": name}
        if args is not None:
            req["arguments"] = args
        if id is not None:
            req["id"] = id
        self.c.send(json.dumps(req) + "\n")
        while True:
            msg = self._read()
            if "event" not in msg:
                return msg

    def wait_status(self, job, status):
        """Returns once JOB_STATUS_CHANGE {job, status} has arrived (maybe already) for the latest job of that id."""
        end = time.monotonic() + DEADLINE
        while True:
            mine = [d["status"] for kind, name, d in self.log if kind == "event" and name == "JOB_STATUS_CHANGE"
                    and d["id"] == job]
            while "created" in mine[1:]:  # an earlier job of the same id
                mine = mine[mine.index("created", 1):]
            if status in mine:
                return
            if time.monotonic() > end:
                raise AssertionError(f"no {status} for {job}; log: {self.log}")
            self._read()

    def statuses(self, job):
        return [d["status"] for kind, name, d in self.log if kind == "event" and name == "JOB_STATUS_CHANGE"
                and d["id"] == job]

    def raw(self, text):
        """Sends text and returns the next reply as the raw line (to check member order)."""
        self.c.send(text)
        while True:
            while b"\r\n" not in self.c.buf:
                self.c.buf += self.c.sock.recv(65536)
            line, rest = self.c.buf.split(b"\r\n", 1)
            self.c.buf = rest
            msg = json.loads(line)
            if "event" in msg:
                self.log.append(("event", msg["event"], msg["data"]))
                continue
            return line.decode()


def err(desc):
    return {"error": {"class": "GenericError", "desc": desc}}


def create(m, job, options, **kw):
    return m.cmd("blockdev-create", {"job-id": job, "options": options}, **kw)


def start(binary, tmp, extra=()):
    args, path = monitor_args(tmp)
    d = Daemon(binary, args + list(extra), tmp)
    return d, Mon(path)


def has_qcow2_create(m):
    r = create(m, "probe", {"driver": "qcow2", "file": "nope", "size": 0})
    if "error" in r:
        return False
    m.wait_status("probe", "concluded")
    assert m.cmd("job-dismiss", {"id": "probe"}) == {"return": {}}
    return True


# ----------------------------------------------------------------------------------------------
def case_create_file_event_sequence_query_and_dismiss(binary, tmp):
    d, m = start(binary, tmp)
    try:
        img = os.path.join(tmp, "new.img")
        assert create(m, "c1", {"driver": "file", "filename": img, "size": 1 << 20}, id=2) == {"return": {}, "id": 2}
        # created and running come before the command's return (T75).
        assert m.statuses("c1") == ["created", "running"], m.log
        m.wait_status("c1", "concluded")
        assert m.statuses("c1") == ["created", "running", "waiting", "pending", "concluded"]
        assert os.path.getsize(img) == 1 << 20
        # query-jobs: QSD's members, in QSD's order on the wire.
        line = m.raw('{"execute": "query-jobs", "id": 3}\n')
        assert line == ('{"return": [{"current-progress": 1, "status": "concluded", "total-progress": 1, '
                        '"type": "create", "id": "c1"}], "id": 3}'), line
        for verb in ("pause", "cancel", "complete", "finalize"):
            r = m.cmd("job-" + verb, {"id": "c1"})
            assert r == err(f"Job 'c1' in state 'concluded' cannot accept command verb '{verb}'"), r
        assert m.cmd("job-resume", {"id": "c1"}) == err("Can't resume a job that was not paused")
        n = len(m.log)
        assert m.cmd("job-dismiss", {"id": "c1"}, id=4) == {"return": {}, "id": 4}
        assert m.log[n:] == [("event", "JOB_STATUS_CHANGE", {"status": "null", "id": "c1"}),
                             ("reply", 4, {"return": {}, "id": 4})], m.log[n:]
        for verb in ("pause", "resume", "cancel", "complete", "finalize", "dismiss"):
            assert m.cmd("job-" + verb, {"id": "c1"}) == err("Job not found")
        assert m.cmd("query-jobs") == {"return": []}
        # The id is free again once the job is gone.
        assert create(m, "c1", {"driver": "file", "filename": img, "size": 0}) == {"return": {}}
        m.wait_status("c1", "concluded")
        assert os.path.getsize(img) == 0
    finally:
        assert d.stop() == 0


def case_create_refusals_and_failures(binary, tmp):
    d, m = start(binary, tmp)
    try:
        ok = {"driver": "file", "filename": os.path.join(tmp, "a.img"), "size": 0}
        assert create(m, "1bad", ok) == err("Invalid job ID '1bad'")
        assert create(m, "", ok) == err("Invalid job ID ''")
        assert m.cmd("blockdev-create", {"options": ok}) == err("Parameter 'job-id' is missing")
        assert create(m, "c2", {"driver": "raw"}) == err("Driver does not support blockdev-create")
        assert create(m, "c2", {"driver": "null-co"}) == err("Driver does not support blockdev-create")
        assert create(m, "c2", {"driver": "raw", "file": "x"}) == err("Parameter 'options.file' is unexpected")
        assert create(m, "c2", {"driver": "blkreplay"}) == err("Block driver 'blkreplay' not found or not supported")
        r = create(m, "c2", {"driver": "vdi", "file": "x", "size": 0})
        assert r["error"]["desc"].startswith("Driver 'vdi' cannot create images in this blockd version"), r
        assert create(m, "c2", dict(ok, preallocation="some")) == err(
            "Parameter 'preallocation' does not accept value 'some'")
        assert create(m, "c2", {"driver": "file", "size": 0}) == err("Parameter 'options.filename' is missing")
        assert m.cmd("query-jobs") == {"return": []}  # nothing above created a job
        assert create(m, "c1", ok) == {"return": {}}
        assert create(m, "c1", ok) == err("Job ID 'c1' already in use")  # a concluded job keeps its id
        failing = [("f1", {"driver": "file", "filename": "/nonexistent/dir/x.img", "size": 0},
                    "Could not create '/nonexistent/dir/x.img': No such file or directory"),
                   ("f2", dict(ok, preallocation="metadata"), "Unsupported preallocation mode: metadata"),
                   ("f3", dict(ok, size=-1), "Could not resize file: Invalid argument"),
                   ("f4", dict(ok, size=-1, preallocation="full"), "Cannot use preallocation for shrinking files"),
                   ("f5", dict(ok, **{"extent-size-hint": 5000000000}), "Extent size hint is too large"),
                   ("f6", dict(ok, filename=tmp), f"Could not create '{tmp}': Is a directory")]
        for job, opts, text in failing:
            assert create(m, job, opts) == {"return": {}}
            m.wait_status(job, "concluded")
            assert m.statuses(job) == ["created", "running", "aborting", "concluded"], (job, m.statuses(job))
        jobs = m.cmd("query-jobs")["return"]
        # Newest first; "error" only on the failed ones.
        assert [j["id"] for j in jobs] == ["f6", "f5", "f4", "f3", "f2", "f1", "c1"], jobs
        for j, (job, opts, text) in zip(jobs, reversed(failing)):
            assert j == {"current-progress": 1, "status": "concluded", "total-progress": 1, "type": "create",
                         "id": job, "error": text}, j
        assert "error" not in jobs[-1]
    finally:
        assert d.stop() == 0


def case_create_file_preallocation_modes(binary, tmp):
    d, m = start(binary, tmp)
    try:
        def make(job, name, size, **opts):
            path = os.path.join(tmp, name)
            assert create(m, job, dict({"driver": "file", "filename": path, "size": size}, **opts)) == {"return": {}}
            m.wait_status(job, "concluded")
            assert "error" not in m.cmd("query-jobs")["return"][0], m.cmd("query-jobs")
            st = os.stat(path)
            return st.st_size, st.st_blocks * 512
        # QEMU allocates the first block of a new image (alignment probing), whatever the mode.
        assert make("p1", "off.img", 1 << 20) == (1 << 20, 4096)
        size, used = make("p2", "falloc.img", 1 << 20, preallocation="falloc")
        assert size == 1 << 20 and used >= 1 << 20, (size, used)
        size, used = make("p3", "full.img", 100000, preallocation="full")
        assert size == 100000 and used >= 100000, (size, used)
        assert make("p4", "opts.img", 4096, nocow=True, **{"extent-size-hint": 0}) == (4096, 4096)
        # An existing file is emptied first.
        path = os.path.join(tmp, "old.img")
        with open(path, "wb") as f:
            f.write(b"x" * 65536)
        assert make("p5", "old.img", 8192) == (8192, 4096)
        with open(path, "rb") as f:
            assert f.read() == bytes(8192)
        r = subprocess.run(["qemu-img", "info", "--output=json", "-f", "raw", path], capture_output=True, text=True)
        assert r.returncode == 0 and json.loads(r.stdout)["virtual-size"] == 8192, r
    finally:
        assert d.stop() == 0


def case_verbs_while_running_then_cancel(binary, tmp):
    d, m = start(binary, tmp)
    # On a disk-backed directory: the preallocation must take long, and is cancelled after a few MiB.
    with tempfile.TemporaryDirectory(prefix="blockd-jobs-") as disk:
        try:
            img = os.path.join(disk, "big.img")
            assert create(m, "c1", {"driver": "file", "filename": img, "size": BIG, "preallocation": "full"}) == \
                {"return": {}}
            jobs = m.cmd("query-jobs")["return"]
            assert jobs == [{"current-progress": 0, "status": "running", "total-progress": 1, "type": "create",
                             "id": "c1"}], jobs
            n = len(m.log)
            # A create job has no pause point: the pause is counted and no event comes (as in QSD).
            assert m.cmd("job-pause", {"id": "c1"}) == {"return": {}}
            assert m.cmd("job-pause", {"id": "c1"}) == err("Job is already paused")
            for verb in ("complete", "finalize", "dismiss"):
                assert m.cmd("job-" + verb, {"id": "c1"}) == err(
                    f"Job 'c1' in state 'running' cannot accept command verb '{verb}'")
            assert m.cmd("job-resume", {"id": "c1"}) == {"return": {}}
            assert m.cmd("job-resume", {"id": "c1"}) == err("Can't resume a job that was not paused")
            assert m.cmd("job-pause", {"id": "c1"}) == {"return": {}}
            assert [e for e in m.log[n:] if e[0] == "event"] == []
            # Cancel resumes a paused job; it ends as aborted with QEMU's text.
            assert m.cmd("job-cancel", {"id": "c1"}) == {"return": {}}
            m.wait_status("c1", "concluded")
            assert m.statuses("c1") == ["created", "running", "aborting", "concluded"], m.statuses("c1")
            assert m.cmd("query-jobs")["return"] == [{"current-progress": 1, "status": "concluded",
                                                      "total-progress": 1, "type": "create", "id": "c1",
                                                      "error": "Operation canceled"}]
            # blockd stops the preallocation at the cancel and leaves the file at its old size.
            assert os.path.getsize(img) == 0
            assert m.cmd("job-dismiss", {"id": "c1"}) == {"return": {}}
        finally:
            assert d.stop() == 0


def case_lock_conflict_with_another_process(binary, tmp):
    img = os.path.join(tmp, "held.qcow2")
    subprocess.run(["qemu-img", "create", "-f", "qcow2", img, "1M"], check=True, capture_output=True)
    holder = subprocess.Popen(["qemu-io", "-f", "qcow2", img], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT)
    d, m = start(binary, tmp)
    try:
        # qemu-io has the image open once it answers a command.
        holder.stdin.write(b"help\n")
        holder.stdin.flush()
        holder.stdout.readline()
        before = os.path.getsize(img)
        assert create(m, "c1", {"driver": "file", "filename": img, "size": 0}) == {"return": {}}
        m.wait_status("c1", "concluded")
        assert m.cmd("query-jobs")["return"][0]["error"] == 'Failed to get "write" lock'
        assert os.path.getsize(img) == before  # not emptied under its user
    finally:
        holder.stdin.close()
        holder.wait(DEADLINE)
        assert d.stop() == 0


def case_qcow2_create_holds_its_nodes(binary, tmp):
    d, m = start(binary, tmp)
    try:
        if not has_qcow2_create(m):
            print("   (qcow2 has no blockdev-create in this build: case skipped)")
            return
        img = os.path.join(tmp, "new.qcow2")
        assert create(m, "c1", {"driver": "file", "filename": img, "size": 0}) == {"return": {}}
        m.wait_status("c1", "concluded")
        assert m.cmd("job-dismiss", {"id": "c1"}) == {"return": {}}
        assert m.cmd("blockdev-add", {"driver": "file", "node-name": "proto", "filename": img}) == {"return": {}}
        assert create(m, "c2", {"driver": "qcow2", "file": "proto", "size": 64 << 20}) == {"return": {}}
        m.wait_status("c2", "concluded")
        assert "error" not in m.cmd("query-jobs")["return"][0]
        # Released when the body ended: the node can go while the job is still concluded (as in QSD).
        assert m.cmd("blockdev-del", {"node-name": "proto"}) == {"return": {}}
        r = subprocess.run(["qemu-img", "check", img], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
        info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", img], capture_output=True,
                                         text=True).stdout)
        assert info["format"] == "qcow2" and info["virtual-size"] == 64 << 20, info
        # A missing node and inline options (opened for the job, closed after it).
        assert create(m, "c3", {"driver": "qcow2", "file": "nope", "size": 1 << 20}) == {"return": {}}
        m.wait_status("c3", "concluded")
        assert m.cmd("query-jobs")["return"][0]["error"] == "Cannot find device='nope' nor node-name='nope'"
        assert create(m, "c4", {"driver": "qcow2", "file": {"driver": "file", "filename": img},
                                "size": 2 << 20}) == {"return": {}}
        m.wait_status("c4", "concluded")
        assert "error" not in m.cmd("query-jobs")["return"][0], m.cmd("query-jobs")
        assert m.cmd("query-named-block-nodes")["return"] == []
        # A writer that does not share write refuses the creation's permissions (QSD's text).
        assert m.cmd("blockdev-add", {"driver": "file", "node-name": "proto", "filename": img}) == {"return": {}}
        assert m.cmd("blockdev-add", {"driver": "qcow2", "node-name": "q", "file": "proto"}) == {"return": {}}
        assert create(m, "c5", {"driver": "qcow2", "file": "proto", "size": 1 << 20}) == {"return": {}}
        m.wait_status("c5", "concluded")
        assert m.cmd("query-jobs")["return"][0]["error"] == (
            "Permission conflict on node 'proto': permissions 'write, resize' are both required by an unnamed block "
            "device (uses node 'proto' as 'root' child) and unshared by node 'q' (uses node 'proto' as 'file' "
            "child)."), m.cmd("query-jobs")
        # While a creation runs, its node cannot be deleted; the refusal names the job.
        assert m.cmd("blockdev-del", {"node-name": "q"}) == {"return": {}}
        with tempfile.TemporaryDirectory(prefix="blockd-jobs-") as disk:
            big = os.path.join(disk, "big.qcow2")
            assert create(m, "c6", {"driver": "file", "filename": big, "size": 0}) == {"return": {}}
            m.wait_status("c6", "concluded")
            assert m.cmd("blockdev-add", {"driver": "file", "node-name": "bigf", "filename": big}) == {"return": {}}
            assert create(m, "c7", {"driver": "qcow2", "file": "bigf", "size": BIG,
                                    "preallocation": "full"}) == {"return": {}}
            r = m.cmd("blockdev-del", {"node-name": "bigf"})
            assert r == err("Block device bigf is in use by job 'c7'; wait for the job to conclude and dismiss it "
                            "(job-dismiss), or cancel it (job-cancel)"), r
            assert m.cmd("job-cancel", {"id": "c7"}) == {"return": {}}
            m.wait_status("c7", "concluded")
            assert m.statuses("c7")[-2:] == ["aborting", "concluded"], m.statuses("c7")
            assert m.cmd("blockdev-del", {"node-name": "bigf"}) == {"return": {}}
    finally:
        assert d.stop() == 0


def case_amend(binary, tmp):
    d, m = start(binary, tmp)
    try:
        img = os.path.join(tmp, "a.img")
        with open(img, "wb") as f:
            f.truncate(1 << 20)
        assert m.cmd("blockdev-add", {"driver": "file", "node-name": "f0", "filename": img}) == {"return": {}}

        def amend(job, node, options, **kw):
            return m.cmd("x-blockdev-amend", dict({"job-id": job, "node-name": node, "options": options}, **kw))
        assert amend("a1", "nope", {"driver": "qcow2"}) == err("Cannot find device='' nor node-name='nope'")
        assert amend("a1", "f0", {"driver": "blkreplay"}) == err("Block driver 'blkreplay' not found or not supported")
        assert amend("a1", "f0", {"driver": "qcow2"}) == err(
            "x-blockdev-amend doesn't support changing the block driver")
        assert amend("a1", "f0", {"driver": "file"}) == err("Driver does not support x-blockdev-amend")
        assert amend("a1", "f0", {"driver": "file", "x": 1}) == err("Parameter 'options.x' is unexpected")
        assert m.cmd("query-jobs") == {"return": []}
        if not has_qcow2_create(m):
            print("   (no qcow2 driver in this build: amend jobs skipped)")
            return
        q = os.path.join(tmp, "q.qcow2")
        subprocess.run(["qemu-img", "create", "-f", "qcow2", q, "1M"], check=True, capture_output=True)
        assert m.cmd("blockdev-add", {"driver": "qcow2", "node-name": "q", "file": {"driver": "file",
                                                                                   "filename": q}}) == {"return": {}}
        assert amend("1bad", "q", {"driver": "qcow2"}) == err("Invalid job ID '1bad'")
        n = len(m.log)
        assert amend("a1", "q", {"driver": "qcow2"}, force=True) == {"return": {}}
        # The amend finishes inside the command: every event comes before the return (as in QSD).
        assert [e[2]["status"] for e in m.log[n:] if e[0] == "event"] == [
            "created", "running", "waiting", "pending", "concluded"], m.log[n:]
        assert m.log[-1][0] == "reply"
        assert amend("a1", "q", {"driver": "qcow2"}) == err("Job ID 'a1' already in use")
        assert amend("a2", "q", {"driver": "qcow2", "encrypt": {"format": "luks", "state": "active",
                                                                "new-secret": "s"}}) == {"return": {}}
        assert m.statuses("a2") == ["created", "running", "aborting", "concluded"]
        jobs = m.cmd("query-jobs")["return"]
        assert jobs == [{"current-progress": 1, "status": "concluded", "total-progress": 1, "type": "amend",
                         "id": "a2", "error": "image is not encrypted, can't amend"},
                        {"current-progress": 1, "status": "concluded", "total-progress": 1, "type": "amend",
                         "id": "a1"}] + jobs[2:], jobs
        # An amend job holds its node until it is dismissed (QEMU's bdrv_ref), naming itself.
        r = m.cmd("blockdev-del", {"node-name": "q"})
        assert r["error"]["desc"].startswith("Block device q is in use by job 'a2'"), r
        assert m.cmd("job-dismiss", {"id": "a2"}) == {"return": {}}
        assert m.cmd("blockdev-del", {"node-name": "q"})["error"]["desc"].startswith(
            "Block device q is in use by job 'a1'")
        assert m.cmd("job-dismiss", {"id": "a1"}) == {"return": {}}
        assert m.cmd("blockdev-del", {"node-name": "q"}) == {"return": {}}
    finally:
        assert d.stop() == 0


def case_quit_cancels_and_dismisses_jobs_first(binary, tmp):
    d, m = start(binary, tmp)
    with tempfile.TemporaryDirectory(prefix="blockd-jobs-") as disk:
        try:
            assert create(m, "c0", {"driver": "file", "filename": os.path.join(tmp, "a.img"), "size": 0}) == \
                {"return": {}}
            m.wait_status("c0", "concluded")
            img = os.path.join(disk, "big.img")
            assert create(m, "c1", {"driver": "file", "filename": img, "size": BIG, "preallocation": "full"}) == \
                {"return": {}}
            n = len(m.log)
            t = time.monotonic()
            assert m.cmd("quit", id="q") == {"return": {}, "id": "q"}
            # As QSD's job_cancel_sync_all: newest first, each to null, all before the return.
            assert [(e[2]["id"], e[2]["status"]) for e in m.log[n:] if e[0] == "event"] == [
                ("c1", "aborting"), ("c1", "concluded"), ("c1", "null"), ("c0", "null")], m.log[n:]
            assert m.c.eof()
            assert d.proc.wait(DEADLINE) == 0
            assert time.monotonic() - t < 10
            assert os.path.getsize(img) == 0
        finally:
            d.stop()


def case_sigterm_with_a_job_running(binary, tmp):
    d, m = start(binary, tmp)
    with tempfile.TemporaryDirectory(prefix="blockd-jobs-") as disk:
        try:
            img = os.path.join(disk, "big.img")
            assert create(m, "c1", {"driver": "file", "filename": img, "size": BIG, "preallocation": "full"}) == \
                {"return": {}}
            assert m.cmd("query-jobs")["return"][0]["status"] == "running"
            t = time.monotonic()
            d.proc.send_signal(signal.SIGTERM)
            assert d.proc.wait(DEADLINE) == 0
            assert time.monotonic() - t < 10
            # The monitor saw the job end before it closed.
            try:
                while True:
                    m._read()
            except (EOFError, OSError):
                pass
            assert m.statuses("c1") == ["created", "running", "aborting", "concluded", "null"], m.statuses("c1")
            assert os.path.getsize(img) == 0
        finally:
            d.stop()


def case_events_reach_every_monitor(binary, tmp):
    args, path = monitor_args(tmp)
    args2, path2 = monitor_args(tmp, "qmp2")
    d = Daemon(binary, args + args2, tmp)
    try:
        m1, m2 = Mon(path), Mon(path2)
        assert create(m1, "c1", {"driver": "file", "filename": os.path.join(tmp, "x.img"), "size": 0}) == \
            {"return": {}}
        m1.wait_status("c1", "concluded")
        m2.wait_status("c1", "concluded")
        assert m2.statuses("c1") == m1.statuses("c1") == ["created", "running", "waiting", "pending", "concluded"]
        assert m2.cmd("job-dismiss", {"id": "c1"}) == {"return": {}}
        m1.wait_status("c1", "null")
    finally:
        assert d.stop() == 0


CASES = [v for k, v in sorted(globals().items()) if k.startswith("case_")]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--blockd", required=True)
    ap.add_argument("-k", default="")
    a = ap.parse_args()
    passed = failed = 0
    for case in CASES:
        if a.k not in case.__name__:
            continue
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        with tempfile.TemporaryDirectory(prefix="blockd-jobs-", dir=base) as tmp:
            try:
                case(a.blockd, tmp)
                passed += 1
                print("PASS", case.__name__, flush=True)
            except Exception:
                failed += 1
                print("FAIL", case.__name__, flush=True)
                traceback.print_exc()
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

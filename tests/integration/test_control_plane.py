"""Control plane: no command takes the daemon down, descriptors are taken only when inherited, blockdev-reopen
replaces a qcow2 node's file and backing children under a live NBD export, and a refused permission change
provably changes no lock."""
import argparse
import os
import shutil
import socket
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qmp_harness import Client, Daemon, monitor_args, run_each  # noqa: E402

failures = []


def check(cond, what, detail=""):
    print(("PASS " if cond else "FAIL ") + what + ("" if cond else "\n   " + str(detail)))
    if not cond:
        failures.append(what)


def run(cmd):
    return subprocess.run(cmd, capture_output=True, text=True)


def qemu_io(url, *cmds):
    args = ["qemu-io", "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    return run(args + [url])


def locks_of(pid):
    """The OFD/POSIX lock lines /proc/locks has for files of `pid` (OFD locks show pid -1: match by inode)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            st = os.stat(f"/proc/{pid}/fd/{fd}")
            inodes.add(st.st_ino)
        except OSError:
            pass
    out = []
    with open("/proc/locks") as f:
        for line in f:
            parts = line.split()
            dev_ino = parts[5] if parts[1] != "->" else parts[6]
            ino = int(dev_ino.split(":")[2])
            if ino in inodes:
                out.append(" ".join(p for p in parts[1:] if p != "->")[:200])
    return sorted(out)


def test_commands_cannot_kill_the_daemon(blockd, tmp):
    margs, path = monitor_args(tmp)
    d = Daemon(blockd, margs, tmp)
    try:
        c = Client.unix(path)
        c.negotiate()
        for s in ["4294967296", "99999999999999999999", "3", "abc", "-1"]:
            r = c.cmd("nbd-server-start", {"addr": {"type": "fd", "data": {"str": s}}})
            check(r.get("error", {}).get("desc") == "only QEMU supports file descriptor passing",
                  f"nbd-server-start fd {s} over QMP is refused as QSD does", r)
        check(c.cmd("query-version").get("return") is not None, "the supervisor still answers")
        c.close()
        # The monitor's listening socket was not taken over: new connections still negotiate.
        c3 = Client.unix(path)
        c3.negotiate()
        check(c3.cmd("query-version").get("return") is not None, "new monitor connections still work")
        c3.close()
        check(d.stop() == 0, "SIGTERM still ends the daemon cleanly")
    finally:
        d.stop()


def test_inherited_fd_on_the_command_line(blockd, tmp):
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    spath = os.path.join(tmp, "inh.sock")
    lsock.bind(spath)
    lsock.listen(4)
    fd = lsock.fileno()
    img = os.path.join(tmp, "inh.raw")
    with open(img, "wb") as f:
        f.truncate(1 << 20)
    pid = os.path.join(tmp, "inh.pid")
    p = subprocess.Popen([blockd, "--blockdev", f"driver=file,node-name=f0,filename={img}",
                          "--nbd-server", f"addr.type=fd,addr.str={fd}", "--export", "type=nbd,id=e0,node-name=f0",
                          "--pidfile", pid], pass_fds=[fd], stderr=subprocess.PIPE)
    try:
        for _ in range(2000):
            if os.path.exists(pid) or p.poll() is not None:
                break
            subprocess.run(["sleep", "0.005"])
        check(p.poll() is None, "an inherited listening socket named on the command line serves NBD",
              p.stderr.read().decode() if p.poll() is not None else "")
        r = run(["nbdinfo", "--size", f"nbd+unix:///f0?socket={spath}"])
        check(r.returncode == 0 and r.stdout.strip() == str(1 << 20), "nbdinfo reads the export over it", r.stderr)
    finally:
        p.terminate()
        p.wait(10)
        lsock.close()
    # A number that was not inherited is refused at start-up with a clear text.
    r = run([blockd, "--nbd-server", "addr.type=fd,addr.str=57"])
    check(r.returncode == 1 and "not inherited" in r.stderr, "a descriptor that was not inherited is refused", r.stderr)


def test_reopen_replaces_children_under_an_export(blockd, tmp):
    a, b, base = (os.path.join(tmp, n) for n in ("a.qcow2", "b.qcow2", "base.qcow2"))
    run(["qemu-img", "create", "-q", "-f", "qcow2", base, "4M"])
    check(qemu_io_file(base, "write -P 0x33 1M 64k").returncode == 0, "base image written")
    run(["qemu-img", "create", "-q", "-f", "qcow2", a, "4M"])
    margs, path = monitor_args(tmp)
    nbd = os.path.join(tmp, "nbd.sock")
    d = Daemon(blockd, margs, tmp)
    url = f"nbd+unix:///fmt0?socket={nbd}"
    try:
        c = Client.unix(path)
        c.negotiate()
        ok = lambda r: r.get("return") == {}  # noqa: E731
        check(ok(c.cmd("blockdev-add", {"driver": "qcow2", "node-name": "fmt0", "backing": None,
                                        "file": {"driver": "file", "filename": a}})), "qcow2 node added")
        check(ok(c.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": nbd}}})), "NBD server up")
        check(ok(c.cmd("block-export-add", {"type": "nbd", "id": "e0", "node-name": "fmt0", "writable": True})),
              "export added")
        r = qemu_io(url, "write -P 0x11 0 64k", "flush")
        check(r.returncode == 0, "write before the reopen", r.stderr)
        # b.qcow2 is a byte copy of a.qcow2 after the flush: the node's cached tables match it.
        shutil.copyfile(a, b)
        check(ok(c.cmd("blockdev-add", {"driver": "file", "node-name": "f2", "filename": b})), "second file node")
        r = c.cmd("blockdev-reopen", {"options": [{"driver": "qcow2", "node-name": "fmt0", "file": "f2",
                                                   "backing": None}]})
        check(ok(r), "reopen replaces the file child", r)
        names = [n["node-name"] for n in c.cmd("query-named-block-nodes").get("return", [])]
        check(names == ["f2", "fmt0"], "the old inline file child is gone and queries work", names)
        r = qemu_io(url, "write -P 0x22 64k 64k", "flush", "read -P 0x11 0 64k", "read -P 0x22 64k 64k")
        check(r.returncode == 0 and "Pattern verification failed" not in r.stdout,
              "I/O through the export after the reopen", r.stdout + r.stderr)
        # The backing child: from none to a node, then back to none.
        check(ok(c.cmd("blockdev-add", {"driver": "qcow2", "node-name": "base", "read-only": True,
                                        "file": {"driver": "file", "filename": base, "read-only": True}})),
              "backing node added")
        r = c.cmd("blockdev-reopen", {"options": [{"driver": "qcow2", "node-name": "fmt0", "file": "f2",
                                                   "backing": "base"}]})
        check(ok(r), "reopen attaches a backing child", r)
        r = qemu_io(url, "read -P 0x33 1M 64k")
        check(r.returncode == 0 and "Pattern verification failed" not in r.stdout,
              "unallocated clusters read from the new backing file", r.stdout + r.stderr)
        r = c.cmd("blockdev-del", {"node-name": "base"})
        check("backing hd of 'fmt0'" in r.get("error", {}).get("desc", ""), "the backing node is now busy", r)
        r = c.cmd("blockdev-reopen", {"options": [{"driver": "qcow2", "node-name": "fmt0", "file": "f2",
                                                   "backing": None}]})
        check(ok(r), "reopen drops the backing child", r)
        r = qemu_io(url, "read -P 0 1M 64k")
        check(r.returncode == 0 and "Pattern verification failed" not in r.stdout,
              "without the backing file those clusters read as zeroes", r.stdout + r.stderr)
        check(ok(c.cmd("blockdev-del", {"node-name": "base"})), "the dropped backing node can be deleted")
        r = c.cmd("blockdev-reopen", {"options": [{"driver": "qcow2", "node-name": "fmt0", "file": "fmt0"}]})
        check("would create a cycle" in r.get("error", {}).get("desc", ""), "a cycle is refused", r)
        c.close()
    finally:
        rc = d.stop()
        check(rc == 0, "clean stop after the reopens", f"exit {rc}: " + d.proc.stderr.read().decode()[-2000:])
    r = run(["qemu-img", "check", b])
    check(r.returncode == 0, "qemu-img check of the new file child is clean", r.stdout + r.stderr)
    r = qemu_io_file(b, "read -P 0x11 0 64k", "read -P 0x22 64k 64k")
    check(r.returncode == 0 and "Pattern verification failed" not in r.stdout, "qemu-io reads both writes", r.stdout)


def qemu_io_file(path, *cmds):
    args = ["qemu-io", "-f", "qcow2"]
    for c in cmds:
        args += ["-c", c]
    return run(args + [path])


def test_refused_permission_change_changes_nothing(blockd, tmp):
    img = os.path.join(tmp, "p.qcow2")
    run(["qemu-img", "create", "-q", "-f", "qcow2", img, "4M"])
    margs, path = monitor_args(tmp)
    d = Daemon(blockd, margs, tmp)
    holder = None
    try:
        c = Client.unix(path)
        c.negotiate()
        r = c.cmd("blockdev-add", {"driver": "qcow2", "node-name": "q0", "read-only": True,
                                   "file": {"driver": "file", "filename": img, "read-only": True}})
        check(r.get("return") == {}, "read-only node added", r)
        # Another process reads the image and does not share writing it.
        holder = subprocess.Popen(["qemu-io", "-r", "-f", "qcow2", img], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        holder.stdin.write(b"read 0 512\n")
        holder.stdin.flush()
        holder.stdout.readline()  # its first reply: the image is open and locked
        before = locks_of(d.proc.pid)
        r = c.cmd("blockdev-reopen", {"options": [{"driver": "qcow2", "node-name": "q0", "read-only": False,
                                                   "file": {"driver": "file", "filename": img}}]})
        check("lock" in r.get("error", {}).get("desc", ""), "reopen read-write is refused by the other process's lock", r)
        after = locks_of(d.proc.pid)
        check(before == after and before, "the refusal left every lock as it was", (before, after))
        q = [n for n in c.cmd("query-named-block-nodes").get("return", []) if n["node-name"] == "q0"]
        check(q and q[0]["ro"] is True, "and the node is still read-only", q)
        holder.stdin.close()
        holder.wait(10)
        holder = None
        r = c.cmd("blockdev-reopen", {"options": [{"driver": "qcow2", "node-name": "q0", "read-only": False,
                                                   "file": {"driver": "file", "filename": img}}]})
        check(r.get("return") == {}, "once the other process is gone the same reopen succeeds", r)
        c.close()
    finally:
        if holder:
            holder.kill()
        d.stop()


def thread_cpus(pid, name):
    """Cpus_allowed_list of the daemon's thread called `name` (iothreads are named io:<id>)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                if f.read().strip() != name:
                    continue
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith("Cpus_allowed_list:"):
                        return line.split(":", 1)[1].strip()
        except FileNotFoundError:
            continue
    return None


def test_objects_take_effect(blockd, tmp):
    """An iothread pinned through a thread-context runs there; tunables and objects in use over QMP."""
    margs, path = monitor_args(tmp)
    d = Daemon(blockd, margs, tmp)
    try:
        c = Client.unix(path)
        c.negotiate()
        everyone = thread_cpus(d.proc.pid, "blockd") or thread_cpus(d.proc.pid, os.path.basename(blockd)[:15])
        last = max(os.sched_getaffinity(0))
        r = c.cmd("object-add", {"qom-type": "thread-context", "id": "tc0", "cpu-affinity": [last]})
        check(r == {"return": {}}, "thread-context on one CPU", r)
        r = c.cmd("object-add", {"qom-type": "iothread", "id": "io0", "thread-context": "tc0"})
        check(r == {"return": {}}, "an iothread in that thread-context", r)
        check(thread_cpus(d.proc.pid, "io:io0") == str(last), "the iothread runs on the thread-context's CPU",
              thread_cpus(d.proc.pid, "io:io0"))
        r = c.cmd("object-del", {"id": "tc0"})
        check("error" in r and "io0" in r["error"]["desc"], "a thread-context in use is not deleted; the text names the user", r)
        r = c.cmd("qom-set", {"path": "/objects/io0", "property": "thread-context", "value": ""})
        check(r == {"return": {}}, "unpinning through qom-set", r)
        check(thread_cpus(d.proc.pid, "io:io0") == everyone, "unpinned, the iothread runs where the daemon may",
              (thread_cpus(d.proc.pid, "io:io0"), everyone))
        check(c.cmd("object-del", {"id": "tc0"}) == {"return": {}}, "unused, the thread-context goes")
        r = c.cmd("object-add", {"qom-type": "iothread", "id": "io1", "thread-context": "nope"})
        check("error" in r and "nope" in r["error"]["desc"], "an unknown thread-context is named", r)
        for t, extra in (("authz-pam", {"service": "x"}), ("pr-manager-helper", {"path": "/nonexistent"})):
            r = c.cmd("object-add", dict({"qom-type": t, "id": "x0"}, **extra))
            check("error" in r and r["error"]["desc"].startswith(f"invalid object type: {t} ("),
                  f"{t} is refused with the reason", r)
        r = c.cmd("qom-set", {"path": "/objects/io0", "property": "poll-max-ns", "value": 0})
        check(r == {"return": {}} and c.cmd("qom-get", {"path": "/objects/io0", "property": "poll-max-ns"}) == {"return": 0},
              "qom-set of an iothread tunable", r)
        c.close()
    finally:
        d.stop()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--blockd", required=True)
    a = ap.parse_args()
    for tool in ("qemu-img", "qemu-io", "nbdinfo"):
        if not shutil.which(tool):
            print(f"SKIP: no {tool} (scripts/deps.sh --with-oracles installs it)")
            return 77
    run_each((test_commands_cannot_kill_the_daemon, test_inherited_fd_on_the_command_line,
              test_reopen_replaces_children_under_an_export, test_refused_permission_change_changes_nothing,
              test_objects_take_effect), a.blockd, "blockd-cp-")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

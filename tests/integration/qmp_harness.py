"""Shared helpers for blockd's integration tests: start a daemon (blockd or qemu-storage-daemon) in a temp
dir, wait for readiness by its pid file, and talk QMP over raw sockets with deadlines (no fixed sleeps)."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data")
DEADLINE = 10.0


class Client:
    """A minimal QMP client: raw sends, CRLF-framed reads with a deadline."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = b""

    @classmethod
    def unix(cls, path):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(DEADLINE)
        s.connect(path)
        return cls(s)

    @classmethod
    def tcp(cls, port):
        s = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
        return cls(s)

    def send(self, data):
        self.sock.sendall(data if isinstance(data, bytes) else data.encode())

    def line(self):
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("connection closed")
            self.buf += chunk
        raw, self.buf = self.buf.split(b"\r\n", 1)
        return json.loads(raw)

    def cmd(self, name, args=None, id=None):
        req = {"execute": name}
        if args is not None:
            req["arguments"] = args
        if id is not None:
            req["id"] = id
        self.send(json.dumps(req) + "\n")
        while True:
            msg = self.line()
            if "event" not in msg:
                return msg

    def negotiate(self):
        greeting = self.line()
        assert "QMP" in greeting, greeting
        assert self.cmd("qmp_capabilities") == {"return": {}}
        return greeting

    def eof(self):
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buf += chunk
        except OSError:
            return True

    def close(self):
        self.sock.close()


class Daemon:
    def __init__(self, binary, args, tmp, env=None, stdin=None):
        self.tmp = tmp
        self.pidfile = os.path.join(tmp, "blockd.pid")
        # A daemon killed with SIGKILL leaves its pid file: a stale one would read as "ready" at once.
        if os.path.exists(self.pidfile):
            os.unlink(self.pidfile)
        full_env = dict(os.environ)
        full_env.update(env or {})
        self.proc = subprocess.Popen([binary] + args + ["--pidfile", self.pidfile], stdin=stdin or subprocess.DEVNULL,
                                     stdout=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, env=full_env)
        end = time.monotonic() + DEADLINE
        # Readiness is the pid file, written only after every option took effect (as QSD does).
        while not os.path.exists(self.pidfile):
            if self.proc.poll() is not None:
                raise RuntimeError("daemon exited early: " + self.proc.stderr.read().decode())
            if time.monotonic() > end:
                raise RuntimeError("daemon not ready in time")
            time.sleep(0.005)

    def stop(self, sig=signal.SIGTERM):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(DEADLINE)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


def monitor_args(tmp, name="qmp", extra=""):
    path = os.path.join(tmp, name + ".sock")
    return ["--chardev", f"socket,id={name},path={path},server=on,wait=off", "--monitor", f"chardev={name}{extra}"], path


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def thread_names(pid):
    names = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                names.append(f.read().strip())
        except OSError:
            pass
    return names




def import_libnbd():
    """libnbd's Python bindings (Debian's python3-libnbd, module 'nbd'), or None. They are installed for
    the system Python: a test run by another Python re-executes itself with /usr/bin/python3 when that
    one has them."""
    try:
        import nbd
        return nbd
    except ImportError:
        pass
    if os.path.exists("/usr/bin/python3") and os.path.realpath(sys.executable) != os.path.realpath("/usr/bin/python3"):
        r = subprocess.run(["/usr/bin/python3", "-c", "import nbd"], capture_output=True)
        if r.returncode == 0:
            os.execv("/usr/bin/python3", ["/usr/bin/python3"] + sys.argv)
    return None


# blockd follows QSD 10.2, whose node listing has members 7.2 lacks; sizes on disk differ by nature.
NODE_EXTRA = ("active", "children", "actual-size")


def norm_nodes(v, tmp):
    """A reply as both daemons should give it: 10.2-only members, times, file lengths, the temp dir and
    automatic node-name counters taken out."""
    if isinstance(v, dict):
        out = {}
        for k, x in v.items():
            if k in NODE_EXTRA:
                continue
            if k in ("date-sec", "date-nsec", "vm-clock-sec", "vm-clock-nsec"):
                out[k] = "T"
                continue
            # 10.2 shows an empty format-specific for protocol nodes.
            if k == "format-specific" and isinstance(x, dict) and x.get("type") in ("file", "host_device"):
                continue
            out[k] = norm_nodes(x, tmp)
        # Where qcow2 puts a cluster (and so a file's length) is each implementation's own choice.
        if v.get("format") == "file" and "virtual-size" in out:
            out["virtual-size"] = "N"
        return out
    if isinstance(v, list):
        return [norm_nodes(x, tmp) for x in v]
    if isinstance(v, str):
        # Automatic node names are counters that differ between the two daemons.
        return re.sub(r"#block\d+", "#block", v.replace(tmp, "$D"))
    return v


def graph_shape(r):
    """x-debug-query-block-graph by structure: node ids are each daemon's own, so edges are named by their
    nodes (automatic names by their type) and compared as sorted lists, permissions included."""
    g = r["return"]
    names = {n["id"]: n["name"] if not n["name"].startswith("#") else "#" + n["type"] for n in g["nodes"]}
    return {"nodes": sorted([names[n["id"]], n["type"]] for n in g["nodes"]),
            "edges": sorted([names[e["parent"]], names[e["child"]], e["name"], sorted(e["perm"]),
                             sorted(e["shared-perm"])] for e in g["edges"])}


def run_each(tests, blockd, prefix):
    """Runs each test function as test(blockd, tmp) in a fresh temporary directory of its own."""
    import shutil
    import tempfile
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    for t in tests:
        tmp = tempfile.mkdtemp(prefix=prefix, dir=base)
        try:
            t(blockd, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def run_cases(cases, prefix, tools):
    """A test file's main(): --blockd and -k (a name filter); exit 77 when a tool in `tools` is missing;
    each case runs as case(blockd, tmp) in a fresh temporary directory, PASS/FAIL printed per case."""
    import argparse
    import shutil
    import tempfile
    import traceback
    ap = argparse.ArgumentParser()
    ap.add_argument("--blockd", required=True)
    ap.add_argument("-k", default="")
    a = ap.parse_args()
    missing = [t for t in tools if not shutil.which(t)]
    if missing:
        print("SKIP: missing " + ", ".join(missing))
        return 77
    failed = ran = 0
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    for case in cases:
        if a.k and a.k not in case.__name__:
            continue
        ran += 1
        tmp = tempfile.mkdtemp(prefix=prefix, dir=base)
        try:
            case(a.blockd, tmp)
            print("PASS", case.__name__, flush=True)
        except Exception:
            failed += 1
            print("FAIL", case.__name__, flush=True)
            traceback.print_exc()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"{ran - failed} passed, {failed} failed")
    return 1 if failed else 0

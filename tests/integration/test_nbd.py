# NBD server integration tests: blockd's real binary against real NBD clients and raw sockets; one test process.
"""Each case starts blockd in a fresh temp dir. Clients: nbdinfo (--json, --map, --map=qemu:allocation-depth),
nbdcopy both ways, qemu-io and qemu-img over nbd+unix:// and nbd:// URIs against a qcow2 export (qemu-img compare
of the image with the expected data once blockd is gone, and qemu-img check), fio --ioengine=nbd, and a raw-socket
client for option haggling, hostile lengths, transmission errors and the handshake timeout. QMP: nbd-server-start
(legacy addr), block-export-add/del (safe and hard, with a client connected), query-block-exports,
BLOCK_EXPORT_DELETED, the deprecated nbd-server-add/remove, nbd-server-stop, and QSD's error texts. Events are
waited for; no fixed sleeps."""
import argparse
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qmp_harness import DEADLINE, Client, Daemon, free_port, monitor_args  # noqa: E402

OPTS = b"IHAVEOPT"
REP_MAGIC = 0x3E889045565A9
NBD_REP_ACK, NBD_REP_SERVER, NBD_REP_INFO = 1, 2, 3
ERR = 1 << 31


def run(*cmd, check=True, timeout=60, **kw):
    r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd} failed ({r.returncode}): {r.stdout}{r.stderr}")
    return r


class Raw:
    """A byte-level NBD client for negotiation and error paths."""

    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.settimeout(DEADLINE)
        self.s.connect(path)
        greet = self.recv(18)
        assert greet[:16] == b"NBDMAGIC" + OPTS, greet
        assert struct.unpack(">H", greet[16:])[0] == 3

    def recv(self, n):
        b = b""
        while len(b) < n:
            c = self.s.recv(n - len(b))
            if not c:
                raise EOFError(f"closed after {len(b)} of {n} bytes")
            b += c
        return b

    def closed(self):
        try:
            return self.s.recv(1) == b""
        except OSError:
            return True

    def flags(self, f=3):
        self.s.sendall(struct.pack(">I", f))

    def opt(self, o, data=b""):
        self.s.sendall(OPTS + struct.pack(">II", o, len(data)) + data)

    def reply(self):
        magic, o, t, ln = struct.unpack(">QIII", self.recv(20))
        assert magic == REP_MAGIC, hex(magic)
        return o, t, self.recv(ln)

    def replies_until_final(self):
        out = []
        while True:
            o, t, d = self.reply()
            out.append((t, d))
            if t == NBD_REP_ACK or t & ERR:
                return out

    def go(self, name, structured=False):
        if structured:
            self.opt(8)
            assert self.reply()[1] == NBD_REP_ACK
        self.opt(7, struct.pack(">I", len(name)) + name.encode() + struct.pack(">H", 0))
        reps = self.replies_until_final()
        assert reps[-1][0] == NBD_REP_ACK, reps
        for t, d in reps:
            if t == NBD_REP_INFO and struct.unpack(">H", d[:2])[0] == 0:
                return struct.unpack(">QH", d[2:12])

    def request(self, typ, off, ln, flags=0, cookie=1, payload=b""):
        self.s.sendall(struct.pack(">IHHQQI", 0x25609513, flags, typ, cookie, off, ln) + payload)

    def simple_reply(self):
        magic, err, cookie = struct.unpack(">IIQ", self.recv(16))
        assert magic == 0x67446698, hex(magic)
        return err, cookie

    def chunk(self):
        magic, flags, typ, cookie, ln = struct.unpack(">IHHQI", self.recv(20))
        assert magic == 0x668E33EF, hex(magic)
        return flags, typ, cookie, self.recv(ln)


def image(tmp, size="64M"):
    path = os.path.join(tmp, "disk.qcow2")
    run("qemu-img", "create", "-f", "qcow2", path, size)
    run("qemu-io", "-c", "write -P 0xab 1M 2M", "-c", "write -z 8M 1M", path)
    return path


def start(binary, tmp, extra):
    args, qmp = monitor_args(tmp)
    path = image(tmp)
    sock = os.path.join(tmp, "nbd.sock")
    d = Daemon(binary, args + ["--blockdev", f"driver=file,node-name=f0,filename={path}",
                               "--blockdev", "driver=qcow2,node-name=q0,file=f0"] + extra, tmp)
    c = Client.unix(qmp)
    c.negotiate()
    return d, c, path, sock


def wait_event(c, name):
    while True:
        m = c.line()
        if m.get("event") == name:
            return m


# ---- cases ---------------------------------------------------------------------------------------------------

def case_clients_end_to_end(binary, tmp):
    sock = os.path.join(tmp, "nbd.sock")
    d, c, path, _ = start(binary, tmp, ["--nbd-server", f"addr.type=unix,addr.path={sock}",
                                        "--export", "nbd,id=e0,node-name=q0,writable=on,allocation-depth=on,"
                                                    "description=hello"])
    uri = f"nbd+unix:///q0?socket={sock}"
    info = json.loads(run("nbdinfo", "--json", uri).stdout)
    e = info["exports"][0]
    assert info["protocol"] == "newstyle-fixed" and info["structured"], info
    assert e["description"] == "hello" and e["export-size"] == 64 << 20, e
    assert e["contexts"] == ["base:allocation", "qemu:allocation-depth"], e
    for k in ("can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_cache", "can_df",
              "can_multi_conn"):
        assert e[k] is True, (k, e)
    assert e["is_read_only"] is False and e["block_size_maximum"] == 32 << 20, e
    m = run("nbdinfo", "--map", uri).stdout.split("\n")
    assert m[0].split() == ["0", "1048576", "3", "hole,zero"], m
    assert m[1].split() == ["1048576", "2097152", "0", "data"], m
    depth = [ln.split() for ln in run("nbdinfo", "--map=qemu:allocation-depth", uri).stdout.strip().split("\n")]
    assert depth[1] == ["1048576", "2097152", "1", "local"] and depth[0][3] == "absent", depth
    # Writes through qemu-io, then nbdcopy both ways, then qemu-img compare against a local model.
    run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 100k 300k", "-c", "write -z 20M 64k",
        "-c", "discard 40M 1M", "-c", "read -P 0x5a 100k 300k", "-c", "flush", uri)
    model = os.path.join(tmp, "model.raw")
    run("nbdcopy", uri, model)
    run("qemu-io", "-f", "raw", "-c", "write -P 0x77 5M 1M", "-c", "write -P 0x33 63M 512", model)
    run("nbdcopy", model, uri)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", model, uri)
    # fio's nbd engine: a short random read/write run; its verify would need a fresh target, so this is a smoke run.
    r = run("fio", "--name=smoke", "--ioengine=nbd", f"--uri={uri}", "--rw=randrw", "--bs=4k", "--iodepth=8",
            "--size=16M", "--runtime=1", "--time_based=1", "--output-format=json", check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
    assert job["error"] == 0 and job["read"]["io_bytes"] > 0, job["error"]
    # fio wrote random data: copy the final contents out, then stop blockd with a client still connected.
    run("nbdcopy", uri, model)
    raw = Raw(sock)
    raw.flags()
    raw.go("q0")
    assert d.stop() == 0
    assert raw.closed()
    run("qemu-img", "check", path)
    run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", model, path)


def case_tcp_and_qmp_lifecycle(binary, tmp):
    d, c, path, sock = start(binary, tmp, [])
    # Errors before the server runs, in QSD's words and order.
    assert c.cmd("block-export-add", {"type": "nbd", "id": "e 0", "node-name": "q0"})["error"]["desc"] == \
        "Invalid block export id"
    assert c.cmd("block-export-add", {"type": "nbd", "id": "e0", "node-name": "nope"})["error"]["desc"] == \
        "Cannot find device='' nor node-name='nope'"
    assert c.cmd("block-export-add", {"type": "nbd", "id": "e0", "node-name": "q0"})["error"]["desc"] == \
        "NBD server not running"
    assert c.cmd("nbd-server-stop")["error"]["desc"] == "NBD server not running"
    assert c.cmd("block-export-del", {"id": "zz"})["error"]["desc"] == "Export 'zz' is not found"
    err = c.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}, "tls-creds": "t0"})
    assert err["error"]["desc"].startswith("No TLS credentials with id 't0'") and "TLS" in err["error"]["desc"], err
    port = free_port()
    assert c.cmd("nbd-server-start", {"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": str(port)}},
                                      "max-connections": 1}) == {"return": {}}
    assert c.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})["error"]["desc"] == \
        "NBD server already running"
    assert c.cmd("block-export-add", {"type": "nbd", "id": "e0", "node-name": "q0", "name": "x" * 4097}
                 )["error"]["desc"].endswith("' too long")
    assert c.cmd("block-export-add", {"type": "nbd", "id": "e0", "node-name": "q0", "bitmaps": ["b0"]}
                 )["error"]["desc"] == "Bitmap 'b0' is not found"
    assert c.cmd("block-export-add", {"type": "nbd", "id": "e0", "node-name": "q0", "iothread": "nope"}
                 )["error"]["desc"] == 'iothread "nope" not found'
    assert c.cmd("block-export-add", {"type": "nbd", "id": "e0", "node-name": "q0", "name": "disk",
                                      "writable": True}) == {"return": {}}
    assert c.cmd("block-export-add", {"type": "nbd", "id": "e0", "node-name": "q0"})["error"]["desc"] == \
        "Block export id 'e0' is already in use"
    assert c.cmd("block-export-add", {"type": "nbd", "id": "e1", "node-name": "f0", "name": "disk"}
                 )["error"]["desc"] == "NBD server already has export named 'disk'"
    assert c.cmd("blockdev-del", {"node-name": "q0"})["error"]["desc"] == "Node q0 is in use"
    err = c.cmd("block_resize", {"node-name": "q0", "size": 128 << 20})["error"]["desc"]
    assert "block export 'e0'" in err and "resize" in err, err
    assert c.cmd("query-block-exports") == {"return": [
        {"id": "e0", "type": "nbd", "node-name": "q0", "shutting-down": False}]}
    uri = f"nbd://127.0.0.1:{port}/disk"
    info = json.loads(run("nbdinfo", "--json", uri).stdout)["exports"][0]
    assert info["can_multi_conn"] is False, info  # max-connections=1 withdraws it, as QEMU does
    run("qemu-io", "-f", "raw", "-c", "write -P 0x42 0 64k", "-c", "read -P 0x42 0 64k", uri)
    # A connected client blocks a safe delete; a hard one disconnects it and deletes before the reply.
    s = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    s.recv(18)
    s.sendall(struct.pack(">I", 3) + OPTS + struct.pack(">II", 1, 4) + b"disk")
    assert len(s.recv(10)) == 10
    assert c.cmd("block-export-del", {"id": "e0"})["error"]["desc"] == "export 'e0' still in use"
    c.send(json.dumps({"execute": "block-export-del", "arguments": {"id": "e0", "mode": "hard"}}) + "\n")
    ev = c.line()
    assert ev.get("event") == "BLOCK_EXPORT_DELETED" and ev["data"] == {"id": "e0"}, ev
    assert c.line() == {"return": {}}
    assert s.recv(1) == b""
    assert c.cmd("query-block-exports") == {"return": []}
    # The deprecated pair: the export id is the name, defaulting to the device.
    assert c.cmd("nbd-server-add", {"device": "nope"})["error"]["desc"] == \
        "Cannot find device='nope' nor node-name='nope'"
    assert c.cmd("nbd-server-add", {"device": "q0"}) == {"return": {}}
    assert c.cmd("query-block-exports")["return"][0]["id"] == "q0"
    assert c.cmd("blockdev-del", {"node-name": "q0"})["error"]["desc"] == "Node q0 is in use"
    c.send(json.dumps({"execute": "nbd-server-stop"}) + "\n")
    assert wait_event(c, "BLOCK_EXPORT_DELETED")["data"] == {"id": "q0"}
    assert c.line() == {"return": {}}
    assert c.cmd("blockdev-del", {"node-name": "q0"}) == {"return": {}}
    c.cmd("quit")
    assert d.stop() == 0


def case_option_haggling(binary, tmp):
    sock = os.path.join(tmp, "nbd.sock")
    d, c, path, _ = start(binary, tmp, ["--nbd-server", json.dumps({"addr": {"type": "unix", "path": sock},
                                                                  "handshake-max-seconds": 1}),
                                        "--export", "nbd,id=e0,node-name=q0"])
    r = Raw(sock)
    r.flags()
    r.opt(3)  # LIST
    reps = r.replies_until_final()
    assert reps[0] == (NBD_REP_SERVER, struct.pack(">I", 2) + b"q0"), reps
    r.opt(3, b"x")
    assert r.reply()[1:] == (ERR | 3, b"option 'list' has unexpected length")
    r.opt(99, b"abc")
    assert r.reply()[1:] == (ERR | 1, b"Unsupported option 99 (<unknown>)")
    r.opt(5)  # STARTTLS without TLS configured
    assert r.reply()[1:] == (ERR | 2, b"TLS not configured")
    r.opt(10, struct.pack(">I", 2) + b"q0" + struct.pack(">I", 0))  # SET_META_CONTEXT before structured replies
    assert r.reply()[1] == ERR | 3
    r.opt(6, struct.pack(">I", 4) + b"nope" + struct.pack(">H", 0))
    assert r.reply()[1:] == (ERR | 6, b"export 'nope' not present")
    r.opt(8)
    assert r.reply()[1] == NBD_REP_ACK
    r.opt(8)
    assert r.reply()[1:] == (ERR | 3, b"structured reply already negotiated")
    size, flags = r.go("q0")
    assert size == 64 << 20 and flags & 2, (size, hex(flags))  # read-only export
    # Transmission errors: EINVAL for a write to a read-only export (payload consumed), past EOF, bad flags.
    r.request(1, 0, 512, payload=b"\0" * 512, cookie=7)
    fl, typ, cookie, data = r.chunk()
    assert (typ, cookie) == (0x8001, 7) and struct.unpack(">I", data[:4])[0] == 22, data
    assert data[6:] == b"Export is read-only", data
    r.request(0, 64 << 20, 512, cookie=8)
    fl, typ, cookie, data = r.chunk()
    assert typ == 0x8001 and data[6:].startswith(b"operation past EOF"), data
    r.request(0, 0, 4096, flags=1 << 3, cookie=9)  # REQ_ONE on a read
    assert r.chunk()[3][6:] == b"unsupported flags for command read (got 0x8)"
    r.request(0, 0, 4096, cookie=10)  # a read of a hole: one hole chunk or data
    fl, typ, cookie, data = r.chunk()
    assert fl & 1 and typ in (1, 2) and cookie == 10, (fl, typ)
    r.request(2, 0, 0)  # DISC
    assert r.closed()
    # A bad request magic drops the connection.
    r = Raw(sock)
    r.flags()
    r.go("q0")
    r.s.sendall(b"\xde\xad\xbe\xef" + b"\0" * 24)
    assert r.closed()
    # Hostile option length: over 32 MiB is a disconnect; a client that never finishes is dropped on time.
    r = Raw(sock)
    r.flags()
    r.s.sendall(OPTS + struct.pack(">II", 7, 0xFFFFFFF0))
    assert r.closed()
    r = Raw(sock)
    r.flags()
    assert r.closed()  # handshake-max-seconds=1
    r = Raw(sock)
    r.flags(0x80)
    assert r.closed()
    assert d.stop() == 0


def case_clients_wait_for_the_command_line(binary, tmp):
    """A client that connects the moment the sockets appear (before the pid file) is served only once
    every command-line item is applied: the export named by the last --export is there, and QMP sees
    the whole configuration. Many --blockdev items between --nbd-server and --export widen the window."""
    args, qmp = monitor_args(tmp)
    sock = os.path.join(tmp, "nbd.sock")
    many = []
    for i in range(2000):
        many += ["--blockdev", f"driver=null-co,node-name=n{i},size=1048576"]
    proc = subprocess.Popen([binary] + args + ["--nbd-server", f"addr.type=unix,addr.path={sock}"] + many +
                            ["--export", "type=nbd,id=e0,node-name=n1999,name=last"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        end = time.monotonic() + DEADLINE

        def first_connect(make):
            # A socket file exists from bind() on; connecting succeeds once listen() follows.
            while True:
                assert proc.poll() is None and time.monotonic() < end, "daemon did not listen"
                try:
                    return make()
                except (FileNotFoundError, ConnectionRefusedError):
                    time.sleep(0.001)

        r = first_connect(lambda: Raw(sock))
        r.flags()
        assert r.go("last")[0] == 1 << 20
        c = first_connect(lambda: Client.unix(qmp))
        c.negotiate()
        assert [e["id"] for e in c.cmd("query-block-exports")["return"]] == ["e0"]
        assert len(c.cmd("query-named-block-nodes", {"flat": True})["return"]) == 2000
    finally:
        proc.terminate()
        rc = proc.wait(DEADLINE)
        assert rc == 0, (rc, proc.stderr.read())


def case_clients_follow_their_node_to_another_iothread(binary, tmp):
    """x-blockdev-set-iothread (force) on an exported node: connected clients keep working on the
    node's new home, requests pipelined across the move are all answered, and data written before,
    during and after the move reads back, also for a client that stopped in the middle of a payload."""
    sock = os.path.join(tmp, "nbd.sock")
    d, c, path, _ = start(binary, tmp, ["--object", "iothread,id=io1",
                                        "--nbd-server", f"addr.type=unix,addr.path={sock}",
                                        "--export", "nbd,id=e0,node-name=q0,writable=on"])
    a = Raw(sock)
    a.flags()
    a.go("q0")
    b = Raw(sock)
    b.flags()
    b.go("q0")

    def pipelined_writes(cl, base, count, val):
        for i in range(count):
            cl.request(1, base + i * 4096, 4096, cookie=1000 + i, payload=bytes([val]) * 4096)

    def collect(cl, count):
        got = set()
        for _ in range(count):
            err, cookie = cl.simple_reply()
            assert err == 0, (err, cookie)
            got.add(cookie)
        assert len(got) == count

    def read_back(cl, off, ln):
        cl.request(0, off, ln, cookie=7)
        err, cookie = cl.simple_reply()
        assert err == 0 and cookie == 7
        return cl.recv(ln)

    for where, val in (("io1", 0x41), (None, 0x42), ("io1", 0x43)):
        pipelined_writes(a, 0, 200, val)        # in the socket and the connection while the node moves
        pipelined_writes(b, 4 << 20, 50, val)
        r = c.cmd("x-blockdev-set-iothread", {"node-name": "q0", "iothread": where, "force": True})
        assert r == {"return": {}}, r
        collect(a, 200)
        collect(b, 50)
        assert read_back(a, 0, 200 * 4096) == bytes([val]) * (200 * 4096)
        assert read_back(b, 4 << 20, 50 * 4096) == bytes([val]) * (50 * 4096)
    # A new client after the moves lands on the node's home too.
    n = Raw(sock)
    n.flags()
    n.go("q0")
    assert read_back(n, 0, 4096) == bytes([0x43]) * 4096
    # A client stalled in the middle of a write payload does not hold the move: its header and the
    # payload bytes so far travel with it, and the rest arrives on the new home.
    n.s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 1, 9, 1 << 20, 65536) + b"x" * 1000)
    r = c.cmd("x-blockdev-set-iothread", {"node-name": "q0", "iothread": None, "force": True})
    assert r == {"return": {}}, r
    n.s.sendall(b"y" * (65536 - 1000))
    assert n.simple_reply() == (0, 9)
    assert read_back(n, 1 << 20, 65536) == b"x" * 1000 + b"y" * (65536 - 1000)
    assert read_back(a, 0, 4096) == bytes([0x43]) * 4096
    a.request(2, 0, 0, cookie=3)  # DISC
    assert a.closed()
    # An iothread that a fixed-iothread export pins a node to cannot be deleted (QSD 7.2 deletes it
    # and crashes at the next export command); after the export goes, the node moves to main.
    assert c.cmd("blockdev-add", {"driver": "null-co", "node-name": "n1"}) == {"return": {}}
    r = c.cmd("block-export-add", {"type": "nbd", "id": "fx", "node-name": "n1", "name": "fx", "iothread": "io1",
                                   "fixed-iothread": True})
    assert r == {"return": {}}, r
    r = c.cmd("object-del", {"id": "io1"})
    assert r["error"]["desc"] == ("iothread 'io1' runs node 'n1', which export 'fx' keeps there (fixed-iothread); "
                                  "delete the export first"), r
    assert c.cmd("block-export-del", {"id": "fx"}) == {"return": {}}
    assert c.cmd("object-del", {"id": "io1"}) == {"return": {}}
    fx = Raw(sock)  # q0 was last moved to the main loop: it serves with io1 gone
    fx.flags()
    fx.go("q0")
    assert read_back(fx, 0, 4096) == bytes([0x43]) * 4096
    assert d.stop() == 0
    run("qemu-img", "check", path)


def case_allow_inactive(binary, tmp):
    """An export without allow-inactive activates its node and keeps it active (inactivating it then
    fails); with allow-inactive the node stays inactive, reads are served, writes fail, and the node
    may be inactivated again under the export."""
    sock = os.path.join(tmp, "nbd.sock")
    img2 = os.path.join(tmp, "two.qcow2")
    run("qemu-img", "create", "-f", "qcow2", img2, "1M")
    d, c, path, _ = start(binary, tmp, [
        "--blockdev", f"driver=file,node-name=f1,filename={img2},active=off",
        "--blockdev", "driver=qcow2,node-name=q1,file=f1,active=off",
        "--nbd-server", f"addr.type=unix,addr.path={sock}"])

    def active(name):
        return {n["node-name"]: n["active"] for n in c.cmd("query-named-block-nodes")["return"]}[name]

    assert c.cmd("blockdev-set-active", {"node-name": "q0", "active": False}) == {"return": {}}
    assert not active("q0") and not active("q1")
    r = c.cmd("block-export-add", {"type": "nbd", "id": "e0", "node-name": "q0", "writable": True,
                                   "allow-inactive": True})
    assert r == {"return": {}}, r
    assert not active("q0")
    uri = f"nbd+unix:///q0?socket={sock}"
    run("qemu-io", "-f", "raw", "-c", "read -P 0xab 1M 2M", uri)
    w = run("qemu-io", "-f", "raw", "-c", "write -P 1 0 4k", uri, check=False)
    assert "write failed" in (w.stdout + w.stderr), w.stdout + w.stderr
    assert c.cmd("blockdev-set-active", {"node-name": "q0", "active": True}) == {"return": {}}
    run("qemu-io", "-f", "raw", "-c", "write -P 1 0 4k", uri)
    assert c.cmd("blockdev-set-active", {"node-name": "q0", "active": False}) == {"return": {}}
    # Without allow-inactive: activated at once, and kept active.
    r = c.cmd("block-export-add", {"type": "nbd", "id": "e1", "node-name": "q1", "writable": True})
    assert r == {"return": {}}, r
    assert active("q1") and active("f1")
    r = c.cmd("blockdev-set-active", {"node-name": "q1", "active": False})
    assert "error" in r and "block export 'e1'" in r["error"]["desc"], r
    run("qemu-io", "-f", "raw", "-c", "write -P 2 0 4k", "-c", "read -P 2 0 4k", f"nbd+unix:///q1?socket={sock}")
    assert c.cmd("block-export-del", {"id": "e1"}) == {"return": {}}
    assert c.cmd("blockdev-set-active", {"node-name": "q1", "active": False}) == {"return": {}}
    assert d.stop() == 0
    run("qemu-img", "check", img2)
    run("qemu-io", "-c", "read -P 2 0 4k", img2)


def case_extended_headers(binary, tmp):
    """NBD_OPT_EXTENDED_HEADERS end to end (libnbd 1.14 and QSD 7.2 cannot speak it): 32-byte requests
    with 64-bit lengths, extended reply chunks for writes, reads and errors, 64-bit block status
    descriptors, and a write-zeroes longer than 4 GiB on a large null-co node."""
    sock = os.path.join(tmp, "nbd.sock")
    d, c, path, _ = start(binary, tmp, ["--blockdev", "driver=null-co,node-name=big,size=8589934592,read-zeroes=on",
                                        "--nbd-server", f"addr.type=unix,addr.path={sock}",
                                        "--export", "nbd,id=e0,node-name=q0,writable=on",
                                        "--export", "nbd,id=e1,node-name=big,writable=on"])
    EXT_REQ, EXT_REP = 0x21E41C71, 0x6E8A278C

    def connect(name):
        r = Raw(sock)
        r.flags()
        r.opt(11)  # EXTENDED_HEADERS
        assert r.reply()[1] == NBD_REP_ACK
        q = b"base:allocation"
        r.opt(10, struct.pack(">I", len(name)) + name.encode() + struct.pack(">I", 1) +
              struct.pack(">I", len(q)) + q)  # SET_META_CONTEXT
        reps = r.replies_until_final()
        assert reps[-1][0] == NBD_REP_ACK and reps[0][0] == 4, reps  # NBD_REP_META_CONTEXT
        ctx = struct.unpack(">I", reps[0][1][:4])[0]
        r.go(name)
        return r, ctx

    def request(r, typ, off, ln, cookie, flags=0, payload=b""):
        r.s.sendall(struct.pack(">IHHQQQ", EXT_REQ, flags, typ, cookie, off, ln) + payload)

    def chunk(r):
        magic, flags, typ, cookie, off, ln = struct.unpack(">IHHQQQ", r.recv(32))
        assert magic == EXT_REP, hex(magic)
        return flags, typ, cookie, off, r.recv(ln)

    r, ctx = connect("q0")
    request(r, 1, 3 << 20, 8192, 5, payload=b"\x5c" * 8192)  # WRITE
    assert chunk(r)[:3] == (1, 0, 5)  # NONE with DONE
    request(r, 0, 3 << 20, 8192, 6)  # READ
    data = b""
    while True:
        flags, typ, cookie, off, pl = chunk(r)
        assert cookie == 6
        if typ == 1:  # OFFSET_DATA
            assert struct.unpack(">Q", pl[:8])[0] == (3 << 20) + len(data)
            data += pl[8:]
        if flags & 1:
            break
    assert data == b"\x5c" * 8192
    request(r, 7, 0, 64 << 20, 7)  # BLOCK_STATUS over the whole disk
    flags, typ, cookie, off, pl = chunk(r)
    assert typ == 6 and cookie == 7, typ  # BLOCK_STATUS_EXT
    cid, count = struct.unpack(">II", pl[:8])
    assert cid == ctx and count == (len(pl) - 8) // 16
    ext = [struct.unpack(">QQ", pl[8 + 16 * i:24 + 16 * i]) for i in range(count)]
    pos, seen_data = 0, False
    for ln, st in ext:
        if pos <= 3 << 20 < pos + ln:
            seen_data = st & 1 == 0
        pos += ln
    assert seen_data and pos <= 64 << 20, ext
    if not flags & 1:
        assert chunk(r)[1] == 0
    request(r, 0, 64 << 20, 4096, 8)  # READ past the end: an error chunk, the connection goes on
    flags, typ, cookie, off, pl = chunk(r)
    assert typ == (1 << 15) + 1 and cookie == 8 and flags & 1, typ  # NBD_REPLY_TYPE_ERROR
    assert struct.unpack(">I", pl[:4])[0] == 22  # EINVAL
    request(r, 2, 0, 0, 9)  # DISC
    assert r.closed()
    # 64-bit lengths: zero 5 GiB in one request.
    r, _ = connect("big")
    request(r, 6, 1 << 30, 5 << 30, 10)  # WRITE_ZEROES
    flags, typ, cookie, off, pl = chunk(r)
    assert (flags & 1, typ, cookie) == (1, 0, 10), (flags, typ, pl)
    assert d.stop() == 0


CASES = [case_extended_headers, case_allow_inactive, case_clients_follow_their_node_to_another_iothread, case_clients_wait_for_the_command_line, case_clients_end_to_end, case_tcp_and_qmp_lifecycle, case_option_haggling]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--blockd", required=True)
    ap.add_argument("-k", default="")
    a = ap.parse_args()
    failed = 0
    for case in CASES:
        if a.k and a.k not in case.__name__:
            continue
        tmp = tempfile.mkdtemp(prefix="blockd-nbd-")
        try:
            case(a.blockd, tmp)
            print("PASS", case.__name__, flush=True)
        except Exception:
            failed += 1
            print("FAIL", case.__name__, flush=True)
            traceback.print_exc()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"{len(CASES) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

# Makes the NBD fuzz seeds: real clients (nbdinfo, qemu-img, qemu-io, nbdcopy, fio, nbdsh) against a running server through a recording unix-socket proxy; run by hand, one process (a relay thread per connection).
"""Usage: make_nbd_corpus.py --server PATH/TO/blockd [--out tests/fuzz/corpus/nbd]

Starts the server (blockd, or qemu-storage-daemon: same command line) with a small sparse qcow2 exported
as 'disk0' (writable, allocation-depth on) on a unix socket, puts a relay in front of it, and runs each
client against the relay. What every client connection sent is written as one seed: two control bytes
(0x00 0x00: one read, no forced transmission) then the bytes, cut at 64 KiB. A few hand-made seeds
(synthetic-*) cover what these clients never send: extended headers, STARTTLS, option errors. 'disk0' is the name the
harness's test catalog uses, so the seeds reach the transmission phase."""
import argparse
import hashlib
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "integration"))
from qmp_harness import Daemon  # noqa: E402

MAX_SEED = 64 << 10


class Recorder:
    """Listens on `path`, relays each connection to `target`, keeps what the client sent."""

    def __init__(self, path, target):
        self.target = target
        self.lsock = socket.socket(socket.AF_UNIX)
        self.lsock.bind(path)
        self.lsock.listen(16)
        self.lock = threading.Lock()
        self.sessions = []
        self.threads = []
        threading.Thread(target=self.accept_loop, daemon=True).start()

    def accept_loop(self):
        while True:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            rec = bytearray()
            with self.lock:
                self.sessions.append(rec)
            s = socket.socket(socket.AF_UNIX)
            s.connect(self.target)
            a = threading.Thread(target=self.pump, args=(c, s, rec), daemon=True)
            b = threading.Thread(target=self.pump, args=(s, c, None), daemon=True)
            a.start()
            b.start()
            self.threads += [a, b]

    @staticmethod
    def pump(src, dst, rec):
        try:
            while True:
                d = src.recv(65536)
                if not d:
                    break
                if rec is not None and len(rec) < MAX_SEED:
                    rec += d[:MAX_SEED - len(rec)]
                dst.sendall(d)
        except OSError:
            pass
        for sock in (dst, src):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def take(self):
        """Waits for the relays of finished clients to drain, returns and forgets their recordings."""
        for t in self.threads:
            t.join(10)
        self.threads = []
        with self.lock:
            out, self.sessions = self.sessions, []
        return [bytes(r) for r in out]


NBDSH_HAGGLE = """
h.set_opt_mode(True)
h.connect_uri(uri)
h.opt_list(lambda n, d: 0)
h.opt_info()
h.opt_list_meta_context(lambda c: 0)
h.add_meta_context("base:allocation")
h.add_meta_context("qemu:allocation-depth")
h.add_meta_context("qemu:dirty-bitmap:b0")
h.opt_go()
h.block_status(65536, 0, lambda *a: 0)
h.block_status(65536, 0, lambda *a: 0, nbd.CMD_FLAG_REQ_ONE)
h.pread_structured(131072, 0, lambda *a: 0)
h.pwrite(b"x" * 512, 4096, nbd.CMD_FLAG_FUA)
h.zero(65536, 1 << 20, nbd.CMD_FLAG_NO_HOLE)
h.zero(65536, 2 << 20, nbd.CMD_FLAG_FAST_ZERO)
h.trim(65536, 3 << 20)
h.cache(65536, 0)
h.flush()
h.shutdown()
"""

NBDSH_SIMPLE = """
h.set_request_structured_replies(False)
h.set_export_name("disk0")
h.connect_uri(uri)
h.pread(4096, 0)
h.set_strict_mode(0)
try:
    h.pread(4096, 1 << 40)
except nbd.Error:
    pass
h.shutdown()
"""


def opt(code, data=b""):
    return b"IHAVEOPT" + struct.pack(">II", code, len(data)) + data


def name_req(name, infos=()):
    return struct.pack(">I", len(name)) + name + struct.pack(">H", len(infos)) + b"".join(
        struct.pack(">H", i) for i in infos)


def meta_req(name, queries):
    return struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries)) + b"".join(
        struct.pack(">I", len(q)) + q for q in queries)


def ext_req(flags, typ, cookie, off, ln, payload=b""):
    return struct.pack(">IHHQQQ", 0x21E41C71, flags, typ, cookie, off, ln) + payload


def req(flags, typ, cookie, off, ln, payload=b""):
    return struct.pack(">IHHQQI", 0x25609513, flags, typ, cookie, off, ln) + payload


def synthetic():
    """Hand-made seeds for what the clients here never send: extended headers (libnbd 1.14 lacks them),
    STARTTLS on a server with tls-creds, and the option errors."""
    flags = struct.pack(">I", 3)
    metas = [b"base:allocation", b"qemu:allocation-depth", b"qemu:dirty-bitmap:b0", b"qemu:", b"nope:x"]
    ext = (flags + opt(11) + opt(10, meta_req(b"disk0", metas[:3])) + opt(7, name_req(b"disk0", (1, 3))) +
           ext_req(0, 0, 1, 0, 4096) + ext_req(0x21, 1, 2, 4096, 8, b"ABCDEFGH") + ext_req(0x20, 7, 3, 0, 16,
           struct.pack(">QII", 1 << 20, 0, 1)) + ext_req(0x08, 7, 4, 0, 65536) + ext_req(0x12, 6, 5, 0, 1 << 20) +
           ext_req(0, 3, 7, 0, 0) + ext_req(0, 2, 8, 0, 0))
    structured = (flags + opt(8) + opt(9, meta_req(b"disk0", [])) + opt(9, meta_req(b"ro", metas)) +
                  opt(10, meta_req(b"disk0", metas)) + opt(6, name_req(b"")) + opt(6, name_req(b"", (3,))) +
                  opt(7, name_req(b"disk0")) + req(0, 0, 1, 0, 131072) + req(4, 0, 2, 0, 512) +
                  req(8, 7, 3, 0, 1 << 20) + req(1, 1, 4, 0, 4, b"data") + req(0, 9, 5, 0, 0) + req(0, 2, 6, 0, 0))
    errors = (flags + opt(3, b"x") + opt(8, b"y") + opt(99) + opt(4) + opt(6, b"\0\0") + opt(6, name_req(b"nope")) +
              opt(10, meta_req(b"disk0", metas)) + opt(5) + opt(11) + opt(8) + opt(11) +
              opt(7, struct.pack(">I", 5000)) + opt(1, b"ro"))
    tls = (flags + opt(3) + opt(6, name_req(b"disk0")) + opt(5) + opt(5) + opt(3) + opt(8) + opt(7, name_req(b"ro")) +
           req(0, 0, 1, 0, 512) + req(0, 1, 2, 0, 512) + req(0, 2, 3, 0, 0))
    tls_abort = flags + opt(7, name_req(b"disk0")) + opt(2, b"xx")
    return {
        "synthetic-extended": b"\x00\x00" + ext,
        "synthetic-extended-cut": b"\xe0\x17" + ext,
        "synthetic-structured": b"\x00\x00" + structured,
        "synthetic-option-errors": b"\x01\x00" + errors,
        "synthetic-tls": b"\x00\x80" + tls,
        "synthetic-tls-abort": b"\x20\x80" + tls_abort,
        # Unknown client flags end the handshake after 4 bytes; the rest is parsed as extended requests.
        "synthetic-forced-extended": (b"\x14\x00" + struct.pack(">I", 0x80) +
                                      ext_req(0x20, 7, 1, 0, 16, struct.pack(">QII", 4096, 0, 1)) +
                                      ext_req(0, 0, 2, 0, 512) + ext_req(0x10, 6, 3, 0, 4096)),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", required=True)
    ap.add_argument("--out", default=os.path.join(HERE, "corpus", "nbd"))
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    for name, b in synthetic().items():
        with open(os.path.join(a.out, name), "wb") as f:
            f.write(b)
    tmp = tempfile.mkdtemp(prefix="nbd-corpus-")
    try:
        img = os.path.join(tmp, "disk.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", img, "8M"], check=True)
        subprocess.run(["qemu-io", "-c", "write -P 0xab 1M 256k", "-c", "write -z 4M 64k", img], check=True,
                       capture_output=True)
        real = os.path.join(tmp, "real.sock")
        relay = os.path.join(tmp, "relay.sock")
        d = Daemon(a.server, ["--blockdev", f"driver=file,node-name=f0,filename={img}",
                              "--blockdev", "driver=qcow2,node-name=disk0,file=f0",
                              "--nbd-server", f"addr.type=unix,addr.path={real}",
                              "--export", "nbd,id=e0,node-name=disk0,writable=on,allocation-depth=on"], tmp)
        rec = Recorder(relay, real)
        uri = f"nbd+unix:///disk0?socket={relay}"
        raw = os.path.join(tmp, "copy.raw")
        clients = {
            "nbdinfo-json": ["nbdinfo", "--json", uri],
            "nbdinfo-list": ["nbdinfo", "--list", f"nbd+unix://?socket={relay}"],
            "nbdinfo-map": ["nbdinfo", "--map", uri],
            "nbdinfo-map-depth": ["nbdinfo", "--map=qemu:allocation-depth", uri],
            "qemu-img-info": ["qemu-img", "info", uri],
            "qemu-io-rw": ["qemu-io", "-f", "raw", "-c", "write -P 0x5a 8k 4k", "-c", "write -z 64k 64k",
                           "-c", "discard 1M 64k", "-c", "read 0 16k", "-c", "flush", uri],
            "qemu-img-map": ["qemu-img", "map", "--output=json", "-f", "raw", uri],
            "nbdcopy-out": ["nbdcopy", "--connections=1", uri, raw],
            "nbdcopy-in": ["nbdcopy", "--connections=1", raw, uri],
            "fio": ["fio", "--name=seed", "--ioengine=nbd", f"--uri={uri}", "--rw=randrw", "--bs=4k",
                    "--iodepth=4", "--size=1M", "--io_size=64k"],
            "nbdsh-haggle": ["nbdsh", "-c", f"uri = {uri!r}\n" + NBDSH_HAGGLE],
            "nbdsh-simple": ["nbdsh", "-c", f"uri = {uri!r}\n" + NBDSH_SIMPLE],
        }
        os.makedirs(a.out, exist_ok=True)
        seen = set()
        # nbdsh runs "python3 -m nbd": the system Python has the bindings (python3-libnbd), a pyenv one may not.
        env = dict(os.environ, PATH="/usr/bin:" + os.environ.get("PATH", ""))
        for name, cmd in clients.items():
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
            if r.returncode != 0:
                print(f"{name}: exit {r.returncode}: {r.stderr.strip()[:300]}", file=sys.stderr)
            for i, b in enumerate(rec.take()):
                h = hashlib.sha1(b).hexdigest()
                if not b or h in seen:
                    continue
                seen.add(h)
                with open(os.path.join(a.out, f"{name}.{i}"), "wb") as f:
                    f.write(b"\x00\x00" + b)
                print(f"{name}.{i}: {len(b)} bytes")
        rec.lsock.close()
        d.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

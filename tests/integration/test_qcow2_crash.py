#!/usr/bin/env python3
"""Crash safety of the daemon: blockd serves a fresh qcow2 image over NBD, a client keeps random allocating writes
(and now and then a flush) in flight, and blockd is killed with SIGKILL after a random number of completed
requests. Every image must pass `qemu-img check` with no corruption (leaked clusters are allowed), and every
write completed before the last completed flush must read back. 50 trials; BLOCKD_QCOW2_CRASH_TRIALS changes it."""
import argparse
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qmp_harness import Daemon  # noqa: E402

NBD_OPT_GO = 7
CMD_WRITE, CMD_FLUSH = 1, 3


def recv_exact(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError("server closed the connection")
        buf += chunk
    return buf


def connect(path, name=b"disk"):
    """Fixed-newstyle handshake with NBD_OPT_GO; returns the socket in transmission phase (simple replies)."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    deadline = time.monotonic() + 10
    while True:
        try:
            s.connect(path)
            break
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.005)
    magic, opt_magic, flags = struct.unpack(">QQH", recv_exact(s, 18))
    assert magic == 0x4e42444d41474943 and opt_magic == 0x49484156454F5054, "not a newstyle server"
    s.sendall(struct.pack(">I", 1))  # NBD_FLAG_C_FIXED_NEWSTYLE
    payload = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    s.sendall(struct.pack(">QII", 0x49484156454F5054, NBD_OPT_GO, len(payload)) + payload)
    while True:
        _, opt, rtype, length = struct.unpack(">QIII", recv_exact(s, 20))
        recv_exact(s, length)
        if rtype == 1:  # NBD_REP_ACK
            return s
        assert rtype == 3 or rtype < 0x80000000, f"option refused ({rtype:#x})"


def trial(blockd, tmp, rng):
    img = os.path.join(tmp, "c.qcow2")
    sock = os.path.join(tmp, "nbd.sock")
    for p in (img, sock):
        if os.path.exists(p):
            os.unlink(p)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", img, "256M"], check=True)
    d = Daemon(blockd, ["--blockdev", f"driver=file,node-name=f0,filename={img}",
                        "--blockdev", "driver=qcow2,node-name=d0,file=f0",
                        "--nbd-server", f"addr.type=unix,addr.path={sock}",
                        "--export", "type=nbd,id=e0,node-name=d0,name=disk,writable=on"], tmp)
    s = connect(sock)
    stop_after = rng.randrange(10, 400)
    written = {}  # offset -> pattern byte: writes a completed flush covers
    pending = {}  # cookie -> (kind, offset, byte, writes done when a flush was sent)
    done = {}  # offset -> pattern byte of every completed write
    completed = 0
    cookie = 0
    depth = 16
    try:
        while completed < stop_after:
            while len(pending) < depth:
                cookie += 1
                if rng.random() < 0.05:
                    # A flush covers the writes completed before it was sent (the NBD rule).
                    s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, CMD_FLUSH, cookie, 0, 0))
                    pending[cookie] = ("flush", 0, 0, dict(done))
                else:
                    off = rng.randrange(0, (256 << 20) // 4096) * 4096
                    if any(p[0] == "write" and p[1] == off for p in pending.values()):
                        continue  # overlapping writes in flight have no defined result
                    b = rng.randrange(1, 256)
                    s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, CMD_WRITE, cookie, off, 4096) + bytes([b]) * 4096)
                    pending[cookie] = ("write", off, b, None)
            magic, err, c = struct.unpack(">IIQ", recv_exact(s, 16))
            assert magic == 0x67446698 and err == 0, f"request failed: {err}"
            kind, off, b, covered = pending.pop(c)
            completed += 1
            if kind == "write":
                done[off] = b
            else:
                written.update(covered)
    finally:
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait()
        s.close()
    # A killed process's io_uring can hold its files (and their locks) a moment after wait(): retry
    # while the lock is still taken, up to a deadline.
    deadline = time.monotonic() + 10
    while True:
        r = subprocess.run(["qemu-img", "check", "--output=json", img], capture_output=True, text=True)
        if "Failed to get" not in r.stderr or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    # 0: clean, 3: leaked clusters only; 2 (corruption) or anything else fails.
    if r.returncode not in (0, 3):
        return f"qemu-img check exit {r.returncode} after {completed} requests: {r.stdout}{r.stderr}"
    if written:
        raw = os.path.join(tmp, "content.raw")
        subprocess.run(["qemu-img", "convert", "-O", "raw", img, raw], check=True)
        with open(raw, "rb") as f:
            for off, b in written.items():
                f.seek(off)
                got = f.read(4096)
                # A later write to the same offset may have landed after the flush (any of its values
                # is fine); zeroes mean a flushed write was lost.
                if got != bytes([b]) * 4096 and got == bytes(4096):
                    return f"flushed write at {off} lost after {completed} requests"
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--blockd", required=True)
    ap.add_argument("--trials", type=int, default=int(os.environ.get("BLOCKD_QCOW2_CRASH_TRIALS", "50")))
    ap.add_argument("--seed", type=int, default=20261201)
    a = ap.parse_args()
    if not shutil.which("qemu-img"):
        print("FAIL: qemu-img not installed (scripts/test installs it)")
        return 1
    rng = random.Random(a.seed)
    failed = 0
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(prefix="bd-crash-", dir=base) as tmp:
        for t in range(a.trials):
            why = trial(a.blockd, tmp, rng)
            if why:
                failed += 1
                print(f"FAIL trial {t}: {why}")
    print(f"{a.trials - failed} passed, {failed} failed (SIGKILL during allocating writes over NBD)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

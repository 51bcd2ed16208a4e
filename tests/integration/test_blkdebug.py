# Differential blkdebug/blkverify tests over QMP and NBD, blockd against qemu-storage-daemon; one test process.
"""Each case runs against qemu-storage-daemon and against blockd, each in a fresh temp dir with the same files,
and the observations must be equal:
- blockdev-add of blkdebug with bad options and bad config files: the error replies (class and text);
- the filenames query-named-block-nodes reports for blkdebug (blkdebug:CONFIG:IMAGE, json:) and blkverify;
- an NBD export of raw over blkdebug with inject-error rules (read_aio / write_aio, sector, once, errno, iotype,
  a config file): what qemu-io reads and writes through the export, error texts included; and, with libnbd's
  Python bindings (optional), reads without structured replies with the exact errno each one got.
QSD 7.2's NBD server drops the connection after a read error sent in a structured reply (later QEMUs and blockd
keep it, answering the error chunk); so qemu-io sequences end at their first failing read, and the errno of a
failing read is compared through libnbd with structured replies off.
Normalized: the temp dir becomes WORKDIR. Readiness is the daemon's pid file; nothing sleeps."""
import argparse
import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qmp_harness import Client, Daemon, import_libnbd, monitor_args  # noqa: E402

nbd = import_libnbd()  # optional: the libnbd cases are left out without it

MiB = 1 << 20

CONFIGS = {
    "ok.cfg": '[inject-error]\nevent = "read_aio"\nerrno = "5"\n',
    "nogroup.cfg": "garbage\n",
    "badgroup.cfg": '[bogus]\nevent = "x"\n',
    "badkey.cfg": '[inject-error]\nfoo = "1"\n',
    "badevent.cfg": '[inject-error]\nevent = "nosuch"\n',
    "badnum.cfg": '[inject-error]\nevent = "read_aio"\nerrno = "abc"\n',
    "noevent.cfg": '[inject-error]\nerrno = "5"\n',
    "badiotype.cfg": '[inject-error]\nevent = "read_aio"\niotype = "read,write"\n',
    "badbool.cfg": '[inject-error]\nevent = "read_aio"\nonce = "maybe"\n',
    "unquoted.cfg": '[inject-error]\nevent = read_aio\n',
    "blank.cfg": '[inject-error]\n   \n',
    "sector.cfg": '[inject-error]\nevent = "read_aio"\nsector = "16"\nerrno = "5"\n',
}

BAD_OPTIONS = [
    {"align": 3},
    {"align": -1},
    {"align": 2147483648},
    {"align": 4096, "max-transfer": 1000},
    {"max-transfer": -512},
    {"align": 512, "opt-write-zero": 100},
    {"opt-write-zero": 1024, "max-write-zero": 1536},
    {"align": 512, "opt-discard": 100},
    {"opt-discard": 1024, "max-discard": 1536},
    {"config": "WORKDIR/nonexistent.cfg"},
    {"config": ""},
    {"inject-error": [{"event": "nosuch"}]},
    {"inject-error": [{"event": "read_aio", "iotype": "bad"}]},
    {"set-state": [{"event": "read_aio"}]},
] + [{"config": "WORKDIR/" + c} for c in sorted(CONFIGS) if c not in ("ok.cfg", "sector.cfg")]


def fix(v, tmp):
    """WORKDIR in a case's arguments becomes the temp dir, and the temp dir in replies becomes WORKDIR."""
    s = json.dumps(v)
    return json.loads(s.replace("WORKDIR", tmp))


def norm(v, tmp):
    return json.loads(json.dumps(v).replace(tmp, "WORKDIR"))


def qemu_io(tmp, sock, export, *cmds, read_only=False):
    args = ["qemu-io", "-f", "raw"] + (["-r"] if read_only else [])
    for c in cmds:
        args += ["-c", c]
    args.append(f"nbd+unix:///{export}?socket={sock}")
    r = subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=tmp)
    # Timing differs run to run; what a user reads (byte counts, errors, pattern checks) stays.
    lines = []
    for l in (r.stdout + r.stderr).splitlines():
        if l.startswith(("wrote ", "read ")) and "failed" not in l:
            continue  # "read 4096/4096 bytes at offset 0": the count line that follows says the same
        lines.append(l.split(";")[0] if " ops;" in l else l)
    return norm(lines, tmp)


def add_top(c, name, img, extra, out, label):
    """raw over blkdebug over the image: raw announces read_aio / write_aio on blkdebug, as in QEMU."""
    dbg = {"driver": "blkdebug", "image": {"driver": "file", "filename": img}}
    dbg.update(extra)
    out.append((f"{label} add", c.cmd("blockdev-add", {"driver": "raw", "node-name": name, "file": dbg})))


def libnbd_reads(sock, export, offsets):
    h = nbd.NBD()
    h.set_export_name(export)
    h.set_request_structured_replies(False)
    h.connect_unix(sock)
    seen = []
    for off in offsets:
        try:
            h.pread(4096, off)
            seen.append([off, "ok"])
        except nbd.Error as e:
            seen.append([off, errno.errorcode.get(e.errno, str(e.errno))])
    h.shutdown()
    return seen


def collect(binary, tmp):
    out = []
    img = os.path.join(tmp, "disk.raw")
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", img, str(4 * MiB)], check=True)
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 1M", img], check=True, capture_output=True)
    for name, text in CONFIGS.items():
        with open(os.path.join(tmp, name), "w") as f:
            f.write(text)
    margs, qmp_path = monitor_args(tmp)
    sock = os.path.join(tmp, "nbd.sock")
    d = Daemon(binary, margs + ["--nbd-server", f"addr.type=unix,addr.path={sock}"], tmp)
    try:
        c = Client.unix(qmp_path)
        c.negotiate()
        image = {"driver": "file", "filename": img}
        # 1. validation
        for i, opts in enumerate(BAD_OPTIONS):
            args = {"driver": "blkdebug", "node-name": f"bad{i}", "image": image}
            args.update(fix(opts, tmp))
            out.append((f"bad {json.dumps(opts)}", norm(c.cmd("blockdev-add", args), tmp)))
        # 2. filenames
        c.cmd("blockdev-add", {"driver": "file", "node-name": "f0", "filename": img, "read-only": True})
        c.cmd("blockdev-add", {"driver": "file", "node-name": "f1", "filename": img, "read-only": True})
        named = [("plain", {"image": "f0"}),
                 ("config", {"image": {"driver": "file", "filename": img, "read-only": True},
                             "config": os.path.join(tmp, "ok.cfg")}),
                 ("align", {"image": {"driver": "file", "filename": img, "read-only": True}, "align": 4096}),
                 # Structured options show flattened in a json: filename ("inject-error.0.event"), as QEMU
                 # keeps a node's options; a plain blkdebug over raw over a file takes the raw node's name.
                 ("inject", {"image": {"driver": "file", "filename": img, "read-only": True},
                             "inject-error": [{"event": "read_aio", "sector": 8}],
                             "set-state": [{"event": "write_aio", "state": 1, "new_state": 2}]}),
                 ("overraw", {"image": {"driver": "raw", "file": {"driver": "file", "filename": img, "read-only": True},
                                        "read-only": True}})]
        for n, opts in named:
            args = {"driver": "blkdebug", "node-name": "fn_" + n, "read-only": True}
            args.update(opts)
            out.append((f"add {n}", norm(c.cmd("blockdev-add", args), tmp)))
        out.append(("add blkverify", c.cmd("blockdev-add", {"driver": "blkverify", "node-name": "fn_verify",
                                                            "read-only": True, "test": "f0", "raw": "f1"})))
        # A format over blkdebug is named after it, as over a protocol node (QEMU opens blkdebug as a file).
        out.append(("add raw over blkdebug", c.cmd("blockdev-add", {"driver": "raw", "node-name": "fn_rawdbg",
                                                                    "read-only": True, "file": "fn_plain"})))
        nodes = {n["node-name"]: n["file"] for n in c.cmd("query-named-block-nodes")["return"]}
        for n in ["fn_plain", "fn_config", "fn_verify", "fn_align", "fn_inject", "fn_overraw", "fn_rawdbg"]:
            out.append((f"filename {n}", norm(nodes.get(n), tmp)))
        # 3. injected errors through an NBD export: raw over blkdebug announces read_aio / write_aio.
        cases = [
            ("read eio", [{"event": "read_aio", "iotype": "read"}], ["write -P 1 4k 4k", "read -P 1 4k 4k", "read 4k 4k"]),
            ("write errno once", [{"event": "write_aio", "errno": 28, "once": True}],
             ["write -P 7 0 4k", "write -P 7 0 4k", "read -P 7 0 4k"]),
            ("flush", [{"event": "write_aio", "iotype": "flush", "errno": 5}], ["read 0 4k", "write 0 4k"]),
            ("sector", [{"event": "read_aio", "sector": 16}], ["read 0 4k", "read 4k 4k", "read 8k 4k"]),
            ("write", [{"event": "write_aio", "iotype": "write", "errno": 1}], ["read 0 4k", "write 0 4k", "read 0 4k"]),
        ]
        for i, (n, rules, cmds) in enumerate(cases):
            add_top(c, f"top{i}", img, {"inject-error": rules}, out, n)
            out.append((f"nbd {n} export", c.cmd("block-export-add", {"type": "nbd", "id": f"e{i}",
                                                                      "node-name": f"top{i}", "writable": True})))
            out.append((f"nbd {n} io", qemu_io(tmp, sock, f"top{i}", *cmds)))
            c.cmd("block-export-del", {"id": f"e{i}", "mode": "hard"})
        # Exact errnos and what follows a failed read: libnbd without structured replies (QSD 7.2 drops the
        # connection after a read error in a structured reply; see the module's notes).
        if nbd is not None:
            lcases = [
                ("once", [{"event": "read_aio", "errno": 28, "once": True}], [0, 0, 4096]),
                ("sector", [{"event": "read_aio", "sector": 16, "errno": 1}], [0, 8192, 12288, 8192]),
                ("state", [{"event": "read_aio", "state": 2, "errno": 22}], [0, 0, 0]),
            ]
            for i, (n, rules, offs) in enumerate(lcases):
                extra = {"inject-error": rules}
                if n == "state":
                    extra["set-state"] = [{"event": "read_aio", "state": 1, "new_state": 2}]
                add_top(c, f"ltop{i}", img, extra, out, "libnbd " + n)
                c.cmd("block-export-add", {"type": "nbd", "id": f"l{i}", "node-name": f"ltop{i}"})
                out.append((f"libnbd {n} reads", libnbd_reads(sock, f"ltop{i}", offs)))
                c.cmd("block-export-del", {"id": f"l{i}", "mode": "hard"})
        # 4. write_zeroes and discard in pieces: blkdebug's opt/max limits make the block layer cut them
        # (head to the first boundary, bulk pieces of at most the max, the tail); blkdebug refuses zero pieces
        # below its zero alignment, which are then written as data. A rule with a sector fails only the piece
        # covering it: sector 2 is in the head [1000, 4096), 8 and 40 in bulk pieces, 137 in the tail.
        # They use an image of their own: QEMU's NBD server answers reads of holes (which the discards
        # punch) without reading, so the later cases' rules would not see those reads.
        pimg = os.path.join(tmp, "pieces.raw")
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw", pimg, str(MiB)], check=True)
        zlim = {"opt-write-zero": 4096, "max-write-zero": 16384}
        for i, (iotype, sector) in enumerate([("write-zeroes", 2), ("write-zeroes", 8), ("write", 2),
                                              ("write", 40), ("write", 137)]):
            n = f"zero pieces {iotype} sector {sector}"
            rules = [{"event": "pwritev_zero", "iotype": iotype, "sector": sector}]
            add_top(c, f"ztop{i}", pimg, dict(zlim, **{"inject-error": rules}), out, n)
            c.cmd("block-export-add", {"type": "nbd", "id": f"z{i}", "node-name": f"ztop{i}", "writable": True})
            out.append((f"nbd {n}", qemu_io(tmp, sock, f"ztop{i}", "write -z 1000 70000")))
            c.cmd("block-export-del", {"id": f"z{i}", "mode": "hard"})
        # Discard pieces below blkdebug's request alignment (align 512) are dropped: the bytes around an
        # unaligned discard keep their data, the aligned middle reads as zeroes.
        dbg = {"driver": "blkdebug", "discard": "unmap", "align": 512, "opt-discard": 4096, "max-discard": 16384,
               "image": {"driver": "file", "discard": "unmap", "filename": pimg}}
        out.append(("discard pieces add", c.cmd("blockdev-add", {"driver": "raw", "node-name": "dtop",
                                                                 "discard": "unmap", "file": dbg})))
        c.cmd("block-export-add", {"type": "nbd", "id": "d0", "node-name": "dtop", "writable": True})
        out.append(("nbd discard pieces", qemu_io(tmp, sock, "dtop", "write -P 0x66 0 128k", "discard 1000 70000",
                                                  "read -P 0x66 512 512", "read -P 0 1024 69632",
                                                  "read -P 0x66 70656 512")))
        c.cmd("block-export-del", {"id": "d0", "mode": "hard"})
        # A config file's rule through the export.
        r = c.cmd("blockdev-add", {"driver": "raw", "node-name": "topc",
                                   "file": {"driver": "blkdebug", "config": os.path.join(tmp, "sector.cfg"),
                                            "image": {"driver": "file", "filename": img}}})
        out.append(("nbd config add", r))
        out.append(("nbd config export", c.cmd("block-export-add", {"type": "nbd", "id": "ec", "node-name": "topc"})))
        out.append(("nbd config io", qemu_io(tmp, sock, "topc", "read 0 4k", "read 8k 4k", read_only=True)))
        c.close()
    finally:
        d.stop()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--blockd", required=True)
    ap.add_argument("--qsd", default="qemu-storage-daemon")
    a = ap.parse_args()
    for tool in (a.qsd, "qemu-img", "qemu-io"):
        if not shutil.which(tool):
            print(f"SKIP: no {tool}")
            return 77  # ctest: skipped (SKIP_RETURN_CODE)
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    t1, t2 = tempfile.mkdtemp(prefix="blkdebug-qsd-", dir=base), tempfile.mkdtemp(prefix="blkdebug-blockd-", dir=base)
    try:
        try:
            want = collect(a.qsd, t1)
            got = collect(a.blockd, t2)
        except Exception:
            traceback.print_exc()
            return 1
    finally:
        shutil.rmtree(t1, ignore_errors=True)
        shutil.rmtree(t2, ignore_errors=True)
    failed = 0
    if [n for n, _ in want] != [n for n, _ in got]:
        failed += 1
        print("FAIL entry lists differ\n   qsd:   ", [n for n, _ in want], "\n   blockd:", [n for n, _ in got])
    for (n, w), (_, g) in zip(want, got):
        if w != g:
            failed += 1
            print("FAIL", n, "\n   qsd:   ", json.dumps(w), "\n   blockd:", json.dumps(g))
        else:
            print("PASS", n)
    print(f"{len(want) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

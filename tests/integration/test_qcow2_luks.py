# qcow2 with encrypt.format=luks (and the legacy AES method) against QEMU's tools and qemu-storage-daemon; ctest runs it in one process.
"""Cases:
- qemu-img makes an encrypted qcow2, qemu-io writes patterns; blockd's NBD export of it reads bit-exactly what
  qemu-img convert decrypts (nbdcopy), and partial-cluster writes through blockd read back in qemu-io;
- blockd creates encrypted qcow2 images (blockdev-create, default and other algorithms, 4 KiB clusters); data
  written through its export reads back equal in qemu-io with the same secret; qemu-img info shows the algorithms;
- copy-on-write onto a backing file: partial writes into an encrypted overlay keep the backing file's bytes around
  them, in blockd and in qemu-io afterwards;
- `qemu-img check` (with --object secret and --image-opts) is clean on every image blockd wrote;
- error texts and query-named-block-nodes equal QSD's for the same script; the legacy AES method reads read-only
  and is refused for writing.
Exit 77 when qemu-img/qemu-io/qemu-storage-daemon/nbdcopy are missing."""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qmp_harness import norm_nodes  # noqa: E402
from test_luks import QSD, start, sh, nbd_io  # noqa: E402

SEC = ["--object", "secret,id=k,data=pass0"]


def qopts(path, secret="pass0"):
    return ["--object", f"secret,id=k,data={secret}", "--image-opts",
            f"driver=qcow2,encrypt.key-secret=k,file.filename={path}"]


def qemu_io(path, *cmds, check=True):
    args = ["qemu-io"]
    for c in cmds:
        args += ["-c", c]
    r = sh(*args, *qopts(path), check=check)
    if check:
        assert "Pattern verification failed" not in r.stdout, r.stdout
    return r


def make_qemu(path, extra="", size="4M", fmt="luks"):
    o = f"encrypt.format={fmt},encrypt.key-secret=k" + (",encrypt.iter-time=10" if fmt == "luks" else "")
    # QEMU's PBKDF2 benchmark times its first, very short round with getrusage, which this kernel updates per
    # scheduler tick: it reads 0 ms now and then and fails ("Unable to get accurate CPU usage"; a known QEMU
    # bug). Each try fails fast, and only that failure is retried.
    for _ in range(60):
        if os.path.exists(path):
            os.unlink(path)
        r = sh("qemu-img", "create", "-q", "-f", "qcow2", *SEC, "-o", o + ("," + extra if extra else ""), path, size,
               check=False)
        if r.returncode == 0:
            return
        if "Unable to get accurate CPU usage" not in r.stderr:
            break
    raise AssertionError(f"qemu-img create: {r.stderr}")


def check_clean(path):
    r = sh("qemu-img", "check", *qopts(path), check=False)
    assert r.returncode == 0 and "No errors were found" in r.stdout, r.stdout + r.stderr


def export(m, tmp, node, writable=True, first=True):
    sock = os.path.join(tmp, "nbd.sock")
    if first:
        assert m.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}}) == {"return": {}}
    r = m.cmd("block-export-add", {"type": "nbd", "id": "e0", "name": "e0", "node-name": node, "writable": writable})
    assert r == {"return": {}}, r
    return sock


def unexport(m, node=None):
    assert m.cmd("block-export-del", {"id": "e0"}) == {"return": {}}
    m.wait_event("BLOCK_EXPORT_DELETED", {"id": "e0"})


def add_qcow2(m, path, name="q0", secret="s0", extra=None):
    assert m.cmd("blockdev-add", {"driver": "file", "filename": path, "node-name": "f" + name}) == {"return": {}}
    a = {"driver": "qcow2", "file": "f" + name, "node-name": name, "encrypt": {"format": "luks", "key-secret": secret}}
    a.update(extra or {})
    return m.cmd("blockdev-add", a)


def case_qemu_image_reads_bit_exactly(binary, tmp):
    img = os.path.join(tmp, "q.qcow2")
    make_qemu(img)
    qemu_io(img, "write -P 0x5a 0 1M", "write -P 0xc3 4096 512", "write -P 0x11 3M 64k", "write -z 2M 64k")
    want = os.path.join(tmp, "want.raw")
    sh("qemu-img", "convert", *SEC, "--image-opts", f"driver=qcow2,encrypt.key-secret=k,file.filename={img}",
       "-O", "raw", want)
    d, m = start(binary, tmp)
    try:
        assert add_qcow2(m, img) == {"return": {}}
        sock = export(m, tmp, "q0")
        got = os.path.join(tmp, "got.raw")
        sh("nbdcopy", f"nbd+unix:///e0?socket={sock}", got)
        with open(want, "rb") as a, open(got, "rb") as b:
            assert a.read() == b.read(), "blockd's plaintext differs from qemu-img convert's"
        # Partial clusters (and a write off 512-byte sectors, padded by read-modify-write): into an allocated one (in place), a fresh one (COW of zeroes), a zero cluster.
        nbd_io(sock, "write -P 0x77 70144 8192", "write -P 0x78 1536k 4608", "write -P 0x79 2052k 512",
               "write -P 0x7a 100001 3333", "read -P 0x7a 100001 3333", "read -P 0x5a 103334 1000",
               "read -P 0x77 70144 8192", "read -P 0x5a 4608 65536", "read -P 0x78 1536k 4608")
    finally:
        d.stop()
    qemu_io(img, "read -P 0x5a 0 4096", "read -P 0xc3 4096 512", "read -P 0x5a 4608 65536",
            "read -P 0x77 70144 8192", "read -P 0x5a 78336 21665", "read -P 0x7a 100001 3333", "read -P 0x5a 103334 945242", "read -P 0x78 1536k 4608",
            "read -P 0 1577472 60928", "read -P 0 2M 4096", "read -P 0x79 2052k 512", "read -P 0 2101760 7680",
            "read -P 0x11 3M 64k")
    check_clean(img)


CREATE = [
    ({}, {}),
    ({"cipher-alg": "aes-128", "cipher-mode": "cbc", "ivgen-alg": "essiv", "hash-alg": "sha1"}, {"cluster-size": 4096}),
    ({"cipher-alg": "serpent-256", "cipher-mode": "xts", "ivgen-alg": "plain", "hash-alg": "sha512"},
     {"extended-l2": True, "cluster-size": 65536}),
]


def case_blockd_images_open_in_qemu(binary, tmp):
    d, m = start(binary, tmp)
    try:
        for i, (algs, extra) in enumerate(CREATE):
            img = os.path.join(tmp, f"b{i}.qcow2")
            open(img, "w").close()
            f = f"f{i}"
            assert m.cmd("blockdev-add", {"driver": "file", "filename": img, "node-name": f}) == {"return": {}}
            enc = dict({"format": "luks", "key-secret": "s0", "iter-time": 10}, **algs)
            opts = dict({"driver": "qcow2", "file": f, "size": 4 << 20, "encrypt": enc}, **extra)
            assert m.run_job("blockdev-create", {"job-id": f"c{i}", "options": opts}) is None, algs
            r = m.cmd("blockdev-add", {"driver": "qcow2", "file": f, "node-name": f"q{i}",
                                       "encrypt": {"format": "luks", "key-secret": "s0"}})
            assert r == {"return": {}}, r
            sock = export(m, tmp, f"q{i}", first=i == 0)
            nbd_io(sock, "write -P 0x3c 0 64k", "write -P 0x96 1M 4k", "write -P 0x97 1052160 1024",
                   "write -z 2M 8k", "read -P 0x3c 0 64k", "read -P 0 4186112 8k")
            unexport(m)
            assert m.cmd("blockdev-del", {"node-name": f"q{i}"}) == {"return": {}}
            assert m.cmd("blockdev-del", {"node-name": f}) == {"return": {}}
            qemu_io(img, "read -P 0x3c 0 64k", "read -P 0x96 1M 3584", "read -P 0x97 1052160 1024", "read -P 0 1053184 1024",
                    "read -P 0 2M 8k", "read -P 0 3M 64k")
            check_clean(img)
            info = json.loads(sh("qemu-img", "info", "--output=json", img).stdout)
            spec = info["format-specific"]["data"]["encrypt"]
            assert info["encrypted"] is True and spec["format"] == "luks", info
            assert spec["cipher-alg"] == algs.get("cipher-alg", "aes-256"), spec
            assert spec["cipher-mode"] == algs.get("cipher-mode", "xts"), spec
            assert spec["ivgen-alg"] == algs.get("ivgen-alg", "plain64"), spec
            assert spec["hash-alg"] == algs.get("hash-alg", "sha256"), spec
            r = sh("qemu-io", "-c", "read 0 512", *qopts(img, "nope"), check=False)
            assert "Invalid password, cannot unlock any keyslot" in r.stderr + r.stdout, r
            with open(img, "rb") as fh:
                assert b"\x3c" * 4096 not in fh.read(), "the data is stored in the clear"
            print("   ", algs or "defaults", extra, "ok")
    finally:
        d.stop()


def case_cow_onto_backing(binary, tmp):
    base = os.path.join(tmp, "base.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", base, "4M")
    sh("qemu-io", "-c", "write -P 0x33 0 4M", base)
    img = os.path.join(tmp, "top.qcow2")
    open(img, "w").close()
    d, m = start(binary, tmp)
    try:
        assert m.cmd("blockdev-add", {"driver": "file", "filename": img, "node-name": "ft"}) == {"return": {}}
        assert m.run_job("blockdev-create", {"job-id": "c", "options": {
            "driver": "qcow2", "file": "ft", "size": 4 << 20, "backing-file": base, "backing-fmt": "qcow2",
            "encrypt": {"format": "luks", "key-secret": "s0", "iter-time": 10}}}) is None
        r = m.cmd("blockdev-add", {"driver": "qcow2", "file": "ft", "node-name": "q0",
                                   "encrypt": {"format": "luks", "key-secret": "s0"}})
        assert r == {"return": {}}, r
        sock = export(m, tmp, "q0")
        nbd_io(sock, "write -P 0x44 69632 4096", "write -P 0x45 1M 512", "write -z 2M 1024",
               "read -P 0x33 0 69632", "read -P 0x44 69632 4096", "read -P 0x33 73728 974848",
               "read -P 0x45 1M 512", "read -P 0x33 1049088 512", "read -P 0 2M 1024", "read -P 0x33 2098176 1024")
    finally:
        d.stop()
    qemu_io(img, "read -P 0x33 0 69632", "read -P 0x44 69632 4096", "read -P 0x33 73728 974848",
            "read -P 0x45 1M 512", "read -P 0x33 1049088 512", "read -P 0 2M 1024", "read -P 0x33 2098176 1024")
    check_clean(img)


def norm(v, tmp):
    v = norm_nodes(v, tmp)
    s = json.dumps(v)
    return json.loads(s)


def node_of(m, name, tmp):
    n = [x for x in m.cmd("query-named-block-nodes")["return"] if x["node-name"] == name][0]
    n = norm(n, tmp)
    # QEMU flattens the options of a json: filename ("encrypt.key-secret"); what it names is compared elsewhere.
    n["file"] = n["image"]["filename"] = "F"
    enc = n["image"]["format-specific"]["data"].get("encrypt", {})
    enc.pop("detached-header", None)  # 9.0: QSD 7.2 lacks it
    return n


def run_errors(binary, tmp, img, plain, aes):
    d, m = start(binary, tmp, ["--object", "secret,id=k,data=pass0"])
    out = []
    try:
        for n, p in (("f0", img), ("f1", plain), ("f2", aes)):
            assert m.cmd("blockdev-add", {"driver": "file", "filename": p, "node-name": n}) == {"return": {}}
        for enc in (None, {"format": "luks"}, {"format": "aes", "key-secret": "k"},
                    {"format": "luks", "key-secret": "nosuch"}, {"format": "luks", "key-secret": "bad"}):
            a = {"driver": "qcow2", "file": "f0", "node-name": "q0"}
            if enc:
                a["encrypt"] = enc
            out.append(m.cmd("blockdev-add", a))
        out.append(m.cmd("blockdev-add", {"driver": "qcow2", "file": "f1", "node-name": "q1",
                                          "encrypt": {"format": "luks", "key-secret": "k"}}))
        out.append(m.cmd("blockdev-add", {"driver": "qcow2", "file": "f2", "node-name": "q2", "read-only": True,
                                          "encrypt": {"format": "luks", "key-secret": "k"}}))
        out.append(m.cmd("blockdev-add", {"driver": "qcow2", "file": "f2", "node-name": "q2", "read-only": True}))
        out.append(m.cmd("blockdev-add", {"driver": "qcow2", "file": "f0", "node-name": "q0",
                                          "encrypt": {"format": "luks", "key-secret": "k"}}))
        out.append(node_of(m, "q0", tmp))
        out.append(m.cmd("blockdev-add", {"driver": "qcow2", "file": "f2", "node-name": "q2", "read-only": True,
                                          "encrypt": {"format": "aes", "key-secret": "k"}}))
        out.append(node_of(m, "q2", tmp))
        # The AES node reads back what qemu-io wrote.
        sock = export(m, tmp, "q2", writable=False)
        r = sh("qemu-io", "-r", "-f", "raw", "-c", "read -P 0x66 64k 8k", f"nbd+unix:///e0?socket={sock}")
        assert "Pattern verification failed" not in r.stdout, r.stdout
        unexport(m)
        out.append(m.cmd("blockdev-add", {"driver": "qcow2", "file": "f1", "node-name": "p1"}))
        out.append(m.run_job("x-blockdev-amend", {"job-id": "a", "node-name": "p1", "options": {
            "driver": "qcow2", "encrypt": {"format": "luks", "state": "active", "new-secret": "k"}}}))
        # Keyslots of the encrypted node: refusals, then slot 3 added with s1 (checked in qemu-io below).
        for o in ({"state": "active"}, {"state": "active", "new-secret": "s1", "keyslot": 0},
                  {"state": "active", "new-secret": "s1", "keyslot": 9}, {"state": "inactive"},
                  {"state": "inactive", "keyslot": 0},
                  {"state": "active", "new-secret": "s1", "keyslot": 3, "iter-time": 10}):
            out.append(m.run_job("x-blockdev-amend", {"job-id": "a", "node-name": "q0", "options": {
                "driver": "qcow2", "encrypt": dict(format="luks", **o)}}))
        out.append(m.run_job("x-blockdev-amend", {"job-id": "a", "node-name": "q0", "options": {"driver": "qcow2"}}))
        slots = [x for x in m.cmd("query-named-block-nodes")["return"] if x["node-name"] == "q0"][0][
            "image"]["format-specific"]["data"]["encrypt"]["slots"]
        out.append([x["active"] for x in slots])
    finally:
        d.stop()
    return out


def case_errors_and_query_equal_qsd(binary, tmp):
    img, plain, aes = (os.path.join(tmp, n) for n in ("e.qcow2", "plain.qcow2", "aes.qcow2"))
    make_qemu(img)
    sh("qemu-img", "create", "-q", "-f", "qcow2", plain, "4M")
    make_qemu(aes, fmt="aes")
    sh("qemu-io", "-c", "write -P 0x66 64k 8k", "--object", "secret,id=k,data=pass0", "--image-opts",
       f"driver=qcow2,encrypt.key-secret=k,file.filename={aes}")
    want_dir, got_dir = os.path.join(tmp, "qsd"), os.path.join(tmp, "blockd")
    os.makedirs(want_dir)
    os.makedirs(got_dir)
    # Each daemon amends its own copy (the keyslot cases change the image).
    mine = os.path.join(tmp, "mine.qcow2")
    shutil.copy(img, mine)
    want = run_errors(QSD, want_dir, img, plain, aes)
    got = run_errors(binary, got_dir, mine, plain, aes)
    assert want[0]["error"]["desc"] == "Parameter 'encrypt.key-secret' is required for cipher", want
    bad = [(i, w, g) for i, (w, g) in enumerate(zip(want, got)) if w != g]
    assert not bad, "differences (index, QSD, blockd):\n" + "\n".join(json.dumps(b) for b in bad)
    # Both daemons added slot 3 for secret s1 (pass1): qemu-io opens the image with it.
    assert want[-1] == [True, False, False, True, False, False, False, False], want[-1]
    for p in (img, mine):
        sh("qemu-io", "-c", "read 0 512", *qopts(p, "pass1"))
    check_clean(mine)


def case_aes_refused_for_writing(binary, tmp):
    """QSD 7.2 still writes AES images; blockd follows QEMU 10.2's refusal of the method (read-only only)."""
    aes = os.path.join(tmp, "aes.qcow2")
    make_qemu(aes, fmt="aes")
    d, m = start(binary, tmp, ["--object", "secret,id=k,data=pass0"])
    try:
        assert m.cmd("blockdev-add", {"driver": "file", "filename": aes, "node-name": "f0"}) == {"return": {}}
        r = m.cmd("blockdev-add", {"driver": "qcow2", "file": "f0", "node-name": "q0",
                                   "encrypt": {"format": "aes", "key-secret": "k"}})
        assert "Use of AES-CBC encrypted qcow2 images is no longer supported" in r["error"]["desc"], r
        r = m.cmd("blockdev-add", {"driver": "qcow2", "file": "f0", "node-name": "q0", "read-only": True,
                                   "encrypt": {"format": "aes", "key-secret": "k"}})
        assert r == {"return": {}}, r
        r = m.cmd("blockdev-reopen", {"options": [{"driver": "qcow2", "file": "f0", "node-name": "q0",
                                                   "read-only": False,
                                                   "encrypt": {"format": "aes", "key-secret": "k"}}]})
        assert "error" in r and "AES-CBC" in r["error"]["desc"], r
        new = os.path.join(tmp, "new.qcow2")
        open(new, "w").close()
        assert m.cmd("blockdev-add", {"driver": "file", "filename": new, "node-name": "f1"}) == {"return": {}}
        err = m.run_job("blockdev-create", {"job-id": "c", "options": {
            "driver": "qcow2", "file": "f1", "size": 1 << 20, "encrypt": {"format": "qcow", "key-secret": "k"}}})
        assert err and "AES-CBC" in err, err
    finally:
        d.stop()


def case_lazy_refcount_rebuild_keeps_header(binary, tmp):
    """A crash with lazy refcounts: the refcount rebuild at the next open must count the LUKS header area
    (else its clusters would be handed out to data and the key slots overwritten)."""
    img = os.path.join(tmp, "lazy.qcow2")
    open(img, "w").close()
    d, m = start(binary, tmp)
    try:
        assert m.cmd("blockdev-add", {"driver": "file", "filename": img, "node-name": "fq0"}) == {"return": {}}
        assert m.run_job("blockdev-create", {"job-id": "c", "options": {
            "driver": "qcow2", "file": "fq0", "size": 8 << 20, "lazy-refcounts": True,
            "encrypt": {"format": "luks", "key-secret": "s0", "iter-time": 10}}}) is None
        assert m.cmd("blockdev-del", {"node-name": "fq0"}) == {"return": {}}
        assert add_qcow2(m, img) == {"return": {}}
        sock = export(m, tmp, "q0")
        nbd_io(sock, "write -P 0x61 0 4M")
    finally:
        d.stop(signal.SIGKILL)  # the dirty bit stays set: refcounts on disk are stale
    with open(img, "rb") as f:
        assert int.from_bytes(f.read(80)[72:80], "big") & 1, "no dirty bit: the rebuild would not run"
    d, m = start(binary, tmp)
    try:
        assert add_qcow2(m, img) == {"return": {}}
        sock = export(m, tmp, "q0")
        nbd_io(sock, "write -P 0x62 4M 4M", "read -P 0x61 0 4M")
    finally:
        d.stop()
    qemu_io(img, "read -P 0x61 0 4M", "read -P 0x62 4M 4M")
    check_clean(img)


CASES = [case_lazy_refcount_rebuild_keeps_header, case_qemu_image_reads_bit_exactly, case_blockd_images_open_in_qemu, case_cow_onto_backing,
         case_errors_and_query_equal_qsd, case_aes_refused_for_writing]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--blockd", required=True)
    ap.add_argument("-k", default="")
    a = ap.parse_args()
    if not all(shutil.which(t) for t in ("qemu-img", "qemu-io", "nbdcopy", QSD)):
        print("SKIP: qemu-img, qemu-io, nbdcopy or qemu-storage-daemon missing")
        return 77
    failed = ran = 0
    for case in CASES:
        if a.k and a.k not in case.__name__:
            continue
        ran += 1
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        tmp = tempfile.mkdtemp(prefix="blockd-qluks-", dir=base)
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


if __name__ == "__main__":
    sys.exit(main())

# luks against QEMU's tools and qemu-storage-daemon: images both ways, wrong secrets, keyslot amend; ctest runs it in one process.
"""Cases:
- qemu-img makes luks images over a cipher/mode/ivgen/hash matrix, qemu-io writes patterns; blockd opens them with
  blockdev-add and its NBD export must read back exactly those bytes (qemu-io -c 'read -P' over NBD);
- blockd creates images (blockdev-create luks, several algorithm sets); data written through its NBD export reads
  back equal in qemu-io with the same secret, and qemu-img info shows the algorithms blockd was asked for;
- error texts (no key-secret, unknown secret, wrong secret, not a LUKS volume) equal QSD's, and the luks node's
  query-named-block-nodes entry (format-specific, encrypted) equals QSD's for the same image;
- x-blockdev-amend: the refusals equal QSD's job errors; a slot added by blockd opens in qemu-io with the new secret,
  and after blockd erases slot 0 the old secret no longer opens the image (qemu-img info shows the slots).
Exit 77 when qemu-img/qemu-io/qemu-storage-daemon are missing."""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qmp_harness import Client, Daemon, monitor_args, DEADLINE  # noqa: E402

QSD = "qemu-storage-daemon"
SECRETS = ["--object", "secret,id=s0,data=pass0", "--object", "secret,id=s1,data=pass1",
           "--object", "secret,id=bad,data=wrong"]


class Mon:
    """QMP with an event log, so a job's end is awaited by its event."""

    def __init__(self, path):
        self.c = Client.unix(path)
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
                continue
            return msg

    def wait_job(self, job, status="concluded"):
        end = time.monotonic() + 60
        while True:
            for i, e in enumerate(self.events):
                if e["event"] == "JOB_STATUS_CHANGE" and e["data"] == {"id": job, "status": status}:
                    # Consume it and what came before: jobs reuse ids, and an old job's event must not
                    # stand for the next one's.
                    del self.events[:i + 1]
                    return
            if time.monotonic() > end:
                raise AssertionError(f"job {job} never reached {status}: {self.events}")
            try:
                self.events.append(self.c.line())
            except TimeoutError:
                pass  # PBKDF2 benchmarks take seconds on a loaded machine; the deadline above bounds it

    def wait_event(self, name, data):
        end = time.monotonic() + DEADLINE
        while True:
            for i, e in enumerate(self.events):
                if e["event"] == name and e["data"] == data:
                    del self.events[i]
                    return
            if time.monotonic() > end:
                raise AssertionError(f"no {name} {data}: {self.events}")
            self.events.append(self.c.line())

    def run_job(self, command, args):
        r = self.cmd(command, args)
        assert r == {"return": {}}, r
        self.wait_job(args["job-id"])
        info = [j for j in self.cmd("query-jobs")["return"] if j["id"] == args["job-id"]][0]
        assert self.cmd("job-dismiss", {"id": args["job-id"]}) == {"return": {}}
        return info.get("error")


def start(binary, tmp, extra=()):
    args, path = monitor_args(tmp)
    d = Daemon(binary, args + SECRETS + list(extra), tmp)
    return d, Mon(path)


def sh(*cmd, check=True):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd} failed: {r.stdout}{r.stderr}")
    return r


def qemu_img_create(path, opts, size="4M"):
    # QEMU's PBKDF2 benchmark times its first, very short round with getrusage, which this kernel updates per
    # scheduler tick: it reads 0 ms now and then and fails ("Unable to get accurate CPU usage"; a known QEMU
    # bug). Each try fails fast, and only that failure is retried.
    for _ in range(60):
        if os.path.exists(path):
            os.unlink(path)
        r = sh("qemu-img", "create", "-q", "-f", "luks", "--object", "secret,id=s0,data=pass0", "-o",
               "key-secret=s0,iter-time=10" + ("," + opts if opts else ""), path, size, check=False)
        if r.returncode == 0:
            return
        if "Unable to get accurate CPU usage" not in r.stderr:
            break
    raise AssertionError(f"qemu-img create {opts}: {r.stderr}")


def luks_opts(path, secret="pass0"):
    return ["--object", f"secret,id=k,data={secret}", "--image-opts", f"driver=luks,key-secret=k,file.filename={path}"]


def qemu_io(path, *cmds, secret="pass0", check=True):
    args = ["qemu-io"]
    for c in cmds:
        args += ["-c", c]
    return sh(*args, *luks_opts(path, secret), check=check)


def nbd_io(sock, *cmds):
    args = ["qemu-io", "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    r = sh(*args, f"nbd+unix:///e0?socket={sock}", check=False)
    assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout + r.stderr
    return r


def export(m, tmp, node):
    sock = os.path.join(tmp, "nbd.sock")
    assert m.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}}) == {"return": {}}
    r = m.cmd("block-export-add", {"type": "nbd", "id": "e0", "name": "e0", "node-name": node, "writable": True})
    assert r == {"return": {}}, r
    return sock


def add_luks(m, path, secret="s0", name="l0"):
    assert m.cmd("blockdev-add", {"driver": "file", "filename": path, "node-name": "f0"}) == {"return": {}}
    args = {"driver": "luks", "file": "f0", "node-name": name}
    if secret is not None:
        args["key-secret"] = secret
    return m.cmd("blockdev-add", args)


COMBOS = [
    "",  # QEMU's defaults: aes-256 xts plain64 sha256
    "cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=sha256,hash-alg=sha1",
    "cipher-alg=aes-256,cipher-mode=cbc,ivgen-alg=plain,hash-alg=sha512",
    "cipher-alg=serpent-256,cipher-mode=xts,ivgen-alg=plain64,hash-alg=sha384",
    "cipher-alg=twofish-128,cipher-mode=ctr,ivgen-alg=plain64,hash-alg=md5",
    "cipher-alg=cast5-128,cipher-mode=cbc,ivgen-alg=plain64,hash-alg=sha224",
    "cipher-alg=serpent-128,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=sha256,hash-alg=ripemd160",
    "cipher-alg=twofish-256,cipher-mode=xts,ivgen-alg=essiv,ivgen-hash-alg=sha256,hash-alg=sha256",
]


def case_qemu_images_read_back_in_blockd(binary, tmp):
    for i, opts in enumerate(COMBOS):
        img = os.path.join(tmp, f"q{i}.luks")
        qemu_img_create(img, opts)
        qemu_io(img, "write -P 0x5a 0 1M", "write -P 0xc3 4096 512", "write -P 0x11 3M 64k")
        dtmp = os.path.join(tmp, f"d{i}")
        os.makedirs(dtmp)
        d, m = start(binary, dtmp)
        try:
            r = add_luks(m, img)
            assert r == {"return": {}}, (opts, r)
            sock = export(m, dtmp, "l0")
            nbd_io(sock, "read -P 0x5a 0 4096", "read -P 0xc3 4096 512", "read -P 0x5a 4608 1043968",
                   "read -P 0x11 3M 64k")
            # And a write through blockd reads back in qemu-io after blockd let go.
            nbd_io(sock, "write -P 0x77 2M 8k")
        finally:
            d.stop()
        qemu_io(img, "read -P 0x77 2M 8k", "read -P 0x11 3M 64k")
        print("   ", opts or "defaults", "ok")


CREATE = [
    {},
    {"cipher-alg": "aes-128", "cipher-mode": "cbc", "ivgen-alg": "essiv", "hash-alg": "sha1"},
    {"cipher-alg": "serpent-256", "cipher-mode": "xts", "ivgen-alg": "plain", "hash-alg": "sha512"},
    # (No 24-byte keys: QEMU 7.2 aborts on them, as its key material of 96000 bytes is not whole sectors.)
    {"cipher-alg": "twofish-256", "cipher-mode": "ctr", "ivgen-alg": "plain64", "hash-alg": "ripemd160"},
    {"cipher-alg": "cast5-128", "cipher-mode": "cbc", "ivgen-alg": "essiv", "ivgen-hash-alg": "md5"},
]


def case_blockd_images_open_in_qemu(binary, tmp):
    d, m = start(binary, tmp)
    try:
        for i, algs in enumerate(CREATE):
            img = os.path.join(tmp, f"b{i}.luks")
            open(img, "w").close()
            f = f"f{i}"
            assert m.cmd("blockdev-add", {"driver": "file", "filename": img, "node-name": f}) == {"return": {}}
            opts = dict({"driver": "luks", "file": f, "size": 4 << 20, "key-secret": "s0", "iter-time": 10}, **algs)
            assert m.run_job("blockdev-create", {"job-id": f"c{i}", "options": opts}) is None, algs
            r = m.cmd("blockdev-add", {"driver": "luks", "file": f, "node-name": f"l{i}", "key-secret": "s0"})
            assert r == {"return": {}}, r
            sock = os.path.join(tmp, "nbd.sock")
            if i == 0:
                assert m.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}}) == {"return": {}}
            assert m.cmd("block-export-add", {"type": "nbd", "id": "e0", "name": "e0", "node-name": f"l{i}", "writable": True}) == \
                {"return": {}}
            nbd_io(sock, "write -P 0x3c 0 64k", "write -P 0x96 1M 4k", "read -P 0x3c 0 64k")
            assert m.cmd("block-export-del", {"id": "e0"}) == {"return": {}}
            m.wait_event("BLOCK_EXPORT_DELETED", {"id": "e0"})
            assert m.cmd("blockdev-del", {"node-name": f"l{i}"}) == {"return": {}}
            assert m.cmd("blockdev-del", {"node-name": f}) == {"return": {}}
            # (Never-written ranges decrypt to noise, in QEMU as here: only written data is compared.)
            qemu_io(img, "read -P 0x3c 0 64k", "read -P 0x96 1M 4k")
            info = json.loads(sh("qemu-img", "info", "--output=json", img).stdout)
            spec = info["format-specific"]["data"]
            assert info["format"] == "luks" and info["virtual-size"] == 4 << 20, info
            assert spec["cipher-alg"] == algs.get("cipher-alg", "aes-256"), spec
            assert spec["cipher-mode"] == algs.get("cipher-mode", "xts"), spec
            assert spec["ivgen-alg"] == algs.get("ivgen-alg", "plain64"), spec
            assert spec["hash-alg"] == algs.get("hash-alg", "sha256"), spec
            if algs.get("ivgen-alg") == "essiv":
                assert spec["ivgen-hash-alg"] == algs.get("ivgen-hash-alg", "sha256"), spec
            # QEMU's layout: slots 4 KiB apart from 4096, payload after the eighth slot.
            assert spec["slots"][0]["active"] and spec["slots"][0]["key-offset"] == 4096, spec
            assert [s["active"] for s in spec["slots"][1:]] == [False] * 7, spec
            assert os.path.getsize(img) == spec["payload-offset"] + (4 << 20), (os.path.getsize(img), spec)
            r = qemu_io(img, "read 0 512", secret="nope", check=False)
            assert "Invalid password, cannot unlock any keyslot" in r.stderr + r.stdout, r
            print("   ", algs or "defaults", "ok")
    finally:
        d.stop()


def norm_node(n, tmp):
    n = json.loads(json.dumps(n).replace(tmp, "TMP"))
    n["image"].pop("actual-size", None)
    for k in ("children", "active"):
        n.pop(k, None)
    n["image"]["format-specific"]["data"].pop("detached-header", None)  # 9.0: QSD 7.2 lacks it
    return n


def run_errors(binary, tmp, img, notluks):
    d, m = start(binary, tmp)
    out = []
    try:
        assert m.cmd("blockdev-add", {"driver": "file", "filename": img, "node-name": "f0"}) == {"return": {}}
        assert m.cmd("blockdev-add", {"driver": "file", "filename": notluks, "node-name": "f1"}) == {"return": {}}
        for secret in (None, "nosuch", "bad"):
            a = {"driver": "luks", "file": "f0", "node-name": "l0"}
            if secret:
                a["key-secret"] = secret
            out.append(m.cmd("blockdev-add", a))
        out.append(m.cmd("blockdev-add", {"driver": "luks", "file": "f1", "node-name": "l1", "key-secret": "s0"}))
        out.append(m.cmd("blockdev-add", {"driver": "luks", "file": "f0", "node-name": "l0", "key-secret": "s0"}))
        nodes = [norm_node(n, tmp) for n in m.cmd("query-named-block-nodes")["return"] if n["node-name"] == "l0"]
        out.append(nodes)
        for opts in ({"state": "active"}, {"state": "active", "new-secret": "s1", "old-secret": "s0"},
                     {"state": "active", "new-secret": "s1", "keyslot": 0},
                     {"state": "active", "new-secret": "s1", "keyslot": 9},
                     {"state": "active", "new-secret": "s1", "secret": "bad"},
                     {"state": "inactive"}, {"state": "inactive", "keyslot": 5},
                     {"state": "inactive", "keyslot": 3, "new-secret": "s1"},
                     {"state": "inactive", "old-secret": "bad"}, {"state": "inactive", "keyslot": 0},
                     {"state": "inactive", "old-secret": "s0"}):
            out.append(m.run_job("x-blockdev-amend", {"job-id": "a", "node-name": "l0",
                                                      "options": dict(driver="luks", **opts)}))
    finally:
        d.stop()
    return out


def case_errors_and_query_equal_qsd(binary, tmp):
    img = os.path.join(tmp, "e.luks")
    qemu_img_create(img, "")
    notluks = os.path.join(tmp, "plain.raw")
    with open(notluks, "wb") as f:
        f.write(b"\1" * 1048576)
    want_dir, got_dir = os.path.join(tmp, "qsd"), os.path.join(tmp, "blockd")
    os.makedirs(want_dir)
    os.makedirs(got_dir)
    want = run_errors(QSD, want_dir, img, notluks)
    got = run_errors(binary, got_dir, img, notluks)
    assert want[0]["error"]["desc"] == "Parameter 'key-secret' is required for cipher", want
    assert want[2]["error"]["desc"] == "Invalid password, cannot unlock any keyslot", want
    bad = [(i, w, g) for i, (w, g) in enumerate(zip(want, got)) if w != g]
    assert not bad, "differences (index, QSD, blockd):\n" + "\n".join(json.dumps(b) for b in bad)


def case_amend_slots_interop(binary, tmp):
    img = os.path.join(tmp, "a.luks")
    qemu_img_create(img, "")
    qemu_io(img, "write -P 0x42 0 64k")
    d, m = start(binary, tmp)
    try:
        assert add_luks(m, img) == {"return": {}}
        assert m.run_job("x-blockdev-amend", {"job-id": "a1", "node-name": "l0", "options": {
            "driver": "luks", "state": "active", "new-secret": "s1", "keyslot": 3, "iter-time": 10}}) is None
        slots = [n for n in m.cmd("query-named-block-nodes")["return"] if n["node-name"] == "l0"][0][
            "image"]["format-specific"]["data"]["slots"]
        assert [s["active"] for s in slots] == [True, False, False, True, False, False, False, False], slots
        # Erase slot 0 by its secret: slot 3 stays, so this is allowed without force.
        assert m.run_job("x-blockdev-amend", {"job-id": "a2", "node-name": "l0", "options": {
            "driver": "luks", "state": "inactive", "old-secret": "s0"}}) is None
        # The node still reads (its master key never changed).
        sock = export(m, tmp, "l0")
        nbd_io(sock, "read -P 0x42 0 64k")
    finally:
        d.stop()
    info = json.loads(sh("qemu-img", "info", "--output=json", "--object", "secret,id=k,data=pass1", "--image-opts",
                         f"driver=luks,key-secret=k,file.filename={img}").stdout)
    act = [s["active"] for s in info["format-specific"]["data"]["slots"]]
    assert act == [False, False, False, True, False, False, False, False], info
    qemu_io(img, "read -P 0x42 0 64k", secret="pass1")
    r = qemu_io(img, "read 0 512", secret="pass0", check=False)
    assert r.returncode != 0 and "Invalid password" in r.stdout + r.stderr, r


def case_detached_header_round_trip(binary, tmp):
    """9.0's detached header (QSD 7.2 has none, so blockd against itself): create with header + file, the data
    file holds only payload, reopen reads back what the export wrote; without the header the file is no LUKS."""
    hdr, data = os.path.join(tmp, "h.img"), os.path.join(tmp, "d.img")
    open(hdr, "w").close()
    open(data, "w").close()
    d, m = start(binary, tmp)
    try:
        for n, p in (("fh", hdr), ("fd", data)):
            assert m.cmd("blockdev-add", {"driver": "file", "filename": p, "node-name": n}) == {"return": {}}
        assert m.run_job("blockdev-create", {"job-id": "c", "options": {
            "driver": "luks", "file": "fd", "header": "fh", "size": 1 << 20, "key-secret": "s0", "iter-time": 10}}) is None
        assert os.path.getsize(data) == 1 << 20, os.path.getsize(data)
        r = m.cmd("blockdev-add", {"driver": "luks", "file": "fd", "header": "fh", "node-name": "l0", "key-secret": "s0"})
        assert r == {"return": {}}, r
        node = [n for n in m.cmd("query-named-block-nodes")["return"] if n["node-name"] == "l0"][0]
        assert node["image"]["virtual-size"] == 1 << 20, node
        assert node["image"]["format-specific"]["data"]["detached-header"] is True, node
        sock = export(m, tmp, "l0")
        nbd_io(sock, "write -P 0x21 0 64k")
        assert m.cmd("block-export-del", {"id": "e0"}) == {"return": {}}
        m.wait_event("BLOCK_EXPORT_DELETED", {"id": "e0"})
        assert m.cmd("blockdev-del", {"node-name": "l0"}) == {"return": {}}
        r = m.cmd("blockdev-add", {"driver": "luks", "file": "fd", "header": "fh", "node-name": "l1", "key-secret": "s0"})
        assert r == {"return": {}}, r
        assert m.cmd("block-export-add", {"type": "nbd", "id": "e1", "name": "e0", "node-name": "l1", "writable": True}) == {"return": {}}
        nbd_io(sock, "read -P 0x21 0 64k")
        r = m.cmd("blockdev-add", {"driver": "luks", "file": "fd", "node-name": "l2", "key-secret": "s0"})
        assert r["error"]["desc"] == "Volume is not in LUKS format", r
    finally:
        d.stop()
    with open(data, "rb") as f:
        assert f.read(65536) != b"\x21" * 65536  # the payload is stored encrypted


CASES = [case_qemu_images_read_back_in_blockd, case_blockd_images_open_in_qemu, case_errors_and_query_equal_qsd,
         case_amend_slots_interop, case_detached_header_round_trip]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--blockd", required=True)
    ap.add_argument("-k", default="")
    a = ap.parse_args()
    if not all(shutil.which(t) for t in ("qemu-img", "qemu-io", QSD)):
        print("SKIP: qemu-img, qemu-io or qemu-storage-daemon missing")
        return 77
    failed = 0
    ran = 0
    for case in CASES:
        if a.k and a.k not in case.__name__:
            continue
        ran += 1
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        tmp = tempfile.mkdtemp(prefix="blockd-luks-", dir=base)
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

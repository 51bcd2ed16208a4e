# Differential qcow2 QMP tests, blockd against qemu-storage-daemon; ctest runs them in one single-threaded process.
"""Each case makes the same images with qemu-img in a fresh temp dir for each daemon, sends the same QMP commands
to qemu-storage-daemon and to blockd, and compares the replies as JSON values (member order is free, member sets
and values are not). Covers blockdev-add of qcow2 images over qemu-img's option matrix (versions, cluster sizes,
refcount widths, extended L2, lazy refcounts, zstd, external data files, backing chains named in the header,
backing: null, backing by node name, internal snapshots), then query-named-block-nodes flat and not flat;
blockdev-add error texts for bad qcow2 options and bad images; blockdev-del of a qcow2 node with its implicitly
opened chain, then `qemu-img check` and the header's feature bits of the images. A few cases also compare
x-debug-query-block-graph (by node name: ids number nodes in creation order) and query-blockstats (its shape and
parent links; see stats_shape).

Normalized, and only these: the temp dir (WORKDIR), actual-size, snapshot dates, and automatic node names
(#blockNNN differs by design: QEMU adds random digits), which become their place in the graph (#top/backing/file).
QSD 7.2's replies are lifted to 10.2's BlockDeviceInfo (blockd's target): `active` (true: no case inactivates) and
`children` (from QSD's own x-debug-query-block-graph, in QEMU's bs->children order) are added, and blockd's file
nodes' format-specific {type: file} (8.0+) is dropped, as in test_differential_qmp.py.

Differences that are known and owned by code outside this test's reach are listed in KNOWN with what QSD answers;
they print as KNOWN and do not fail (--strict makes them fail). A KNOWN entry that no longer matches anything fails,
so the list shrinks as they are fixed."""
import argparse
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qmp_harness import Client, Daemon, monitor_args  # noqa: E402

AUTO_RE = re.compile(r"#block\d+")


# ---- image recipes (run with the case's temp dir as cwd; W/ names a path in it) ----------------------------------

def img(*args):
    return ("qemu-img",) + args


def io(fmt, path, *cmds):
    out = ("qemu-io", "-f", fmt)
    for c in cmds:
        out += ("-c", c)
    return out + (path,)


def patch(path, offset, data):
    return ("patch", path, offset, data)


def set_incompat(path, bits, offset=72):
    """ORs `bits` into the header's incompatible_features (offset 72, big endian), or the compatible (80) or
    autoclear (88) features."""
    return ("incompat", path, bits, offset)


def drop_backing_format(path):
    """Renames the backing-format header extension to an unknown one, leaving a backing file without a format
    (qemu-img 7.2 refuses to make such an image; older QEMU did). Unknown extensions must be ignored."""
    return ("nofmt", path)


def run_setup(tmp, steps):
    for s in steps:
        s = tuple(x.replace("W/", tmp + "/") if isinstance(x, str) else x for x in s)
        if s[0] == "incompat":
            with open(s[1], "r+b") as f:
                f.seek(s[3])
                v = struct.unpack(">Q", f.read(8))[0] | s[2]
                f.seek(s[3])
                f.write(struct.pack(">Q", v))
        elif s[0] == "nofmt":
            with open(s[1], "r+b") as f:
                head = f.read(1 << 16)
                version = struct.unpack(">I", head[4:8])[0]
                off = struct.unpack(">I", head[100:104])[0] if version >= 3 else 72
                while off + 8 <= len(head):
                    magic, length = struct.unpack(">II", head[off:off + 8])
                    if magic == 0:
                        break
                    if magic == 0xE2792ACA:
                        f.seek(off)
                        f.write(struct.pack(">I", 0x0B1D0B1D))
                        break
                    off += 8 + (length + 7) // 8 * 8
                else:
                    raise AssertionError("no backing format extension in " + s[1])
        elif s[0] == "patch":
            with open(s[1], "r+b") as f:
                f.seek(s[2])
                f.write(s[3])
        else:
            r = subprocess.run(s, cwd=tmp, capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"setup step {s} failed: {r.stderr}")


# ---- QMP building blocks ----------------------------------------------------------------------------------------

def f(name):
    return {"driver": "file", "filename": "W/" + name}


def q2(node, image, **kw):
    o = {"driver": "qcow2", "node-name": node, "file": f(image)}
    o.update({k.replace("_", "-"): v for k, v in kw.items()})
    return ("blockdev-add", o)


def add(o):
    return ("blockdev-add", o)


def qnbn(flat=None):
    return ("query-named-block-nodes", None if flat is None else {"flat": flat})


def both_queries():
    return [qnbn(), qnbn(True)]


def graph():
    return ("x-debug-query-block-graph", None)


def stats():
    return ("query-blockstats", {"query-nodes": True})


def dele(node):
    return ("blockdev-del", {"node-name": node})


def header(image):
    """Not QMP: the header's feature bit fields as the daemon left them (it still runs)."""
    return ("!header", image)


def check(image):
    """Not QMP: `qemu-img check` and `qemu-img info` of the image while the daemon still runs."""
    return ("!check", image)


# ---- cases --------------------------------------------------------------------------------------------------------

CREATE = img("create", "-q", "-f", "qcow2")
BASE = [img("create", "-q", "-f", "raw", "W/base.raw", "1M"), io("raw", "W/base.raw", "write -P 0x11 0 64k")]

MATRIX = [
    ("v3 defaults", [CREATE + ("W/a.qcow2", "1M")]),
    ("v2 (compat 0.10)", [CREATE + ("-o", "compat=0.10", "W/a.qcow2", "1M")]),
    ("v2 with 4k clusters and data", [CREATE + ("-o", "compat=0.10,cluster_size=4096", "W/a.qcow2", "3M"),
                                      io("qcow2", "W/a.qcow2", "write 0 8k", "write -z 1M 64k")]),
    ("512-byte clusters", [CREATE + ("-o", "cluster_size=512", "W/a.qcow2", "1M")]),
    ("2M clusters", [CREATE + ("-o", "cluster_size=2M", "W/a.qcow2", "16M")]),
    ("refcount_bits=1", [CREATE + ("-o", "refcount_bits=1", "W/a.qcow2", "1M")]),
    ("refcount_bits=64 with data", [CREATE + ("-o", "refcount_bits=64", "W/a.qcow2", "1M"),
                                    io("qcow2", "W/a.qcow2", "write 0 192k")]),
    ("extended_l2 with 128k clusters", [CREATE + ("-o", "extended_l2=on,cluster_size=128k", "W/a.qcow2", "1M"),
                                        io("qcow2", "W/a.qcow2", "write 4k 4k")]),
    ("lazy_refcounts", [CREATE + ("-o", "lazy_refcounts=on", "W/a.qcow2", "1M")]),
    ("zstd compression with a compressed cluster", [CREATE + ("-o", "compression_type=zstd", "W/a.qcow2", "1M"),
                                                    io("qcow2", "W/a.qcow2", "write -c 0 64k")]),
    ("odd virtual size", [CREATE + ("W/a.qcow2", "1000448")]),
    ("every v3 feature at once", [CREATE + ("-o", "cluster_size=32k,refcount_bits=8,extended_l2=on,lazy_refcounts=on,"
                                                  "compression_type=zstd", "W/a.qcow2", "5M")]),
]

CASES = []
for title, setup in MATRIX:
    CASES.append(("open: " + title, setup, [q2("top", "a.qcow2")] + both_queries()))
    CASES.append(("open read-only: " + title, setup, [q2("top", "a.qcow2", read_only=True)] + [qnbn(True)]))

CASES += [
    ("data-file, absolute name, data_file_raw", [
        CREATE + ("-o", "data_file=W/d.raw,data_file_raw=on", "W/a.qcow2", "1M"),
        io("qcow2", "W/a.qcow2", "write -P 0x22 0 64k")], [q2("top", "a.qcow2")] + both_queries() + [stats()]),
    ("data-file, relative name", [
        CREATE + ("-o", "data_file=d.raw", "W/a.qcow2", "1M")], [q2("top", "a.qcow2")] + both_queries()),
    ("data-file, relative name, image in a subdirectory", [
        ("mkdir", "W/sub"), CREATE + ("-o", "data_file=d.raw", "W/sub/a.qcow2", "1M")],
        [q2("top", "sub/a.qcow2")] + both_queries()),
    ("data-file and backing both given by node name", BASE + [
        CREATE + ("-o", "data_file=d.raw", "-b", "W/base.raw", "-F", "raw", "W/a.qcow2", "1M")],
        [add({"driver": "file", "node-name": "df", "filename": "W/d.raw"}),
         add({"driver": "raw", "node-name": "b0", "file": f("base.raw")}),
         q2("top", "a.qcow2", data_file="df", backing="b0")] + both_queries() + [graph(), stats()]),
    ("data-file given as an option", [
        CREATE + ("-o", "data_file=d.raw", "W/a.qcow2", "1M")],
        [q2("top", "a.qcow2", data_file=f("d.raw"))] + both_queries()),
    ("data-file given as a node name", [
        CREATE + ("-o", "data_file=d.raw,data_file_raw=on", "W/a.qcow2", "1M")],
        [add({"driver": "file", "node-name": "df", "filename": "W/d.raw"}), q2("top", "a.qcow2", data_file="df")]
        + both_queries()),
    ("backing chain: relative name, absolute name, formats from the header", BASE + [
        CREATE + ("-b", "base.raw", "-F", "raw", "W/mid.qcow2", "1M"),
        io("qcow2", "W/mid.qcow2", "write -P 0x22 64k 64k"),
        CREATE + ("-b", "W/mid.qcow2", "-F", "qcow2", "W/a.qcow2", "1M")],
        [q2("top", "a.qcow2")] + both_queries() + [graph(), stats()]),
    ("backing chain in a subdirectory, relative names", [
        ("mkdir", "W/sub"), img("create", "-q", "-f", "raw", "W/sub/base.raw", "1M"),
        CREATE + ("-b", "base.raw", "-F", "raw", "W/sub/mid.qcow2", "1M"),
        CREATE + ("-b", "sub/mid.qcow2", "-F", "qcow2", "W/a.qcow2", "1M")],
        [q2("top", "a.qcow2")] + both_queries()),
    ("backing file without a format in the header", BASE + [
        CREATE + ("-b", "base.raw", "-F", "raw", "W/a.qcow2", "1M"), drop_backing_format("W/a.qcow2")],
        [q2("top", "a.qcow2", read_only=True)] + both_queries()),
    ("backing: null", BASE + [CREATE + ("-b", "base.raw", "-F", "raw", "W/a.qcow2", "1M")],
        [q2("top", "a.qcow2", backing=None)] + both_queries()),
    ("backing as a node name, header names the same file by absolute path", BASE + [
        CREATE + ("-b", "W/base.raw", "-F", "raw", "W/a.qcow2", "1M")],
        [add({"driver": "raw", "node-name": "b0", "file": f("base.raw")}), q2("top", "a.qcow2", backing="b0")]
        + both_queries()),
    ("backing as a node name, header names it relatively", BASE + [
        CREATE + ("-b", "base.raw", "-F", "raw", "W/a.qcow2", "1M")],
        [add({"driver": "raw", "node-name": "b0", "file": f("base.raw")}), q2("top", "a.qcow2", backing="b0")]
        + both_queries()),
    ("backing as a node name on an image without a backing file", BASE + [CREATE + ("W/a.qcow2", "1M")],
        [add({"driver": "raw", "node-name": "b0", "file": f("base.raw")}), q2("top", "a.qcow2", backing="b0")]
        + both_queries()),
    ("backing given inline", BASE + [CREATE + ("-b", "base.raw", "-F", "raw", "W/a.qcow2", "1M")],
        [q2("top", "a.qcow2", backing={"driver": "raw", "file": f("base.raw")})] + both_queries()),
    ("file given as a node name", [CREATE + ("W/a.qcow2", "1M")],
        [add({"driver": "file", "node-name": "f0", "filename": "W/a.qcow2"}),
         add({"driver": "qcow2", "node-name": "top", "file": "f0"})] + both_queries()),
    ("runtime options that are not part of the filename", [CREATE + ("W/a.qcow2", "1M")],
        [q2("top", "a.qcow2", lazy_refcounts=True, l2_cache_size=262144, cache_clean_interval=0,
            pass_discard_request=False, overlap_check="all")] + both_queries()),
    ("internal snapshots", [
        CREATE + ("W/a.qcow2", "1M"), io("qcow2", "W/a.qcow2", "write -P 1 0 64k"),
        img("snapshot", "-c", "first", "W/a.qcow2"), io("qcow2", "W/a.qcow2", "write -P 2 0 64k"),
        img("snapshot", "-c", "second", "W/a.qcow2"), img("snapshot", "-c", "third", "W/a.qcow2"),
        img("snapshot", "-d", "second", "W/a.qcow2")],
        [q2("top", "a.qcow2")] + both_queries()),
    ("internal snapshot in a v2 image with a backing chain", BASE + [
        CREATE + ("-o", "compat=0.10", "-b", "base.raw", "-F", "raw", "W/a.qcow2", "1M"),
        img("snapshot", "-c", "s1", "W/a.qcow2")],
        [q2("top", "a.qcow2", read_only=True)] + both_queries()),
    ("dirty image opened read-only (lazy refcounts, dirty bit kept)", [
        CREATE + ("-o", "lazy_refcounts=on", "W/a.qcow2", "1M"), set_incompat("W/a.qcow2", 1)],
        [q2("top", "a.qcow2", read_only=True)] + both_queries()),
    ("dirty image opened read-write (repaired, bit cleared)", [
        CREATE + ("-o", "lazy_refcounts=on", "W/a.qcow2", "1M"), io("qcow2", "W/a.qcow2", "write 0 64k"),
        set_incompat("W/a.qcow2", 1)],
        [q2("top", "a.qcow2")] + both_queries() + [dele("top"), check("a.qcow2")]),
    ("unknown compatible and autoclear bits: kept, cleared on a read-write open", [
        CREATE + ("W/a.qcow2", "1M"), set_incompat("W/a.qcow2", 1 << 40, 80), set_incompat("W/a.qcow2", 1 << 41, 88),
        CREATE + ("W/b.qcow2", "1M"), set_incompat("W/b.qcow2", 1 << 40, 80), set_incompat("W/b.qcow2", 1 << 41, 88)],
        [q2("top", "a.qcow2"), q2("top2", "b.qcow2", read_only=True), qnbn(True), header("a.qcow2"),
         header("b.qcow2"), dele("top"), dele("top2"), header("a.qcow2"), check("a.qcow2")]),
    ("lazy refcounts: the dirty bit is clean again after blockdev-del", [
        CREATE + ("-o", "lazy_refcounts=on", "W/a.qcow2", "1M"), CREATE + ("-o", "compat=0.10", "W/v2.qcow2", "1M")],
        [q2("top", "a.qcow2"), q2("v2", "v2.qcow2"), header("a.qcow2"), header("v2.qcow2"), qnbn(True),
         dele("top"), dele("v2"), header("a.qcow2"), check("a.qcow2"), check("v2.qcow2")]),
    ("corrupt image opened read-only", [CREATE + ("W/a.qcow2", "1M"), set_incompat("W/a.qcow2", 2)],
        [q2("top", "a.qcow2", read_only=True)] + both_queries()),
    ("two qcow2 nodes sharing one backing node", BASE + [
        CREATE + ("-b", "W/base.raw", "-F", "raw", "W/a.qcow2", "1M"),
        CREATE + ("-b", "W/base.raw", "-F", "raw", "W/b.qcow2", "1M")],
        [add({"driver": "raw", "node-name": "b0", "read-only": True, "file": f("base.raw")}),
         q2("top", "a.qcow2", backing="b0"), q2("top2", "b.qcow2", backing="b0")] + both_queries()),
]

ERRORS_SETUP = BASE + [
    CREATE + ("W/a.qcow2", "1M"),
    CREATE + ("-o", "compat=0.10", "W/v2.qcow2", "1M"),
    CREATE + ("-b", "nope.raw", "-F", "raw", "-u", "W/nobacking.qcow2", "1M"),
    CREATE + ("-b", "base.raw", "-F", "qcow2", "-u", "W/wrongfmt.qcow2", "1M"),
    CREATE + ("-o", "data_file=gone.raw", "W/nodata.qcow2", "1M"), ("rm", "W/gone.raw"),
    ("cp", "W/a.qcow2", "W/corrupt.qcow2"), set_incompat("W/corrupt.qcow2", 2),
    ("cp", "W/a.qcow2", "W/bit63.qcow2"), set_incompat("W/bit63.qcow2", 1 << 63),
    ("cp", "W/a.qcow2", "W/bit5.qcow2"), set_incompat("W/bit5.qcow2", 1 << 5),
    ("cp", "W/a.qcow2", "W/badmagic.qcow2"), patch("W/badmagic.qcow2", 0, b"QFI\x00"),
    ("cp", "W/a.qcow2", "W/v4.qcow2"), patch("W/v4.qcow2", 4, b"\x00\x00\x00\x04"),
    ("cp", "W/a.qcow2", "W/bigcluster.qcow2"), patch("W/bigcluster.qcow2", 20, b"\x00\x00\x00\x16"),
]
CASES += [
    ("blockdev-add errors: options", ERRORS_SETUP, [
        q2("e", "a.qcow2", l2_cache_entry_size=1000), q2("e", "a.qcow2", l2_cache_entry_size=256),
        q2("e", "a.qcow2", l2_cache_entry_size=131072),
        q2("e", "a.qcow2", cache_size=1000000, l2_cache_size=500000, refcount_cache_size=100000),
        q2("e", "a.qcow2", cache_size=100000, l2_cache_size=500000),
        q2("e", "a.qcow2", cache_size=100000, refcount_cache_size=500000),
        q2("e", "a.qcow2", cache_clean_interval=-1),
        q2("e", "v2.qcow2", lazy_refcounts=True),
        q2("e", "a.qcow2", data_file=f("base.raw")),
        q2("e", "a.qcow2", backing="nope"),
        q2("e", "a.qcow2", encrypt={"format": "aes"}),
        q2("e", "a.qcow2", overlap_check="bogus"),
        q2("e", "a.qcow2", bogus=1),
        add({"driver": "qcow2", "node-name": "e"}),
        qnbn()]),
    ("blockdev-add errors: images", ERRORS_SETUP, [
        q2("e", "nobacking.qcow2"), q2("e", "wrongfmt.qcow2"), q2("e", "nodata.qcow2"),
        q2("e", "base.raw"), q2("e", "badmagic.qcow2"), q2("e", "v4.qcow2"), q2("e", "bigcluster.qcow2"),
        q2("e", "corrupt.qcow2"), q2("e", "bit63.qcow2"), q2("e", "bit5.qcow2"),
        q2("e", "bit5.qcow2", read_only=True),
        qnbn()]),
]

CASES += [
    ("blockdev-del of a qcow2 node takes its implicit chain", BASE + [
        CREATE + ("-b", "base.raw", "-F", "raw", "W/mid.qcow2", "1M"),
        CREATE + ("-o", "lazy_refcounts=on", "-b", "mid.qcow2", "-F", "qcow2", "W/a.qcow2", "1M")],
        [q2("top", "a.qcow2"), qnbn(True),
         dele("@top/backing"), dele("@top/backing/backing/file"), dele("@top/file"),
         dele("top"), qnbn(), dele("top"),
         check("a.qcow2"), check("mid.qcow2"),
         q2("top", "a.qcow2", read_only=True), qnbn(True), dele("top"), qnbn()]),
    ("blockdev-del of a node used as backing by name", BASE + [
        CREATE + ("-b", "W/base.raw", "-F", "raw", "W/a.qcow2", "1M")],
        [add({"driver": "raw", "node-name": "b0", "file": f("base.raw")}), q2("top", "a.qcow2", backing="b0"),
         dele("b0"), dele("top"), qnbn(True), dele("b0"), qnbn(), check("a.qcow2")]),
    ("blockdev-del with a data file", [
        CREATE + ("-o", "data_file=d.raw", "W/a.qcow2", "1M"), io("qcow2", "W/a.qcow2", "write 0 64k")],
        [q2("top", "a.qcow2"), qnbn(True), dele("top"), qnbn(), check("a.qcow2")]),
]

# Known differences owned elsewhere: (case substring, path regex, regex QSD's value must match (None: any), what
# QSD does and where blockd should change). The printed diff shows both values.
KNOWN = [
    ("dirty image opened read-write", r"(#top/file\]\.image\.virtual-size|qemu-img check a\.qcow2\.check)$", None,
     "refcount rebuild of a dirty lazy-refcounts image (formats/qcow2 rebuild_refcounts): the image is clean, but "
     "QEMU's rebuilt tables end the file at 393216 bytes where blockd's leave a 1 MiB file ending at 524288"),
]


# ---- running one daemon through a case ----------------------------------------------------------------------------

class Transcript:
    def __init__(self):
        self.steps = []  # (label, value)
        self.labels = {}  # real automatic name -> label from the graph
        self.reverse = {}


def subst(v, fn):
    if isinstance(v, dict):
        return {k: subst(x, fn) for k, x in v.items()}
    if isinstance(v, list):
        return [subst(x, fn) for x in v]
    if isinstance(v, str):
        return fn(v)
    return v


def children_from_graph(graph):
    """QEMU's bs->children order per node: the dump prepends each edge while walking them, so reverse it."""
    names = {n["id"]: n["name"] for n in graph["nodes"]}
    kids = {}
    for e in reversed(graph["edges"]):
        if names[e["parent"]] == "":
            continue
        kids.setdefault(names[e["parent"]], []).append({"child": e["name"], "node-name": names[e["child"]]})
    return kids


def graph_by_name(g):
    """x-debug-query-block-graph without its ids (they number nodes in creation order): nodes in order by name,
    edges keyed by parent/role, and the edge order on its own."""
    names = {n["id"]: n["name"] or f"<backend {n['id']}>" for n in g["nodes"]}
    edges = {}
    order = []
    for e in g["edges"]:
        key = f"{names[e['parent']]}/{e['name']}"
        order.append(key)
        edges[key] = {"child": names[e["child"]], "perm": e["perm"], "shared-perm": e["shared-perm"]}
    return {"nodes": [names[n["id"]] for n in g["nodes"]], "types": {names[n["id"]]: n["type"] for n in g["nodes"]},
            "edges": edges, "edge-order": order}


def stats_shape(v, in_stats=False):
    """query-blockstats reduced to what both daemons define alike: which nodes, their parent links, the member
    names, wr_highest_offset. Counter values go (blockd accounts every node's own requests, including a format's
    metadata I/O on its file, where QEMU counts only at block backends, so node-level counters there stay 0), as
    do the members only one side has: 8.0's zone_append counters, and the account_* flags (QSD: false, blockd:
    true, as test_differential_qmp.py explains)."""
    if isinstance(v, dict):
        out = {}
        for k, x in v.items():
            if "zone_append" in k or k in ("account_invalid", "account_failed", "idle_time_ns"):
                continue
            if in_stats and isinstance(x, int) and k != "wr_highest_offset":
                out[k] = "<n>"
            else:
                out[k] = stats_shape(x, in_stats or k == "stats")
        return out
    if isinstance(v, list):
        return [stats_shape(x, in_stats) for x in v]
    return v


def lift_to_102(nodes, graph):
    kids = children_from_graph(graph)
    for n in nodes:
        n["children"] = kids.get(n["node-name"], [])
        n["active"] = True


def drop_newer(nodes):
    def strip_image(i):
        fs = i.get("format-specific")
        if fs is not None and fs.get("type") == "file":
            del i["format-specific"]
        if "backing-image" in i:
            strip_image(i["backing-image"])
    for n in nodes:
        strip_image(n["image"])


def label_auto_names(t, nodes):
    """Names each automatically named node after its place under a user-named node: #top/backing/file."""
    kids = {n["node-name"]: n.get("children", []) for n in nodes}
    work = [(n, n) for n in sorted(kids) if not n.startswith("#")]
    while work:
        name, label = work.pop(0)
        for c in kids.get(name, []):
            cn = c["node-name"]
            if cn.startswith("#") and cn not in t.labels:
                lab = ("#" + label if not label.startswith("#") else label) + "/" + c["child"]
                t.labels[cn] = lab
                t.reverse[lab] = cn
                work.append((cn, lab))


def play(binary, tmp, setup, cmds, is_qsd):
    run_setup(tmp, setup)
    args, path = monitor_args(tmp)
    # QEMU opens a relative data-file name from the image header against its working directory (not the
    # image's, as it does for backing files), so each daemon runs in its case's temp dir.
    old_cwd = os.getcwd()
    os.chdir(tmp)
    try:
        d = Daemon(binary, args, tmp)
    finally:
        os.chdir(old_cwd)
    t = Transcript()
    try:
        conn = {"c": None, "id": 0}

        def cmd(name, args=None):
            conn["id"] += 1
            req = {"execute": name, "id": conn["id"]}
            if args is not None:
                req["arguments"] = args
            conn["c"].send(json.dumps(req) + "\n")
            while True:
                msg = conn["c"].line()
                # QSD 7.2 now and then greets a new connection twice (its socket chardev reports the open
                # twice); blockd never does, so only QSD's extra greeting is skipped.
                if "event" in msg or (is_qsd and "QMP" in msg):
                    continue
                assert msg.get("id") == conn["id"], (req, msg)
                del msg["id"]
                return msg

        # QSD 7.2 writes its pid file before its monitor's I/O thread has taken over the socket, and a client
        # that connects in that window may see its first command go unanswered: QSD gets a fresh connection
        # (and a fresh monitor session) after a short deadline. blockd gets one try.
        for attempt in range(3 if is_qsd else 1):
            conn["c"] = c = Client.unix(path)
            c.sock.settimeout(5 if is_qsd else 30)
            try:
                greeting = c.line()
                assert "QMP" in greeting, greeting
                r = cmd("qmp_capabilities")
                assert r == {"return": {}}, (greeting, r)
                break
            except (OSError, AssertionError) as e:
                c.close()
                failure = e
        else:
            raise RuntimeError(f"{os.path.basename(binary)}: negotiation failed: {failure!r}")
        c.sock.settimeout(30)
        for i, (name, a) in enumerate(cmds):
            if name == "!header":
                with open(os.path.join(tmp, a), "rb") as hf:
                    h = hf.read(104)
                value = {"version": struct.unpack(">I", h[4:8])[0]}
                if value["version"] >= 3:
                    value.update(zip(("incompatible", "compatible", "autoclear"),
                                     (hex(x) for x in struct.unpack(">QQQ", h[72:96]))))
                t.steps.append((f"#{i} header of {a}", value))
                continue
            if name == "!check":
                image = os.path.join(tmp, a)
                r = subprocess.run(["qemu-img", "check", "-f", "qcow2", image], capture_output=True, text=True)
                info = subprocess.run(["qemu-img", "info", "-f", "qcow2", "--output=json", image],
                                      capture_output=True, text=True)
                value = {"check-rc": r.returncode, "check": r.stdout + r.stderr, "info-rc": info.returncode}
                if info.returncode == 0:
                    inf = json.loads(info.stdout)
                    inf.pop("actual-size", None)
                    value["info"] = inf
                t.steps.append((f"#{i} qemu-img check {a}", value))
                continue
            # "@top/backing" names an automatic node by its place (as the last query showed it).
            a2 = subst(a, lambda s: t.reverse.get("#" + s[1:], s) if s.startswith("@") else s.replace("W/", tmp + "/"))
            reply = cmd(name, a2)
            if name == "x-debug-query-block-graph" and "return" in reply:
                reply = {"return": graph_by_name(reply["return"])}
            if name == "query-blockstats" and "return" in reply:
                reply = {"return": stats_shape(reply["return"])}
            if name == "query-named-block-nodes" and "return" in reply:
                if is_qsd:
                    graph = cmd("x-debug-query-block-graph")["return"]
                    lift_to_102(reply["return"], graph)
                else:
                    drop_newer(reply["return"])
                label_auto_names(t, reply["return"])
            t.steps.append((f"#{i} {name} {json.dumps(a)[:80] if a is not None else ''}".rstrip(), reply))
        c.close()
    finally:
        rc = d.stop()
    t.steps.append(("exit status", rc))
    return normalize(t, tmp)


def normalize(t, tmp):
    def fix_str(s):
        s = s.replace(tmp, "WORKDIR")
        return AUTO_RE.sub(lambda m: t.labels.get(m.group(0), "#block?"), s)

    def walk(v, key=None):
        if isinstance(v, dict):
            out = {}
            for k, x in v.items():
                if k == "actual-size" and isinstance(x, int):
                    out[k] = "<actual-size>"
                elif k in ("date-sec", "date-nsec"):
                    out[k] = "<date>"
                elif k == "idle_time_ns":
                    out[k] = "<idle>"
                else:
                    out[fix_str(k)] = walk(x, k)
            return out
        if isinstance(v, list):
            return [walk(x) for x in v]
        if isinstance(v, str):
            return fix_str(v)
        return v
    return [(label, walk(v)) for label, v in t.steps]


# ---- comparison ---------------------------------------------------------------------------------------------------

def node_list(v):
    return (isinstance(v, list) and v and all(isinstance(x, dict) and "node-name" in x for x in v))


def diff(want, got, path, out):
    if isinstance(want, dict) and isinstance(got, dict):
        for k in sorted(set(want) | set(got)):
            if k not in got:
                out.append((f"{path}.{k}", want[k], "<absent>"))
            elif k not in want:
                out.append((f"{path}.{k}", "<absent>", got[k]))
            else:
                diff(want[k], got[k], f"{path}.{k}", out)
    elif node_list(want) and node_list(got):
        # Nodes are matched by name; their order (QSD lists the newest first) is compared on its own.
        w = {n["node-name"]: n for n in want}
        g = {n["node-name"]: n for n in got}
        for k in sorted(set(w) | set(g)):
            if k not in g:
                out.append((f"{path}[{k}]", "<node>", "<absent>"))
            elif k not in w:
                out.append((f"{path}[{k}]", "<absent>", "<node>"))
            else:
                diff(w[k], g[k], f"{path}[{k}]", out)
        wo, go = [n["node-name"] for n in want], [n["node-name"] for n in got]
        if set(wo) == set(go) and wo != go:
            out.append((f"{path}<order>", wo, go))
    elif isinstance(want, list) and isinstance(got, list) and len(want) == len(got):
        for i, (a, b) in enumerate(zip(want, got)):
            diff(a, b, f"{path}[{i}]", out)
    elif want != got or type(want) is not type(got):
        out.append((path, want, got))


def show(v):
    s = json.dumps(v)
    return s if len(s) <= 400 else s[:400] + "..."


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--blockd", required=True)
    ap.add_argument("--qsd", default=shutil.which("qemu-storage-daemon"))
    ap.add_argument("-k", default="", help="run only cases whose name contains this")
    ap.add_argument("--strict", action="store_true", help="known differences fail too")
    ap.add_argument("-v", action="store_true", help="print both transcripts of failing cases")
    ap.add_argument("--dump", help="write each case's normalized transcripts into this directory")
    a = ap.parse_args()
    if not a.qsd or not shutil.which("qemu-img") or not shutil.which("qemu-io"):
        print("SKIP: qemu-storage-daemon, qemu-img or qemu-io not installed; nothing to compare against")
        print("0 passed, 0 failed")
        return 77  # ctest: skipped (SKIP_RETURN_CODE)
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    passed = failed = 0
    used = set()
    for name, setup, cmds in CASES:
        if a.k not in name:
            continue
        with tempfile.TemporaryDirectory(prefix="bd-q2q-", dir=base) as t1, \
                tempfile.TemporaryDirectory(prefix="bd-q2b-", dir=base) as t2:
            try:
                want = play(a.qsd, t1, setup, cmds, True)
                got = play(a.blockd, t2, setup, cmds, False)
            except Exception as e:  # a daemon that died or hung is a failure of this case, not of the run
                failed += 1
                print("FAIL", name, "--", type(e).__name__, e, flush=True)
                traceback.print_exc(limit=-3)
                continue
        if a.dump:
            os.makedirs(a.dump, exist_ok=True)
            stem = os.path.join(a.dump, re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_"))
            for suffix, v in ((".qsd.json", want), (".blockd.json", got)):
                with open(stem + suffix, "w") as out:
                    json.dump(v, out, indent=1)
        diffs = []
        for (lw, w), (lg, g) in zip(want, got):
            diff(w, g, lw, diffs)
        if len(want) != len(got):
            diffs.append(("transcript length", len(want), len(got)))
        real, known = [], []
        for d in diffs:
            hit = next((i for i, (cs, rx, vx, _) in enumerate(KNOWN) if cs in name and re.search(rx, d[0]) and
                        (vx is None or re.search(vx, json.dumps(d[1])))), None)
            if hit is None or a.strict:
                real.append(d)
            else:
                used.add(hit)
                known.append((d, KNOWN[hit][3]))
        if real:
            failed += 1
            print("FAIL", name, flush=True)
        else:
            passed += 1
            print("PASS" + (" (with known differences)" if known else ""), name, flush=True)
        for p, w, g in real:
            print("   at", p)
            print("      qsd:   ", show(w))
            print("      blockd:", show(g))
        for (p, w, g), why in known:
            print("   KNOWN at", p)
            print("      qsd:   ", show(w))
            print("      blockd:", show(g))
            print("      owner: ", why)
        if real and a.v:
            for (lw, w), (lg, g) in zip(want, got):
                print("   qsd   ", lw, show(w))
                print("   blockd", lg, show(g))
    if not a.k and not a.strict:
        for i, (cs, rx, vx, why) in enumerate(KNOWN):
            if i not in used:
                failed += 1
                print(f"FAIL known difference no longer seen (remove it from KNOWN): {cs!r} {rx!r}")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

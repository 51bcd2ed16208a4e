# Seed corpus generator for the qcow2 fuzzer (qemu-img/qemu-io over an option matrix, plus a few hand-made headers); run by hand, single-threaded.
#
# Usage: python3 tests/fuzz/make_qcow2_corpus.py [--out tests/fuzz/corpus/qcow2] [--data tests/fuzz/data]
#                                               [--regress tests/fuzz/regress/qcow2]
# Writes every seed as [image][48-byte trailer] (see tests/fuzz/qcow2_fuzz.h) and the harness's
# qcow2 backing file to --data. Images name their backing and data files relatively
# (backing.raw, backing.qcow2, data.raw): the harness keeps files of those names next to the image.
# Deterministic apart from qemu-img's timestamps in snapshot tables.
import argparse
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile

TRAILER = 48
MAX_SEED = 256 * 1024
MODE_RO, MODE_BACKING, MODE_UNMAP, MODE_SMALL, MODE_LAZY, MODE_REOPEN = 1, 2, 4, 32, 64, 128


def sh(*args, cwd):
    r = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {r.stdout}{r.stderr}")
    return r.stdout


def qemu_io(cwd, fmt, img, *cmds):
    args = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    sh(*args, img, cwd=cwd)


def patterned(path, size):
    # The same content the harness writes for backing.raw and data.raw.
    with open(path, "wb") as f:
        f.write(bytes(((i // 512) * 7 + 1) & 0xFF for i in range(size)))


def op(kind, pos, length, flags=0, place=0):
    return bytes([kind | flags | (place << 6), pos & 0xFF, (pos >> 8) & 0xFF, length])


def trailer(mode, ops, fill=0x5A):
    body = b"".join(ops)[:44]
    return bytes([mode, len(ops), fill, 0]) + body + bytes(44 - len(body))


# Operation kinds (low 3 bits of an op record).
READ, WRITE, ZERO, DISCARD, STATUS, FLUSH, BIGREAD, TRUNCATE = range(8)
UNALIGNED, FUA_UNMAP, NOFALLBACK = 8, 16, 32


def ops_for(rng, writes):
    ops = [op(STATUS, 0, 0x7F), op(BIGREAD, 0, 0)]
    kinds = [READ, STATUS, BIGREAD] + ([WRITE, WRITE, ZERO, DISCARD, FLUSH] if writes else [])
    while len(ops) < 11:
        k = rng.choice(kinds)
        flags = rng.choice([0, 0, UNALIGNED, FUA_UNMAP, FUA_UNMAP | NOFALLBACK])
        ops.append(op(k, rng.randrange(0, 2048), rng.randrange(0, 256), flags, rng.randrange(0, 4)))
    return ops


def main():
    ap = argparse.ArgumentParser()
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--out", default=os.path.join(here, "corpus", "qcow2"))
    ap.add_argument("--data", default=os.path.join(here, "data"))
    ap.add_argument("--regress", default=os.path.join(here, "regress", "qcow2"))
    a = ap.parse_args()
    for tool in ("qemu-img", "qemu-io"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is needed to make the corpus")
    os.makedirs(a.out, exist_ok=True)
    os.makedirs(a.data, exist_ok=True)
    os.makedirs(a.regress, exist_ok=True)
    rng = random.Random(20240601)
    w = tempfile.mkdtemp(prefix="q2corpus-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        patterned(os.path.join(w, "backing.raw"), 1 << 20)
        patterned(os.path.join(w, "data.raw"), 1 << 20)
        # The harness's qcow2 backing file: small, 4 KiB clusters, some data and a zero range.
        sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "backing.qcow2", "1M", cwd=w)
        qemu_io(w, "qcow2", "backing.qcow2", "write -P 0xb1 0 12k", "write -P 0xb2 300k 4k", "write -z 8k 4k")
        shutil.copy(os.path.join(w, "backing.qcow2"), os.path.join(a.data, "backing.qcow2"))

        seeds = {}  # name -> image bytes

        def make(name, opts, size="256k", io=(), backing=None, fmt_backing=None, compress_from=None, snapshots=0):
            img = name + ".qcow2"
            path = os.path.join(w, img)
            if compress_from:
                sh("qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", opts, compress_from, img, cwd=w)
            else:
                args = ["qemu-img", "create", "-q", "-f", "qcow2"]
                if opts:
                    args += ["-o", opts]
                if backing:
                    args += ["-b", backing, "-F", fmt_backing]
                args += [img]
                if size:
                    args += [size]
                sh(*args, cwd=w)
            for i in range(snapshots):
                if io:
                    qemu_io(w, "qcow2", img, io[i % len(io)])
                sh("qemu-img", "snapshot", "-c", f"snap{i}", img, cwd=w)
            if io:
                qemu_io(w, "qcow2", img, *io)
            with open(path, "rb") as f:
                data = f.read()
            if len(data) + TRAILER > MAX_SEED:
                print(f"skip {name}: {len(data)} bytes", file=sys.stderr)
                return None
            seeds[name] = data
            return data

        small_io = ("write -P 0x11 0 8k", "write -P 0x22 20k 1536", "write -z 4k 4k", "discard 64k 4k",
                    "write -P 0x33 128k 4k")
        for compat in ("0.10", "1.1"):
            for cs in (512, 4096):
                for rc in (1, 16, 64):
                    if compat == "0.10" and rc != 16:
                        continue
                    make(f"v{'2' if compat == '0.10' else '3'}-c{cs}-rc{rc}",
                         f"compat={compat},cluster_size={cs},refcount_bits={rc}", io=small_io)
        make("v3-c64k-empty", "cluster_size=65536", size="1M")
        make("v3-c16k-extl2", "cluster_size=16384,extended_l2=on", size="128k",
             io=("write -P 0x44 0 2k", "write -P 0x45 9k 1k", "write -z 12k 1k", "write -P 0x46 40k 2k"))
        make("v3-c16k-extl2-rc1", "cluster_size=16384,extended_l2=on,refcount_bits=1", size="64k",
             io=("write -P 0x47 1k 1k", "write -z 17k 3k"))
        make("v3-c4k-lazy", "cluster_size=4096,lazy_refcounts=on", io=small_io)
        make("v3-c512-lazy-rc64", "cluster_size=512,lazy_refcounts=on,refcount_bits=64", io=small_io)
        make("v3-c4k-prealloc", "cluster_size=4096,preallocation=metadata", size="32k")
        make("v3-c4k-zstd-type", "cluster_size=4096,compression_type=zstd", io=small_io[:2])
        raw = os.path.join(w, "src.raw")
        with open(raw, "wb") as f:
            f.write(bytes(256 * 1024))
        qemu_io(w, "raw", raw, "write -P 0x5a 0 64k", "write -P 0x17 100k 30k", "write -P 0x99 200k 512")
        for cs in (512, 4096, 16384):
            make(f"compressed-zlib-c{cs}", f"cluster_size={cs}", compress_from="src.raw")
        make("compressed-zstd-c4k", "cluster_size=4096,compression_type=zstd", compress_from="src.raw")
        make("compressed-v2-c4k", "compat=0.10,cluster_size=4096", compress_from="src.raw")
        make("backing-raw-c4k", "cluster_size=4096", size="1M", backing="backing.raw", fmt_backing="raw",
             io=("write -P 0x61 4k 4k", "write -z 12k 4k", "write -P 0x62 514k 1k"))
        make("backing-qcow2-c512", "cluster_size=512", size="1M", backing="backing.qcow2", fmt_backing="qcow2",
             io=("write -P 0x63 512 1k", "write -z 8k 4k"))
        make("backing-raw-v2-c4k", "compat=0.10,cluster_size=4096", size="1M", backing="backing.raw",
             fmt_backing="raw", io=("write -P 0x64 0 2k",))
        make("backing-raw-extl2-c16k", "cluster_size=16384,extended_l2=on", size="1M", backing="backing.raw",
             fmt_backing="raw", io=("write -P 0x65 2k 1k", "write -z 33k 1k"))
        make("snapshots-c4k", "cluster_size=4096", snapshots=2, io=("write -P 0x71 0 8k", "write -P 0x72 4k 4k"))
        make("snapshots-v2-c512", "compat=0.10,cluster_size=512", snapshots=3,
             io=("write -P 0x73 0 1k", "write -P 0x74 512 1k", "write -z 0 512"))
        make("snapshots-extl2-c16k", "cluster_size=16384,extended_l2=on", size="64k", snapshots=1,
             io=("write -P 0x75 0 4k",))
        make("datafile-c4k", "cluster_size=4096,data_file=data.raw", size="1M",
             io=("write -P 0x81 0 8k", "write -z 16k 4k"))
        make("datafile-raw-c4k", "cluster_size=4096,data_file=data.raw,data_file_raw=on", size="1M",
             io=("write -P 0x82 4k 4k",))

        # Hand-made variants of good images: the header bits the driver must act on.
        def patch(src, name, fn):
            b = bytearray(seeds[src])
            fn(b)
            seeds[name] = bytes(b)

        def set_incompat(bit):
            def f(b):
                v = struct.unpack_from(">Q", b, 72)[0] | bit
                struct.pack_into(">Q", b, 72, v)
            return f

        patch("v3-c4k-lazy", "v3-c4k-lazy-dirty", set_incompat(1))          # refcount rebuild on open
        patch("v3-c4096-rc16", "v3-c4k-corrupt", set_incompat(2))             # read-only only
        patch("v3-c4096-rc16", "v3-c4k-unknown-incompat", set_incompat(1 << 40))

        def self_backing(b):
            # Backing file name: the image itself (a chain that never ends).
            name = b"image.qcow2"
            off = 4096 - 64
            b[off:off + len(name)] = name
            struct.pack_into(">QI", b, 8, off, len(name))
        patch("v3-c4096-rc16", "v3-c4k-self-backing", self_backing)
        # Seeds that crashed the driver when they were made go to the regression inputs instead
        # (under the name the report gave them), so the corpus test stays a test of the harness.
        crashers = {"v3-c4k-self-backing": "self-backing-recursion"}
        for name, out_name in crashers.items():
            blob = seeds.pop(name) + trailer(MODE_RO | MODE_BACKING, ops_for(rng, False))
            with open(os.path.join(a.regress, out_name), "wb") as f:
                f.write(blob)

        count = 0
        total = 0
        for name, data in sorted(seeds.items()):
            # Small images get a read-only and a read-write variant, bigger ones one of the two.
            variants = [(MODE_RO | MODE_BACKING, False), (MODE_BACKING | MODE_UNMAP | MODE_REOPEN, True)]
            if len(data) > 20 * 1024:
                variants = [variants[rng.randrange(2)]]
            if "lazy" in name or "rc1" in name:
                variants.append((MODE_BACKING | MODE_SMALL | MODE_REOPEN | (3 << 3), True))
            for i, (mode, writes) in enumerate(variants):
                blob = data + trailer(mode, ops_for(rng, writes), fill=rng.randrange(256))
                with open(os.path.join(a.out, f"{name}.{i}"), "wb") as f:
                    f.write(blob)
                count += 1
                total += len(blob)
        print(f"{count} seeds, {total} bytes in {a.out}")
    finally:
        shutil.rmtree(w)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Jobs leave nothing behind: for each fast kind of job cycle (blockdev-create of a file; file + qcow2 on a
node added and deleted around it; qcow2 on inline file options; x-blockdev-amend of qcow2), blockd runs a warm-up,
then two batches of cycles, each job waited for on its concluded event and dismissed. The resident set may not
grow by more than BOUND over the second batch, and the thread count must be back where it was. (Before the
job actors were freed, every cycle kept about 2 KiB per job: 1-2 MiB over a batch.) luks creations take seconds
each here (QEMU's PBKDF benchmark runs for at least half a second per key), so they are left to bench/job-rss;
they run the same job code as the others. The block jobs (stream, commit, active commit, mirror, a cancelled
mirror, a failing stream) run the same check with shorter batches (BLOCK_KINDS)."""
import argparse
import os
import shutil
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import job_cycles  # noqa: E402

WARMUP = 200
PER_BATCH = 500
# Above the allocator's noise (a few pages of heap high-water and socket buffers: 0-16 KiB measured over
# 500 cycles), far below a leak of even 200 bytes a job (100 KiB over a batch).
BOUND_KIB = 64
KINDS = ["file", "qcow2", "qcow2-inline", "amend-qcow2"]
# The block jobs (job_cycles.py: nodes added, one job run to its end, nodes deleted): stream, intermediate
# and active commit, mirror (completed at READY), a force-cancelled mirror, a stream that fails on a read.
# Measured over 2 x 500 and 1 x 5000 cycles: no growth at all (0 KiB); 200-cycle batches keep the test short
# and the same bound still catches 320 bytes a job.
BLOCK_KINDS = ["stream", "commit", "commit-active", "mirror", "mirror-cancel", "stream-error", "backup"]
BLOCK_WARMUP = 100
BLOCK_PER_BATCH = 200


def check_kind(binary, kind, warmup=WARMUP, per_batch=PER_BATCH):
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    tmp = tempfile.mkdtemp(prefix="blockd-jobrss-", dir=base)
    t0 = time.monotonic()
    try:
        figs = job_cycles.run_batches(binary, tmp, kind, warmup, 2, per_batch)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    warm, first, second = figs
    grow = second["VmRSS"] - first["VmRSS"]
    print(f"  {kind}: VmRSS warm-up {warm['VmRSS']} KiB, batch 1 +{first['VmRSS'] - warm['VmRSS']} KiB, "
          f"batch 2 +{grow} KiB ({grow * 1024 / per_batch:.0f} B/cycle), threads {warm['own_threads']} -> "
          f"{second['own_threads']}, {time.monotonic() - t0:.1f} s")
    assert grow < BOUND_KIB, f"{kind}: the resident set grew by {grow} KiB over {per_batch} job cycles " \
                             f"(bound {BOUND_KIB} KiB): {figs}"
    assert second["own_threads"] == warm["own_threads"], f"{kind}: threads left behind: {figs}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--blockd", required=True)
    args = ap.parse_args()
    if not os.path.exists("/proc/self/status"):
        print("no /proc: skipped")
        return 77
    failed = 0
    tools = all(shutil.which(t) for t in ("qemu-img", "qemu-io"))
    if not tools:
        print("qemu-img/qemu-io missing: the block-job kinds are skipped")
    runs = [(k, WARMUP, PER_BATCH) for k in KINDS] + \
        ([(k, BLOCK_WARMUP, BLOCK_PER_BATCH) for k in BLOCK_KINDS] if tools else [])
    for kind, warmup, per_batch in runs:
        try:
            check_kind(args.blockd, kind, warmup, per_batch)
        except Exception:
            traceback.print_exc()
            failed += 1
    print("FAILED" if failed else "ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Kernel speed at Mixtral's expert shapes (14336 x 4096 and 4096 x 14336), against the machine's read roofline.

    .venv/bin/python bench/bench_kernels.py [--threads 2] [--repeats 7] [--formats Q4_0,Q8_0,Q4_K]
        [--families avx2,portable] [--out FILE]

What it measures, each as the median of --repeats rounds (other people share this machine, so medians, and the
load average is recorded):
  roofline   the best plain read kernel here: sum of uint64 words over 8 buffers of 32 MiB (256 MiB, not cached)
  decode     one activation row times one expert matrix (expert_linear, 1 row), cycling over 8 stacked experts
  gather     the decode MoE call: 2 rows, 2 different experts in one call
  prefill    128 rows, all for one expert (the per-expert batch of a 512-token prompt): integer kernel and the
             decode-tiles-into-BLAS path, with plain float32 sgemm on the same shape as the yardstick
  pack       prepare() time per GB (the one-time repack at load; wall clock)
  families   every kernel family the CPU (as numba compiles for it) runs, or --families; a format a family does
             not pack runs "<family>/file layout" (the generic decoders). numba compiles for the host here, so
             an avx2 run on an AVX-512 machine may use AVX-512 encodings: run the whole process under
             quant.kernels.families.emulation_env("avx2") to measure a true AVX2 build.
Writes bench/results/kernels_<date>.json with the CPU model and the command line.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

import numba
import numpy as np
from numba import njit, prange

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from machine import describe_run
from mixlocal.quant import (
    QTensor,
    QType,
    kernels,
)
from mixlocal.quant.tensor import nbytes_for

N_EXPERTS = 8
SHAPES = [(14336, 4096), (4096, 14336)]
PREFILL_ROWS = 128

# f16 scale fields per block and a typical magnitude (random codes with these scales look like real weights)
_SCALE_FIELDS = {QType.Q4_0: ((0, 0.0025),), QType.Q8_0: ((0, 0.0003),), QType.Q2_K: ((80, 0.001), (82, 0.001)),
                 QType.Q3_K: ((108, 0.0003),), QType.Q4_K: ((0, 0.0004), (2, 0.0004)),
                 QType.Q5_K: ((0, 0.0002), (2, 0.0002)),
                 QType.Q6_K: ((208, 0.0005),)}


@njit(parallel=True, cache=True, fastmath=True)
def read_sum(words):
    """The plain read kernel: 8 independent uint64 accumulators per chunk so loads are the only limit."""
    n_chunks = 64
    step = words.shape[0] // n_chunks
    parts = np.zeros(n_chunks, np.uint64)
    for c in prange(n_chunks):
        acc = np.zeros(8, np.uint64)
        blk = words[c * step:(c + 1) * step].reshape(-1, 8)
        for i in range(blk.shape[0]):
            for j in range(8):
                acc[j] += blk[i, j]
        parts[c] = acc.sum()
    return parts.sum()


CLOCK = time.perf_counter


def median_time(fn, repeats: int, inner: int = 1) -> float:
    fn()  # warm up (JIT, page faults)
    times = []
    for _ in range(repeats):
        t0 = CLOCK()
        for _ in range(inner):
            fn()
        times.append((CLOCK() - t0) / inner)
    return float(np.median(times))


def random_stack(qtype: QType, n: int, k: int, rng) -> QTensor:
    shape = (N_EXPERTS, n, k)
    raw = rng.integers(0, 256, nbytes_for(qtype, shape), dtype=np.uint8)
    _, ts = {QType.Q4_0: (32, 18), QType.Q8_0: (32, 34), QType.Q2_K: (256, 84), QType.Q3_K: (256, 110),
             QType.Q4_K: (256, 144), QType.Q5_K: (256, 176), QType.Q6_K: (256, 210)}[qtype]
    blocks = raw.reshape(-1, ts)
    for off, mag in _SCALE_FIELDS[qtype]:
        blocks[:, off:off + 2] = (rng.random((blocks.shape[0], 1)) * mag + mag / 2).astype(np.float16).view(np.uint8)
    return QTensor(qtype, shape, raw)




def blas_info() -> str:
    try:
        from threadpoolctl import threadpool_info
        return "; ".join(f"{i.get('internal_api')} {i.get('version')} {i.get('architecture')} threads={i.get('num_threads')}"
                         for i in threadpool_info() if i.get("user_api") == "blas")
    except ImportError:
        return "threadpoolctl not installed"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--formats", default="Q4_0,Q8_0,Q4_K,Q5_K,Q6_K")
    ap.add_argument("--families", default=",".join(kernels.host_families()),
                    help="comma-separated kernel families (default: every one this CPU runs)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--cpu-time", action="store_true",
                    help="time with process CPU time instead of the wall clock: on a crowded machine this shows what "
                         "one thread would do alone (use with --threads 1)")
    args = ap.parse_args()
    if args.cpu_time:
        global CLOCK
        CLOCK = time.process_time
    numba.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    result = {
        **describe_run(), "threads": args.threads, "repeats": args.repeats,
        "clock": "process CPU time" if args.cpu_time else "wall",
        "numba": numba.__version__, "numpy": np.__version__, "blas": blas_info(),
        "env": {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS")
                if k in os.environ},
        "loadavg_start": os.getloadavg(),
    }

    bufs = [rng.integers(0, 1 << 62, (32 << 20) // 8, dtype=np.uint64) for _ in range(8)]
    t = median_time(lambda bufs=bufs: [read_sum(b) for b in bufs], args.repeats)
    result["roofline_read_GBps"] = round(sum(b.nbytes for b in bufs) / t / 1e9, 2)
    # the roofline is the best read rate seen: the decode kernels below may read faster than this plain loop
    print(f"read roofline: {result['roofline_read_GBps']} GB/s", flush=True)
    del bufs

    result["formats"] = {}
    for name in args.formats.split(","):
        qtype = QType[name]
        fr = result["formats"][name] = {}
        for n, k in SHAPES:
            key = f"{n}x{k}"
            src = random_stack(qtype, n, k, rng)
            mat_bytes = src.nbytes / N_EXPERTS
            x1 = rng.standard_normal((1, k)).astype(np.float32)
            x2 = rng.standard_normal((2, k)).astype(np.float32)
            xp = rng.standard_normal((PREFILL_ROWS, k)).astype(np.float32)
            ids = np.zeros(PREFILL_ROWS, np.int64)
            macs = PREFILL_ROWS * n * k
            fr[key] = {"matrix_MB": round(mat_bytes / 1e6, 1)}
            for family in args.families.split(","):
                label = family if qtype in kernels.packed_types(family) else f"{family}/file layout"
                kernels.prepare(random_stack(qtype, 64, k, rng), family=family)  # compile (or load) pack first
                t0 = time.perf_counter()
                w = kernels.prepare(src, family=family)
                t_pack = time.perf_counter() - t0
                t_dec = median_time(lambda w=w, x1=x1: [kernels.expert_linear(w, x1, np.array([e])) for e in range(N_EXPERTS)],
                                    args.repeats) / N_EXPERTS
                t_gat = median_time(lambda w=w, x2=x2: [kernels.expert_linear(w, x2, np.array([e, (e + 3) % N_EXPERTS]))
                                             for e in range(N_EXPERTS)], args.repeats) / N_EXPERTS
                t_pre = median_time(lambda w=w, xp=xp, ids=ids: kernels.expert_linear(w, xp, ids), max(3, args.repeats // 2))
                packed = w is not src
                fr[key][label] = {
                    "pack_s": round(t_pack, 3) if packed else None,
                    "pack_GBps": round(w.nbytes / t_pack / 1e9, 2) if packed else None,
                    "decode_ms": round(t_dec * 1e3, 3), "decode_GBps": round(mat_bytes / t_dec / 1e9, 2),
                    "gather2_ms": round(t_gat * 1e3, 3), "gather2_GBps": round(2 * mat_bytes / t_gat / 1e9, 2),
                    f"prefill{PREFILL_ROWS}_int_GMACps": round(macs / t_pre / 1e9, 1),
                }
                if packed and w.layout == "rows":
                    out = np.empty((PREFILL_ROWS, n), np.float32)
                    t_tile = median_time(lambda w=w, xp=xp, out=out: kernels._packed_tiles(w, 0, xp, out),
                                         max(3, args.repeats // 2))
                    fr[key][label][f"prefill{PREFILL_ROWS}_tiles_blas_GMACps"] = round(macs / t_tile / 1e9, 1)
                del w
            del src
            wf = rng.standard_normal((n, k)).astype(np.float32)
            t_blas = median_time(lambda xp=xp, wf=wf: xp @ wf.T, max(3, args.repeats // 2))
            del wf
            fr[key][f"sgemm_f32_{PREFILL_ROWS}_GMACps"] = round(macs / t_blas / 1e9, 1)
            print(name, key, fr[key], flush=True)
    result["roofline_best_kernel_GBps"] = max(
        [result["roofline_read_GBps"]] + [lay["decode_GBps"] for f in result["formats"].values() for shape in f.values()
                                          for lay in shape.values() if isinstance(lay, dict)])
    result["loadavg_end"] = os.getloadavg()
    busy = max(result["loadavg_start"][0], result["loadavg_end"][0])
    if busy > 1.5 * (os.cpu_count() or 1) - args.threads + 1:
        result["note"] = (f"machine busy (load average {busy:.1f} on {os.cpu_count()} cores): with several threads, "
                          "wall-clock figures measure the scheduler, not the kernels; compare --threads 1 --cpu-time")
    out_path = Path(args.out or Path(__file__).parent / "results" / f"kernels_{dt.date.today().isoformat()}.json")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print("wrote", out_path)


if __name__ == "__main__":
    main()

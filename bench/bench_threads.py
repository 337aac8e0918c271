"""Where a second thread starts to pay: kernels.linear on 1 and on N threads across matrix sizes, quiet and crowded.

    .venv/bin/python bench/bench_threads.py [--threads 2] [--repeats 9] [--out FILE]

For each size (rows x cols, activation rows T) and weight format (BF16 through the file-layout kernels, Q4_0 through
the packed integer kernels) it times one call on 1 thread and on --threads threads, medians of --repeats rounds of
enough calls to last ~20 ms. It does this twice: on the machine as it is ("quiet"), and with one busy-looping
process per core competing for every core ("crowded"), which is what a laptop running other work, or a shared
machine, looks like to a parallel region: every join waits for the peer the scheduler has put aside.

kernels.SERIAL_MAX_MACS (the size below which the kernels stay on one thread) is read off this table: the smallest
size at which N threads beat 1 quietly by a clear margin. Writes bench/results/threads_<date>.json.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

import numba
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from machine import describe_run
from mixlocal.quant import QTensor, QType, formats, kernels

# (rows, cols, T): the tiny test model's matrices up to one Mixtral attention matrix and an expert
SIZES = [(256, 256, 1), (512, 256, 1), (1024, 1024, 1), (2048, 1024, 1), (4096, 1024, 1), (4096, 4096, 1),
         (14336, 4096, 1), (256, 256, 16), (1024, 1024, 16), (4096, 4096, 16)]


def _weight(qtype: QType, n: int, k: int, rng) -> QTensor:
    w = (rng.standard_normal((n, k)) * 0.02).astype(np.float32)
    return QTensor(qtype, (n, k), formats.quantize(qtype, w).reshape(-1))


def _time_call(fn, repeats: int) -> float:
    fn()
    t0 = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t0, 1e-6)
    inner = max(1, int(0.02 / one))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


def measure(threads: int, repeats: int) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    saved = kernels.SERIAL_MAX_MACS
    kernels.SERIAL_MAX_MACS = 0  # time the parallel path itself at every size
    try:
        for qtype in (QType.BF16, QType.Q4_0):
            for n, k, t in SIZES:
                w = kernels.prepare(_weight(qtype, n, k, rng))
                x = rng.standard_normal((t, k)).astype(np.float32)
                out = np.empty((t, n), np.float32)
                res = {"format": qtype.name, "rows": n, "cols": k, "T": t, "macs": n * k * t}
                for nt in (1, threads):
                    numba.set_num_threads(nt)
                    call = lambda w=w, x=x, out=out: kernels.linear(w, x, out)
                    res[f"us_{nt}t"] = round(_time_call(call, repeats) * 1e6, 2)
                res["speedup"] = round(res["us_1t"] / res[f"us_{threads}t"], 2)
                rows.append(res)
                print(res, flush=True)
    finally:
        kernels.SERIAL_MAX_MACS = saved
        numba.set_num_threads(threads)
    return rows


def _spin(stop) -> None:
    while not stop.is_set():
        pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))

    print("quiet ...", flush=True)
    quiet = {"loadavg_before": os.getloadavg(), "rows": measure(args.threads, args.repeats)}
    print("crowded (one busy process per core) ...", flush=True)
    stop = mp.Event()
    spinners = [mp.Process(target=_spin, args=(stop,), daemon=True) for _ in range(os.cpu_count() or 2)]
    for p in spinners:
        p.start()
    try:
        crowded = {"loadavg_before": os.getloadavg(), "rows": measure(args.threads, args.repeats)}
    finally:
        stop.set()
        for p in spinners:
            p.join()

    result = {
        **describe_run(),
        "numba_threading_layer": numba.threading_layer(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "threads": args.threads, "repeats": args.repeats,
        "serial_max_macs_in_code": kernels.SERIAL_MAX_MACS,
        "quiet": quiet, "crowded": crowded,
    }
    out = args.out or ROOT / "bench" / "results" / f"threads_{dt.date.today().isoformat()}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""OpenMP's wait policy for numba's threads: spinning (libgomp's default) against passive waits, small and large model.

    .venv/bin/python bench/bench_omp_wait.py [--threads 2] [--rounds 5] [--mixtral-rounds 3] [--out FILE]

Each policy runs in fresh processes (libgomp reads its environment once, when it loads):
  spin     GOMP_SPINCOUNT=300000, libgomp's own default: team threads spin ~0.1-1 ms after each parallel region
  passive  OMP_WAIT_POLICY=PASSIVE: team threads sleep at once
  short    GOMP_SPINCOUNT=10000, what the numba backend sets unless the user set either variable
Two workloads: the tiny test model (tests/conftest.py TINY, bf16, so prefill goes through BLAS between numba
kernels): 128-token prefill and 20 decode steps, medians of --rounds; and mixlocal alone on the 4-block Q4_0
Mixtral-shape slice through bench/bench_mixtral_shape.py (medians of --mixtral-rounds). Writes
bench/results/omp_wait_policy_<date>.json.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import describe_run

ROOT = Path(__file__).resolve().parents[1]
POLICIES = {"spin": {"GOMP_SPINCOUNT": "300000"}, "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
            "short": {"GOMP_SPINCOUNT": "10000"}}


def tiny_worker(threads: int, rounds: int) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT))
    from conftest import make_hf_checkpoint

    from mixlocal import engine
    with tempfile.TemporaryDirectory() as tmp:
        llm = engine.load(make_hf_checkpoint(Path(tmp) / "tiny"), n_ctx=256, n_threads=threads, kv_type="f32")
        prompt = [1] + list(range(100, 227))
        llm.eval(prompt[:16], logits="last")
        prefill, decode = [], []
        for _ in range(rounds):
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(prompt, logits="last")
            t1 = time.perf_counter()
            for i in range(20):
                llm.eval([5 + i], logits="last")
            prefill.append((t1 - t0) * 1e3)
            decode.append((time.perf_counter() - t1) / 20 * 1e3)
    return {"prefill_128_ms": round(statistics.median(prefill), 2), "decode_ms": round(statistics.median(decode), 3),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "gomp_spincount": os.environ.get("GOMP_SPINCOUNT")}


def _env(policy: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    return {**env, **POLICIES[policy], "NUMBA_CACHE_DIR": str(ROOT / ".numba_cache")}


def run_tiny(policy: str, args) -> dict:
    r = subprocess.run([sys.executable, __file__, "--worker", "--threads", str(args.threads), "--rounds",
                        str(args.rounds)], capture_output=True, text=True, env=_env(policy), check=False)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    return json.loads(lines[-1][7:]) if lines else {"error": r.stderr[-1500:]}


def run_mixtral(policy: str, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        cmd = [sys.executable, str(ROOT / "bench" / "bench_mixtral_shape.py"), "--types", "Q4_0", "--engines",
               "mixlocal", "--rounds", str(args.mixtral_rounds), "--threads", str(args.threads), "--no-startup",
               "--no-profile", "--out", str(out)]
        r = subprocess.run(cmd, capture_output=True, text=True, env=_env(policy), check=False)
        if r.returncode or not out.exists():
            return {"error": r.stderr[-1500:]}
        d = json.loads(out.read_text())
    runs = d["runs"]["mixlocal"]
    return {"prefill_tps_median": d["median"]["mixlocal"]["prefill_tps"],
            "decode_tps_median": d["median"]["mixlocal"]["decode_tps"],
            "runs": [(round(x["prefill_tps"], 1), round(x["decode_tps"], 1)) for x in runs]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--mixtral-rounds", type=int, default=3, help="0 skips the Mixtral-shape runs")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(tiny_worker(args.threads, args.rounds)), flush=True)
        return 0
    result = {**describe_run(), "threads": args.threads,
              "loadavg_start": os.getloadavg(), "policies": POLICIES, "tiny": {}, "mixtral_shape_q4_0_4blk": {}}
    for policy in POLICIES:
        print(f"{policy}: tiny model ...", flush=True)
        result["tiny"][policy] = run_tiny(policy, args)
        print("   ", result["tiny"][policy], flush=True)
    if args.mixtral_rounds:
        for policy in POLICIES:
            print(f"{policy}: Mixtral-shape Q4_0 slice ...", flush=True)
            result["mixtral_shape_q4_0_4blk"][policy] = run_mixtral(policy, args)
            print("   ", result["mixtral_shape_q4_0_4blk"][policy], flush=True)
    result["loadavg_end"] = os.getloadavg()
    out = args.out or ROOT / "bench" / "results" / f"omp_wait_policy_{dt.date.today().isoformat()}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

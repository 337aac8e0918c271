"""Prefill and decode tokens/s of mixlocal against transformers on the same tiny Mixtral, in the same run.

    .venv/bin/python bench/bench_core.py [--rounds 5] [--prompt 128] [--decode 32] [--threads 2] [--out FILE]

Each round runs each engine in a fresh process of its own, alternating, and medians over rounds are reported (the
machine is shared and noisy). One process per engine matters here: torch's and numba's OpenMP runtimes each keep
their own team threads, and in one process the idle team of one spins on the cores the other needs. transformers
runs float32 on the same bf16 checkpoint; mixlocal reads the bf16 weights as they are stored.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from machine import describe_run


def _prompt(n: int) -> list[int]:
    return [1] + np.random.default_rng(0).integers(3, 32000, n - 1).tolist()


def run_mixlocal(hf_dir: Path, n_prompt: int, n_decode: int, threads: int) -> tuple[float, float]:
    from mixlocal import engine
    llm = engine.load(hf_dir, n_ctx=n_prompt + n_decode + 8, n_threads=threads, kv_type="f32")
    prompt = _prompt(n_prompt)

    def once(p, n):
        llm.reset()
        t0 = time.perf_counter()
        tok = int(np.argmax(llm.eval(p, logits="last")[-1]))
        t1 = time.perf_counter()
        for _ in range(n):
            tok = int(np.argmax(llm.eval([tok], logits="last")[-1]))
        return len(p) / (t1 - t0), n / (time.perf_counter() - t1)
    once(prompt[:16], 2)  # JIT and first-touch warm-up, not timed
    return once(prompt, n_decode)


def run_transformers(hf_dir: Path, n_prompt: int, n_decode: int, threads: int) -> tuple[float, float]:
    import torch
    from transformers import MixtralForCausalLM
    torch.set_num_threads(threads)
    model = MixtralForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    prompt = _prompt(n_prompt)

    def once(p, n):
        ids = torch.tensor([p])
        with torch.no_grad():
            t0 = time.perf_counter()
            out = model(ids, use_cache=True, logits_to_keep=1)
            t1 = time.perf_counter()
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            for _ in range(n):
                out = model(tok, past_key_values=past, use_cache=True)
                past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        return len(p) / (t1 - t0), n / (time.perf_counter() - t1)
    once(prompt[:16], 2)
    return once(prompt, n_decode)


WORKERS = {"mixlocal": run_mixlocal, "transformers_f32": run_transformers}


def run_worker(engine_name: str, hf_dir: Path, args) -> tuple[float, float]:
    cmd = [sys.executable, __file__, "--worker", engine_name, "--hf-dir", str(hf_dir), "--prompt", str(args.prompt),
           "--decode", str(args.decode), "--threads", str(args.threads)]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=1800)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if r.returncode or not lines:
        raise SystemExit(f"{engine_name} worker failed ({r.returncode}): {r.stderr[-2000:]}")
    return tuple(json.loads(lines[-1][7:]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "core_tiny_vs_transformers.json")
    ap.add_argument("--worker", choices=sorted(WORKERS), default=None, help=argparse.SUPPRESS)
    ap.add_argument("--hf-dir", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(WORKERS[args.worker](args.hf_dir, args.prompt, args.decode, args.threads)))
        return 0

    from conftest import TINY, make_hf_checkpoint
    runs: dict[str, list] = {name: [] for name in WORKERS}
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = make_hf_checkpoint(Path(tmp) / "tiny")
        for r in range(args.rounds):
            names = list(WORKERS) if r % 2 == 0 else list(WORKERS)[::-1]
            for name in names:
                runs[name].append(run_worker(name, hf_dir, args))
                print(f"round {r + 1}: {name} prefill/decode tok/s {runs[name][-1]}", flush=True)

    def med(name, i):
        return statistics.median(row[i] for row in runs[name])
    ours, theirs = "mixlocal", "transformers_f32"
    result = {
        **describe_run(), "threads": args.threads, "load_average_at_end": os.getloadavg(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "model": {"kind": "tiny random Mixtral (tests/conftest.py TINY)", **TINY},
        "prompt_tokens": args.prompt, "decode_tokens": args.decode, "rounds": args.rounds,
        "process_per_engine_and_round": True,
        ours: {"prefill_tps": med(ours, 0), "decode_tps": med(ours, 1)},
        theirs: {"prefill_tps": med(theirs, 0), "decode_tps": med(theirs, 1)},
        "ratio": {"prefill": med(ours, 0) / med(theirs, 0), "decode": med(ours, 1) / med(theirs, 1)},
        "raw": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in (ours, theirs, "ratio")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

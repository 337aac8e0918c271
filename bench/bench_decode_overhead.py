"""Per-token decode time of mixlocal against llama.cpp on the embedded tiny default model: the overhead outside the
weight kernels.

    .venv/bin/python bench/bench_decode_overhead.py [--rounds 5] [--reps 3] [--prompt 16] [--decode 64]
        [--threads 2] [--out FILE]

The tiny model (4 blocks, width 256, q8_0) does so little arithmetic per block that its decode time is mostly what
each engine spends around the kernels: Python, dispatch, allocation, thread wake-ups. Both engines read the same
GGUF file with an f16 KV cache and get the same fixed token ids (a 16-token prompt, then single-token evals). Each
round runs each engine in a fresh process of its own, alternating which goes first; within a process the
prompt + decode sequence runs --reps times after a warm-up and the fastest rep counts (the machine is shared: a
slower rep is other load, not the engine). Medians over rounds are reported, with the load average at start and end.

per_block_overhead_ms = (mixlocal ms/token - llama.cpp ms/token) / blocks: how much more mixlocal spends per
block than llama.cpp, which is mostly overhead because both run int8 dot-product kernels on the same bytes.
--engines mixlocal,mixlocal_op_by_op (either model) compares the one-token decode step with the T-token forward
pass run for one token, the op-by-op path it replaced.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from machine import describe_run

ENGINES = ("mixlocal", "llama")


def _ids(n_prompt: int, n_decode: int) -> tuple[list[int], list[int]]:
    import numpy as np
    rng = np.random.default_rng(0)
    return [1] + rng.integers(3, 32000, n_prompt - 1).tolist(), rng.integers(3, 32000, n_decode).tolist()


def _measure(prefill, step, prompt: list[int], decode: list[int], reps: int) -> dict:
    prefill(prompt)  # warm-up: JIT, first touch of weights and cache pages
    for tok in decode[:4]:
        step(tok)
    per_token = []
    for _ in range(reps):
        prefill(prompt)
        t0 = time.perf_counter()
        for tok in decode:
            step(tok)
        per_token.append((time.perf_counter() - t0) / len(decode) * 1e3)
    return {"decode_ms_per_token": min(per_token), "reps_ms_per_token": per_token}


def run_mixlocal(path: str, threads: int, prompt: list[int], decode: list[int], reps: int,
                 op_by_op: bool = False) -> dict:
    import numpy as np

    from mixlocal import engine
    llm = engine.load(path, n_ctx=len(prompt) + len(decode) + 64, n_threads=threads)
    if op_by_op:
        llm.backend.fused_decode = False

    def prefill(ids):
        llm.reset()
        llm.eval(ids, logits="last")

    def step(tok):
        return int(np.argmax(llm.eval([tok], logits="last")[-1]))
    return {"blocks": llm.config.n_layers, **_measure(prefill, step, prompt, decode, reps)}


def run_llama(path: str, threads: int, prompt: list[int], decode: list[int], reps: int) -> dict:
    import llama_cpp
    import numpy as np
    llm = llama_cpp.Llama(model_path=path, n_ctx=len(prompt) + len(decode) + 64, n_threads=threads,
                          n_threads_batch=threads, logits_all=False, verbose=False, seed=0)
    n_vocab = llm.n_vocab()

    def prefill(ids):
        llm.reset()
        llm.eval(ids)

    def step(tok):
        llm.eval([tok])
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))))
    return {"llama_cpp": llama_cpp.__version__, **_measure(prefill, step, prompt, decode, reps)}


def run_mixlocal_op_by_op(path: str, threads: int, prompt: list[int], decode: list[int], reps: int) -> dict:
    return run_mixlocal(path, threads, prompt, decode, reps, op_by_op=True)


WORKERS = {"mixlocal": run_mixlocal, "llama": run_llama, "mixlocal_op_by_op": run_mixlocal_op_by_op}


def run_worker(name: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--model", str(args.model), "--prompt", str(args.prompt),
           "--decode", str(args.decode), "--threads", str(args.threads), "--reps", str(args.reps)]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=1800)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if r.returncode or not lines:
        raise SystemExit(f"{name} worker failed ({r.returncode}): {r.stderr[-2000:]}")
    return json.loads(lines[-1][7:])


def llama_status(model: Path) -> str | None:
    """None if llama_cpp imports and loads the model in a subprocess, else why not (a prebuilt wheel can die with an
    illegal instruction on a CPU it was not built for)."""
    code = f"import llama_cpp; llama_cpp.Llama(model_path={str(model)!r}, n_ctx=64, verbose=False).eval([1]); print('ok')"
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    except subprocess.TimeoutExpired:
        return "loading the model in llama_cpp timed out"
    if r.returncode != 0 or "ok" not in r.stdout:
        return f"llama_cpp does not load the model (exit {r.returncode}): {r.stderr.strip()[-300:]}"
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--model", type=Path, default=ROOT / "engine" / "data" / "default" / "model.gguf")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--worker", choices=sorted(WORKERS), default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    prompt, decode = _ids(args.prompt, args.decode)
    if args.worker:
        out = WORKERS[args.worker](str(args.model), args.threads, prompt, decode, args.reps)
        print("RESULT " + json.dumps(out))
        return 0

    engines = [e for e in args.engines.split(",") if e]
    unknown = set(engines) - set(WORKERS)
    if unknown:
        raise SystemExit(f"unknown engines: {sorted(unknown)}")
    llama_skip = llama_status(args.model) if "llama" in engines else None
    if llama_skip:
        print("llama.cpp skipped:", llama_skip, flush=True)
        engines.remove("llama")
    load_start = os.getloadavg()
    runs: dict[str, list] = {name: [] for name in engines}
    for r in range(args.rounds):
        for name in (engines if r % 2 == 0 else engines[::-1]):
            runs[name].append(run_worker(name, args))
            print(f"round {r + 1}: {name} {runs[name][-1]['decode_ms_per_token']:.3f} ms/token", flush=True)

    med = {name: statistics.median(x["decode_ms_per_token"] for x in rows) for name, rows in runs.items()}
    result = {**describe_run(), "load_average_at_start": load_start, "load_average_at_end": os.getloadavg(),
              "model": str(args.model.relative_to(ROOT) if args.model.is_relative_to(ROOT) else args.model),
              "threads": args.threads, "prompt_tokens": args.prompt, "decode_tokens": args.decode,
              "rounds": args.rounds, "reps_per_round": args.reps, "process_per_engine_and_round": True,
              "llama_cpp": llama_skip or (runs["llama"][0]["llama_cpp"] if "llama" in runs else "not run"),
              "median_decode_ms_per_token": med}
    if "mixlocal" in med and "llama" in med:
        blocks = runs["mixlocal"][0]["blocks"]
        result["ratio_mixlocal_over_llama"] = med["mixlocal"] / med["llama"]
        result["per_block_overhead_ms"] = (med["mixlocal"] - med["llama"]) / blocks
    if "mixlocal" in med and "mixlocal_op_by_op" in med:
        result["op_by_op_minus_step_per_block_ms"] = ((med["mixlocal_op_by_op"] - med["mixlocal"])
                                                      / runs["mixlocal"][0]["blocks"])
    result["raw"] = runs
    out = args.out or ROOT / "bench" / "results" / f"decode_overhead_{dt.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("median_decode_ms_per_token", "ratio_mixlocal_over_llama",
                                             "per_block_overhead_ms", "op_by_op_minus_step_per_block_ms",
                                             "load_average_at_start",
                                             "load_average_at_end") if k in result}, indent=2))
    print("written", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

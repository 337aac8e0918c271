"""Long context at Mixtral-8x7B's real shapes: prefill and decode speed at 1K and 8K positions (32K on request) and
peak RSS at each, mixlocal against llama.cpp on the same GGUF with the same n_ctx.

    .venv/bin/python bench/bench_long_context.py [--blocks 2] [--contexts 1024,8192] [--with-32k] [--rounds 3]
        [--threads 2] [--decode 32] [--kv-type f16] [--engines mixlocal,llama] [--out FILE]

The model is a GGUF slice written by bench/make_mixtral_slice.py (Mixtral's exact tensor shapes, random sane Q4_0
blocks, N blocks; kept in --data-dir and written once). Attention's cost per block is the real one, so the share of
time that long context adds is what a 32-block model sees; only the output head weighs more on a slice. Both engines
run the last block for the final prompt token only (its K and V for all), so a 1-block slice would measure almost
no prefill: 2 blocks is the smallest honest slice, and its prefill tok/s are about twice a full block's.

Each run is a fresh process for one engine and one context length N: load with n_ctx = N + decode + 64, warm up
(a 16-token prefill and two decode steps), reset, prefill N tokens (logits for the last position only, as
generation does), then decode `--decode` tokens one at a time at positions N, N+1, ... . Token ids are the same
for every engine. Rounds alternate the engines (the order rotates each round) and medians over rounds are reported,
because other people share this machine: the load average is recorded with every run.

llama.cpp runs with flash attention on (its CLI default "auto" picks it on CPU; without it, its compute buffer
holds an n_ctx x n_ubatch score matrix per head, 2 GiB at 32K) and its default Q4_0 repack; `llama_nofa` and
`llama_norepack` are the other settings. Peak RSS is VmHWM of the worker; for mixlocal the worker also reports
RSS after warm-up, the KV bytes in use and the attention time, so that peak = weights + KV + scratch can be checked.

Writes bench/results/long_context_<type>_<N>blk_<kv>_<date>.json with the CPU model, the command and every run.

    .venv/bin/python bench/bench_long_context.py --kernel [--rounds 5]

times the attention kernel alone at Mixtral's head shape (32 query and 8 KV heads of 128) for every KV format:
one query over 1K, 8K and 32K cached positions (decode) with 1 and 2 threads, and a 512-query chunk after 7.5K
positions (prefill). Writes bench/results/long_context_kernel_<date>.json.
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

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))  # bench/ is not a package: make_mixtral_slice is found through sys.path

from machine import describe_run
from make_mixtral_slice import MIXTRAL, write_slice

ENGINES = ("mixlocal", "llama", "llama_nofa", "llama_norepack")
DEFAULT_DATA_DIR = Path(os.environ.get("MIXLOCAL_BENCH_DIR", Path.home() / ".cache" / "mixlocal" / "bench"))
LLAMA_KV_TYPES = {"f32": 0, "f16": 1, "q8_0": 8}  # ggml type ids
WORKER_TIMEOUT_S = 4 * 3600


# ---------------------------------------------------------------------------------------------------------------
# machine and process
# ---------------------------------------------------------------------------------------------------------------



def status_bytes(*keys: str) -> dict:
    """Fields of /proc/self/status in bytes (VmHWM is the peak RSS)."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in keys:
                out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def tokens(n_prompt: int, n_decode: int, vocab: int) -> tuple[list[int], list[int]]:
    rng = np.random.default_rng(0)
    return [1] + rng.integers(3, vocab, n_prompt - 1).tolist(), rng.integers(3, vocab, n_decode).tolist()


# ---------------------------------------------------------------------------------------------------------------
# workers: one engine, one context length, one process; print one RESULT line
# ---------------------------------------------------------------------------------------------------------------

def _timed_run(prefill, step, prompt, decode) -> dict:
    prefill(prompt[:16])  # warm-up: every kernel path, the weights' pages
    step(decode[0])
    step(decode[1])
    before = status_bytes("VmRSS")["VmRSS"] if sys.platform.startswith("linux") else 0
    w0, c0 = time.perf_counter(), time.process_time()
    prefill(prompt)
    w1, c1 = time.perf_counter(), time.process_time()
    for tok in decode:
        step(tok)
    w2, c2 = time.perf_counter(), time.process_time()
    n, d = len(prompt), len(decode)
    return {"rss_after_warmup": before, "prefill_s": w1 - w0, "prefill_tps": n / (w1 - w0),
            "prefill_cpu_s": c1 - c0, "decode_s": w2 - w1, "decode_tps": d / (w2 - w1), "decode_cpu_s": c2 - c1,
            **{k.lower(): v for k, v in status_bytes("VmHWM", "VmRSS").items()}}


def run_mixlocal(path: str, threads: int, kv_type: str, prompt: list[int], decode: list[int]) -> dict:
    from mixlocal.engine.backends.numba import ops as numba_ops

    from mixlocal import engine

    attention_s = [0.0]
    kernel = numba_ops.attention

    def timed_attention(*a, **kw):  # one Python entry per layer and call: the wrapper costs about a microsecond
        t = time.perf_counter()
        try:
            return kernel(*a, **kw)
        finally:
            attention_s[0] += time.perf_counter() - t
    numba_ops.attention = timed_attention
    llm = engine.load(path, n_ctx=len(prompt) + len(decode) + 64, n_threads=threads, kv_type=kv_type)
    marks = {}

    def prefill(ids):
        llm.reset()
        attention_s[0] = 0.0
        out = int(np.argmax(llm.eval(ids, logits="last")[-1]))
        marks["prefill_attention_s"] = attention_s[0]
        marks["kv_bytes"] = llm.cache.bytes_in_use
        attention_s[0] = 0.0
        return out

    def step(tok):
        return int(np.argmax(llm.eval([tok], logits="last")[-1]))
    out = _timed_run(prefill, step, prompt, decode)
    plan = numba_ops.attention_plan(512, llm.config.n_heads, llm.config.n_kv_heads, llm.config.head_dim,
                                    len(prompt), threads)
    return out | marks | {"decode_attention_s": attention_s[0], "kv_bytes_per_token": llm.cache.bytes_per_token,
                          "kv_bytes_final": llm.cache.bytes_in_use, "attention_scratch_bytes": plan["scratch_bytes"]}


def run_llama(path: str, threads: int, kv_type: str, prompt: list[int], decode: list[int], flash: bool,
              repack: bool) -> dict:
    import llama_cpp
    import llama_cpp.llama_cpp as C

    if not repack:  # llama.cpp's --no-repack; llama-cpp-python has no keyword, Llama.__init__ starts from these
        default_params = C.llama_model_default_params

        def no_repack_params():
            p = default_params()
            p.use_extra_bufts = False
            return p
        C.llama_model_default_params = no_repack_params
    llm = llama_cpp.Llama(model_path=path, n_ctx=len(prompt) + len(decode) + 64, n_batch=512, n_ubatch=512,
                          n_threads=threads, n_threads_batch=threads, flash_attn=flash,
                          type_k=LLAMA_KV_TYPES[kv_type], type_v=LLAMA_KV_TYPES[kv_type], verbose=False, seed=0)
    n_vocab = llm.n_vocab()

    def argmax_last():
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))))

    def prefill(ids):
        llm.reset()
        llm.eval(ids)
        return argmax_last()

    def step(tok):
        llm.eval([tok])
        return argmax_last()
    return _timed_run(prefill, step, prompt, decode) | {"flash_attn": flash, "repack": repack}


def worker_main(args) -> int:
    prompt, decode = tokens(args.n, args.decode, MIXTRAL.vocab)
    if args.worker == "mixlocal":
        out = run_mixlocal(args.file, args.threads, args.kv_type, prompt, decode)
    else:
        out = run_llama(args.file, args.threads, args.kv_type, prompt, decode, flash=args.worker != "llama_nofa",
                        repack=args.worker != "llama_norepack")
    print("RESULT " + json.dumps(out), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# the kernel alone
# ---------------------------------------------------------------------------------------------------------------

def parallel_control(rounds: int) -> dict:
    """An embarrassingly parallel loop on 1 and 2 threads: if 2 are not faster here, the machine is not giving this
    process two cores at once, and no kernel's 2-thread time can show scaling."""
    import numba
    from numba import njit, prange

    @njit(parallel=True)
    def spin(n):
        out = np.zeros(2)
        for w in prange(2):
            x = 0.0
            for _ in range(n):
                x = x * 0.9999999 + 1.0
            out[w] = x
        return out

    times = {}
    for threads in (1, 2):
        numba.set_num_threads(threads)
        spin(10)
        runs = []
        for _ in range(rounds):
            t = time.perf_counter()
            spin(20_000_000)
            runs.append(time.perf_counter() - t)
        times[f"t{threads}_ms_best"] = round(min(runs) * 1e3, 1)
    return times


def kernel_bench(rounds: int) -> dict:
    import numba
    from mixlocal.engine.backends.numba import ops
    from mixlocal.engine.backends.numba.cache import KVCache
    from mixlocal.engine.config import ModelConfig

    n_heads, n_kv, dh, n_ctx = MIXTRAL.n_heads, MIXTRAL.n_kv_heads, MIXTRAL.head_dim, 32768
    cfg = ModelConfig(vocab_size=MIXTRAL.vocab, dim=MIXTRAL.dim, n_layers=1, n_heads=n_heads, n_kv_heads=n_kv,
                      head_dim=dh, ffn_dim=MIXTRAL.ffn, n_experts=MIXTRAL.n_experts,
                      n_experts_used=MIXTRAL.n_experts_used)
    rng = np.random.default_rng(0)
    scale = 1 / np.sqrt(dh)
    out = {}
    for kv_type in ("f16", "q8_0", "f32"):
        cache = KVCache(cfg, n_ctx, kv_type)
        for p0 in range(0, n_ctx, 4096):  # keys and values of a real spread, written in chunks
            x = rng.standard_normal((4096, n_kv, dh), dtype=np.float32)
            cache.store(0, p0, x * 2, x)
        k, v = cache.k[0], cache.v[0]
        rows = {}
        for label, n_tok, pos0 in [("decode_1k", 1, 1023), ("decode_8k", 1, 8191), ("decode_32k", 1, n_ctx - 1),
                                   ("prefill_512_at_7680", 512, 7680)]:
            q = rng.standard_normal((n_tok, n_heads, dh), dtype=np.float32)
            res = np.empty_like(q)
            for threads in ((1, 2) if n_tok == 1 else (2,)):
                numba.set_num_threads(threads)
                ops.attention(q, k, v, pos0, scale, res)  # compile, warm
                wall, cpu = [], []
                for _ in range(rounds):
                    w, c = time.perf_counter(), time.process_time()
                    ops.attention(q, k, v, pos0, scale, res)
                    wall.append(time.perf_counter() - w)
                    cpu.append(time.process_time() - c)
                pairs = n_heads * (n_tok * pos0 + n_tok * (n_tok + 1) / 2)  # (query head, visible key) pairs
                read = 2 * n_kv * (pos0 + n_tok) * k.shape[2] * k.itemsize
                rows[f"{label}_t{threads}"] = {
                    "ms_median": round(statistics.median(wall) * 1e3, 3), "ms_best": round(min(wall) * 1e3, 3),
                    "cpu_ms_best": round(min(cpu) * 1e3, 3),
                    "cache_GBps_best": round(read / min(wall) / 1e9, 2),
                    "GMAC_per_s_best": round(pairs * 2 * dh / min(wall) / 1e9, 2)}
                print(kv_type, label, threads, rows[f"{label}_t{threads}"], flush=True)
        out[kv_type] = rows
        del cache, k, v
    return out


# ---------------------------------------------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------------------------------------------

def run_worker(kind: str, n: int, path: Path, args) -> dict:
    env = {**os.environ, "OPENBLAS_NUM_THREADS": str(args.threads), "OMP_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--file", str(path), "--n", str(n),
           "--threads", str(args.threads), "--decode", str(args.decode), "--kv-type", args.kv_type]
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=WORKER_TIMEOUT_S, check=False)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if r.returncode != 0 or not lines:
        return {"engine": kind, "n": n, "error": f"exit {r.returncode}: {(r.stderr or r.stdout)[-1500:]}"}
    out = json.loads(lines[-1][len("RESULT "):])
    return {"engine": kind, "n": n, **out, "process_wall_s": time.perf_counter() - t0,
            "loadavg_1min": [load, os.getloadavg()[0]]}


def llama_status() -> str | None:
    """None if llama_cpp imports, else why not. Probed in a subprocess: a prebuilt wheel can die with an illegal
    instruction on another CPU, which would take this process with it."""
    try:
        r = subprocess.run([sys.executable, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                           capture_output=True, text=True, timeout=120, check=False)
    except subprocess.TimeoutExpired:
        return "importing llama_cpp timed out"
    return None if r.returncode == 0 else f"llama_cpp does not import (exit {r.returncode}): {r.stderr[-300:]}"


def ensure_slice(n_blocks: int, data_dir: Path) -> Path:
    path = data_dir / f"mixtral_shape_q4_0_{n_blocks}blk.gguf"
    if not path.exists():
        print(f"writing {path} ...", flush=True)
        tmp = path.with_suffix(".partial")
        write_slice(tmp, "Q4_0", n_blocks, progress=True)
        tmp.rename(path)
    return path


def len_decode(run: dict) -> float:
    return run["decode_tps"] * run["decode_s"]


def summarize(runs: list[dict], engines: list[str], contexts: list[int]) -> dict:
    def med(rows, key):
        vals = [r[key] for r in rows if key in r]
        return round(statistics.median(vals), 3) if vals else None

    out = {}
    for n in contexts:
        row = {}
        for e in engines:
            ok = [r for r in runs if r["engine"] == e and r["n"] == n and "error" not in r]
            if not ok:
                continue
            s = {"runs": len(ok), "prefill_tps": med(ok, "prefill_tps"), "decode_tps": med(ok, "decode_tps"),
                 "peak_rss_GB": round(med(ok, "vmhwm") / 1e9, 3),
                 # per CPU-second of the process (all threads): the work, whatever share of the cores it got
                 "prefill_tok_per_cpu_s": med([{"x": n / r["prefill_cpu_s"]} for r in ok], "x"),
                 "decode_tok_per_cpu_s": med([{"x": len_decode(r) / r["decode_cpu_s"]} for r in ok], "x")}
            if e == "mixlocal":
                s["prefill_attention_share"] = med([{"x": r["prefill_attention_s"] / r["prefill_s"]} for r in ok], "x")
                s["decode_attention_share"] = med([{"x": r["decode_attention_s"] / r["decode_s"]} for r in ok], "x")
                s["kv_GB"] = round(ok[0]["kv_bytes_final"] / 1e9, 4)
                s["warm_rss_GB"] = round(med(ok, "rss_after_warmup") / 1e9, 3)  # weights (mapped + repacked), code
                # what is neither the warmed-up process (weights, code, runtime) nor the KV cache: chunk
                # activations and attention scratch, which should not depend on n
                s["peak_minus_warm_minus_kv_MB"] = round(med(
                    [{"x": r["vmhwm"] - r["rss_after_warmup"] - r["kv_bytes_final"]} for r in ok], "x") / 1e6, 1)
            row[e] = s
        if "mixlocal" in row:
            for e in engines:
                if e != "mixlocal" and e in row:
                    row[f"mixlocal_over_{e}"] = {
                        k: round(row["mixlocal"][k] / row[e][k], 3)
                        for k in ("prefill_tps", "decode_tps", "prefill_tok_per_cpu_s", "decode_tok_per_cpu_s",
                                  "peak_rss_GB") if row[e][k]}
        out[str(n)] = row
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--contexts", default="1024,8192", help="comma-separated prompt lengths")
    ap.add_argument("--with-32k", action="store_true", help="add a 32,768-position run (many minutes per engine)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--kv-type", default="f16", choices=sorted(LLAMA_KV_TYPES))
    ap.add_argument("--engines", default="mixlocal,llama")
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--kernel", action="store_true", help="time the attention kernel alone (see above)")
    # worker mode
    ap.add_argument("--worker", choices=ENGINES)
    ap.add_argument("--file")
    ap.add_argument("--n", type=int)
    args = ap.parse_args()
    if args.worker:
        return worker_main(args)
    if args.kernel:
        result = {"what": "attention kernel alone, Mixtral head shape, one layer's cache of 32768 positions",
                  **describe_run(), "loadavg_1min_before": os.getloadavg()[0], "rounds": args.rounds,
                  "parallel_control": parallel_control(args.rounds), "results": kernel_bench(args.rounds),
                  "loadavg_1min_after": os.getloadavg()[0]}
        out = args.out or ROOT / "bench" / "results" / f"long_context_kernel_{dt.date.today().isoformat()}.json"
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")
        return 0

    engines = [e for e in args.engines.split(",") if e]
    unknown = set(engines) - set(ENGINES)
    if unknown:
        ap.error(f"unknown engines {sorted(unknown)}; choose from {', '.join(ENGINES)}")
    contexts = [int(c) for c in args.contexts.split(",") if c]
    if args.with_32k:
        contexts.append(32768 - args.decode - 64)  # n_ctx = 32768
    notes = []
    if any(e.startswith("llama") for e in engines) and (why := llama_status()):
        notes.append(why)
        engines = [e for e in engines if not e.startswith("llama")]
    path = ensure_slice(args.blocks, args.data_dir)
    runs = []
    for rnd in range(args.rounds):
        for n in contexts:
            order = engines[rnd % len(engines):] + engines[:rnd % len(engines)]
            for e in order:
                print(f"round {rnd + 1}/{args.rounds} n={n} {e} ...", flush=True)
                r = run_worker(e, n, path, args)
                runs.append(r)
                print("   " + (r.get("error") or f"prefill {r['prefill_tps']:.1f} tok/s, decode {r['decode_tps']:.2f} "
                                                  f"tok/s, peak RSS {r['vmhwm'] / 1e9:.2f} GB"), flush=True)
    summary = summarize(runs, engines, contexts)
    result = {
        "what": "prefill tok/s of an N-token prompt and decode tok/s at positions N.., peak RSS, mixlocal vs "
                "llama.cpp on a Mixtral-shape GGUF slice (random Q4_0), same n_ctx",
        **describe_run(), "threads": args.threads,
        "model": {"file": path.name, "file_GB": round(path.stat().st_size / 1e9, 3), "blocks": args.blocks,
                  "type": "Q4_0"},
        "kv_type": args.kv_type, "decode_tokens": args.decode, "rounds": args.rounds, "engines": engines,
        "notes": notes, "summary": summary, "runs": runs,
    }
    out = args.out or ROOT / "bench" / "results" / (
        f"long_context_q4_0_{args.blocks}blk_{args.kv_type}_{dt.date.today().isoformat()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

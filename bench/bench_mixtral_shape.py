"""mixlocal against llama.cpp at Mixtral-8x7B's real tensor shapes: prefill, decode, load, memory and start-up.

    .venv/bin/python bench/bench_mixtral_shape.py [--types Q4_0] [--kernels FAMILY[,FAMILY...]|all] [--blocks 4]
        [--rounds 5] [--threads 2] [--prompt 512] [--decode 128] [--engines mixlocal,llama,llama_norepack]
        [--no-startup]

The model is a GGUF slice written by bench/make_mixtral_slice.py (Mixtral's exact shapes, random sane blocks, N
blocks; kept in --data-dir and written once per SLICE_VERSION). Every engine runs in its own subprocess, one at a
time, so peak RSS is its own and two engines never compete for the cores or the memory. Rounds alternate the
engines (the order rotates each round), and medians over rounds are reported because other people share this
machine: the load average is recorded with every run.

Kernel families (--kernels; default: the fastest this CPU runs; "all": every one it runs): each family is measured
against llama.cpp built for the same instruction set (bench/llama_builds.py): avx512vnni against the AVX-512 wheel
when this CPU runs it, avx2 and avxvnni against the portable AVX2 wheel. The mixlocal workers get MIXLOCAL_KERNELS
and, for avx2 and avxvnni, numba's target set to a CPU that has nothing faster (families.emulation_env), so an AVX2
run on an AVX-512 machine uses no AVX-512 instruction. Each llama build is installed into a directory of its own
under --data-dir and put on the llama workers' PYTHONPATH, after a probe (import, load, evaluate) in a subprocess.

Engines:
  mixlocal        engine.load(...) then llm.eval(prompt, logits="last") and eval([tok], logits="last") per token
  llama           llama-cpp-python with its defaults: Q4_0 (and other types with a CPU repack) are repacked at
                  load into an anonymous copy, which speeds prefill but costs load time and twice the memory
  llama_norepack  the same with llama_model_params.use_extra_bufts = False (llama.cpp's --no-repack): weights
                  are used from the memory map as they are

Prefill is one 512-token eval that returns only the last position's logits, which is what generation does; both
engines then compute the last block's attention output, experts and the output head for the final token only.
Decode feeds 128 fixed token ids one at a time (the same ids to every engine, so every engine does the same work)
and reads each step's logits.

Also measured: the read-bandwidth roofline (the best of a few numba read kernels over 512 MiB, 2 threads), the
bytes a decode step must read (attention, 2 of 8 experts per block, output head), and so the achieved GB/s; the
start-up of mixlocal in fresh processes: first ever (empty NUMBA_CACHE_DIR and packed-weight cache: every kernel
compiles and every matrix is repacked into the cache file), then later start-ups (import, load, first token, and
where the time goes). The timed rounds run after one untimed mixlocal load, so that they map the packed-weight
cache (engine/backends/numba/packed_cache.py, kept under --data-dir) the way every load after a model's first does.

Writes bench/results/mixtral_shape_<type>_<family>[_<N>blk]_<date>.json with the command, the CPU model and its
instruction-set flags, the kernel family and the llama.cpp wheel.
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

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
# Workers import the source tree named by MIXLOCAL_SRC (see --src); everything else imports this checkout.
sys.path.insert(0, os.environ.get("MIXLOCAL_SRC") or str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import llama_builds
from machine import describe_run, mem_info, proc_memory
from make_mixtral_slice import (
    MIXTRAL,
    SLICE_TYPES,
    SLICE_VERSION,
    tensor_plan,
    tensor_types,
    write_slice,
)

ENGINES = ("mixlocal", "llama", "llama_norepack")
DEFAULT_DATA_DIR = Path(os.environ.get("MIXLOCAL_BENCH_DIR", Path.home() / ".cache" / "mixlocal" / "bench"))
WORKER_TIMEOUT_S = 3 * 3600  # the 32-block model runs from disk


# ---------------------------------------------------------------------------------------------------------------
# machine
# ---------------------------------------------------------------------------------------------------------------







# ---------------------------------------------------------------------------------------------------------------
# the read roofline: the best of a few numba read kernels (a naive one reads well below the machine's bandwidth)
# ---------------------------------------------------------------------------------------------------------------

def measure_roofline(threads: int, mib: int = 512, repeats: int = 7) -> dict:
    import numba
    from numba import njit, prange

    numba.set_num_threads(threads)

    @njit(parallel=True, fastmath=True)
    def xor_u64(words):
        # 64 chunks, 8 independent 64-bit lanes each: nothing but loads on the critical path
        n_chunks = 64
        step = words.shape[0] // n_chunks // 8 * 8
        parts = np.zeros(n_chunks, np.uint64)
        for c in prange(n_chunks):
            a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = np.uint64(0)
            base = c * step
            for i in range(base, base + step, 8):
                a0 ^= words[i]
                a1 ^= words[i + 1]
                a2 ^= words[i + 2]
                a3 ^= words[i + 3]
                a4 ^= words[i + 4]
                a5 ^= words[i + 5]
                a6 ^= words[i + 6]
                a7 ^= words[i + 7]
            parts[c] = a0 ^ a1 ^ a2 ^ a3 ^ a4 ^ a5 ^ a6 ^ a7
        r = np.uint64(0)
        for c in range(n_chunks):
            r ^= parts[c]
        return r

    @njit(parallel=True, fastmath=True)
    def max_u8(b):
        # byte max over 64-byte rows: vectorises to full-width loads with one cheap op each
        rows = b.reshape(-1, 64)
        n_chunks = 64
        step = rows.shape[0] // n_chunks
        parts = np.zeros((n_chunks, 64), np.uint8)
        for c in prange(n_chunks):
            acc = np.zeros(64, np.uint8)
            for i in range(c * step, (c + 1) * step):
                for j in range(64):
                    acc[j] = max(acc[j], rows[i, j])
            parts[c] = acc
        return parts.max()

    @njit(parallel=True, fastmath=True)
    def sum_i32(w):
        n_chunks = 64
        step = w.shape[0] // n_chunks // 16 * 16
        parts = np.zeros(n_chunks, np.int64)
        for c in prange(n_chunks):
            acc = np.zeros(16, np.int32)
            for i in range(c * step, (c + 1) * step, 16):
                for j in range(16):
                    acc[j] += w[i + j]
            parts[c] = acc.sum()
        return parts.sum()

    buf = np.frombuffer(bytearray(np.random.default_rng(1).bytes(mib << 20)), np.uint8)
    kernels = {"xor_u64": lambda: xor_u64(buf.view(np.uint64)), "max_u8": lambda: max_u8(buf),
               "sum_i32": lambda: sum_i32(buf.view(np.int32))}
    result = {}
    for name, fn in kernels.items():
        fn()  # compile, fault in
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        result[name] = round(buf.nbytes / min(times) / 1e9, 2)  # best run: the roofline is a capability
        result[name + "_median"] = round(buf.nbytes / statistics.median(times) / 1e9, 2)
    best = max(result[k] for k in kernels)
    return {"GBps": best, "buffer_MiB": mib, "threads": threads, "kernels_GBps_best_and_median": result,
            "loadavg_1min": os.getloadavg()[0]}


# ---------------------------------------------------------------------------------------------------------------
# work per token, from the tensor plan
# ---------------------------------------------------------------------------------------------------------------

def work_model(qtype: str, n_blocks: int, n_prompt: int) -> dict:
    """Bytes one decode step reads and the weight multiply-adds of a last-logits prefill of n_prompt tokens."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    s = MIXTRAL
    types = tensor_types(qtype, s, n_blocks)
    frac = s.n_experts_used / s.n_experts
    decode_bytes, file_bytes, prefill_macs = 0.0, 0, 0.0
    for name, shape, kind in tensor_plan(s, n_blocks):
        n = int(np.prod(shape))
        per, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType[types[name]]]
        b = n // per * nbytes
        file_bytes += b
        last_block = name.startswith(f"blk.{n_blocks - 1}.")
        if name == "token_embd.weight":
            decode_bytes += b / shape[0]  # one row
            continue
        if "_exps" in name:
            decode_bytes += b * frac
            # each token's 2 experts; the last block's experts run for the final token only
            prefill_macs += (1 if last_block else n_prompt) * n * frac
        else:
            decode_bytes += b
            rows = 1 if (last_block and ("attn_q" in name or "attn_output" in name)) or name == "output.weight" \
                else n_prompt
            prefill_macs += rows * n if kind == "matrix" else 0
    return {"file_GB": round(file_bytes / 1e9, 3), "decode_bytes_per_token_GB": round(decode_bytes / 1e9, 4),
            "prefill_weight_GMAC": round(prefill_macs / 1e9, 1)}


# ---------------------------------------------------------------------------------------------------------------
# workers: each runs in its own process and prints one JSON line
# ---------------------------------------------------------------------------------------------------------------

def _tokens(n_prompt: int, n_decode: int, vocab: int) -> tuple[list[int], list[int]]:
    rng = np.random.default_rng(0)
    prompt = [1] + rng.integers(3, vocab, n_prompt - 1).tolist()
    return prompt, rng.integers(3, vocab, n_decode).tolist()


# "cpu" is the process's CPU time over all its threads: with --threads 1 on a crowded machine it measures what one
# core does for each engine, whatever share of the core the scheduler gave it (wall time then measures the crowd).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


REPACK_PHASE = "repack into the packed-weight cache file (first load only)"


def _worker_kernels() -> dict:
    """The family this worker's mixlocal runs, as the dispatch resolves it, and the CPU numba compiles for."""
    out = {"kernels_requested": os.environ.get("MIXLOCAL_KERNELS"), "numba_cpu": os.environ.get("NUMBA_CPU_NAME",
                                                                                                 "host")}
    try:
        from mixlocal.quant.kernels import families
    except ImportError:  # --src of a commit from before the families
        return out | {"kernels_resolved": "unknown: this source tree has no quant.kernels.families"}
    return out | {"kernels_resolved": families.resolve()}


def _packed_files() -> dict[str, int]:
    from mixlocal.engine.backends.numba.packed_cache import cache_dir
    folder = cache_dir()
    return {f.name: f.stat().st_mtime_ns for f in folder.glob("*.mixpack")} if folder.is_dir() else {}


def _run_mixlocal(path: str, threads: int, prompt: list[int], decode: list[int], packed_cache: bool = True) -> dict:
    t0 = time.perf_counter()
    from mixlocal import engine
    t1 = time.perf_counter()
    before = _packed_files()
    llm = engine.load(str(path), n_ctx=len(prompt) + len(decode) + 64, n_threads=threads,
                      packed_cache=None if packed_cache else False)
    t2 = time.perf_counter()
    after = _packed_files()
    int(np.argmax(llm.eval([1], logits="last")[-1]))
    t3 = time.perf_counter()
    cache = "in memory" if not packed_cache else (
        "mapped" if after and after == before else ("written" if after else "none (packed in memory)"))
    out = {"import_s": t1 - t0, "load_s": t2 - t1, "first_token_s": t3 - t2, "packed_weights": cache,
           **_worker_kernels()}

    def prefill(ids):
        llm.reset()
        return int(np.argmax(llm.eval(ids, logits="last")[-1]))

    def step(tok):
        return int(np.argmax(llm.eval([tok], logits="last")[-1]))
    return out | _measure(prefill, step, prompt, decode)


def _run_llama(path: str, threads: int, prompt: list[int], decode: list[int], repack: bool) -> dict:
    t0 = time.perf_counter()
    import llama_cpp
    import llama_cpp.llama_cpp as C
    t1 = time.perf_counter()
    if not repack:
        # llama-cpp-python has no keyword for it; Llama.__init__ starts from these defaults (llama.cpp's
        # --no-repack sets the same field)
        default_params = C.llama_model_default_params

        def no_repack_params():
            p = default_params()
            p.use_extra_bufts = False
            return p
        C.llama_model_default_params = no_repack_params
    n_ctx = len(prompt) + len(decode) + 64
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=threads,
                          n_threads_batch=threads, verbose=False, seed=0)
    t2 = time.perf_counter()
    n_vocab = llm.n_vocab()

    def last_logits_argmax():
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))))
    llm.eval([1])
    last_logits_argmax()
    t3 = time.perf_counter()
    out = {"import_s": t1 - t0, "load_s": t2 - t1, "first_token_s": t3 - t2, "llama_cpp_module": llama_cpp.__file__}

    def prefill(ids):
        llm.reset()
        llm.eval(ids)
        return last_logits_argmax()

    def step(tok):
        llm.eval([tok])
        return last_logits_argmax()
    return out | _measure(prefill, step, prompt, decode)


def _measure(prefill, step, prompt, decode) -> dict:
    # warm-up: every kernel path once (prefill and decode) and the weights' pages mapped
    prefill(prompt[:16])
    step(decode[0])
    step(decode[1])
    clock = CLOCKS[os.environ.get("BENCH_CLOCK", "wall")]
    t0 = clock()
    prefill(prompt)
    t1 = clock()
    for tok in decode:
        step(tok)
    t2 = clock()
    return {"prefill_s": t1 - t0, "prefill_tps": len(prompt) / (t1 - t0),
            "decode_s": t2 - t1, "decode_tps": len(decode) / (t2 - t1), **proc_memory()}  # model still alive


class _Timers:
    """Wall time per wrapped function (module or class attribute), for a profile without profiler overhead."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def wrap(self, owner, attr: str, label: str | None = None) -> None:
        fn = getattr(owner, attr, None)
        if fn is None:
            return
        label = label or attr

        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - t
                self.calls[label] = self.calls.get(label, 0) + 1
        setattr(owner, attr, wrapper)

    def take(self) -> dict:
        out = {k: {"s": round(v, 4), "calls": self.calls[k]} for k, v in sorted(self.seconds.items(),
                                                                                 key=lambda kv: -kv[1])}
        self.seconds, self.calls = {}, {}
        return out


def _run_profile(path: str, threads: int, prompt: list[int], decode: list[int]) -> dict:
    """Where mixlocal's prefill and decode time goes: each op of the forward pass timed (the kernels are entered
    from Python once per op, so wrapping them costs about a microsecond per call)."""
    from mixlocal.engine.backends.numba import backend as numba_cpu
    from mixlocal.engine.backends.numba import ops
    from mixlocal.engine.backends.numba.cache import KVCache
    from mixlocal.quant import kernels

    from mixlocal import engine

    llm = engine.load(str(path), n_ctx=len(prompt) + len(decode) + 64, n_threads=threads)
    llm.eval(prompt[:16], logits="last")  # warm-up
    llm.eval([decode[0]], logits="last")
    timers = _Timers()
    for attr in ("linear", "expert_linear"):
        timers.wrap(kernels, attr, "kernels." + attr)
    for attr in ("rmsnorm", "rope", "attention", "silu_mul"):
        timers.wrap(ops, attr, "ops." + attr)
    timers.wrap(numba_cpu, "route", "route (router softmax/top-k, numpy)")
    timers.wrap(KVCache, "store", "cache.store")
    timers.wrap(numba_cpu.NumbaCPUBackend, "embed", "embed")
    timers.wrap(numba_cpu.NumbaCPUBackend, "moe", "moe (all of it)")
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt, logits="last")
    t1 = time.perf_counter()
    prefill = {"total_s": round(t1 - t0, 3), "ops": timers.take()}
    t0 = time.perf_counter()
    for tok in decode:
        llm.eval([tok], logits="last")
    t1 = time.perf_counter()
    dec = {"total_s": round(t1 - t0, 3), "per_token_ms": round((t1 - t0) / len(decode) * 1e3, 2),
           "ops": timers.take()}
    top = ("embed", "kernels.linear", "ops.rmsnorm", "ops.rope", "ops.attention", "cache.store", "moe (all of it)")
    in_moe = ("kernels.expert_linear", "ops.silu_mul", "route (router softmax/top-k, numpy)")
    for part in (prefill, dec):
        ops_s = {k: v["s"] for k, v in part["ops"].items()}
        part["not_in_any_op_s"] = round(part["total_s"] - sum(ops_s.get(k, 0.0) for k in top), 4)
        part["moe_glue_s"] = round(ops_s.get("moe (all of it)", 0.0) - sum(ops_s.get(k, 0.0) for k in in_moe), 4)
    return {"prefill": prefill, "decode": dec}


def _run_startup(path: str, threads: int) -> dict:
    """mixlocal's start-up, phase by phase: the loader's steps are wrapped with timers (no profiler overhead)."""
    from numba.core import event as numba_event

    compile_timer = numba_event.TimingListener()
    numba_event.register("numba:compile", compile_timer)
    timers: dict[str, float] = {}

    def timed(owner, attr, label):
        fn = getattr(owner, attr)

        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                timers[label] = timers.get(label, 0.0) + time.perf_counter() - t
        setattr(owner, attr, wrapper)

    t0 = time.perf_counter()
    import mixlocal.engine.sources.gguf as gguf_source
    from mixlocal.engine.backends.numba import backend as numba_cpu
    from mixlocal.engine.backends.numba import packed_cache
    from mixlocal.quant import kernels
    from mixlocal.tokenizer import Tokenizer

    from mixlocal import engine
    t1 = time.perf_counter()
    timed(gguf_source, "read_gguf", "parse_gguf (GGUFReader + metadata values)")
    timed(gguf_source, "load_gguf", "load_gguf (parse + config + assemble)")
    timed(Tokenizer, "from_gguf_fields", "tokenizer from GGUF fields")
    timed(packed_cache, "_build", REPACK_PHASE)
    timed(packed_cache, "_open", "map the packed-weight cache file")
    timed(kernels, "prepare", "kernels.prepare (repack, and the pass-through of other formats)")
    timed(numba_cpu, "NumbaCPUBackend", "backend init (all prepares)")
    llm = engine.load(path, n_ctx=512, n_threads=threads)
    t2 = time.perf_counter()
    llm.eval([1], logits="last")
    t3 = time.perf_counter()
    llm.eval(list(range(100, 116)), logits="last")  # the prefill kernels (several rows)
    t4 = time.perf_counter()
    llm.eval([200], logits="last")
    t5 = time.perf_counter()
    llm.eval([201], logits="last")
    t6 = time.perf_counter()
    return {"import_s": t1 - t0, "load_s": t2 - t1, "first_token_s": t3 - t2, "first_prefill16_s": t4 - t3,
            "second_token_s": t5 - t4, "steady_token_s": t6 - t5, **_worker_kernels(),
            "load_plus_first_token_s": t3 - t1,
            "numba_compile_s": compile_timer.duration if compile_timer.done else 0.0,
            "phases_s": {k: round(v, 3) for k, v in timers.items()}, **proc_memory()}


def worker_main(args) -> int:
    prompt, decode = _tokens(args.prompt, args.decode, MIXTRAL.vocab)
    if args.worker == "mixlocal":
        out = _run_mixlocal(args.file, args.threads, prompt, decode, args.packed_cache == "on")
    elif args.worker in ("llama", "llama_norepack"):
        out = _run_llama(args.file, args.threads, prompt, decode, repack=args.worker == "llama")
    elif args.worker == "startup":
        out = _run_startup(args.file, args.threads)
    elif args.worker == "profile":
        out = _run_profile(args.file, args.threads, prompt, decode)
    else:
        raise SystemExit(f"unknown worker {args.worker}")
    print("RESULT " + json.dumps(out), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------------------------------------------

def run_worker(kind: str, path: Path, args, env_extra: dict | None = None, nice: int = 0) -> dict:
    # args.mixlocal_env / args.llama_env: the kernel family's and the llama build's (set per family by main)
    engine_env = getattr(args, "llama_env" if kind.startswith("llama") else "mixlocal_env", None) or {}
    env = {**os.environ, "OPENBLAS_NUM_THREADS": str(args.threads), "OMP_NUM_THREADS": str(args.threads),
           "BENCH_CLOCK": args.clock, "MIXLOCAL_CACHE_DIR": str(args.data_dir / "mixlocal_cache"),
           **engine_env, **(env_extra or {})}
    if args.src:  # benchmark another source tree (a clean `git archive` of a commit, say) instead of this one
        env["MIXLOCAL_SRC"] = str(Path(args.src).resolve())
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--file", str(path),
           "--threads", str(args.threads), "--prompt", str(args.prompt), "--decode", str(args.decode),
           "--packed-cache", args.packed_cache]
    if nice:
        cmd = ["nice", "-n", str(nice)] + cmd
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=WORKER_TIMEOUT_S, check=False)
    wall = time.perf_counter() - t0
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if r.returncode != 0 or not lines:
        return {"error": f"exit {r.returncode}: {(r.stderr or r.stdout)[-1500:]}"}
    out = json.loads(lines[-1][len("RESULT "):])
    out.update(process_wall_s=wall, loadavg_1min=[load_before, os.getloadavg()[0]])
    return out


def ensure_slice(qtype: str, n_blocks: int, data_dir: Path) -> Path:
    path = data_dir / f"mixtral_shape_{qtype.lower()}_{n_blocks}blk_v{SLICE_VERSION}.gguf"
    if not path.exists():
        print(f"writing {path} ...", flush=True)
        tmp = path.with_suffix(".partial")
        write_slice(tmp, qtype, n_blocks, progress=True)
        tmp.rename(path)
    return path


def parse_kernels(spec: str | None) -> list[str]:
    """--kernels: None is the fastest family this CPU runs, "all" every one it runs, else a comma-separated list;
    a family the CPU cannot run (or an unknown name) stops the bench with the dispatch's reason."""
    from mixlocal.quant.kernels import families
    runnable = families.host_families()
    if spec is None or not spec.strip():
        return [runnable[0]]
    if spec.strip().lower() == "all":
        return list(runnable)
    chosen = []
    for name in spec.split(","):
        if not name.strip():
            continue
        try:
            family = families.resolve(name)
        except families.KernelFamilyError as e:
            raise SystemExit(f"--kernels: {e}") from None
        if family not in chosen:
            chosen.append(family)
    if not chosen:
        raise SystemExit("--kernels: no family named")
    return chosen


def llama_for_family(family: str, args, probes: dict) -> dict:
    """The llama.cpp build to compare `family` with, installed into its own directory and probed: the build's
    description, with "pythonpath" when it runs here or "skip" saying why not. probes caches by wheel."""
    build = llama_builds.wheel_for_family(family, args.wheels_dir)
    if build["wheel"] is None:
        return {**build, "skip": build["note"]}
    wheel = build["wheel"]
    if wheel not in probes:
        try:
            target = llama_builds.install(Path(wheel), args.data_dir)
        except (OSError, RuntimeError) as e:
            probes[wheel] = {"ok": False, "reason": str(e)}
        else:
            probes[wheel] = {**llama_builds.probe(target), "pythonpath": str(target)}
    got = probes[wheel]
    out = {**build, "probe": got}
    if got["ok"]:
        out["pythonpath"] = got["pythonpath"]
    else:
        out["skip"] = got["reason"]
    return out


def _median(rows: list[dict], key: str):
    vals = [r[key] for r in rows if key in r]
    return round(statistics.median(vals), 3) if vals else None


def _startup_series(path: Path, args, env: dict) -> dict:
    """One run that finds both caches empty, then --startup-runs that find them filled; each a fresh process."""
    out = {"first_ever": run_worker("startup", path, args, env)}
    cached = []
    for i in range(args.startup_runs):
        print(f"    cached start-up {i + 1}/{args.startup_runs} ...", flush=True)
        cached.append(run_worker("startup", path, args, env))
    out["cached_runs"] = cached
    ok = [c for c in cached if "error" not in c]
    if ok:
        med = {k: _median(ok, k) for k in ("import_s", "load_s", "first_token_s", "load_plus_first_token_s",
                                           "first_prefill16_s", "steady_token_s", "numba_compile_s",
                                           "peak_rss_GB", "rss_anon_GB")}
        phases: dict[str, list[float]] = {}
        for c in ok:
            for k, v in c["phases_s"].items():
                phases.setdefault(k, []).append(v)
        med["phases_s"] = {k: round(statistics.median(v), 3) for k, v in phases.items()}
        out["cached_median"] = med
    return out


def _until_first_token_and_prefill(r: dict) -> float:
    return r["load_s"] + r["first_token_s"] + r["first_prefill16_s"] + r["second_token_s"]


def startup_runs(path: Path, args) -> dict:
    """mixlocal's start-up in fresh processes: first ever (empty NUMBA_CACHE_DIR: every kernel compiles; empty
    packed-weight cache: every matrix is repacked into it), then later start-ups that find both in place."""
    out: dict = {"target": "load + first token < 2 s in a second process, beyond the memory map itself"}
    with tempfile.TemporaryDirectory(prefix="numba_cache_") as numba_dir, \
            tempfile.TemporaryDirectory(prefix="packed_cache_", dir=args.data_dir) as packed_dir:
        env = {"NUMBA_CACHE_DIR": numba_dir, "MIXLOCAL_CACHE_DIR": packed_dir}
        print("start-up: first ever (empty numba and packed-weight caches), then cached ...", flush=True)
        series = _startup_series(path, args, env)
        out.update(series)
        first, ok = series["first_ever"], [c for c in series["cached_runs"] if "error" not in c]
        if ok and "error" not in first:
            warm = statistics.median(_until_first_token_and_prefill(c) for c in ok)
            out["first_ever_extra_s"] = round(_until_first_token_and_prefill(first) - warm, 2)
            out["first_ever_numba_compile_s"] = round(first["numba_compile_s"], 2)
            out["first_ever_repack_s"] = first["phases_s"].get(REPACK_PHASE)
    return out


def _memory_guard(engines: list[str], path: Path, args) -> dict[str, str]:
    """Engines whose load would copy the weights into anonymous memory that this machine does not have (the 32-block
    model: 26 GB on a 24 GiB machine). Running them anyway would bring in the OOM killer, maybe on someone else's
    process. The mapped file itself is not counted: its pages are reclaimable."""
    avail = mem_info().get("MemAvailable_GB")
    if avail is None:
        return {}
    copy_gb = path.stat().st_size / 1e9  # llama.cpp's repack copies about every matrix once
    needs = {"llama": copy_gb}  # mixlocal's packed copy is a mapped cache file (engine/backends/numba/packed_cache.py) ...
    if args.packed_cache == "off":
        needs["mixlocal"] = copy_gb  # ... unless it is told to repack in memory
    skipped = {}
    for e in engines:
        if needs.get(e, 0.0) > 0.85 * avail:
            skipped[e] = (f"its load would copy about {needs[e]:.1f} GB of weights into anonymous memory and only "
                          f"{avail:.1f} GB is available")
            print(f"skipping {e}: {skipped[e]}", flush=True)
    return skipped


def bench_type(qtype: str, family: str, args, roofline: dict, llama: dict | None) -> dict:
    """llama: llama_for_family's answer (None when no llama engine was asked for)."""
    path = args.file or ensure_slice(qtype, args.blocks, args.data_dir)
    engines = [e for e in args.engines.split(",") if e]
    if llama is None or "skip" in llama:
        engines = [e for e in engines if not e.startswith("llama")]
    work = work_model(qtype, args.blocks, args.prompt)
    result = {
        **describe_run(),
        "kernels": {"family": family, "worker_env": args.mixlocal_env},
        "llama_cpp": llama,
        "threads": args.threads, "clock": args.clock, "type": qtype, "blocks": args.blocks, "file": str(path),
        "file_size_GB": round(path.stat().st_size / 1e9, 3),
        "prompt_tokens": args.prompt, "decode_tokens": args.decode, "rounds": args.rounds,
        "work": work, "roofline_read": roofline, "engines": engines,
        "mixlocal_src": str(args.src or ROOT), "mixlocal_commit": _git_commit(),
        "loadavg_start": os.getloadavg(),
    }
    skipped = _memory_guard(engines, path, args)
    if skipped:
        result["skipped"] = skipped
        engines = [e for e in engines if e not in skipped]
    if args.startup and "mixlocal" in engines:
        result["startup"] = startup_runs(path, args)
        print(json.dumps(result["startup"].get("cached_median"), indent=1), flush=True)

    if "mixlocal" in engines:
        # the first load of a model writes its packed-weight cache file; do it outside the timed rounds, which
        # then all start the way every later start-up does (timed separately above)
        print("mixlocal: first load (fills the packed-weight cache if empty) ...", flush=True)
        result["mixlocal_first_load"] = run_worker("mixlocal", path, args, nice=args.nice)
        print("   ", result["mixlocal_first_load"], flush=True)
    runs: dict[str, list[dict]] = {e: [] for e in engines}
    for r in range(args.rounds):
        order = engines[r % len(engines):] + engines[:r % len(engines)]
        for e in order:
            print(f"round {r + 1}/{args.rounds}: {e} ...", flush=True)
            res = run_worker(e, path, args, nice=args.nice)
            runs[e].append(res)
            print("   ", {k: (round(v, 3) if isinstance(v, float) else v) for k, v in res.items()}, flush=True)
    result["loadavg_end"] = os.getloadavg()
    result["runs"] = runs
    if args.profile and "mixlocal" in engines:
        print("profile: where mixlocal's time goes ...", flush=True)
        result["mixlocal_profile"] = run_worker("profile", path, args, nice=args.nice)
    # other people's jobs come and go: the roofline is the better of a measurement before and one after the runs
    again = measure_roofline(args.threads)
    roofline = {"GBps": max(roofline["GBps"], again["GBps"]), "before": roofline, "after": again}
    result["roofline_read"] = roofline

    summary = {}
    for e, rows in runs.items():
        ok = [x for x in rows if "error" not in x]
        if not ok:
            summary[e] = {"error": rows[0]["error"] if rows else "not run"}
            continue
        s = {k: _median(ok, k) for k in ("prefill_tps", "decode_tps", "load_s", "first_token_s", "peak_rss_GB",
                                         "rss_anon_GB", "rss_file_GB")}
        s["n_ok"] = len(ok)
        s["decode_GBps"] = round(s["decode_tps"] * work["decode_bytes_per_token_GB"], 2)
        s["decode_fraction_of_roofline"] = round(s["decode_GBps"] / roofline["GBps"], 2) if roofline else None
        s["prefill_weight_GMACps"] = round(s["prefill_tps"] / args.prompt * work["prefill_weight_GMAC"], 1)
        summary[e] = s
    result["median"] = summary
    ratios = {}
    mine = summary.get("mixlocal", {})
    for peer in ("llama", "llama_norepack"):
        theirs = summary.get(peer, {})
        if "prefill_tps" in mine and "prefill_tps" in theirs:
            ratios[f"vs_{peer}"] = {"prefill": round(mine["prefill_tps"] / theirs["prefill_tps"], 3),
                                    "decode": round(mine["decode_tps"] / theirs["decode_tps"], 3)}
    result["ratio_mixlocal_over"] = ratios
    result["bar"] = "decode >= 0.9x and prefill >= 0.8x llama.cpp (medians of >= 5 alternating rounds)"
    return result


def _git_commit() -> str:
    r = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                       check=False)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, check=False).stdout.strip()
    return r.stdout.strip() + (" (working tree has uncommitted changes)" if dirty else "")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--types", default="Q4_0", help="comma-separated: " + ",".join(SLICE_TYPES))
    ap.add_argument("--kernels", default=None,
                    help="mixlocal kernel families, comma-separated, or all (default: the fastest this CPU runs); "
                         "each against llama.cpp built for the same instruction set")
    ap.add_argument("--wheels-dir", type=Path, default=llama_builds.default_wheels_dir(),
                    help="the prebuilt llama-cpp-python wheels (root: portable AVX2, avx512/: AVX-512)")
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="where slice files are kept")
    ap.add_argument("--file", type=Path, default=None, help="use this GGUF instead of a generated slice")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--no-startup", dest="startup", action="store_false", help="skip the start-up/JIT runs")
    ap.add_argument("--startup-runs", type=int, default=3, help="cached start-up runs (median)")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="time prefill/decode by wall clock (default) or by process CPU time (use with --threads 1 "
                         "on a crowded machine: per-core work, not the scheduler)")
    ap.add_argument("--no-profile", dest="profile", action="store_false",
                    help="skip the per-op profile of mixlocal's prefill and decode")
    ap.add_argument("--nice", type=int, default=0, help="run workers under nice -n N")
    ap.add_argument("--src", type=Path, default=None,
                    help="mixlocal source tree the workers import (default: this checkout); e.g. a `git archive` "
                         "of one commit, so that edits in a shared working tree do not change a run midway")
    ap.add_argument("--packed-cache", choices=("on", "off"), default="on",
                    help="off: mixlocal repacks into anonymous memory at every load (engine.load(packed_cache=False)) "
                         "instead of mapping its packed-weight cache")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker_main(args)

    from mixlocal.quant.kernels import families

    kernels = parse_kernels(args.kernels)
    qtypes = [q for q in args.types.split(",") if q]
    for qtype in qtypes:
        if qtype not in SLICE_TYPES:
            raise SystemExit(f"unknown type {qtype}; choose from {', '.join(SLICE_TYPES)}")
    if args.out and len(kernels) * len(qtypes) > 1:
        raise SystemExit("--out names one result file: give one type and one kernel family with it")
    want_llama = any(e.startswith("llama") for e in args.engines.split(","))
    print("measuring the read roofline ...", flush=True)
    roofline = measure_roofline(args.threads)
    print(f"read roofline: {roofline['GBps']} GB/s", flush=True)
    probes: dict = {}
    for family in kernels:
        args.mixlocal_env = {families.ENV_VAR: family, **families.emulation_env(family)}
        llama = llama_for_family(family, args, probes) if want_llama else None
        args.llama_env = {"PYTHONPATH": llama["pythonpath"]} if llama and "pythonpath" in llama else {}
        print(f"== kernels {family}: mixlocal env {args.mixlocal_env}; llama.cpp "
              + ("not asked for" if llama is None else llama.get("skip") and f"skipped: {llama['skip']}"
                 or f"{llama['build']} build {llama['wheel']}" + (f" ({llama['note']})" if llama["note"] else "")),
              flush=True)
        for qtype in qtypes:
            result = bench_type(qtype, family, args, roofline, llama)
            out = args.out or ROOT / "bench" / "results" / result_name(qtype, family, args)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=2) + "\n")
            print(json.dumps({"median": result["median"], "ratio": result["ratio_mixlocal_over"]}, indent=1))
            print("wrote", out, flush=True)
    return 0


def result_name(qtype: str, family: str, args) -> str:
    suffix = ("" if args.blocks == 4 else f"_{args.blocks}blk") + ("" if args.threads == 2 else f"_t{args.threads}") \
        + ("" if args.clock == "wall" else "_" + args.clock)
    return f"mixtral_shape_{qtype.lower()}_{family}{suffix}_{dt.date.today().isoformat()}.json"


if __name__ == "__main__":
    sys.exit(main())

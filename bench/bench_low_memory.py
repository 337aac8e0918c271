"""Mixtral on less memory than the model: mixlocal's expert slots against llama.cpp's memory map, under a memory limit.

    .venv/bin/python bench/bench_low_memory.py --file MODEL.gguf [--limits 16GiB,12GiB,none] [--rounds 2]
        [--prompt 64] [--decode 64] [--cold|--warm] [--engines mixlocal,llama] [--out FILE]

How the limit is made: each engine runs in its own process inside a memory cgroup (v1 memory.limit_in_bytes, or v2
memory.max) holding `limit` bytes for everything the process touches, its page cache included, as a laptop with that
much free memory would. (The issue's other method, a helper process holding anonymous memory, limits the whole
machine and can bring the OOM killer to the benchmark harness itself; a cgroup limits only the engine.) `none`
runs without a cgroup. mixlocal sees the limit through engine.machine.available_memory (its default budget);
llama.cpp runs with mmap and its repack off (the repack needs the whole model in anonymous memory).

Per run: load, time to the first generated token after the prompt (load + prefill), prefill and decode tok/s,
bytes read from disk per decoded token (/proc/self/io read_bytes), peak RSS, the cgroup's peak usage and whether it
killed the process; mixlocal adds its expert hit rate, guesses and time waiting on the disk. Cold runs drop the
page cache first (echo 1 > /proc/sys/vm/drop_caches; needs root, else the run says it is warm). Rounds alternate
the engines. Also measured in the same run: the disk's sequential read speed (O_DIRECT, 32 MiB reads), and the
routing of the file itself over 100 tokens (distinct experts per block, entropy): random weights can send every
token to the same few experts, which flatters a memory map.
Writes bench/results/low_memory_<file stem>_<date>.json.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mixlocal.engine.machine import describe

CGROUP_V1 = Path("/sys/fs/cgroup/memory")
CGROUP_V2 = Path("/sys/fs/cgroup/unified")


# ---------------------------------------------------------------------------------------------------------------
# workers (one engine, one process)
# ---------------------------------------------------------------------------------------------------------------

def _read_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def _worker(args) -> dict:
    t_start = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    prompt = [int(t) for t in rng.integers(3, 30000, args.prompt)]
    out: dict = {}
    if args.worker == "mixlocal":
        from mixlocal import engine
        llm = engine.load(args.file, n_ctx=args.prompt + args.decode + 16, n_threads=args.threads)
        t_loaded = time.perf_counter()

        def prefill(ids):
            return int(np.argmax(llm.eval(ids)[-1]))

        def step(tok):
            return int(np.argmax(llm.eval([tok])[-1]))
    else:
        import llama_cpp
        import llama_cpp.llama_cpp as C
        default_params = C.llama_model_default_params

        def no_repack_params():
            p = default_params()
            p.use_extra_bufts = False
            return p
        C.llama_model_default_params = no_repack_params
        llm = llama_cpp.Llama(model_path=args.file, n_ctx=args.prompt + args.decode + 16, n_batch=512,
                              n_threads=args.threads, n_threads_batch=args.threads, use_mmap=True, verbose=False)
        t_loaded = time.perf_counter()
        n_vocab = llm.n_vocab()

        def logits_argmax():
            return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))))

        def prefill(ids):
            llm.eval(ids)
            return logits_argmax()

        def step(tok):
            llm.eval([tok])
            return logits_argmax()
    tok = prefill(prompt)
    t_first = time.perf_counter()
    r0 = _read_bytes()
    t0 = time.perf_counter()
    for _ in range(args.decode):
        tok = step(tok)
    t1 = time.perf_counter()
    r1 = _read_bytes()
    out.update(load_s=t_loaded - t_start, first_token_s=t_first - t_start,
               prefill_tps=args.prompt / (t_first - t_loaded), decode_tps=args.decode / (t1 - t0),
               read_GB_per_token=(r1 - r0) / args.decode / 1e9,
               peak_rss_GB=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9)
    if args.worker == "mixlocal":
        store = llm.backend.store
        out["budget"] = {k: v for k, v in llm.backend.budget.items()}
        if store is not None:
            s = store.stats
            out["experts"] = {"slots_per_block": list(store.slots_per_block), "hit_rate": round(s.hit_rate, 4),
                              "misses": s.misses, "prefetched": s.prefetched, "prefetch_used": s.prefetch_used,
                              "wait_s": round(s.wait_s, 3), "repack": store.repack}
        llm.close()
    return out


def _routing_worker(args) -> dict:
    """The file's own routing over 100 tokens, as mixlocal's router computes it."""
    from mixlocal import engine
    llm = engine.load(args.file, n_ctx=128, n_threads=args.threads)
    llm.backend.trace = []
    rng = np.random.default_rng(args.seed)
    llm.eval([int(t) for t in rng.integers(3, 30000, 100)])
    c = llm.config
    out = []
    for b in range(c.n_layers):
        ids = llm.backend.trace[b].expert_ids.reshape(-1)
        p = np.bincount(ids, minlength=c.n_experts) / ids.size
        out.append({"distinct": len(np.unique(ids)),
                    "entropy_bits": round(float(-(p[p > 0] * np.log2(p[p > 0])).sum()), 3)})
    llm.close()
    return {"by_block": out, "max_entropy_bits": round(float(np.log2(c.n_experts)), 3)}


# ---------------------------------------------------------------------------------------------------------------
# the harness
# ---------------------------------------------------------------------------------------------------------------

class Cgroup:
    """A memory cgroup holding one process, v1 or v2, removed on exit."""

    def __init__(self, name: str, limit: int):
        if (CGROUP_V1 / "memory.limit_in_bytes").exists() or CGROUP_V1.is_dir():
            self.path, self.v = CGROUP_V1 / name, 1
        elif (CGROUP_V2 / "cgroup.controllers").exists():
            self.path, self.v = CGROUP_V2 / name, 2
        else:
            raise SystemExit("no memory cgroup here: cannot limit an engine's memory")
        self.path.mkdir(exist_ok=True)
        (self.path / ("memory.limit_in_bytes" if self.v == 1 else "memory.max")).write_text(str(limit))

    def enter(self) -> None:  # in the child, before exec
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def peak(self) -> dict:
        if self.v == 1:
            peak = int((self.path / "memory.max_usage_in_bytes").read_text())
            fails = int((self.path / "memory.failcnt").read_text())
            return {"cgroup_peak_GB": peak / 1e9, "cgroup_limit_hits": fails}
        peak_file = self.path / "memory.peak"
        return {"cgroup_peak_GB": int(peak_file.read_text()) / 1e9 if peak_file.exists() else None}

    def remove(self) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


def disk_read_speed(path: str, nbytes: int = 2 << 30) -> float:
    """GB/s of sequential O_DIRECT reads of path (32 MiB at a time), from the middle of the file."""
    import mmap
    buf = mmap.mmap(-1, 32 << 20)
    size = os.path.getsize(path)
    start = (size // 2) // 4096 * 4096
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
    try:
        t0, done = time.perf_counter(), 0
        while done < min(nbytes, size - start - (32 << 20)):
            done += os.preadv(fd, [buf], start + done)
        return done / (time.perf_counter() - t0) / 1e9
    finally:
        os.close(fd)


def run(engine: str, args, limit: int | None, cold: bool, tag: str) -> dict:
    warm_said = not cold or drop_caches()
    cmd = [sys.executable, __file__, "--worker", engine, "--file", args.file, "--threads", str(args.threads),
           "--prompt", str(args.prompt), "--decode", str(args.decode), "--seed", str(args.seed)]
    group = Cgroup(f"mixlocal-bench-{os.getpid()}-{tag}", limit) if limit else None
    t0 = time.perf_counter()
    p = subprocess.run(cmd, check=False, capture_output=True, text=True, preexec_fn=group.enter if group else None,
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    res = {"engine": engine, "limit_GiB": limit / 2**30 if limit else None, "cold": cold and warm_said,
           "wall_s": time.perf_counter() - t0, "returncode": p.returncode}
    if group:
        res.update(group.peak())
        group.remove()
    if p.returncode == 0:
        res.update(json.loads(p.stdout.strip().splitlines()[-1]))
    else:
        res["killed"] = p.returncode < 0 or p.returncode == 137
        res["stderr_tail"] = p.stderr[-600:]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--file", required=True)
    ap.add_argument("--limits", default="16GiB,12GiB,none")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--engines", default="mixlocal,llama")
    ap.add_argument("--warm", dest="cold", action="store_false", help="keep the page cache between runs")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker == "routing":
        print(json.dumps(_routing_worker(args)))
        return
    if args.worker:
        print(json.dumps(_worker(args)))
        return
    from mixlocal.engine.backends.numba.experts import parse_size
    limits = [None if x.strip() == "none" else parse_size(x) for x in args.limits.split(",")]
    engines = args.engines.split(",")
    result = {"date": dt.date.today().isoformat(), "command": " ".join(sys.argv), "machine": describe(),
              "file": args.file, "file_GB": os.path.getsize(args.file) / 1e9, "threads": args.threads,
              "prompt": args.prompt, "decode": args.decode, "cold": args.cold,
              "disk_GBps_before": round(disk_read_speed(args.file), 3)}
    r = subprocess.run([sys.executable, __file__, "--worker", "routing", "--file", args.file, "--threads",
                        str(args.threads)], check=False, capture_output=True, text=True, cwd=ROOT)
    result["routing"] = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else r.stderr[-400:]
    runs = []
    for limit in limits:
        for rnd in range(args.rounds):
            order = engines if rnd % 2 == 0 else engines[::-1]
            for eng in order:
                res = run(eng, args, limit, args.cold, f"{eng}-{rnd}")
                runs.append(res)
                print(json.dumps({k: res.get(k) for k in ("engine", "limit_GiB", "decode_tps", "first_token_s",
                                                         "read_GB_per_token", "peak_rss_GB", "returncode")}),
                      flush=True)
    result["disk_GBps_after"] = round(disk_read_speed(args.file), 3)
    result["runs"] = runs
    summary = {}
    for limit in limits:
        key = "none" if limit is None else f"{limit / 2**30:g}GiB"
        per = {}
        for eng in engines:
            ok = [x for x in runs if x["engine"] == eng and x["limit_GiB"] == (limit / 2**30 if limit else None)
                  and x["returncode"] == 0]
            if ok:
                per[eng] = {m: round(statistics.median(x[m] for x in ok), 4)
                            for m in ("decode_tps", "first_token_s", "read_GB_per_token", "peak_rss_GB")}
        if "mixlocal" in per and "llama" in per:
            per["decode_ratio"] = round(per["mixlocal"]["decode_tps"] / per["llama"]["decode_tps"], 3)
            disk = min(result["disk_GBps_before"], result["disk_GBps_after"])
            need = per["mixlocal"]["read_GB_per_token"]
            per["mixlocal_physical_limit_tps"] = round(disk / need, 3) if need > 0.01 else None
        summary[key] = per
    result["summary"] = summary
    print(json.dumps(summary, indent=1))
    out = args.out or ROOT / "bench" / "results" / f"low_memory_{Path(args.file).stem}_{result['date']}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    main()

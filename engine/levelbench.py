"""`mixlocal bench`: quantization levels measured against each other on this machine.

Each level runs in its own worker process (`python -m engine.levelbench --worker SPEC`), so that its peak resident
memory is its own. A worker loads the model at its level, times prefill and decode, then runs the perplexity text:

- The text is cut into chunks of `ppl_ctx` tokens. Each chunk is evaluated from an empty context, starting with BOS,
  and only the predictions in its second half are scored, so every scored token has at least ppl_ctx/2 tokens of
  context (llama-perplexity's protocol).
- ppl is exp(mean negative log-likelihood) over the scored tokens.
- Quality against a reference, as llama-perplexity's KL-divergence mode reports it: `kld`, the mean
  KL(reference || level) of the next-token distributions, and `top1`, the fraction of positions where both pick the
  same most likely token.
  The reference keeps only its REF_TOP_K most likely tokens per position plus the probability left over ("tail"),
  so its distribution is stored coarsened into K+1 buckets. The KL of the coarsened distributions is a lower bound
  of the full one and equals it when the tail carries little mass; top-1 agreement is exact.
- The reference's numbers go to a compressed .npz (`--save-ref`), which a later run compares against (`--ref-file`):
  a float Mixtral does not fit a laptop, so its reference is made once where it fits.

The default text is engine/data/ppl_text.txt: Chapter I ("Down the Rabbit-Hole") of Lewis Carroll's "Alice's
Adventures in Wonderland", public domain, about 3,200 Mixtral tokens. It is the Canterbury-corpus file alice29.txt
(Millennium Fulcrum Edition 2.9) as shipped in the PyPI sdist brotli-1.2.1.tar.gz at
brotli-1.2.1/tests/testdata/alice29.txt: its lines 14-248, CRLF turned into LF, leading and trailing blank lines
dropped, one final newline. sha256 f82c757dc81fad85c2c7a09df2e13aa7ba89314b97be6a6c33b945001e84b690.
"""
from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "DEFAULT_LEVELS",
    "DEFAULT_PPL_TEXT",
    "FIELDS",
    "REF_TOP_K",
    "BenchError",
    "BenchSettings",
    "format_table",
    "known_levels",
    "machine_info",
    "pareto_front",
    "run_bench",
    "weight_stats",
    "write_csv",
    "write_json",
    "write_plot",
]

DEFAULT_LEVELS = ("f16", "q8_0", "q6_k", "q4_k_m", "q4_0", "q4_moe", "q3_k_m", "q2_k")
FIELDS = ("quant", "size_bytes", "bits_per_weight", "load_s", "pp_tps", "tg_tps", "peak_rss_bytes",
          "ppl", "kld", "top1")
DEFAULT_PPL_TEXT = Path(__file__).parent / "data" / "ppl_text.txt"
REF_TOP_K = 32
REF_FORMAT = 1

# Most precise first: "the least-quantized level in the run" is the first of these that the run has.
_PRECISION_ORDER = ("f32", "bf16", "f16", "q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_1", "q5_0", "q4_k_m", "q4_moe",
                    "q4_k_s", "q4_1", "q4_0", "q3_k_l", "q3_k_m", "q3_k_s", "q2_k")


class BenchError(ValueError):
    """A bench that cannot run as asked; the message names the level, file or flag."""


def known_levels() -> tuple[str, ...]:
    """The level names that engine.load(quant=...) accepts (quant.recipes is their one source of truth)."""
    try:
        from quant.recipes import LEVELS
    except ImportError:
        return DEFAULT_LEVELS
    return tuple(LEVELS)


def parse_levels(text: str) -> list[str]:
    levels = [q.strip().lower() for q in text.split(",") if q.strip()]
    if not levels:
        raise BenchError("--quants is empty; give levels such as f16,q8_0,q4_0")
    known = known_levels()
    for q in levels:
        if q not in known:
            raise BenchError(f"unknown quantization level {q!r}; choose from {','.join(known)}")
    dupes = sorted({q for q in levels if levels.count(q) > 1})
    if dupes:
        raise BenchError(f"level {dupes[0]!r} is listed twice in --quants")
    return levels


def least_quantized(levels: list[str]) -> str:
    rank = {q: i for i, q in enumerate(_PRECISION_ORDER)}
    return min(levels, key=lambda q: rank.get(q, len(rank)))


# ---------------------------------------------------------------------------------------------------------------------
# Sizes: what a level costs in bytes
# ---------------------------------------------------------------------------------------------------------------------

def weight_stats(weights) -> dict:
    """Per format: tensor count, elements and bytes; totals; and the bytes one decoded token reads.

    Tensors are counted under their GGUF names (all experts of a block in one tensor). Norms and the router are held
    as float32 at run time and are counted so. A tensor shared by two names (tied embeddings) counts once.
    """
    c = weights.config
    formats: dict[str, dict] = {}
    seen: set[int] = set()
    total_bytes = total_elems = expert_bytes = 0
    for name, t in weights.tensors().items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        if isinstance(t, np.ndarray):
            fmt, nbytes, nelem = t.dtype.name.upper().replace("FLOAT", "F"), int(t.nbytes), int(t.size)
        else:
            fmt, nbytes, nelem = t.qtype.name, int(t.nbytes), int(t.n_elements)
        f = formats.setdefault(fmt, {"tensors": 0, "elements": 0, "bytes": 0})
        f["tensors"] += 1
        f["elements"] += nelem
        f["bytes"] += nbytes
        total_bytes += nbytes
        total_elems += nelem
        if name.endswith("_exps.weight"):
            expert_bytes += nbytes
    for f in formats.values():
        f["bits_per_weight"] = 8.0 * f["bytes"] / f["elements"]
    # A decoded token reads every non-expert matrix once and n_used of n_experts experts per block; its embedding
    # row is a lookup, not a read of the whole table.
    embd = weights.tok_embd.nbytes
    per_token = total_bytes - expert_bytes - embd + expert_bytes * c.n_experts_used // c.n_experts
    return {"formats": dict(sorted(formats.items(), key=lambda kv: -kv[1]["bytes"])), "size_bytes": total_bytes,
            "n_elements": total_elems, "bits_per_weight": 8.0 * total_bytes / total_elems,
            "expert_bytes": expert_bytes, "bytes_per_decoded_token": per_token}


def _load_and_size(spec: dict):
    """engine.load at the spec's level, and weight_stats of the weights the backend was built from.

    The numba backend keeps its ModelWeights; the MLX backend turns them into its own arrays and lets them go. So
    the sizes are taken as the loader's quantization step returns them (a look at shapes and formats, no copy), or,
    with no quantization, from the source as mapped.
    """
    import engine

    from . import quantize as quantize_module
    from .weights import ModelWeights

    seen: dict = {}
    original = quantize_module.quantize_weights

    def recording(*args, **kwargs):
        out = original(*args, **kwargs)
        seen["stats"] = weight_stats(out)
        return out

    quantize_module.quantize_weights = recording
    try:
        llm = engine.load(spec["source"], quant=spec["quant"], backend=spec["backend"], n_threads=spec["threads"],
                          n_ctx=spec["n_ctx"])
    finally:
        quantize_module.quantize_weights = original
    kept = getattr(llm.backend, "w", None)
    if isinstance(kept, ModelWeights):
        return llm, weight_stats(kept)
    if "stats" in seen:
        return llm, seen["stats"]
    from .loader import open_source
    return llm, weight_stats(open_source(spec["source"])[1])


# ---------------------------------------------------------------------------------------------------------------------
# Worker: one level, one process
# ---------------------------------------------------------------------------------------------------------------------

def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    z -= np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return z


def _peak_rss_bytes() -> int:
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS reports bytes, Linux kibibytes


class _Reference:
    """A reference level's top-k log-probabilities at every scored position, from or for an .npz file."""

    def __init__(self, tokens, ppl_ctx, top_ids, top_logprobs, tail, level, model):
        self.tokens, self.ppl_ctx = np.asarray(tokens, np.int32), int(ppl_ctx)
        self.top_ids, self.top_logprobs = np.asarray(top_ids, np.int32), np.asarray(top_logprobs, np.float32)
        self.tail, self.level, self.model = np.asarray(tail, np.float64), str(level), str(model)

    def save(self, path: Path) -> None:
        with open(path, "wb") as f:
            np.savez_compressed(f, format=REF_FORMAT, tokens=self.tokens, ppl_ctx=self.ppl_ctx, top_ids=self.top_ids,
                                top_logprobs=self.top_logprobs, tail=self.tail, level=self.level, model=self.model)

    @classmethod
    def load(cls, path: Path) -> _Reference:
        try:
            with np.load(path, allow_pickle=False) as z:
                if int(z["format"]) != REF_FORMAT:
                    raise BenchError(f"{path}: reference format {int(z['format'])}, this mixlocal reads {REF_FORMAT}")
                return cls(z["tokens"], z["ppl_ctx"], z["top_ids"], z["top_logprobs"], z["tail"], z["level"],
                           z["model"])
        except BenchError:
            raise
        except (OSError, ValueError, KeyError) as e:
            raise BenchError(f"{path}: not a mixlocal reference file ({e})") from None

    def check_matches(self, tokens: np.ndarray, ppl_ctx: int, n_scored: int, where: str) -> None:
        if self.ppl_ctx != ppl_ctx:
            raise BenchError(f"{where}: the reference was made with --ppl-ctx {self.ppl_ctx}, this run uses {ppl_ctx}")
        if self.tokens.shape != tokens.shape or not np.array_equal(self.tokens, tokens):
            raise BenchError(f"{where}: the reference was made on a different text or tokenizer "
                             f"({self.tokens.size} tokens vs {tokens.size})")
        if self.top_ids.shape[0] != n_scored:
            raise BenchError(f"{where}: the reference scores {self.top_ids.shape[0]} positions, this run would "
                             f"score {n_scored} (a different --ppl-chunks?)")


def _chunk_indices(n_tokens: int, ppl_ctx: int, max_chunks: int | None) -> list[int]:
    n_chunks = n_tokens // ppl_ctx
    if max_chunks is not None:
        n_chunks = min(n_chunks, max_chunks)
    return list(range(n_chunks))


def _emit(**event) -> None:
    print(json.dumps(event), flush=True)


def _worker(spec: dict) -> dict:
    import engine  # noqa: F401 - imported before the clock starts: load_s is the load, not Python's imports

    level, ppl_ctx = spec["quant"], spec["ppl_ctx"]
    n_prompt, n_gen = spec["n_prompt"], spec["n_gen"]
    t0 = time.perf_counter()
    llm, stats = _load_and_size(dict(spec, n_ctx=max(ppl_ctx, n_prompt + n_gen + 1)))
    load_s = time.perf_counter() - t0
    tokens = np.asarray(llm.tokenizer.encode(Path(spec["ppl_file"]).read_text(encoding="utf-8"), add_bos=False),
                        dtype=np.int32)
    chunks = _chunk_indices(tokens.size, ppl_ctx, spec.get("ppl_chunks"))
    if not chunks:
        raise BenchError(f"{spec['ppl_file']}: {tokens.size} tokens, fewer than one --ppl-ctx chunk of {ppl_ctx}")
    half = ppl_ctx // 2
    ref = _Reference.load(Path(spec["ref_file"])) if spec.get("ref_file") else None
    if ref is not None:
        ref.check_matches(tokens, ppl_ctx, len(chunks) * (ppl_ctx - half), spec["ref_file"])
    _emit(total=3 + len(chunks))
    _emit(step="loaded")

    # Speed. The first calls compile or fetch numba kernels from the cache; they are not what a user waits for
    # per token, so one short warm-up runs both paths before anything is timed.
    prompt = np.resize(tokens, n_prompt).tolist()  # the text itself, repeated if shorter than n_prompt
    llm.reset()
    last = llm.eval(prompt[:8], logits="last")[-1]
    llm.eval([int(np.argmax(last))], logits="last")
    llm.reset()
    t = time.perf_counter()
    last = llm.eval(prompt, logits="last")[-1]
    pp_tps = n_prompt / (time.perf_counter() - t)
    _emit(step="prefill")
    t = time.perf_counter()
    for _ in range(n_gen):  # greedy decode after the prompt: n_gen tokens whatever they are, EOS included
        last = llm.eval([int(np.argmax(last))], logits="last")[-1]
    tg_tps = n_gen / (time.perf_counter() - t) if n_gen else 0.0
    _emit(step="decode")

    # Quality.
    nll, top_ids, top_lps, tails, kl, agree = [], [], [], [], [], []
    at = 0  # scored positions so far: the row offset into the reference
    for ci in chunks:
        chunk = tokens[ci * ppl_ctx:(ci + 1) * ppl_ctx]
        llm.reset()
        logits = llm.eval([llm.tokenizer.bos_id] + chunk[:-1].tolist(), logits="all")  # row j predicts chunk[j]
        lp = _log_softmax(logits[half:])                                                  # (S, V) float64
        target = chunk[half:]
        rows = np.arange(lp.shape[0])
        nll.append(-lp[rows, target])
        ids = np.argpartition(-lp, REF_TOP_K, axis=1)[:, :REF_TOP_K]
        ids = np.take_along_axis(ids, np.argsort(-np.take_along_axis(lp, ids, 1), axis=1, kind="stable"), 1)
        top_ids.append(ids.astype(np.int32))
        top_lps.append(np.take_along_axis(lp, ids, 1).astype(np.float32))
        tails.append(_tail_mass(lp, ids))
        if ref is not None:
            span = slice(at, at + lp.shape[0])
            kl.append(_coarse_kl(ref.top_logprobs[span], ref.tail[span], lp, ref.top_ids[span]))
            agree.append(np.argmax(lp, axis=1) == ref.top_ids[span, 0])
        at += lp.shape[0]
        _emit(step="ppl")
    del llm
    result = {"quant": level, "size_bytes": stats["size_bytes"], "bits_per_weight": stats["bits_per_weight"],
              "load_s": load_s, "pp_tps": pp_tps, "tg_tps": tg_tps, "peak_rss_bytes": _peak_rss_bytes(),
              "ppl": float(np.exp(np.concatenate(nll).mean())), "kld": None, "top1": None}
    if spec.get("save_ref"):
        mine = _Reference(tokens, ppl_ctx, np.concatenate(top_ids), np.concatenate(top_lps), np.concatenate(tails),
                          level, spec["source"])
        mine.save(Path(spec["save_ref"]))
    if ref is not None:
        result["kld"] = float(np.concatenate(kl).mean())
        result["top1"] = float(np.concatenate(agree).mean())
    return result


def _tail_mass(lp: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Probability outside ids per row, summed directly (1 - sum(top) would cancel when the top holds ~all of it)."""
    p = np.exp(lp)
    np.put_along_axis(p, ids, 0.0, axis=1)
    return p.sum(axis=1)


def _coarse_kl(ref_lp: np.ndarray, ref_tail: np.ndarray, lp: np.ndarray, ref_ids: np.ndarray) -> np.ndarray:
    """KL(ref || ours) per row over the reference's top-k tokens plus one bucket for everything else."""
    ref_lp = ref_lp.astype(np.float64)
    ours = np.take_along_axis(lp, ref_ids.astype(np.int64), 1)
    kl = (np.exp(ref_lp) * (ref_lp - ours)).sum(axis=1)
    our_tail = np.maximum(_tail_mass(lp, ref_ids.astype(np.int64)), 1e-300)
    with np.errstate(divide="ignore", invalid="ignore"):
        tail_term = np.where(ref_tail > 0, ref_tail * (np.log(np.maximum(ref_tail, 1e-300)) - np.log(our_tail)), 0.0)
    return kl + tail_term


def _worker_main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    try:
        _emit(result=_worker(spec))
    except (ValueError, OSError, MemoryError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {msg}", file=sys.stderr, flush=True)
        return 1
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# Parent: run the levels, each in a worker
# ---------------------------------------------------------------------------------------------------------------------

@dataclass
class BenchSettings:
    source: str | None
    levels: list[str]
    n_prompt: int = 512
    n_gen: int = 128
    ppl_file: Path = DEFAULT_PPL_TEXT
    ppl_ctx: int = 512
    ppl_chunks: int | None = None
    ref: str | None = None            # a level of the run
    ref_file: Path | None = None      # or a saved reference
    save_ref: Path | None = None
    backend: str = "auto"
    threads: int | None = None

    def check(self) -> None:
        if self.n_prompt < 8:
            raise BenchError(f"-p must be at least 8 tokens, got {self.n_prompt}")
        if self.n_gen < 0:
            raise BenchError(f"-n must be 0 or more tokens, got {self.n_gen}")
        if self.ppl_ctx < 16 or self.ppl_ctx % 2:
            raise BenchError(f"--ppl-ctx must be an even number of at least 16 tokens, got {self.ppl_ctx}")
        if self.ppl_chunks is not None and self.ppl_chunks < 1:
            raise BenchError(f"--ppl-chunks must be at least 1, got {self.ppl_chunks}")
        if self.threads is not None and self.threads < 1:
            raise BenchError(f"--threads must be at least 1, got {self.threads}")
        if not Path(self.ppl_file).is_file():
            raise BenchError(f"{self.ppl_file}: perplexity text not found")
        if self.ref_file is not None and self.ref is not None:
            raise BenchError("give --ref or --ref-file, not both")
        if self.ref_file is not None and self.save_ref is not None:
            raise BenchError("give --save-ref or --ref-file, not both")
        if self.save_ref is not None and not Path(self.save_ref).resolve().parent.is_dir():
            raise BenchError(f"--save-ref {self.save_ref}: no such directory")
        if self.ref_file is not None and not Path(self.ref_file).is_file():
            raise BenchError(f"{self.ref_file}: reference file not found")
        if self.ref is not None and self.ref not in self.levels:
            raise BenchError(f"--ref {self.ref} is not among --quants {','.join(self.levels)}")

    def reference_level(self) -> str | None:
        return None if self.ref_file is not None else (self.ref or least_quantized(self.levels))


def _spawn(spec: dict, bar) -> dict:
    """Run one level's worker, feeding its progress events to bar; return its result row."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with tempfile.TemporaryFile(mode="w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "engine.levelbench", "--worker", json.dumps(spec)],
                                stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        result = None
        try:
            for line in proc.stdout:
                if not line.startswith("{"):
                    continue
                event = json.loads(line)
                if "total" in event:
                    bar.reset(total=event["total"])
                elif "step" in event:
                    bar.set_postfix_str(event["step"], refresh=False)
                    bar.update(1)
                elif "result" in event:
                    result = event["result"]
            proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        if proc.returncode != 0 or result is None:
            err.seek(0)
            lines = [ln.strip() for ln in err.read().splitlines() if ln.strip()]
            why = lines[-1] if lines else f"worker exited with status {proc.returncode}"
            raise BenchError(f"{spec['quant']}: {why.removeprefix('error: ')}")
    return result


def run_bench(s: BenchSettings) -> dict:
    """Measure every level; return {"machine", "model", "results"} with rows in the order of s.levels."""
    from tqdm.auto import tqdm

    s.check()
    ref_level = s.reference_level()
    order = ([ref_level] if ref_level else []) + [q for q in s.levels if q != ref_level]
    model, tokenizer = _describe_source(s.source)
    # Fail before any level is measured, not after: the text must fill a chunk, a saved reference must match it.
    tokens = np.asarray(tokenizer.encode(Path(s.ppl_file).read_text(encoding="utf-8"), add_bos=False), np.int32)
    n_chunks = len(_chunk_indices(tokens.size, s.ppl_ctx, s.ppl_chunks))
    if not n_chunks:
        raise BenchError(f"{s.ppl_file}: {tokens.size} tokens, fewer than one --ppl-ctx chunk of {s.ppl_ctx}")
    if s.ref_file is not None:
        _Reference.load(Path(s.ref_file)).check_matches(tokens, s.ppl_ctx, n_chunks * (s.ppl_ctx - s.ppl_ctx // 2),
                                                        str(s.ref_file))
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="mixlocal-bench-") as tmp:
        ref_path = Path(s.ref_file) if s.ref_file else Path(s.save_ref or Path(tmp) / "reference.npz")
        for i, level in enumerate(order):
            spec = {"source": s.source, "quant": level, "backend": s.backend, "threads": s.threads,
                    "n_prompt": s.n_prompt, "n_gen": s.n_gen, "ppl_file": str(s.ppl_file), "ppl_ctx": s.ppl_ctx,
                    "ppl_chunks": s.ppl_chunks}
            if level == ref_level:
                spec["save_ref"] = str(ref_path)  # written first, then compared against by every level
                spec["ref_file"] = None
            else:
                spec["ref_file"] = str(ref_path)
            with tqdm(total=1, desc=f"[{i + 1}/{len(order)}] {level}", unit="step", leave=True,
                      disable=None, file=sys.stderr) as bar:
                bar.set_postfix_str("loading", refresh=True)
                row = _spawn(spec, bar)
            if level == ref_level:  # the reference against itself: zero divergence, full agreement, by definition
                row["kld"], row["top1"] = 0.0, 1.0
            rows[level] = row
    model.update(reference=str(s.ref_file) if s.ref_file else ref_level, ppl_text=str(s.ppl_file),
                 ppl_ctx=s.ppl_ctx, n_prompt=s.n_prompt, n_gen=s.n_gen)
    return {"machine": machine_info(s.backend, s.threads), "model": model,
            "results": [{k: rows[q][k] for k in FIELDS} for q in s.levels]}


def _describe_source(source) -> tuple[dict, object]:
    """What the run measures, and its tokenizer; opening the source here also fails fast on an unreadable model."""
    from .loader import open_source
    config, weights, tok, name = open_source(source)
    st = weight_stats(weights)
    return {"source": str(source) if source is not None else "embedded default", "name": name,
            "n_params": st["n_elements"], "source_size_bytes": st["size_bytes"],
            "n_layers": config.n_layers, "n_experts": config.n_experts, "dim": config.dim}, tok


def machine_info(backend: str = "auto", threads: int | None = None) -> dict:
    import numba

    from . import machine
    try:
        from importlib.metadata import version
        mixlocal_version = version("mixlocal")
    except Exception:  # noqa: BLE001 - running from a source tree
        mixlocal_version = "source"
    cores = machine.physical_cores()
    return {"platform": platform.platform(), "machine": platform.machine(), "cpu": machine.cpu_model(),
            "physical_cores": cores, "logical_cpus": os.cpu_count(), "ram_bytes": machine.total_memory(),
            "python": platform.python_version(), "numpy": np.__version__, "numba": numba.__version__,
            "mixlocal": mixlocal_version, "backend": backend, "threads": threads or cores,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


# ---------------------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------------------

def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def format_table(report: dict) -> str:
    cols = [("quant", "quant", lambda v: v), ("size", "size_bytes", human_bytes),
            ("bpw", "bits_per_weight", lambda v: f"{v:.2f}"), ("load s", "load_s", lambda v: f"{v:.2f}"),
            ("pp t/s", "pp_tps", lambda v: f"{v:.1f}"), ("tg t/s", "tg_tps", lambda v: f"{v:.1f}"),
            ("peak RSS", "peak_rss_bytes", human_bytes), ("ppl", "ppl", lambda v: f"{v:.4f}"),
            ("kld", "kld", lambda v: "-" if v is None else f"{v:.6f}"),
            ("top1", "top1", lambda v: "-" if v is None else f"{100 * v:.2f}%")]
    cells = [[h for h, _, _ in cols]] + [[fmt(r[k]) for _, k, fmt in cols] for r in report["results"]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    m = report["model"]
    ref = m.get("reference")
    head = f"model {m.get('name', m.get('source'))}: prefill {m.get('n_prompt')} tokens, decode {m.get('n_gen')}; " \
           f"quality vs {ref} on {Path(str(m.get('ppl_text'))).name}"
    return head + "\n" + "\n".join(lines)


def write_json(report: dict, path: Path) -> None:
    Path(path).write_text(json.dumps(report, indent=2) + "\n")


def write_csv(report: dict, path: Path) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(FIELDS), lineterminator="\n")
    w.writeheader()
    for r in report["results"]:
        w.writerow({k: ("" if r[k] is None else r[k]) for k in FIELDS})
    Path(path).write_text(buf.getvalue())


def pareto_front(points: list[tuple[float, float]], *, maximize_y: bool) -> list[int]:
    """Indices of points no other point beats: smaller x, and smaller y (or larger, with maximize_y)."""
    sign = -1.0 if maximize_y else 1.0
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(xo <= x and sign * yo <= sign * y and (xo < x or sign * yo < sign * y)
                        for j, (xo, yo) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def write_plot(report: dict, path: Path) -> None:
    """Quality against size and decode speed against size, each with its Pareto frontier drawn."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BenchError("--plot needs matplotlib: pip install 'mixlocal[bench]' (or pip install matplotlib)") \
            from None
    rows = report["results"]
    biggest = max(r["size_bytes"] for r in rows)
    scale, unit = next((s, u) for s, u in ((1e9, "GB"), (1e6, "MB"), (1e3, "KB"), (1, "B")) if biggest >= s)
    xs = [r["size_bytes"] / scale for r in rows]
    use_kld = all(r["kld"] is not None for r in rows)
    quality = [r["kld"] if use_kld else r["ppl"] for r in rows]
    panels = [(quality, False, "KL divergence vs reference (lower is better)" if use_kld
               else "perplexity (lower is better)", "quality against size"),
              ([r["tg_tps"] for r in rows], True, "decode tokens/s (higher is better)", "decode speed against size")]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, (ys, maximize, ylabel, title) in zip(axes, panels):
        front = pareto_front(list(zip(xs, ys)), maximize_y=maximize)
        ax.scatter(xs, ys, facecolors="none", edgecolors="tab:gray", s=50, label="level")
        ax.scatter([xs[i] for i in front], [ys[i] for i in front], color="tab:red", s=50, zorder=3,
                   label="Pareto frontier")
        ax.plot([xs[i] for i in front], [ys[i] for i in front], color="tab:red", lw=1.2, zorder=2,
                drawstyle="steps-post")
        for x, y, r in zip(xs, ys, rows):
            ax.annotate(r["quant"], (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
        ax.set_xlabel(f"model size ({unit})")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    model = report["model"]
    fig.suptitle(f"{model.get('name', model.get('source'))} on {report['machine'].get('cpu', '')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        sys.exit(_worker_main(sys.argv[2:]))
    print("engine.levelbench is run by `mixlocal bench`", file=sys.stderr)
    sys.exit(2)

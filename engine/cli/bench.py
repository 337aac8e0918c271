"""`mixlocal bench`: quantization levels measured against each other on this machine.

This module is the command and the parent: it checks the settings, runs each level in its own worker process
(engine/cli/bench_worker.py, which measures speed and quality through the public API), and writes the table, JSON,
CSV and plot. It lives with the CLI, not in the engine core: nothing in the engine depends on it.

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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..weights import weight_stats
from .bench_worker import BenchError, Reference, chunk_indices
from .common import (
    JSON_HELP,
    KV_TYPES,
    UsageError,
    add_model_flag,
    check_json_dest,
    human_bytes,
)

__all__ = [
    "DEFAULT_LEVELS",
    "DEFAULT_PPL_TEXT",
    "FIELDS",
    "BenchError",
    "BenchSettings",
    "add_arguments",
    "command",
    "format_table",
    "known_levels",
    "machine_info",
    "pareto_front",
    "run_bench",
    "write_csv",
    "write_json",
    "write_plot",
]

DEFAULT_LEVELS = ("f16", "q8_0", "q6_k", "q4_k_m", "q4_0", "q4_moe", "q3_k_m", "q2_k")
FIELDS = ("quant", "size_bytes", "bits_per_weight", "load_s", "pp_tps", "tg_tps", "peak_rss_bytes",
          "ppl", "kld", "top1")
DEFAULT_PPL_TEXT = Path(__file__).resolve().parents[1] / "data" / "ppl_text.txt"

# Most precise first: "the least-quantized level in the run" is the first of these that the run has.
_PRECISION_ORDER = ("f32", "bf16", "f16", "q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_1", "q5_0", "q4_k_m", "q4_moe",
                    "q4_k_s", "q4_1", "q4_0", "q3_k_l", "q3_k_m", "q3_k_s", "q2_k")


def known_levels() -> tuple[str, ...]:
    """The level names that engine.load(quant=...) accepts (quant.recipes is their one source of truth)."""
    try:
        from mixlocal.quant.recipes import LEVELS
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
    kv_type: str = "f16"

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
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with tempfile.TemporaryFile(mode="w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "mixlocal.engine.cli.bench_worker", "--worker", json.dumps(spec)],
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
    n_chunks = len(chunk_indices(tokens.size, s.ppl_ctx, s.ppl_chunks))
    if not n_chunks:
        raise BenchError(f"{s.ppl_file}: {tokens.size} tokens, fewer than one --ppl-ctx chunk of {s.ppl_ctx}")
    if s.ref_file is not None:
        Reference.load(Path(s.ref_file)).check_matches(tokens, s.ppl_ctx, n_chunks * (s.ppl_ctx - s.ppl_ctx // 2),
                                                        str(s.ref_file))
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="mixlocal-bench-") as tmp:
        ref_path = Path(s.ref_file) if s.ref_file else Path(s.save_ref or Path(tmp) / "reference.npz")
        for i, level in enumerate(order):
            spec = {"source": s.source, "quant": level, "backend": s.backend, "threads": s.threads,
                    "kv_type": s.kv_type, "n_prompt": s.n_prompt, "n_gen": s.n_gen, "ppl_file": str(s.ppl_file),
                    "ppl_ctx": s.ppl_ctx, "ppl_chunks": s.ppl_chunks}
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
                 ppl_ctx=s.ppl_ctx, n_prompt=s.n_prompt, n_gen=s.n_gen, kv_type=s.kv_type)
    return {"machine": machine_info(s.backend, s.threads), "model": model,
            "results": [{k: rows[q][k] for k in FIELDS} for q in s.levels]}


def _describe_source(source) -> tuple[dict, object]:
    """What the run measures, and its tokenizer; opening the source here also fails fast on an unreadable model."""
    from ..loader import open_source
    config, weights, tok, name = open_source(source)
    st = weight_stats(weights)
    return {"source": str(source) if source is not None else "embedded default", "name": name,
            "n_params": st["n_elements"], "source_size_bytes": st["size_bytes"],
            "n_layers": config.n_layers, "n_experts": config.n_experts, "dim": config.dim}, tok


def machine_info(backend: str = "auto", threads: int | None = None) -> dict:
    import numba

    from .. import machine
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


# ---------------------------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------------------------

def add_arguments(b) -> None:
    add_model_flag(b)
    b.add_argument("--quants", default=",".join(DEFAULT_LEVELS), metavar="LEVELS",
                   help="comma-separated levels, in any case (default: %(default)s)")
    b.add_argument("-p", "--n-prompt", type=int, default=512, metavar="N", help="prefill tokens (default 512)")
    b.add_argument("-n", "--n-gen", type=int, default=128, metavar="N", help="decoded tokens (default 128)")
    b.add_argument("--ppl-file", default=str(DEFAULT_PPL_TEXT), metavar="TEXT",
                   help="text for perplexity (default: a public-domain chapter shipped with mixlocal)")
    b.add_argument("--ppl-ctx", type=int, default=512, metavar="N", help="tokens per perplexity chunk (default 512)")
    b.add_argument("--ppl-chunks", type=int, default=None, metavar="N", help="score at most N chunks")
    b.add_argument("--ref", default=None, metavar="LEVEL",
                   help="the reference level (default: the least quantized level of the run)")
    b.add_argument("--save-ref", default=None, metavar="FILE", help="store the reference's top-k log-probabilities")
    b.add_argument("--ref-file", default=None, metavar="FILE", help="compare against a stored reference")
    b.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE", help=JSON_HELP)
    b.add_argument("--csv", default=None, metavar="OUT", help="write the results as CSV")
    b.add_argument("--plot", default=None, metavar="OUT.png", help="plot quality and speed against size")
    b.add_argument("--backend", default="auto", choices=("auto", "numba", "mlx"),
                   help="auto (default: mlx on Apple Silicon, else numba), numba or mlx")
    b.add_argument("-t", "--threads", type=int, default=None, metavar="N", help="CPU threads (default: physical cores)")
    b.add_argument("--kv-type", default="f16", choices=KV_TYPES, help="KV cache element type (default f16)")


def command(args) -> int:
    s = BenchSettings(source=args.model, levels=parse_levels(args.quants), n_prompt=args.n_prompt,
                      n_gen=args.n_gen, ppl_file=Path(args.ppl_file), ppl_ctx=args.ppl_ctx,
                      ppl_chunks=args.ppl_chunks, ref=args.ref, ref_file=args.ref_file, save_ref=args.save_ref,
                      backend=args.backend, threads=args.threads, kv_type=args.kv_type)
    s.check()
    check_json_dest(args.json)
    json_file = args.json if args.json != "-" else None
    for path in (json_file, args.csv, args.plot):  # fail now, not after an hour of measuring
        if path and not Path(path).resolve().parent.is_dir():
            raise UsageError(f"mixlocal bench: cannot write {path}: no such directory")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise BenchError("--plot needs matplotlib: pip install 'mixlocal[bench]'") from None
    report = run_bench(s)
    if args.json == "-":  # JSON takes the table's place on stdout (JSON_HELP's convention)
        print(json.dumps(report, indent=2))
    else:
        print(format_table(report))
    if json_file:
        write_json(report, Path(json_file))
    if args.csv:
        write_csv(report, Path(args.csv))
    if args.plot:
        write_plot(report, Path(args.plot))
    return 0

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
                    "q4_k_s", "q4_1", "iq4_nl", "q4_0", "iq4_xs", "q3_k_l", "q3_k_m", "iq3_m", "iq3_s", "q3_k_s",
                    "iq3_xs", "iq3_xxs", "q2_k", "iq2_m", "iq2_s", "iq2_xs", "iq2_xxs", "iq1_m", "iq1_s")
# What the side-by-side comparison of a run with --imatrix shows of each level, without and with the matrix
COMPARED = ("size_bytes", "bits_per_weight", "kld", "top1", "ppl")


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
    imatrix: Path | None = None       # measure every level also quantized with this importance matrix

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
        if self.imatrix is not None and not Path(self.imatrix).is_file():
            raise BenchError(f"{self.imatrix}: importance matrix not found")

    def reference_level(self, skipped: dict | None = None) -> str | None:
        """The level measured first, whose distributions the others are compared with: --ref, else the least
        quantized of the run that can be measured without an importance matrix; None with --ref-file."""
        if self.ref_file is not None:
            return None
        skipped = skipped or {}
        if self.ref is not None:
            if (self.ref, False) in skipped:
                raise BenchError(f"--ref {self.ref} cannot be measured: {skipped[(self.ref, False)]}")
            return self.ref
        plain = [q for q in self.levels if (q, False) not in skipped]
        if not plain:
            raise BenchError("no level of the run can be measured without an importance matrix to serve as the "
                             "reference; add one (such as q8_0) to --quants, or give --ref-file")
        return least_quantized(plain)


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


def _refusals(weights, levels: list[str], imatrix) -> dict[tuple[str, bool], str]:
    """{(level, with imatrix): why it cannot be measured}: a format we cannot encode yet, or one llama.cpp makes only
    with an importance matrix, found before any worker starts (engine.quantize.check_level)."""
    from ..quantize import MissingImatrixError, MissingQuantizerError, check_level

    out = {}
    for level in levels:
        for with_imatrix in (False, True) if imatrix is not None else (False,):
            try:
                check_level(weights, level, imatrix if with_imatrix else None)
            except (MissingQuantizerError, MissingImatrixError) as e:
                out[(level, with_imatrix)] = str(e)
    return out


def _imatrix_changes_nothing(weights, level: str) -> bool:
    """True when the level's file is the same bytes with or without an importance matrix: the recipe picks the same
    formats and none of them reads one (f16, q8_0...), so measuring it twice would time the same model twice."""
    from mixlocal.quant.quantize import IMATRIX_TYPES

    from ..quantize import target_types
    plain = target_types(weights, level, False)
    return plain == target_types(weights, level, True) and not set(plain.values()) & set(IMATRIX_TYPES)


def run_bench(s: BenchSettings) -> dict:
    """Measure every level; return {"machine", "model", "results"} with rows in the order of s.levels.

    With s.imatrix every level is measured twice, quantized from the same source without and with the importance
    matrix: "results" holds both rows of each level (each marked "imatrix"), "comparison" one row per level with
    both variants' size and quality side by side. Levels that cannot be made are listed in "skipped" with the
    reason, and not measured."""
    from tqdm.auto import tqdm

    s.check()
    model, tokenizer, weights = _describe_source(s.source)
    imatrix = _read_imatrix(s.imatrix) if s.imatrix is not None else None
    skipped = _refusals(weights, s.levels, imatrix)
    ref_level = s.reference_level(skipped)
    variants = (False, True) if imatrix is not None else (False,)
    jobs = ([(ref_level, False)] if ref_level else []) + [(q, v) for q in s.levels for v in variants
                                                          if (q, v) != (ref_level, False) and (q, v) not in skipped]
    copies = {q for q in s.levels if imatrix is not None and (q, False) not in skipped
              and _imatrix_changes_nothing(weights, q)}
    jobs = [(q, v) for q, v in jobs if not (v and q in copies)]
    del weights
    # Fail before any level is measured, not after: the text must fill a chunk, a saved reference must match it.
    tokens = np.asarray(tokenizer.encode(Path(s.ppl_file).read_text(encoding="utf-8"), add_bos=False), np.int32)
    n_chunks = len(chunk_indices(tokens.size, s.ppl_ctx, s.ppl_chunks))
    if not n_chunks:
        raise BenchError(f"{s.ppl_file}: {tokens.size} tokens, fewer than one --ppl-ctx chunk of {s.ppl_ctx}")
    if s.ref_file is not None:
        Reference.load(Path(s.ref_file)).check_matches(tokens, s.ppl_ctx, n_chunks * (s.ppl_ctx - s.ppl_ctx // 2),
                                                        str(s.ref_file))
    rows: dict[tuple[str, bool], dict] = {}
    with tempfile.TemporaryDirectory(prefix="mixlocal-bench-") as tmp:
        ref_path = Path(s.ref_file) if s.ref_file else Path(s.save_ref or Path(tmp) / "reference.npz")
        for i, (level, with_imatrix) in enumerate(jobs):
            spec = {"source": s.source, "quant": level, "backend": s.backend, "threads": s.threads,
                    "kv_type": s.kv_type, "n_prompt": s.n_prompt, "n_gen": s.n_gen, "ppl_file": str(s.ppl_file),
                    "ppl_ctx": s.ppl_ctx, "ppl_chunks": s.ppl_chunks,
                    "imatrix": str(s.imatrix) if with_imatrix else None}
            is_ref = (level, with_imatrix) == (ref_level, False)
            if is_ref:
                spec["save_ref"] = str(ref_path)  # written first, then compared against by every level
                spec["ref_file"] = None
            else:
                spec["ref_file"] = str(ref_path)
            name = level + (" +imatrix" if with_imatrix else "")
            with tqdm(total=1, desc=f"[{i + 1}/{len(jobs)}] {name}", unit="step", leave=True,
                      disable=None, file=sys.stderr) as bar:
                bar.set_postfix_str("loading", refresh=True)
                row = _spawn(spec, bar)
            if is_ref:  # the reference against itself: zero divergence, full agreement, by definition
                row["kld"], row["top1"] = 0.0, 1.0
            rows[(level, with_imatrix)] = row
    for q in copies:
        rows[(q, True)] = dict(rows[(q, False)])
    model.update(reference=str(s.ref_file) if s.ref_file else ref_level, ppl_text=str(s.ppl_file),
                 ppl_ctx=s.ppl_ctx, n_prompt=s.n_prompt, n_gen=s.n_gen, kv_type=s.kv_type)
    report = {"machine": machine_info(s.backend, s.threads), "model": model, "results": []}
    for q in s.levels:
        for v in variants:
            if (q, v) in rows:
                row = {k: rows[(q, v)][k] for k in FIELDS}
                if imatrix is not None:
                    row["imatrix"] = v
                report["results"].append(row)
    if skipped:
        report["skipped"] = [{"quant": q, "imatrix": v, "reason": why} for (q, v), why in skipped.items()]
    if imatrix is not None:
        model["imatrix"] = str(s.imatrix)
        report["comparison"] = [_compare(q, rows.get((q, False)), rows.get((q, True)), q in copies)
                                for q in s.levels]
    return report


def _compare(level: str, plain: dict | None, weighted: dict | None, same: bool) -> dict:
    row = {"quant": level}
    for k in COMPARED:
        row[k] = None if plain is None else plain[k]
        row[k + "_imatrix"] = None if weighted is None else weighted[k]
    row["imatrix_changes_nothing"] = same  # its formats ignore an importance matrix: measured once
    return row


def _read_imatrix(path: Path):
    from mixlocal.quant.imatrix import read_imatrix
    try:
        return read_imatrix(path)
    except (OSError, ValueError) as e:
        raise BenchError(f"{path}: not an importance matrix llama.cpp or mixlocal wrote ({e})") from None


def _describe_source(source) -> tuple[dict, object, object]:
    """What the run measures, its tokenizer and its weights (mapped, not read: the recipes look at names and shapes);
    opening the source here also fails fast on an unreadable model."""
    from ..loader import open_source
    config, weights, tok, name = open_source(source)
    st = weight_stats(weights)
    return {"source": str(source) if source is not None else "embedded default", "name": name,
            "n_params": st["n_elements"], "source_size_bytes": st["size_bytes"],
            "n_layers": config.n_layers, "n_experts": config.n_experts, "dim": config.dim}, tok, weights


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

def _label(row: dict) -> str:
    return row["quant"] + (" +imatrix" if row.get("imatrix") else "")


def _grid(cells: list[list[str]]) -> list[str]:
    """Columns padded to their widest cell, the first left-aligned, a rule under the header row."""
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def _or_dash(fmt):
    return lambda v: "-" if v is None else fmt(v)


def format_table(report: dict) -> str:
    cols = [("quant", _label), ("size", lambda r: human_bytes(r["size_bytes"])),
            ("bpw", lambda r: f"{r['bits_per_weight']:.2f}"), ("load s", lambda r: f"{r['load_s']:.2f}"),
            ("pp t/s", lambda r: f"{r['pp_tps']:.1f}"), ("tg t/s", lambda r: f"{r['tg_tps']:.1f}"),
            ("peak RSS", lambda r: human_bytes(r["peak_rss_bytes"])), ("ppl", lambda r: f"{r['ppl']:.4f}"),
            ("kld", lambda r: _or_dash(lambda v: f"{v:.6f}")(r["kld"])),
            ("top1", lambda r: _or_dash(lambda v: f"{100 * v:.2f}%")(r["top1"]))]
    lines = _grid([[h for h, _ in cols]] + [[fmt(r) for _, fmt in cols] for r in report["results"]])
    m = report["model"]
    ref = m.get("reference")
    head = f"model {m.get('name', m.get('source'))}: prefill {m.get('n_prompt')} tokens, decode {m.get('n_gen')}; " \
           f"quality vs {ref} on {Path(str(m.get('ppl_text'))).name}"
    out = [head] + lines
    if report.get("comparison"):
        size, bpw = _or_dash(human_bytes), _or_dash(lambda v: f"{v:.2f}")
        kld, top1, ppl = _or_dash(lambda v: f"{v:.6f}"), _or_dash(lambda v: f"{100 * v:.2f}%"), \
            _or_dash(lambda v: f"{v:.4f}")
        pairs = [("size", "size_bytes", size), ("bpw", "bits_per_weight", bpw), ("kld", "kld", kld),
                 ("top1", "top1", top1), ("ppl", "ppl", ppl)]
        header = ["quant"] + [h + suffix for h, _, _ in pairs for suffix in ("", " +imx")]
        body = [[c["quant"] + (" (=)" if c["imatrix_changes_nothing"] else "")]
                + [fmt(c[k + suffix]) for _, k, fmt in pairs for suffix in ("", "_imatrix")]
                for c in report["comparison"]]
        note = f"without and with the importance matrix {m.get('imatrix')} (=: its formats ignore one, measured once)"
        out += ["", note] + _grid([header] + body)
    for sk in report.get("skipped", []):
        out.append(f"skipped {sk['quant']}{' +imatrix' if sk['imatrix'] else ''}: {sk['reason']}")
    return "\n".join(out)


def write_json(report: dict, path: Path) -> None:
    Path(path).write_text(json.dumps(report, indent=2) + "\n")


def write_csv(report: dict, path: Path) -> None:
    buf = io.StringIO()
    fields = list(FIELDS) + (["imatrix"] if "comparison" in report else [])
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    for r in report["results"]:
        w.writerow({k: ("" if r[k] is None else r[k]) for k in fields})
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
    """Quality against size and decode speed against size, each with its Pareto frontier drawn; a run with an
    importance matrix draws the levels without and with it as two series, each with its own frontier."""
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
    use_kld = all(r["kld"] is not None for r in rows)
    series = [("", [r for r in rows if not r.get("imatrix")], "tab:red")]
    if "comparison" in report:
        series = [(" without imatrix", series[0][1], "tab:red"),
                  (" with imatrix", [r for r in rows if r.get("imatrix")], "tab:blue")]
    panels = [(lambda r: r["kld"] if use_kld else r["ppl"], False,
               "KL divergence vs reference (lower is better)" if use_kld else "perplexity (lower is better)",
               "quality against size"),
              (lambda r: r["tg_tps"], True, "decode tokens/s (higher is better)", "decode speed against size")]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, (value, maximize, ylabel, title) in zip(axes, panels):
        for name, part, color in series:
            if not part:
                continue
            xs, ys = [r["size_bytes"] / scale for r in part], [value(r) for r in part]
            front = pareto_front(list(zip(xs, ys)), maximize_y=maximize)
            ax.scatter(xs, ys, facecolors="none", edgecolors=color, alpha=0.6, s=50, label="level" + name)
            ax.scatter([xs[i] for i in front], [ys[i] for i in front], color=color, s=50, zorder=3,
                       label="Pareto frontier" + name)
            ax.plot([xs[i] for i in front], [ys[i] for i in front], color=color, lw=1.2, zorder=2,
                    drawstyle="steps-post")
            for x, y, r in zip(xs, ys, part):
                ax.annotate(r["quant"], (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8, color=color)
        if not maximize and use_kld:
            ax.set_yscale("symlog", linthresh=1e-4)  # KL spans decades from q8_0 to iq2_xxs, and is 0 at the reference
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
    b.add_argument("--imatrix", default=None, metavar="FILE",
                   help="an importance matrix (mixlocal imatrix, or llama-imatrix's .gguf/.dat): every level is "
                        "measured twice, quantized from the same source without and with it, side by side")


def command(args) -> int:
    s = BenchSettings(source=args.model, levels=parse_levels(args.quants), n_prompt=args.n_prompt,
                      n_gen=args.n_gen, ppl_file=Path(args.ppl_file), ppl_ctx=args.ppl_ctx,
                      ppl_chunks=args.ppl_chunks, ref=args.ref, ref_file=args.ref_file, save_ref=args.save_ref,
                      backend=args.backend, threads=args.threads, kv_type=args.kv_type,
                      imatrix=Path(args.imatrix) if args.imatrix else None)
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

"""q4_moe at equal size: candidate rule tables for our MoE level against llama.cpp's K levels, all with one
importance matrix.

Quality is the KL divergence from f16 on the trained default model, measured by `mixlocal bench`'s own worker (same
text, chunks and coarsened reference). Size is counted at Mixtral-8x7B's real shapes (32 blocks, 8 experts of
14336x4096 per projection): that is the file a user downloads, and there the experts are over 95% of the bytes,
where on the tiny default model the 32000-row embedding and head are 70% of them, so the tiny model's own size would
price an 8-bit head as if it were the model.

The llama.cpp levels (q4_k_s, q4_k_m, q5_k_s, q5_k_m, q6_k) give a curve of log KL against Mixtral bytes; each q4_moe
candidate is compared with that curve interpolated at its own bytes. A candidate is a rule per tensor category:
a format, or "A@edge/B" (A in the first and last eighth of the blocks, B elsewhere), or "A@more_bits/B" (llama.cpp's
use_more_bits blocks). Each candidate runs in a worker process with recipes' q4_moe rule replaced by it.

    .venv/bin/python bench/bench_q4_moe.py --imatrix default.imatrix.gguf --out bench/results/q4_moe_study.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CURVE_LEVELS = ("q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")
CATEGORIES = ("token_embd", "output", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")

_EIGHT_BIT_REST = {"token_embd": "Q8_0", "output": "Q8_0", "attn_q": "Q8_0", "attn_k": "Q8_0", "attn_v": "Q8_0",
                   "attn_output": "Q8_0"}
# q4_k_m's choices for the tensors that are not experts, on an 8-expert model (recipes.py's table)
_Q4_K_M_REST = {"token_embd": "Q4_K", "output": "Q6_K", "attn_q": "Q4_K", "attn_k": "Q8_0", "attn_v": "Q8_0",
                "attn_output": "Q5_K"}
CANDIDATES: dict[str, dict[str, str]] = {
    "q4_moe": {**_EIGHT_BIT_REST, "ffn_gate": "Q4_K", "ffn_up": "Q4_K", "ffn_down": "Q6_K@edge/Q5_K"},
    "down_q5_k": {**_EIGHT_BIT_REST, "ffn_gate": "Q4_K", "ffn_up": "Q4_K", "ffn_down": "Q5_K"},
    "down_q6_k": {**_EIGHT_BIT_REST, "ffn_gate": "Q4_K", "ffn_up": "Q4_K", "ffn_down": "Q6_K"},
    "down_more_bits": {**_EIGHT_BIT_REST, "ffn_gate": "Q4_K", "ffn_up": "Q4_K", "ffn_down": "Q6_K@more_bits/Q5_K"},
    "up_q5_k": {**_EIGHT_BIT_REST, "ffn_gate": "Q4_K", "ffn_up": "Q5_K", "ffn_down": "Q6_K@edge/Q5_K"},
    "rest_as_q4_k_m": {**_Q4_K_M_REST, "ffn_gate": "Q4_K", "ffn_up": "Q4_K", "ffn_down": "Q6_K@edge/Q5_K"},
    "iq4_xs_gate_up": {**_EIGHT_BIT_REST, "ffn_gate": "IQ4_XS", "ffn_up": "IQ4_XS", "ffn_down": "Q6_K@edge/Q5_K"},
    "iq4_xs_down_q6_k": {**_EIGHT_BIT_REST, "ffn_gate": "IQ4_XS", "ffn_up": "IQ4_XS", "ffn_down": "Q6_K"},
}


def rule_function(rules: dict[str, str]):
    """(category, i, n) -> QType for recipes' q4_moe hook, from a candidate's rules."""
    from mixlocal.quant import QType
    from mixlocal.quant.recipes import _more_bits

    def pick(category: str, i: int, n: int):
        rule = rules.get(category, rules.get("attn_q"))  # "other" matrices: as attention
        if "@" not in rule:
            return QType[rule]
        hi, rest = rule.split("@")
        where, lo = rest.split("/")
        inside = (i < n // 8 or i >= 7 * n // 8) if where == "edge" else _more_bits(i, n)
        return QType[hi if inside else lo]
    return pick


def mixtral_bytes(level: str, rules: dict[str, str] | None = None, imatrix: bool = True) -> int:
    from mixlocal.quant import nbytes_for, recipes

    shapes = {"token_embd.weight": (32000, 4096), "output.weight": (32000, 4096), "output_norm.weight": (4096,)}
    for i in range(32):
        p = f"blk.{i}."
        shapes.update({p + "attn_norm.weight": (4096,), p + "ffn_norm.weight": (4096,),
                       p + "attn_q.weight": (4096, 4096), p + "attn_k.weight": (1024, 4096),
                       p + "attn_v.weight": (1024, 4096), p + "attn_output.weight": (4096, 4096),
                       p + "ffn_gate_inp.weight": (8, 4096), p + "ffn_gate_exps.weight": (8, 14336, 4096),
                       p + "ffn_up_exps.weight": (8, 14336, 4096), p + "ffn_down_exps.weight": (8, 4096, 14336)})
    saved = recipes._q4_moe_type
    if rules is not None:
        recipes._q4_moe_type = rule_function(rules)
    try:
        chosen = recipes.plan(level, shapes, n_experts=8, n_layers=32, imatrix=imatrix)
    finally:
        recipes._q4_moe_type = saved
    return sum(nbytes_for(chosen[name], shape) for name, shape in shapes.items())


def _run_worker(spec: dict, rules: dict[str, str] | None) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, __file__, "--worker", json.dumps(rules), json.dumps(spec)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
    results = [json.loads(line)["result"] for line in proc.stdout.splitlines() if line.startswith('{"result"')]
    if proc.returncode or not results:
        raise SystemExit(f"{spec['quant']} {rules}: worker failed:\n{proc.stderr[-2000:]}")
    return results[0]


def _worker(rules_json: str, spec_json: str) -> int:
    from mixlocal.engine.cli import bench_worker
    from mixlocal.quant import recipes

    rules = json.loads(rules_json)
    if rules is not None:
        recipes._q4_moe_type = rule_function(rules)
    return bench_worker.main([spec_json])


def curve_kl_at(curve: list[tuple[int, float]], nbytes: int) -> float | None:
    """log-KL interpolated linearly in bytes between the two curve points around nbytes (None outside the curve)."""
    pts = sorted(curve)
    for (b0, k0), (b1, k1) in itertools.pairwise(pts):
        if b0 <= nbytes <= b1:
            t = (nbytes - b0) / (b1 - b0) if b1 > b0 else 0.0
            return math.exp(math.log(k0) + t * (math.log(k1) - math.log(k0)))
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--imatrix", required=True, help="importance matrix of the default model (mixlocal imatrix)")
    ap.add_argument("--candidates", default=",".join(CANDIDATES), help="comma-separated names from CANDIDATES")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, help="write the JSON report here")
    args = ap.parse_args()
    from mixlocal.engine.cli.bench import machine_info
    from mixlocal.engine.loader import DEFAULT_MODEL

    ppl = ROOT / "engine" / "data" / "ppl_text.txt"
    base = {"source": str(DEFAULT_MODEL), "backend": "numba", "threads": args.threads, "kv_type": "f16",
            "n_prompt": 16, "n_gen": 4, "ppl_file": str(ppl), "ppl_ctx": 512, "ppl_chunks": None}
    rows = []
    with tempfile.TemporaryDirectory(prefix="q4moe-") as tmp:
        ref = str(Path(tmp) / "ref.npz")
        _run_worker({**base, "quant": "f16", "imatrix": None, "save_ref": ref, "ref_file": None}, None)
        for level in CURVE_LEVELS:
            r = _run_worker({**base, "quant": level, "imatrix": args.imatrix, "ref_file": ref}, None)
            rows.append({"name": level, "curve": True, "mixtral_bytes": mixtral_bytes(level),
                         "tiny_bytes": r["size_bytes"], "kld": r["kld"], "top1": r["top1"], "ppl": r["ppl"]})
            print(f"{level:16s} {rows[-1]['mixtral_bytes'] / 1e9:7.2f} GB  kld {r['kld']:.6f}", flush=True)
        curve = [(r["mixtral_bytes"], r["kld"]) for r in rows]
        for name in args.candidates.split(","):
            rules = CANDIDATES[name]
            r = _run_worker({**base, "quant": "q4_moe", "imatrix": args.imatrix, "ref_file": ref}, rules)
            nbytes = mixtral_bytes("q4_moe", rules)
            at = curve_kl_at(curve, nbytes)
            rows.append({"name": name, "curve": False, "rules": rules, "mixtral_bytes": nbytes,
                         "tiny_bytes": r["size_bytes"], "kld": r["kld"], "top1": r["top1"], "ppl": r["ppl"],
                         "curve_kld_at_bytes": at, "below_curve": None if at is None else r["kld"] < at})
            print(f"{name:16s} {nbytes / 1e9:7.2f} GB  kld {r['kld']:.6f}  curve there "
                  f"{'-' if at is None else f'{at:.6f}'}", flush=True)
    report = {"machine": machine_info("numba", args.threads), "imatrix": args.imatrix, "ppl_text": str(ppl),
              "reference": "f16", "size_at": "Mixtral-8x7B shapes (32 blocks, 8 experts, 4096/14336, vocab 32000)",
              "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        sys.exit(_worker(sys.argv[2], sys.argv[3]))
    main()

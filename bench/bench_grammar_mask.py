"""The cost of structured output: llguidance's token mask per token against the decode step, at Mixtral's shape.

    .venv/bin/python bench/bench_grammar_mask.py [--file SLICE.gguf] [--tokens 48] [--rounds 3] [--out FILE]

The file is a Mixtral-shape slice (bench/make_mixtral_slice.py: Mixtral's real matrices and its 32000-piece
vocabulary, 4 of its 32 blocks by default), so the mask works on the real vocabulary and the decode step is the real
per-block work; a whole Mixtral's step has 8 times the blocks, so the share measured here is an upper bound. For each
constraint (a nested JSON schema, a tool-call answer, a regex) and rounds alternating with unconstrained generation:
the mean mask time per token (what the generation loop spends in llguidance and applying the mask) and the decode
step. Writes bench/results/grammar_mask_<date>.json.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mixlocal.engine.machine import describe
from mixlocal.engine.tools import answer_schema, tool_spec

from mixlocal import engine

NESTED = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3},
    "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "integer"}},
                "required": ["city", "zip"]}},
    "required": ["name", "age", "tags", "address"]}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city"]}}}
CONSTRAINTS = {
    "json_schema": {"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": NESTED}}},
    "tool_call": {"response_format": {"type": "json_schema", "json_schema": {
        "name": "t", "schema": answer_schema(tool_spec([WEATHER], "auto"))}}},
    "regex": {"grammar": {"regex": "[a-z ]{1,200}\\."}},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--file", default=str(Path.home() / ".cache/mixlocal/bench/mixtral_shape_q4_k_m_4blk_v2.gguf"))
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    llm = engine.load(args.file, n_ctx=512, n_threads=args.threads)
    prompt = "The answer, as JSON:"
    llm.generate(prompt, max_tokens=4, temperature=0)  # compile and map everything once
    runs: dict[str, list] = {name: [] for name in ["none", *CONSTRAINTS]}
    for rnd in range(args.rounds):
        for name in (["none", *CONSTRAINTS] if rnd % 2 == 0 else [*CONSTRAINTS, "none"][::-1]):
            llm.reset()
            kw = CONSTRAINTS.get(name, {})
            r = llm.generate(prompt, max_tokens=args.tokens, temperature=1.0, seed=rnd, **kw)
            t = r.timings
            runs[name].append({"decode_ms_per_token": 1000 * t["decode_s"] / max(1, t["decode_tokens"]),
                               "mask_ms_per_token": t.get("grammar_mask_ms_per_token", 0.0),
                               "tokens": len(r.tokens), "finish": r.finish_reason})
    summary = {}
    for name, rs in runs.items():
        step = statistics.median(x["decode_ms_per_token"] for x in rs)
        mask = statistics.median(x["mask_ms_per_token"] for x in rs)
        summary[name] = {"decode_ms_per_token": round(step, 3), "mask_ms_per_token": round(mask, 4),
                         "mask_share_of_step": round(mask / step, 5) if step else None}
    result = {"date": dt.date.today().isoformat(), "command": " ".join(sys.argv), "machine": describe(),
              "file": args.file, "kernels": llm.backend.kernels, "threads": args.threads, "tokens": args.tokens,
              "rounds": args.rounds, "summary": summary, "runs": runs}
    print(json.dumps(summary, indent=1))
    out = args.out or ROOT / "bench" / "results" / f"grammar_mask_{result['date']}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    main()

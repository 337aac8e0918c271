"""Our MLX backend against mlx-lm on the same mlx-community folder, on this machine's CPU (mlx[cpu]).

    .venv/bin/python bench/bench_mlx.py [--layers 4] [--dim 1024] [--ffn 3584] [--prompt 128] [--decode 32]
                                        [--repeats 3] [--float16-too] [--out bench/results/mlx_cpu.json]

This is MLX's CPU backend on a shared 2-core x86 machine, not a statement about Apple Silicon speed: it checks that
our backend costs no more than mlx-lm for the same work. The model is Mixtral-shaped (8 experts, 2 active, GQA,
32000 vocabulary) with random weights, written once by engine.sources.mlx.write_mlx_folder (4-bit, groups of 64) and
loaded by both. Each side runs its own generation API end to end, greedy:
  ours     engine.load(folder, backend="mlx").generate(prompt_ids, max_tokens=N, temperature=0)   (float32 on CPU)
  mlx-lm   mlx_lm.stream_generate(model, tokenizer, prompt_ids, max_tokens=N) after model.set_dtype(float32), our
           precision; with --float16-too also as loaded (float16 scales, so float16 activations, which MLX's CPU
           backend emulates: expect it far slower)
Reported: prefill and decode tokens/s as each side measures them, medians over --repeats rounds, and the ratios
ours / mlx-lm. Other people share this machine, so the load average goes in the record too.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mistral_common
import mlx.core as mx
from machine import describe_run
from mixlocal.engine.config import ModelConfig
from mixlocal.engine.sources.mlx import write_mlx_folder
from mixlocal.engine.weights import LayerWeights, ModelWeights
from mixlocal.quant import QTensor, QType

TOKENIZER = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"


def random_weights(c: ModelConfig, seed: int = 0) -> ModelWeights:
    """Random float16 weights at a width where activations neither vanish nor explode; the router is scaled up so
    tokens spread over the experts as in a trained model."""
    rng = np.random.default_rng(seed)

    def mat(*shape):
        return QTensor.from_float(rng.standard_normal(shape, dtype=np.float32) / np.sqrt(shape[-1]), QType.F16)

    layers = [LayerWeights(
        attn_norm=np.ones(c.dim, np.float32), ffn_norm=np.ones(c.dim, np.float32),
        wq=mat(c.q_dim, c.dim), wk=mat(c.kv_dim, c.dim), wv=mat(c.kv_dim, c.dim), wo=mat(c.dim, c.q_dim),
        router=rng.standard_normal((c.n_experts, c.dim), dtype=np.float32) * 0.3,
        w1=mat(c.n_experts, c.ffn_dim, c.dim), w3=mat(c.n_experts, c.ffn_dim, c.dim),
        w2=mat(c.n_experts, c.dim, c.ffn_dim)) for _ in range(c.n_layers)]
    return ModelWeights(config=c, tok_embd=mat(c.vocab_size, c.dim), layers=layers,
                        norm=np.ones(c.dim, np.float32), output=mat(c.vocab_size, c.dim))


def run_ours(folder: Path, prompt: list[int], n: int) -> tuple[float, float, list[int]]:
    from mixlocal import engine
    llm = engine.load(folder, backend="mlx", n_ctx=4096)
    llm.generate(prompt[:8], max_tokens=2, temperature=0)  # warm-up
    llm.reset()
    res = llm.generate(prompt, max_tokens=n, temperature=0)
    return res.timings["prefill_tps"], res.timings["decode_tps"], res.tokens


def run_mlx_lm(folder: Path, prompt: list[int], n: int, float32: bool) -> tuple[float, float, list[int]]:
    import mlx_lm
    model, tokenizer = mlx_lm.load(str(folder))
    if float32:
        model.set_dtype(mx.float32)
    for _ in mlx_lm.stream_generate(model, tokenizer, prompt[:8], max_tokens=2):  # warm-up
        pass
    tokens, last = [], None
    for last in mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=n):
        tokens.append(last.token)
    return last.prompt_tps, last.generation_tps, tokens


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=3584)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--float16-too", action="store_true", help="also time mlx-lm in its float16 default")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "mlx_cpu.json")
    args = ap.parse_args()

    c = ModelConfig(vocab_size=32000, dim=args.dim, n_layers=args.layers, n_heads=args.dim // 128, n_kv_heads=2,
                    head_dim=128, ffn_dim=args.ffn, n_experts=8, n_experts_used=2, name="bench-mixtral-shape")
    rng = np.random.default_rng(1)
    prompt = [1] + rng.integers(100, 31000, args.prompt - 1).tolist()
    rows = {"ours (float32)": [], "mlx-lm (float32)": []}
    if args.float16_too:
        rows["mlx-lm (as loaded, float16)"] = []
    agree = {}
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        folder = write_mlx_folder(random_weights(c), TOKENIZER, Path(tmp) / "model", bits=4, group_size=64)
        write_s = time.perf_counter() - t
        size_mb = sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 1e6
        for r in range(args.repeats):  # interleaved so that load from other users hits every side alike
            for name, timings in rows.items():
                if name.startswith("ours"):
                    out = run_ours(folder, prompt, args.decode)
                else:
                    out = run_mlx_lm(folder, prompt, args.decode, float32="float32" in name)
                timings.append(out[:2])
                agree[name] = out[2]
                print(f"round {r}: {name:28s} prefill {out[0]:8.1f} tok/s   decode {out[1]:7.1f} tok/s", flush=True)

    def med(name, i):
        return statistics.median(x[i] for x in rows[name])

    result = {
        "what": "our MLX backend vs mlx-lm, same 4-bit mlx-community folder, greedy generation, MLX CPU backend",
        "device": "cpu (mlx[cpu] on Linux x86_64) - not Apple Silicon / Metal",
        **describe_run(), "load_average_at_end": os.getloadavg(),
        "versions": {"mlx": mx.__version__, "mlx_lm": __import__("mlx_lm").__version__},
        "model": {"layers": c.n_layers, "dim": c.dim, "ffn_dim": c.ffn_dim, "experts": "8 (2 active)",
                  "heads": f"{c.n_heads} q / {c.n_kv_heads} kv x {c.head_dim}", "vocab": c.vocab_size,
                  "quantization": "affine 4-bit, group 64, float16 scales", "safetensors_mb": round(size_mb, 1),
                  "write_mlx_folder_s": round(write_s, 2)},
        "prompt_tokens": args.prompt, "decode_tokens": args.decode, "repeats": args.repeats,
        "tokens_per_s_median": {name: {"prefill": round(med(name, 0), 2), "decode": round(med(name, 1), 2)}
                                for name in rows},
        "ratio_ours_over_mlx_lm": {
            ref: {"prefill": round(med("ours (float32)", 0) / med(ref, 0), 3),
                  "decode": round(med("ours (float32)", 1) / med(ref, 1), 3)}
            for ref in rows if ref.startswith("mlx-lm")},
        "greedy_tokens_same_as_mlx_lm_float32": agree["ours (float32)"] == agree["mlx-lm (float32)"],
        "all_rounds": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("tokens_per_s_median", "ratio_ours_over_mlx_lm",
                                             "greedy_tokens_same_as_mlx_lm_float32")}, indent=2))
    print(f"wrote {args.out}")
    return 0




if __name__ == "__main__":
    sys.exit(main())

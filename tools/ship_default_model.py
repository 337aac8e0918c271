"""Turn the trained default model's bf16 export into the q8_0 GGUF the package ships, and measure what it costs.

    .venv/bin/python tools/ship_default_model.py [--hf engine/data/default] [--out engine/data/default/model.gguf]

Runs after tools/train_default_model.py. Quantizes with our own quantizer (mixlocal's GGUF writer, level q8_0),
measures the mean KL divergence of the GGUF's next-token distributions against the bf16 weights over the packaged
perplexity text (the bar is < 1e-3), records it in bench/results/default_model_q8_0.json, and moves the bf16 export
out of the package (to tools/.cache/default_hf) so that only the GGUF is installed and committed.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mixlocal.engine.export import write_gguf
from mixlocal.engine.sources.hf import load_hf
from mixlocal.tokenizer import Tokenizer

from mixlocal import engine


def mean_kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    def logsoftmax(z):
        z = z.astype(np.float64) - z.max(axis=-1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    lp, lq = logsoftmax(p_logits), logsoftmax(q_logits)
    return float((np.exp(lp) * (lp - lq)).sum(axis=-1).mean())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hf", type=Path, default=ROOT / "engine" / "data" / "default")
    ap.add_argument("--out", type=Path, default=ROOT / "engine" / "data" / "default" / "model.gguf")
    ap.add_argument("--keep-hf", type=Path, default=ROOT / "tools" / ".cache" / "default_hf")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--window", type=int, default=256)
    args = ap.parse_args()

    _, weights, tok_path = load_hf(args.hf)
    tok = Tokenizer.from_file(tok_path)
    t0 = time.perf_counter()
    write_gguf(weights, tok, args.out, "q8_0", name="mixlocal-default-tiny-mixtral")
    quantize_s = time.perf_counter() - t0

    text = (ROOT / "engine" / "data" / "ppl_text.txt").read_text()
    ids = tok.encode(text, add_bos=False)
    bf16 = engine.load(args.hf, n_ctx=args.window + 1, kv_type="f32")
    q8 = engine.load(args.out, n_ctx=args.window + 1, kv_type="f32")
    kls = []
    for w in range(args.windows):
        chunk = [tok.bos_id] + ids[w * args.window:(w + 1) * args.window - 1]
        bf16.reset()
        q8.reset()
        kls.append(mean_kl(bf16.eval(chunk), q8.eval(chunk)))
    result = {
        "file": args.out.name, "bytes": args.out.stat().st_size,
        "bf16_bytes": (args.hf / "model.safetensors").stat().st_size,
        "kl_q8_0_vs_bf16": float(np.mean(kls)), "kl_per_window": kls, "bar": 1e-3,
        "text": "engine/data/ppl_text.txt", "windows": args.windows, "window_tokens": args.window,
        "quantize_s": quantize_s, "command": "python tools/ship_default_model.py", "date": time.strftime("%Y-%m-%d"),
    }
    out = ROOT / "bench" / "results" / "default_model_q8_0.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("bytes", "bf16_bytes", "kl_q8_0_vs_bf16")}, indent=2))
    if result["kl_q8_0_vs_bf16"] >= 1e-3:
        print("KL divergence is over the 1e-3 bar", file=sys.stderr)
        return 1
    args.keep_hf.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors", "tokenizer.model"):
        if (args.hf / name).exists():
            shutil.move(str(args.hf / name), str(args.keep_hf / name))
    return 0


if __name__ == "__main__":
    sys.exit(main())

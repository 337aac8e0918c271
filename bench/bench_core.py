"""Prefill and decode tokens/s of mixlocal against transformers on the same tiny Mixtral, in the same run.

    .venv/bin/python bench/bench_core.py [--rounds 5] [--prompt 128] [--decode 32] [--out bench/results/...]

Rounds alternate between the two engines; medians are reported (the machine is shared and noisy). transformers
runs float32 on the same bf16 checkpoint; mixlocal reads the bf16 weights as they are stored.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def time_mixlocal(llm, prompt, n_decode):
    llm.reset()
    t0 = time.perf_counter()
    logits = llm.eval(prompt, logits="last")
    t1 = time.perf_counter()
    tok = int(np.argmax(logits[-1]))
    for _ in range(n_decode):
        tok = int(np.argmax(llm.eval([tok], logits="last")[-1]))
    t2 = time.perf_counter()
    return len(prompt) / (t1 - t0), n_decode / (t2 - t1)


def time_transformers(model, prompt, n_decode):
    import torch
    ids = torch.tensor([prompt])
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model(ids, use_cache=True, logits_to_keep=1)
        t1 = time.perf_counter()
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(n_decode):
            out = model(tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t2 = time.perf_counter()
    return len(prompt) / (t1 - t0), n_decode / (t2 - t1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "core_tiny_vs_transformers.json")
    args = ap.parse_args()

    import torch
    from conftest import TINY, make_hf_checkpoint
    from transformers import MixtralForCausalLM

    import engine

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = make_hf_checkpoint(Path(tmp) / "tiny")
        llm = engine.load(hf_dir, n_ctx=args.prompt + args.decode + 8, n_threads=args.threads, kv_type="f32")
        ref = MixtralForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        rng = np.random.default_rng(0)
        prompt = [1] + rng.integers(3, 32000, args.prompt - 1).tolist()
        time_mixlocal(llm, prompt[:16], 2)      # JIT warm-up, not timed
        time_transformers(ref, prompt[:16], 2)
        ours, theirs = [], []
        for _ in range(args.rounds):
            ours.append(time_mixlocal(llm, prompt, args.decode))
            theirs.append(time_transformers(ref, prompt, args.decode))

    def med(rows, i):
        return statistics.median(r[i] for r in rows)
    result = {
        "machine": {"cpu": cpu_model(), "threads": args.threads, "platform": platform.platform(),
                    "load_average_at_end": os.getloadavg(),
                    "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default")},
        "model": {"kind": "tiny random Mixtral (tests/conftest.py TINY)", **TINY},
        "prompt_tokens": args.prompt, "decode_tokens": args.decode, "rounds": args.rounds,
        "mixlocal": {"prefill_tps": med(ours, 0), "decode_tps": med(ours, 1)},
        "transformers_f32": {"prefill_tps": med(theirs, 0), "decode_tps": med(theirs, 1)},
        "ratio": {"prefill": med(ours, 0) / med(theirs, 0), "decode": med(ours, 1) / med(theirs, 1)},
        "raw": {"mixlocal": ours, "transformers_f32": theirs},
        "command": "python bench/bench_core.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("mixlocal", "transformers_f32", "ratio")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

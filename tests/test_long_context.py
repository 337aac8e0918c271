"""Long context on the tiny checkpoint: a 4,096-token prompt against transformers for each KV format, attention
scratch that does not grow with the prompt, and what happens at the end of the context.

The prompt is the project's perplexity text (natural English, repeated to 4,096 tokens), fed in chunks of several
sizes. Each KV format is compared twice with transformers (float32): once as it is, which measures the cost of the
format, and once with transformers' keys and values passed through the same rounding (float16, or gguf-py's Q8_0
quantize/dequantize) inside its attention, which checks our implementation of the format on its own.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from conftest import mean_kl, reference_logits, rel_err

from mixlocal import engine

N_PROMPT = 4096
CHUNKS = (700, 1, 300, 33, 1024, 512, 7, 1455)  # then the last TAIL tokens with logits for every position
TAIL = 64
assert sum(CHUNKS) + TAIL == N_PROMPT

# Measured on this fixture and prompt (KL is mean_kl over the compared rows):
#   f32 cache   rel 1.3e-5 against plain transformers
#   f16 cache   KL 1.40e-6 against plain transformers, which is what float16 K/V cost transformers itself (1.40e-6);
#               KL 2.7e-9, rel 5.9e-5 against transformers with float16 K/V
#   q8_0 cache  KL 5.2e-3 against plain transformers (rel 0.27: a few routing flips in the random MoE);
#               KL 1.1e-6 against transformers with gguf-py Q8_0 K/V (rounding boundaries amplify float32 noise)
F16_ROUNDED_KL_BOUND = 1e-7
Q8_0_ROUNDED_KL_BOUND = 1e-5
Q8_0_KL_BOUND = 1e-2  # the stated cost of a q8_0 cache on this fixture: KL against plain transformers


def prompt_ids(tokenizer) -> list[int]:
    text = (Path(engine.__file__).parent / "data" / "ppl_text.txt").read_text()
    ids = tokenizer.encode(text, add_bos=True)
    return (ids * (N_PROMPT // len(ids) + 1))[:N_PROMPT]


def run_chunked(llm, ids) -> tuple[list[int], np.ndarray]:
    """Positions and logits: the last row of each chunk, then every row of the tail."""
    llm.reset()
    positions, rows, pos = [], [], 0
    for size in CHUNKS:
        rows.append(llm.eval(ids[pos:pos + size], logits="last")[-1])
        pos += size
        positions.append(pos - 1)
    tail = llm.eval(ids[pos:], logits="all")
    return positions + list(range(pos, N_PROMPT)), np.concatenate([np.stack(rows), tail])


def kv_rounding_attention(inner, kind: str):
    """A transformers attention function that rounds keys and values as a `kind` cache would, then runs `inner`."""
    import torch

    def rounded(x):
        a = x.detach().float().numpy()
        if kind == "f16":
            b = a.astype(np.float16).astype(np.float32)
        else:
            q8 = gguf.GGMLQuantizationType.Q8_0
            b = gguf.quants.dequantize(gguf.quants.quantize(a, q8), q8).reshape(a.shape)
        return torch.from_numpy(np.ascontiguousarray(b, dtype=np.float32))

    def attention(module, query, key, value, *args, **kwargs):
        return inner(module, query, rounded(key), rounded(value), *args, **kwargs)
    return attention


@pytest.fixture(scope="module")
def long_run(hf_model_dir, hf_reference):
    """Our logits per KV format and transformers' per rounding, at the compared positions."""
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    # One thread: the numerics do not depend on it (test_kv_cache runs the kernel with 2 workers and key splits),
    # and on a shared 2-core machine spinning OpenMP barriers make a 2-thread run of the tiny model 20x slower.
    ours = {kv: engine.load(hf_model_dir, n_ctx=N_PROMPT, kv_type=kv, n_threads=1) for kv in ("f32", "f16", "q8_0")}
    ids = prompt_ids(ours["f32"].tokenizer)
    results = {}
    for kv, llm in ours.items():
        positions, results[kv] = run_chunked(llm, ids)
    refs = {"plain": reference_logits(hf_reference, ids)[positions]}
    base = hf_reference.config._attn_implementation
    try:
        for kind in ("f16", "q8_0"):
            AttentionInterface.register(f"mixlocal_kv_{kind}", kv_rounding_attention(ALL_ATTENTION_FUNCTIONS[base], kind))
            hf_reference.set_attn_implementation(f"mixlocal_kv_{kind}")
            refs[kind] = reference_logits(hf_reference, ids)[positions]
    finally:
        hf_reference.set_attn_implementation(base)
    return results, refs


def test_f32_cache_matches_transformers_at_4k(long_run):
    ours, refs = long_run
    assert rel_err(ours["f32"], refs["plain"]) < 1e-3


def test_f16_cache_matches_transformers_at_4k(long_run):
    ours, refs = long_run
    # Our implementation of the format: transformers with float16 keys and values gives the same logits.
    assert rel_err(ours["f16"], refs["f16"]) < 1e-3
    assert mean_kl(refs["f16"], ours["f16"]) < F16_ROUNDED_KL_BOUND
    # The format's cost against plain transformers is what float16 K/V cost transformers itself (and no more).
    # Issue 10 asked for KL < 1e-6 here; on this fixture no float16 cache can give that: transformers' own
    # float16 K/V land at 1.4e-6.
    own_cost = mean_kl(refs["plain"], refs["f16"])
    assert mean_kl(refs["plain"], ours["f16"]) < 1.1 * own_cost + 1e-8
    assert rel_err(ours["f16"], refs["plain"]) < 3e-3


def test_q8_0_cache_stays_within_its_measured_bound_at_4k(long_run):
    ours, refs = long_run
    assert mean_kl(refs["q8_0"], ours["q8_0"]) < Q8_0_ROUNDED_KL_BOUND
    assert mean_kl(refs["plain"], ours["q8_0"]) < Q8_0_KL_BOUND


# ------------------------------------------------------------------ scratch memory

SCRATCH_PROBE = r"""
import json, sys
import numpy as np
from mixlocal import engine
from mixlocal.engine.backends.numba import ops as numba_ops

path, chunk = sys.argv[1], int(sys.argv[2])
scratch = []
make_workspace = numba_ops._workspace


def recording_workspace(plan):  # every scratch array the kernel gets comes from here
    ws = make_workspace(plan)
    scratch.append(sum(a.nbytes for a in ws.values()))
    return ws


numba_ops._workspace = recording_workspace
kernel = numba_ops.attention


def naive_attention(q, k_cache, v_cache, pos0, scale, out):
    # the control: what an attention holding a (T x keys) score matrix per head costs
    scores = np.ones((q.shape[1], q.shape[0], pos0 + q.shape[0]), np.float32)
    out = kernel(q, k_cache, v_cache, pos0, scale, out)
    out[0, 0, 0] += scores[-1, -1, -1] - 1
    return out


def status_kib(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])


llm = engine.load(path, n_ctx=4096, kv_type="f16", n_threads=1)
ids = np.random.default_rng(0).integers(3, llm.config.vocab_size, 4096)
for s in range(0, 4096, chunk):  # every code path once: lazy compiles and first touches are not growth
    llm.eval(ids[s:s + chunk], logits="last")
out = {}
for mode in ("blocked", "naive"):
    numba_ops.attention = kernel if mode == "blocked" else naive_attention
    for n in (1024, 4096):
        llm.reset()  # gives the cache's pages back
        scratch.clear()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak (VmHWM) restarts from the current RSS
        base = status_kib("VmRSS")
        for s in range(0, n, chunk):
            llm.eval(ids[s:s + chunk], logits="last")
        out[f"{mode}_{n}"] = {"growth": (status_kib("VmHWM") - base) * 1024, "kv": llm.cache.bytes_in_use,
                              "scratch": max(scratch)}
print(json.dumps(out))
"""


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc/self/clear_refs")
def test_attention_scratch_does_not_grow_with_the_prompt(hf_model_dir):
    """Peak RSS growth over a prompt, minus the KV bytes it stores, is the same for 1K and 4K tokens fed in equal
    chunks. The same probe with a naive attention (a T x keys score matrix) shows the growth it would catch."""
    # One thread, as in long_run: scratch is per worker, so a second thread doubles it for 1K and 4K alike.
    proc = subprocess.run([sys.executable, "-c", SCRATCH_PROBE, str(hf_model_dir), "512"], check=False,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.splitlines()[-1])
    extra = {k: v["growth"] - v["kv"] for k, v in r.items()}
    tolerance = 1 << 20
    assert r["blocked_1024"]["kv"] * 4 == r["blocked_4096"]["kv"] > 0
    assert r["blocked_1024"]["scratch"] == r["blocked_4096"]["scratch"] < 1 << 20
    assert abs(extra["blocked_4096"] - extra["blocked_1024"]) < tolerance, r
    # the control: 4 heads x 512 queries x 3K more keys x 4 bytes = 24 MiB more at 4K (18 measured: malloc
    # reuses some freed memory), and the probe sees it
    assert extra["naive_4096"] - extra["naive_1024"] > 8 * tolerance, r


# ------------------------------------------------------------------ the end of the context

@pytest.mark.parametrize("kv_type", ["f16", "q8_0"])
def test_overflow_at_n_ctx_raises_and_keeps_the_cache(hf_model_dir, kv_type):
    llm = engine.load(hf_model_dir, n_ctx=600, kv_type=kv_type, n_threads=1)
    ids = list(np.random.default_rng(3).integers(3, llm.config.vocab_size, 601))
    llm.eval(ids[:590], logits="last")
    with pytest.raises(engine.ContextOverflowError, match="n_ctx 600"):
        llm.eval(ids[590:601])
    assert llm.n_past == 590
    llm.eval(ids[590:600], logits="last")  # exactly full is fine
    assert llm.n_past == 600
    with pytest.raises(engine.ContextOverflowError):
        llm.eval(ids[:1])
    with pytest.raises(engine.ContextOverflowError):
        llm.generate(ids, max_tokens=1)  # a prompt longer than the context


def test_generation_reaching_n_ctx_ends_with_length(hf_model_dir):
    llm = engine.load(hf_model_dir, n_ctx=600, kv_type="f16", n_threads=1)
    prompt = list(np.random.default_rng(4).integers(3, llm.config.vocab_size, 580))
    res = llm.generate(prompt, max_tokens=100, temperature=0)
    assert res.finish_reason == "length"
    # 20 positions were free: each generated token but the last is evaluated into the cache
    assert len(res.tokens) == 600 - 580 + 1 and llm.n_past == 600

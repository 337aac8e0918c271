"""The CPU backend: numba kernels turn (weights, tokens, cache) into logits.

Letters: T tokens in this call, D model width, H query heads, Hkv KV heads, Dh head width, E experts,
A active experts per token, F expert hidden width, V vocabulary.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from quant import formats, kernels

from ..cache import KVCache
from ..config import ModelConfig
from ..packed_cache import prepare_weights
from ..weights import ModelWeights
from . import numba_ops as ops

__all__ = ["NumbaCPUBackend", "RouterTrace"]

# the matrices the kernels multiply by (GGUF name part -> layer attribute); the embedding is only gathered from
_PREPARED = {"attn_q": "wq", "attn_k": "wk", "attn_v": "wv", "attn_output": "wo", "ffn_gate_exps": "w1",
             "ffn_up_exps": "w3", "ffn_down_exps": "w2", "output": "output"}


@dataclass
class RouterTrace:
    """The named intermediates of one MoE block, so backends can be compared step by step."""
    logits: np.ndarray     # (T, E) float32
    expert_ids: np.ndarray  # (T, A) int64
    weights: np.ndarray    # (T, A) float32, renormalised over the A chosen


def route(h: np.ndarray, router: np.ndarray, n_used: int) -> RouterTrace:
    """Softmax over all experts in float32, take the top A, renormalise them (transformers' Mixtral)."""
    logits = h @ router.T                                           # (T, E)
    z = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(z)
    probs /= probs.sum(axis=1, keepdims=True)
    ids = np.argsort(-probs, axis=1, kind="stable")[:, :n_used]     # (T, A)
    w = np.take_along_axis(probs, ids, axis=1)
    w /= w.sum(axis=1, keepdims=True)
    return RouterTrace(logits, ids, w.astype(np.float32))


def limit_openmp_spinning() -> None:
    """Let numba's OpenMP threads spin only briefly (GOMP_SPINCOUNT=10000, ~10-50 us) before they sleep between
    parallel regions, unless the user set OMP_WAIT_POLICY or GOMP_SPINCOUNT.

    libgomp's default spins ~100x longer: a team thread keeps its core busy after each region, and every BLAS call
    (whose own threads then share those cores) and every other process waits for it. Sleeping at once costs a wake-up
    per region instead. Measured on this 2-core machine (bench/bench_omp_wait.py, two runs an hour apart,
    bench/results/omp_wait_policy_2026-11-28*.json): the tiny model's 128-token prefill (bf16: BLAS between numba
    kernels) took 197 ms spinning, 24 ms with short spins, 11 ms sleeping at once; on the Mixtral-shape Q4_0 slice
    decode ran 28.4 / 28.3 / 27.3 tok/s in the first run and 26.1 / 25.7 / 23.5 in the second, prefill within noise.
    libgomp reads the variable when it loads, at numba's first parallel launch, so this must run before that; once
    loaded it is too late and this does nothing."""
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return
    from numba.np.ufunc import parallel
    if not getattr(parallel, "_is_initialized", False):
        os.environ["GOMP_SPINCOUNT"] = "10000"


class NumbaCPUBackend:
    name = "numba"

    def __init__(self, weights: ModelWeights, n_threads: int, packed_cache: bool | None = None):
        """packed_cache: keep repacked weights in a mapped cache file (see engine/packed_cache.py); None decides
        by size."""
        self.config: ModelConfig = weights.config
        self.n_threads = n_threads
        self.w = weights
        c = self.config
        limit_openmp_spinning()
        ops.set_threads(n_threads)  # the repack kernels run on numba's threads too
        named = {name: t for name, t in weights.tensors().items() if name.split(".")[-2] in _PREPARED}
        prepared = prepare_weights(named, weights.origin, use_cache=packed_cache)
        self.mats = [{attr: prepared[f"blk.{i}.{name}.weight"] for name, attr in _PREPARED.items()
                      if name != "output"} for i in range(c.n_layers)]
        self.output = prepared["output.weight"]
        self.inv_freq = 1.0 / (c.rope_theta ** (np.arange(0, c.head_dim, 2, dtype=np.float64) / c.head_dim))
        self.pairs = ops.rope_pairs(c.head_dim, c.rope_pairing)
        self.scale = np.float32(1.0 / np.sqrt(c.head_dim))
        self.trace: list[RouterTrace] | None = None  # set to [] to record router intermediates

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        t = self.w.tok_embd
        return np.ascontiguousarray(formats.dequantize(t.qtype, t.rows_view()[tokens]), dtype=np.float32)

    def forward(self, tokens: np.ndarray, cache: KVCache, last_only: bool) -> np.ndarray:
        """Run T tokens at positions cache.n_past.. and advance the cache. Returns (T, V) or (1, V) logits."""
        c = self.config
        ops.set_threads(self.n_threads)
        n_tok = tokens.shape[0]
        pos0 = cache.n_past
        cache.check_room(n_tok)
        positions = np.arange(pos0, pos0 + n_tok, dtype=np.float64)
        x = self.embed(tokens)                                                    # (T, D)
        for li, lw in enumerate(self.w.layers):
            m = self.mats[li]
            last = last_only and li == c.n_layers - 1
            h = ops.rmsnorm(x, lw.attn_norm, c.norm_eps, np.empty_like(x))
            k = kernels.linear(m["wk"], h).reshape(n_tok, c.n_kv_heads, c.head_dim)
            v = kernels.linear(m["wv"], h).reshape(n_tok, c.n_kv_heads, c.head_dim)
            ops.rope(k, positions, self.inv_freq, self.pairs)
            cache.store(li, pos0, k, v)
            if last:  # only the final token's row is wanted from here on
                h, x, q_pos0 = h[-1:], x[-1:], pos0 + n_tok - 1
            else:
                q_pos0 = pos0
            nq = h.shape[0]
            q = kernels.linear(m["wq"], h).reshape(nq, c.n_heads, c.head_dim)
            ops.rope(q, positions[-nq:], self.inv_freq, self.pairs)
            att = ops.attention(q, cache.k[li], cache.v[li], q_pos0, self.scale, np.empty_like(q))
            x = x + kernels.linear(m["wo"], att.reshape(nq, c.q_dim))
            h = ops.rmsnorm(x, lw.ffn_norm, c.norm_eps, np.empty_like(x))
            x = x + self.moe(h, lw.router, m)
        cache.n_past = pos0 + n_tok
        x = ops.rmsnorm(x, self.w.norm, c.norm_eps, np.empty_like(x))
        return kernels.linear(self.output, x)

    def moe(self, h: np.ndarray, router: np.ndarray, m: dict) -> np.ndarray:
        """Route each token to A experts; each expert's weights are read once for all of its tokens."""
        r = route(h, router, self.config.n_experts_used)
        if self.trace is not None:
            self.trace.append(r)
        n_tok, n_act = r.expert_ids.shape
        experts = r.expert_ids.reshape(-1)                                        # (T*A,) token-major
        xa = np.repeat(h, n_act, axis=0)                                          # (T*A, D)
        g = kernels.expert_linear(m["w1"], xa, experts)                          # (T*A, F)
        u = kernels.expert_linear(m["w3"], xa, experts)
        y = kernels.expert_linear(m["w2"], ops.silu_mul(g, u), experts)          # (T*A, D)
        return np.einsum("tad,ta->td", y.reshape(n_tok, n_act, -1), r.weights)

"""The MLX backend: MLX arrays turn (weights, tokens, cache) into logits, on Metal on a Mac and on the CPU elsewhere.

Letters: T tokens in this call, D model width, H query heads, Hkv KV heads, Dh head width, E experts,
A active experts per token, F expert hidden width, V vocabulary, L cached positions.

Weights are prepared once. Quantized ggml blocks that MLX's affine groups express exactly (Q4_0, Q4_1, Q8_0, Q5_0,
Q5_1, Q4_K, Q5_K) become affine triplets with groups of 32; Q2_K, Q3_K and Q6_K (16-element sub-blocks) and IQ4_NL /
IQ4_XS (non-linear levels) are dequantized and requantized to groups of 32, with a notice; the lattice IQ formats
below 4 bits to groups of 64 one affine width up (IQ3 to 4 bits, IQ2 and IQ1 to 3), with a notice naming the bits
per weight they grow to (backend='numba' runs them at their own size). Dense layers run
mx.quantized_matmul; stacked experts run mx.gather_qmm, with tokens sorted by expert in prefill so each expert's
weights are read once. Float weights (HF checkpoints) stay float and run matmul / gather_mm. The whole forward pass
is one lazy graph, evaluated once.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from mixlocal.quant import QStack, QType, block_size, type_size
from mixlocal.quant.affine import (
    REQUANT,
    AffineTensor,
    affine_from_ggml,
    quantize_affine,
)

from ...config import ModelConfig
from ...weights import ModelWeights
from .. import RouterTrace, refuse_options
from .cache import MLXKVCache

__all__ = ["MLXBackend", "Precision", "choose_precision", "to_affine"]

log = logging.getLogger("mixlocal.mlx")


SORT_MIN_ROWS = 64  # token-expert pairs from which sorting by expert pays (mlx-lm's threshold too)


# ----------------------------------------------------------------------------------------------------------------------
# Precision: the one place dtypes are chosen
# ----------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Precision:
    params: mx.Dtype       # float weights, scales and biases as held in memory
    compute: mx.Dtype      # activations between layers
    dense_gather: mx.Dtype  # operands of gather_mm over float experts

    @property
    def scale_storage(self) -> str:
        """How ggml scales are laid out on the way to MLX: float16 where params are float16, else float32."""
        return "F16" if self.params == mx.float16 else "F32"

    def for_gather(self, w: mx.array) -> mx.array:
        return w if w.dtype == self.dense_gather else w.astype(self.dense_gather)


def choose_precision(device: mx.Device | None = None, params: mx.Dtype | None = None) -> Precision:
    """Metal: float16 throughout. CPU: float32 activations, because MLX's CPU gather_mm accepts float32 only and
    its float16 arithmetic is emulated; params may still be held in float16 (then upcast for the gather)."""
    device = device or mx.default_device()
    if device.type == mx.DeviceType.gpu:
        return Precision(params or mx.float16, mx.float16, mx.float16)
    return Precision(params or mx.float32, mx.float32, mx.float32)


# ----------------------------------------------------------------------------------------------------------------------
# Weights in MLX form
# ----------------------------------------------------------------------------------------------------------------------

def _float_array(t, dtype: mx.Dtype) -> mx.array:
    """A float QTensor / QStack / numpy array as an MLX array of dtype, in its logical shape."""
    if isinstance(t, np.ndarray):
        return mx.array(np.ascontiguousarray(t, dtype=np.float32)).astype(dtype)
    mats = list(t.mats) if isinstance(t, QStack) else [t]
    views = {QType.F32: np.float32, QType.F16: np.float16, QType.BF16: np.uint16}
    parts = []
    for m in mats:
        a = mx.array(m.data.view(views[m.qtype]).reshape(m.shape))
        parts.append(a.view(mx.bfloat16) if m.qtype == QType.BF16 else a)
    a = mx.stack(parts) if isinstance(t, QStack) else parts[0]
    return a.astype(dtype)


def _affine_arrays(a: AffineTensor, dtype: mx.Dtype) -> tuple[mx.array, mx.array, mx.array]:
    def scales(x):
        arr = mx.array(np.ascontiguousarray(x))
        return (arr.view(mx.bfloat16) if a.scale_dtype == "BF16" else arr).astype(dtype)
    return mx.array(np.ascontiguousarray(a.packed)), scales(a.scales), scales(a.biases)


def to_affine(t, name: str, scale_dtype: str = "F32") -> AffineTensor:
    """Any quantized weight as MLX affine groups: exactly where ggml's blocks allow it, else requantized.

    scale_dtype "F16" keeps the 32-element formats' scales in float16 (exact: they are float16 in ggml too); K-format
    products d * sc that float16 cannot hold stay float32 here and are rounded only by the backend's params dtype."""
    if isinstance(t, AffineTensor):
        return t
    if t.qtype in REQUANT:
        bits, group = REQUANT[t.qtype]
        if t.qtype in (QType.Q2_K, QType.Q3_K, QType.Q6_K):
            why = "has 16-element sub-blocks that MLX's groups (32+) cannot hold"
        elif t.qtype in (QType.IQ4_NL, QType.IQ4_XS):
            why = "has non-linear levels that MLX's affine groups cannot hold"
        else:
            file_bits = 8 * type_size(t.qtype) / block_size(t.qtype)
            why = (f"codes values on a lattice that MLX's affine groups cannot hold ({file_bits:.2f} bits per weight "
                   f"become {bits + 32 / group:.2f} with float16 scales; backend='numba' keeps its size)")
        log.warning("mixlocal: %s: %s %s; dequantized and requantized to %d-bit groups of %d", name, t.qtype.name,
                    why, bits, group)
        from mixlocal.quant import formats
        mats = list(t.mats) if isinstance(t, QStack) else ([t.expert(e) for e in range(t.shape[0])]
                                                           if len(t.shape) == 3 else [t])
        parts = [quantize_affine(formats.dequantize(m.qtype, m.rows_view()).reshape(m.shape), bits, group, "F32")
                 for m in mats]
        if len(t.shape) == 2:
            return parts[0]
        return AffineTensor(tuple(t.shape), bits, group, np.stack([p.packed for p in parts]),
                            np.stack([p.scales for p in parts]), np.stack([p.biases for p in parts]), "F32")
    try:
        return affine_from_ggml(t, scale_dtype)
    except ValueError:
        if scale_dtype == "F32":
            raise
        return affine_from_ggml(t, "F32")


def _is_float(t) -> bool:
    return isinstance(t, np.ndarray) or (not isinstance(t, AffineTensor) and t.qtype in (QType.F32, QType.F16,
                                                                                         QType.BF16))


class _Weight:
    """A weight held the way MLX runs it: an affine triplet (w, scales, biases) or a float array w."""

    def __init__(self, t, prec: Precision, name: str):
        self.prec = prec
        self.quantized = not _is_float(t)
        if self.quantized:
            a = to_affine(t, name, prec.scale_storage)
            self.bits, self.group_size = a.bits, a.group_size
            self.w, self.scales, self.biases = _affine_arrays(a, prec.params)
        else:
            self.w = _float_array(t, prec.params)
        mx.eval(self.arrays())  # one weight at a time: float32 intermediates never pile up across the model

    def arrays(self) -> list[mx.array]:
        return [self.w, self.scales, self.biases] if self.quantized else [self.w]


class Linear(_Weight):
    """y = x @ W.T for a (N, K) weight."""

    def __call__(self, x: mx.array) -> mx.array:
        if self.quantized:
            return mx.quantized_matmul(x, self.w, self.scales, self.biases, transpose=True,
                                       group_size=self.group_size, bits=self.bits)
        return x @ self.w.T

    def rows(self, ids: mx.array, dtype: mx.Dtype) -> mx.array:
        """Rows of W for the ids (the embedding lookup), as float."""
        if self.quantized:
            return mx.dequantize(self.w[ids], self.scales[ids], self.biases[ids], group_size=self.group_size,
                                 bits=self.bits).astype(dtype)
        return self.w[ids].astype(dtype)


class Experts(_Weight):
    """A stacked (E, N, K) weight applied per row to the expert that row chose: y[i] = x[i] @ W[idx[i]].T."""

    def __call__(self, x: mx.array, idx: mx.array, sorted_idx: bool) -> mx.array:
        if self.quantized:
            return mx.gather_qmm(x, self.w, self.scales, self.biases, rhs_indices=idx, transpose=True,
                                 group_size=self.group_size, bits=self.bits, sorted_indices=sorted_idx)
        return mx.gather_mm(self.prec.for_gather(x), self.prec.for_gather(self.w).swapaxes(-1, -2),
                            rhs_indices=idx, sorted_indices=sorted_idx)


@dataclass
class _Layer:
    attn_norm: mx.array
    wq: Linear
    wk: Linear
    wv: Linear
    wo: Linear
    ffn_norm: mx.array
    router: mx.array   # (E, D) float32: routing decisions are made in float32 on every device
    w1: Experts
    w3: Experts
    w2: Experts


# ----------------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------------

class MLXBackend:
    name = "mlx"

    @classmethod
    def check_options(cls, *, n_ctx: int, n_threads: int | None = None, kv_type: str = "f16",
                      packed_cache: bool | None = None, kernels: str | None = None, mem_budget=None,
                      expert_policy: str | None = None) -> dict:
        """The load options checked before the model is read. Those of the numba backend are a ValueError naming
        them: MLX schedules its own threads, keeps the whole model in unified memory and has no packed form or
        kernel families of ours."""
        refuse_options("mlx", "MLX schedules its own threads and keeps the whole model in unified memory",
                       n_threads=n_threads, packed_cache=packed_cache, kernels=kernels, mem_budget=mem_budget,
                       expert_policy=expert_policy)
        MLXKVCache.check_type(kv_type)
        return {"n_ctx": n_ctx, "kv_type": kv_type}

    @classmethod
    def build(cls, weights: ModelWeights, *, n_ctx: int, kv_type: str = "f16", **options) -> tuple[MLXBackend,
                                                                                                     MLXKVCache]:
        """The backend (weights turned into MLX arrays once) and an empty KV cache for n_ctx positions."""
        cls.check_options(n_ctx=n_ctx, kv_type=kv_type, **options)
        return cls(weights), MLXKVCache(weights.config, n_ctx, kv_type)

    def __init__(self, weights: ModelWeights, precision: Precision | None = None):
        self.config: ModelConfig = weights.config
        self.prec = precision or choose_precision()
        c, p = self.config, self.prec
        origin = weights.origin

        def where(name):
            return f"{origin.get(name, 'model')}: {name}"

        def norm(a):
            return _float_array(a, p.compute)

        self.layers = []
        for i, lw in enumerate(weights.layers):
            b = f"blk.{i}."
            self.layers.append(_Layer(
                attn_norm=norm(lw.attn_norm), ffn_norm=norm(lw.ffn_norm), router=_float_array(lw.router, mx.float32),
                wq=Linear(lw.wq, p, where(b + "attn_q.weight")), wk=Linear(lw.wk, p, where(b + "attn_k.weight")),
                wv=Linear(lw.wv, p, where(b + "attn_v.weight")), wo=Linear(lw.wo, p, where(b + "attn_output.weight")),
                w1=Experts(lw.w1, p, where(b + "ffn_gate_exps.weight")),
                w3=Experts(lw.w3, p, where(b + "ffn_up_exps.weight")),
                w2=Experts(lw.w2, p, where(b + "ffn_down_exps.weight"))))
        self.tok_embd = Linear(weights.tok_embd, p, where("token_embd.weight"))
        self.output = (self.tok_embd if weights.output is weights.tok_embd
                       else Linear(weights.output, p, where("output.weight")))
        self.norm = norm(weights.norm)
        self.scale = 1.0 / float(np.sqrt(c.head_dim))
        # GGUF rows pair neighbours (MLX's "traditional" RoPE); HF rows rotate halves
        self.rope_traditional = c.rope_pairing == "neighbor"
        mx.eval([l.attn_norm for l in self.layers] + [l.ffn_norm for l in self.layers] +
                [l.router for l in self.layers] + [self.norm])
        self.trace: list[RouterTrace] | None = None  # set to [] to record router intermediates

    def _rope(self, x: mx.array, offset: int) -> mx.array:
        c = self.config
        return mx.fast.rope(x, c.head_dim, traditional=self.rope_traditional, base=c.rope_theta, scale=1.0,
                            offset=offset)

    def forward(self, tokens: np.ndarray, cache: MLXKVCache, last_only: bool) -> np.ndarray:
        """Run T tokens at positions cache.n_past.. and advance the cache. Returns (T, V) or (1, V) float32 logits."""
        c = self.config
        n_tok = int(tokens.shape[0])
        pos0 = cache.n_past
        cache.check_room(n_tok)
        x = self.tok_embd.rows(mx.array(np.asarray(tokens, dtype=np.int32)), self.prec.compute)     # (T, D)
        traces = []
        for li, lw in enumerate(self.layers):
            last = last_only and li == c.n_layers - 1
            h = mx.fast.rms_norm(x, lw.attn_norm, c.norm_eps)
            k = lw.wk(h).reshape(1, n_tok, c.n_kv_heads, c.head_dim).transpose(0, 2, 1, 3)   # (1, Hkv, T, Dh)
            v = lw.wv(h).reshape(1, n_tok, c.n_kv_heads, c.head_dim).transpose(0, 2, 1, 3)
            keys, values = cache.update_and_fetch(li, pos0, self._rope(k, pos0), v)          # (1, Hkv, L, Dh)
            if last:  # only the final token's row is wanted from here on
                h, x, q_pos0 = h[-1:], x[-1:], pos0 + n_tok - 1
            else:
                q_pos0 = pos0
            nq = h.shape[0]
            q = self._rope(lw.wq(h).reshape(1, nq, c.n_heads, c.head_dim).transpose(0, 2, 1, 3), q_pos0)
            dt = self.prec.compute
            att = mx.fast.scaled_dot_product_attention(q, keys.astype(dt), values.astype(dt), scale=self.scale,
                                                       mask="causal" if nq > 1 else None)   # (1, H, nq, Dh)
            x = x + lw.wo(att.transpose(0, 2, 1, 3).reshape(nq, c.q_dim))
            h = mx.fast.rms_norm(x, lw.ffn_norm, c.norm_eps)
            moe, trace = self.moe(h, lw)
            x = x + moe
            traces.append(trace)
        x = mx.fast.rms_norm(x, self.norm, c.norm_eps)
        logits = self.output(x).astype(mx.float32)
        mx.eval(logits, *cache.arrays())
        cache.n_past = pos0 + n_tok
        if self.trace is not None:
            self.trace.extend(RouterTrace(np.array(lg), np.array(ids).astype(np.int64), np.array(w))
                              for lg, ids, w in traces)
        return np.array(logits)

    def close(self) -> None:
        """Nothing held open: MLX frees the arrays with the backend."""

    def moe(self, h: mx.array, lw: _Layer) -> tuple[mx.array, tuple]:
        """Route each token to A experts (softmax over all E in float32, top A, renormalised) and mix their SwiGLU
        outputs. Prefill sorts the T*A (token, expert) rows by expert so each expert's weights are read once."""
        n_tok, n_act = h.shape[0], self.config.n_experts_used
        logits = h.astype(mx.float32) @ lw.router.T                                        # (T, E)
        probs = mx.softmax(logits, axis=-1, precise=True)
        ids = mx.argpartition(-probs, kth=n_act - 1, axis=-1)[:, :n_act]                   # (T, A)
        w = mx.take_along_axis(probs, ids, axis=-1)
        w = w / w.sum(axis=-1, keepdims=True)                                              # (T, A)
        if n_tok * n_act >= SORT_MIN_ROWS:
            flat = ids.flatten()
            order = mx.argsort(flat)                                                       # (T*A,) by expert
            xs = h[order // n_act][:, None, :]                                             # (T*A, 1, D)
            idx, sorted_idx = flat[order], True
        else:
            xs, idx, sorted_idx = h[:, None, None, :], ids, False                          # (T, 1, 1, D)
        g = lw.w1(xs, idx, sorted_idx)
        u = lw.w3(xs, idx, sorted_idx)
        y = lw.w2((g * mx.sigmoid(g) * u).astype(xs.dtype), idx, sorted_idx)
        if sorted_idx:
            y = y[mx.argsort(order)]                                                       # back to (token, slot)
        y = y.reshape(n_tok, n_act, -1).astype(h.dtype)                                    # (T, A, D)
        out = (y * w[..., None].astype(h.dtype)).sum(axis=1)                              # (T, D)
        return out, (logits, ids, w)

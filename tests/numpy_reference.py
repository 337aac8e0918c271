"""An independent float64 Mixtral forward pass in plain numpy over gguf-py's dequantized GGUF tensors.

It shares no code with the engine: weights come from gguf-py's GGUFReader and gguf.quants.dequantize, the
configuration from the raw metadata, and RoPE is llama.cpp's neighbour-pair form that GGUF files assume.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize, quantize


def load_reference(path):
    r = GGUFReader(path)
    meta = {k: f.contents() for k, f in r.fields.items()}
    arch = meta["general.architecture"]
    tensors = {}
    for t in r.tensors:
        a = dequantize(np.asarray(t.data), t.tensor_type).astype(np.float64)
        tensors[t.name] = a.reshape(tuple(int(d) for d in reversed(t.shape.tolist())))
    return meta, arch, tensors


def q8_round(x: np.ndarray) -> np.ndarray:
    """x rounded through gguf-py's Q8_0 (8 bits per 32-block): what llama.cpp-style integer kernels multiply."""
    q8 = GGMLQuantizationType.Q8_0
    flat = np.ascontiguousarray(x.reshape(-1, x.shape[-1]), dtype=np.float32)
    return dequantize(quantize(flat, q8), q8).reshape(x.shape).astype(np.float64)


def q8k_round(x: np.ndarray) -> np.ndarray:
    """x rounded as ggml's quantize_row_q8_K_ref (ggml/src/ggml-quants.c) rounds activations for K-quant dot
    products; gguf-py has no Q8_K. Per 256 values: the first value of largest magnitude, with its sign, maps to -127
    (iscale = -127/max in float32), codes round half to even and clamp at 127, d = 1/iscale in float32."""
    flat = np.ascontiguousarray(x.reshape(-1, 256), dtype=np.float32)
    top = np.take_along_axis(flat, np.argmax(np.abs(flat), axis=1)[:, None], axis=1)
    safe = np.where(top == 0, np.float32(1), top)
    iscale = (np.float32(-127.0) / safe).astype(np.float32)
    q = np.minimum(np.rint((iscale * flat).astype(np.float32)), 127)
    d = np.where(top == 0, np.float32(0), (np.float32(1.0) / iscale).astype(np.float32))
    return (q.astype(np.float64) * d.astype(np.float64)).reshape(x.shape)


ROUNDING = {"Q8_0": q8_round, "Q8_K": q8k_round}


def forward(path, ids, activations: str | None = None) -> np.ndarray:
    """Logits of ids. activations ("Q8_0", "Q8_K") rounds the input of every weight product (not the router) that
    way first, as integer kernels do."""
    act = ROUNDING[activations] if activations else (lambda v: v)
    meta, arch, W = load_reference(path)
    g = lambda k: meta[f"{arch}.{k}"]
    n_layers, n_heads = g("block_count"), g("attention.head_count")
    n_kv, eps, theta = g("attention.head_count_kv"), g("attention.layer_norm_rms_epsilon"), g("rope.freq_base")
    n_used = g("expert_used_count")
    x = W["token_embd.weight"][ids]
    T, D = x.shape
    hd = D // n_heads

    def norm(v, w):
        return v / np.sqrt((v * v).mean(-1, keepdims=True) + eps) * w

    def rope(v):  # v (T, H, hd); pairs (2i, 2i+1) rotate by pos * theta^(-2i/hd)
        freqs = theta ** (-np.arange(0, hd, 2) / hd)
        ang = np.arange(T)[:, None] * freqs[None, :]
        c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        a, b = v[..., 0::2], v[..., 1::2]
        out = np.empty_like(v)
        out[..., 0::2] = a * c - b * s
        out[..., 1::2] = b * c + a * s
        return out

    mask = np.triu(np.full((T, T), -np.inf), 1)
    for i in range(n_layers):
        p = f"blk.{i}."
        h = norm(x, W[p + "attn_norm.weight"])
        hq = act(h)
        q = rope((hq @ W[p + "attn_q.weight"].T).reshape(T, n_heads, hd))
        k = rope((hq @ W[p + "attn_k.weight"].T).reshape(T, n_kv, hd))
        v = (hq @ W[p + "attn_v.weight"].T).reshape(T, n_kv, hd)
        rep = n_heads // n_kv
        k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
        s = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        att = np.einsum("hts,shd->thd", s, v).reshape(T, D)
        x = x + act(att) @ W[p + "attn_output.weight"].T
        h = norm(x, W[p + "ffn_norm.weight"])
        logits = h @ W[p + "ffn_gate_inp.weight"].T
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        moe = np.zeros_like(h)
        for t in range(T):
            top = np.argsort(-probs[t])[:n_used]
            wts = probs[t, top] / probs[t, top].sum()
            ht = act(h[t])
            for e, wt in zip(top, wts):
                gate = W[p + "ffn_gate_exps.weight"][e] @ ht
                up = W[p + "ffn_up_exps.weight"][e] @ ht
                mid = gate / (1 + np.exp(-gate)) * up
                moe[t] += wt * (W[p + "ffn_down_exps.weight"][e] @ act(mid))
        x = x + moe
    x = norm(x, W["output_norm.weight"])
    out = W.get("output.weight", W["token_embd.weight"])
    return act(x) @ out.T

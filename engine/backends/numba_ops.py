"""numba kernels for the parts of the forward pass that are not weight products: RMSNorm, RoPE, attention.

Shapes use T tokens, H query heads, G = H / n_kv_heads query heads per KV head, Dh head width.
"""
from __future__ import annotations

import math

import numba
import numpy as np
from numba import njit, prange, types
from numba.extending import overload

__all__ = ["rmsnorm", "rope", "attention", "rope_pairs", "silu_mul"]

KEY_BLOCK = 128     # keys decoded and scored together; bounds attention scratch whatever the context length
QUERY_BLOCK = 16    # queries that share one decoded key block


@njit(parallel=True, cache=True, fastmath=False)
def rmsnorm(x, w, eps, out):
    """out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w, accumulated in float64 like a careful reference."""
    n, d = x.shape
    for t in prange(n):
        ss = 0.0
        for i in range(d):
            ss += x[t, i] * x[t, i]
        r = 1.0 / math.sqrt(ss / d + eps)
        for i in range(d):
            out[t, i] = np.float32(x[t, i] * r) * w[i]
    return out


def rope_pairs(head_dim: int, pairing: str) -> np.ndarray:
    """(head_dim/2, 2) element indices rotated together; row i uses frequency i."""
    half = head_dim // 2
    i = np.arange(half)
    if pairing == "half":
        return np.stack([i, i + half], axis=1).astype(np.int64)
    return np.stack([2 * i, 2 * i + 1], axis=1).astype(np.int64)


@njit(parallel=True, cache=True)
def rope(x, positions, inv_freq, pairs):
    """Rotate x (T, H, Dh) in place by each token's position."""
    n, h, _ = x.shape
    npairs = pairs.shape[0]
    for t in prange(n):
        p = positions[t]
        for i in range(npairs):
            ang = p * inv_freq[i]
            c = np.float32(math.cos(ang))
            s = np.float32(math.sin(ang))
            a = pairs[i, 0]
            b = pairs[i, 1]
            for j in range(h):
                x0 = x[t, j, a]
                x1 = x[t, j, b]
                x[t, j, a] = x0 * c - x1 * s
                x[t, j, b] = x1 * c + x0 * s


@njit(parallel=True, cache=True)
def silu_mul(g, u):
    """g <- silu(g) * u, in place."""
    n, d = g.shape
    for t in prange(n):
        for i in range(d):
            v = g[t, i]
            g[t, i] = v / (np.float32(1.0) + np.exp(-v)) * u[t, i]
    return g


def _decode_rows(src, dst, lut):  # pragma: no cover - replaced by the overload below inside numba
    raise NotImplementedError


@overload(_decode_rows, inline="always")
def _decode_rows_impl(src, dst, lut):
    """Copy a (rows, Dh) slice of the cache into float32 scratch; f16 caches hold uint16 bit patterns."""
    if src.dtype == types.uint16:
        def impl(src, dst, lut):
            for r in range(src.shape[0]):
                for d in range(src.shape[1]):
                    dst[r, d] = lut[src[r, d]]
        return impl

    def impl(src, dst, lut):
        for r in range(src.shape[0]):
            for d in range(src.shape[1]):
                dst[r, d] = src[r, d]
    return impl


@njit(parallel=True, cache=True)
def attention(q, k_cache, v_cache, lut, pos0, scale, out):
    """Causal attention of T queries at positions pos0.. over the cache, with an online softmax.

    q (T, H, Dh) float32; k_cache, v_cache (Hkv, n_ctx, Dh) float32 or uint16 (f16 bits); out (T, H, Dh).
    Work is split over (KV head, block of queries); each job decodes a block of keys once and scores it for all
    of its queries and their G heads, so scratch is O(KEY_BLOCK * Dh) per job at any context length.
    """
    n_tok, n_heads, dh = q.shape
    n_kv = k_cache.shape[0]
    g_per = n_heads // n_kv
    n_qblk = (n_tok + QUERY_BLOCK - 1) // QUERY_BLOCK
    for job in prange(n_kv * n_qblk):
        kvh = job // n_qblk
        t0 = (job % n_qblk) * QUERY_BLOCK
        t1 = min(n_tok, t0 + QUERY_BLOCK)
        kblk = np.empty((KEY_BLOCK, dh), dtype=np.float32)
        vblk = np.empty((KEY_BLOCK, dh), dtype=np.float32)
        s = np.empty(KEY_BLOCK, dtype=np.float32)
        m = np.full((QUERY_BLOCK, g_per), -np.inf, dtype=np.float32)
        l = np.zeros((QUERY_BLOCK, g_per), dtype=np.float32)
        acc = np.zeros((QUERY_BLOCK, g_per, dh), dtype=np.float32)
        n_keys = pos0 + t1
        for k0 in range(0, n_keys, KEY_BLOCK):
            k1 = min(n_keys, k0 + KEY_BLOCK)
            _decode_rows(k_cache[kvh, k0:k1], kblk, lut)
            _decode_rows(v_cache[kvh, k0:k1], vblk, lut)
            for t in range(t0, t1):
                end = min(k1, pos0 + t + 1)  # causal: keys up to and including this query's position
                if end <= k0:
                    continue
                for g in range(g_per):
                    h = kvh * g_per + g
                    mx = m[t - t0, g]
                    for j in range(end - k0):
                        dot = np.float32(0.0)
                        for d in range(dh):
                            dot += q[t, h, d] * kblk[j, d]
                        dot *= scale
                        s[j] = dot
                        if dot > mx:
                            mx = dot
                    corr = np.exp(m[t - t0, g] - mx)
                    lsum = l[t - t0, g] * corr
                    for d in range(dh):
                        acc[t - t0, g, d] *= corr
                    for j in range(end - k0):
                        p = np.exp(s[j] - mx)
                        lsum += p
                        for d in range(dh):
                            acc[t - t0, g, d] += p * vblk[j, d]
                    l[t - t0, g] = lsum
                    m[t - t0, g] = mx
        for t in range(t0, t1):
            for g in range(g_per):
                h = kvh * g_per + g
                inv = np.float32(1.0) / l[t - t0, g]
                for d in range(dh):
                    out[t, h, d] = acc[t - t0, g, d] * inv
    return out


def set_threads(n: int) -> None:
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))

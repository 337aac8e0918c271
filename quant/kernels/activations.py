"""Activations rounded to int8 per 256 values (ggml's Q8_K), for the K-quant kernels of the integer families.

Why: a K-quant super-block has 8 (Q4_K, Q5_K) or 16 (Q6_K) sub-blocks, each with its own integer scale. With one
activation scale per 32 values (Q8_0) every sub-block's integer sum must become a float and meet two scales, 16
times per super-block per row. With one activation scale per 256 (as llama.cpp rounds activations for every K-quant
dot product), the sub-block scales multiply integer sums and a row's super-block touches floats once.

Rounding follows ggml's quantize_row_q8_K_ref (ggml/src/ggml-quants.c): the value of largest magnitude (the first
one, with its sign) maps to -127, scale -127/max, round half to even, clamp at 127, and the block keeps the float32
d = 1/iscale. Besides the codes, the kernels take sums of the codes:
  pairs (M, K/64) int32  the sums of two neighbouring 32-blocks as two int16 halves (low: block 2p, high: 2p+1),
                         the form a 16-bit multiply-add (vpmaddwd, vpdpwssd) takes against the min pairs of Q4_K/Q5_K
  pairs16 (M, K/32) int32 the sums of 16-value groups 2t and 2t+1 the same way, for Q6_K's offset of 32
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

__all__ = ["quantize_q8_k", "quantize_q8_k_row", "quantize_q8_k_serial"]

QK_K = 256


@njit(inline="always")
def quantize_q8_k_row(x, t, xq, xd, pairs, pairs16, r):
    """Row t of x (float32, width a multiple of 256) into row r of xq / xd / pairs / pairs16."""
    sums16 = np.empty(16, np.int32)
    for b in range(x.shape[1] // QK_K):
        o = b * QK_K
        amax = np.float32(0.0)
        vmax = np.float32(0.0)
        for j in range(QK_K):
            v = x[t, o + j]
            if abs(v) > amax:
                amax = abs(v)
                vmax = v
        if amax == 0:
            xd[r, b] = 0
            for j in range(QK_K):
                xq[r, o + j] = 0
        else:
            iscale = np.float32(-127.0) / vmax
            for j in range(QK_K):
                q = np.int32(np.rint(iscale * x[t, o + j]))
                xq[r, o + j] = min(q, 127)
            xd[r, b] = np.float32(1.0) / iscale
        for s in range(16):
            acc = np.int32(0)
            for j in range(16):
                acc += np.int32(xq[r, o + s * 16 + j])
            sums16[s] = acc
        for u in range(8):
            pairs16[r, b * 8 + u] = (sums16[2 * u] & 0xFFFF) | (sums16[2 * u + 1] << 16)
        for p in range(4):
            lo = sums16[4 * p] + sums16[4 * p + 1]
            hi = sums16[4 * p + 2] + sums16[4 * p + 3]
            pairs[r, b * 4 + p] = (lo & 0xFFFF) | (hi << 16)


@njit(parallel=True, cache=True)
def quantize_q8_k(x, xq, xd, pairs, pairs16):
    """x (M, K) float32 -> xq int8 (M, K), xd float32 (M, K/256), pairs int32 (M, K/64), pairs16 int32 (M, K/32).

    No fastmath: the rounding must not depend on reassociation."""
    for m in prange(x.shape[0]):
        quantize_q8_k_row(x, m, xq, xd, pairs, pairs16, m)


@njit(cache=True)
def quantize_q8_k_serial(x, xq, xd, pairs, pairs16):
    """quantize_q8_k for a few rows (decode), where starting threads costs more than the work."""
    for m in range(x.shape[0]):
        quantize_q8_k_row(x, m, xq, xd, pairs, pairs16, m)

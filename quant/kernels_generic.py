"""Row decoders for every ggml format, and the fused kernels built on them.

These kernels read the file layout as it is (no repack), so they serve every format and every weight the engine may
meet. The decoder turns one row of blocks into float32 inside a small per-thread buffer that stays in L1/L2; decode
then dots it with the few activation rows at hand, prefill hands tiles of decoded rows to BLAS. No kernel here ever
holds a whole matrix in float.

Block layouts follow ggml-common.h byte for byte (offsets are written out at each decoder). The caller
(quant/kernels.py) validates shapes before anything here touches memory.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .tensor import QType

__all__ = ["FORMAT_CODE", "F16_TABLE", "dequantize_rows", "matmul_rows"]

# One integer per format so that a single compiled kernel serves all formats (the branch is per row, so it is free).
FORMAT_CODE = {
    QType.F32: 0, QType.F16: 1, QType.BF16: 2,
    QType.Q8_0: 3, QType.Q4_0: 4, QType.Q4_1: 5, QType.Q5_0: 6, QType.Q5_1: 7,
    QType.Q2_K: 8, QType.Q3_K: 9, QType.Q4_K: 10, QType.Q5_K: 11, QType.Q6_K: 12,
}

# Exact half -> float for every bit pattern; numba has no float16 on the CPU and a 256 KiB table is exact and fast.
F16_TABLE = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


@njit(inline="always")
def _h(tab, src, o):
    """The f16 stored little-endian at src[o:o+2], as float32."""
    return tab[np.int64(src[o]) | (np.int64(src[o + 1]) << 8)]


@njit(inline="always")
def _i8(v):
    """A byte read as uint8, reinterpreted as int8 (two's complement)."""
    return (np.int32(v) ^ 128) - 128


@njit(cache=True)
def _decode_row(fmt, src, dst, tab):
    """Decode one row of blocks src (uint8, row_bytes) into dst (float32, cols)."""
    cols = dst.shape[0]
    if fmt == 0:  # F32
        f = src.view(np.float32)
        for k in range(cols):
            dst[k] = f[k]
    elif fmt == 1:  # F16
        for k in range(cols):
            dst[k] = _h(tab, src, 2 * k)
    elif fmt == 2:  # BF16: the high half of an f32
        u = dst.view(np.uint32)
        for k in range(cols):
            u[k] = (np.uint32(src[2 * k]) << 16) | (np.uint32(src[2 * k + 1]) << 24)
    elif fmt == 3:  # Q8_0: d f16 | qs int8[32]                                    (34 bytes)
        for b in range(cols // 32):
            o = b * 34
            d = _h(tab, src, o)
            for j in range(32):
                dst[b * 32 + j] = d * np.float32(_i8(src[o + 2 + j]))
    elif fmt == 4:  # Q4_0: d f16 | qs[16]: low nibbles elements 0-15, high 16-31   (18 bytes)
        for b in range(cols // 32):
            o = b * 18
            d = _h(tab, src, o)
            for j in range(16):
                v = np.int32(src[o + 2 + j])
                dst[b * 32 + j] = d * np.float32((v & 15) - 8)
                dst[b * 32 + 16 + j] = d * np.float32((v >> 4) - 8)
    elif fmt == 5:  # Q4_1: d f16 | m f16 | qs[16]                                  (20 bytes)
        for b in range(cols // 32):
            o = b * 20
            d = _h(tab, src, o)
            m = _h(tab, src, o + 2)
            for j in range(16):
                v = np.int32(src[o + 4 + j])
                dst[b * 32 + j] = d * np.float32(v & 15) + m
                dst[b * 32 + 16 + j] = d * np.float32(v >> 4) + m
    elif fmt == 6 or fmt == 7:  # Q5_0: d | qh u32 | qs[16] (22);  Q5_1: d | m | qh u32 | qs[16] (24)
        size = 22 if fmt == 6 else 24
        for b in range(cols // 32):
            o = b * size
            d = _h(tab, src, o)
            if fmt == 6:
                m = np.float32(-16.0) * d
                oh = o + 2
            else:
                m = _h(tab, src, o + 2)
                oh = o + 4
            qh = (np.uint32(src[oh]) | (np.uint32(src[oh + 1]) << 8)
                  | (np.uint32(src[oh + 2]) << 16) | (np.uint32(src[oh + 3]) << 24))
            for j in range(16):
                v = np.uint32(src[oh + 4 + j])
                lo = (v & 15) | (((qh >> j) & 1) << 4)
                hi = (v >> 4) | (((qh >> (j + 16)) & 1) << 4)
                dst[b * 32 + j] = d * np.float32(lo) + m
                dst[b * 32 + 16 + j] = d * np.float32(hi) + m
    elif fmt == 8:  # Q2_K: scales[16] (lo 4 bits scale, hi 4 bits min) | qs[64] | d | dmin   (84 bytes)
        for b in range(cols // 256):
            o = b * 84
            d = _h(tab, src, o + 80)
            dmin = _h(tab, src, o + 82)
            for half in range(2):
                for shift in range(4):
                    for l in range(32):
                        i = half * 128 + shift * 32 + l
                        sc = np.int32(src[o + i // 16])
                        q = (np.int32(src[o + 16 + half * 32 + l]) >> (2 * shift)) & 3
                        dst[b * 256 + i] = d * np.float32(sc & 15) * np.float32(q) - dmin * np.float32(sc >> 4)
    elif fmt == 9:  # Q3_K: hmask[32] | qs[64] | scales[12] (16 x 6 bits) | d     (110 bytes)
        for b in range(cols // 256):
            o = b * 110
            d = _h(tab, src, o + 108)
            for half in range(2):
                for shift in range(4):
                    for l in range(32):
                        i = half * 128 + shift * 32 + l
                        s = i // 16
                        low4 = (np.int32(src[o + 96 + s % 8]) >> (4 * (s // 8))) & 15
                        high2 = (np.int32(src[o + 104 + s % 4]) >> (2 * (s // 4))) & 3
                        sc = (low4 | (high2 << 4)) - 32
                        ql = (np.int32(src[o + 32 + half * 32 + l]) >> (2 * shift)) & 3
                        hbit = (np.int32(src[o + l]) >> (half * 4 + shift)) & 1
                        dst[b * 256 + i] = d * np.float32(sc) * np.float32(ql - 4 + 4 * hbit)
    elif fmt == 10 or fmt == 11:  # Q4_K: d | dmin | scales[12] | qs[128] (144);  Q5_K: ... | qh[32] | qs[128] (176)
        size = 144 if fmt == 10 else 176
        oq = 16 if fmt == 10 else 48
        for b in range(cols // 256):
            o = b * size
            d = _h(tab, src, o)
            dmin = _h(tab, src, o + 2)
            for s in range(8):
                sc, mn = _scale_min_k4(src, o + 4, s)
                ds = d * np.float32(sc)
                dm = dmin * np.float32(mn)
                for l in range(32):
                    q = (np.int32(src[o + oq + (s // 2) * 32 + l]) >> (4 * (s % 2))) & 15
                    if fmt == 11:
                        q |= ((np.int32(src[o + 16 + l]) >> s) & 1) << 4
                    dst[b * 256 + s * 32 + l] = ds * np.float32(q) - dm
    elif fmt == 12:  # Q6_K: ql[128] | qh[64] | scales int8[16] | d          (210 bytes)
        for b in range(cols // 256):
            o = b * 210
            d = _h(tab, src, o + 208)
            for half in range(2):
                for r in range(128):
                    i = half * 128 + r
                    ql = (np.int32(src[o + half * 64 + r % 64]) >> (4 * (r // 64))) & 15
                    qh = (np.int32(src[o + 128 + half * 32 + r % 32]) >> (2 * (r // 32))) & 3
                    sc = _i8(src[o + 192 + i // 16])
                    dst[b * 256 + i] = d * np.float32(sc) * np.float32((ql | (qh << 4)) - 32)


@njit(inline="always")
def _scale_min_k4(src, o, s):
    """The 6-bit scale and min of sub-block s from the 12 packed bytes at src[o:o+12] (Q4_K, Q5_K)."""
    if s < 4:
        return np.int32(src[o + s]) & 63, np.int32(src[o + s + 4]) & 63
    sc = (np.int32(src[o + s + 4]) & 15) | ((np.int32(src[o + s - 4]) >> 6) << 4)
    mn = (np.int32(src[o + s + 4]) >> 4) | ((np.int32(src[o + s]) >> 6) << 4)
    return sc, mn


@njit(parallel=True, cache=True)
def dequantize_rows(fmt, rows, dst, tab):
    """Decode rows (uint8, (n, row_bytes)) into dst (float32, (n, cols)), rows split across threads."""
    for r in prange(rows.shape[0]):
        _decode_row(fmt, rows[r], dst[r], tab)


# Rows per parallel task: enough to amortise the task, few enough to balance 14336 / 4096 rows over the threads.
_ROWS_PER_TASK = 16


@njit(parallel=True, cache=True, fastmath=True)
def matmul_rows(fmt, rows, x, out, tab):
    """out[t, r] = dot(decoded row r, x[t]) for rows (uint8 (N, row_bytes)), x (T, K) float32, out (T, N).

    Each row is decoded once into a per-task buffer and then used for all T activation rows, so this is meant for
    small T (decode); large T goes through tiles and BLAS instead.
    """
    n = rows.shape[0]
    t_count, k = x.shape
    n_tasks = (n + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK
    for task in prange(n_tasks):
        buf = np.empty(k, np.float32)
        r1 = min(n, (task + 1) * _ROWS_PER_TASK)
        for r in range(task * _ROWS_PER_TASK, r1):
            _decode_row(fmt, rows[r], buf, tab)
            for t in range(t_count):
                xt = x[t]
                s = np.float32(0.0)
                for i in range(k):
                    s += buf[i] * xt[i]
                out[t, r] = s

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

from ..f16 import f16_at, f16_bits_to_f32
from ..iq_grids import (
    IQ1S_DELTA,
    IQ1S_GRID,
    IQ2S_GRID,
    IQ2XS_GRID,
    IQ2XXS_GRID,
    IQ3S_GRID,
    IQ3XXS_GRID,
    KSIGNS,
    KVALUES_IQ4NL,
)
from ..tensor import QType

__all__ = ["FORMAT_CODE", "dequantize_rows", "matmul_rows"]

# One integer per format so that a single compiled kernel serves all formats (the branch is per row, so it is free).
FORMAT_CODE = {
    QType.F32: 0, QType.F16: 1, QType.BF16: 2,
    QType.Q8_0: 3, QType.Q4_0: 4, QType.Q4_1: 5, QType.Q5_0: 6, QType.Q5_1: 7,
    QType.Q2_K: 8, QType.Q3_K: 9, QType.Q4_K: 10, QType.Q5_K: 11, QType.Q6_K: 12,
    QType.IQ4_NL: 13, QType.IQ4_XS: 14, QType.IQ3_XXS: 15, QType.IQ3_S: 16, QType.IQ2_XXS: 17, QType.IQ2_XS: 18,
    QType.IQ2_S: 19, QType.IQ1_S: 20, QType.IQ1_M: 21,
}

@njit(inline="always")
def _i8(v):
    """A byte read as uint8, reinterpreted as int8 (two's complement)."""
    return (np.int32(v) ^ 128) - 128


# Each decoder's innermost loop runs over the 16 or 32 values of a block with no per-element division, and its trip
# count n16 (always 16) comes from the caller at run time. That is deliberate: with a constant 16, LLVM unrolls the
# loop completely and then cannot vectorize the straight-line code (it cannot prove that the float stores do not alias
# the byte loads); with a run-time count the loop vectorizer takes it, adds one alias check per block, and runs it 16
# lanes wide (about 3x faster). The offsets are ggml-common.h's block layouts.

@njit(inline="always")
def _row_q8_0(src, dst, n16):  # d f16 | qs int8[32]                                    (34 bytes)
    for b in range(dst.shape[0] // 32):
        o = b * 34
        d = f16_at(src, o)
        for j in range(2 * n16):
            dst[b * 32 + j] = d * np.float32(_i8(src[o + 2 + j]))


@njit(inline="always")
def _row_q4(src, dst, n16, size, has_min):  # Q4_0: d | qs[16] (18);  Q4_1: d | m | qs[16] (20)
    for b in range(dst.shape[0] // 32):
        o = b * size
        d = f16_at(src, o)
        m = f16_at(src, o + 2) if has_min else np.float32(-8.0) * d
        oq = o + (4 if has_min else 2)
        for j in range(n16):
            v = np.int32(src[oq + j])
            dst[b * 32 + j] = d * np.float32(v & 15) + m
            dst[b * 32 + 16 + j] = d * np.float32(v >> 4) + m


@njit(inline="always")
def _row_q5(src, dst, n16, size, has_min):  # Q5_0: d | qh u32 | qs[16] (22);  Q5_1: d | m | qh u32 | qs[16] (24)
    for b in range(dst.shape[0] // 32):
        o = b * size
        d = f16_at(src, o)
        m = f16_at(src, o + 2) if has_min else np.float32(-16.0) * d
        oh = o + (4 if has_min else 2)
        qh = (np.uint32(src[oh]) | (np.uint32(src[oh + 1]) << 8)
              | (np.uint32(src[oh + 2]) << 16) | (np.uint32(src[oh + 3]) << 24))
        for j in range(n16):
            v = np.uint32(src[oh + 4 + j])
            lo = (v & 15) | (((qh >> j) & 1) << 4)
            hi = (v >> 4) | (((qh >> (j + 16)) & 1) << 4)
            dst[b * 32 + j] = d * np.float32(lo) + m
            dst[b * 32 + 16 + j] = d * np.float32(hi) + m


@njit(inline="always")
def _row_q2_k(src, dst, n16):  # scales[16] (lo 4 bits scale, hi 4 bits min) | qs[64] | d | dmin   (84 bytes)
    for b in range(dst.shape[0] // 256):
        o = b * 84
        d = f16_at(src, o + 80)
        dmin = f16_at(src, o + 82)
        for half in range(2):
            for shift in range(4):
                for part in range(2):  # 16 values share one scale
                    sc = np.int32(src[o + half * 8 + shift * 2 + part])
                    dl = d * np.float32(sc & 15)
                    ml = dmin * np.float32(sc >> 4)
                    base = b * 256 + half * 128 + shift * 32 + part * 16
                    oq = o + 16 + half * 32 + part * 16
                    for l in range(n16):
                        q = (np.int32(src[oq + l]) >> (2 * shift)) & 3
                        dst[base + l] = dl * np.float32(q) - ml


@njit(inline="always")
def _row_q3_k(src, dst, n16):  # hmask[32] | qs[64] | scales[12] (16 x 6 bits, offset 32) | d     (110 bytes)
    for b in range(dst.shape[0] // 256):
        o = b * 110
        d = f16_at(src, o + 108)
        for half in range(2):
            for shift in range(4):
                bit = half * 4 + shift
                for part in range(2):
                    s = bit * 2 + part
                    low4 = (np.int32(src[o + 96 + s % 8]) >> (4 * (s // 8))) & 15
                    high2 = (np.int32(src[o + 104 + s % 4]) >> (2 * (s // 4))) & 3
                    dl = d * np.float32((low4 | (high2 << 4)) - 32)
                    base = b * 256 + half * 128 + shift * 32 + part * 16
                    for l in range(n16):
                        ll = part * 16 + l
                        ql = (np.int32(src[o + 32 + half * 32 + ll]) >> (2 * shift)) & 3
                        hbit = (np.int32(src[o + ll]) >> bit) & 1
                        dst[base + l] = dl * np.float32(ql - 4 + 4 * hbit)


@njit(inline="always")
def _row_q45_k(src, dst, n16, five):  # Q4_K: d | dmin | scales[12] | qs[128] (144); Q5_K: ... | qh[32] | qs (176)
    size = 176 if five else 144
    oq = 48 if five else 16
    for b in range(dst.shape[0] // 256):
        o = b * size
        d = f16_at(src, o)
        dmin = f16_at(src, o + 2)
        for s in range(8):
            sc, mn = _scale_min_k4(src, o + 4, s)
            ds = d * np.float32(sc)
            dm = dmin * np.float32(mn)
            shift = 4 * (s % 2)
            base_q = o + oq + (s // 2) * 32
            for l in range(2 * n16):
                q = (np.int32(src[base_q + l]) >> shift) & 15
                if five:
                    q |= ((np.int32(src[o + 16 + l]) >> s) & 1) << 4
                dst[b * 256 + s * 32 + l] = ds * np.float32(q) - dm


@njit(inline="always")
def _row_q6_k(src, dst, n16):  # ql[128] | qh[64] | scales int8[16] | d          (210 bytes)
    for b in range(dst.shape[0] // 256):
        o = b * 210
        d = f16_at(src, o + 208)
        for half in range(2):
            oql = o + half * 64
            oqh = o + 128 + half * 32
            osc = o + 192 + half * 8
            base = b * 256 + half * 128
            for part in range(2):  # l in 0-15 and 16-31 use different scales
                s0 = d * np.float32(_i8(src[osc + part]))
                s1 = d * np.float32(_i8(src[osc + part + 2]))
                s2 = d * np.float32(_i8(src[osc + part + 4]))
                s3 = d * np.float32(_i8(src[osc + part + 6]))
                for l in range(part * 16, part * 16 + 16):  # here full unrolling + SLP is the faster of the two
                    a = np.int32(src[oql + l])
                    c = np.int32(src[oql + l + 32])
                    h = np.int32(src[oqh + l])
                    dst[base + l] = s0 * np.float32(((a & 15) | ((h & 3) << 4)) - 32)
                    dst[base + l + 32] = s1 * np.float32(((c & 15) | (((h >> 2) & 3) << 4)) - 32)
                    dst[base + l + 64] = s2 * np.float32(((a >> 4) | (((h >> 4) & 3) << 4)) - 32)
                    dst[base + l + 96] = s3 * np.float32(((c >> 4) | (((h >> 6) & 3) << 4)) - 32)


# The IQ formats: ggml's dequantize_row_iq* (ggml/src/ggml-quants.c). The lattice tables (quant/iq_grids.py) are
# module globals, which numba compiles in as constant arrays. A sign mask byte's bit j negates element j of 8.

@njit(inline="always")
def _sign(mask, j):
    return np.float32(-1.0) if (mask >> j) & 1 else np.float32(1.0)


@njit(inline="always")
def _u16(src, o):
    return np.int64(src[o]) | (np.int64(src[o + 1]) << 8)


@njit(inline="always")
def _u32le(src, o):
    return _u16(src, o) | (_u16(src, o + 2) << 16)


@njit(inline="always")
def _row_iq4_nl(src, dst):  # d | qs[16]: low nibbles elements 0-15, high 16-31           (18 bytes)
    for b in range(dst.shape[0] // 32):
        o = b * 18
        d = f16_at(src, o)
        for j in range(16):
            v = np.int32(src[o + 2 + j])
            dst[b * 32 + j] = d * np.float32(KVALUES_IQ4NL[v & 15])
            dst[b * 32 + 16 + j] = d * np.float32(KVALUES_IQ4NL[v >> 4])


@njit(inline="always")
def _row_iq4_xs(src, dst):  # d | scales_h u16 | scales_l[4] | qs[128]                    (136 bytes)
    for b in range(dst.shape[0] // 256):
        o = b * 136
        d = f16_at(src, o)
        sh = _u16(src, o + 2)
        for ib in range(8):
            ls = ((np.int64(src[o + 4 + ib // 2]) >> (4 * (ib % 2))) & 15) | (((sh >> (2 * ib)) & 3) << 4)
            dl = d * np.float32(ls - 32)
            oq = o + 8 + ib * 16
            base = b * 256 + ib * 32
            for j in range(16):
                v = np.int32(src[oq + j])
                dst[base + j] = dl * np.float32(KVALUES_IQ4NL[v & 15])
                dst[base + 16 + j] = dl * np.float32(KVALUES_IQ4NL[v >> 4])


@njit(inline="always")
def _row_iq3_xxs(src, dst):  # d | qs[64] grid indices | 8 x u32 (4 x 7 sign bits, 4-bit scale)   (98 bytes)
    for b in range(dst.shape[0] // 256):
        o = b * 98
        d = f16_at(src, o)
        for ib in range(8):
            aux = _u32le(src, o + 66 + 4 * ib)
            db = d * (np.float32(0.5) + np.float32(aux >> 28)) * np.float32(0.5)
            for l in range(4):
                signs = KSIGNS[(aux >> (7 * l)) & 127]
                g1 = np.int64(src[o + 2 + 8 * ib + 2 * l])
                g2 = np.int64(src[o + 2 + 8 * ib + 2 * l + 1])
                base = b * 256 + ib * 32 + l * 8
                for j in range(4):
                    dst[base + j] = db * np.float32(IQ3XXS_GRID[g1, j]) * _sign(signs, j)
                    dst[base + 4 + j] = db * np.float32(IQ3XXS_GRID[g2, j]) * _sign(signs, j + 4)


@njit(inline="always")
def _row_iq3_s(src, dst):  # d | qs[64] | qh[8] (9th index bits) | signs[32] | scales[4]      (110 bytes)
    for b in range(dst.shape[0] // 256):
        o = b * 110
        d = f16_at(src, o)
        for ib in range(8):
            sc = (np.int64(src[o + 106 + ib // 2]) >> (4 * (ib % 2))) & 15
            db = d * np.float32(1 + 2 * sc)
            qh = np.int64(src[o + 66 + ib])
            for k in range(8):  # 8 grid entries of 4 values
                g = np.int64(src[o + 2 + 8 * ib + k]) | (((qh >> k) & 1) << 8)
                signs = np.int64(src[o + 74 + 4 * ib + k // 2])
                base = b * 256 + ib * 32 + k * 4
                for j in range(4):
                    dst[base + j] = db * np.float32(IQ3S_GRID[g, j]) * _sign(signs, 4 * (k % 2) + j)


@njit(inline="always")
def _row_iq2_xxs(src, dst):  # d | 8 x (u32 4 grid indices, u32 4 x 7 sign bits + 4-bit scale)   (66 bytes)
    for b in range(dst.shape[0] // 256):
        o = b * 66
        d = f16_at(src, o)
        for ib in range(8):
            aux = _u32le(src, o + 2 + 8 * ib + 4)
            db = d * (np.float32(0.5) + np.float32(aux >> 28)) * np.float32(0.25)
            for l in range(4):
                g = np.int64(src[o + 2 + 8 * ib + l])
                signs = KSIGNS[(aux >> (7 * l)) & 127]
                base = b * 256 + ib * 32 + l * 8
                for j in range(8):
                    dst[base + j] = db * np.float32(IQ2XXS_GRID[g, j]) * _sign(signs, j)


@njit(inline="always")
def _row_iq2_xs(src, dst):  # d | qs u16[32] (9-bit index, 7 sign bits) | scales[8]            (74 bytes)
    for b in range(dst.shape[0] // 256):
        o = b * 74
        d = f16_at(src, o)
        for ib in range(8):
            sc = np.int64(src[o + 66 + ib])
            for l in range(4):
                db = d * (np.float32(0.5) + np.float32((sc >> (4 * (l // 2))) & 15)) * np.float32(0.25)
                q = _u16(src, o + 2 + 8 * ib + 2 * l)
                signs = KSIGNS[q >> 9]
                base = b * 256 + ib * 32 + l * 8
                for j in range(8):
                    dst[base + j] = db * np.float32(IQ2XS_GRID[q & 511, j]) * _sign(signs, j)


@njit(inline="always")
def _row_iq2_s(src, dst):  # d | qs[32] | signs[32] | qh[8] (2 index bits each) | scales[8]  (82 bytes)
    for b in range(dst.shape[0] // 256):
        o = b * 82
        d = f16_at(src, o)
        for ib in range(8):
            sc = np.int64(src[o + 74 + ib])
            qh = np.int64(src[o + 66 + ib])
            for l in range(4):
                db = d * (np.float32(0.5) + np.float32((sc >> (4 * (l // 2))) & 15)) * np.float32(0.25)
                g = np.int64(src[o + 2 + 4 * ib + l]) | (((qh >> (2 * l)) & 3) << 8)
                signs = np.int64(src[o + 34 + 4 * ib + l])
                base = b * 256 + ib * 32 + l * 8
                for j in range(8):
                    dst[base + j] = db * np.float32(IQ2S_GRID[g, j]) * _sign(signs, j)


@njit(inline="always")
def _row_iq1_s(src, dst):  # d | qs[32] | qh u16[8] (4 x 3 index bits, 3-bit scale, delta sign)   (50 bytes)
    for b in range(dst.shape[0] // 256):
        o = b * 50
        d = f16_at(src, o)
        for ib in range(8):
            qh = _u16(src, o + 34 + 2 * ib)
            dl = d * np.float32(2 * ((qh >> 12) & 7) + 1)
            delta = -IQ1S_DELTA if qh & 0x8000 else IQ1S_DELTA
            for l in range(4):
                g = np.int64(src[o + 2 + 4 * ib + l]) | (((qh >> (3 * l)) & 7) << 8)
                base = b * 256 + ib * 32 + l * 8
                for j in range(8):
                    dst[base + j] = dl * (np.float32(IQ1S_GRID[g, j]) + delta)


@njit(inline="always")
def _row_iq1_m(src, dst):  # qs[32] | qh[16] | scales u16[4] (3-bit scales; the f16 d in the top nibbles) (56)
    for b in range(dst.shape[0] // 256):
        o = b * 56
        s0, s1, s2, s3 = _u16(src, o + 48), _u16(src, o + 50), _u16(src, o + 52), _u16(src, o + 54)
        bits = (s0 >> 12) | ((s1 >> 8) & 0xF0) | ((s2 >> 4) & 0xF00) | (s3 & 0xF000)
        d = f16_bits_to_f32(np.uint16(bits))
        for ib in range(8):
            sc = _u16(src, o + 48 + 2 * (ib // 2))
            for l in range(4):
                dl = d * np.float32(2 * ((sc >> (6 * (ib % 2) + 3 * (l // 2))) & 7) + 1)
                qh = np.int64(src[o + 32 + 2 * ib + l // 2]) >> (4 * (l % 2))
                g = np.int64(src[o + 4 * ib + l]) | ((qh & 7) << 8)
                delta = -IQ1S_DELTA if qh & 8 else IQ1S_DELTA
                base = b * 256 + ib * 32 + l * 8
                for j in range(8):
                    dst[base + j] = dl * (np.float32(IQ1S_GRID[g, j]) + delta)


@njit(cache=True)
def _decode_row(fmt, src, dst, n16):
    """Decode one row of blocks src (uint8, row_bytes) into dst (float32, cols)."""
    cols = dst.shape[0]
    if fmt == 0:  # F32
        f = src.view(np.float32)
        for k in range(cols):
            dst[k] = f[k]
    elif fmt == 1:  # F16
        for k in range(cols):
            dst[k] = f16_at(src, 2 * k)
    elif fmt == 2:  # BF16: the high half of an f32
        u = dst.view(np.uint32)
        for k in range(cols):
            u[k] = (np.uint32(src[2 * k]) << 16) | (np.uint32(src[2 * k + 1]) << 24)
    elif fmt == 3:
        _row_q8_0(src, dst, n16)
    elif fmt == 4:
        _row_q4(src, dst, n16, 18, False)
    elif fmt == 5:
        _row_q4(src, dst, n16, 20, True)
    elif fmt == 6:
        _row_q5(src, dst, n16, 22, False)
    elif fmt == 7:
        _row_q5(src, dst, n16, 24, True)
    elif fmt == 8:
        _row_q2_k(src, dst, n16)
    elif fmt == 9:
        _row_q3_k(src, dst, n16)
    elif fmt == 10:
        _row_q45_k(src, dst, n16, False)
    elif fmt == 11:
        _row_q45_k(src, dst, n16, True)
    elif fmt == 12:
        _row_q6_k(src, dst, n16)
    elif fmt == 13:
        _row_iq4_nl(src, dst)
    elif fmt == 14:
        _row_iq4_xs(src, dst)
    elif fmt == 15:
        _row_iq3_xxs(src, dst)
    elif fmt == 16:
        _row_iq3_s(src, dst)
    elif fmt == 17:
        _row_iq2_xxs(src, dst)
    elif fmt == 18:
        _row_iq2_xs(src, dst)
    elif fmt == 19:
        _row_iq2_s(src, dst)
    elif fmt == 20:
        _row_iq1_s(src, dst)
    elif fmt == 21:
        _row_iq1_m(src, dst)


@njit(inline="always")
def _scale_min_k4(src, o, s):
    """The 6-bit scale and min of sub-block s from the 12 packed bytes at src[o:o+12] (Q4_K, Q5_K)."""
    if s < 4:
        return np.int32(src[o + s]) & 63, np.int32(src[o + s + 4]) & 63
    sc = (np.int32(src[o + s + 4]) & 15) | ((np.int32(src[o + s - 4]) >> 6) << 4)
    mn = (np.int32(src[o + s + 4]) >> 4) | ((np.int32(src[o + s]) >> 6) << 4)
    return sc, mn


@njit(parallel=True, cache=True)
def dequantize_rows(fmt, rows, dst, n16):
    """Decode rows (uint8, (n, row_bytes)) into dst (float32, (n, cols)), rows split across threads.

    n16 must be 16; it is an argument only so that LLVM sees a run-time trip count (see the decoders)."""
    for r in prange(rows.shape[0]):
        _decode_row(fmt, rows[r], dst[r], n16)


# Rows per parallel task: enough to amortise the task, few enough to balance 14336 / 4096 rows over the threads.
_ROWS_PER_TASK = 16


@njit(parallel=True, cache=True, fastmath=True)
def matmul_rows(fmt, rows, x, out, n16):
    """out[t, r] = dot(decoded row r, x[t]) for rows (uint8 (N, row_bytes)), x (T, K) float32, out (T, N).

    Each row is decoded once into a per-task buffer and then used for all T activation rows, so this is meant for
    small T (decode); large T goes through tiles and BLAS instead. n16 must be 16 (see the decoders).
    """
    n = rows.shape[0]
    t_count, k = x.shape
    n_tasks = (n + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK
    for task in prange(n_tasks):
        buf = np.empty(k, np.float32)
        r1 = min(n, (task + 1) * _ROWS_PER_TASK)
        for r in range(task * _ROWS_PER_TASK, r1):
            _decode_row(fmt, rows[r], buf, n16)
            for t in range(t_count):
                xt = x[t]
                s = np.float32(0.0)
                for i in range(k):
                    s += buf[i] * xt[i]
                out[t, r] = s

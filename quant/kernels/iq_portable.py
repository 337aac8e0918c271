"""IQ4_XS, IQ4_NL, IQ3_XXS, IQ3_S, IQ2_XS, IQ2_XXS, IQ2_S, IQ1_S and IQ1_M in the portable family's rows layout (portable.py): packing and kernels for any CPU.

The nibbles stay as in the file, interleaved across 64 rows like Q4_K / Q4_0 there; the kernel maps each nibble
through the codebook (kvalues_iq4nl) with a plain table lookup and sums levels times int8 activations (Q8_0, per
32) in int32: a level reaches -127, so a block's sum (up to 32 * 127 * 127) does not fit the int16 lanes that Q4_0
and Q4_K use here.

Layouts (per expert; G groups of ROWS rows):
  IQ4_XS qs (G, nsb, 128, ROWS) the file's qs bytes; sc (G, nsb, 8, ROWS) int8 sub-block scales (ls - 32);
         d (G, nsb, ROWS) f16 bits. 138 bytes per 256 (the file: 136).
  IQ4_NL qs (G, nb, 16, ROWS); d (G, nb, ROWS). 18 bytes per 32 as in the file.
  IQ3_XXS qs (G, nsb, 96, ROWS) the file's 64 grid indices and 8 sign-and-scale words; d (G, nsb, ROWS). 98 bytes
         per 256 as in the file; decoded in the kernel (iq3xxs_grid, ksigns_iq2xs) one sub-block of 32 at a time.
  IQ3_S  qs (G, nsb, 108, ROWS) the file's 64 low index bytes, 8 qh bytes (the 9th bits), 32 sign bytes and 4 scale
         bytes; d (G, nsb, ROWS). 110 bytes per 256 as in the file (iq3s_grid, signs one bit per value).
  IQ2_XS qs (G, nsb, 72, ROWS) the file's 32 uint16 (grid index and signs) and 8 scale bytes; d (G, nsb, ROWS). 74
         bytes per 256 as in the file; decoded in the kernel (iq2xs_grid, ksigns_iq2xs) the same way.
  IQ2_S  qs (G, nsb, 80, ROWS) the file's 32 low index bytes, 32 sign bytes, 8 qh bytes (2 index bits per entry)
         and 8 scale bytes; d (G, nsb, ROWS). 82 bytes per 256 as in the file (iq2s_grid).
  IQ2_XXS qs (G, nsb, 64, ROWS) the file's 8 x (4 grid indices, a sign-and-scale uint32); d (G, nsb, ROWS). 66 bytes
         per 256 as in the file (iq2xxs_grid).
  IQ1_S  qs (G, nsb, 48, ROWS) the file's 32 index bytes and 8 uint16 qh; d (G, nsb, ROWS). 50 bytes per 256 as in
         the file (iq1s_grid, values -1, 0, 1, plus or minus IQ1S_DELTA = 1/8).
  IQ1_M  qs (G, nsb, 56, ROWS) the whole block (its f16 d spread over the scale words' top nibbles, which the kernel
         masks off); d (G, nsb, ROWS) gathered from those nibbles. 58 bytes per 256 (the file: 56).
The IQ1 kernels sum 8 times the values over d (2 s + 1), 8 g +- 1, in integers: the grid part by a table lookup, the
delta's part as +- the activations' sum over its 32 (IQ1_S: the Q8_0 block sums xs) or 8 values (IQ1_M), as
llama.cpp's ggml_vec_dot_iq1_s_q8_K / ggml_vec_dot_iq1_m_q8_K (ggml/src/ggml-cpu/arch/x86/quants.c) take it from
the activations' block sums or a second byte dot.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..iq_grids import (
    IQ1S_GRID,
    IQ2S_GRID,
    IQ2XS_GRID,
    IQ2XXS_GRID,
    IQ3S_GRID,
    IQ3XXS_GRID,
    KSIGNS,
    KVALUES_IQ4NL,
)
from .portable import (
    ROWS,
    _f16_bits,
    _halves_to_float,
    _pack_simple,
    _run_task,
    _store_group,
)

__all__ = ["iq1_m_runs", "iq1_s_runs", "iq2_s_runs", "iq2_xs_runs", "iq2_xxs_runs", "iq3_s_runs", "iq3_xxs_runs",
           "iq4_nl_runs", "iq4_xs_runs", "pack_iq1_m", "pack_iq1_s", "pack_iq2_s", "pack_iq2_xs", "pack_iq2_xxs",
           "pack_iq3_s", "pack_iq3_xxs", "pack_iq4_nl", "pack_iq4_xs"]

_LEVELS = KVALUES_IQ4NL.astype(np.int32)
_GRID3 = IQ3XXS_GRID.astype(np.int32)
_GRID3S = IQ3S_GRID.astype(np.int32).reshape(-1)  # flat: entry i at 4 i
_GRID2S = IQ2S_GRID.astype(np.int32).reshape(-1)  # flat: entry i at 8 i
_GRID2 = IQ2XS_GRID.astype(np.int32)
_GRID2XXS = IQ2XXS_GRID.astype(np.int32)
_GRID1 = IQ1S_GRID.astype(np.int32)
_KSIGNS = KSIGNS.astype(np.int32)


@njit(parallel=True, cache=True)
def pack_iq4_xs(rows, qs, sc, d):
    """rows (N, nsb*136) -> qs (G, nsb, 128, ROWS), sc (G, nsb, 8, ROWS) (int8 viewed as uint8), d (G, nsb, ROWS).
    Block layout: ggml-common.h block_iq4_xs, scales as in dequantize_row_iq4_xs (see iq_quads.pack_iq4_xs)."""
    n = rows.shape[0]
    n_groups, nsb = qs.shape[0], qs.shape[1]
    for g in prange(n_groups):
        for r in range(ROWS):
            row = g * ROWS + r
            for b in range(nsb):
                if row < n:
                    src = rows[row]
                    o = b * 136
                    d[g, b, r] = _f16_bits(src, o)
                    sh = np.int32(_f16_bits(src, o + 2))
                    for s in range(8):
                        ls = ((np.int32(src[o + 4 + s // 2]) >> (4 * (s % 2))) & 15) | (((sh >> (2 * s)) & 3) << 4)
                        sc[g, b, s, r] = np.uint8((ls - 32) & 255)
                    for j in range(128):
                        qs[g, b, j, r] = src[o + 8 + j]
                else:
                    d[g, b, r] = 0
                    for s in range(8):
                        sc[g, b, s, r] = 0
                    for j in range(128):
                        qs[g, b, j, r] = 0


@njit(parallel=True, cache=True)
def pack_iq4_nl(rows, qs, d):
    """rows (N, nb*18) -> qs (G, nb, 16, ROWS), d (G, nb, ROWS) f16 bits; pad rows have scale 0."""
    _pack_simple(rows, qs, d, 18, 0)


@njit(inline="always")
def _block_dot(q, j0, xb, acc):
    """acc[r] = sum over the 16 code bytes q[j0 + j, r] of level(low) * xb[j] + level(high) * xb[16 + j]."""
    for r in range(ROWS):
        s = np.int32(0)
        for j in range(16):
            v = np.int32(q[j0 + j, r])
            s += _LEVELS[v & 15] * xb[j] + _LEVELS[v >> 4] * xb[16 + j]
        acc[r] = s


@njit(parallel=True, cache=True, fastmath=True)
def iq4_xs_runs(qs, sc, d, xq, xd, xs, run_start, run_expert, n_rows, out):
    n_groups, nsb = qs.shape[1], qs.shape[2]
    for task in prange(run_expert.shape[0] * n_groups):
        g, e, m0, m1 = _run_task(task, n_groups, run_start, run_expert)
        accf = np.zeros((m1 - m0, ROWS), np.float32)
        dsup = np.empty(ROWS, np.float32)
        xb = np.empty(32, np.int32)
        acc = np.empty(ROWS, np.int32)
        for b in range(nsb):
            _halves_to_float(d[e, g, b], dsup)
            q = qs[e, g, b]
            for m in range(m0, m1):
                a = accf[m - m0]
                for s in range(8):
                    blk = b * 8 + s
                    for j in range(32):
                        xb[j] = xq[m, blk * 32 + j]
                    _block_dot(q, 16 * s, xb, acc)
                    scale = xd[m, blk]
                    for r in range(ROWS):
                        a[r] += np.float32(np.int32(sc[e, g, b, s, r]) * acc[r]) * (dsup[r] * scale)
        _store_group(out, accf, g, m0, m1, n_rows)


@njit(parallel=True, cache=True, fastmath=True)
def iq4_nl_runs(qs, d, xq, xd, xs, run_start, run_expert, n_rows, out):
    n_groups, nb = qs.shape[1], qs.shape[2]
    for task in prange(run_expert.shape[0] * n_groups):
        g, e, m0, m1 = _run_task(task, n_groups, run_start, run_expert)
        accf = np.zeros((m1 - m0, ROWS), np.float32)
        ds = np.empty(ROWS, np.float32)
        xb = np.empty(32, np.int32)
        acc = np.empty(ROWS, np.int32)
        for b in range(nb):
            _halves_to_float(d[e, g, b], ds)
            q = qs[e, g, b]
            for m in range(m0, m1):
                a = accf[m - m0]
                for j in range(32):
                    xb[j] = xq[m, b * 32 + j]
                _block_dot(q, 0, xb, acc)
                scale = xd[m, b]
                for r in range(ROWS):
                    a[r] += np.float32(acc[r]) * (ds[r] * scale)
        _store_group(out, accf, g, m0, m1, n_rows)


@njit(parallel=True, cache=True)
def pack_iq3_xxs(rows, qs, d):
    """rows (N, nsb*98) -> qs (G, nsb, 96, ROWS) (the block's bytes after d), d (G, nsb, ROWS) f16 bits."""
    n = rows.shape[0]
    n_groups, nsb = qs.shape[0], qs.shape[1]
    for g in prange(n_groups):
        for r in range(ROWS):
            row = g * ROWS + r
            for b in range(nsb):
                live = row < n
                d[g, b, r] = _f16_bits(rows[row], b * 98) if live else 0
                for j in range(96):
                    qs[g, b, j, r] = rows[row, b * 98 + 2 + j] if live else 0


@njit(parallel=True, cache=True, fastmath=True)
def iq3_xxs_runs(qs, d, xq, xd, xs, run_start, run_expert, n_rows, out):
    """a[r] += xd * d_r / 4 * (2 s + 1) * (grid values . signed x) per sub-block of 32 (one Q8_0 block of x)."""
    n_groups, nsb = qs.shape[1], qs.shape[2]
    for task in prange(run_expert.shape[0] * n_groups):
        g, e, m0, m1 = _run_task(task, n_groups, run_start, run_expert)
        accf = np.zeros((m1 - m0, ROWS), np.float32)
        dsup = np.empty(ROWS, np.float32)
        xb = np.empty(32, np.int32)
        for b in range(nsb):
            _halves_to_float(d[e, g, b], dsup)
            q = qs[e, g, b]
            for m in range(m0, m1):
                a = accf[m - m0]
                for s in range(8):
                    blk = b * 8 + s
                    for j in range(32):
                        xb[j] = xq[m, blk * 32 + j]
                    scale = xd[m, blk] * np.float32(0.25)
                    for r in range(ROWS):
                        aux = np.int64(q[64 + 4 * s, r]) | (np.int64(q[65 + 4 * s, r]) << 8) \
                            | (np.int64(q[66 + 4 * s, r]) << 16) | (np.int64(q[67 + 4 * s, r]) << 24)
                        acc = np.int32(0)
                        for l in range(4):
                            signs = _KSIGNS[(aux >> (7 * l)) & 127]
                            for h in range(2):
                                gi = np.int64(q[8 * s + 2 * l + h, r])
                                for j in range(4):
                                    v = _GRID3[gi, j] * xb[8 * l + 4 * h + j]
                                    acc += -v if (signs >> (4 * h + j)) & 1 else v
                        a[r] += np.float32(np.int32(2 * (aux >> 28) + 1) * acc) * (dsup[r] * scale)
        _store_group(out, accf, g, m0, m1, n_rows)


@njit(parallel=True, cache=True)
def pack_iq3_s(rows, qs, d):
    """rows (N, nsb*110) -> qs (G, nsb, 108, ROWS) (the block's bytes after d), d (G, nsb, ROWS) f16 bits."""
    n = rows.shape[0]
    n_groups, nsb = qs.shape[0], qs.shape[1]
    for g in prange(n_groups):
        for r in range(ROWS):
            row = g * ROWS + r
            for b in range(nsb):
                live = row < n
                d[g, b, r] = _f16_bits(rows[row], b * 110) if live else 0
                for j in range(108):
                    qs[g, b, j, r] = rows[row, b * 110 + 2 + j] if live else 0


@njit(parallel=True, cache=True, fastmath=True)
def iq3_s_runs(qs, d, xq, xd, xs, run_start, run_expert, n_rows, out):
    """a[r] += xd * d_r * (2 s + 1) * (grid values . signed x) per sub-block of 32 (one Q8_0 block of x); the
    grid index's 9th bit is bit k of qh[s] for entry k, the signs one bit per value.

    Each sub-block is decoded once for the group's 64 rows into int32 values (scale and signs applied), every loop
    running across the rows so that LLVM vectorizes it (the grid lookup as a gather), and then dotted with each
    activation row: decoding row by row inside the dot ran slower than the file-layout path. The dot is in float32,
    which is exact here (|value| <= 31 * 15, |x| <= 127: 32 products stay below 2^24) and multiplies faster than
    int32 lanes."""
    n_groups, nsb = qs.shape[1], qs.shape[2]
    for task in prange(run_expert.shape[0] * n_groups):
        g, e, m0, m1 = _run_task(task, n_groups, run_start, run_expert)
        accf = np.zeros((m1 - m0, ROWS), np.float32)
        dsup = np.empty(ROWS, np.float32)
        vals = np.empty((32, ROWS), np.float32)
        gi = np.empty(ROWS, np.int32)
        ls = np.empty(ROWS, np.int32)
        acc = np.empty((4, ROWS), np.float32)
        for b in range(nsb):
            _halves_to_float(d[e, g, b], dsup)
            q = qs[e, g, b]
            for s in range(8):
                for r in range(ROWS):
                    ls[r] = 2 * ((np.int32(q[104 + s // 2, r]) >> (4 * (s % 2))) & 15) + 1
                for k in range(8):
                    for r in range(ROWS):
                        gi[r] = 4 * (np.int32(q[8 * s + k, r]) | (((np.int32(q[64 + s, r]) >> k) & 1) << 8))
                    for j in range(4):
                        for r in range(ROWS):
                            neg = -((np.int32(q[72 + 4 * s + k // 2, r]) >> (4 * (k % 2) + j)) & 1)
                            vals[4 * k + j, r] = np.float32(((_GRID3S[gi[r] + j] ^ neg) - neg) * ls[r])
                blk = b * 8 + s
                m = m0
                while m < m1:  # four activation rows per pass over vals
                    n_x = min(4, m1 - m)
                    acc[:n_x] = 0
                    for j in range(32):
                        for jx in range(n_x):
                            xj = np.float32(xq[m + jx, blk * 32 + j])
                            for r in range(ROWS):
                                acc[jx, r] += vals[j, r] * xj
                    for jx in range(n_x):
                        scale = xd[m + jx, blk]
                        a = accf[m + jx - m0]
                        for r in range(ROWS):
                            a[r] += acc[jx, r] * (dsup[r] * scale)
                    m += n_x
        _store_group(out, accf, g, m0, m1, n_rows)


@njit(parallel=True, cache=True)
def pack_iq2_s(rows, qs, d):
    """rows (N, nsb*82) -> qs (G, nsb, 80, ROWS) (the block's bytes after d), d (G, nsb, ROWS) f16 bits."""
    n = rows.shape[0]
    n_groups, nsb = qs.shape[0], qs.shape[1]
    for g in prange(n_groups):
        for r in range(ROWS):
            row = g * ROWS + r
            for b in range(nsb):
                live = row < n
                d[g, b, r] = _f16_bits(rows[row], b * 82) if live else 0
                for j in range(80):
                    qs[g, b, j, r] = rows[row, b * 82 + 2 + j] if live else 0


@njit(parallel=True, cache=True, fastmath=True)
def iq2_s_runs(qs, d, xq, xd, xs, run_start, run_expert, n_rows, out):
    """a[r] += xd * d_r / 8 * sum over the two halves of 16 of (2 s + 1) * (grid values . signed x), per sub-block
    of 32 (one Q8_0 block of x); entry l's index is qs[l] with bits 2 l, 2 l + 1 of qh[s] on top, its sign byte
    qs[32 + l]. Decoded and dotted as iq3_s_runs does (float32 is exact: |value| <= 31 * 43, |x| <= 127, 32
    products stay below 2^24)."""
    n_groups, nsb = qs.shape[1], qs.shape[2]
    for task in prange(run_expert.shape[0] * n_groups):
        g, e, m0, m1 = _run_task(task, n_groups, run_start, run_expert)
        accf = np.zeros((m1 - m0, ROWS), np.float32)
        dsup = np.empty(ROWS, np.float32)
        vals = np.empty((32, ROWS), np.float32)
        gi = np.empty(ROWS, np.int32)
        ls = np.empty(ROWS, np.int32)
        acc = np.empty((4, ROWS), np.float32)
        for b in range(nsb):
            _halves_to_float(d[e, g, b], dsup)
            q = qs[e, g, b]
            for s in range(8):
                for l in range(4):
                    for r in range(ROWS):
                        gi[r] = 8 * (np.int32(q[4 * s + l, r]) | (((np.int32(q[64 + s, r]) >> (2 * l)) & 3) << 8))
                        ls[r] = 2 * ((np.int32(q[72 + s, r]) >> (4 * (l // 2))) & 15) + 1
                    for j in range(8):
                        for r in range(ROWS):
                            neg = -((np.int32(q[32 + 4 * s + l, r]) >> j) & 1)
                            vals[8 * l + j, r] = np.float32(((_GRID2S[gi[r] + j] ^ neg) - neg) * ls[r])
                blk = b * 8 + s
                m = m0
                while m < m1:  # four activation rows per pass over vals
                    n_x = min(4, m1 - m)
                    acc[:n_x] = 0
                    for j in range(32):
                        for jx in range(n_x):
                            xj = np.float32(xq[m + jx, blk * 32 + j])
                            for r in range(ROWS):
                                acc[jx, r] += vals[j, r] * xj
                    for jx in range(n_x):
                        scale = xd[m + jx, blk] * np.float32(0.125)
                        a = accf[m + jx - m0]
                        for r in range(ROWS):
                            a[r] += acc[jx, r] * (dsup[r] * scale)
                    m += n_x
        _store_group(out, accf, g, m0, m1, n_rows)


@njit(parallel=True, cache=True)
def pack_iq2_xs(rows, qs, d):
    """rows (N, nsb*74) -> qs (G, nsb, 72, ROWS) (the block's bytes after d), d (G, nsb, ROWS) f16 bits."""
    n = rows.shape[0]
    n_groups, nsb = qs.shape[0], qs.shape[1]
    for g in prange(n_groups):
        for r in range(ROWS):
            row = g * ROWS + r
            for b in range(nsb):
                live = row < n
                d[g, b, r] = _f16_bits(rows[row], b * 74) if live else 0
                for j in range(72):
                    qs[g, b, j, r] = rows[row, b * 74 + 2 + j] if live else 0


@njit(parallel=True, cache=True, fastmath=True)
def iq2_xs_runs(qs, d, xq, xd, xs, run_start, run_expert, n_rows, out):
    """a[r] += xd * d_r / 8 * sum over the two halves of 16 of (2 s + 1) * (grid values . signed x), per sub-block
    of 32 (one Q8_0 block of x)."""
    n_groups, nsb = qs.shape[1], qs.shape[2]
    for task in prange(run_expert.shape[0] * n_groups):
        g, e, m0, m1 = _run_task(task, n_groups, run_start, run_expert)
        accf = np.zeros((m1 - m0, ROWS), np.float32)
        dsup = np.empty(ROWS, np.float32)
        xb = np.empty(32, np.int32)
        for b in range(nsb):
            _halves_to_float(d[e, g, b], dsup)
            q = qs[e, g, b]
            for m in range(m0, m1):
                a = accf[m - m0]
                for s in range(8):
                    blk = b * 8 + s
                    for j in range(32):
                        xb[j] = xq[m, blk * 32 + j]
                    scale = xd[m, blk] * np.float32(0.125)
                    for r in range(ROWS):
                        ls = np.int32(q[64 + s, r])
                        total = np.int32(0)
                        for h in range(2):
                            acc = np.int32(0)
                            for u in range(2):
                                i = 4 * s + 2 * h + u
                                code = np.int32(q[2 * i, r]) | (np.int32(q[2 * i + 1, r]) << 8)
                                gi = code & 511
                                signs = _KSIGNS[code >> 9]
                                for j in range(8):
                                    v = _GRID2[gi, j] * xb[16 * h + 8 * u + j]
                                    acc += -v if (signs >> j) & 1 else v
                            total += (2 * ((ls >> (4 * h)) & 15) + 1) * acc
                        a[r] += np.float32(total) * (dsup[r] * scale)
        _store_group(out, accf, g, m0, m1, n_rows)


@njit(parallel=True, cache=True)
def pack_iq2_xxs(rows, qs, d):
    """rows (N, nsb*66) -> qs (G, nsb, 64, ROWS) (the block's bytes after d), d (G, nsb, ROWS) f16 bits."""
    n = rows.shape[0]
    n_groups, nsb = qs.shape[0], qs.shape[1]
    for g in prange(n_groups):
        for r in range(ROWS):
            row = g * ROWS + r
            for b in range(nsb):
                live = row < n
                d[g, b, r] = _f16_bits(rows[row], b * 66) if live else 0
                for j in range(64):
                    qs[g, b, j, r] = rows[row, b * 66 + 2 + j] if live else 0


@njit(parallel=True, cache=True, fastmath=True)
def iq2_xxs_runs(qs, d, xq, xd, xs, run_start, run_expert, n_rows, out):
    """a[r] += xd * d_r / 8 * (2 s + 1) * (grid values . signed x) per sub-block of 32 (one Q8_0 block of x)."""
    n_groups, nsb = qs.shape[1], qs.shape[2]
    for task in prange(run_expert.shape[0] * n_groups):
        g, e, m0, m1 = _run_task(task, n_groups, run_start, run_expert)
        accf = np.zeros((m1 - m0, ROWS), np.float32)
        dsup = np.empty(ROWS, np.float32)
        xb = np.empty(32, np.int32)
        for b in range(nsb):
            _halves_to_float(d[e, g, b], dsup)
            q = qs[e, g, b]
            for m in range(m0, m1):
                a = accf[m - m0]
                for s in range(8):
                    blk = b * 8 + s
                    for j in range(32):
                        xb[j] = xq[m, blk * 32 + j]
                    scale = xd[m, blk] * np.float32(0.125)
                    for r in range(ROWS):
                        aux = np.int64(q[8 * s + 4, r]) | (np.int64(q[8 * s + 5, r]) << 8) \
                            | (np.int64(q[8 * s + 6, r]) << 16) | (np.int64(q[8 * s + 7, r]) << 24)
                        acc = np.int32(0)
                        for u in range(4):
                            gi = np.int64(q[8 * s + u, r])
                            signs = _KSIGNS[(aux >> (7 * u)) & 127]
                            for j in range(8):
                                v = _GRID2XXS[gi, j] * xb[8 * u + j]
                                acc += -v if (signs >> j) & 1 else v
                        a[r] += np.float32(np.int32(2 * (aux >> 28) + 1) * acc) * (dsup[r] * scale)
        _store_group(out, accf, g, m0, m1, n_rows)


@njit(parallel=True, cache=True)
def pack_iq1_s(rows, qs, d):
    """rows (N, nsb*50) -> qs (G, nsb, 48, ROWS) (the block's bytes after d), d (G, nsb, ROWS) f16 bits."""
    n = rows.shape[0]
    n_groups, nsb = qs.shape[0], qs.shape[1]
    for g in prange(n_groups):
        for r in range(ROWS):
            row = g * ROWS + r
            for b in range(nsb):
                live = row < n
                d[g, b, r] = _f16_bits(rows[row], b * 50) if live else 0
                for j in range(48):
                    qs[g, b, j, r] = rows[row, b * 50 + 2 + j] if live else 0


@njit(parallel=True, cache=True, fastmath=True)
def iq1_s_runs(qs, d, xq, xd, xs, run_start, run_expert, n_rows, out):
    """a[r] += xd * d_r / 8 * (2 s + 1) * (8 (grid values . x) +- sum of x) per sub-block of 32 (one Q8_0 block of
    x): the values are d (2 s + 1) (grid +- 1/8), and xs holds the block's sum of x."""
    n_groups, nsb = qs.shape[1], qs.shape[2]
    for task in prange(run_expert.shape[0] * n_groups):
        g, e, m0, m1 = _run_task(task, n_groups, run_start, run_expert)
        accf = np.zeros((m1 - m0, ROWS), np.float32)
        dsup = np.empty(ROWS, np.float32)
        xb = np.empty(32, np.int32)
        for b in range(nsb):
            _halves_to_float(d[e, g, b], dsup)
            q = qs[e, g, b]
            for m in range(m0, m1):
                a = accf[m - m0]
                for s in range(8):
                    blk = b * 8 + s
                    for j in range(32):
                        xb[j] = xq[m, blk * 32 + j]
                    bsum = xs[m, blk]
                    scale = xd[m, blk] * np.float32(0.125)
                    for r in range(ROWS):
                        qh = np.int32(q[32 + 2 * s, r]) | (np.int32(q[33 + 2 * s, r]) << 8)
                        acc = np.int32(0)
                        for l in range(4):
                            gi = np.int32(q[4 * s + l, r]) | (((qh >> (3 * l)) & 7) << 8)
                            for j in range(8):
                                acc += _GRID1[gi, j] * xb[8 * l + j]
                        total = 8 * acc + (-bsum if qh & 0x8000 else bsum)
                        a[r] += np.float32((2 * ((qh >> 12) & 7) + 1) * total) * (dsup[r] * scale)
        _store_group(out, accf, g, m0, m1, n_rows)


@njit(parallel=True, cache=True)
def pack_iq1_m(rows, qs, d):
    """rows (N, nsb*56) -> qs (G, nsb, 56, ROWS) (the whole block), d (G, nsb, ROWS) f16 bits gathered from the top
    nibbles of the block's four uint16 scale words."""
    n = rows.shape[0]
    n_groups, nsb = qs.shape[0], qs.shape[1]
    for g in prange(n_groups):
        for r in range(ROWS):
            row = g * ROWS + r
            for b in range(nsb):
                live = row < n
                bits = np.uint32(0)
                for i in range(4):
                    w = np.uint32(_f16_bits(rows[row], b * 56 + 48 + 2 * i)) if live else np.uint32(0)
                    bits |= (w >> 12) << (4 * i)
                d[g, b, r] = np.uint16(bits)
                for j in range(56):
                    qs[g, b, j, r] = rows[row, b * 56 + j] if live else 0


@njit(parallel=True, cache=True, fastmath=True)
def iq1_m_runs(qs, d, xq, xd, xs, run_start, run_expert, n_rows, out):
    """As iq1_s_runs with a scale per 16 values and a delta sign per 8: the delta's share is +- the sum of those 8
    values of x, summed here once per activation row and sub-block."""
    n_groups, nsb = qs.shape[1], qs.shape[2]
    for task in prange(run_expert.shape[0] * n_groups):
        g, e, m0, m1 = _run_task(task, n_groups, run_start, run_expert)
        accf = np.zeros((m1 - m0, ROWS), np.float32)
        dsup = np.empty(ROWS, np.float32)
        xb = np.empty(32, np.int32)
        xsum = np.empty(4, np.int32)
        for b in range(nsb):
            _halves_to_float(d[e, g, b], dsup)
            q = qs[e, g, b]
            for m in range(m0, m1):
                a = accf[m - m0]
                for s in range(8):
                    blk = b * 8 + s
                    for j in range(32):
                        xb[j] = xq[m, blk * 32 + j]
                    for l in range(4):
                        t = np.int32(0)
                        for j in range(8):
                            t += xb[8 * l + j]
                        xsum[l] = t
                    scale = xd[m, blk] * np.float32(0.125)
                    for r in range(ROWS):
                        sc = np.int32(q[48 + 2 * (s // 2), r]) | (np.int32(q[49 + 2 * (s // 2), r]) << 8)
                        total = np.int32(0)
                        for h in range(2):
                            qhb = np.int32(q[32 + 2 * s + h, r])
                            acc = np.int32(0)
                            for u in range(2):
                                l = 2 * h + u
                                nib = (qhb >> (4 * u)) & 15
                                gi = np.int32(q[4 * s + l, r]) | ((nib & 7) << 8)
                                dot = np.int32(0)
                                for j in range(8):
                                    dot += _GRID1[gi, j] * xb[8 * l + j]
                                acc += 8 * dot + (-xsum[l] if nib & 8 else xsum[l])
                            total += (2 * ((sc >> (6 * (s % 2) + 3 * h)) & 7) + 1) * acc
                        a[r] += np.float32(total) * (dsup[r] * scale)
        _store_group(out, accf, g, m0, m1, n_rows)

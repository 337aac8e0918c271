"""IQ1_S and IQ1_M quantizers with an importance matrix, byte-identical to ggml's ggml_quantize_chunk.

Both formats code 8 weights at a time as one point of a 2048-point lattice whose coordinates are -1, 0 or 1, shifted
by +-IQ1S_DELTA (1/8) and times a scale: IQ1_S has a 3-bit scale and one shift sign per 32 weights, IQ1_M a 3-bit
scale per 16 and a shift sign per 8, under one f16 scale per 256 spread over the top nibbles of its scale words.
The search is ggml's (ggml-quants.c: quantize_row_iq1_s_impl, quantize_row_iq1_m_impl): with only three levels the
weighted fit can be solved exactly, so the weights of a sub-block are sorted by value and every pair of cut points
(everything below the first cut at level -1, between the cuts 0, above +1) is scored from prefix sums, for each
choice of shift sign; the best split that is not a lattice point is moved to the best of its lattice neighbours
(every point at the 3 smallest squared distances, iq2xs_init_impl's lists for kgrid_1bit_2048), and the scale refit.

The sort decides ties: ggml sorts (value, index) pairs with qsort comparing values only, and glibc's qsort is a
merge sort for arrays this small, so equal values keep their index order; `_sort` places each value by counting
(the values below it, the equal ones before it), which gives the same permutation. (A C library whose qsort is not stable would order ties differently; our reference is
llama.cpp's ggml on glibc.)

Float32 rules as in `quant.quantize` (every int that meets a float goes through `_f32()`, no fastmath), so each
operation rounds as ggml's C does. The drivers are cached against this file only: a change to the helpers taken
from quantize_common.py or quantize_iq2.py needs a touch here too.

ggml refuses both formats without an importance matrix (ggml_quantize_requires_imatrix; the process aborts on a
GGML_ASSERT). We refuse them with `ImatrixRequiredError` instead.
"""
from __future__ import annotations

import functools

import numpy as np
from numba import njit, prange

from .formats import QK_K
from .iq_grids import IQ1S_DELTA, IQ1S_GRID
from .quantize_common import (
    _f32,
    _half_from_float_bits,
    _put_f16,
    check_driver_args,
    run_driver,
)
from .quantize_iq2 import ImatrixRequiredError, _nint
from .tensor import QType

__all__ = ["IMATRIX_REQUIRED", "IQ1_DRIVERS", "IQ1_TYPES", "quantize_iq1"]

IQ1_TYPES: tuple[QType, ...] = (QType.IQ1_S, QType.IQ1_M)
IMATRIX_REQUIRED: tuple[QType, ...] = IQ1_TYPES

_KMAP_SIZE = 43692  # ggml's kmap_size: every 8-digit base-4 index up to 0xAAAA
_NWANT = 3          # neighbours: every grid point at the 3 smallest squared distances
_FLT_MAX = 3.4028234663852886e38
_S_BYTES = 50       # IQ1_S: d, qs[32], qh[8] (u16: 4 x 3 index bits, 3 scale bits, the shift's sign)
_M_BYTES = 56       # IQ1_M: qs[32], qh[16] (2 x (3 index bits + shift sign)), scales[8] (4 u16)
_DELTA = float(IQ1S_DELTA)


# ----------------------------------------------------------------------------------------------------------------------
# Lattice tables: ggml's iq2xs_init_impl for kgrid_1bit_2048, built once with numpy
# ----------------------------------------------------------------------------------------------------------------------

@functools.cache
def _tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(levels, kmap, neighbours) as ggml's iq2_data[2] holds them, for the indices the search can reach.

    levels (2048, 8) int64: each coordinate's level 0..2 (ggml's grid holds 2*level+1; the dequantized grid, gguf-py's,
    holds level-1). kmap (43692,) int32: for a base-4 index of 8 levels, its grid point, or -(offset+1) into
    neighbours when it is not one. neighbours (int32): at offset a count n, then the n grid points nearest to that
    index (every point at the 3 smallest squared distances), by distance and then index as ggml's qsort with
    iq2_compare_func leaves them (its keys are distinct, so any sort gives that order); the order decides ties in
    the weighted search. Only indices whose digits are all 0..2 get a list (the search never makes a 3); ggml also
    builds lists for the others, which nothing reads."""
    levels = IQ1S_GRID.astype(np.int64) + 1
    if levels.min() < 0 or levels.max() > 2:
        raise RuntimeError("IQ1_S: the lattice holds values other than -1, 0, 1")
    shifts = 2 * np.arange(8)
    kmap = np.full(_KMAP_SIZE, -1, np.int64)
    index = (levels << shifts).sum(axis=1)
    if np.unique(index).size != len(levels):
        raise RuntimeError("IQ1_S: lattice points collide")
    kmap[index] = np.arange(len(levels))
    reach = ((np.arange(3 ** 8)[:, None] // 3 ** np.arange(8)) % 3 << shifts).sum(axis=1)
    missing = np.sort(reach[kmap[reach] < 0])
    gpos = (2 * levels + 1).astype(np.int16)
    pos = (2 * ((missing[:, None] >> shifts) & 3) + 1).astype(np.int16)
    d2 = np.zeros((len(pos), len(gpos)), np.int16)
    for k in range(8):
        diff = pos[:, k, None] - gpos[None, :, k]
        d2 += diff * diff
    order = np.argsort(d2, axis=1, kind="stable")  # stable: equal distances stay in index order
    sd2 = np.take_along_axis(d2, order, axis=1)
    rank = np.concatenate([np.zeros((len(pos), 1), np.int64), np.cumsum(sd2[:, 1:] > sd2[:, :-1], axis=1)], axis=1)
    keep = rank < _NWANT
    counts = keep.sum(axis=1)
    offsets = np.concatenate([[0], np.cumsum(counts + 1)[:-1]])
    neighbours = np.empty(int((counts + 1).sum()), np.int32)
    neighbours[offsets] = counts
    rows, cols = np.nonzero(keep)  # row-major: each row's kept points in their sorted order
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    neighbours[offsets[rows] + 1 + np.arange(rows.size) - first[rows]] = order[rows, cols]
    kmap[missing] = -(offsets + 1)
    return levels, kmap.astype(np.int32), neighbours


# ----------------------------------------------------------------------------------------------------------------------
# Pieces shared by the two formats
# ----------------------------------------------------------------------------------------------------------------------

@njit
def _weights(x, bo, n, qw, sigma2, weight):
    for i in range(n):
        v = x[bo + i]
        weight[i] = qw[bo + i] * np.sqrt(sigma2 + v * v)


@njit
def _absmax(x, bo, n):
    m = abs(x[bo])
    for i in range(1, n):
        a = abs(x[bo + i])
        m = m if m > a else a  # noqa: FURB136 (ggml's MAX)
    return m


@njit
def _sort(x, bo, n, idx):
    """idx[:n]: the order of x[bo:bo+n] by value, equal values in index order (glibc's qsort, a merge sort). Each
    value's place is counted (the values below it, and the equal ones before it), without branches to mispredict."""
    for j in range(n):
        v = x[bo + j]
        r = 0
        for i in range(n):
            u = x[bo + i]
            r += (u < v) | ((u == v) & (i < j))
        idx[r] = j


@njit
def _cut(idx, n, i1, i2, L):
    """Levels of a split: the sorted values below i1 at 0, from i1 to i2 at 1, the rest at 2."""
    for j in range(n):
        L[idx[j]] = 0 if j < i1 else (1 if j < i2 else 2)


@njit
def _grid_sum(levels, g, xx, x, xo, weight, wo, mult, sums):
    """Adds a lattice point's weighted fit terms: sums[0] += w*q*x, sums[1] += w*q*q, q = xx[level] * mult."""
    for j in range(8):
        w = weight[wo + j]
        q = xx[levels[g, j]] * mult
        sums[0] += w * q * x[xo + j]
        sums[1] += w * q * q


@njit
def _best_neighbour(nb, off, levels, x, xo, weight, wo, scale, xx, terms, L, lo):
    """ggml's iq1_find_best_neighbour2: of the listed points, the one nearest to x/scale in the weighted distance
    (levels read through xx, the shifted values), the first of equal distances. Writes its levels to L[lo:lo+8].
    Each coordinate has three possible terms w * diff * diff, computed once into terms (8, 3) and then summed in
    ggml's order for every point: the same roundings."""
    for i in range(8):
        for l in range(3):
            diff = scale * xx[l] - x[xo + i]
            terms[i, l] = weight[wo + i] * diff * diff
    best = _f32(_FLT_MAX)
    gi = -1
    for j in range(1, np.int64(nb[off]) + 1):
        g = np.int64(nb[off + j])
        d2 = _f32(0)
        for i in range(8):
            d2 += terms[i, levels[g, i]]
        if d2 < best:
            best = d2
            gi = g
    if gi < 0:
        # every distance NaN or above FLT_MAX. ggml then scans the whole grid, reading x at the grid index (past
        # the 8 values: its bug, not reproducible), and aborts if that fails too; we scan it as meant, then give up
        # on the weights and take the first listed point
        for g in range(levels.shape[0]):
            d2 = _f32(0)
            for i in range(8):
                d2 += terms[i, levels[g, i]]
            if d2 < best:
                best = d2
                gi = g
        if gi < 0:
            gi = np.int64(nb[off + 1])
    for i in range(8):
        L[lo + i] = levels[gi, i]
    return gi


@njit(inline="always")
def _better(sumqx, sumq2, best):
    return sumq2 > 0 and sumqx * sumqx > best * sumq2


@njit
def _split_m(px, pw, mx, p2, m2, cp1, cp2, cm1, cm2):
    """IQ1_M's split search: the best cuts (i1, i2) of the 16 sorted values and shift signs k of the two halves
    (0: +,+  1: +,-  2: -,+  3: -,-), scored from the per-half prefix sums px (weight * x) and pw (weight) as ggml
    does (the sum over a split collapses to T*v[2] - px[i1] - px[i2]); the first best wins. Returns (scale, i1,
    i2, k), k = -1 when nothing scored. The terms that do not depend on i2 are computed once: the same roundings."""
    best = -_f32(_FLT_MAX)
    scale = mx
    besti1 = -1
    besti2 = -1
    best_k = -1
    txp0 = px[0, 16] * p2
    txm0 = px[0, 16] * m2
    txp1 = px[1, 16] * p2
    txm1 = px[1, 16] * m2
    twp0 = pw[0, 16] * p2 * p2
    twm0 = pw[0, 16] * m2 * m2
    twp1 = pw[1, 16] * p2 * p2
    twm1 = pw[1, 16] * m2 * m2
    for i1 in range(17):
        a0 = px[0, i1]
        a1 = px[1, i1]
        wp0 = twp0 + pw[0, i1] * cp1
        wm0 = twm0 + pw[0, i1] * cm1
        wp1 = twp1 + pw[1, i1] * cp1
        wm1 = twm1 + pw[1, i1] * cm1
        for i2 in range(i1, 17):
            s0 = a0 + px[0, i2]
            s1 = a1 + px[1, i2]
            qxp0 = txp0 - s0
            qxm0 = txm0 - s0
            qxp1 = txp1 - s1
            qxm1 = txm1 - s1
            q2p0 = wp0 + pw[0, i2] * cp2
            q2m0 = wm0 + pw[0, i2] * cm2
            q2p1 = wp1 + pw[1, i2] * cp2
            q2m1 = wm1 + pw[1, i2] * cm2
            sx = qxp0 + qxp1
            s2 = q2p0 + q2p1
            if _better(sx, s2, best):
                scale = sx / s2
                best = scale * sx
                besti1, besti2, best_k = i1, i2, 0
            sx = qxp0 + qxm1
            s2 = q2p0 + q2m1
            if _better(sx, s2, best):
                scale = sx / s2
                best = scale * sx
                besti1, besti2, best_k = i1, i2, 1
            sx = qxm0 + qxp1
            s2 = q2m0 + q2p1
            if _better(sx, s2, best):
                scale = sx / s2
                best = scale * sx
                besti1, besti2, best_k = i1, i2, 2
            sx = qxm0 + qxm1
            s2 = q2m0 + q2m1
            if _better(sx, s2, best):
                scale = sx / s2
                best = scale * sx
                besti1, besti2, best_k = i1, i2, 3
    return scale, besti1, besti2, best_k


@njit
def _lookup(L, lo, kmap):
    u = 0
    for i in range(8):
        u |= L[lo + i] << (2 * i)
    return np.int64(kmap[u])


@njit
def _sigma2(x, xo):
    sumx2 = _f32(0)
    for i in range(QK_K):
        sumx2 += x[xo + i] * x[xo + i]
    return _f32(2) * sumx2 / _f32(QK_K)


# ----------------------------------------------------------------------------------------------------------------------
# Row kernels
# ----------------------------------------------------------------------------------------------------------------------

@njit
def _row_iq1_s(x, qw, out, levels, kmap, nb):
    """quantize_row_iq1_s_impl on one row, 32 weights per sub-block (IQ1S_BLOCK_SIZE)."""
    sf = np.empty(1, np.float32)
    su = sf.view(np.uint32)
    x_p = np.array([_f32(-1) + _f32(_DELTA), _f32(_DELTA), _f32(1) + _f32(_DELTA)], np.float32)
    x_m = np.array([_f32(-1) - _f32(_DELTA), -_f32(_DELTA), _f32(1) - _f32(_DELTA)], np.float32)
    p0, p1, p2 = x_p[0], x_p[1], x_p[2]
    m0, m1, m2 = x_m[0], x_m[1], x_m[2]
    weight = np.empty(32, np.float32)
    sumx = np.empty(33, np.float32)
    sumw = np.empty(33, np.float32)
    idx = np.zeros(32, np.int64)
    L = np.zeros(32, np.int64)
    index = np.zeros(4, np.int64)
    scales = np.zeros(8, np.float32)
    shifts = np.zeros(8, np.int64)
    sums = np.zeros(2, np.float32)
    terms = np.empty((8, 3), np.float32)
    for ibl in range(x.size // QK_K):
        xo, o = ibl * QK_K, ibl * _S_BYTES
        for j in range(_S_BYTES):
            out[o + j] = 0
        sigma2 = _sigma2(x, xo)
        max_scale = _f32(0)
        for ib in range(8):
            bo = xo + 32 * ib
            _weights(x, bo, 32, qw, sigma2, weight)
            mx = _absmax(x, bo, 32)
            if mx < _f32(1e-12):  # GROUP_MAX_EPS_IQ1_S
                scales[ib] = _f32(0)
                shifts[ib] = 1
                continue
            _sort(x, bo, 32, idx)
            sumx[0] = _f32(0)
            sumw[0] = _f32(0)
            for j in range(32):
                i = idx[j]
                sumx[j + 1] = sumx[j] + weight[i] * x[bo + i]
                sumw[j + 1] = sumw[j] + weight[i]
            best = -_f32(_FLT_MAX)
            scale = mx
            besti1 = -1
            besti2 = -1
            best_shift = 0
            for i1 in range(33):
                sx1 = sumx[i1] - sumx[0]
                sw1 = sumw[i1] - sumw[0]
                tp = sx1 * p0  # the terms of the first group, the same for every i2
                tm = sx1 * m0
                wp = sw1 * p0 * p0
                wm = sw1 * m0 * m0
                for i2 in range(i1, 33):
                    sx2 = sumx[i2] - sumx[i1]
                    sx3 = sumx[32] - sumx[i2]
                    sw2 = sumw[i2] - sumw[i1]
                    sw3 = sumw[32] - sumw[i2]
                    sumqx = tp + sx2 * p1 + sx3 * p2
                    sumq2 = wp + sw2 * p1 * p1 + sw3 * p2 * p2
                    if _better(sumqx, sumq2, best):
                        scale = sumqx / sumq2
                        best = scale * sumqx
                        besti1, besti2, best_shift = i1, i2, 1
                    sumqx = tm + sx2 * m1 + sx3 * m2
                    sumq2 = wm + sw2 * m1 * m1 + sw3 * m2 * m2
                    if _better(sumqx, sumq2, best):
                        scale = sumqx / sumq2
                        best = scale * sumqx
                        besti1, besti2, best_shift = i1, i2, -1
            if besti1 < 0 or besti2 < 0 or best_shift == 0:
                scales[ib] = _f32(0)
                shifts[ib] = 1
                continue
            _cut(idx, 32, besti1, besti2, L)
            if scale < 0:
                for j in range(32):
                    L[j] = 2 - L[j]
                scale = -scale
                best_shift = -best_shift
            xx = x_p if best_shift == 1 else x_m
            all_on_grid = True
            for k in range(4):
                gi = _lookup(L, 8 * k, kmap)
                if gi < 0:
                    all_on_grid = False
                    gi = _best_neighbour(nb, -gi - 1, levels, x, bo + 8 * k, weight, 8 * k, scale, xx, terms, L, 8 * k)
                index[k] = gi
            if not all_on_grid:
                sums[0] = _f32(0)
                sums[1] = _f32(0)
                for k in range(4):
                    _grid_sum(levels, index[k], xx, x, bo + 8 * k, weight, 8 * k, _f32(1), sums)
                if sums[0] > 0 and sums[1] > 0:
                    scale = sums[0] / sums[1]
            h = 0
            for k in range(4):
                out[o + 2 + 4 * ib + k] = index[k] & 0xFF
                h |= (index[k] >> 8) << (3 * k)
            out[o + 34 + 2 * ib] = h & 0xFF
            out[o + 35 + 2 * ib] = h >> 8
            scales[ib] = scale
            shifts[ib] = best_shift
            max_scale = max_scale if max_scale > scale else scale  # noqa: FURB136 (ggml's MAX)
        if max_scale == 0:
            continue
        d = max_scale / _f32(15)
        _put_f16(out, o, d * _f32(1.125), sf, su)
        id_ = _f32(1) / d
        for ib in range(8):
            l = max(0, min(7, _nint(_f32(0.5) * (id_ * scales[ib] - _f32(1)), sf, su)))
            if shifts[ib] == -1:
                l |= 8
            out[o + 35 + 2 * ib] |= l << 4


@njit
def _row_iq1_m(x, qw, out, levels, kmap, nb):
    """quantize_row_iq1_m_impl on one row, 16 weights per sub-block (IQ1M_BLOCK_SIZE), a shift sign per 8."""
    sf = np.empty(1, np.float32)
    su = sf.view(np.uint32)
    x_p = np.array([_f32(-1) + _f32(_DELTA), _f32(_DELTA), _f32(1) + _f32(_DELTA)], np.float32)
    x_m = np.array([_f32(-1) - _f32(_DELTA), -_f32(_DELTA), _f32(1) - _f32(_DELTA)], np.float32)
    weight = np.empty(16, np.float32)
    px = np.empty((2, 17), np.float32)
    pw = np.empty((2, 17), np.float32)
    idx = np.zeros(16, np.int64)
    L = np.zeros(16, np.int64)
    index = np.zeros(2, np.int64)
    scales = np.zeros(16, np.float32)
    shifts = np.zeros(16, np.int64)
    sc = np.zeros(4, np.int64)
    sums = np.zeros(2, np.float32)
    terms = np.empty((8, 3), np.float32)
    masks = np.array([0x00, 0x80, 0x08, 0x88], np.int64)
    # the constants of ggml's split score (v[0] - v[1] = v[1] - v[2] = -1 for both shifts)
    p2 = x_p[2]
    m2 = x_m[2]
    cp1 = x_p[0] * x_p[0] - x_p[1] * x_p[1]
    cp2 = x_p[1] * x_p[1] - x_p[2] * x_p[2]
    cm1 = x_m[0] * x_m[0] - x_m[1] * x_m[1]
    cm2 = x_m[1] * x_m[1] - x_m[2] * x_m[2]
    for ibl in range(x.size // QK_K):
        xo, o = ibl * QK_K, ibl * _M_BYTES
        for j in range(_M_BYTES):
            out[o + j] = 0
        sigma2 = _sigma2(x, xo)
        max_scale = _f32(0)
        for ib in range(16):
            bo = xo + 16 * ib
            _weights(x, bo, 16, qw, sigma2, weight)
            mx = _absmax(x, bo, 16)
            if mx < _f32(1e-7):  # GROUP_MAX_EPS_IQ1_M
                scales[ib] = _f32(0)
                shifts[ib] = 0
                continue
            _sort(x, bo, 16, idx)
            # prefix sums per half of the sub-block: each half takes its own shift sign
            for h in range(2):
                px[h, 0] = _f32(0)
                pw[h, 0] = _f32(0)
            for j in range(16):
                i = idx[j]
                h = 0 if i < 8 else 1
                px[h, j + 1] = px[h, j] + weight[i] * x[bo + i]
                px[1 - h, j + 1] = px[1 - h, j]
                pw[h, j + 1] = pw[h, j] + weight[i]
                pw[1 - h, j + 1] = pw[1 - h, j]
            scale, besti1, besti2, best_k = _split_m(px, pw, mx, p2, m2, cp1, cp2, cm1, cm2)
            if besti1 < 0 or besti2 < 0 or best_k < 0:
                scales[ib] = _f32(0)
                shifts[ib] = 0
                continue
            _cut(idx, 16, besti1, besti2, L)
            if scale < 0:
                for j in range(16):
                    L[j] = 2 - L[j]
                scale = -scale
                best_k = 3 - best_k
            all_on_grid = True
            for k in range(2):
                xx = x_p if (best_k < 2 if k == 0 else best_k % 2 == 0) else x_m
                gi = _lookup(L, 8 * k, kmap)
                if gi < 0:
                    all_on_grid = False
                    gi = _best_neighbour(nb, -gi - 1, levels, x, bo + 8 * k, weight, 8 * k, scale, xx, terms, L, 8 * k)
                index[k] = gi
            if not all_on_grid:
                sums[0] = _f32(0)
                sums[1] = _f32(0)
                for k in range(2):
                    xx = x_p if (best_k < 2 if k == 0 else best_k % 2 == 0) else x_m
                    _grid_sum(levels, index[k], xx, x, bo + 8 * k, weight, 8 * k, _f32(1), sums)
                if sums[0] > 0 and sums[1] > 0:
                    scale = sums[0] / sums[1]
            out[o + 2 * ib] = index[0] & 0xFF
            out[o + 2 * ib + 1] = index[1] & 0xFF
            out[o + 32 + ib] = (index[0] >> 8) | ((index[1] >> 8) << 4)
            scales[ib] = scale
            shifts[ib] = best_k
            max_scale = max_scale if max_scale > scale else scale  # noqa: FURB136 (ggml's MAX)
        if max_scale == 0:
            continue
        # the 3-bit scales, then the block scale refit to them over every sub-block (skipped ones at grid point 0)
        d = max_scale / _f32(15)
        id_ = _f32(1) / d
        sums[0] = _f32(0)
        sums[1] = _f32(0)
        for j in range(4):
            sc[j] = 0
        for ib in range(16):
            l = max(0, min(7, _nint(_f32(0.5) * (id_ * scales[ib] - _f32(1)), sf, su)))
            sc[ib // 4] |= l << (3 * (ib % 4))
            out[o + 32 + ib] |= masks[shifts[ib]]
            bo = xo + 16 * ib
            _weights(x, bo, 16, qw, sigma2, weight)
            qh = np.int64(out[o + 32 + ib])
            for k in range(2):
                xx = x_p if (shifts[ib] < 2 if k == 0 else shifts[ib] % 2 == 0) else x_m
                g = np.int64(out[o + 2 * ib + k]) + ((qh << (8 - 4 * k)) & 0x700)
                _grid_sum(levels, g, xx, x, bo + 8 * k, weight, 8 * k, _f32(2 * l + 1), sums)
        if sums[1] > 0:
            d = sums[0] / sums[1]
        sf[0] = d * _f32(1.1125)
        hb = _half_from_float_bits(su[0])
        sc[0] |= (hb & 0x000F) << 12
        sc[1] |= (hb & 0x00F0) << 8
        sc[2] |= (hb & 0x0F00) << 4
        sc[3] |= hb & 0xF000
        for j in range(4):
            out[o + 48 + 2 * j] = sc[j] & 0xFF
            out[o + 49 + 2 * j] = (sc[j] >> 8) & 0xFF


@njit(cache=True, parallel=True)
def _rows_iq1_s(x, qw, out, levels, kmap, nb):
    for r in prange(x.shape[0]):
        _row_iq1_s(x[r], qw, out[r], levels, kmap, nb)


@njit(cache=True, parallel=True)
def _rows_iq1_m(x, qw, out, levels, kmap, nb):
    for r in prange(x.shape[0]):
        _row_iq1_m(x[r], qw, out[r], levels, kmap, nb)


# ----------------------------------------------------------------------------------------------------------------------
# Drivers: checked in Python, then the compiled rows
# ----------------------------------------------------------------------------------------------------------------------

_KERNELS = {QType.IQ1_S: _rows_iq1_s, QType.IQ1_M: _rows_iq1_m}


def _check(qtype: QType, x, qw, has_w: bool, out) -> None:
    if not has_w:
        raise ImatrixRequiredError(f"{qtype.name} needs an importance matrix (llama.cpp makes it only with one)")
    check_driver_args(qtype, x, qw, has_w, out)


def _driver(qtype: QType):
    def run(x, qw, has_w, out):
        """IQ4_DRIVERS' convention: rows x (rows, cols) float32, importance qw (cols,) (required: has_w must be
        true), out (rows, row_bytes) uint8 written in place."""
        _check(qtype, x, qw, bool(has_w), out)
        levels, kmap, nb = _tables()
        _KERNELS[qtype](x, qw, out, levels, kmap, nb)
    run.__name__ = f"quantize_{qtype.name.lower()}"
    return run


IQ1_DRIVERS = {q: _driver(q) for q in _KERNELS}


def quantize_iq1(qtype: QType, x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Rows x (rows, cols) float32 as ggml blocks (rows, row_bytes): the bytes of ggml_quantize_chunk(qtype, x,
    imatrix). imatrix: one importance per input column, required (ImatrixRequiredError without)."""
    qtype = QType(qtype)
    if qtype not in IQ1_DRIVERS:
        raise ValueError(f"quantize_iq1 makes {', '.join(q.name for q in IQ1_DRIVERS)}, not {qtype.name}")
    if imatrix is None:
        raise ImatrixRequiredError(f"{qtype.name} needs an importance matrix (llama.cpp makes it only with one)")
    return run_driver(IQ1_DRIVERS[qtype], qtype, x, imatrix)

"""IQ3_XXS and IQ3_S quantizers, with or without an importance matrix, byte-identical to ggml's ggml_quantize_chunk.

Both formats code 4 weights at a time as one point of a fixed lattice (256 points for IQ3_XXS, 512 for IQ3_S) whose
coordinates are 1, 3, ..., 15 times a scale, with a sign per weight and a 4-bit scale per 32 weights. The search is
ggml's (ggml-quants.c: quantize_row_iq3_xxs_impl, quantize_row_iq3_s_impl): for each of a few trial scales round
every weight to the nearest level, and when 4 levels are not a lattice point take the best of the lattice points
nearest to them (the neighbour lists iq3xs_init_impl builds); keep the trial with the best weighted fit, then re-pick
the off-lattice groups against that scale. The weight of x is imatrix * sqrt(sigma2 + x**2) with an importance
matrix, x**2 without. Float32 rules as in `quant.quantize` (every int that meets a float goes through `_f32()`, no
fastmath), so each operation rounds as ggml's C does.
"""
from __future__ import annotations

import functools

import numpy as np
from numba import njit, prange

from .formats import QK_K
from .iq_grids import IQ3S_GRID, IQ3XXS_GRID
from .quantize_common import _f32, _put_f16, check_driver_args, run_driver
from .tensor import QType

__all__ = ["IQ3_DRIVERS", "IQ3_TYPES", "quantize_iq3"]

IQ3_TYPES: tuple[QType, ...] = (QType.IQ3_XXS, QType.IQ3_S)

_KMAP_SIZE = 4096  # every 4-digit base-8 index
_FLT_MAX = 3.4028234663852886e38
_XXS_BYTES = 98   # d, 64 grid indices, 8 u32 of 4x7 sign bits + 4-bit scale
_S_BYTES = 110    # d, qs[64], qh[8], signs[32], scales[4]


# ----------------------------------------------------------------------------------------------------------------------
# Lattice tables: ggml's iq3xs_init_impl, built once per format with numpy
# ----------------------------------------------------------------------------------------------------------------------

@functools.cache
def _tables(qtype: QType) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(grid, kmap, neighbours) as ggml's iq3_data[] holds them.

    grid (points, 4) float32: each coordinate 2*l+1 for its level l in 0..7 (float: it only meets floats). kmap (4096,) int32: for a base-8 index of
    4 levels, its grid point, or -(offset+1) into neighbours when it is not a grid point. neighbours (int32): at
    offset a count n, then the n grid points nearest to that index (every point at the nwant smallest squared
    distances: 2 for the 256-point grid, 3 for the 512-point one), by distance and then index as ggml's qsort with
    iq3_compare_func leaves them; the order decides ties in the weighted search."""
    if qtype == QType.IQ3_XXS:
        # gguf-py's grid holds the dequantized magnitudes 4, 12, ..., 52, 62 of levels 0..7 (ggml's kgrid_256)
        levels = IQ3XXS_GRID.astype(np.int64) >> 3
        expect = np.where(levels == 7, 62, 8 * levels + 4)
        nwant = 2
    else:
        levels = (IQ3S_GRID.astype(np.int64) - 1) >> 1  # magnitudes 1, 3, ..., 15 are 2*l+1 already
        expect = 2 * levels + 1
        nwant = 3
    dequant = IQ3XXS_GRID if qtype == QType.IQ3_XXS else IQ3S_GRID
    if not (expect == dequant).all():
        raise AssertionError(f"{qtype.name}: unexpected lattice values")
    grid = (2 * levels + 1).astype(np.float32)
    kmap = np.full(_KMAP_SIZE, -1, np.int64)
    index = (levels << (3 * np.arange(4))).sum(axis=1)
    kmap[index] = np.arange(len(grid))
    if np.unique(index).size != len(grid):
        raise AssertionError(f"{qtype.name}: lattice points collide")
    missing = np.flatnonzero(kmap < 0)
    pos = (2 * ((missing[:, None] >> (3 * np.arange(4))) & 7) + 1).astype(np.int32)
    d2 = ((pos[:, None, :] - grid.astype(np.int32)[None, :, :]) ** 2).sum(axis=2)
    order = np.argsort(d2, axis=1, kind="stable")  # stable: equal distances stay in index order, as the qsort keys do
    sd2 = np.take_along_axis(d2, order, axis=1)
    rank = np.concatenate([np.zeros((len(pos), 1), np.int64), np.cumsum(sd2[:, 1:] > sd2[:, :-1], axis=1)], axis=1)
    keep = rank < nwant
    counts = keep.sum(axis=1)
    offsets = np.concatenate([[0], np.cumsum(counts + 1)[:-1]])
    neighbours = np.empty(int((counts + 1).sum()), np.int32)
    for off, row, k in zip(offsets, order, keep, strict=True):
        neighbours[off] = k.sum()
        neighbours[off + 1:off + 1 + neighbours[off]] = row[k]
    kmap[missing] = -(offsets + 1)
    return grid, kmap.astype(np.int32), neighbours


# ----------------------------------------------------------------------------------------------------------------------
# One group of 32 weights (both formats)
# ----------------------------------------------------------------------------------------------------------------------

@njit
def _nint(v, sf, su):
    """ggml's nearest_int exactly, also where its bit trick is no longer round-to-nearest (|v| > 2**22 - 1, inf,
    NaN): the re-pick divides by a fitted scale, which an importance resting on one tiny weight makes tiny."""
    if abs(v) <= _f32(4194303):
        return int(np.rint(v))
    sf[0] = v + _f32(12582912)
    return np.int64(su[0] & 0x7FFFFF) - 0x400000


@njit
def _best_neighbour(nb, off, grid, xval, xo, waux, scale, L):
    """ggml's iq3_find_best_neighbour: of the listed points, the one nearest to xval/scale in the waux-weighted
    distance, the first of equal distances. Writes its levels to L[xo:xo+4]."""
    best = _f32(_FLT_MAX)
    gi = -1
    for j in range(1, nb[off] + 1):
        g = nb[off + j]
        d2 = _f32(0)
        for i in range(4):
            diff = scale * grid[g, i] - xval[xo + i]
            d2 += waux[xo + i] * diff * diff
        if d2 < best:
            best = d2
            gi = g
    if gi < 0:  # every distance NaN or above FLT_MAX: ggml aborts on an assert; take the nearest unweighted point
        gi = nb[off + 1]
    for i in range(4):
        L[xo + i] = np.int64(grid[gi, i]) >> 1
    return gi


@njit
def _round4(xval, xo, id_, L, sf, su):
    """Levels 0..7 of 4 values at inverse scale id_ into L[xo:xo+4]; returns their base-8 lattice index."""
    u = 0
    for i in range(4):
        l = max(0, min(7, _nint(_f32(0.5) * (id_ * xval[xo + i] - _f32(1)), sf, su)))
        L[xo + i] = l
        u |= l << (3 * i)
    return u


@njit
def _fit(weight, xval, L):
    sumqx = _f32(0)
    sumq2 = _f32(0)
    for i in range(32):
        w = weight[i]
        q = _f32(2 * L[i] + 1)
        sumqx += w * xval[i] * q
        sumq2 += w * q * q
    return sumqx, sumq2


@njit
def _search(xval, weight, waux, mx, xxs, L, Laux, on, on_aux, grid, kmap, nb, sf, su):
    """The scale and levels L of one group of 32 magnitudes xval whose largest is mx: ggml's trial scales
    (15 + 0.2*is)/mx (is in -15..15 for IQ3_XXS, -9..9 for IQ3_S), then the re-pick of the groups of 4 that were off
    the lattice (IQ3_S re-picks every group, as its ggml loop has the skip commented out)."""
    nis = 15 if xxs else 9
    best = _f32(0)
    scale = mx / _f32(15)
    for k in range(8):
        on[k] = xxs  # ggml starts IQ3_XXS's flags true and IQ3_S's false: it matters when no trial is kept
    for is_ in range(-nis, nis + 1):
        id_ = (_f32(15) + _f32(is_) * _f32(0.2)) / mx
        this_scale = _f32(1) / id_
        for k in range(8):
            u = _round4(xval, 4 * k, id_, Laux, sf, su)
            gi = kmap[u]
            on_aux[k] = gi >= 0
            if gi < 0:
                _best_neighbour(nb, -gi - 1, grid, xval, 4 * k, waux, this_scale, Laux)
        sumqx, sumq2 = _fit(weight, xval, Laux)
        if sumq2 > 0 and sumqx * sumqx > best * sumq2:
            scale = sumqx / sumq2
            best = scale * sumqx
            for i in range(32):
                L[i] = Laux[i]
            for k in range(8):
                on[k] = on_aux[k]
    n_off = 0
    for k in range(8):
        if not on[k]:
            n_off += 1
    if n_off > 0 and scale > 0:
        id_ = _f32(1) / scale
        for k in range(8):
            if xxs and on[k]:
                continue
            u = _round4(xval, 4 * k, id_, L, sf, su)  # overwritten below either way, as in ggml
            gi = kmap[u]
            if gi < 0:
                gi = _best_neighbour(nb, -gi - 1, grid, xval, 4 * k, waux, scale, L)
            for i in range(4):
                L[4 * k + i] = np.int64(grid[gi, i]) >> 1
        sumqx, sumq2 = _fit(weight, xval, L)
        if sumq2 > 0:
            scale = sumqx / sumq2
    return scale


@njit
def _weights(x, bo, qw, has_w, sigma2, weight, waux):
    for i in range(32):
        v = x[bo + i]
        weight[i] = qw[bo + i] * np.sqrt(sigma2 + v * v) if has_w else v * v
        waux[i] = np.sqrt(weight[i])


@njit
def _sigma2(x, xo):
    sumx2 = _f32(0)
    for i in range(QK_K):
        sumx2 += x[xo + i] * x[xo + i]
    return _f32(2) * sumx2 / _f32(QK_K)


@njit
def _max(xval):
    m = xval[0]
    for i in range(1, 32):
        m = m if m > xval[i] else xval[i]  # noqa: FURB136 (ggml's MAX macro: on a tie the second wins)
    return m


@njit
def _index(L, xo):
    u = 0
    for i in range(4):
        u |= L[xo + i] << (3 * i)
    return u


# ----------------------------------------------------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------------------------------------------------

@njit
def _row_iq3_xxs(x, qw, has_w, out, grid, kmap, nb):
    sf = np.empty(1, np.float32)
    su = sf.view(np.uint32)
    scales = np.empty(8, np.float32)
    weight = np.empty(32, np.float32)
    waux = np.empty(32, np.float32)
    xval = np.empty(32, np.float32)
    L = np.empty(32, np.int64)
    Laux = np.empty(32, np.int64)
    on = np.empty(8, np.bool_)
    on_aux = np.empty(8, np.bool_)
    signs = np.empty(4, np.int64)
    sas = np.empty(8, np.uint32)  # ggml's scales_and_signs
    for ibl in range(x.size // QK_K):
        o = ibl * _XXS_BYTES
        xo = ibl * QK_K
        out[o:o + _XXS_BYTES] = 0
        sas[:] = 0
        max_scale = _f32(0)
        sigma2 = _sigma2(x, xo)
        for ib in range(8):
            bo = xo + 32 * ib
            _weights(x, bo, qw, has_w, sigma2, weight, waux)
            # 7 sign bits per 8 are stored, the 8th is their parity: with an odd count of negatives the one whose
            # weight * x**2 is smallest (the first such) is coded with the wrong sign instead
            for k in range(4):
                nflip = 0
                s = 0
                for i in range(8):
                    v = x[bo + 8 * k + i]
                    if v >= 0:
                        xval[8 * k + i] = v
                    else:
                        xval[8 * k + i] = -v
                        nflip += 1
                        s |= 1 << i
                if nflip % 2 == 1:
                    imin = 0
                    v = x[bo + 8 * k]
                    mn = weight[8 * k] * v * v
                    for i in range(1, 8):
                        v = x[bo + 8 * k + i]
                        ax = weight[8 * k + i] * v * v
                        if ax < mn:
                            mn = ax
                            imin = i
                    xval[8 * k + imin] = -xval[8 * k + imin]
                    s ^= 1 << imin
                signs[k] = s & 127
            mx = _max(xval)
            L[:] = 0
            if mx < _f32(1e-8):  # ggml's GROUP_MAX_EPS_IQ3_XXS: grid indices 0, signs 0, scale 0
                scales[ib] = _f32(0)
                continue
            scale = _search(xval, weight, waux, mx, True, L, Laux, on, on_aux, grid, kmap, nb, sf, su)
            if scale < 0:  # ggml: "should never happen"; a flipped magnitude can drive the fit negative
                scale = -scale
                for k in range(4):
                    signs[k] = ~signs[k] & 127
            for k in range(8):
                out[o + 2 + 8 * ib + k] = kmap[_index(L, 4 * k)]
            sas[ib] = np.uint32(signs[0] | (signs[1] << 7) | (signs[2] << 14) | (signs[3] << 21))
            scales[ib] = scale
            max_scale = max(max_scale, scale)
        if max_scale == 0:
            out[o:o + _XXS_BYTES] = 0
            continue
        d = max_scale / _f32(31)
        _put_f16(out, o, d * _f32(1.0125), sf, su)  # ggml's fudge factor; the levels below use the unscaled d
        id_ = _f32(1) / d
        for ib in range(8):
            l = max(0, min(15, _nint(_f32(0.5) * (id_ * scales[ib] - _f32(1)), sf, su)))
            v = sas[ib] | np.uint32(l << 28)
            so = o + 2 + 64 + 4 * ib
            for j in range(4):
                out[so + j] = (v >> np.uint32(8 * j)) & np.uint32(0xFF)


@njit
def _row_iq3_s(x, qw, has_w, out, grid, kmap, nb):
    sf = np.empty(1, np.float32)
    su = sf.view(np.uint32)
    scales = np.empty(8, np.float32)
    weight = np.empty(32, np.float32)
    waux = np.empty(32, np.float32)
    xval = np.empty(32, np.float32)
    L = np.empty(32, np.int64)
    Laux = np.empty(32, np.int64)
    on = np.empty(8, np.bool_)
    on_aux = np.empty(8, np.bool_)
    signs = np.empty(4, np.int64)
    for ibl in range(x.size // QK_K):
        o = ibl * _S_BYTES
        xo = ibl * QK_K
        out[o:o + _S_BYTES] = 0
        # ggml advances its qs and signs pointers only past groups it codes: after an all-zero group the next
        # group's indices and signs land in the skipped one's slots (qh and scales are indexed by group)
        oq = o + 2
        osg = o + 2 + 64 + 8
        max_scale = _f32(0)
        sigma2 = _sigma2(x, xo)
        for ib in range(8):
            bo = xo + 32 * ib
            _weights(x, bo, qw, has_w, sigma2, weight, waux)
            for k in range(4):
                s = 0
                for i in range(8):
                    v = x[bo + 8 * k + i]
                    if v >= 0:
                        xval[8 * k + i] = v
                    else:
                        xval[8 * k + i] = -v
                        s |= 1 << i
                signs[k] = s
            mx = _max(xval)
            L[:] = 0
            if mx == 0:
                scales[ib] = _f32(0)
                continue
            scale = _search(xval, weight, waux, mx, False, L, Laux, on, on_aux, grid, kmap, nb, sf, su)
            if scale < 0:
                scale = -scale
                for k in range(4):
                    signs[k] = ~signs[k] & 0xFF
            for k in range(8):
                gi = kmap[_index(L, 4 * k)]
                out[oq + k] = gi & 255
                out[o + 66 + ib] |= (gi >> 8) << k
            oq += 8
            for k in range(4):
                out[osg + k] = signs[k]
            osg += 4
            scales[ib] = scale
            max_scale = max(max_scale, scale)
        if max_scale == 0:  # unlike IQ3_XXS, ggml keeps the indices and signs it wrote, with d = 0
            continue
        d = max_scale / _f32(31)
        _put_f16(out, o, d * _f32(1.033), sf, su)
        id_ = _f32(1) / d
        for ib in range(0, 8, 2):
            l1 = max(0, min(15, _nint(_f32(0.5) * (id_ * scales[ib] - _f32(1)), sf, su)))
            l2 = max(0, min(15, _nint(_f32(0.5) * (id_ * scales[ib + 1] - _f32(1)), sf, su)))
            out[o + 106 + ib // 2] = l1 | (l2 << 4)


@njit(cache=True, parallel=True)
def _rows_iq3_xxs(x, qw, has_w, out, grid, kmap, nb):
    for r in prange(x.shape[0]):
        _row_iq3_xxs(x[r], qw, has_w, out[r], grid, kmap, nb)


@njit(cache=True, parallel=True)
def _rows_iq3_s(x, qw, has_w, out, grid, kmap, nb):
    for r in prange(x.shape[0]):
        _row_iq3_s(x[r], qw, has_w, out[r], grid, kmap, nb)


# ----------------------------------------------------------------------------------------------------------------------
# Drivers
# ----------------------------------------------------------------------------------------------------------------------

_KERNELS = {QType.IQ3_XXS: _rows_iq3_xxs, QType.IQ3_S: _rows_iq3_s}


def _driver(qtype: QType):
    def run(x, qw, has_w, out):
        """IQ4_DRIVERS' convention: rows x (rows, cols) float32, importance qw (cols,) (ignored unless has_w),
        out (rows, row_bytes) uint8 written in place."""
        check_driver_args(qtype, x, qw, bool(has_w), out)
        grid, kmap, nb = _tables(qtype)
        _KERNELS[qtype](x, qw, bool(has_w), out, grid, kmap, nb)
    run.__name__ = f"quantize_{qtype.name.lower()}"
    return run


IQ3_DRIVERS = {q: _driver(q) for q in IQ3_TYPES}


def quantize_iq3(qtype: QType, x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Rows x (rows, cols) float32 as ggml blocks (rows, row_bytes): the bytes of ggml_quantize_chunk(qtype, x,
    imatrix). imatrix: one importance per input column, or None (ggml takes both formats without one)."""
    qtype = QType(qtype)
    if qtype not in IQ3_DRIVERS:
        raise ValueError(f"quantize_iq3 makes {', '.join(q.name for q in IQ3_DRIVERS)}, not {qtype.name}")
    return run_driver(IQ3_DRIVERS[qtype], qtype, x, imatrix)

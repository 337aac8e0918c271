"""IQ2_XXS, IQ2_XS and IQ2_S quantizers with an importance matrix, byte-identical to ggml's ggml_quantize_chunk.

The three formats code 8 weights at a time as one point of a fixed lattice (256, 512 or 1024 points; the search
models each coordinate as level 1, 3 or 5 times a scale, the decoder reads 8, 25, 43 eighths), with a sign per weight and a 4-bit scale per 16 or 32 weights. The
search is ggml's (ggml-quants.c: quantize_row_iq2_xxs_impl, quantize_row_iq2_xs_impl, quantize_row_iq2_s_impl):
for each of a few trial scales round every weight to the nearest level, and when the 8 levels are not a lattice
point take the best of the lattice points nearest to them (the neighbour lists iq2xs_init_impl builds); keep the
trial with the best weighted fit. Float32 rules as in `quant.quantize` (every int that meets a float goes through
`_f32()`, no fastmath), so each operation rounds as ggml's C does. The drivers are cached against this file only:
a change to the helpers taken from quantize_common.py or quantize_imatrix.py needs a touch here too.

ggml refuses IQ2_XXS and IQ2_XS without an importance matrix (ggml_quantize_requires_imatrix; the process aborts
on a GGML_ASSERT). We refuse them with `ImatrixRequiredError` instead. IQ2_S takes either.
"""
from __future__ import annotations

import functools

import numpy as np
from numba import njit, prange

from .formats import QK_K
from .iq_grids import IQ2S_GRID, IQ2XS_GRID, IQ2XXS_GRID
from .quantize_common import _f32, _put_f16, check_driver_args, run_driver
from .quantize_imatrix import _make_qp_quants
from .tensor import QType

__all__ = ["IMATRIX_REQUIRED", "IQ2_DRIVERS", "IQ2_TYPES", "ImatrixRequiredError", "quantize_iq2"]

IQ2_TYPES: tuple[QType, ...] = (QType.IQ2_XXS, QType.IQ2_XS, QType.IQ2_S)
IMATRIX_REQUIRED: tuple[QType, ...] = (QType.IQ2_XXS, QType.IQ2_XS)

_KMAP_SIZE = 43692  # ggml's kmap_size: every 8-digit base-4 index up to 0xAAAA (all digits 2) fits
_FLT_MAX = 3.4028234663852886e38


class ImatrixRequiredError(ValueError):
    """The format is only made with an importance matrix (llama.cpp refuses it without one)."""


# ----------------------------------------------------------------------------------------------------------------------
# Lattice tables: ggml's iq2xs_init_impl, built once per format with numpy
# ----------------------------------------------------------------------------------------------------------------------

@functools.cache
def _tables(qtype: QType) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(grid, kmap, neighbours) as ggml's iq2_data[] holds them.

    grid (points, 8) float32 (the search's operand, exact): each coordinate 2*l+1 for its level l in 0..2. kmap (43692,) int32: for a base-4 index of
    8 levels, its grid point, or -(offset+1) into neighbours when it is not a grid point. neighbours: at offset, a
    count n, then the n grid points nearest to that index (every point at the nwant smallest squared distances, 2
    for IQ2_XXS/IQ2_XS and 1 for IQ2_S), ordered by distance and then index as ggml's qsort leaves them; the order
    decides ties in the weighted search."""
    dequant_grid, nwant = {QType.IQ2_XXS: (IQ2XXS_GRID, 2), QType.IQ2_XS: (IQ2XS_GRID, 2),
                           QType.IQ2_S: (IQ2S_GRID, 1)}[qtype]
    # gguf-py's grids hold the dequantized magnitudes 8, 25, 43 of levels 0, 1, 2 (ggml's kgrid_2bit_* encodings)
    levels = np.searchsorted(np.array([8, 25, 43]), dequant_grid).astype(np.int64)
    if not (np.array([8, 25, 43])[levels] == dequant_grid).all():
        raise RuntimeError(f"{qtype.name}: the lattice holds values other than 8, 25, 43")
    grid = (2 * levels + 1).astype(np.float32)
    kmap = np.full(_KMAP_SIZE, -1, np.int64)
    kmap[(levels << (2 * np.arange(8))).sum(axis=1)] = np.arange(len(grid))
    missing = np.flatnonzero(kmap < 0)
    gpos = (2 * levels + 1).astype(np.int16)
    found_rows, found_cols = [], []
    for start in range(0, missing.size, 4096):  # chunks keep the (indices, points) distance table in cache
        pos = (2 * ((missing[start:start + 4096, None] >> (2 * np.arange(8))) & 3) + 1).astype(np.int16)
        d2 = np.zeros((len(pos), len(grid)), np.int16)
        for k in range(8):
            diff = pos[:, k, None] - gpos[None, :, k]
            d2 += diff * diff
        cut = d2.min(axis=1)[:, None]
        for level in range(nwant):
            if level:
                cut = np.where(d2 > cut, d2, np.iinfo(np.int16).max).min(axis=1)[:, None]
            r, c = np.nonzero(d2 == cut)  # one distance at a time, nearest first, each in index order
            found_rows.append(r + start)
            found_cols.append(c)
    rows = np.concatenate(found_rows)
    order = np.argsort(rows, kind="stable")  # stable: per index, ggml's qsort order on (distance, point)
    rows, cols = rows[order], np.concatenate(found_cols)[order]
    counts = np.bincount(rows, minlength=missing.size)
    offsets = np.concatenate([[0], np.cumsum(counts + 1)[:-1]])
    neighbours = np.empty(int((counts + 1).sum()), np.uint16)
    neighbours[offsets] = counts
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])  # each row's first entry in rows/cols
    neighbours[offsets[rows] + 1 + np.arange(rows.size) - first[rows]] = cols
    kmap[missing] = -(offsets + 1)
    return grid, kmap.astype(np.int32), neighbours


# ----------------------------------------------------------------------------------------------------------------------
# Pieces shared by the three formats
# ----------------------------------------------------------------------------------------------------------------------

@njit
def _nint(v, sf, su):
    """ggml's nearest_int exactly, also where its bit trick leaves round-to-nearest (|v| >= 2**22, inf, NaN):
    a trial scale can make id * x that large when the importance sits on a tiny weight."""
    if abs(v) <= _f32(4194303):
        return int(np.rint(v))
    sf[0] = v + _f32(12582912)
    return np.int64(su[0] & 0x7FFFFF) - 0x400000


@njit
def _weights(x, bo, n, qw, has_w, sigma2, weight, waux):
    for i in range(n):
        v = x[bo + i]
        if has_w:
            weight[i] = qw[bo + i] * np.sqrt(sigma2 + v * v)
        else:  # IQ2_S only
            weight[i] = _f32(0.25) * sigma2 + v * v
        waux[i] = np.sqrt(weight[i])


@njit
def _fold_signs(x, bo, ngroups, weight, xval, signs, even):
    """|x| per 8 and its sign bits. With `even` (IQ2_XXS/IQ2_XS store 7 sign bits, the 8th is the parity), an odd
    count of negatives flips back the one whose weight * x**2 is smallest (the first such)."""
    for k in range(ngroups):
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
        if even and nflip % 2 == 1:
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
        signs[k] = s & 127 if even else s


@njit
def _max(xval, n):
    m = xval[0]
    for i in range(1, n):
        m = m if m > xval[i] else xval[i]  # noqa: FURB136 (ggml's MAX macro: on a tie the second wins)
    return m


@njit
def _best_neighbour(nb, off, grid, xval, xo, waux, scale, L):
    """ggml's iq2_find_best_neighbour: the listed grid point nearest to xval/scale in the waux-weighted distance;
    the first of equal distances wins. Writes its levels to L[xo:xo+8]."""
    best = _f32(_FLT_MAX)
    gi = -1
    for j in range(1, np.int64(nb[off]) + 1):
        g = np.int64(nb[off + j])
        d2 = _f32(0)
        for i in range(8):
            diff = scale * grid[g, i] - xval[xo + i]
            d2 += waux[xo + i] * diff * diff
        if d2 < best:
            best = d2
            gi = g
    if gi < 0:  # every distance NaN or above FLT_MAX: ggml aborts here; take the nearest unweighted point
        gi = np.int64(nb[off + 1])
    for i in range(8):
        L[xo + i] = (np.int64(grid[gi, i]) - 1) // 2
    return gi


@njit
def _round_group(xval, xo, id_, L, sf, su):
    """Levels 0..2 of 8 values at inverse scale id_ into L[xo:xo+8]; returns their base-4 lattice index."""
    u = 0
    for i in range(8):
        l = max(0, min(2, _nint(_f32(0.5) * (id_ * xval[xo + i] - _f32(1)), sf, su)))
        L[xo + i] = l
        u |= l << (2 * i)
    return u


@njit
def _fit(weight, xval, L, n):
    sumqx = _f32(0)
    sumq2 = _f32(0)
    for i in range(n):
        w = weight[i]
        q = _f32(2 * L[i] + 1)
        sumqx += w * xval[i] * q
        sumq2 += w * q * q
    return sumqx, sumq2


@njit
def _index(L, xo):
    u = 0
    for i in range(8):
        u |= L[xo + i] << (2 * i)
    return u


@njit
def _search16(xval, weight, waux, mx, L, Laux, on, on_aux, grid, kmap, nb, sf, su):
    """The scale and lattice points of 16 values (two groups of 8): IQ2_XS's and IQ2_S's search, which are the same
    code in ggml. Returns the scale (may be negative: the caller flips the signs); L holds on-grid levels."""
    best = _f32(0)
    scale = mx / _f32(5)
    for i in range(16):
        L[i] = 0  # kept when no trial fits (all weights zero): every group at the all-ones point
    on[0] = True
    on[1] = True
    for trial in range(-9, 10):
        id_ = (_f32(5) + _f32(trial) * _f32(0.1)) / mx
        this_scale = _f32(1) / id_
        for k in range(2):
            u = _round_group(xval, 8 * k, id_, Laux, sf, su)
            on_aux[k] = kmap[u] >= 0
            if not on_aux[k]:
                _best_neighbour(nb, -np.int64(kmap[u]) - 1, grid, xval, 8 * k, waux, this_scale, Laux)
        sumqx, sumq2 = _fit(weight, xval, Laux, 16)
        if sumq2 > 0 and sumqx * sumqx > best * sumq2:
            scale = sumqx / sumq2
            best = scale * sumqx
            for i in range(16):
                L[i] = Laux[i]
            on[0] = on_aux[0]
            on[1] = on_aux[1]
    if (not on[0] or not on[1]) and scale > 0:
        # the winning trial moved a group onto a neighbour at its own scale: re-pick it at the fitted one
        id_ = _f32(1) / scale
        for k in range(2):
            if on[k]:
                continue
            u = _round_group(xval, 8 * k, id_, L, sf, su)
            if kmap[u] < 0:
                _best_neighbour(nb, -np.int64(kmap[u]) - 1, grid, xval, 8 * k, waux, scale, L)
        sumqx, sumq2 = _fit(weight, xval, L, 16)
        if sumq2 > 0:
            scale = sumqx / sumq2
    return scale


@njit
def _put_scales(out, od, osc, scales, max_scale, dmul, sf, su):
    """d = max/31 as f16 at od (IQ2_S stores d * 0.9875; times 1 is exact for IQ2_XS), then a 4-bit multiple per
    16 values at osc, low nibble first. The codes use the unrounded d, as ggml does."""
    d = max_scale / _f32(31)
    _put_f16(out, od, d * dmul, sf, su)
    id_ = _f32(1) / d
    for ib in range(16):
        l = max(0, min(15, _nint(_f32(0.5) * (id_ * scales[ib] - _f32(1)), sf, su)))
        if ib % 2 == 0:
            out[osc + ib // 2] = l
        else:
            out[osc + ib // 2] |= l << 4


# ----------------------------------------------------------------------------------------------------------------------
# Row kernels
# ----------------------------------------------------------------------------------------------------------------------

@njit
def _row_iq2_xs(x, qw, has_w, out, grid, kmap, nb):
    """quantize_row_iq2_xs_impl on one row. Block: d, qs[32] (u16: grid index | 7 sign bits << 9), scales[8]."""
    sf = np.empty(1, np.float32)
    su = sf.view(np.uint32)
    weight = np.empty(16, np.float32)
    waux = np.empty(16, np.float32)
    xval = np.empty(16, np.float32)
    L = np.zeros(16, np.int64)
    Laux = np.zeros(16, np.int64)
    on = np.ones(2, np.bool_)
    on_aux = np.ones(2, np.bool_)
    signs = np.zeros(2, np.int64)
    scales = np.zeros(16, np.float32)
    q2 = np.zeros(32, np.int64)
    for ibl in range(x.size // QK_K):
        xo, o = ibl * QK_K, ibl * 74
        for j in range(74):
            out[o + j] = 0
        for j in range(32):
            q2[j] = 0
        sumx2 = _f32(0)
        for i in range(QK_K):
            sumx2 += x[xo + i] * x[xo + i]
        sigma2 = sumx2 / _f32(QK_K)
        max_scale = _f32(0)
        for ib in range(16):
            bo = xo + 16 * ib
            _weights(x, bo, 16, qw, has_w, sigma2, weight, waux)
            _fold_signs(x, bo, 2, weight, xval, signs, True)
            mx = _max(xval, 16)
            if mx < _f32(1e-15):
                scales[ib] = _f32(0)
                continue
            scale = _search16(xval, weight, waux, mx, L, Laux, on, on_aux, grid, kmap, nb, sf, su)
            if scale < 0:
                scale = -scale
                signs[0] = ~signs[0] & 127
                signs[1] = ~signs[1] & 127
            for k in range(2):
                q2[2 * ib + k] = np.int64(kmap[_index(L, 8 * k)]) | (signs[k] << 9)
            scales[ib] = scale
            max_scale = max_scale if max_scale > scale else scale  # noqa: FURB136 (ggml's MAX)
        if max_scale == 0:
            continue
        _put_scales(out, o, o + 66, scales, max_scale, _f32(1), sf, su)
        for j in range(32):
            out[o + 2 + 2 * j] = q2[j] & 0xFF
            out[o + 3 + 2 * j] = (q2[j] >> 8) & 0xFF


@njit
def _row_iq2_xxs(x, qw, has_w, out, grid, kmap, nb):
    """quantize_row_iq2_xxs_impl on one row. Block: d, then per 32 values two u32: four grid indices (a byte each),
    and four 7-bit sign groups with the 4-bit scale in the top nibble."""
    sf = np.empty(1, np.float32)
    su = sf.view(np.uint32)
    weight = np.empty(32, np.float32)
    waux = np.empty(32, np.float32)
    xval = np.empty(32, np.float32)
    L = np.zeros(32, np.int64)
    Laux = np.zeros(32, np.int64)
    Lqp = np.zeros(32, np.int32)
    signs = np.zeros(4, np.int64)
    scales = np.zeros(8, np.float32)
    q2 = np.zeros(16, np.int64)
    for ibl in range(x.size // QK_K):
        xo, o = ibl * QK_K, ibl * 66
        for j in range(66):
            out[o + j] = 0
        for j in range(16):
            q2[j] = 0
        sumx2 = _f32(0)
        for i in range(QK_K):
            sumx2 += x[xo + i] * x[xo + i]
        sigma2 = sumx2 / _f32(QK_K)
        max_scale = _f32(0)
        for ib in range(8):
            bo = xo + 32 * ib
            _weights(x, bo, 32, qw, has_w, sigma2, weight, waux)
            _fold_signs(x, bo, 4, weight, xval, signs, True)
            if _max(xval, 32) < _f32(1e-15):
                scales[ib] = _f32(0)
                continue
            # unlike IQ2_XS the trial scales are centred on make_qp_quants' weighted fit to levels 0..4
            scale = _make_qp_quants(32, 4, xval, Lqp, weight)
            eff_max = scale * _f32(3)
            if eff_max <= 0:
                scales[ib] = _f32(0)
                continue
            best = _f32(0)
            for trial in range(-6, 7):
                id_ = (_f32(5) + _f32(trial) * _f32(0.1)) / eff_max
                this_scale = _f32(1) / id_
                for k in range(4):
                    u = _round_group(xval, 8 * k, id_, Laux, sf, su)
                    if kmap[u] < 0:
                        _best_neighbour(nb, -np.int64(kmap[u]) - 1, grid, xval, 8 * k, waux, this_scale, Laux)
                sumqx, sumq2 = _fit(weight, xval, Laux, 32)
                if sumq2 > 0 and sumqx * sumqx > best * sumq2:
                    scale = sumqx / sumq2
                    best = scale * sumqx
                    for i in range(32):
                        L[i] = Laux[i]
            if scale > 0:
                # every group is re-picked at the fitted scale (IQ2_XS re-picks only groups that left the grid)
                id_ = _f32(1) / scale
                for k in range(4):
                    u = _round_group(xval, 8 * k, id_, Laux, sf, su)
                    gi = np.int64(kmap[u])
                    if gi < 0:
                        gi = _best_neighbour(nb, -gi - 1, grid, xval, 8 * k, waux, scale, Laux)
                    for i in range(8):
                        L[8 * k + i] = (np.int64(grid[gi, i]) - 1) // 2
                sumqx, sumq2 = _fit(weight, xval, L, 32)
                if sumq2 > 0:
                    scale = sumqx / sumq2
            if scale < 0:
                scale = -scale
                for k in range(4):
                    signs[k] = ~signs[k] & 127
            for k in range(4):
                q2[2 * ib] |= np.int64(kmap[_index(L, 8 * k)]) << (8 * k)
                q2[2 * ib + 1] |= signs[k] << (7 * k)
            scales[ib] = scale
            max_scale = max_scale if max_scale > scale else scale  # noqa: FURB136 (ggml's MAX)
        if max_scale == 0:
            continue
        d = max_scale / _f32(31)
        _put_f16(out, o, d, sf, su)
        id_ = _f32(1) / d
        for ib in range(8):
            l = max(0, min(15, _nint(_f32(0.5) * (id_ * scales[ib] - _f32(1)), sf, su)))
            q2[2 * ib + 1] |= l << 28
        for j in range(16):
            for b in range(4):
                out[o + 2 + 4 * j + b] = (q2[j] >> (8 * b)) & 0xFF


@njit(cache=True, parallel=True)
def _rows_iq2_xs(x, qw, has_w, out, grid, kmap, nb):
    for r in prange(x.shape[0]):
        _row_iq2_xs(x[r], qw, has_w, out[r], grid, kmap, nb)


# ----------------------------------------------------------------------------------------------------------------------
# Drivers: checked in Python, then the compiled rows
# ----------------------------------------------------------------------------------------------------------------------

@njit
def _row_iq2_s(x, qw, has_w, out, grid, kmap, nb):
    """quantize_row_iq2_s_impl on one row. Block: d, qs[32] (low 8 bits of each group's grid index), signs[32] (all
    8 bits: no parity trick), qh[8] (2 high index bits per group), scales[8]."""
    sf = np.empty(1, np.float32)
    su = sf.view(np.uint32)
    weight = np.empty(16, np.float32)
    waux = np.empty(16, np.float32)
    xval = np.empty(16, np.float32)
    L = np.zeros(16, np.int64)
    Laux = np.zeros(16, np.int64)
    on = np.ones(2, np.bool_)
    on_aux = np.ones(2, np.bool_)
    signs = np.zeros(2, np.int64)
    scales = np.zeros(16, np.float32)
    for ibl in range(x.size // QK_K):
        xo, o = ibl * QK_K, ibl * 82
        for j in range(82):
            out[o + j] = 0
        sumx2 = _f32(0)
        for i in range(QK_K):
            sumx2 += x[xo + i] * x[xo + i]
        sigma2 = _f32(2) * sumx2 / _f32(QK_K)
        max_scale = _f32(0)
        for ib in range(16):
            bo = xo + 16 * ib
            _weights(x, bo, 16, qw, has_w, sigma2, weight, waux)
            _fold_signs(x, bo, 2, weight, xval, signs, False)
            mx = _max(xval, 16)
            if mx < _f32(1e-8):  # GROUP_MAX_EPS_IQ2_S
                scales[ib] = _f32(0)
                continue
            scale = _search16(xval, weight, waux, mx, L, Laux, on, on_aux, grid, kmap, nb, sf, su)
            if scale < 0:
                scale = -scale
                signs[0] = ~signs[0] & 0xFF
                signs[1] = ~signs[1] & 0xFF
            for k in range(2):
                # written straight into the block, so they stay even when every scale of the block ends up zero
                gi = np.int64(kmap[_index(L, 8 * k)])
                i8 = 2 * ib + k
                out[o + 2 + i8] = gi & 0xFF
                out[o + 66 + i8 // 4] |= (gi >> 8) << (2 * (i8 % 4))
                out[o + 34 + i8] = signs[k]
            scales[ib] = scale
            max_scale = max_scale if max_scale > scale else scale  # noqa: FURB136 (ggml's MAX)
        if max_scale == 0:
            continue
        _put_scales(out, o, o + 74, scales, max_scale, _f32(0.9875), sf, su)


@njit(cache=True, parallel=True)
def _rows_iq2_xxs(x, qw, has_w, out, grid, kmap, nb):
    for r in prange(x.shape[0]):
        _row_iq2_xxs(x[r], qw, has_w, out[r], grid, kmap, nb)


@njit(cache=True, parallel=True)
def _rows_iq2_s(x, qw, has_w, out, grid, kmap, nb):
    for r in prange(x.shape[0]):
        _row_iq2_s(x[r], qw, has_w, out[r], grid, kmap, nb)


_KERNELS = {QType.IQ2_XXS: _rows_iq2_xxs, QType.IQ2_XS: _rows_iq2_xs, QType.IQ2_S: _rows_iq2_s}


def _check(qtype: QType, x, qw, has_w: bool, out) -> None:
    if has_w is False and qtype in IMATRIX_REQUIRED:
        raise ImatrixRequiredError(f"{qtype.name} needs an importance matrix (llama.cpp makes it only with one)")
    check_driver_args(qtype, x, qw, has_w, out)


def _driver(qtype: QType):
    def run(x, qw, has_w, out):
        """IQ4_DRIVERS' convention: rows x (rows, cols) float32, importance qw (cols,) (ignored unless has_w),
        out (rows, row_bytes) uint8 written in place."""
        _check(qtype, x, qw, bool(has_w), out)
        grid, kmap, nb = _tables(qtype)
        _KERNELS[qtype](x, qw, bool(has_w), out, grid, kmap, nb)
    run.__name__ = f"quantize_{qtype.name.lower()}"
    return run


IQ2_DRIVERS = {q: _driver(q) for q in _KERNELS}


def quantize_iq2(qtype: QType, x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Rows x (rows, cols) float32 as ggml blocks (rows, row_bytes): the bytes of ggml_quantize_chunk(qtype, x,
    imatrix). imatrix: one importance per input column (required for IQ2_XXS and IQ2_XS)."""
    qtype = QType(qtype)
    if qtype not in IQ2_DRIVERS:
        raise ValueError(f"quantize_iq2 makes {', '.join(q.name for q in IQ2_DRIVERS)}, not {qtype.name}")
    if imatrix is None and qtype in IMATRIX_REQUIRED:
        raise ImatrixRequiredError(f"{qtype.name} needs an importance matrix (llama.cpp makes it only with one)")
    return run_driver(IQ2_DRIVERS[qtype], qtype, x, imatrix)

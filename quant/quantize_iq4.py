"""IQ4_NL and IQ4_XS quantizers, with or without an importance matrix, byte-identical to ggml.

Both formats code each weight as one of 16 fixed non-uniform levels (kvalues_iq4nl) times a block scale. ggml's
quantize_row_iq4_nl_impl (ggml-quants.c) picks each block of 32's scale by trying 15 scales around max/-127 and
keeping the one with the best weighted fit; the weight is imatrix * sqrt(sigma2 + x**2) with an importance matrix,
x**2 without. IQ4_NL stores that scale as an f16 per 32; IQ4_XS stores one f16 per 256 and a 6-bit multiple of it
per 32, then re-picks every code against the rounded scale. Same float32 rules as `quant.quantize`.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .formats import QK_K
from .iq_grids import KVALUES_IQ4NL
from .quantize_common import _f32, _nearest_int, _put_f16, _signed_absmax
from .tensor import QType

__all__ = ["IQ4_DRIVERS"]

_VALUES = np.array(KVALUES_IQ4NL, dtype=np.int8)
_NTRY = 7  # quantize_iq4_nl and quantize_iq4_xs both search itry in -7..7


@njit
def _best_index(v):
    """ggml's best_index_int8 over the 16 levels: bisection, ties between two levels go to the upper one."""
    if v <= _f32(_VALUES[0]):
        return 0
    if v >= _f32(_VALUES[15]):
        return 15
    ml = 0
    mu = 15
    while mu - ml > 1:
        mav = (ml + mu) // 2
        if v < _f32(_VALUES[mav]):
            mu = mav
        else:
            ml = mav
    return mu - 1 if v - _f32(_VALUES[mu - 1]) < _f32(_VALUES[mu]) - v else mu


@njit
def _superblock(x, xo, sbs, qw, has_w, out, o_d, o_sh, o_sl, o_q, scales, weight, L, sf, su):
    """One call of quantize_row_iq4_nl_impl(sbs, 32, ..., ntry=7) on x[xo:xo+sbs]."""
    sigma2 = _f32(0)
    for j in range(sbs):
        sigma2 += x[xo + j] * x[xo + j]
    sigma2 *= _f32(2) / _f32(sbs)
    v0 = _f32(_VALUES[0])
    nb = sbs // 32
    max_scale = _f32(0)
    amax_scale = _f32(0)
    for ib in range(nb):
        bo = xo + 32 * ib
        for j in range(32):
            v = x[bo + j]
            weight[j] = qw[bo + j] * np.sqrt(sigma2 + v * v) if has_w else v * v
        amax, mx = _signed_absmax(x, bo, 32)
        if amax < _f32(1e-15):
            scales[ib] = _f32(0)
            continue
        d = -mx / v0
        inv = _f32(1) / d
        sumqx = _f32(0)
        sumq2 = _f32(0)
        for j in range(32):
            l = _best_index(inv * x[bo + j])
            L[32 * ib + j] = l
            q = _f32(_VALUES[l])
            sumqx += weight[j] * q * x[bo + j]
            sumq2 += weight[j] * q * q
        d = sumqx / sumq2 if sumq2 > 0 else _f32(0)
        best = d * sumqx
        for itry in range(-_NTRY, _NTRY + 1):
            inv = _f32(itry + np.int64(_VALUES[0])) / mx
            sumqx = _f32(0)
            sumq2 = _f32(0)
            for j in range(32):
                q = _f32(_VALUES[_best_index(inv * x[bo + j])])
                sumqx += weight[j] * q * x[bo + j]
                sumq2 += weight[j] * q * q
            if sumq2 > 0 and sumqx * sumqx > best * sumq2:
                d = sumqx / sumq2
                best = d * sumqx
        scales[ib] = d
        if abs(d) > amax_scale:
            amax_scale = abs(d)
            max_scale = d
    if nb > 1:
        d = -max_scale / _f32(32)
        _put_f16(out, o_d, d, sf, su)
        inv = _f32(1) / d if d != 0 else _f32(0)  # ggml uses the unrounded d here
        sh = 0
        for ib in range(nb):
            l = max(-32, min(31, _nearest_int(inv * scales[ib])))
            dl = d * _f32(l)
            idl = _f32(1) / dl if dl != 0 else _f32(0)
            for j in range(32):
                L[32 * ib + j] = _best_index(idl * x[xo + 32 * ib + j])
            l += 32
            if ib % 2 == 0:
                out[o_sl + ib // 2] = l & 0xF
            else:
                out[o_sl + ib // 2] |= (l & 0xF) << 4
            sh |= (l >> 4) << (2 * (ib % 8))
        out[o_sh] = sh & 0xFF
        out[o_sh + 1] = (sh >> 8) & 0xFF
    else:
        _put_f16(out, o_d, scales[0], sf, su)
        inv = _f32(1) / scales[0] if scales[0] != 0 else _f32(0)
        for j in range(sbs):
            L[j] = _best_index(inv * x[xo + j])
    for i in range(sbs // 32):
        for j in range(16):
            out[o_q + 16 * i + j] = L[32 * i + j] | (L[32 * i + 16 + j] << 4)


@njit
def _row_iq4_nl(x, qw, has_w, out):
    sf = np.empty(1, np.float32)
    su = sf.view(np.uint32)
    scales = np.empty(1, np.float32)
    weight = np.empty(32, np.float32)
    L = np.empty(32, np.int32)
    for b in range(x.size // 32):
        o = b * 18  # d qs[16]
        _superblock(x, b * 32, 32, qw, has_w, out, o, -1, -1, o + 2, scales, weight, L, sf, su)


@njit
def _row_iq4_xs(x, qw, has_w, out):
    sf = np.empty(1, np.float32)
    su = sf.view(np.uint32)
    scales = np.empty(8, np.float32)
    weight = np.empty(32, np.float32)
    L = np.empty(QK_K, np.int32)
    for b in range(x.size // QK_K):
        o = b * 136  # d scales_h scales_l[4] qs[128]
        _superblock(x, b * QK_K, QK_K, qw, has_w, out, o, o + 2, o + 4, o + 8, scales, weight, L, sf, su)


@njit(cache=True, parallel=True)
def _rows_iq4_nl(x, qw, has_w, out):
    for r in prange(x.shape[0]):
        _row_iq4_nl(x[r], qw, has_w, out[r])


@njit(cache=True, parallel=True)
def _rows_iq4_xs(x, qw, has_w, out):
    for r in prange(x.shape[0]):
        _row_iq4_xs(x[r], qw, has_w, out[r])


IQ4_DRIVERS = {QType.IQ4_NL: _rows_iq4_nl, QType.IQ4_XS: _rows_iq4_xs}

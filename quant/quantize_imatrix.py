"""Quantizers weighted by an importance matrix: ggml's `quantize_row_*_impl` paths taken when `quant_weights` is set.

With an importance matrix (per input column, the mean squared activation), ggml stops minimising the plain weight
error and minimises sum_i imatrix[i] * (sigma2 + x[i]**2)**0.5 * (x[i] - q[i])**2 per block, and it picks the
super-block scales of the K formats by a weighted search too (make_qp_quants) instead of rounding the largest one.
These row kernels follow ggml-quants.c (quantize_row_{q2_K,q3_K,q4_K,q5_K,q6_K,q4_0,q4_1,q5_0,q5_1}_impl,
make_qkx3_quants, make_qp_quants, make_qx_quants) operation for operation in float32, under the same rules as
`quant.quantize` (every int meeting a float goes through `_f32`, no fastmath, no fused multiply-add), so the bytes
equal ggml's given the same weights and importance vector.

The callers are `quant.quantize.quantize_fast(..., imatrix=...)`, which validates the input first.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .formats import QK_K
from .quantize_common import _f32, _nearest_int, _put_f16
from .quantize_k import (
    _finish_q6_k_block,
    _make_qx_quants_w,
    _pack_2bit,
    _pack_q4_k_codes,
    _pack_q5_k_codes,
)
from .tensor import QType

__all__ = ["WEIGHTED_DRIVERS"]


@njit
def _make_qkx3_quants(x, xo, n, w, nmax, rmin, rdelta, nstep, L, lo, Laux):
    """ggml's make_qkx3_quants with weights and use_mad false: an asymmetric fit of x[xo:xo+n] whose trial scales
    run from (nmax + rmin) to (nmax + rmin + nstep * rdelta) over the span; returns (scale, -min)."""
    mn = x[xo]
    mx = x[xo]
    sum_w = w[0]
    sum_x = sum_w * x[xo]
    for i in range(1, n):
        v = x[xo + i]
        if v < mn:  # noqa: PLR1730
            mn = v
        if v > mx:  # noqa: PLR1730
            mx = v
        sum_w += w[i]
        sum_x += w[i] * v
    if mn > 0:
        mn = _f32(0)
    if mx <= mn:
        for i in range(n):
            L[lo + i] = 0
        return _f32(0), -mn
    iscale = _f32(nmax) / (mx - mn)
    scale = _f32(1) / iscale
    best = _f32(0)
    for i in range(n):
        l = max(0, min(nmax, _nearest_int(iscale * (x[xo + i] - mn))))
        L[lo + i] = l
        diff = scale * _f32(l) + mn - x[xo + i]
        best += w[i] * (diff * diff)
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * _f32(step) + _f32(nmax)) / (mx - mn)
        sum_l = _f32(0)
        sum_l2 = _f32(0)
        sum_xl = _f32(0)
        for i in range(n):
            l = max(0, min(nmax, _nearest_int(iscale * (x[xo + i] - mn))))
            Laux[i] = l
            lf = _f32(l)
            sum_l += w[i] * lf
            sum_l2 += w[i] * lf * lf
            sum_xl += w[i] * lf * x[xo + i]
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > 0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > 0:
                this_min = _f32(0)
                this_scale = sum_xl / sum_l2
            cur = _f32(0)
            for i in range(n):
                diff = this_scale * _f32(Laux[i]) + this_min - x[xo + i]
                cur += w[i] * (diff * diff)
            if cur < best:
                for i in range(n):
                    L[lo + i] = Laux[i]
                best = cur
                scale = this_scale
                mn = this_min
    return scale, -mn


@njit
def _make_qp_quants(n, nmax, x, L, qw):
    """ggml's make_qp_quants: non-negative codes 0..nmax for the n values x (sub-block scales or mins), weighted
    by qw; L holds uint8 values as ggml's does (a negative code wraps), and the wrapped values feed the refinement."""
    mx = _f32(0)
    for i in range(n):
        mx = mx if mx > x[i] else x[i]  # noqa: FURB136 (ggml MAX(max, x[i]): on a tie x[i] wins, e.g. -0.0)
    if mx < _f32(1e-15):
        for i in range(n):
            L[i] = 0
        return _f32(0)
    iscale = _f32(nmax) / mx
    for i in range(n):
        L[i] = _nearest_int(iscale * x[i]) & 0xFF
    scale = _f32(1) / iscale
    best_mse = _f32(0)
    for i in range(n):
        diff = x[i] - scale * _f32(L[i])
        best_mse += qw[i] * diff * diff
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_is = (_f32(0.1) * _f32(step) + _f32(nmax)) / mx
        scale_is = _f32(1) / iscale_is
        mse = _f32(0)
        for i in range(n):
            l = min(nmax, _nearest_int(iscale_is * x[i]))
            diff = x[i] - scale_is * _f32(l)
            mse += qw[i] * diff * diff
        if mse < best_mse:
            best_mse = mse
            iscale = iscale_is
    sumlx = _f32(0)
    suml2 = _f32(0)
    for i in range(n):
        l = min(nmax, _nearest_int(iscale * x[i]))
        L[i] = l & 0xFF
        sumlx += qw[i] * x[i] * _f32(l)
        suml2 += qw[i] * _f32(l) * _f32(l)
    for _ in range(5):
        n_changed = 0
        for i in range(n):
            w = qw[i]
            li = _f32(L[i])
            slx = sumlx - w * x[i] * li
            sl2 = suml2 - w * li * li
            if slx > 0 and sl2 > 0:
                new_l = min(nmax, _nearest_int(x[i] * sl2 / slx))
                if new_l != L[i]:
                    slx += w * x[i] * _f32(new_l)
                    sl2 += w * _f32(new_l) * _f32(new_l)
                    if slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_l & 0xFF
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    return sumlx / suml2 if suml2 > 0 else _f32(0)


@njit
def _sum_squares(x, xo, n):
    s = _f32(0)
    for j in range(n):
        s += x[xo + j] * x[xo + j]
    return s


@njit
def _importance(x, xo, n, qw, wo, sigma2, w):
    """w[:n] = qw * sqrt(sigma2 + x**2): the imatrix scaled by each weight's own size, as every _impl does."""
    for l in range(n):
        v = x[xo + l]
        w[l] = qw[wo + l] * np.sqrt(sigma2 + v * v)


# ----------------------------------------------------------------------------------------------------------------------
# K formats
# ----------------------------------------------------------------------------------------------------------------------

@njit
def _row_q2_k_w(x, qw, out):
    sf = np.empty(1, np.float32)
    su = sf.view(np.uint32)
    L = np.empty(QK_K, np.int32)
    Laux = np.empty(16, np.int32)
    w = np.empty(16, np.float32)
    sw = np.empty(16, np.float32)
    scales = np.empty(16, np.float32)
    mins = np.empty(16, np.float32)
    Ls = np.empty(16, np.int32)
    Lm = np.empty(16, np.int32)
    for b in range(x.size // QK_K):
        xo, o = b * QK_K, b * 84  # scales[16] qs[64] d dmin
        sigma2 = _sum_squares(x, xo, QK_K) / _f32(QK_K)
        for j in range(16):
            _importance(x, xo + 16 * j, 16, qw, xo + 16 * j, sigma2, w)
            s = _f32(0)
            for l in range(16):
                s += w[l]
            sw[j] = s
            sc, mn = _make_qkx3_quants(x, xo + 16 * j, 16, w, 3, _f32(-0.9), _f32(0.05), 36, L, 16 * j, Laux)
            scales[j] = sc
            mins[j] = mn
        dm = _make_qp_quants(16, 15, scales, Ls, sw)
        mm = _make_qp_quants(16, 15, mins, Lm, sw)
        dm = _put_f16(out, o + 80, dm, sf, su)
        mm = _put_f16(out, o + 82, mm, sf, su)
        for j in range(16):
            out[o + j] = (Ls[j] | (Lm[j] << 4)) & 0xFF
        for j in range(16):
            packed = np.int64(out[o + j])
            d = dm * _f32(packed & 0xF)
            if d == 0:
                continue
            m = mm * _f32(packed >> 4)
            for i in range(16):
                L[16 * j + i] = max(0, min(3, _nearest_int((x[xo + 16 * j + i] + m) / d)))
        _pack_2bit(L, out, o + 16)


@njit
def _row_q3_k_w(x, qw, out):
    sf = np.empty(1, np.float32)
    su = sf.view(np.uint32)
    L = np.empty(QK_K, np.int32)
    w = np.empty(16, np.float32)
    sw = np.empty(16, np.float32)
    scales = np.empty(16, np.float32)
    Ls = np.empty(16, np.int32)
    for b in range(x.size // QK_K):
        xo, o = b * QK_K, b * 110  # hmask[32] qs[64] scales[12] d
        so = o + 96
        sigma2 = _f32(2) * _sum_squares(x, xo, QK_K) / _f32(QK_K)
        for j in range(16):
            _importance(x, xo + 16 * j, 16, qw, xo + 16 * j, sigma2, w)
            s = _f32(0)
            for l in range(16):
                s += w[l]
            sw[j] = s
            scales[j] = _make_qx_quants_w(x, xo + 16 * j, 16, 4, L, 16 * j, w, 0)
        for k in range(12):
            out[so + k] = 0
        d_block = _make_qx_quants_w(scales, 0, 16, 32, Ls, 0, sw, 0)
        for j in range(16):
            l = Ls[j]
            if j < 8:
                out[so + j] = l & 0xF
            else:
                out[so + j - 8] |= (l & 0xF) << 4
            out[so + 8 + j % 4] |= ((l >> 4) << (2 * (j // 4))) & 0xFF
        d_all = _put_f16(out, o + 108, d_block, sf, su)
        for j in range(16):
            if j < 8:
                low = np.int64(out[so + j]) & 0xF
            else:
                low = np.int64(out[so + j - 8]) >> 4
            high = (np.int64(out[so + 8 + j % 4]) >> (2 * (j // 4))) & 3
            dd = d_all * _f32((low | (high << 4)) - 32)
            if dd == 0:
                continue
            for i in range(16):
                L[16 * j + i] = max(-4, min(3, _nearest_int(x[xo + 16 * j + i] / dd))) + 4
        for m in range(32):
            out[o + m] = 0
        for j in range(QK_K):
            if L[j] > 3:
                out[o + j % 32] |= 1 << (j // 32)
                L[j] -= 4
        _pack_2bit(L, out, o + 32)


@njit
def _row_k45_w(x, qw, out, nmax, block_bytes):
    """Q4_K (nmax 15) and Q5_K (nmax 31): d, dmin and the 12 scale bytes; returns the codes for the caller to pack."""
    sf = np.empty(1, np.float32)
    su = sf.view(np.uint32)
    L = np.empty((x.size // QK_K, QK_K), np.int32)
    Laux = np.empty(32, np.int32)
    w = np.empty(32, np.float32)
    sw = np.empty(8, np.float32)
    scales = np.empty(8, np.float32)
    mins = np.empty(8, np.float32)
    Ls = np.empty(8, np.int32)
    Lm = np.empty(8, np.int32)
    for b in range(x.size // QK_K):
        xo, o = b * QK_K, b * block_bytes
        so = o + 4
        Lb = L[b]
        sigma2 = _f32(2) * _sum_squares(x, xo, QK_K) / _f32(QK_K)
        for j in range(8):
            _importance(x, xo + 32 * j, 32, qw, xo + 32 * j, sigma2, w)
            s = _f32(0)
            for l in range(32):
                s += w[l]
            sw[j] = s
            sc, mn = _make_qkx3_quants(x, xo + 32 * j, 32, w, nmax, _f32(-0.9), _f32(0.05), 36, Lb, 32 * j, Laux)
            scales[j] = sc
            mins[j] = mn
        d_block = _make_qp_quants(8, 63, scales, Ls, sw)
        m_block = _make_qp_quants(8, 63, mins, Lm, sw)
        for j in range(8):
            ls = Ls[j]
            lm = Lm[j]
            if nmax == 31:  # only Q5_K clamps; Q4_K keeps a wrapped code as ggml does
                ls = min(63, ls)
                lm = min(63, lm)
            if j < 4:
                out[so + j] = ls
                out[so + j + 4] = lm
            else:
                out[so + j + 4] = (ls & 0xF) | ((lm & 0xF) << 4)
                out[so + j - 4] |= ((ls >> 4) << 6) & 0xFF
                out[so + j] |= ((lm >> 4) << 6) & 0xFF
        d = _put_f16(out, o, d_block, sf, su)
        dmin = _put_f16(out, o + 2, m_block, sf, su)
        for j in range(8):
            if j < 4:
                sc = np.int64(out[so + j]) & 63
                m = np.int64(out[so + j + 4]) & 63
            else:
                sc = (np.int64(out[so + j + 4]) & 0xF) | ((np.int64(out[so + j - 4]) >> 6) << 4)
                m = (np.int64(out[so + j + 4]) >> 4) | ((np.int64(out[so + j]) >> 6) << 4)
            dd = d * _f32(sc)
            if dd == 0:
                continue
            dm = dmin * _f32(m)
            for i in range(32):
                Lb[32 * j + i] = max(0, min(nmax, _nearest_int((x[xo + 32 * j + i] + dm) / dd)))
    return L


@njit
def _row_q4_k_w(x, qw, out):
    _pack_q4_k_codes(_row_k45_w(x, qw, out, 15, 144), out)


@njit
def _row_q5_k_w(x, qw, out):
    _pack_q5_k_codes(_row_k45_w(x, qw, out, 31, 176), out)


@njit
def _row_q6_k_w(x, qw, out):
    sf = np.empty(1, np.float32)
    su = sf.view(np.uint32)
    L = np.empty(QK_K, np.int32)
    scales = np.empty(16, np.float32)
    for b in range(x.size // QK_K):
        xo, o = b * QK_K, b * 210  # ql[128] qh[64] scales[16] d
        max_abs = _f32(0)
        max_scale = _f32(0)
        for j in range(16):
            # ggml weights Q6_K by the bare imatrix (its sigma2 weighting is commented out there)
            scales[j] = _make_qx_quants_w(x, xo + 16 * j, 16, 32, L, 16 * j, qw, xo + 16 * j)
            if abs(scales[j]) > max_abs:
                max_abs = abs(scales[j])
                max_scale = scales[j]
        if max_abs < _f32(1e-15):
            for k in range(210):
                out[o + k] = 0
        else:
            _finish_q6_k_block(x, xo, out, o, scales, max_scale, L, sf, su)


# ----------------------------------------------------------------------------------------------------------------------
# 32-element formats: sigma2 is taken over the whole row here, not per block
# ----------------------------------------------------------------------------------------------------------------------

@njit
def _row_32_w(x, qw, out, nmax, asym, five_bit, block_bytes):
    """Q4_0 (nmax 8, symmetric), Q4_1 (15, asymmetric), Q5_0 (16, symmetric), Q5_1 (31, asymmetric)."""
    sf = np.empty(1, np.float32)
    su = sf.view(np.uint32)
    L = np.empty(32, np.int32)
    Laux = np.empty(32, np.int32)
    w = np.empty(32, np.float32)
    sigma2 = _sum_squares(x, 0, x.size) / _f32(x.size)
    for b in range(x.size // 32):
        xo, o = b * 32, b * block_bytes
        _importance(x, xo, 32, qw, xo, sigma2, w)
        if asym:
            d, the_min = _make_qkx3_quants(x, xo, 32, w, nmax, _f32(-0.9), _f32(0.05), 36, L, 0, Laux)
            _put_f16(out, o, d, sf, su)
            _put_f16(out, o + 2, -the_min, sf, su)
            qo = o + 4
        else:
            d = _make_qx_quants_w(x, xo, 32, nmax, L, 0, w, 0)
            _put_f16(out, o, d, sf, su)
            qo = o + 2
        if five_bit:
            qh = 0
            for j in range(16):
                qh |= ((L[j] >> 4) & 1) << j
                qh |= ((L[j + 16] >> 4) & 1) << (j + 16)
            for k in range(4):
                out[qo + k] = (qh >> (8 * k)) & 0xFF
            qo += 4
        for j in range(16):
            out[qo + j] = (L[j] & 0xF) | ((L[j + 16] & 0xF) << 4)


# ----------------------------------------------------------------------------------------------------------------------
# Parallel drivers
# ----------------------------------------------------------------------------------------------------------------------

@njit(cache=True, parallel=True)
def _rows_q2_k_w(x, qw, out):
    for r in prange(x.shape[0]):
        _row_q2_k_w(x[r], qw, out[r])


@njit(cache=True, parallel=True)
def _rows_q3_k_w(x, qw, out):
    for r in prange(x.shape[0]):
        _row_q3_k_w(x[r], qw, out[r])


@njit(cache=True, parallel=True)
def _rows_q4_k_w(x, qw, out):
    for r in prange(x.shape[0]):
        _row_q4_k_w(x[r], qw, out[r])


@njit(cache=True, parallel=True)
def _rows_q5_k_w(x, qw, out):
    for r in prange(x.shape[0]):
        _row_q5_k_w(x[r], qw, out[r])


@njit(cache=True, parallel=True)
def _rows_q6_k_w(x, qw, out):
    for r in prange(x.shape[0]):
        _row_q6_k_w(x[r], qw, out[r])


@njit(cache=True, parallel=True)
def _rows_32_w(x, qw, out, nmax, asym, five_bit, block_bytes):
    for r in prange(x.shape[0]):
        _row_32_w(x[r], qw, out[r], nmax, asym, five_bit, block_bytes)


def _driver_32(nmax: int, asym: bool, five_bit: bool, block_bytes: int):
    def run(x, qw, out):
        _rows_32_w(x, qw, out, nmax, asym, five_bit, block_bytes)
    return run


WEIGHTED_DRIVERS = {
    QType.Q2_K: _rows_q2_k_w, QType.Q3_K: _rows_q3_k_w, QType.Q4_K: _rows_q4_k_w, QType.Q5_K: _rows_q5_k_w,
    QType.Q6_K: _rows_q6_k_w,
    QType.Q4_0: _driver_32(8, False, False, 18), QType.Q4_1: _driver_32(15, True, False, 20),
    QType.Q5_0: _driver_32(16, False, True, 22), QType.Q5_1: _driver_32(31, True, True, 24),
}

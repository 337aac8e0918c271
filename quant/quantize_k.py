"""Compiled K-format quantizers (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K: super-blocks of 256), the twins of ggml's
quantize_row_*_ref, with the sub-block searches they share (make_qkx2_quants, make_q3_quants, make_qx_quants).

Same float32 rules as quant.quantize; `quant.quantize.quantize_fast` is the entry point.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .formats import QK_K
from .quantize_common import _f32, _nearest_int, _put_f16, _signed_absmax
from .tensor import QType

# ----------------------------------------------------------------------------------------------------------------------
# Sub-block searches of the K formats (ggml's make_qkx2_quants, make_q3_quants, make_qx_quants)
# ----------------------------------------------------------------------------------------------------------------------

@njit
def _make_qkx2_quants(x, xo, n, w, nmax, rmin, rdelta, nstep, use_mad, L, lo, Laux):
    """Weighted asymmetric fit of x[xo:xo+n]: writes L[lo:lo+n] in 0..nmax, returns (scale, the_min)."""
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
    if mx == mn:
        for i in range(n):
            L[lo + i] = 0
        return _f32(0), -mn
    iscale = _f32(nmax) / (mx - mn)
    scale = _f32(1) / iscale
    best_error = _f32(0)
    for i in range(n):
        l = max(0, min(nmax, _nearest_int(iscale * (x[xo + i] - mn))))
        L[lo + i] = l
        diff = scale * _f32(l) + mn - x[xo + i]
        diff = abs(diff) if use_mad else diff * diff
        best_error += w[i] * diff
    for step in range(nstep + 1):
        # the span is measured from the best min so far, as in ggml
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
            cur_error = _f32(0)
            for i in range(n):
                diff = this_scale * _f32(Laux[i]) + this_min - x[xo + i]
                diff = abs(diff) if use_mad else diff * diff
                cur_error += w[i] * diff
            if cur_error < best_error:
                for i in range(n):
                    L[lo + i] = Laux[i]
                best_error = cur_error
                scale = this_scale
                mn = this_min
    return scale, -mn


@njit
def _make_q3_quants(x, xo, n, nmax, L, lo):
    """x**2-weighted symmetric fit refined one element at a time; L[lo:lo+n] in 0..2*nmax-1; returns the scale."""
    amax, mx = _signed_absmax(x, xo, n)
    if amax < _f32(1e-15):
        for i in range(n):
            L[lo + i] = 0
        return _f32(0)
    iscale = _f32(-nmax) / mx
    sumlx = _f32(0)
    suml2 = _f32(0)
    for i in range(n):
        v = x[xo + i]
        l = max(-nmax, min(nmax - 1, _nearest_int(iscale * v)))
        L[lo + i] = l
        w = v * v
        sumlx += w * v * _f32(l)
        suml2 += w * _f32(l) * _f32(l)
    for _ in range(5):
        n_changed = 0
        for i in range(n):
            v = x[xo + i]
            w = v * v
            li = _f32(L[lo + i])
            slx = sumlx - w * v * li
            if slx > 0:
                sl2 = suml2 - w * li * li
                new_l = max(-nmax, min(nmax - 1, _nearest_int(v * sl2 / slx)))
                if new_l != L[lo + i]:
                    slx += w * v * _f32(new_l)
                    sl2 += w * _f32(new_l) * _f32(new_l)
                    if sl2 > 0 and slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[lo + i] = new_l
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    for i in range(n):
        L[lo + i] += nmax
    return sumlx / suml2 if suml2 > 0 else _f32(0)


@njit
def _make_qx_quants(x, xo, n, nmax, L, lo):
    """x**2-weighted symmetric fit, best of 19 trial scales; L[lo:lo+n] in 0..2*nmax-1; returns the scale."""
    amax, mx = _signed_absmax(x, xo, n)
    if amax < _f32(1e-15):
        for i in range(n):
            L[lo + i] = 0
        return _f32(0)
    iscale = _f32(-nmax) / mx
    sumlx = _f32(0)
    suml2 = _f32(0)
    for i in range(n):
        v = x[xo + i]
        l = max(-nmax, min(nmax - 1, _nearest_int(iscale * v)))
        L[lo + i] = l + nmax
        w = v * v
        sumlx += w * v * _f32(l)
        suml2 += w * _f32(l) * _f32(l)
    scale = sumlx / suml2 if suml2 != 0 else _f32(0)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(_f32(nmax) + _f32(0.1) * _f32(step)) / mx
        sumlx = _f32(0)
        suml2 = _f32(0)
        for i in range(n):
            v = x[xo + i]
            l = max(-nmax, min(nmax - 1, _nearest_int(iscale * v)))
            w = v * v
            sumlx += w * v * _f32(l)
            suml2 += w * _f32(l) * _f32(l)
        if suml2 > 0 and sumlx * sumlx > best * suml2:
            for i in range(n):
                L[lo + i] = nmax + max(-nmax, min(nmax - 1, _nearest_int(iscale * x[xo + i])))
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


@njit
def _make_qx_quants_w(x, xo, n, nmax, L, lo, w, wo):
    """make_qx_quants with ggml's quant_weights: the same search as `_make_qx_quants`, each element weighted by
    w[wo + i] instead of x**2 (the importance-matrix paths of Q3_K, Q6_K, Q4_0 and Q5_0)."""
    amax, mx = _signed_absmax(x, xo, n)
    if amax < _f32(1e-15):
        for i in range(n):
            L[lo + i] = 0
        return _f32(0)
    iscale = _f32(-nmax) / mx
    sumlx = _f32(0)
    suml2 = _f32(0)
    for i in range(n):
        v = x[xo + i]
        l = max(-nmax, min(nmax - 1, _nearest_int(iscale * v)))
        L[lo + i] = l + nmax
        sumlx += w[wo + i] * v * _f32(l)
        suml2 += w[wo + i] * _f32(l) * _f32(l)
    scale = sumlx / suml2 if suml2 != 0 else _f32(0)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(_f32(nmax) + _f32(0.1) * _f32(step)) / mx
        sumlx = _f32(0)
        suml2 = _f32(0)
        for i in range(n):
            v = x[xo + i]
            l = max(-nmax, min(nmax - 1, _nearest_int(iscale * v)))
            sumlx += w[wo + i] * v * _f32(l)
            suml2 += w[wo + i] * _f32(l) * _f32(l)
        if suml2 > 0 and sumlx * sumlx > best * suml2:
            for i in range(n):
                L[lo + i] = nmax + max(-nmax, min(nmax - 1, _nearest_int(iscale * x[xo + i])))
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


# ----------------------------------------------------------------------------------------------------------------------
# K formats (super-blocks of 256)
# ----------------------------------------------------------------------------------------------------------------------

@njit
def _row_q2_k(x, out):
    sf = np.empty(1, np.float32)
    su = sf.view(np.uint32)
    L = np.empty(QK_K, np.int32)
    Laux = np.empty(16, np.int32)
    w = np.empty(16, np.float32)
    scales = np.empty(16, np.float32)
    mins = np.empty(16, np.float32)
    for b in range(x.size // QK_K):
        xo, o = b * QK_K, b * 84  # scales[16] qs[64] d dmin
        max_scale = _f32(0)
        max_min = _f32(0)
        for j in range(16):
            for l in range(16):
                w[l] = abs(x[xo + 16 * j + l])
            sc, mn = _make_qkx2_quants(x, xo + 16 * j, 16, w, 3, _f32(-0.5), _f32(0.1), 15, True, L, 16 * j, Laux)
            scales[j] = sc
            mins[j] = mn
            if scales[j] > max_scale:  # noqa: PLR1730
                max_scale = scales[j]
            if mins[j] > max_min:  # noqa: PLR1730
                max_min = mins[j]
        if max_scale > 0:
            iscale = _f32(15) / max_scale
            for j in range(16):
                out[o + j] = _nearest_int(iscale * scales[j]) & 0xFF
            d = _put_f16(out, o + 80, max_scale / _f32(15), sf, su)
        else:
            for j in range(16):
                out[o + j] = 0
            d = _put_f16(out, o + 80, _f32(0), sf, su)
        if max_min > 0:
            iscale = _f32(15) / max_min
            for j in range(16):
                out[o + j] = (out[o + j] | (_nearest_int(iscale * mins[j]) << 4)) & 0xFF
            dmin = _put_f16(out, o + 82, max_min / _f32(15), sf, su)
        else:
            dmin = _put_f16(out, o + 82, _f32(0), sf, su)
        for j in range(16):
            packed = np.int64(out[o + j])
            dd = d * _f32(packed & 0xF)
            if dd == 0:
                continue
            dm = dmin * _f32(packed >> 4)
            for i in range(16):
                L[16 * j + i] = max(0, min(3, _nearest_int((x[xo + 16 * j + i] + dm) / dd)))
        _pack_2bit(L, out, o + 16)


@njit
def _pack_2bit(L, out, qo):
    for h in range(2):
        for l in range(32):
            e = 128 * h + l
            out[qo + 32 * h + l] = L[e] | (L[e + 32] << 2) | (L[e + 64] << 4) | (L[e + 96] << 6)


@njit
def _row_q3_k(x, out):
    sf = np.empty(1, np.float32)
    su = sf.view(np.uint32)
    L = np.empty(QK_K, np.int32)
    scales = np.empty(16, np.float32)
    for b in range(x.size // QK_K):
        xo, o = b * QK_K, b * 110  # hmask[32] qs[64] scales[12] d
        so = o + 96
        amax = _f32(0)
        max_scale = _f32(0)
        for j in range(16):
            scales[j] = _make_q3_quants(x, xo + 16 * j, 16, 4, L, 16 * j)
            if abs(scales[j]) > amax:
                amax = abs(scales[j])
                max_scale = scales[j]
        for k in range(12):
            out[so + k] = 0
        if max_scale != 0:
            iscale = _f32(-32) / max_scale
            for j in range(16):
                l = ((_nearest_int(iscale * scales[j]) + 128) & 0xFF) - 128  # int8_t
                l = max(-32, min(31, l)) + 32
                if j < 8:
                    out[so + j] = l & 0xF
                else:
                    out[so + j - 8] |= (l & 0xF) << 4
                out[so + 8 + j % 4] |= (l >> 4) << (2 * (j // 4))
            d_all = _put_f16(out, o + 108, _f32(1) / iscale, sf, su)
        else:
            d_all = _put_f16(out, o + 108, _f32(0), sf, su)
        for j in range(16):
            if j < 8:
                low = np.int64(out[so + j]) & 0xF
            else:
                low = np.int64(out[so + j - 8]) >> 4
            high = (np.int64(out[so + 8 + j % 4]) >> (2 * (j // 4))) & 3
            sc = (low | (high << 4)) - 32
            dd = d_all * _f32(sc)
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
def _row_k4(x, out, nmax, rmin, rdelta, nstep, block_bytes):
    """Q4_K (nmax 15) and Q5_K (nmax 31): d, dmin, 12 scale bytes, then the quants (packed by the caller)."""
    sf = np.empty(1, np.float32)
    su = sf.view(np.uint32)
    L = np.empty((x.size // QK_K, QK_K), np.int32)
    Laux = np.empty(32, np.int32)
    w = np.empty(32, np.float32)
    scales = np.empty(8, np.float32)
    mins = np.empty(8, np.float32)
    ls = np.empty(8, np.int32)
    lm = np.empty(8, np.int32)
    for b in range(x.size // QK_K):
        xo, o = b * QK_K, b * block_bytes
        Lb = L[b]
        max_scale = _f32(0)
        max_min = _f32(0)
        for j in range(8):
            sum_x2 = _f32(0)
            for l in range(32):
                v = x[xo + 32 * j + l]
                sum_x2 += v * v
            av_x = np.sqrt(sum_x2 / _f32(32))
            for l in range(32):
                w[l] = av_x + abs(x[xo + 32 * j + l])
            sc, mn = _make_qkx2_quants(x, xo + 32 * j, 32, w, nmax, rmin, rdelta, nstep, False, Lb, 32 * j, Laux)
            scales[j] = sc
            mins[j] = mn
            if scales[j] > max_scale:  # noqa: PLR1730
                max_scale = scales[j]
            if mins[j] > max_min:  # noqa: PLR1730
                max_min = mins[j]
        inv_scale = _f32(63) / max_scale if max_scale > 0 else _f32(0)
        inv_min = _f32(63) / max_min if max_min > 0 else _f32(0)
        for j in range(8):
            ls[j] = min(63, _nearest_int(inv_scale * scales[j]) & 0xFF)  # via uint8_t
            lm[j] = min(63, _nearest_int(inv_min * mins[j]) & 0xFF)
        for j in range(4):
            out[o + 4 + j] = ls[j] | ((ls[j + 4] >> 4) << 6)
            out[o + 8 + j] = lm[j] | ((lm[j + 4] >> 4) << 6)
            out[o + 12 + j] = (ls[j + 4] & 0xF) | ((lm[j + 4] & 0xF) << 4)
        d = _put_f16(out, o, max_scale / _f32(63), sf, su)
        dmin = _put_f16(out, o + 2, max_min / _f32(63), sf, su)
        for j in range(8):
            dd = d * _f32(ls[j])
            if dd == 0:
                continue
            dm = dmin * _f32(lm[j])
            for i in range(32):
                Lb[32 * j + i] = max(0, min(nmax, _nearest_int((x[xo + 32 * j + i] + dm) / dd)))
    return L


@njit(inline="always")
def _pack_q4_k_codes(L, out):
    """Q4_K's 4-bit codes (per super-block, from _row_k4 or the weighted search) into their 128 bytes."""
    for b in range(L.shape[0]):
        qo = b * 144 + 16
        for k in range(4):
            for l in range(32):
                out[qo + 32 * k + l] = L[b, 64 * k + l] | (L[b, 64 * k + 32 + l] << 4)


@njit(inline="always")
def _pack_q5_k_codes(L, out):
    """Q5_K's 5-bit codes: the low nibbles as Q4_K's, the fifth bits in the 32 qh bytes before them."""
    for b in range(L.shape[0]):
        ho = b * 176 + 16
        qo = ho + 32
        for l in range(32):
            out[ho + l] = 0
        for k in range(4):
            for l in range(32):
                l1 = L[b, 64 * k + l]
                l2 = L[b, 64 * k + 32 + l]
                if l1 > 15:
                    l1 -= 16
                    out[ho + l] |= 1 << (2 * k)
                if l2 > 15:
                    l2 -= 16
                    out[ho + l] |= 2 << (2 * k)
                out[qo + 32 * k + l] = l1 | (l2 << 4)


@njit(inline="always")
def _finish_q6_k_block(x, xo, out, o, scales, max_scale, L, sf, su):
    """One Q6_K super-block from its 16 sub-block scales (found by either search): the int8 scales, d, the codes
    re-rounded against the stored scales, and their ql/qh bytes."""
    iscale = _f32(-128) / max_scale
    d = _put_f16(out, o + 208, _f32(1) / iscale, sf, su)
    for j in range(16):
        out[o + 192 + j] = min(127, _nearest_int(iscale * scales[j])) & 0xFF
    for j in range(16):
        sc = ((np.int64(out[o + 192 + j]) + 128) & 0xFF) - 128  # int8_t
        dd = d * _f32(sc)
        if dd == 0:
            continue
        for i in range(16):
            L[16 * j + i] = max(-32, min(31, _nearest_int(x[xo + 16 * j + i] / dd))) + 32
    for h in range(2):
        for l in range(32):
            e = 128 * h + l
            out[o + 64 * h + l] = (L[e] & 0xF) | ((L[e + 64] & 0xF) << 4)
            out[o + 64 * h + 32 + l] = (L[e + 32] & 0xF) | ((L[e + 96] & 0xF) << 4)
            out[o + 128 + 32 * h + l] = ((L[e] >> 4) | ((L[e + 32] >> 4) << 2) | ((L[e + 64] >> 4) << 4)
                                         | ((L[e + 96] >> 4) << 6))


@njit
def _row_q4_k(x, out):
    _pack_q4_k_codes(_row_k4(x, out, 15, _f32(-1.0), _f32(0.1), 20, 144), out)


@njit
def _row_q5_k(x, out):
    _pack_q5_k_codes(_row_k4(x, out, 31, _f32(-0.5), _f32(0.1), 15, 176), out)


@njit
def _row_q6_k(x, out):
    sf = np.empty(1, np.float32)
    su = sf.view(np.uint32)
    L = np.empty(QK_K, np.int32)
    scales = np.empty(16, np.float32)
    for b in range(x.size // QK_K):
        xo, o = b * QK_K, b * 210  # ql[128] qh[64] scales[16] d
        max_abs = _f32(0)
        max_scale = _f32(0)
        for j in range(16):
            scales[j] = _make_qx_quants(x, xo + 16 * j, 16, 32, L, 16 * j)
            if abs(scales[j]) > max_abs:
                max_abs = abs(scales[j])
                max_scale = scales[j]
        if max_abs < _f32(1e-15):
            for k in range(210):
                out[o + k] = 0
        else:
            _finish_q6_k_block(x, xo, out, o, scales, max_scale, L, sf, su)


# ----------------------------------------------------------------------------------------------------------------------
# Parallel drivers, one per format, each cached on its own and compiled when its format is first used
# ----------------------------------------------------------------------------------------------------------------------

@njit(cache=True, parallel=True)
def _rows_q2_k(x, out):
    for r in prange(x.shape[0]):
        _row_q2_k(x[r], out[r])


@njit(cache=True, parallel=True)
def _rows_q3_k(x, out):
    for r in prange(x.shape[0]):
        _row_q3_k(x[r], out[r])


@njit(cache=True, parallel=True)
def _rows_q4_k(x, out):
    for r in prange(x.shape[0]):
        _row_q4_k(x[r], out[r])


@njit(cache=True, parallel=True)
def _rows_q5_k(x, out):
    for r in prange(x.shape[0]):
        _row_q5_k(x[r], out[r])


@njit(cache=True, parallel=True)
def _rows_q6_k(x, out):
    for r in prange(x.shape[0]):
        _row_q6_k(x[r], out[r])


K_DRIVERS = {QType.Q2_K: _rows_q2_k, QType.Q3_K: _rows_q3_k, QType.Q4_K: _rows_q4_k, QType.Q5_K: _rows_q5_k,
             QType.Q6_K: _rows_q6_k}

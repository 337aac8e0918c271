"""Compiled quantizers: `quantize_fast`, the numba twin of `quant.formats.quantize`, for whole models.

Each format has a row kernel that walks its blocks with scalar float32 code in the order of ggml's
`quantize_row_*_ref`, and a driver that runs the rows in parallel (`prange`). Numba keeps float32 arithmetic in float32
and does not contract a*b+c into a fused multiply-add unless fastmath is on, so the bytes equal the numpy reference
(and llama.cpp) exactly. Two rules keep it that way in this file: every integer or literal that meets a float is
wrapped in `_f32()` first (numba widens float32 op int64 to float64), and nothing here uses fastmath.

The min/max scans keep ggml's explicit strict comparisons rather than min()/max(): with them the first of equal
values wins, which decides the sign of a zero scale, so they carry `noqa: PLR1730`.

The input is validated (2-D, float32, whole blocks, finite) before any kernel runs.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .formats import QK_K, row_bytes
from .tensor import QType

__all__ = ["FAST_TYPES", "IMATRIX_TYPES", "QUANTIZE_TYPES", "check_imatrix", "quantize_fast"]

_f32 = np.float32


# ----------------------------------------------------------------------------------------------------------------------
# Scalar helpers
# ----------------------------------------------------------------------------------------------------------------------

@njit
def _nearest_int(v):
    """ggml's nearest_int (round half to even); equal to its bit trick for |v| < 2**22, which is all ggml allows."""
    return int(np.rint(v))


@njit
def _roundf(v):
    """C roundf (half away from zero) as an int, without the double rounding of trunc(v + 0.5)."""
    a = abs(v)
    f = np.floor(a)
    r = int(f + np.floor((a - f) * _f32(2)))
    return -r if v < 0 else r


@njit
def _half_from_float_bits(u):
    """IEEE half bits of the finite float32 whose bits are u, rounded to nearest even (GGML_FP32_TO_FP16)."""
    sign = (u >> 16) & 0x8000
    a = u & 0x7FFFFFFF
    if a >= 0x477FF000:  # 65520.0 (halfway between 65504 and 65536) and above: infinity
        return sign | 0x7C00
    if a >= 0x38800000:  # 2**-14 and above: a normal half; rebias the exponent and drop 13 mantissa bits
        r = a - 0x38000000
        q = r >> 13
        rem = r & 0x1FFF
        if rem > 0x1000 or (rem == 0x1000 and (q & 1) == 1):
            q += 1
        return sign | q
    e = a >> 23
    if e < 102:  # below 2**-25: rounds to zero
        return sign
    m = (a & 0x7FFFFF) | 0x800000  # subnormal half: value * 2**24 = m >> (126 - e), rounded
    shift = 126 - e
    q = m >> shift
    rem = m & ((1 << shift) - 1)
    half = 1 << (shift - 1)
    if rem > half or (rem == half and (q & 1) == 1):
        q += 1
    return sign | q


@njit
def _float_bits_from_half(h):
    """float32 bits of the value of half bits h (exact)."""
    sign = (h & 0x8000) << 16
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    if e == 31:
        return sign | 0x7F800000 | (m << 13)
    if e > 0:
        return sign | ((e + 112) << 23) | (m << 13)
    if m == 0:
        return sign
    e = 113  # subnormal: shift the leading one up to the implicit bit
    while (m & 0x400) == 0:
        m <<= 1
        e -= 1
    return sign | (e << 23) | ((m & 0x3FF) << 13)


@njit
def _put_f16(out, off, v, sf, su):
    """Store v as a little-endian ggml_half at out[off:off+2]; return the value it now holds.
    sf/su are one float32 of scratch and its uint32 view, numba's way to read a float's bits."""
    sf[0] = v
    h = _half_from_float_bits(su[0])
    out[off] = h & 0xFF
    out[off + 1] = h >> 8
    su[0] = _float_bits_from_half(h)
    return sf[0]


# ----------------------------------------------------------------------------------------------------------------------
# 32-element formats: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1
# ----------------------------------------------------------------------------------------------------------------------

@njit
def _recip_or_zero(d):
    return _f32(1) / d if d != 0 else _f32(0)


@njit
def _row_q8_0(x, out):
    sf = np.empty(1, np.float32)
    su = sf.view(np.uint32)
    for b in range(x.size // 32):
        xo, o = b * 32, b * 34
        amax = _f32(0)
        for j in range(32):
            amax = max(amax, abs(x[xo + j]))
        d = amax / _f32(127)
        inv = _recip_or_zero(d)
        _put_f16(out, o, d, sf, su)
        for j in range(32):
            out[o + 2 + j] = _roundf(x[xo + j] * inv) & 0xFF


@njit
def _signed_absmax(x, xo, n):
    """ggml's scan: the first element of largest magnitude, with its sign (+0.0 when all are zero)."""
    amax = _f32(0)
    mx = _f32(0)
    for j in range(n):
        v = x[xo + j]
        if amax < abs(v):
            amax = abs(v)
            mx = v
    return amax, mx


@njit
def _min_max(x, xo, n):
    mn = _f32(3.4028234663852886e38)
    mx = _f32(-3.4028234663852886e38)
    for j in range(n):
        v = x[xo + j]
        if v < mn:  # noqa: PLR1730
            mn = v
        if v > mx:  # noqa: PLR1730
            mx = v
    return mn, mx


@njit
def _row_q4_0(x, out):
    sf = np.empty(1, np.float32)
    su = sf.view(np.uint32)
    for b in range(x.size // 32):
        xo, o = b * 32, b * 18
        _, mx = _signed_absmax(x, xo, 32)
        d = mx / _f32(-8)
        inv = _recip_or_zero(d)
        _put_f16(out, o, d, sf, su)
        for j in range(16):
            q0 = min(15, int(x[xo + j] * inv + _f32(8.5)))
            q1 = min(15, int(x[xo + 16 + j] * inv + _f32(8.5)))
            out[o + 2 + j] = q0 | (q1 << 4)


@njit
def _row_q4_1(x, out):
    sf = np.empty(1, np.float32)
    su = sf.view(np.uint32)
    for b in range(x.size // 32):
        xo, o = b * 32, b * 20
        mn, mx = _min_max(x, xo, 32)
        d = (mx - mn) / _f32(15)
        inv = _recip_or_zero(d)
        _put_f16(out, o, d, sf, su)
        _put_f16(out, o + 2, mn, sf, su)
        for j in range(16):
            q0 = min(15, int((x[xo + j] - mn) * inv + _f32(0.5)))
            q1 = min(15, int((x[xo + 16 + j] - mn) * inv + _f32(0.5)))
            out[o + 4 + j] = q0 | (q1 << 4)


@njit
def _row_q5_0(x, out):
    sf = np.empty(1, np.float32)
    su = sf.view(np.uint32)
    for b in range(x.size // 32):
        xo, o = b * 32, b * 22
        _, mx = _signed_absmax(x, xo, 32)
        d = mx / _f32(-16)
        inv = _recip_or_zero(d)
        _put_f16(out, o, d, sf, su)
        qh = 0
        for j in range(16):
            q0 = min(31, int(x[xo + j] * inv + _f32(16.5)))
            q1 = min(31, int(x[xo + 16 + j] * inv + _f32(16.5)))
            out[o + 6 + j] = (q0 & 0xF) | ((q1 & 0xF) << 4)
            qh |= ((q0 >> 4) & 1) << j
            qh |= ((q1 >> 4) & 1) << (j + 16)
        for k in range(4):
            out[o + 2 + k] = (qh >> (8 * k)) & 0xFF


@njit
def _row_q5_1(x, out):
    sf = np.empty(1, np.float32)
    su = sf.view(np.uint32)
    for b in range(x.size // 32):
        xo, o = b * 32, b * 24
        mn, mx = _min_max(x, xo, 32)
        d = (mx - mn) / _f32(31)
        inv = _recip_or_zero(d)
        _put_f16(out, o, d, sf, su)
        _put_f16(out, o + 2, mn, sf, su)
        qh = 0
        for j in range(16):
            q0 = int((x[xo + j] - mn) * inv + _f32(0.5)) & 0xFF
            q1 = int((x[xo + 16 + j] - mn) * inv + _f32(0.5)) & 0xFF
            out[o + 8 + j] = (q0 & 0xF) | ((q1 & 0xF) << 4)
            qh |= ((q0 >> 4) & 1) << j
            qh |= ((q1 >> 4) & 1) << (j + 16)
        for k in range(4):
            out[o + 4 + k] = (qh >> (8 * k)) & 0xFF


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


@njit
def _row_q4_k(x, out):
    L = _row_k4(x, out, 15, _f32(-1.0), _f32(0.1), 20, 144)
    for b in range(L.shape[0]):
        qo = b * 144 + 16
        for k in range(4):
            for l in range(32):
                out[qo + 32 * k + l] = L[b, 64 * k + l] | (L[b, 64 * k + 32 + l] << 4)


@njit
def _row_q5_k(x, out):
    L = _row_k4(x, out, 31, _f32(-0.5), _f32(0.1), 15, 176)
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
            continue
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


# ----------------------------------------------------------------------------------------------------------------------
# Parallel drivers, one per format: each is cached on its own and compiled only when its format is first used.
# ----------------------------------------------------------------------------------------------------------------------

@njit(cache=True, parallel=True)
def _rows_q8_0(x, out):
    for r in prange(x.shape[0]):
        _row_q8_0(x[r], out[r])


@njit(cache=True, parallel=True)
def _rows_q4_0(x, out):
    for r in prange(x.shape[0]):
        _row_q4_0(x[r], out[r])


@njit(cache=True, parallel=True)
def _rows_q4_1(x, out):
    for r in prange(x.shape[0]):
        _row_q4_1(x[r], out[r])


@njit(cache=True, parallel=True)
def _rows_q5_0(x, out):
    for r in prange(x.shape[0]):
        _row_q5_0(x[r], out[r])


@njit(cache=True, parallel=True)
def _rows_q5_1(x, out):
    for r in prange(x.shape[0]):
        _row_q5_1(x[r], out[r])


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


_DRIVERS = {
    QType.Q8_0: _rows_q8_0, QType.Q4_0: _rows_q4_0, QType.Q4_1: _rows_q4_1, QType.Q5_0: _rows_q5_0,
    QType.Q5_1: _rows_q5_1, QType.Q2_K: _rows_q2_k, QType.Q3_K: _rows_q3_k, QType.Q4_K: _rows_q4_k,
    QType.Q5_K: _rows_q5_k, QType.Q6_K: _rows_q6_k,
}

FAST_TYPES: tuple[QType, ...] = (QType.F32, QType.F16, QType.BF16, *_DRIVERS)
# ggml's quantizers that read an importance matrix (quantize_*_impl with quant_weights); the others ignore one
IMATRIX_TYPES: tuple[QType, ...] = (QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K, QType.Q4_0,
                                    QType.Q4_1, QType.Q5_0, QType.Q5_1, QType.IQ4_NL, QType.IQ4_XS)
QUANTIZE_TYPES: tuple[QType, ...] = (*FAST_TYPES, QType.IQ4_NL, QType.IQ4_XS)


def check_imatrix(imatrix, cols: int, what: str = "imatrix") -> np.ndarray:
    """The importance vector of one matrix as float32 (cols,): finite and non-negative, one value per input column."""
    w = np.asarray(imatrix)
    if w.ndim != 1 or w.shape[0] != cols:
        raise ValueError(f"{what} has shape {w.shape}, expected ({cols},): one value per input column")
    if not np.issubdtype(w.dtype, np.floating):
        raise ValueError(f"{what} must hold floats, got {w.dtype}")
    w = np.ascontiguousarray(w, dtype=np.float32)
    if not np.isfinite(w).all():
        raise ValueError(f"{what} holds NaN or infinite values")
    if (w < 0).any():
        raise ValueError(f"{what} holds negative values; importances are means of squares")
    return w


def quantize_fast(qtype: QType, x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Quantize a float32 matrix (rows, cols) into ggml blocks (rows, row_bytes), in parallel over rows.

    Same bytes as `quant.formats.quantize` (and llama.cpp's reference quantizers). With `imatrix` (one importance
    per input column, llama.cpp's imatrix values for this matrix), the formats in IMATRIX_TYPES take ggml's
    weighted path and give the bytes of `ggml_quantize_chunk(..., imatrix)`; the others ignore it, as ggml does.
    IQ4_NL and IQ4_XS have no numpy twin in quant.formats; they equal ggml's with or without an imatrix."""
    try:
        qtype = QType(qtype)
    except ValueError:
        raise ValueError(f"unknown ggml type id {qtype!r}") from None
    if qtype not in QUANTIZE_TYPES:
        raise ValueError(f"quantize_fast does not support {qtype.name} "
                         f"(supported: {', '.join(q.name for q in QUANTIZE_TYPES)})")
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"quantize_fast needs a 2-D (rows, cols) array, got shape {x.shape}")
    if x.dtype != np.float32:
        raise ValueError(f"quantize_fast needs float32 input, got {x.dtype}")
    nbytes = row_bytes(qtype, x.shape[1])  # raises ValueError unless cols is whole blocks
    qw = None if imatrix is None else check_imatrix(imatrix, x.shape[1])
    if qtype in (QType.F32, QType.F16, QType.BF16):
        from .formats import quantize  # float formats are a cast, no kernel needed
        return quantize(qtype, x)
    if not np.isfinite(x).all():
        raise ValueError(f"cannot quantize to {qtype.name}: the input holds NaN or infinite values")
    x = np.ascontiguousarray(x)
    out = np.empty((x.shape[0], nbytes), dtype=np.uint8)
    if qtype in (QType.IQ4_NL, QType.IQ4_XS):
        from .quantize_iq4 import IQ4_DRIVERS  # imports this module's helpers
        has_w = qw is not None
        IQ4_DRIVERS[qtype](x, qw if has_w else np.zeros(x.shape[1], np.float32), has_w, out)
    elif qw is not None and qtype in IMATRIX_TYPES:
        from .quantize_imatrix import WEIGHTED_DRIVERS  # imports this module's helpers
        WEIGHTED_DRIVERS[qtype](x, qw, out)
    else:
        _DRIVERS[qtype](x, out)
    return out

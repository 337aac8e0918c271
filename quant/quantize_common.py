"""Scalar pieces shared by the compiled quantizers (quant.quantize, quant.quantize_k, quant.quantize_imatrix,
quant.quantize_iq4, quant.quantize_iq3, quant.quantize_iq2): ggml's rounding, IEEE half conversion, and its ordered
min/max scans; and, in Python, the argument checks of the IQ drivers and their one-call front doors.

Same float32 rules as quant.quantize: every integer or literal that meets a float goes through `_f32()`, and
nothing uses fastmath, so each operation rounds as ggml's C does. numba checks a cached driver against its own
file only: a change here must come with a touch of the modules whose drivers use it.
"""
from __future__ import annotations

import numpy as np
from numba import njit

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



@njit
def _recip_or_zero(d):
    return _f32(1) / d if d != 0 else _f32(0)



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




# ----------------------------------------------------------------------------------------------------------------------
# Argument checks of the IQ drivers (quantize_iq3.py, quantize_iq2.py), before any kernel touches memory
# ----------------------------------------------------------------------------------------------------------------------

def check_driver_args(qtype, x, qw, has_w: bool, out) -> None:
    """What ggml would assert on, or silently get wrong, as ValueErrors: rows x C-contiguous float32 (rows, cols) in
    whole blocks, out the matching uint8 buffer, qw float32 (cols,), finite and non-negative when used."""
    from .formats import row_bytes
    if not isinstance(x, np.ndarray) or x.ndim != 2 or x.dtype != np.float32 or not x.flags.c_contiguous:
        raise ValueError(f"{qtype.name}: the rows must be a C-contiguous float32 (rows, cols) array")
    cols = x.shape[1]
    nbytes = row_bytes(qtype, cols)  # ValueError unless cols is a multiple of the block
    if not isinstance(out, np.ndarray) or out.dtype != np.uint8 or out.shape != (x.shape[0], nbytes) \
            or not out.flags.c_contiguous:
        raise ValueError(f"{qtype.name}: out must be a C-contiguous uint8 array of shape {(x.shape[0], nbytes)}")
    if not isinstance(qw, np.ndarray) or qw.shape != (cols,) or qw.dtype != np.float32 or not qw.flags.c_contiguous:
        raise ValueError(f"the imatrix has shape {getattr(qw, 'shape', None)}, expected ({cols},) float32: "
                         "one value per input column")
    if has_w:
        if not np.isfinite(qw).all():
            raise ValueError("the imatrix holds NaN or infinite values")
        if (qw < 0).any():
            raise ValueError("the imatrix holds negative values; importances are means of squares")
    if not np.isfinite(x).all():
        raise ValueError(f"cannot quantize to {qtype.name}: the input holds NaN or infinite values")


def run_driver(driver, qtype, x, imatrix) -> np.ndarray:
    """The one-call form of an IQ driver: x as float32 rows, the imatrix (or None) as the driver's (qw, has_w), and
    a fresh out buffer; the driver checks the rest."""
    from .formats import row_bytes
    x = np.asarray(x)
    if x.ndim != 2 or x.dtype != np.float32:
        raise ValueError(f"{qtype.name} needs a 2-D float32 (rows, cols) array, got {x.dtype} {x.shape}")
    x = np.ascontiguousarray(x)
    has_w = imatrix is not None
    if has_w:
        qw = np.asarray(imatrix)
        if qw.shape != (x.shape[1],):
            raise ValueError(f"the imatrix has shape {qw.shape}, expected ({x.shape[1]},): one value per input column")
        if not np.issubdtype(qw.dtype, np.floating):
            raise ValueError(f"the imatrix must hold floats, got {qw.dtype}")
        qw = np.ascontiguousarray(qw, dtype=np.float32)
    else:
        qw = np.zeros(x.shape[1], np.float32)
    out = np.empty((x.shape[0], row_bytes(qtype, x.shape[1])), np.uint8)
    driver(x, qw, has_w, out)
    return out

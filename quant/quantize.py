"""Compiled quantizers: `quantize_fast`, the numba twin of `quant.formats.quantize`, for whole models.

Each format has a row kernel that walks its blocks with scalar float32 code in the order of ggml's
`quantize_row_*_ref`, and a driver that runs the rows in parallel (`prange`). Numba keeps float32 arithmetic in float32
and does not contract a*b+c into a fused multiply-add unless fastmath is on, so the bytes equal the numpy reference
(and llama.cpp) exactly. Two rules keep it that way here and in the modules beside it (quantize_common.py: rounding,
halves, scans; quantize_k.py: the K formats; quantize_imatrix.py: the importance-weighted paths; quantize_iq4.py,
quantize_iq3.py, quantize_iq2.py, quantize_iq1.py: the IQ formats): every integer or literal that meets a float is
wrapped in `_f32()` first (numba widens float32 op int64 to float64), and nothing uses fastmath.

The min/max scans keep ggml's explicit strict comparisons rather than min()/max(): with them the first of equal
values wins, which decides the sign of a zero scale, so they carry `noqa: PLR1730`.

The input is validated (2-D, float32, whole blocks, finite) before any kernel runs.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .formats import row_bytes
from .quantize_common import (
    _f32,
    _min_max,
    _put_f16,
    _recip_or_zero,
    _roundf,
    _signed_absmax,
)
from .quantize_imatrix import WEIGHTED_DRIVERS
from .quantize_iq1 import IMATRIX_REQUIRED as _IQ1_NEEDS
from .quantize_iq1 import IQ1_DRIVERS
from .quantize_iq2 import IMATRIX_REQUIRED as _IQ2_NEEDS
from .quantize_iq2 import IQ2_DRIVERS
from .quantize_iq3 import IQ3_DRIVERS
from .quantize_iq4 import IQ4_DRIVERS
from .quantize_k import K_DRIVERS
from .tensor import QType

__all__ = ["FAST_TYPES", "IMATRIX_REQUIRED", "IMATRIX_TYPES", "QUANTIZE_TYPES", "check_imatrix", "quantize_fast"]


# ----------------------------------------------------------------------------------------------------------------------
# 32-element formats: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 (the K formats are in quantize_k.py)
# ----------------------------------------------------------------------------------------------------------------------

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


_DRIVERS = {
    QType.Q8_0: _rows_q8_0, QType.Q4_0: _rows_q4_0, QType.Q4_1: _rows_q4_1, QType.Q5_0: _rows_q5_0,
    QType.Q5_1: _rows_q5_1, **K_DRIVERS,
}

FAST_TYPES: tuple[QType, ...] = (QType.F32, QType.F16, QType.BF16, *_DRIVERS)
# ggml's quantizers that read an importance matrix (quantize_*_impl with quant_weights); the others ignore one
# The IQ formats: each driver takes (rows, importance, has_importance, out); those in IMATRIX_REQUIRED (IQ2_XXS, IQ2_XS,
# IQ1_S, IQ1_M: ggml_quantize_requires_imatrix) refuse to run without one, as llama-quantize does
_IQ_DRIVERS = {**IQ4_DRIVERS, **IQ3_DRIVERS, **IQ2_DRIVERS, **IQ1_DRIVERS}
IMATRIX_REQUIRED: tuple[QType, ...] = (*_IQ2_NEEDS, *_IQ1_NEEDS)
IMATRIX_TYPES: tuple[QType, ...] = (QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K, QType.Q4_0,
                                    QType.Q4_1, QType.Q5_0, QType.Q5_1, *_IQ_DRIVERS)
QUANTIZE_TYPES: tuple[QType, ...] = (*FAST_TYPES, *_IQ_DRIVERS)


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
    The IQ formats have no numpy twin in quant.formats; they equal ggml's with or without an imatrix, except those in
    IMATRIX_REQUIRED (IQ2_XXS, IQ2_XS, IQ1_S, IQ1_M), which need one (ImatrixRequiredError without)."""
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
    if qtype in _IQ_DRIVERS:
        has_w = qw is not None
        _IQ_DRIVERS[qtype](x, qw if has_w else np.zeros(x.shape[1], np.float32), has_w, out)
    elif qw is not None and qtype in IMATRIX_TYPES:
        WEIGHTED_DRIVERS[qtype](x, qw, out)
    else:
        _DRIVERS[qtype](x, out)
    return out

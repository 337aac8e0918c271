"""Block formats, byte-identical to ggml: block structs, and reference dequantize / quantize in numpy.

Each block format is a numpy structured dtype laid out field for field like the C struct in ggml's
`ggml/src/ggml-common.h`; its byte size is checked at import against the size formula of ggml's static_assert and
against gguf-py's table. The codecs here are references, written for clarity over speed:

- `dequantize` equals `gguf.quants.dequantize` bit for bit (the same float32 operations in the same order).
- `quantize` follows ggml's `quantize_row_*_ref` (what llama.cpp runs when no importance matrix is given): the same
  float32 arithmetic, the same rounding helpers, the same per-element summation order, so the bytes come out
  identical to llama.cpp's. Loops run over the elements of a (sub-)block while numpy runs across all blocks at once,
  which keeps C's sequential summation order and still vectorises.

`quant.quantize.quantize_fast` is the compiled (numba) twin of `quantize` for real model sizes.
"""
from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES

from . import iq_grids as _iq
from .tensor import QType

__all__ = [
    "BLOCK_DTYPES", "DECODE_ONLY_TYPES", "DECODE_TYPES", "QK_K", "SUPPORTED_TYPES", "UnsupportedTypeError",
    "block_dtype", "dequantize", "quantize", "row_bytes",
]

QK_K = 256  # elements in a K-format super-block
_F32 = np.float32

# ----------------------------------------------------------------------------------------------------------------------
# Block structs. Field order and sizes follow ggml-common.h; "<f2" is ggml_half.
# ----------------------------------------------------------------------------------------------------------------------

BLOCK_DTYPES: dict[QType, np.dtype] = {
    QType.F32: np.dtype("<f4"),
    QType.F16: np.dtype("<f2"),
    QType.BF16: np.dtype("<u2"),
    QType.Q8_0: np.dtype([("d", "<f2"), ("qs", "i1", 32)]),
    QType.Q4_0: np.dtype([("d", "<f2"), ("qs", "u1", 16)]),
    QType.Q4_1: np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", 16)]),
    QType.Q5_0: np.dtype([("d", "<f2"), ("qh", "u1", 4), ("qs", "u1", 16)]),
    QType.Q5_1: np.dtype([("d", "<f2"), ("m", "<f2"), ("qh", "u1", 4), ("qs", "u1", 16)]),
    QType.Q2_K: np.dtype([("scales", "u1", QK_K // 16), ("qs", "u1", QK_K // 4), ("d", "<f2"), ("dmin", "<f2")]),
    QType.Q3_K: np.dtype([("hmask", "u1", QK_K // 8), ("qs", "u1", QK_K // 4), ("scales", "u1", 12), ("d", "<f2")]),
    QType.Q4_K: np.dtype([("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", 12), ("qs", "u1", QK_K // 2)]),
    QType.Q5_K: np.dtype([("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", 12), ("qh", "u1", QK_K // 8),
                          ("qs", "u1", QK_K // 2)]),
    QType.Q6_K: np.dtype([("ql", "u1", QK_K // 2), ("qh", "u1", QK_K // 4), ("scales", "i1", QK_K // 16),
                          ("d", "<f2")]),
    # The IQ formats (decoded, not encoded here).
    QType.IQ4_NL: np.dtype([("d", "<f2"), ("qs", "u1", 16)]),
    QType.IQ4_XS: np.dtype([("d", "<f2"), ("scales_h", "<u2"), ("scales_l", "u1", QK_K // 64), ("qs", "u1", QK_K // 2)]),
    QType.IQ3_XXS: np.dtype([("d", "<f2"), ("qs", "u1", 3 * QK_K // 8)]),  # 64 grid indices, then 8 u32 scale+signs
    QType.IQ3_S: np.dtype([("d", "<f2"), ("qs", "u1", QK_K // 4), ("qh", "u1", QK_K // 32), ("signs", "u1", QK_K // 8),
                           ("scales", "u1", QK_K // 64)]),
    QType.IQ2_XXS: np.dtype([("d", "<f2"), ("qs", "<u2", QK_K // 8)]),
    QType.IQ2_XS: np.dtype([("d", "<f2"), ("qs", "<u2", QK_K // 8), ("scales", "u1", QK_K // 32)]),
    QType.IQ2_S: np.dtype([("d", "<f2"), ("qs", "u1", QK_K // 4), ("qh", "u1", QK_K // 32), ("scales", "u1", QK_K // 32)]),
    QType.IQ1_S: np.dtype([("d", "<f2"), ("qs", "u1", QK_K // 8), ("qh", "<u2", QK_K // 32)]),
    QType.IQ1_M: np.dtype([("qs", "u1", QK_K // 8), ("qh", "u1", QK_K // 16), ("scales", "u1", QK_K // 32)]),
}

# (elements per block, bytes per block) as ggml-common.h's static_asserts state them (ggml_half = 2 bytes).
_GGML_BLOCK = {
    QType.F32: (1, 4),
    QType.F16: (1, 2),
    QType.BF16: (1, 2),
    QType.Q8_0: (32, 2 + 32),
    QType.Q4_0: (32, 2 + 32 // 2),
    QType.Q4_1: (32, 2 * 2 + 32 // 2),
    QType.Q5_0: (32, 2 + 4 + 32 // 2),
    QType.Q5_1: (32, 2 * 2 + 4 + 32 // 2),
    QType.Q2_K: (QK_K, 2 * 2 + QK_K // 16 + QK_K // 4),
    QType.Q3_K: (QK_K, 2 + QK_K // 4 + QK_K // 8 + 12),
    QType.Q4_K: (QK_K, 2 * 2 + 12 + QK_K // 2),
    QType.Q5_K: (QK_K, 2 * 2 + 12 + QK_K // 2 + QK_K // 8),
    QType.Q6_K: (QK_K, 2 + QK_K // 16 + 3 * QK_K // 4),
    QType.IQ4_NL: (32, 2 + 32 // 2),
    QType.IQ4_XS: (QK_K, 2 + 2 + QK_K // 64 + QK_K // 2),
    QType.IQ3_XXS: (QK_K, 2 + 3 * (QK_K // 8)),
    QType.IQ3_S: (QK_K, 2 + 13 * (QK_K // 32) + QK_K // 64),
    QType.IQ2_XXS: (QK_K, 2 + QK_K // 8 * 2),
    QType.IQ2_XS: (QK_K, 2 + QK_K // 8 * 2 + QK_K // 32),
    QType.IQ2_S: (QK_K, 2 + QK_K // 4 + QK_K // 16),
    QType.IQ1_S: (QK_K, 2 + QK_K // 8 + QK_K // 16),
    QType.IQ1_M: (QK_K, QK_K // 8 + QK_K // 16 + QK_K // 32),
}

for _q, _dt in BLOCK_DTYPES.items():
    assert _dt.itemsize == _GGML_BLOCK[_q][1], f"{_q.name}: struct is {_dt.itemsize} bytes, ggml says {_GGML_BLOCK[_q][1]}"
    assert GGML_QUANT_SIZES[_q] == _GGML_BLOCK[_q], f"{_q.name}: gguf-py disagrees with ggml-common.h"

# Formats decoded only: no encoder here yet (ggml's IQ quantizers need an importance matrix to be worth having).
DECODE_ONLY_TYPES: tuple[QType, ...] = (QType.IQ4_XS, QType.IQ4_NL, QType.IQ3_XXS, QType.IQ3_S, QType.IQ2_XXS,
                                        QType.IQ2_XS, QType.IQ2_S, QType.IQ1_S, QType.IQ1_M)
# Formats both decoded and encoded, and every format decoded.
SUPPORTED_TYPES: tuple[QType, ...] = tuple(q for q in BLOCK_DTYPES if q not in DECODE_ONLY_TYPES)
DECODE_TYPES: tuple[QType, ...] = tuple(BLOCK_DTYPES)


class UnsupportedTypeError(ValueError, NotImplementedError):
    """A ggml type that this package does not decode or encode (the IQ family, for example)."""


def _check_type(qtype, encode: bool = False) -> QType:
    try:
        qtype = QType(qtype)
    except ValueError:
        raise UnsupportedTypeError(f"unknown ggml type id {qtype!r}") from None
    known = SUPPORTED_TYPES if encode else DECODE_TYPES
    if qtype not in known:
        raise UnsupportedTypeError(f"ggml type {qtype.name} is not supported for "
                                   f"{'quantizing' if encode else 'decoding'} (supported: "
                                   f"{', '.join(q.name for q in known)})")
    return qtype


def block_dtype(qtype: QType) -> np.dtype:
    """The numpy structured dtype of one block of this format."""
    return BLOCK_DTYPES[_check_type(qtype)]


def row_bytes(qtype: QType, cols: int) -> int:
    """Bytes of one row of `cols` elements; cols must be whole blocks."""
    qtype = _check_type(qtype)
    bs, ts = _GGML_BLOCK[qtype]
    if cols <= 0 or cols % bs:
        raise ValueError(f"{qtype.name} rows must be a positive multiple of {bs} elements, got {cols}")
    return cols // bs * ts


# ----------------------------------------------------------------------------------------------------------------------
# Scalar helpers, each the numpy spelling of a ggml one.
# ----------------------------------------------------------------------------------------------------------------------

def _nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: add 1.5 * 2**23 in float32 and read the low mantissa bits (round half to even)."""
    s = np.asarray(v, dtype=_F32) + _F32(12582912.0)
    return (s.view(np.int32) & 0x007FFFFF) - 0x00400000


def _roundf(v: np.ndarray) -> np.ndarray:
    """C roundf: half away from zero, exactly (no +0.5 double rounding)."""
    a = np.abs(v)
    f = np.floor(a)
    return np.copysign(f + np.floor((a - f) * _F32(2)), v)


def _recip_or_zero(d: np.ndarray) -> np.ndarray:
    """ggml's `d ? 1.0f/d : 0.0f`."""
    out = np.zeros_like(d, dtype=_F32)
    np.divide(_F32(1), d, out=out, where=d != 0)
    return out


def _fp16_round(v: np.ndarray) -> np.ndarray:
    """GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(v)): what a ggml_half field gives back."""
    return np.asarray(v, dtype=_F32).astype(np.float16).astype(_F32)


def _seq_sum(terms: np.ndarray) -> np.ndarray:
    """Sum along the last axis one element at a time from 0, as a C `for` loop does (numpy's sum is pairwise)."""
    acc = np.zeros(terms.shape[:-1], dtype=_F32)
    for i in range(terms.shape[-1]):
        acc += terms[..., i]
    return acc


def _first_absmax(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(amax, max) over the last axis as ggml's `if (amax < fabsf(v)) { amax = fabsf(v); max = v; }` finds them:
    the first element of largest magnitude, with its sign; +0.0 when everything is zero."""
    ax = np.abs(x)
    idx = ax.argmax(axis=-1)
    amax = np.take_along_axis(ax, idx[..., None], axis=-1)[..., 0]
    mx = np.take_along_axis(x, idx[..., None], axis=-1)[..., 0]
    return amax, np.where(amax > 0, mx, _F32(0))


def _first_min_max(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """min and max as C's strict `<` / `>` scan finds them (the first occurrence, which fixes the sign of a zero)."""
    mn = np.take_along_axis(x, x.argmin(axis=-1)[..., None], axis=-1)[..., 0]
    mx = np.take_along_axis(x, x.argmax(axis=-1)[..., None], axis=-1)[..., 0]
    return mn, mx


def _pack_2bit(L: np.ndarray) -> np.ndarray:
    """Q2_K/Q3_K low bits: per 128 elements, byte l holds elements l, l+32, l+64, l+96 at bits 0, 2, 4, 6."""
    L = L.reshape(L.shape[0], 2, 4, 32).astype(np.uint8)
    packed = L[:, :, 0] | (L[:, :, 1] << 2) | (L[:, :, 2] << 4) | (L[:, :, 3] << 6)
    return packed.reshape(L.shape[0], 64)


def _unpack_2bit(qs: np.ndarray) -> np.ndarray:
    """Inverse of _pack_2bit: (nb, 64) bytes -> (nb, 256) values 0..3."""
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    return ((qs.reshape(-1, 2, 1, 32) >> shifts) & 3).reshape(-1, QK_K)


def _pack_k4_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K: eight 6-bit scales and eight 6-bit mins into 12 bytes (ggml's layout)."""
    ls = ls.astype(np.uint8)
    lm = lm.astype(np.uint8)
    out = np.zeros((ls.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    out[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    return out


def _unpack_k4_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of _pack_k4_scales (ggml's get_scale_min_k4 for all eight j at once)."""
    a, b, c = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    sc = np.concatenate([a & 63, (c & 0xF) | ((a >> 6) << 4)], axis=1)
    mn = np.concatenate([b & 63, (c >> 4) | ((b >> 6) << 4)], axis=1)
    return sc, mn


def _pack_q3_scales(l6: np.ndarray) -> np.ndarray:
    """Q3_K: sixteen 6-bit scales (already offset by 32) into 12 bytes."""
    l6 = l6.astype(np.uint8)
    out = np.zeros((l6.shape[0], 12), dtype=np.uint8)
    out[:, 0:8] = (l6[:, 0:8] & 0xF) | ((l6[:, 8:16] & 0xF) << 4)
    hi = l6 >> 4
    out[:, 8:12] = hi[:, 0:4] | (hi[:, 4:8] << 2) | (hi[:, 8:12] << 4) | (hi[:, 12:16] << 6)
    return out


def _unpack_q3_scales(packed: np.ndarray) -> np.ndarray:
    """Inverse of _pack_q3_scales: (nb, 12) -> (nb, 16) signed scales in -32..31."""
    low = np.concatenate([packed[:, 0:8] & 0xF, packed[:, 0:8] >> 4], axis=1)
    hi = (packed[:, 8:12][:, None, :] >> (2 * np.arange(4, dtype=np.uint8))[None, :, None]) & 3
    return (low | (hi.reshape(-1, 16) << 4)).astype(np.int8) - np.int8(32)


# ----------------------------------------------------------------------------------------------------------------------
# Dequantize: (nb,) blocks -> (nb, block_size) float32, the operations of gguf-py / ggml's dequantize_row_*.
# ----------------------------------------------------------------------------------------------------------------------

def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(nb, 16) bytes -> (nb, 32): low nibbles are elements 0..15, high nibbles 16..31."""
    return np.concatenate([qs & 0xF, qs >> 4], axis=1)


def _qh_bits(qh: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1: (nb, 4) bytes -> (nb, 32) fifth bits, bit i of the little-endian uint32 for element i."""
    return np.unpackbits(qh, axis=1, bitorder="little")


def _deq_q8_0(b):
    return b["qs"].astype(_F32) * b["d"].astype(_F32)[:, None]


def _deq_q4_0(b):
    q = (_nibbles(b["qs"]).astype(np.int8) - np.int8(8)).astype(_F32)
    return b["d"].astype(_F32)[:, None] * q


def _deq_q4_1(b):
    q = _nibbles(b["qs"]).astype(_F32)
    return b["d"].astype(_F32)[:, None] * q + b["m"].astype(_F32)[:, None]


def _deq_q5_0(b):
    q = ((_nibbles(b["qs"]) | (_qh_bits(b["qh"]) << 4)).astype(np.int8) - np.int8(16)).astype(_F32)
    return b["d"].astype(_F32)[:, None] * q


def _deq_q5_1(b):
    q = (_nibbles(b["qs"]) | (_qh_bits(b["qh"]) << 4)).astype(_F32)
    return b["d"].astype(_F32)[:, None] * q + b["m"].astype(_F32)[:, None]


def _deq_q2_k(b):
    nb = b.shape[0]
    sc = b["scales"]
    dl = (b["d"].astype(_F32)[:, None] * (sc & 0xF).astype(_F32))[:, :, None]
    ml = (b["dmin"].astype(_F32)[:, None] * (sc >> 4).astype(_F32))[:, :, None]
    q = _unpack_2bit(b["qs"]).reshape(nb, 16, 16).astype(_F32)
    return (dl * q - ml).reshape(nb, QK_K)


def _deq_q3_k(b):
    nb = b.shape[0]
    dl = (b["d"].astype(_F32)[:, None] * _unpack_q3_scales(b["scales"]).astype(_F32))[:, :, None]
    low = _unpack_2bit(b["qs"]).astype(np.int8)
    # hmask bit k of byte l is element 32k + l; a clear bit means "subtract 4"
    high = np.unpackbits(b["hmask"], axis=1, bitorder="little").reshape(nb, 32, 8).transpose(0, 2, 1)
    q = (low - ((high.reshape(nb, QK_K) ^ 1) << 2).astype(np.int8)).astype(_F32)
    return (dl * q.reshape(nb, 16, 16)).reshape(nb, QK_K)


def _deq_q4_k(b):
    nb = b.shape[0]
    sc, mn = _unpack_k4_scales(b["scales"])
    d = (b["d"].astype(_F32)[:, None] * sc.astype(_F32))[:, :, None]
    dm = (b["dmin"].astype(_F32)[:, None] * mn.astype(_F32))[:, :, None]
    qs = b["qs"].reshape(nb, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    q = (qs & 0xF).reshape(nb, 8, 32).astype(_F32)
    return (d * q - dm).reshape(nb, QK_K)


def _deq_q5_k(b):
    nb = b.shape[0]
    sc, mn = _unpack_k4_scales(b["scales"])
    d = (b["d"].astype(_F32)[:, None] * sc.astype(_F32))[:, :, None]
    dm = (b["dmin"].astype(_F32)[:, None] * mn.astype(_F32))[:, :, None]
    ql = (b["qs"].reshape(nb, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & 0xF
    # qh bit k of byte l belongs to element 32k + l
    qh = np.unpackbits(b["qh"], axis=1, bitorder="little").reshape(nb, 32, 8).transpose(0, 2, 1)
    q = (ql.reshape(nb, 8, 32) | (qh << 4)).astype(_F32)
    return (d * q - dm).reshape(nb, QK_K)


def _deq_q6_k(b):
    nb = b.shape[0]
    d = (b["d"].astype(_F32)[:, None] * b["scales"].astype(_F32))[:, :, None]
    ql = (b["ql"].reshape(nb, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & 0xF
    qh = (b["qh"].reshape(nb, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 3
    q = (ql.reshape(nb, 8, 32) | (qh.reshape(nb, 8, 32) << 4)).astype(np.int8) - np.int8(32)
    return (d * q.reshape(nb, 16, 16).astype(_F32)).reshape(nb, QK_K)


# ----------------------------------------------------------------------------------------------------------------------
# Dequantize, the IQ formats: ggml's dequantize_row_iq* (ggml/src/ggml-quants.c), the same float32 products in the
# same order. The lattice tables are quant/iq_grids.py.
# ----------------------------------------------------------------------------------------------------------------------

_SIGN_BITS = np.arange(8, dtype=np.uint8)


def _signs8(masks: np.ndarray) -> np.ndarray:
    """(...) uint8 sign masks -> (..., 8) float32 +-1: bit j set makes element j negative."""
    return np.where((masks[..., None] >> _SIGN_BITS) & 1, _F32(-1), _F32(1))


def _u32(a: np.ndarray) -> np.ndarray:
    """A (nb, 4k) uint8 / (nb, 2k) uint16 field read as (nb, k) little-endian uint32."""
    return np.ascontiguousarray(a).view("<u4")


def _iq2_db(d: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """IQ2_XS/IQ2_S: d * (0.5 + nibble) * 0.25 per 16 values, (nb, 8 sub-blocks, 2): low nibble first."""
    nib = np.stack([scales & 0xF, scales >> 4], axis=-1).astype(_F32)
    return d[:, None, None] * (_F32(0.5) + nib) * _F32(0.25)


def _deq_iq4_nl(b):
    return b["d"].astype(_F32)[:, None] * _iq.KVALUES_IQ4NL[_nibbles(b["qs"])].astype(_F32)


def _deq_iq4_xs(b):
    nb = b.shape[0]
    ib = np.arange(QK_K // 32)
    low = (b["scales_l"][:, ib // 2].astype(np.int32) >> (4 * (ib % 2))) & 0xF
    high = (b["scales_h"].astype(np.int32)[:, None] >> (2 * ib)) & 3
    dl = b["d"].astype(_F32)[:, None] * ((low | (high << 4)) - 32).astype(_F32)
    q = _nibbles(b["qs"].reshape(nb * 8, 16)).reshape(nb, 8, 32)
    return (dl[:, :, None] * _iq.KVALUES_IQ4NL[q].astype(_F32)).reshape(nb, QK_K)


def _deq_iq2_xxs(b):
    nb = b.shape[0]
    aux = _u32(b["qs"]).reshape(nb, 8, 2)  # per 32 values: 4 grid indices (bytes), then 4 x 7 sign bits + scale
    idx = np.ascontiguousarray(aux[:, :, 0]).view(np.uint8).reshape(nb, 8, 4)
    db = b["d"].astype(_F32)[:, None] * (_F32(0.5) + (aux[:, :, 1] >> 28).astype(_F32)) * _F32(0.25)
    signs = _iq.KSIGNS[(aux[:, :, 1, None] >> (7 * np.arange(4, dtype=np.uint32))) & 127]
    grid = _iq.IQ2XXS_GRID[idx].astype(_F32)
    return (db[:, :, None, None] * grid * _signs8(signs)).reshape(nb, QK_K)


def _deq_iq2_xs(b):
    nb = b.shape[0]
    qs = b["qs"].reshape(nb, 8, 2, 2)  # (sub-block, scale half, pair)
    db = _iq2_db(b["d"].astype(_F32), b["scales"])
    grid = _iq.IQ2XS_GRID[qs & 511].astype(_F32)
    return (db[..., None, None] * grid * _signs8(_iq.KSIGNS[qs >> 9])).reshape(nb, QK_K)


def _deq_iq2_s(b):
    nb = b.shape[0]
    low = b["qs"][:, :QK_K // 8].reshape(nb, 8, 4).astype(np.int32)
    high = (b["qh"].astype(np.int32)[:, :, None] >> (2 * np.arange(4))) & 3
    idx = (low | (high << 8)).reshape(nb, 8, 2, 2)
    signs = b["qs"][:, QK_K // 8:].reshape(nb, 8, 2, 2)
    db = _iq2_db(b["d"].astype(_F32), b["scales"])
    grid = _iq.IQ2S_GRID[idx].astype(_F32)
    return (db[..., None, None] * grid * _signs8(signs)).reshape(nb, QK_K)


def _deq_iq3_xxs(b):
    nb = b.shape[0]
    idx = b["qs"][:, :QK_K // 4].reshape(nb, 8, 4, 2)  # 2 grid entries of 4 values per 8 values
    aux = _u32(b["qs"][:, QK_K // 4:])  # (nb, 8): 4 x 7 sign bits, scale in the top 4
    db = b["d"].astype(_F32)[:, None] * (_F32(0.5) + (aux >> 28).astype(_F32)) * _F32(0.5)
    signs = _iq.KSIGNS[(aux[:, :, None] >> (7 * np.arange(4, dtype=np.uint32))) & 127]
    grid = _iq.IQ3XXS_GRID[idx].astype(_F32).reshape(nb, 8, 4, 8)
    return (db[:, :, None, None] * grid * _signs8(signs)).reshape(nb, QK_K)


def _deq_iq3_s(b):
    nb = b.shape[0]
    high = np.unpackbits(b["qh"], axis=1, bitorder="little").astype(np.int32)  # 9th bit of grid index k
    idx = b["qs"].astype(np.int32) | (high << 8)
    grid = _iq.IQ3S_GRID[idx].astype(_F32).reshape(nb, 8, 32)
    ib = np.arange(QK_K // 32)
    sc = (b["scales"][:, ib // 2].astype(np.int32) >> (4 * (ib % 2))) & 0xF
    db = b["d"].astype(_F32)[:, None] * (1 + 2 * sc).astype(_F32)
    signs = _signs8(b["signs"]).reshape(nb, 8, 32)
    return (db[:, :, None] * grid * signs).reshape(nb, QK_K)


def _deq_iq1_s(b):
    nb = b.shape[0]
    qh = b["qh"].astype(np.int32)  # (nb, 8): 4 x 3 index bits, 3 scale bits, the delta's sign
    dl = b["d"].astype(_F32)[:, None] * (2 * ((qh >> 12) & 7) + 1).astype(_F32)
    delta = np.where(qh & 0x8000, -_iq.IQ1S_DELTA, _iq.IQ1S_DELTA)
    idx = b["qs"].reshape(nb, 8, 4).astype(np.int32) | (((qh[:, :, None] >> (3 * np.arange(4))) & 7) << 8)
    grid = _iq.IQ1S_GRID[idx].astype(_F32)
    return (dl[:, :, None, None] * (grid + delta[:, :, None, None])).reshape(nb, QK_K)


def _deq_iq1_m(b):
    nb = b.shape[0]
    sc = np.ascontiguousarray(b["scales"]).view("<u2").astype(np.int32)  # (nb, 4)
    bits = (sc[:, 0] >> 12) | ((sc[:, 1] >> 8) & 0xF0) | ((sc[:, 2] >> 4) & 0xF00) | (sc[:, 3] & 0xF000)
    d = bits.astype(np.uint16).view(np.float16).astype(_F32)  # the f16 scale, spread over the top nibbles
    ib = np.arange(QK_K // 32)
    shift = (6 * (ib % 2))[:, None] + np.array([0, 3])  # (8, 2): two 3-bit scales per 32 values
    s = (sc[:, ib // 2, None] >> shift) & 7
    dl = d[:, None, None] * (2 * s + 1).astype(_F32)  # (nb, 8, 2)
    qh = (b["qh"].reshape(nb, 8, 2, 1).astype(np.int32) >> np.array([0, 4])).reshape(nb, 8, 4)
    idx = b["qs"].reshape(nb, 8, 4).astype(np.int32) | ((qh & 7) << 8)
    delta = np.where(qh & 8, -_iq.IQ1S_DELTA, _iq.IQ1S_DELTA)
    grid = _iq.IQ1S_GRID[idx].astype(_F32)
    return (np.repeat(dl, 2, axis=2)[..., None] * (grid + delta[..., None])).reshape(nb, QK_K)


_DEQUANTIZERS = {
    QType.Q8_0: _deq_q8_0, QType.Q4_0: _deq_q4_0, QType.Q4_1: _deq_q4_1, QType.Q5_0: _deq_q5_0,
    QType.Q5_1: _deq_q5_1, QType.Q2_K: _deq_q2_k, QType.Q3_K: _deq_q3_k, QType.Q4_K: _deq_q4_k,
    QType.Q5_K: _deq_q5_k, QType.Q6_K: _deq_q6_k,
    QType.IQ4_NL: _deq_iq4_nl, QType.IQ4_XS: _deq_iq4_xs, QType.IQ2_XXS: _deq_iq2_xxs, QType.IQ2_XS: _deq_iq2_xs,
    QType.IQ2_S: _deq_iq2_s, QType.IQ3_XXS: _deq_iq3_xxs, QType.IQ3_S: _deq_iq3_s, QType.IQ1_S: _deq_iq1_s,
    QType.IQ1_M: _deq_iq1_m,
}


def dequantize(qtype: QType, data: np.ndarray) -> np.ndarray:
    """Decode raw bytes shaped (..., row_bytes) into float32 shaped (..., cols)."""
    qtype = _check_type(qtype)
    data = np.ascontiguousarray(data, dtype=np.uint8)
    bs, ts = _GGML_BLOCK[qtype]
    if data.ndim == 0 or data.shape[-1] % ts:
        raise ValueError(f"{qtype.name} data needs a last axis that is a multiple of {ts} bytes, got shape {data.shape}")
    lead = data.shape[:-1]
    cols = data.shape[-1] // ts * bs
    if qtype == QType.F32:
        return data.view(np.float32).copy()
    if qtype == QType.F16:
        return data.view(np.float16).astype(np.float32)
    if qtype == QType.BF16:
        return (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    blocks = data.reshape(-1, ts).view(BLOCK_DTYPES[qtype]).reshape(-1)
    return _DEQUANTIZERS[qtype](blocks).reshape(*lead, cols)


# ----------------------------------------------------------------------------------------------------------------------
# Quantize, the 32-element formats: ggml's quantize_row_{q8_0,q4_0,q4_1,q5_0,q5_1}_ref. x is (nb, 32) float32.
# ----------------------------------------------------------------------------------------------------------------------

def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    q = q.astype(np.uint8)
    return (q[:, :16] & 0xF) | ((q[:, 16:] & 0xF) << 4)


def _pack_qh(q: np.ndarray) -> np.ndarray:
    return np.packbits((q.astype(np.uint8) >> 4) & 1, axis=1, bitorder="little")


def _q_q8_0(x, out):
    d = np.abs(x).max(axis=1) / _F32(127)
    out["d"] = d
    out["qs"] = _roundf(x * _recip_or_zero(d)[:, None]).astype(np.int8)


def _q_q4_0(x, out):
    _, mx = _first_absmax(x)
    d = mx / _F32(-8)
    q = np.minimum(15, np.trunc(x * _recip_or_zero(d)[:, None] + _F32(8.5)).astype(np.int8))
    out["d"] = d
    out["qs"] = _pack_nibbles(q)


def _q_q4_1(x, out):
    mn, mx = _first_min_max(x)
    d = (mx - mn) / _F32(15)
    q = np.minimum(15, np.trunc((x - mn[:, None]) * _recip_or_zero(d)[:, None] + _F32(0.5)).astype(np.int8))
    out["d"] = d
    out["m"] = mn
    out["qs"] = _pack_nibbles(q)


def _q_q5_0(x, out):
    _, mx = _first_absmax(x)
    d = mx / _F32(-16)
    q = np.minimum(31, np.trunc(x * _recip_or_zero(d)[:, None] + _F32(16.5)).astype(np.int8))
    out["d"] = d
    out["qh"] = _pack_qh(q)
    out["qs"] = _pack_nibbles(q)


def _q_q5_1(x, out):
    mn, mx = _first_min_max(x)
    d = (mx - mn) / _F32(31)
    # no clamp here, as in ggml: the value cannot reach 32
    q = np.trunc((x - mn[:, None]) * _recip_or_zero(d)[:, None] + _F32(0.5)).astype(np.uint8)
    out["d"] = d
    out["m"] = mn
    out["qh"] = _pack_qh(q)
    out["qs"] = _pack_nibbles(q)


# ----------------------------------------------------------------------------------------------------------------------
# Quantize, K formats: the searches of ggml's make_qkx2_quants / make_q3_quants / make_qx_quants, run for all
# sub-blocks at once. x is (n_sub, n) float32; results are per sub-block.
# ----------------------------------------------------------------------------------------------------------------------

def _make_qkx2_quants(x, w, nmax, rmin, rdelta, nstep, use_mad):
    """Asymmetric scale+min fit (weights w) by a grid search over the scale; returns (scale, the_min, L uint8)."""
    n = x.shape[1]
    xmin, xmax = _first_min_max(x)
    sum_w = w[:, 0].copy()
    sum_x = sum_w * x[:, 0]
    for i in range(1, n):
        sum_w += w[:, i]
        sum_x += w[:, i] * x[:, i]
    xmin = np.where(xmin > 0, _F32(0), xmin)
    flat = xmax == xmin
    span = np.where(flat, _F32(1), xmax - xmin)  # flat rows are answered at the end

    def error_of(scale, mn, L):
        diff = scale[:, None] * L.astype(_F32) + mn[:, None] - x
        return _seq_sum(w * (np.abs(diff) if use_mad else diff * diff))

    iscale = _F32(nmax) / span
    scale = _F32(1) / iscale
    L = np.clip(_nearest_int(iscale[:, None] * (x - xmin[:, None])), 0, nmax)
    best_error = error_of(scale, xmin, L)
    mn = xmin.copy()
    with np.errstate(divide="ignore", invalid="ignore"):
        for step in range(nstep + 1):
            # ggml measures the span from the best min found so far, not from the data's min
            span = np.where(flat, _F32(1), xmax - mn)
            iscale = (_F32(rmin) + _F32(rdelta) * _F32(step) + _F32(nmax)) / span
            Laux = np.clip(_nearest_int(iscale[:, None] * (x - mn[:, None])), 0, nmax)
            lf = Laux.astype(_F32)
            sum_l = _seq_sum(w * lf)
            sum_l2 = _seq_sum(w * lf * lf)
            sum_xl = _seq_sum(w * lf * x)
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            clamp = this_min > 0
            this_min = np.where(clamp, _F32(0), this_min)
            this_scale = np.where(clamp, sum_xl / sum_l2, this_scale)
            cur_error = error_of(this_scale, this_min, Laux)
            better = (D > 0) & (cur_error < best_error)
            L = np.where(better[:, None], Laux, L)
            best_error = np.where(better, cur_error, best_error)
            scale = np.where(better, this_scale, scale)
            mn = np.where(better, this_min, mn)
    L = np.where(flat[:, None], 0, L)
    scale = np.where(flat, _F32(0), scale)
    mn = np.where(flat, xmin, mn)
    return scale.astype(_F32), (-mn).astype(_F32), L.astype(np.uint8)


def _make_q3_quants(x, nmax):
    """Symmetric fit weighted by x**2, refined one element at a time (ggml's make_q3_quants with do_rmse).
    Returns (scale, L int8 offset by nmax)."""
    n = x.shape[1]
    amax, mx = _first_absmax(x)
    zero = amax < _F32(1e-15)
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = _F32(-nmax) / np.where(zero, _F32(1), mx)
        L = np.clip(_nearest_int(iscale[:, None] * x), -nmax, nmax - 1)
        w = x * x
        lf = L.astype(_F32)
        sumlx = _seq_sum(w * x * lf)
        suml2 = _seq_sum(w * lf * lf)
        # ggml stops after a pass that changed nothing; such a pass leaves the state as it was, so the
        # remaining passes would change nothing either, and running all five gives the same result.
        for _ in range(5):
            for i in range(n):
                wi, xi, li = w[:, i], x[:, i], L[:, i].astype(_F32)
                slx = sumlx - wi * xi * li
                sl2 = suml2 - wi * li * li
                new_l = np.clip(_nearest_int(xi * sl2 / slx), -nmax, nmax - 1)
                nl = new_l.astype(_F32)
                slx_new = slx + wi * xi * nl
                sl2_new = sl2 + wi * nl * nl
                accept = ((slx > 0) & (new_l != L[:, i]) & (sl2_new > 0)
                          & (slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new))
                L[:, i] = np.where(accept, new_l, L[:, i])
                sumlx = np.where(accept, slx_new, sumlx)
                suml2 = np.where(accept, sl2_new, suml2)
        scale = np.where(suml2 > 0, sumlx / suml2, _F32(0))
    L = np.where(zero[:, None], 0, L + nmax)
    scale = np.where(zero, _F32(0), scale)
    return scale.astype(_F32), L.astype(np.int8)


def _make_qx_quants(x, nmax):
    """Symmetric fit weighted by x**2, grid search over 18 scales around nmax/max (ggml's make_qx_quants,
    rmse_type 1, no importance weights). Returns (scale, L int8 offset by nmax)."""
    amax, mx = _first_absmax(x)
    zero = amax < _F32(1e-15)
    mx = np.where(zero, _F32(1), mx)
    w = x * x

    def fit(iscale):
        l = np.clip(_nearest_int(iscale[:, None] * x), -nmax, nmax - 1)
        lf = l.astype(_F32)
        return l, _seq_sum(w * x * lf), _seq_sum(w * lf * lf)

    with np.errstate(divide="ignore", invalid="ignore"):
        l, sumlx, suml2 = fit(_F32(-nmax) / mx)
        L = l + nmax
        scale = np.where(suml2 != 0, sumlx / suml2, _F32(0))
        best = scale * sumlx
        for step in range(-9, 10):
            if step == 0:
                continue
            l, sumlx, suml2 = fit(-(_F32(nmax) + _F32(0.1) * _F32(step)) / mx)
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            L = np.where(better[:, None], l + nmax, L)
            scale = np.where(better, sumlx / suml2, scale)
            best = np.where(better, scale * sumlx, best)
    L = np.where(zero[:, None], 0, L)
    scale = np.where(zero, _F32(0), scale)
    return scale.astype(_F32), L.astype(np.int8)


def _q_q2_k(x, out):
    nb = x.shape[0]
    xs = x.reshape(nb * 16, 16)
    scales, mins, L = _make_qkx2_quants(xs, np.abs(xs), 3, -0.5, 0.1, 15, use_mad=True)
    scales, mins, L = scales.reshape(nb, 16), mins.reshape(nb, 16), L.reshape(nb, QK_K).astype(np.int32)
    max_scale = np.maximum(scales.max(axis=1), _F32(0))
    max_min = np.maximum(mins.max(axis=1), _F32(0))
    with np.errstate(divide="ignore", invalid="ignore"):
        ls = np.where((max_scale > 0)[:, None], _nearest_int((_F32(15) / max_scale)[:, None] * scales), 0)
        lm = np.where((max_min > 0)[:, None], _nearest_int((_F32(15) / max_min)[:, None] * mins), 0)
    packed = ((ls & 0xFF) | (lm << 4)) & 0xFF
    d = np.where(max_scale > 0, max_scale / _F32(15), _F32(0)).astype(np.float16)
    dmin = np.where(max_min > 0, max_min / _F32(15), _F32(0)).astype(np.float16)

    dd = (d.astype(_F32)[:, None] * (packed & 0xF).astype(_F32))
    dm = (dmin.astype(_F32)[:, None] * (packed >> 4).astype(_F32))
    dd_e, dm_e = np.repeat(dd, 16, axis=1), np.repeat(dm, 16, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(_nearest_int((x + dm_e) / dd_e), 0, 3)
    L = np.where(dd_e != 0, requant, L)

    out["scales"] = packed
    out["qs"] = _pack_2bit(L)
    out["d"] = d
    out["dmin"] = dmin


def _q_q3_k(x, out):
    nb = x.shape[0]
    scales, L = _make_q3_quants(x.reshape(nb * 16, 16), 4)
    scales, L = scales.reshape(nb, 16), L.reshape(nb, QK_K).astype(np.int32)
    _, max_scale = _first_absmax(scales)
    has = max_scale != 0
    with np.errstate(divide="ignore"):
        iscale = np.where(has, _F32(-32) / np.where(has, max_scale, _F32(1)), _F32(0))
    l6 = np.clip(((_nearest_int(iscale[:, None] * scales) + 128) & 0xFF) - 128, -32, 31) + 32  # via int8_t
    packed = np.where(has[:, None], _pack_q3_scales(l6), 0).astype(np.uint8)
    with np.errstate(divide="ignore"):
        d = np.where(has, _F32(1) / np.where(has, iscale, _F32(1)), _F32(0)).astype(np.float16)

    dd = np.repeat(d.astype(_F32)[:, None] * _unpack_q3_scales(packed).astype(_F32), 16, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(_nearest_int(x / dd), -4, 3) + 4
    L = np.where(dd != 0, requant, L)

    high = L > 3
    L = np.where(high, L - 4, L)
    # element 32k + l sets bit k of hmask byte l
    out["hmask"] = np.packbits(high.reshape(nb, 8, 32).transpose(0, 2, 1), axis=2, bitorder="little")[:, :, 0]
    out["qs"] = _pack_2bit(L)
    out["scales"] = packed
    out["d"] = d


def _q_k4_common(x, nmax, rmin, rdelta, nstep):
    """Q4_K and Q5_K share everything but the quant width and the search grid. Returns (d, dmin, scales, L)."""
    nb = x.shape[0]
    xs = x.reshape(nb * 8, 32)
    av_x = np.sqrt(_seq_sum(xs * xs) / _F32(32))
    w = av_x[:, None] + np.abs(xs)
    scales, mins, L = _make_qkx2_quants(xs, w, nmax, rmin, rdelta, nstep, use_mad=False)
    scales, mins, L = scales.reshape(nb, 8), mins.reshape(nb, 8), L.reshape(nb, QK_K).astype(np.int32)
    max_scale = np.maximum(scales.max(axis=1), _F32(0))
    max_min = np.maximum(mins.max(axis=1), _F32(0))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, _F32(63) / max_scale, _F32(0))
        inv_min = np.where(max_min > 0, _F32(63) / max_min, _F32(0))
    ls = np.minimum(63, _nearest_int(inv_scale[:, None] * scales) & 0xFF)  # via uint8_t
    lm = np.minimum(63, _nearest_int(inv_min[:, None] * mins) & 0xFF)
    d = (max_scale / _F32(63)).astype(np.float16)
    dmin = (max_min / _F32(63)).astype(np.float16)

    dd = np.repeat(d.astype(_F32)[:, None] * ls.astype(_F32), 32, axis=1)
    dm = np.repeat(dmin.astype(_F32)[:, None] * lm.astype(_F32), 32, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(_nearest_int((x + dm) / dd), 0, nmax)
    L = np.where(dd != 0, requant, L)
    return d, dmin, _pack_k4_scales(ls, lm), L


def _q_q4_k(x, out):
    d, dmin, packed, L = _q_k4_common(x, 15, -1.0, 0.1, 20)
    L = L.reshape(-1, 4, 2, 32).astype(np.uint8)
    out["d"], out["dmin"], out["scales"] = d, dmin, packed
    out["qs"] = (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(-1, 128)


def _q_q5_k(x, out):
    d, dmin, packed, L = _q_k4_common(x, 31, -0.5, 0.1, 15)
    L = L.reshape(-1, 4, 2, 32).astype(np.uint8)
    out["d"], out["dmin"], out["scales"] = d, dmin, packed
    out["qs"] = ((L[:, :, 0] & 0xF) | ((L[:, :, 1] & 0xF) << 4)).reshape(-1, 128)
    # element 64k + l sets bit 2k of qh byte l, element 64k + 32 + l sets bit 2k + 1
    high = (L >> 4).reshape(-1, 8, 32).transpose(0, 2, 1)
    out["qh"] = np.packbits(high, axis=2, bitorder="little")[:, :, 0]


def _q_q6_k(x, out):
    nb = x.shape[0]
    scales, L = _make_qx_quants(x.reshape(nb * 16, 16), 32)
    scales, L = scales.reshape(nb, 16), L.reshape(nb, QK_K).astype(np.int32)
    amax, max_scale = _first_absmax(scales)
    zero = amax < _F32(1e-15)
    with np.errstate(divide="ignore"):
        iscale = _F32(-128) / np.where(zero, _F32(1), max_scale)
    d = (_F32(1) / iscale).astype(np.float16)
    sc = ((np.minimum(127, _nearest_int(iscale[:, None] * scales)) + 128) & 0xFF) - 128  # via int8_t

    dd = np.repeat(d.astype(_F32)[:, None] * sc.astype(_F32), 16, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(_nearest_int(x / dd), -32, 31) + 32
    L = np.where(dd != 0, requant, L).astype(np.uint8).reshape(nb, 2, 4, 32)
    ql = np.concatenate([(L[:, :, 0] & 0xF) | ((L[:, :, 2] & 0xF) << 4),
                         (L[:, :, 1] & 0xF) | ((L[:, :, 3] & 0xF) << 4)], axis=2)
    qh = (L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4) | ((L[:, :, 3] >> 4) << 6)

    out["ql"] = np.where(zero[:, None], 0, ql.reshape(nb, 128))
    out["qh"] = np.where(zero[:, None], 0, qh.reshape(nb, 64))
    out["scales"] = np.where(zero[:, None], 0, sc).astype(np.int8)
    out["d"] = np.where(zero, np.float16(0), d)


_QUANTIZERS = {
    QType.Q8_0: _q_q8_0, QType.Q4_0: _q_q4_0, QType.Q4_1: _q_q4_1, QType.Q5_0: _q_q5_0, QType.Q5_1: _q_q5_1,
    QType.Q2_K: _q_q2_k, QType.Q3_K: _q_q3_k, QType.Q4_K: _q_q4_k, QType.Q5_K: _q_q5_k, QType.Q6_K: _q_q6_k,
}


def _to_bf16(x: np.ndarray) -> np.ndarray:
    """ggml_compute_fp32_to_bf16: round to nearest even, NaN kept quiet."""
    u = x.view(np.uint32).astype(np.uint64)
    rounded = (u + (0x7FFF + ((u >> 16) & 1))) >> 16
    quiet_nan = (u >> 16) | 64
    return np.where((u & 0x7FFFFFFF) > 0x7F800000, quiet_nan, rounded).astype(np.uint16)


def quantize(qtype: QType, x: np.ndarray) -> np.ndarray:
    """Encode float values shaped (..., cols) into raw bytes shaped (..., row_bytes), as ggml's reference does."""
    qtype = _check_type(qtype, encode=True)
    x = np.asarray(x)
    if x.ndim == 0 or not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"quantize needs a float array with at least one axis, got {x.dtype} with shape {x.shape}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    nbytes = row_bytes(qtype, x.shape[-1])
    lead = x.shape[:-1]
    if qtype == QType.F32:
        return x.view(np.uint8).reshape(*lead, nbytes).copy()
    if qtype == QType.F16:
        return x.astype(np.float16).view(np.uint8).reshape(*lead, nbytes)
    if qtype == QType.BF16:
        return _to_bf16(x).view(np.uint8).reshape(*lead, nbytes)
    if not np.isfinite(x).all():
        raise ValueError(f"cannot quantize to {qtype.name}: the input holds NaN or infinite values")
    blocks = x.reshape(-1, _GGML_BLOCK[qtype][0])
    out = np.zeros(blocks.shape[0], dtype=BLOCK_DTYPES[qtype])
    if blocks.shape[0]:
        _QUANTIZERS[qtype](blocks, out)
    return out.view(np.uint8).reshape(*lead, nbytes)

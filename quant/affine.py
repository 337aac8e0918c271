"""MLX's affine quantization in numpy: the format, its bit packing, a reference quantizer, and exact transcodes to
and from ggml blocks.

MLX's affine format quantizes each group of `group_size` consecutive elements along a row as
    w = scale * q + bias,   q an unsigned `bits`-bit integer,
stored as three tensors per matrix: `packed` (uint32 words holding q as a little-endian bit stream, element 0 in the
lowest bits), `scales` and `biases` (one per group, float16 / bfloat16 / float32).

- `AffineTensor` holds one matrix (or expert stack) as triplet arrays, usually views of a memory map.
- `affine_from_ggml` maps ggml blocks onto affine groups of 32 exactly where the formats coincide (Q4_0: scale d,
  bias -8d; Q4_1: d, m; Q8_0: d, -128d; Q5_0, Q5_1; Q4_K and Q5_K from their 32-element sub-blocks).
- `ggml_from_affine` goes the other way: 4- and 5-bit groups become Q4_1 / Q5_1 blocks with the same scale and bias
  (a group of 64 or 128 is two or four such blocks), exactly. Other widths have no ggml twin; they are dequantized
  to F32 with a one-line notice.

Numpy only, so machines without MLX read and write the format too (engine/sources/mlx.py, engine/backends/mlx/).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from . import formats
from .tensor import QStack, QTensor, QType, matrices

__all__ = [
    "BITS",
    "EXACT_BITS",
    "EXACT_GGML",
    "GROUP_SIZES",
    "REQUANT",
    "AffineTensor",
    "affine_from_ggml",
    "ggml_from_affine",
    "pack_bits",
    "quantize_affine",
    "unpack_bits",
]

log = logging.getLogger("mixlocal.mlx")

GROUP_SIZES = (32, 64, 128)        # what mx.quantize accepts
BITS = (2, 3, 4, 5, 6, 8)
_SCALE_DTYPES = {"F16": np.float16, "BF16": np.uint16, "F32": np.float32}  # bf16 kept as raw uint16
_CHUNK_ELEMENTS = 1 << 22          # rows are converted in pieces of about this many elements (16 MiB of float32)


# ----------------------------------------------------------------------------------------------------------------------
# The affine tensor and its bit packing
# ----------------------------------------------------------------------------------------------------------------------

def _bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.uint32) << 16).view(np.float32)


def pack_bits(q: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned ints (..., cols) of `bits` bits each -> uint32 words (..., cols * bits / 32), MLX's layout: one
    little-endian bit stream per row, element 0 in the lowest bits of word 0."""
    if (q.shape[-1] * bits) % 32:
        raise ValueError(f"{q.shape[-1]} elements of {bits} bits do not fill whole 32-bit words")
    lead = q.shape[:-1]
    if bits in (2, 4, 8):  # whole elements per byte: shift-or is much cheaper than a bit stream
        per = 8 // bits
        q8 = q.astype(np.uint8).reshape(*lead, -1, per)
        by = np.zeros(q8.shape[:-1], dtype=np.uint8)
        for i in range(per):
            by |= q8[..., i] << np.uint8(i * bits)
    else:
        stream = (q.astype(np.uint8)[..., None] >> np.arange(bits, dtype=np.uint8)) & 1
        by = np.packbits(stream.reshape(*lead, -1), axis=-1, bitorder="little")
    return np.ascontiguousarray(by).view(np.uint32).reshape(*lead, -1)


def unpack_bits(words: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of pack_bits: uint32 (..., n) -> uint8 (..., n * 32 / bits)."""
    lead = words.shape[:-1]
    by = np.ascontiguousarray(words).view(np.uint8)
    if bits in (2, 4, 8):
        per = 8 // bits
        shifts = (np.arange(per, dtype=np.uint8) * bits)
        return ((by[..., None] >> shifts) & np.uint8((1 << bits) - 1)).reshape(*lead, -1)
    stream = np.unpackbits(by, axis=-1, bitorder="little").reshape(*lead, -1, bits)
    return (stream << np.arange(bits, dtype=np.uint8)).sum(axis=-1, dtype=np.uint8)


@dataclass(frozen=True)
class AffineTensor:
    """One matrix (rows, cols) or expert stack (E, rows, cols) in MLX's affine format.

    packed: uint32 (..., rows, cols * bits / 32); scales, biases: (..., rows, cols / group_size) as stored, with
    scale_dtype "F16", "BF16" (raw uint16) or "F32". The arrays are usually views of a memory map.
    """

    shape: tuple[int, ...]
    bits: int
    group_size: int
    packed: np.ndarray
    scales: np.ndarray
    biases: np.ndarray
    scale_dtype: str = "F16"

    def __post_init__(self):
        if self.bits not in BITS or self.group_size not in GROUP_SIZES:
            raise ValueError(f"affine bits {self.bits} / group size {self.group_size} are not MLX's "
                             f"(bits {BITS}, group sizes {GROUP_SIZES})")
        *lead, cols = self.shape
        if cols % self.group_size or (cols * self.bits) % 32:
            raise ValueError(f"affine tensor of shape {self.shape}: {cols} columns do not split into groups of "
                             f"{self.group_size} and whole words of {self.bits}-bit values")
        want = {"packed": (*lead, cols * self.bits // 32), "scales": (*lead, cols // self.group_size),
                "biases": (*lead, cols // self.group_size)}
        for name, shape in want.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ValueError(f"affine {self.bits}-bit group {self.group_size} tensor of shape {self.shape}: "
                                 f"{name} has shape {got}, expected {shape}")
        if self.packed.dtype != np.uint32:
            raise ValueError(f"affine packed weights must be uint32, got {self.packed.dtype}")
        if self.scale_dtype not in _SCALE_DTYPES:
            raise ValueError(f"affine scale dtype {self.scale_dtype!r} is not one of {sorted(_SCALE_DTYPES)}")
        for name in ("scales", "biases"):
            if getattr(self, name).dtype != _SCALE_DTYPES[self.scale_dtype]:
                raise ValueError(f"affine {name} are {getattr(self, name).dtype}, scale_dtype says {self.scale_dtype}")

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales.nbytes + self.biases.nbytes

    def scales_f32(self) -> np.ndarray:
        return _as_f32(self.scales, self.scale_dtype)

    def biases_f32(self) -> np.ndarray:
        return _as_f32(self.biases, self.scale_dtype)

    def expert(self, e: int) -> AffineTensor:
        if len(self.shape) != 3:
            raise ValueError(f"expert() needs a stacked (E, rows, cols) tensor, got shape {self.shape}")
        return AffineTensor(self.shape[1:], self.bits, self.group_size, self.packed[e], self.scales[e],
                            self.biases[e], self.scale_dtype)

    def dequantize(self) -> np.ndarray:
        """float32 in the logical shape: scale * q + bias, the float32 arithmetic of mx.dequantize."""
        q = unpack_bits(self.packed, self.bits).astype(np.float32)
        q = q.reshape(*q.shape[:-1], -1, self.group_size)
        out = self.scales_f32()[..., None] * q + self.biases_f32()[..., None]
        return out.reshape(self.shape)


def _as_f32(a: np.ndarray, scale_dtype: str) -> np.ndarray:
    return _bf16_to_f32(a) if scale_dtype == "BF16" else a.astype(np.float32)


def _narrow(values: np.ndarray, scale_dtype: str) -> np.ndarray | None:
    """float32 -> the storage dtype, or None if some value does not survive the round trip exactly."""
    if scale_dtype == "F32":
        return values.astype(np.float32)
    if scale_dtype == "F16":
        with np.errstate(over="ignore"):
            out = values.astype(np.float16)
        return out if np.array_equal(out.astype(np.float32), values) else None
    raise ValueError(f"cannot narrow to {scale_dtype}")


def quantize_affine(x: np.ndarray, bits: int = 4, group_size: int = 64, scale_dtype: str = "F16") -> AffineTensor:
    """Reference min-max affine quantizer (numpy): per group, scale = (max - min) / (2^bits - 1) and bias = min,
    both rounded to the storage dtype first, then q = round((x - bias) / scale). mx.quantize differs in how it picks
    the endpoints; the stored format is the same."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if bits not in BITS or group_size not in GROUP_SIZES:
        raise ValueError(f"bits must be one of {BITS} and group_size one of {GROUP_SIZES}, got {bits}, {group_size}")
    if x.shape[-1] % group_size:
        raise ValueError(f"{x.shape[-1]} columns are not a multiple of the group size {group_size}")
    if not np.isfinite(x).all():
        raise ValueError("cannot quantize NaN or infinite values")
    store = {"F16": np.float16, "F32": np.float32}[scale_dtype]
    g = x.reshape(*x.shape[:-1], -1, group_size)
    lo, hi = g.min(axis=-1), g.max(axis=-1)
    n_levels = (1 << bits) - 1
    scales = ((hi - lo) / np.float32(n_levels)).astype(store)
    biases = lo.astype(store)
    s32, b32 = scales.astype(np.float32), biases.astype(np.float32)
    q = np.zeros(g.shape, dtype=np.float32)
    np.divide(g - b32[..., None], s32[..., None], out=q, where=s32[..., None] != 0)
    q = np.clip(np.rint(q), 0, n_levels).astype(np.uint8).reshape(x.shape)
    return AffineTensor(tuple(x.shape), bits, group_size, pack_bits(q, bits), scales, biases, scale_dtype)


# ----------------------------------------------------------------------------------------------------------------------
# ggml blocks <-> affine groups
# ----------------------------------------------------------------------------------------------------------------------

# Formats whose decoding is scale * q + bias per 32 elements with q unsigned, and the width of q.
EXACT_BITS = {QType.Q4_0: 4, QType.Q4_1: 4, QType.Q5_0: 5, QType.Q5_1: 5, QType.Q8_0: 8, QType.Q4_K: 4,
              QType.Q5_K: 5}
EXACT_GGML = tuple(EXACT_BITS)
# Formats no MLX affine group expresses, dequantized and requantized: (bits, group size). The K formats with
# 16-element sub-blocks and IQ4_NL / IQ4_XS (16 levels not evenly spaced) keep their size class in groups of 32.
# The lattice formats go one affine width up, in groups of 64: an affine grid of their own width adds 45% (IQ3) or
# more to their RMS error, one bit more adds 4-24% (IQ3_XXS 11%, IQ2_XS 18%) at 1.3-2.2x their bits per weight
# (measured on the default model's expert weights and on Gaussian rows, uniform importance).
REQUANT = {QType.Q2_K: (4, 32), QType.Q3_K: (4, 32), QType.Q6_K: (8, 32), QType.IQ4_NL: (4, 32),
           QType.IQ4_XS: (4, 32), QType.IQ3_XXS: (4, 64), QType.IQ3_S: (4, 64), QType.IQ2_XXS: (3, 64),
           QType.IQ2_XS: (3, 64), QType.IQ2_S: (3, 64), QType.IQ1_S: (3, 64), QType.IQ1_M: (3, 64)}


def _ggml_groups(qtype: QType, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(scale, bias) per 32-element group, as float32 (n_rows, cols / 32), for rows of a format in EXACT_BITS. The
    float32 products are ggml's own (d * sc for K formats), so the affine form reproduces its dequantization
    exactly."""
    n_rows = rows.shape[0]
    blocks = np.ascontiguousarray(rows).reshape(-1).view(formats.block_dtype(qtype))
    f32 = np.float32
    if qtype in (QType.Q4_0, QType.Q5_0, QType.Q8_0):
        offset = {QType.Q4_0: 8, QType.Q5_0: 16, QType.Q8_0: 128}[qtype]
        d = blocks["d"].astype(f32)
        return d.reshape(n_rows, -1), (-f32(offset) * d).reshape(n_rows, -1)
    if qtype in (QType.Q4_1, QType.Q5_1):
        return blocks["d"].astype(f32).reshape(n_rows, -1), blocks["m"].astype(f32).reshape(n_rows, -1)
    if qtype in (QType.Q4_K, QType.Q5_K):
        sc, mn = formats._unpack_k4_scales(blocks["scales"])  # the eight 6-bit sub-block scales and mins
        scale = blocks["d"].astype(f32)[:, None] * sc.astype(f32)
        bias = -(blocks["dmin"].astype(f32)[:, None] * mn.astype(f32))
        return scale.reshape(n_rows, -1), bias.reshape(n_rows, -1)
    raise ValueError(f"{qtype.name} has no exact 32-element affine form")


def affine_from_ggml(t: QTensor | QStack, scale_dtype: str = "F32") -> AffineTensor:
    """A quantized ggml tensor as MLX affine groups of 32, exactly (see EXACT_GGML).

    scale_dtype "F32" is exact for every listed format; "F16" is exact for the 32-element formats, whose scales are
    float16 already, and raises ValueError where a K-format product d * sc does not fit float16."""
    if t.qtype not in EXACT_GGML:
        raise ValueError(f"{t.qtype.name} has no exact MLX affine form (exact: {', '.join(q.name for q in EXACT_GGML)})")
    mats = matrices(t)
    rows, cols = mats[0].shape
    bits = EXACT_BITS[t.qtype]
    packed = np.empty((len(mats), rows, cols * bits // 32), dtype=np.uint32)
    store = {"F16": np.float16, "F32": np.float32}[scale_dtype]
    scales = np.empty((len(mats), rows, cols // 32), dtype=store)
    biases = np.empty_like(scales)
    step = max(1, _CHUNK_ELEMENTS // cols)
    for e, m in enumerate(mats):
        src = m.rows_view()
        for r0 in range(0, rows, step):
            part = src[r0:r0 + step]
            s, b = _ggml_groups(t.qtype, part)
            values = formats.dequantize(t.qtype, part).reshape(part.shape[0], -1, 32)
            q = np.zeros(values.shape, dtype=np.float32)
            np.divide(values - b[..., None], s[..., None], out=q, where=s[..., None] != 0)
            q = np.rint(q)
            if q.min(initial=0) < 0 or q.max(initial=0) >= (1 << bits):
                raise ValueError(f"{t.qtype.name}: recovered levels outside {bits} bits (damaged blocks?)")
            s_st, b_st = _narrow(s, scale_dtype), _narrow(b, scale_dtype)
            if s_st is None or b_st is None:
                raise ValueError(f"{t.qtype.name} scales do not fit {scale_dtype} exactly")
            packed[e, r0:r0 + step] = pack_bits(q.astype(np.uint8).reshape(part.shape[0], cols), bits)
            scales[e, r0:r0 + step], biases[e, r0:r0 + step] = s_st, b_st
    if len(t.shape) == 2:
        packed, scales, biases = packed[0], scales[0], biases[0]
    return AffineTensor(tuple(t.shape), bits, 32, packed, scales, biases, scale_dtype)


def ggml_from_affine(a: AffineTensor, name: str = "tensor") -> QTensor:
    """An affine tensor as a ggml QTensor for the numba backend.

    4- and 5-bit groups become Q4_1 / Q5_1 blocks carrying the same scale and bias (each MLX group is group_size/32
    ggml blocks), which decode to the same float32 values. Scales that float16 cannot hold exactly, and other widths,
    are dequantized to F32 with a notice, since ggml has no block format with an affine 8-, 6-, 3- or 2-bit code."""
    s32, b32 = a.scales_f32(), a.biases_f32()
    if a.bits in (4, 5):
        s16, b16 = _narrow(s32, "F16"), _narrow(b32, "F16")
        if s16 is not None and b16 is not None:
            qtype = QType.Q4_1 if a.bits == 4 else QType.Q5_1
            q = unpack_bits(a.packed, a.bits).reshape(-1, 32)                     # (n_blocks, 32)
            per = a.group_size // 32
            blocks = np.zeros(q.shape[0], dtype=formats.block_dtype(qtype))
            blocks["d"] = np.repeat(s16.reshape(-1), per)
            blocks["m"] = np.repeat(b16.reshape(-1), per)
            low = q & 0xF
            blocks["qs"] = low[:, :16] | (low[:, 16:] << 4)
            if qtype == QType.Q5_1:
                blocks["qh"] = np.packbits(q >> 4, axis=1, bitorder="little")
            return QTensor(qtype, tuple(a.shape), blocks.view(np.uint8).reshape(-1))
    log.warning("mixlocal: %s: %d-bit MLX groups have no ggml block twin; dequantized to F32 (%.1f MB) for the "
                "numba backend", name, a.bits, np.prod(a.shape) * 4 / 1e6)
    return QTensor.from_float(a.dequantize(), QType.F32)

"""mlx-community folders: MLX's affine-quantized weights in safetensors, read and written without MLX itself.

MLX's affine format quantizes each group of `group_size` consecutive elements along a row as
    w = scale * q + bias,   q an unsigned `bits`-bit integer,
stored as three tensors per matrix: `weight` (uint32 words holding q as a little-endian bit stream, element 0 in the
lowest bits), `scales` and `biases` (one per group, float16 / bfloat16 / float32). A folder has config.json with
`quantization: {group_size, bits}` (optionally per-module overrides), model*.safetensors, and tokenizer files. Experts
are stacked: `block_sparse_moe.switch_mlp.{gate,up,down}_proj` of shape (E, rows, packed cols); older folders keep
one triplet per expert (`block_sparse_moe.experts.{e}.w{1,2,3}`), which we stack the same way.

This module knows the format in numpy only, so the numba backend can read these folders on machines without MLX:
- `AffineTensor` holds one matrix (or expert stack) as memory-mapped triplet views.
- `affine_from_ggml` maps ggml blocks onto affine groups of 32 exactly where the formats coincide (Q4_0: scale d,
  bias -8d; Q4_1: d, m; Q8_0: d, -128d; Q5_0, Q5_1; Q4_K and Q5_K from their 32-element sub-blocks).
- `ggml_from_affine` goes the other way for the numba backend: 4- and 5-bit groups become Q4_1 / Q5_1 blocks with
  the same scale and bias (a group of 64 or 128 is two or four such blocks), exactly. Other widths have no ggml twin;
  they are dequantized to F32 with a one-line notice.
- `load_mlx` maps a folder; `write_mlx_folder` writes one that mlx-lm loads.
"""
from __future__ import annotations

import json
import logging
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from quant import QStack, QTensor, QType, formats

from ..config import ModelConfig
from ..errors import ModelFormatError
from ..weights import ModelWeights, assemble
from .safetensors import (
    NUMPY_DTYPES,
    RawTensor,
    map_safetensors,
    shard_files,
    write_safetensors,
)

__all__ = [
    "BITS",
    "GROUP_SIZES",
    "AffineTensor",
    "affine_from_ggml",
    "ggml_from_affine",
    "is_mlx_dir",
    "load_mlx",
    "pack_bits",
    "quantize_affine",
    "unpack_bits",
    "write_mlx_folder",
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

def _ggml_groups(qtype: QType, rows: np.ndarray) -> tuple[int, np.ndarray, np.ndarray] | None:
    """(bits, scale, bias) per 32-element group, as float32 (n_rows, cols / 32), for ggml rows whose decoding is
    scale * q + bias with q unsigned. The float32 products are ggml's own (d * sc for K formats), so the affine
    form reproduces its dequantization exactly. None where the format has no such 32-element form."""
    n_rows = rows.shape[0]
    blocks = np.ascontiguousarray(rows).reshape(-1).view(formats.block_dtype(qtype))
    f32 = np.float32
    if qtype in (QType.Q4_0, QType.Q5_0, QType.Q8_0):
        offset = {QType.Q4_0: 8, QType.Q5_0: 16, QType.Q8_0: 128}[qtype]
        d = blocks["d"].astype(f32)
        bits = {QType.Q4_0: 4, QType.Q5_0: 5, QType.Q8_0: 8}[qtype]
        return bits, d.reshape(n_rows, -1), (-f32(offset) * d).reshape(n_rows, -1)
    if qtype in (QType.Q4_1, QType.Q5_1):
        return (4 if qtype == QType.Q4_1 else 5), blocks["d"].astype(f32).reshape(n_rows, -1), \
            blocks["m"].astype(f32).reshape(n_rows, -1)
    if qtype in (QType.Q4_K, QType.Q5_K):
        sc, mn = formats._unpack_k4_scales(blocks["scales"])  # the eight 6-bit sub-block scales and mins
        scale = blocks["d"].astype(f32)[:, None] * sc.astype(f32)
        bias = -(blocks["dmin"].astype(f32)[:, None] * mn.astype(f32))
        return (4 if qtype == QType.Q4_K else 5), scale.reshape(n_rows, -1), bias.reshape(n_rows, -1)
    return None


EXACT_GGML = (QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1, QType.Q8_0, QType.Q4_K, QType.Q5_K)
# Formats whose 16-element sub-blocks no MLX group size expresses: dequantized and requantized to these widths.
REQUANT_BITS = {QType.Q2_K: 4, QType.Q3_K: 4, QType.Q6_K: 8}


def _matrices(t) -> list[QTensor]:
    if isinstance(t, QStack):
        return list(t.mats)
    if len(t.shape) == 3:
        return [t.expert(e) for e in range(t.shape[0])]
    return [t]


def affine_from_ggml(t: QTensor | QStack, scale_dtype: str = "F32") -> AffineTensor:
    """A quantized ggml tensor as MLX affine groups of 32, exactly (see EXACT_GGML).

    scale_dtype "F32" is exact for every listed format; "F16" is exact for the 32-element formats, whose scales are
    float16 already, and raises ValueError where a K-format product d * sc does not fit float16."""
    if t.qtype not in EXACT_GGML:
        raise ValueError(f"{t.qtype.name} has no exact MLX affine form (exact: {', '.join(q.name for q in EXACT_GGML)})")
    mats = _matrices(t)
    rows, cols = mats[0].shape
    bits = _ggml_groups(t.qtype, mats[0].rows_view()[:1])[0]
    packed = np.empty((len(mats), rows, cols * bits // 32), dtype=np.uint32)
    store = {"F16": np.float16, "F32": np.float32}[scale_dtype]
    scales = np.empty((len(mats), rows, cols // 32), dtype=store)
    biases = np.empty_like(scales)
    step = max(1, _CHUNK_ELEMENTS // cols)
    for e, m in enumerate(mats):
        src = m.rows_view()
        for r0 in range(0, rows, step):
            part = src[r0:r0 + step]
            _, s, b = _ggml_groups(t.qtype, part)
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


# ----------------------------------------------------------------------------------------------------------------------
# Reading a folder
# ----------------------------------------------------------------------------------------------------------------------

_SIMPLE = {"model.embed_tokens": "token_embd.weight", "lm_head": "output.weight", "model.norm": "output_norm.weight"}
_LAYER = {
    "input_layernorm": "attn_norm.weight",
    "post_attention_layernorm": "ffn_norm.weight",
    "self_attn.q_proj": "attn_q.weight",
    "self_attn.k_proj": "attn_k.weight",
    "self_attn.v_proj": "attn_v.weight",
    "self_attn.o_proj": "attn_output.weight",
    "block_sparse_moe.gate": "ffn_gate_inp.weight",
    "block_sparse_moe.switch_mlp.gate_proj": "ffn_gate_exps.weight",
    "block_sparse_moe.switch_mlp.up_proj": "ffn_up_exps.weight",
    "block_sparse_moe.switch_mlp.down_proj": "ffn_down_exps.weight",
}
_OLD_EXPERT = {"w1": "block_sparse_moe.switch_mlp.gate_proj", "w3": "block_sparse_moe.switch_mlp.up_proj",
               "w2": "block_sparse_moe.switch_mlp.down_proj"}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")
_OLD_EXPERT_RE = re.compile(r"block_sparse_moe\.experts\.(\d+)\.(w[123])")
_SMALL = ("attn_norm.weight", "ffn_norm.weight", "ffn_gate_inp.weight", "output_norm.weight")


def _read_config(path: Path) -> dict:
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return raw if isinstance(raw, dict) else {}


def is_mlx_dir(path: str | Path) -> bool:
    """A folder in MLX's layout: config.json says `quantization`, or the weights use stacked `switch_mlp` experts."""
    path = Path(path)
    if not (path.is_dir() and (path / "config.json").is_file()):
        return False
    if "quantization" in _read_config(path):
        return True
    for f in sorted(path.glob("*.safetensors"))[:1]:
        try:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                head = fh.read(min(n, 100 * 1024 * 1024))
        except (OSError, struct.error):
            return False
        return b".switch_mlp." in head or b".scales\"" in head
    return False


def _quant_params(path: Path, config: dict) -> tuple[dict | None, dict]:
    """The default {group_size, bits} and the per-module overrides from config.json."""
    q = config.get("quantization")
    if q is None:
        return None, {}
    if not isinstance(q, dict):
        raise ModelFormatError(f"{path}/config.json: quantization must be an object, got {q!r}")
    mode = q.get("mode", "affine")
    if mode != "affine":
        raise ModelFormatError(f"{path}/config.json: quantization mode {mode!r} is not supported (affine is)")
    try:
        default = {"group_size": int(q.get("group_size", 64)), "bits": int(q.get("bits", 4))}
    except (TypeError, ValueError):
        raise ModelFormatError(f"{path}/config.json: bad quantization {q!r}") from None
    overrides = {k: ({**default, **v} if isinstance(v, dict) else v) for k, v in q.items()
                 if isinstance(v, (dict, bool))}
    return default, overrides


def _affine_entry(path: Path, module: str, raw: dict[str, RawTensor], default, overrides) -> AffineTensor:
    w, s, b = raw[module + ".weight"], raw.get(module + ".scales"), raw.get(module + ".biases")
    where = f"{w.file}: tensor {module}.weight"
    if b is None:
        raise ModelFormatError(f"{where}: has scales but no biases (only affine quantization is supported)")
    if w.dtype != "U32" or s.dtype not in ("F16", "BF16", "F32") or b.dtype != s.dtype:
        raise ModelFormatError(f"{where}: quantized triplet has dtypes {w.dtype}/{s.dtype}/{b.dtype}, "
                               f"expected U32 and matching float scales and biases")
    params = overrides.get(module, default)
    if not isinstance(params, dict):
        raise ModelFormatError(f"{where}: is quantized but config.json gives it no quantization parameters")
    try:
        bits, gs = int(params.get("bits", 4)), int(params.get("group_size", 64))
    except (TypeError, ValueError):
        raise ModelFormatError(f"{where}: bad quantization parameters {params!r}") from None
    cols = w.array.shape[-1] * 32 // bits if bits in BITS else 0
    if bits not in BITS or gs not in GROUP_SIZES or s.array.shape[-1] * gs != cols:
        raise ModelFormatError(f"{where}: packed shape {w.array.shape} and scales {s.array.shape} do not fit "
                               f"{bits}-bit groups of {gs}")
    try:
        return AffineTensor((*w.array.shape[:-1], cols), bits, gs, w.array, s.array, b.array, s.dtype)
    except ValueError as e:
        raise ModelFormatError(f"{where}: {e}") from None


def _float_entry(r: RawTensor) -> QTensor:
    qtype = {"F16": QType.F16, "BF16": QType.BF16, "F32": QType.F32}.get(r.dtype)
    if qtype is None:
        raise ModelFormatError(f"{r.file}: a {r.dtype} tensor that is not part of a quantized triplet")
    return QTensor(qtype, tuple(r.array.shape), r.array.reshape(-1).view(np.uint8))


def _stack(name: str, parts: list, origin: str):
    if all(isinstance(p, AffineTensor) for p in parts):
        kinds = {(p.shape, p.bits, p.group_size, p.scale_dtype) for p in parts}
        if len(kinds) != 1:
            raise ModelFormatError(f"{origin}: tensor {name}: experts differ in shape or quantization")
        p0 = parts[0]
        return AffineTensor((len(parts), *p0.shape), p0.bits, p0.group_size,
                            np.stack([p.packed for p in parts]), np.stack([p.scales for p in parts]),
                            np.stack([p.biases for p in parts]), p0.scale_dtype)
    if all(isinstance(p, QTensor) for p in parts) and len({(p.qtype, p.shape) for p in parts}) == 1:
        return QStack(tuple(parts))
    raise ModelFormatError(f"{origin}: tensor {name}: experts differ in type or shape")


def load_mlx(path: str | Path, layout: str = "ggml") -> tuple[ModelConfig, ModelWeights, Path]:
    """Map an mlx-community folder. Returns config, weights and the tokenizer.model path.

    layout "mlx" keeps quantized matrices as AffineTensor for the MLX backend. layout "ggml" gives QTensors the
    numba backend runs (see ggml_from_affine). Either way norms and the router come back as float32 arrays."""
    if layout not in ("ggml", "mlx"):
        raise ValueError(f"layout must be 'ggml' or 'mlx', got {layout!r}")
    path = Path(path)
    config = ModelConfig.from_hf(path / "config.json")
    default, overrides = _quant_params(path, _read_config(path))
    raw: dict[str, RawTensor] = {}
    for f in shard_files(path):
        raw.update(map_safetensors(f))

    modules = sorted({n.rsplit(".", 1)[0] for n in raw if n.endswith(".weight")})
    tensors: dict = {}
    origin: dict[str, str] = {}
    old_experts: dict[str, dict[int, object]] = {}
    for module in modules:
        r = raw[module + ".weight"]
        t = _affine_entry(path, module, raw, default, overrides) if module + ".scales" in raw else _float_entry(r)
        m = _LAYER_RE.fullmatch(module)
        if module in _SIMPLE:
            name = _SIMPLE[module]
        elif m and m.group(2) in _LAYER:
            name = f"blk.{m.group(1)}.{_LAYER[m.group(2)]}"
        elif m and (em := _OLD_EXPERT_RE.fullmatch(m.group(2))):
            name = f"blk.{m.group(1)}.{_LAYER[_OLD_EXPERT[em.group(2)]]}"
            old_experts.setdefault(name, {})[int(em.group(1))] = t
            origin[name] = r.file
            continue
        else:
            continue
        tensors[name], origin[name] = t, r.file
    for name, per in old_experts.items():
        if sorted(per) != list(range(config.n_experts)):
            raise ModelFormatError(f"{origin[name]}: tensor {name}: experts {sorted(per)}, config says "
                                   f"{config.n_experts}")
        tensors[name] = _stack(name, [per[e] for e in range(config.n_experts)], origin[name])

    for name, t in tensors.items():
        if isinstance(t, AffineTensor):
            if name.endswith(_SMALL):  # norms and the router: float32 for both backends (the router stays float)
                tensors[name] = t.dequantize()
            elif layout == "ggml":
                tensors[name] = ggml_from_affine(t, f"{origin[name]}: {name}")
    weights = assemble(config, tensors, origin)
    tok = path / "tokenizer.model"
    if not tok.is_file():
        raise ModelFormatError(f"{path}: tokenizer.model not found (mixlocal reads the sentencepiece model)")
    return config, weights, tok


# ----------------------------------------------------------------------------------------------------------------------
# Writing a folder
# ----------------------------------------------------------------------------------------------------------------------

_GGUF_TO_MLX = {v: k for k, v in _SIMPLE.items()}
_GGUF_TO_MLX.update({gguf: f"model.layers.{{i}}.{mlx}" for mlx, gguf in _LAYER.items()})
_MAX_SHARD_BYTES = 5 << 30  # mlx-lm's shard size


def _hf_config(c: ModelConfig, bits: int, group_size: int) -> dict:
    q = {"group_size": group_size, "bits": bits}
    return {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": c.vocab_size,
        "hidden_size": c.dim, "intermediate_size": c.ffn_dim, "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim,
        "num_local_experts": c.n_experts, "num_experts_per_tok": c.n_experts_used, "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta, "max_position_embeddings": c.max_context, "bos_token_id": c.bos_id,
        "eos_token_id": c.eos_id, "tie_word_embeddings": False, "hidden_act": "silu", "torch_dtype": "float16",
        "quantization": q, "quantization_config": q,
    }


def _half_rows(n_heads: int, head_dim: int) -> np.ndarray:
    """Row order that undoes llama.cpp's q/k permutation: GGUF's neighbour-pair RoPE rows -> HF's rotate-half."""
    idx = np.arange(n_heads * head_dim).reshape(n_heads, head_dim // 2, 2)
    return idx.swapaxes(1, 2).reshape(-1)


def _to_float(t) -> np.ndarray:
    if isinstance(t, np.ndarray):
        return t.astype(np.float32)
    if isinstance(t, AffineTensor):
        return t.dequantize()
    return np.stack([formats.dequantize(m.qtype, m.rows_view()) for m in _matrices(t)]).reshape(t.shape)


def _writer_affine(t, bits: int, group_size: int) -> AffineTensor:
    """Stored form of one matrix: as-is if already affine with these parameters, an exact transcode for ggml blocks
    that are (Q4_0, Q4_1 ... with group_size 32 and float16 scales), otherwise dequantized and requantized."""
    if isinstance(t, AffineTensor) and (t.bits, t.group_size, t.scale_dtype) == (bits, group_size, "F16"):
        return t
    if (isinstance(t, (QTensor, QStack)) and t.qtype in EXACT_GGML and group_size == 32
            and _ggml_groups(t.qtype, _matrices(t)[0].rows_view()[:1])[0] == bits):
        try:
            return affine_from_ggml(t, "F16")
        except ValueError:
            pass  # K-format scales that float16 cannot hold: requantize below
    if len(t.shape) == 2:
        return quantize_affine(_to_float(t), bits, group_size, "F16")
    parts = [quantize_affine(_to_float(t.expert(e)), bits, group_size, "F16") for e in range(t.shape[0])]
    return AffineTensor(tuple(t.shape), bits, group_size, np.stack([p.packed for p in parts]),
                        np.stack([p.scales for p in parts]), np.stack([p.biases for p in parts]), "F16")


def write_mlx_folder(weights: ModelWeights, tokenizer_path: str | Path | bytes, out_dir: str | Path, bits: int = 4,
                     group_size: int = 64) -> Path:
    """Write weights as an mlx-community folder (config.json with `quantization`, model*.safetensors with affine
    triplets and stacked switch_mlp experts, tokenizer.model and tokenizer_config.json) that mlx-lm loads.

    Matrices are quantized to `bits` in groups of `group_size`; norms and the router stay float16 (mlx-lm leaves
    modules without scales unquantized). GGUF's neighbour-pair q/k rows are put back in HF's order, so the folder
    is a plain HF-convention Mixtral. tokenizer_path is a sentencepiece tokenizer.model, or its bytes (a GGUF
    source rebuilds them from metadata). Returns out_dir."""
    if bits not in BITS or group_size not in GROUP_SIZES:
        raise ValueError(f"bits must be one of {BITS} and group_size one of {GROUP_SIZES}, got {bits}, {group_size}")
    c = weights.config
    if c.dim % group_size or c.ffn_dim % group_size or c.q_dim % group_size:
        raise ValueError(f"model widths {c.dim}, {c.ffn_dim}, {c.q_dim} are not multiples of group size {group_size}")
    if isinstance(tokenizer_path, (bytes, bytearray)):
        tokenizer_bytes = bytes(tokenizer_path)
    elif Path(tokenizer_path).is_file():
        tokenizer_bytes = Path(tokenizer_path).read_bytes()
    else:
        raise ValueError(f"{tokenizer_path}: tokenizer model not found")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows_for = {}
    if c.rope_pairing == "neighbor":
        rows_for = {"attn_q.weight": _half_rows(c.n_heads, c.head_dim),
                    "attn_k.weight": _half_rows(c.n_kv_heads, c.head_dim)}

    # Plan every entry first (shapes follow from the config), then fill the files one matrix at a time.
    tensors = weights.tensors()
    plan: list[tuple[str, str, tuple[int, ...], str, str]] = []   # (mlx name, dtype, shape, part, gguf name)
    for gname, t in tensors.items():
        m = re.fullmatch(r"blk\.(\d+)\.(.+)", gname)
        base = _GGUF_TO_MLX[m.group(2)].format(i=m.group(1)) if m else _GGUF_TO_MLX[gname]
        shape = tuple(t.shape)
        if len(shape) == 1 or gname.endswith("ffn_gate_inp.weight"):
            plan.append((base + ".weight", "F16", shape, "float", gname))
            continue
        *lead, cols = shape
        plan += [(base + ".weight", "U32", (*lead, cols * bits // 32), "packed", gname),
                 (base + ".scales", "F16", (*lead, cols // group_size), "scales", gname),
                 (base + ".biases", "F16", (*lead, cols // group_size), "biases", gname)]

    def nbytes(entry) -> int:
        return int(np.prod(entry[2])) * NUMPY_DTYPES[entry[1]].itemsize

    shards: list[list] = [[]]
    size = 0
    for entry in plan:
        if shards[-1] and size + nbytes(entry) > _MAX_SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes(entry)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])

    current: dict[str, AffineTensor] = {}  # the matrix being written: one quantization serves its three entries

    def fill(name, dst):
        _, _, _, part, gname = by_name[name]
        t = tensors[gname]
        if part == "float":
            dst[...] = _to_float(t).astype(np.float16)
            return
        if gname not in current:
            current.clear()
            current[gname] = _writer_affine(t, bits, group_size)
        a = current[gname]
        src = {"packed": a.packed, "scales": a.scales, "biases": a.biases}[part]
        rows = next((r for suffix, r in rows_for.items() if gname.endswith(suffix)), None)
        dst[...] = src if rows is None else src[rows]

    for fname, shard in zip(names, shards):
        by_name = {e[0]: e for e in shard}
        write_safetensors(out / fname, [(n, d, s) for n, d, s, _, _ in shard], fill, metadata={"format": "mlx"})
    if len(names) > 1:
        index = {"metadata": {"total_size": sum(nbytes(e) for e in plan)},
                 "weight_map": {e[0]: names[k] for k, shard in enumerate(shards) for e in shard}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(_hf_config(c, bits, group_size), indent=2))
    (out / "tokenizer.model").write_bytes(tokenizer_bytes)
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "legacy": True, "model_max_length": c.max_context,
    }, indent=2))
    return out

"""mlx-community folders: MLX's affine-quantized weights in safetensors, read and written without MLX itself.

A folder has config.json with `quantization: {group_size, bits}` (optionally per-module overrides),
model*.safetensors holding one affine triplet per quantized matrix (`weight` as uint32 words, `scales`, `biases`;
the format itself is quant/affine.py), and tokenizer files. Experts are stacked:
`block_sparse_moe.switch_mlp.{gate,up,down}_proj` of shape (E, rows, packed cols); older folders keep one triplet
per expert (`block_sparse_moe.experts.{e}.w{1,2,3}`), which we stack the same way.

- `load_mlx` maps a folder: quantized matrices as the `AffineTensor`s they are stored as, whatever backend runs them
  (the numba backend turns them into ggml blocks itself: engine/weights.py `in_ggml_blocks`).
- `write_mlx_folder` writes one that mlx-lm loads.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
from mixlocal.quant import QStack, QTensor, QType, formats, matrices
from mixlocal.quant.affine import (
    BITS,
    EXACT_BITS,
    GROUP_SIZES,
    AffineTensor,
    affine_from_ggml,
    quantize_affine,
)

from ..config import ModelConfig
from ..errors import ModelFormatError
from ..weights import ModelWeights, assemble
from .hf_names import gguf_name, hf_module
from .safetensors import (
    NUMPY_DTYPES,
    RawTensor,
    map_safetensors,
    shard_files,
    write_safetensors,
)

__all__ = ["is_mlx_dir", "load_mlx", "write_mlx_folder"]


# ----------------------------------------------------------------------------------------------------------------------
# Reading a folder
# ----------------------------------------------------------------------------------------------------------------------

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


def load_mlx(path: str | Path) -> tuple[ModelConfig, ModelWeights, Path]:
    """Map an mlx-community folder. Returns config, weights and the tokenizer.model path.

    Quantized matrices stay AffineTensors as stored; norms and the router come back as float32 arrays."""
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
        named = gguf_name(module)
        if named is None:
            continue
        name, expert = named
        if expert is not None:
            old_experts.setdefault(name, {})[expert] = t
            origin[name] = r.file
            continue
        tensors[name], origin[name] = t, r.file
    for name, per in old_experts.items():
        if sorted(per) != list(range(config.n_experts)):
            raise ModelFormatError(f"{origin[name]}: tensor {name}: experts {sorted(per)}, config says "
                                   f"{config.n_experts}")
        tensors[name] = _stack(name, [per[e] for e in range(config.n_experts)], origin[name])

    for name, t in tensors.items():
        if isinstance(t, AffineTensor) and name.endswith(_SMALL):  # norms and the router: float32 everywhere
            tensors[name] = t.dequantize()
    weights = assemble(config, tensors, origin)
    tok = path / "tokenizer.model"
    if not tok.is_file():
        raise ModelFormatError(f"{path}: tokenizer.model not found (mixlocal reads the sentencepiece model)")
    return config, weights, tok


# ----------------------------------------------------------------------------------------------------------------------
# Writing a folder
# ----------------------------------------------------------------------------------------------------------------------

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
    return np.stack([formats.dequantize(m.qtype, m.rows_view()) for m in matrices(t)]).reshape(t.shape)


def _writer_affine(t, bits: int, group_size: int) -> AffineTensor:
    """Stored form of one matrix: as-is if already affine with these parameters, an exact transcode for ggml blocks
    that are (Q4_0, Q4_1 ... with group_size 32 and float16 scales), otherwise dequantized and requantized."""
    if isinstance(t, AffineTensor) and (t.bits, t.group_size, t.scale_dtype) == (bits, group_size, "F16"):
        return t
    if isinstance(t, (QTensor, QStack)) and EXACT_BITS.get(t.qtype) == bits and group_size == 32:
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
        base = hf_module(gname)
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

"""GGUF files (llama.cpp's format): metadata, memory-mapped tensors, the tokenizer in the metadata.

gguf-py's GGUFReader does the parsing; it raises IndexError, ValueError and friends on damaged files, and trusts
the counts in the header, so we check the fixed header ourselves first and turn every failure into a
ModelFormatError that names the file (and the tensor, where there is one).
"""
from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np

from quant import QStack, QTensor, QType, nbytes_for

from ..config import ModelConfig
from ..errors import ModelFormatError
from ..weights import ModelWeights, assemble

__all__ = ["load_gguf", "read_gguf", "SUPPORTED_TYPES"]

SUPPORTED_TYPES = frozenset({
    QType.F32, QType.F16, QType.BF16, QType.Q8_0, QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1,
    QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K,
})
_MIN_KV_BYTES = 8 + 1 + 4          # key length, a 1-char key, a value type
_MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 8 + 4 + 8
_OLD_EXPERT = re.compile(r"blk\.(\d+)\.ffn_(gate|up|down)\.(\d+)\.weight")


def _check_header(path: Path) -> None:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(24)
    except FileNotFoundError:
        raise ModelFormatError(f"{path}: file not found") from None
    except OSError as e:
        raise ModelFormatError(f"{path}: cannot read ({e})") from None
    if len(head) < 24:
        raise ModelFormatError(f"{path}: too short to be a GGUF file ({size} bytes)")
    if head[:4] != b"GGUF":
        raise ModelFormatError(f"{path}: bad magic {head[:4]!r}, not a GGUF file")
    version, n_tensors, n_kv = struct.unpack("<IQQ", head[4:24])
    if version not in (2, 3):
        raise ModelFormatError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
    if n_kv * _MIN_KV_BYTES > size or n_tensors * _MIN_TENSOR_INFO_BYTES > size:
        raise ModelFormatError(f"{path}: header claims {n_tensors} tensors and {n_kv} metadata keys, "
                               f"more than a {size}-byte file can hold")


def _field_value(field):
    v = field.contents()
    return v


def read_gguf(path: str | Path):
    """Open a GGUF file: (metadata dict of plain Python values, list of gguf ReaderTensor)."""
    from gguf import GGUFReader

    path = Path(path)
    _check_header(path)
    try:
        reader = GGUFReader(path, "r")
        meta = {name: _field_value(f) for name, f in reader.fields.items()}
    except ModelFormatError:
        raise
    except Exception as e:  # gguf-py signals damage with many exception types
        raise ModelFormatError(f"{path}: damaged GGUF file ({type(e).__name__}: {e})") from None
    size = path.stat().st_size
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size:
            raise ModelFormatError(f"{path}: tensor {t.name} ends at byte {end} beyond the file ({size} bytes)")
    return meta, reader.tensors


def _config_from_meta(path: Path, meta: dict, n_vocab_tokens: int) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch not in ("llama", "mixtral"):
        raise ModelFormatError(f"{path}: architecture {arch!r} is not a Mixtral-family model")

    def get(key, default=None, required=True):
        full = f"{arch}.{key}"
        if full in meta:
            return meta[full]
        if required and default is None:
            raise ModelFormatError(f"{path}: metadata {full} is missing")
        return default

    try:
        dim = int(get("embedding_length"))
        n_heads = int(get("attention.head_count"))
        head_dim = int(get("attention.key_length", dim // n_heads, required=False))
        return ModelConfig(
            vocab_size=int(get("vocab_size", n_vocab_tokens or None)),
            dim=dim,
            n_layers=int(get("block_count")),
            n_heads=n_heads,
            n_kv_heads=int(get("attention.head_count_kv", n_heads, required=False)),
            head_dim=head_dim,
            ffn_dim=int(get("feed_forward_length")),
            n_experts=int(get("expert_count")),
            n_experts_used=int(get("expert_used_count")),
            norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5, required=False)),
            rope_theta=float(get("rope.freq_base", 10000.0, required=False)),
            max_context=int(get("context_length", 32768, required=False)),
            rope_pairing="neighbor",
            bos_id=int(meta.get("tokenizer.ggml.bos_token_id", 1)),
            eos_id=int(meta.get("tokenizer.ggml.eos_token_id", 2)),
            name=str(meta.get("general.name") or path.stem),
        )
    except (TypeError, ValueError) as e:
        if isinstance(e, ModelFormatError):
            raise
        raise ModelFormatError(f"{path}: bad metadata value ({e})") from None


def _as_qtensor(path: Path, t) -> QTensor:
    qtype = QType(int(t.tensor_type))
    if qtype not in SUPPORTED_TYPES:
        raise ModelFormatError(f"{path}: tensor {t.name} has type {qtype.name}, which mixlocal does not support "
                               f"yet (supported: {', '.join(sorted(q.name for q in SUPPORTED_TYPES))})")
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    try:
        want = nbytes_for(qtype, shape)
    except ValueError as e:
        raise ModelFormatError(f"{path}: tensor {t.name}: {e}") from None
    raw = np.asarray(t.data).reshape(-1).view(np.uint8)
    if raw.nbytes != want:
        raise ModelFormatError(f"{path}: tensor {t.name} has {raw.nbytes} bytes, {qtype.name}{shape} needs {want}")
    return QTensor(qtype, shape, raw)


def load_gguf(path: str | Path) -> tuple[ModelConfig, ModelWeights, dict]:
    """Map a GGUF Mixtral. Returns config, weights and the metadata (the tokenizer is built from it)."""
    path = Path(path)
    meta, tensors = read_gguf(path)
    tokens = meta.get("tokenizer.ggml.tokens")
    config = _config_from_meta(path, meta, len(tokens) if isinstance(tokens, list) else 0)
    named: dict = {}
    origin: dict[str, str] = {}
    old_experts: dict[str, dict[int, QTensor]] = {}
    for t in tensors:
        qt = _as_qtensor(path, t)
        m = _OLD_EXPERT.fullmatch(t.name)
        if m:  # early Mixtral GGUFs: one tensor per expert
            name = f"blk.{m.group(1)}.ffn_{m.group(2)}_exps.weight"
            old_experts.setdefault(name, {})[int(m.group(3))] = qt
        else:
            name = t.name
            named[name] = qt
        origin[name] = str(path)
    for name, per in old_experts.items():
        if sorted(per) != list(range(config.n_experts)):
            raise ModelFormatError(f"{path}: tensor {name}: experts {sorted(per)} found, expected {config.n_experts}")
        mats = tuple(per[e] for e in range(config.n_experts))
        if len({(m.qtype, m.shape) for m in mats}) != 1:
            raise ModelFormatError(f"{path}: tensor {name}: experts differ in type or shape")
        named[name] = QStack(mats)
    return config, assemble(config, named, origin), meta

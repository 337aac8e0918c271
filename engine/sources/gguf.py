"""GGUF files (llama.cpp's format): metadata, memory-mapped tensors, the tokenizer in the metadata.

Every failure is a ModelFormatError that names the file (and the tensor, where there is one).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from mixlocal.quant import QStack, QTensor, QType, nbytes_for

from ..config import ModelConfig
from ..errors import ModelFormatError
from ..weights import ModelWeights, assemble
from .gguf_fast import read_gguf_fast

__all__ = ["SUPPORTED_TYPES", "load_gguf", "read_gguf"]

SUPPORTED_TYPES = frozenset({
    QType.F32, QType.F16, QType.BF16, QType.Q8_0, QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1,
    QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K,
    QType.IQ4_NL, QType.IQ4_XS, QType.IQ3_XXS, QType.IQ3_S, QType.IQ2_XXS, QType.IQ2_XS, QType.IQ2_S, QType.IQ1_S,
    QType.IQ1_M,
})
_OLD_EXPERT = re.compile(r"blk\.(\d+)\.ffn_(gate|up|down)\.(\d+)\.weight")


def read_gguf(path: str | Path):
    """Open a GGUF file: (metadata dict of plain Python values, tensor infos with views of the mapped data).

    Parsed by our own bounds-checked reader (gguf_fast): gguf-py's GGUFReader takes 1-3 s on Mixtral's 32000-token
    vocabulary and signals damage with assorted exceptions."""
    return read_gguf_fast(Path(path))


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

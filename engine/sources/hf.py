"""Hugging Face Mixtral checkpoints: config.json, safetensors (one file or shards), tokenizer.model."""
from __future__ import annotations

from pathlib import Path

from mixlocal.quant import QStack, QTensor

from ..config import ModelConfig
from ..errors import ModelFormatError
from ..weights import ModelWeights, assemble
from .hf_names import gguf_name
from .safetensors import read_safetensors, shard_files

__all__ = ["is_hf_dir", "load_hf"]


def is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def load_hf(path: str | Path) -> tuple[ModelConfig, ModelWeights, Path]:
    """Map an HF Mixtral directory. Returns its config, weights and the tokenizer.model path."""
    path = Path(path)
    if not path.is_dir():
        raise ModelFormatError(f"{path}: not a directory")
    config = ModelConfig.from_hf(path / "config.json")
    tensors: dict = {}
    origin: dict[str, str] = {}
    experts: dict[str, dict[int, QTensor]] = {}
    for file in shard_files(path):
        for hf_name, t in read_safetensors(file).items():
            named = gguf_name(hf_name.removesuffix(".weight")) if hf_name.endswith(".weight") else None
            if named is None:
                continue  # rotary caches and other extras that some exporters add
            name, expert = named
            origin[name] = str(file)
            if expert is None:
                tensors[name] = t
            else:
                experts.setdefault(name, {})[expert] = t
    for name, per_expert in experts.items():
        if sorted(per_expert) != list(range(config.n_experts)):
            raise ModelFormatError(
                f"{origin[name]}: tensor {name} has experts {sorted(per_expert)}, config says {config.n_experts}")
        mats = [per_expert[e] for e in range(config.n_experts)]
        shapes = {m.shape for m in mats}
        if len(shapes) != 1:
            raise ModelFormatError(f"{origin[name]}: tensor {name}: experts disagree in shape {sorted(shapes)}")
        tensors[name] = QStack(tuple(mats))
    weights = assemble(config, tensors, origin)
    tok = path / "tokenizer.model"
    if not tok.is_file():
        raise ModelFormatError(f"{path}: tokenizer.model not found")
    return config, weights, tok

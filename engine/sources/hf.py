"""Hugging Face Mixtral checkpoints: config.json, safetensors (one file or shards), tokenizer.model."""
from __future__ import annotations

import re
from pathlib import Path

from quant import QStack, QTensor

from ..config import ModelConfig
from ..errors import ModelFormatError
from ..weights import ModelWeights, assemble
from .safetensors import read_safetensors, shard_files

__all__ = ["is_hf_dir", "load_hf"]

_SIMPLE = {
    "model.embed_tokens.weight": "token_embd.weight",
    "lm_head.weight": "output.weight",
    "model.norm.weight": "output_norm.weight",
}
_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "block_sparse_moe.gate.weight": "ffn_gate_inp.weight",
}
_EXPERT_NAMES = {"w1": "ffn_gate_exps.weight", "w3": "ffn_up_exps.weight", "w2": "ffn_down_exps.weight"}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")
_EXPERT_RE = re.compile(r"block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight")


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
    experts: dict[tuple[int, str], dict[int, QTensor]] = {}
    for file in shard_files(path):
        for hf_name, t in read_safetensors(file).items():
            m = _LAYER_RE.fullmatch(hf_name)
            if hf_name in _SIMPLE:
                name = _SIMPLE[hf_name]
            elif m and m.group(2) in _LAYER:
                name = f"blk.{m.group(1)}.{_LAYER[m.group(2)]}"
            elif m and (em := _EXPERT_RE.fullmatch(m.group(2))):
                name = f"blk.{m.group(1)}.{_EXPERT_NAMES[em.group(2)]}"
                experts.setdefault((int(m.group(1)), em.group(2)), {})[int(em.group(1))] = t
                origin[name] = str(file)
                continue
            else:
                continue  # rotary caches and other extras that some exporters add
            tensors[name] = t
            origin[name] = str(file)
    for (layer, w), per_expert in experts.items():
        name = f"blk.{layer}.{_EXPERT_NAMES[w]}"
        if sorted(per_expert) != list(range(config.n_experts)):
            raise ModelFormatError(
                f"{origin[name]}: layer {layer} {w} has experts {sorted(per_expert)}, config says {config.n_experts}")
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

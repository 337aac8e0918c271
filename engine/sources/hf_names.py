"""Hugging Face Mixtral tensor names and their GGUF names: the one table for every source in HF's layout.

HF checkpoints and mlx-community folders name modules alike (`model.layers.N.self_attn.q_proj`); HF stores one
matrix per expert (`block_sparse_moe.experts.E.w1`), MLX stacks them (`block_sparse_moe.switch_mlp.gate_proj`).
Names here are modules, without the `.weight` / `.scales` / `.biases` suffix of the stored tensors.
"""
from __future__ import annotations

import re

__all__ = ["GLOBAL", "LAYER", "gguf_name", "hf_module"]

GLOBAL = {"model.embed_tokens": "token_embd.weight", "lm_head": "output.weight", "model.norm": "output_norm.weight"}
LAYER = {
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
_PER_EXPERT = {"w1": "ffn_gate_exps.weight", "w3": "ffn_up_exps.weight", "w2": "ffn_down_exps.weight"}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")
_EXPERT_RE = re.compile(r"block_sparse_moe\.experts\.(\d+)\.(w[123])")
_TO_HF = {**{g: m for m, g in GLOBAL.items()}, **{g: f"model.layers.{{i}}.{m}" for m, g in LAYER.items()}}


def gguf_name(module: str) -> tuple[str, int | None] | None:
    """The GGUF tensor name of an HF module, and the expert index when the module is one expert's matrix (all
    experts of a block share one GGUF tensor). None for modules that are not model weights (rotary caches and
    other extras some exporters add)."""
    if module in GLOBAL:
        return GLOBAL[module], None
    m = _LAYER_RE.fullmatch(module)
    if not m:
        return None
    layer, rest = m.groups()
    if rest in LAYER:
        return f"blk.{layer}.{LAYER[rest]}", None
    em = _EXPERT_RE.fullmatch(rest)
    if em:
        return f"blk.{layer}.{_PER_EXPERT[em.group(2)]}", int(em.group(1))
    return None


def hf_module(name: str) -> str:
    """The HF module a GGUF tensor name is written as, experts stacked (MLX's layout)."""
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
    return _TO_HF[m.group(2)].format(i=m.group(1)) if m else _TO_HF[name]

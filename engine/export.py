"""Write a model as a GGUF file that llama.cpp loads: gguf-py's GGUFWriter, llama architecture with experts.

llama.cpp applies RoPE to neighbouring pairs, and its converter permutes the q and k rows of HF checkpoints to
match. Rows are independent in every block format, so we permute the stored rows (quantized or not) the same way.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from mixlocal.quant import QStack, QTensor, QType

from .quantize import LEVELS, quantize_weights
from .weights import ModelWeights

__all__ = ["neighbor_row_order", "write_gguf"]


def neighbor_row_order(n_heads: int, head_dim: int) -> np.ndarray:
    """Row permutation taking HF rotate-half q/k rows to GGUF neighbour-pair rows, head by head."""
    return np.arange(n_heads * head_dim).reshape(n_heads, 2, head_dim // 2).swapaxes(1, 2).reshape(-1)


def _byte_array(t: QTensor | QStack, rows: np.ndarray | None = None) -> np.ndarray:
    """The tensor's bytes shaped (..., row_bytes), as gguf-py wants raw blocks."""
    if isinstance(t, QStack):
        return np.stack([_byte_array(m) for m in t.mats])
    b = t.rows_view()
    if rows is not None:
        b = b[rows]
    return b.reshape(tuple(t.shape[:-1]) + (t.row_bytes,))


def write_gguf(weights: ModelWeights, tokenizer, path: str | Path, level: str | None = None,
               name: str | None = None, progress=None, imatrix=None) -> Path:
    """Write weights (quantized to level first, if given, weighted by a `quant.imatrix.Imatrix`) with the
    tokenizer's metadata to path."""
    import gguf

    path = Path(path)
    if level is not None:
        weights = quantize_weights(weights, level, progress=progress, imatrix=imatrix)
    c = weights.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name or c.name)
    w.add_context_length(c.max_context)
    w.add_embedding_length(c.dim)
    w.add_block_count(c.n_layers)
    w.add_feed_forward_length(c.ffn_dim)
    w.add_head_count(c.n_heads)
    w.add_head_count_kv(c.n_kv_heads)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_expert_count(c.n_experts)
    w.add_expert_used_count(c.n_experts_used)
    w.add_vocab_size(c.vocab_size)
    if level is not None:
        w.add_file_type(int(LEVELS[level].file_type))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokenizer.write_gguf_metadata(w)

    q_rows = k_rows = None
    if c.rope_pairing == "half":
        q_rows = neighbor_row_order(c.n_heads, c.head_dim)
        k_rows = neighbor_row_order(c.n_kv_heads, c.head_dim)
    for tname, t in weights.tensors().items():
        if isinstance(t, np.ndarray):  # norms and router: float32
            w.add_tensor(tname, np.ascontiguousarray(t, dtype=np.float32))
            continue
        rows = q_rows if tname.endswith("attn_q.weight") else k_rows if tname.endswith("attn_k.weight") else None
        w.add_tensor(tname, _byte_array(t, rows), raw_dtype=QType(t.qtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path

"""Quantize a loaded model to a named level, in memory: the offline half of quantization.

quant.recipes decides each tensor's format from its GGUF name; quant.quantize does the numbers. Norms and the
router stay float32, as in llama.cpp and gpt-fast. Tensors already in their target format are kept as they are.
"""
from __future__ import annotations

import re

import numpy as np
from mixlocal.quant import QStack, QTensor, QType, formats, nbytes_for
from mixlocal.quant.quantize import quantize_fast
from mixlocal.quant.recipes import LEVELS, choose_type

from .weights import ModelWeights, assemble

__all__ = ["LEVELS", "quantize_weights"]

_ROWS_PER_CHUNK = 4096  # bounds the float copy made while requantizing one matrix
_LAYER = re.compile(r"blk\.(\d+)\.")


def _requantize_matrix(t: QTensor, target: QType, out: np.ndarray) -> None:
    """Decode t chunk by chunk and encode into out (rows, row_bytes of target)."""
    rows = t.rows_view()
    for r0 in range(0, rows.shape[0], _ROWS_PER_CHUNK):
        chunk = formats.dequantize(t.qtype, rows[r0:r0 + _ROWS_PER_CHUNK])
        out[r0:r0 + chunk.shape[0]] = quantize_fast(target, np.ascontiguousarray(chunk, dtype=np.float32))


def requantize(t: QTensor | QStack, target: QType) -> QTensor:
    """t in format target, as one contiguous QTensor (stacks become a 3-D tensor)."""
    if isinstance(t, QTensor) and t.qtype == target:
        return t
    shape = tuple(t.shape)
    data = np.empty(nbytes_for(target, shape), dtype=np.uint8)
    row_bytes = nbytes_for(target, (shape[-1],))
    if len(shape) == 3:
        per = nbytes_for(target, shape[1:])
        for e in range(shape[0]):
            src = t.expert(e)
            dst = data[e * per:(e + 1) * per].reshape(-1, row_bytes)
            if src.qtype == target:
                dst[:] = src.rows_view()
            else:
                _requantize_matrix(src, target, dst)
    else:
        _requantize_matrix(t, target, data.reshape(-1, row_bytes))
    return QTensor(target, shape, data)


def quantize_weights(weights: ModelWeights, level: str, progress=None) -> ModelWeights:
    """A new ModelWeights with every matrix in the format the level's recipe picks for it."""
    if level not in LEVELS:
        raise ValueError(f"unknown quantization level {level!r}; choose one of {', '.join(LEVELS)}")
    c = weights.config
    out, origin = {}, {}
    items = list(weights.tensors().items())
    for name, t in (progress(items) if progress else items):
        origin[name] = f"{weights.origin.get(name, '?')} ({level})"
        if isinstance(t, np.ndarray):
            out[name] = t
            continue
        m = _LAYER.match(name)
        target = choose_type(level, name, tuple(t.shape), c.n_experts, int(m.group(1)) if m else -1, c.n_layers)
        out[name] = requantize(t, target)
    return assemble(c, out, origin)

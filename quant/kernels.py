"""Matrix products on weights held in ggml block formats.

The API the engine uses:
  prepare(w)                  -> the runtime form of a weight (may repack; called once at load)
  linear(w, x)                -> x @ W.T for a 2-D weight, x float32 (T, K), result float32 (T, N)
  expert_linear(w, x, experts) -> row r of x times expert experts[r] of a stacked (E, N, K) weight

This first version decodes row tiles with the reference dequantizer and hands each tile to BLAS, so it works for
every format the dequantizer knows and never holds a whole dequantized matrix.
"""
from __future__ import annotations

import numpy as np

from . import formats
from .tensor import QStack, QTensor, QType

__all__ = ["prepare", "linear", "expert_linear"]

# ~1 MiB of float32 per tile keeps the decoded tile in L2 while BLAS reads it.
_TILE_FLOATS = 1 << 18


def prepare(w):
    """Return the form of w that linear/expert_linear run fastest on."""
    return w


def _check_x(w, x: np.ndarray) -> np.ndarray:
    if x.ndim != 2 or x.shape[1] != w.shape[-1]:
        raise ValueError(f"activation shape {x.shape} does not fit weight {w.shape}")
    return np.ascontiguousarray(x, dtype=np.float32)


def linear(w: QTensor, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    x = _check_x(w, x)
    n, k = w.shape[-2], w.shape[-1]
    if out is None:
        out = np.empty((x.shape[0], n), dtype=np.float32)
    if w.qtype == QType.F32:
        np.matmul(x, w.data.view(np.float32).reshape(n, k).T, out=out)
        return out
    rows = w.rows_view()
    tile = max(1, _TILE_FLOATS // k)
    for r0 in range(0, n, tile):
        r1 = min(n, r0 + tile)
        out[:, r0:r1] = x @ formats.dequantize(w.qtype, rows[r0:r1]).T
    return out


def expert_linear(w: QTensor | QStack, x: np.ndarray, experts: np.ndarray) -> np.ndarray:
    x = _check_x(w, x)
    experts = np.asarray(experts, dtype=np.int64)
    if experts.shape != (x.shape[0],):
        raise ValueError(f"need one expert id per row: {experts.shape} ids for {x.shape[0]} rows")
    n_exp = w.shape[0]
    if experts.size and (experts.min() < 0 or experts.max() >= n_exp):
        raise ValueError(f"expert ids must be in [0, {n_exp}), got {experts.min()}..{experts.max()}")
    out = np.empty((x.shape[0], w.shape[-2]), dtype=np.float32)
    order = np.argsort(experts, kind="stable")
    bounds = np.searchsorted(experts[order], np.arange(n_exp + 1))
    for e in range(n_exp):
        idx = order[bounds[e]:bounds[e + 1]]
        if idx.size:
            out[idx] = linear(w.expert(e), x[idx])
    return out

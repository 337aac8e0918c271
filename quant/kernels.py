"""Matrix products on weights held in ggml block formats: the public entry of the numba kernels.

The API the engine uses:
  prepare(w)                   -> the runtime form of a weight (called once at load; may repack, see below)
  linear(w, x, out=None)       -> x @ W.T for a 2-D weight, x float32 (T, K), result float32 (T, N)
  expert_linear(w, x, experts) -> row r of x times expert experts[r] of a stacked (E, N, K) weight

Every format reads straight from the file layout through the generic kernels (kernels_generic.py): decode (few rows
of x) fuses block decoding with the dot products; prefill decodes tiles of rows and hands them to BLAS. Nothing ever
holds a whole matrix in float.

Shapes, dtypes and expert ids are all checked here, in Python, before any kernel touches memory: a kernel that reads
past a buffer kills the user's process.
"""
from __future__ import annotations

import numpy as np

from . import kernels_generic as gen
from .tensor import QStack, QTensor, QType, nbytes_for

__all__ = ["prepare", "linear", "expert_linear", "quantizes_activations", "SUPPORTED_TYPES", "KernelInputError"]

SUPPORTED_TYPES = frozenset(gen.FORMAT_CODE)

# Up to this many activation rows per matrix, decoding each weight row once and dotting it with every activation row
# beats decoding tiles for BLAS (the decode costs as much as the dots there).
_FUSED_MAX_ROWS = 16

# Rows of decoded float32 per BLAS tile: ~1 MiB at K=4096, so that the tile is still in L2 when sgemm reads it.
_TILE_FLOATS = 1 << 18


class KernelInputError(ValueError):
    """A weight or activation that the kernels cannot take (wrong shape, dtype, format or expert id)."""


# ---------------------------------------------------------------------------------------------------------------
# prepare
# ---------------------------------------------------------------------------------------------------------------

def prepare(w):
    """Return the form of w that linear/expert_linear run fastest on. It still has .qtype and .shape."""
    _check_weight(w)
    return w


def _check_weight(w) -> None:
    if isinstance(w, QStack):
        for m in w.mats:
            _check_weight(m)
        return
    if not isinstance(w, QTensor):
        raise KernelInputError(f"expected a QTensor or QStack weight, got {type(w).__name__}")
    if w.qtype not in SUPPORTED_TYPES:
        raise KernelInputError(f"no kernel for weight format {w.qtype.name}; supported: "
                               + ", ".join(sorted(t.name for t in SUPPORTED_TYPES)))
    if len(w.shape) not in (2, 3) or min(w.shape) <= 0:
        raise KernelInputError(f"weight must be (rows, cols) or (experts, rows, cols), got shape {w.shape}")
    want = nbytes_for(w.qtype, w.shape)
    if w.data.dtype != np.uint8 or w.data.ndim != 1 or w.data.nbytes != want:
        raise KernelInputError(f"{w.qtype.name} weight {w.shape} needs {want} uint8 bytes, "
                               f"got {w.data.nbytes} of {w.data.dtype}")


# ---------------------------------------------------------------------------------------------------------------
# linear / expert_linear
# ---------------------------------------------------------------------------------------------------------------

def _check_x(w, x) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != w.shape[-1]:
        raise KernelInputError(f"activations of shape {x.shape} do not fit weight {w.shape}: need (T, {w.shape[-1]})")
    if not np.issubdtype(x.dtype, np.floating):
        raise KernelInputError(f"activations must be floating point, got {x.dtype}")
    return np.ascontiguousarray(x, dtype=np.float32)


def _check_out(out, t: int, n: int) -> np.ndarray:
    if out is None:
        return np.empty((t, n), dtype=np.float32)
    if not isinstance(out, np.ndarray) or out.dtype != np.float32 or out.shape != (t, n) \
            or not out.flags.c_contiguous or not out.flags.writeable:
        raise KernelInputError(f"out must be a writeable C-contiguous float32 array of shape {(t, n)}")
    return out


def linear(w, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """x @ W.T for a 2-D weight W (N, K): x float32 (T, K) -> float32 (T, N)."""
    if isinstance(w, QStack) or len(w.shape) != 2:
        raise KernelInputError(f"linear needs a 2-D weight, got shape {w.shape}; use expert_linear for experts")
    _check_weight(w)
    x = _check_x(w, x)
    out = _check_out(out, x.shape[0], w.shape[0])
    if x.shape[0]:
        _matmul(w.qtype, w.rows_view(), x, out)
    return out


def expert_linear(w, x: np.ndarray, experts) -> np.ndarray:
    """Row r of x times expert experts[r] of a stacked (E, N, K) weight: x (R, K), experts (R,) -> (R, N).

    Rows are grouped by expert inside, so each expert's weights are read once for all of its rows.
    """
    if len(w.shape) != 3:
        raise KernelInputError(f"expert_linear needs a stacked (experts, rows, cols) weight, got shape {w.shape}")
    _check_weight(w)
    x = _check_x(w, x)
    ids = _check_experts(experts, x.shape[0], w.shape[0])
    n_exp, n = w.shape[0], w.shape[1]
    out = np.empty((x.shape[0], n), dtype=np.float32)
    if len(ids) == 1:  # a lone row needs no gather or scatter
        _matmul(w.qtype, _expert_rows(w, int(ids[0])), x, out)
        return out
    order = np.argsort(ids, kind="stable")
    bounds = np.searchsorted(ids[order], np.arange(n_exp + 1))
    for e in range(n_exp):
        idx = order[bounds[e]:bounds[e + 1]]
        if idx.size:
            y = np.empty((idx.size, n), dtype=np.float32)
            _matmul(w.qtype, _expert_rows(w, e), np.ascontiguousarray(x[idx]), y)
            out[idx] = y
    return out


def _check_experts(experts, n_rows: int, n_exp: int) -> np.ndarray:
    ids = np.asarray(experts)
    if ids.shape != (n_rows,):
        raise KernelInputError(f"need one expert id per activation row: got ids of shape {ids.shape} "
                               f"for {n_rows} rows")
    if n_rows and not np.issubdtype(ids.dtype, np.integer):
        raise KernelInputError(f"expert ids must be integers, got {ids.dtype}")
    ids = ids.astype(np.int64, copy=False)
    if n_rows and (ids.min() < 0 or ids.max() >= n_exp):
        raise KernelInputError(f"expert ids must be in [0, {n_exp}), got {ids.min()}..{ids.max()}")
    return ids


def _expert_rows(w, e: int) -> np.ndarray:
    if isinstance(w, QStack):
        return w.mats[e].rows_view()
    n = w.shape[1]
    return w.rows_view()[e * n:(e + 1) * n]


# ---------------------------------------------------------------------------------------------------------------
# the file-layout path, every format
# ---------------------------------------------------------------------------------------------------------------

def _matmul(qtype: QType, rows: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
    """out = x @ decode(rows).T; shapes already checked: rows (N, row_bytes), x (T, K), out (T, N)."""
    n, k = out.shape[1], x.shape[1]
    if qtype == QType.F32:
        np.matmul(x, rows.view(np.float32).reshape(n, k).T, out=out)
        return
    fmt = gen.FORMAT_CODE[qtype]
    if x.shape[0] <= _FUSED_MAX_ROWS:
        gen.matmul_rows(fmt, rows, x, out, gen.F16_TABLE)
        return
    tile_rows = max(16, _TILE_FLOATS // k)
    tile = np.empty((min(tile_rows, n), k), dtype=np.float32)
    for r0 in range(0, n, tile_rows):
        r1 = min(n, r0 + tile_rows)
        t = tile[:r1 - r0]
        gen.dequantize_rows(fmt, rows[r0:r1], t, gen.F16_TABLE)
        out[:, r0:r1] = x @ t.T


def quantizes_activations(w, n_rows: int) -> bool:
    """Whether linear/expert_linear round x to 8 bits per 32-block (llama.cpp's Q8_0) for n_rows rows of x on w.

    Integer dot products on int8 activations are what make decode reach the memory roofline; their rounding is the
    one numeric difference from dequantize-then-matmul, so tests and backends can ask for it.
    """
    return False

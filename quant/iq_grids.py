"""The lattice tables of ggml's IQ formats, as numpy arrays.

The tables are published data (ggml's ggml-common.h: iq2xxs_grid, iq2xs_grid, iq2s_grid, iq3xxs_grid, iq3s_grid,
iq1s_grid, ksigns_iq2xs, kvalues_iq4nl). They are not copied here as C text: the grids are decoded at import from
gguf-py's own compact definitions of the same tables (the `grid_hex` / `grid_map` class attributes of
`gguf.quants.IQ2_XXS` and its siblings, where each grid byte is stored as a 2- or 3-bit index into `grid_map`), by
our own decoder below. `ksigns_iq2xs` is computed from its definition (the low 7 bits, plus an 8th bit that makes
the number of set bits even), and `kvalues_iq4nl` is 16 numbers written out. tests/test_iq_formats.py checks
entries of every table against values read from ggml-common.h.

Each grid is an array of shape (entries, 4 or 8): row i is entry i of the C table read as bytes in memory order
(little-endian), which is the order the dequantizers walk them. IQ2/IQ3 grids are uint8 (unsigned magnitudes; a
sign comes from elsewhere), IQ1's is int8 (-1, 0, 1).
"""
from __future__ import annotations

import numpy as np
from gguf import quants as _gq

__all__ = ["IQ1S_DELTA", "IQ1S_GRID", "IQ2S_GRID", "IQ2XS_GRID", "IQ2XXS_GRID", "IQ3S_GRID", "IQ3XXS_GRID",
           "KSIGNS", "KVALUES_IQ4NL"]


def _decode(cls, dtype) -> np.ndarray:
    """Grid of a gguf-py quant class: hex text -> bytes -> fixed-width indices (low bits first) -> grid_map values."""
    rows, width = cls.grid_shape
    values = np.array(cls.grid_map, dtype=np.int64)
    bits = int(np.ceil(np.log2(len(values))))
    per_byte = 8 // bits  # 2-bit indices: 4 per byte; 3-bit indices: 2 per byte (one per nibble)
    step = 8 // per_byte
    raw = np.frombuffer(bytes.fromhex(cls.grid_hex.decode("ascii")), dtype=np.uint8).astype(np.int64)
    idx = (raw[:, None] >> (step * np.arange(per_byte))) & ((1 << bits) - 1)
    grid = values[idx.reshape(-1)]
    if grid.size != rows * width:
        raise ValueError(f"{cls.__name__}: grid decodes to {grid.size} values, expected {rows * width}")
    out = grid.reshape(rows, width).astype(dtype)
    out.setflags(write=False)
    return out


IQ2XXS_GRID = _decode(_gq.IQ2_XXS, np.uint8)   # (256, 8), values 8, 25, 43
IQ2XS_GRID = _decode(_gq.IQ2_XS, np.uint8)     # (512, 8)
IQ2S_GRID = _decode(_gq.IQ2_S, np.uint8)       # (1024, 8)
IQ3XXS_GRID = _decode(_gq.IQ3_XXS, np.uint8)   # (256, 4), values 4, 12, ..., 62
IQ3S_GRID = _decode(_gq.IQ3_S, np.uint8)       # (512, 4), values 1, 3, ..., 15
IQ1S_GRID = _decode(_gq.IQ1_S, np.int8)        # (2048, 8), values -1, 0, 1

# ksigns_iq2xs[i]: i's 7 sign bits plus an 8th that makes the parity even (the 8th sign is implied by the others).
_i = np.arange(128)
KSIGNS = (_i | ((np.array([int(v).bit_count() for v in _i]) & 1) << 7)).astype(np.uint8)
KSIGNS.setflags(write=False)

# The 16 non-linear levels of IQ4_NL and IQ4_XS.
KVALUES_IQ4NL = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int8)
KVALUES_IQ4NL.setflags(write=False)

IQ1S_DELTA = np.float32(0.125)  # ggml's IQ1S_DELTA: IQ1 values are grid +- delta

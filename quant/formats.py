"""Block formats, byte-identical to ggml: reference dequantize (and quantize) in numpy.

Placeholder holding only the float formats; the quant issue fills in every ggml block format.
"""
from __future__ import annotations

import numpy as np

from .tensor import QType

__all__ = ["dequantize"]


def dequantize(qtype: QType, data: np.ndarray) -> np.ndarray:
    """Decode raw bytes shaped (..., row_bytes) into float32 shaped (..., cols)."""
    data = np.ascontiguousarray(data, dtype=np.uint8)
    if qtype == QType.F32:
        return data.view(np.float32).copy()
    if qtype == QType.F16:
        return data.view(np.float16).astype(np.float32)
    if qtype == QType.BF16:
        return (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    raise NotImplementedError(f"no dequantizer for {qtype.name} yet")

"""QTensor: a weight as stored bytes plus the ggml format that explains them.

Every weight the engine touches is a QTensor, float or quantized, so that model code never branches on format.
The bytes are usually a slice of a memory map and are never copied here.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QType

__all__ = ["QStack", "QTensor", "QType", "block_size", "matrices", "nbytes_for", "type_size"]


def block_size(qtype: QType) -> int:
    """Elements per block (1 for float types)."""
    return GGML_QUANT_SIZES[qtype][0]


def type_size(qtype: QType) -> int:
    """Bytes per block."""
    return GGML_QUANT_SIZES[qtype][1]


def nbytes_for(qtype: QType, shape: tuple[int, ...]) -> int:
    """Bytes that a tensor of this logical shape occupies; the last axis must be whole blocks."""
    bs, ts = GGML_QUANT_SIZES[qtype]
    if not shape or shape[-1] % bs:
        raise ValueError(f"{qtype.name} needs a last axis that is a multiple of {bs}, got shape {shape}")
    n = 1
    for d in shape:
        n *= int(d)
    return n // bs * ts


@dataclass(frozen=True)
class QTensor:
    """A tensor in a ggml block format.

    shape is the logical shape in numpy order: (rows, cols) or (experts, rows, cols). cols is the contiguous axis,
    the one blocks run along. data is a 1-D uint8 view of exactly nbytes_for(qtype, shape) bytes.
    """

    qtype: QType
    shape: tuple[int, ...]
    data: np.ndarray

    def __post_init__(self):
        if self.data.dtype != np.uint8 or self.data.ndim != 1:
            raise ValueError(f"QTensor data must be 1-D uint8, got {self.data.dtype} with ndim {self.data.ndim}")
        want = nbytes_for(self.qtype, self.shape)
        if self.data.nbytes != want:
            raise ValueError(
                f"QTensor {self.qtype.name} {self.shape} needs {want} bytes, got {self.data.nbytes}")

    @property
    def rows(self) -> int:
        return self.shape[-2] if len(self.shape) >= 2 else 1

    @property
    def cols(self) -> int:
        return self.shape[-1]

    @property
    def row_bytes(self) -> int:
        return nbytes_for(self.qtype, (self.cols,))

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape))

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / self.n_elements

    def rows_view(self) -> np.ndarray:
        """The bytes as (n_rows, row_bytes), all leading axes flattened into rows."""
        return self.data.reshape(-1, self.row_bytes)

    def expert(self, e: int) -> QTensor:
        """The e-th matrix of a stacked (E, rows, cols) tensor, without a copy."""
        if len(self.shape) != 3:
            raise ValueError(f"expert() needs a 3-D stacked tensor, got shape {self.shape}")
        if not 0 <= e < self.shape[0]:
            raise IndexError(f"expert {e} out of range for {self.shape[0]} experts")
        per = nbytes_for(self.qtype, self.shape[1:])
        return QTensor(self.qtype, tuple(self.shape[1:]), self.data[e * per:(e + 1) * per])

    @classmethod
    def from_float(cls, array: np.ndarray, qtype: QType = QType.F32) -> QTensor:
        """Wrap a float array as F32/F16 without quantizing (tests and small tensors)."""
        dtype = {QType.F32: np.float32, QType.F16: np.float16}[qtype]
        a = np.ascontiguousarray(array, dtype=dtype)
        return cls(qtype, tuple(a.shape), a.reshape(-1).view(np.uint8))


@dataclass(frozen=True)
class QStack:
    """E matrices of one format and shape that are not adjacent in memory (HF checkpoints store experts apart).

    It answers the same questions as a stacked 3-D QTensor, so kernels and model code take either.
    """

    mats: tuple[QTensor, ...]

    def __post_init__(self):
        if not self.mats:
            raise ValueError("QStack needs at least one matrix")
        first = self.mats[0]
        for m in self.mats[1:]:
            if m.qtype != first.qtype or m.shape != first.shape:
                raise ValueError(f"QStack matrices disagree: {first.qtype.name}{first.shape} vs {m.qtype.name}{m.shape}")

    @property
    def qtype(self) -> QType:
        return self.mats[0].qtype

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.mats),) + tuple(self.mats[0].shape)

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.mats)

    @property
    def n_elements(self) -> int:
        return sum(m.n_elements for m in self.mats)

    def expert(self, e: int) -> QTensor:
        if not 0 <= e < len(self.mats):
            raise IndexError(f"expert {e} out of range for {len(self.mats)} experts")
        return self.mats[e]


def matrices(t: QTensor | QStack) -> list[QTensor]:
    """The 2-D matrices of a tensor: itself, or each expert of a stack (a QStack or a 3-D QTensor)."""
    return [t.expert(e) for e in range(t.shape[0])] if len(t.shape) == 3 else [t]

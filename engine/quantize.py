"""Quantize a loaded model to a named level, in memory: the offline half of quantization.

quant.recipes decides each tensor's format from its GGUF name; quant.quantize does the numbers. Norms and the
router stay float32, as in llama.cpp and gpt-fast. Tensors already in their target format are kept as they are.
"""
from __future__ import annotations

import re

import numpy as np
from gguf import LlamaFileType
from mixlocal.quant import QStack, QTensor, QType, formats, nbytes_for
from mixlocal.quant.quantize import IMATRIX_TYPES, QUANTIZE_TYPES, quantize_fast
from mixlocal.quant.recipes import LEVELS, choose_type

from .weights import ModelWeights, assemble

__all__ = ["LEVELS", "MissingImatrixError", "MissingQuantizerError", "check_level", "missing_quantizers",
           "quantize_weights", "target_types"]

_ROWS_PER_CHUNK = 4096  # bounds the float copy made while requantizing one matrix
_LAYER = re.compile(r"blk\.(\d+)\.")


def _requantize_matrix(t: QTensor, target: QType, out: np.ndarray, importance: np.ndarray | None = None) -> None:
    """Decode t chunk by chunk and encode into out (rows, row_bytes of target), weighted by importance (cols,)."""
    rows = t.rows_view()
    for r0 in range(0, rows.shape[0], _ROWS_PER_CHUNK):
        chunk = formats.dequantize(t.qtype, rows[r0:r0 + _ROWS_PER_CHUNK])
        out[r0:r0 + chunk.shape[0]] = quantize_fast(target, np.ascontiguousarray(chunk, dtype=np.float32), importance)


def requantize(t: QTensor | QStack, target: QType, importance: np.ndarray | None = None) -> QTensor:
    """t in format target, as one contiguous QTensor (stacks become a 3-D tensor). importance: the imatrix rows
    (n_mat, cols), one per expert of a stack, as `quant.imatrix.Imatrix.importance` gives them."""
    if isinstance(t, QTensor) and t.qtype == target and importance is None:
        return t
    shape = tuple(t.shape)
    data = np.empty(nbytes_for(target, shape), dtype=np.uint8)
    row_bytes = nbytes_for(target, (shape[-1],))
    if len(shape) == 3:
        per = nbytes_for(target, shape[1:])
        for e in range(shape[0]):
            src = t.expert(e)
            dst = data[e * per:(e + 1) * per].reshape(-1, row_bytes)
            if src.qtype == target and importance is None:
                dst[:] = src.rows_view()
            else:
                _requantize_matrix(src, target, dst, None if importance is None else importance[e])
    else:
        _requantize_matrix(t, target, data.reshape(-1, row_bytes), None if importance is None else importance[0])
    return QTensor(target, shape, data)


def target_types(weights: ModelWeights, level: str, imatrix: bool = False) -> dict[str, QType]:
    """The format the level's recipe picks for every matrix of weights (imatrix: whether one will be given)."""
    if level not in LEVELS:
        raise ValueError(f"unknown quantization level {level!r}; choose one of {', '.join(LEVELS)}")
    c = weights.config
    # the imatrix flag goes only when set, so that a stand-in choose_type taking the six positionals still fits
    extra = {"imatrix": True} if imatrix else {}
    targets = {}
    for name, t in weights.tensors().items():
        if not isinstance(t, np.ndarray):
            m = _LAYER.match(name)
            targets[name] = choose_type(level, name, tuple(t.shape), c.n_experts, int(m.group(1)) if m else -1,
                                        c.n_layers, **extra)
    return targets


def missing_quantizers(weights: ModelWeights, level: str, imatrix: bool = False) -> list[QType]:
    """The formats the level would have to encode that quant.quantize has no quantizer for (tensors already in
    their target format are kept, so they need none)."""
    tensors = weights.tensors()
    missing = {q for name, q in target_types(weights, level, imatrix).items()
               if q not in QUANTIZE_TYPES and getattr(tensors[name], "qtype", None) != q}
    return sorted(missing, key=lambda q: q.name)


def check_level(weights: ModelWeights, level: str, imatrix=None) -> dict[str, QType]:
    """What quantize_weights refuses before any work, raised the same way; else the target formats.

    A format we cannot encode (MissingQuantizerError) is said first: no importance matrix, however long it took to
    compute, would help. Then a format llama.cpp only makes with an importance matrix, for a tensor that has no
    entry in the one given, or with none given (MissingImatrixError)."""
    targets = target_types(weights, level, imatrix is not None)
    missing = missing_quantizers(weights, level, imatrix is not None)
    if missing:
        raise MissingQuantizerError(level, missing)
    for name, target in targets.items():
        if _requires_imatrix(level, name, target) and (imatrix is None or name not in imatrix.entries):
            fix = ("give one with --imatrix (mixlocal imatrix computes it)" if imatrix is None
                   else "the importance matrix given has no entry for it")
            raise MissingImatrixError(f"{level} makes {name} {target.name}, which llama.cpp refuses to "
                                      f"quantize without an importance matrix; {fix}")
    return targets


def quantize_weights(weights: ModelWeights, level: str, progress=None, imatrix=None) -> ModelWeights:
    """A new ModelWeights with every matrix in the format the level's recipe picks for it.

    imatrix: a `quant.imatrix.Imatrix`; every matrix it has an entry for is quantized with ggml's weighted search
    (experts each with their own row), and the recipe takes llama.cpp's with-imatrix choices. A level whose formats
    llama.cpp refuses to make without one (IQ3_XXS, IQ2_*, IQ1_*, Q2_K in q2_k_s) is refused here too, naming the
    first tensor; before that, a level with a format we cannot encode yet is a MissingQuantizerError naming it. Both
    before any work (check_level)."""
    c = weights.config
    out, origin = {}, {}
    items = list(weights.tensors().items())
    targets = check_level(weights, level, imatrix)
    for name, t in (progress(items) if progress else items):
        origin[name] = f"{weights.origin.get(name, '?')} ({level})"
        if isinstance(t, np.ndarray):
            out[name] = t
            continue
        importance = None if imatrix is None else imatrix.importance(name, tuple(t.shape))
        if importance is not None and targets[name] not in IMATRIX_TYPES:
            importance = None  # ggml ignores an imatrix in the other formats (Q8_0, F16...)
        out[name] = requantize(t, targets[name], importance)
    return assemble(c, out, origin)


class MissingQuantizerError(ValueError):
    """A level picks a format that mixlocal reads but cannot encode yet."""

    def __init__(self, level: str, types: list[QType]):
        self.level, self.types = level, list(types)
        names = ", ".join(q.name for q in self.types)
        super().__init__(f"{level} needs {names}, which mixlocal cannot quantize to yet (it can: "
                         f"{', '.join(q.name for q in QUANTIZE_TYPES)})")


class MissingImatrixError(ValueError):
    """A level asks for a format that is only made with an importance matrix, and none was given for a tensor."""


_NEEDS_IMATRIX = (QType.IQ3_XXS, QType.IQ2_XXS, QType.IQ2_XS, QType.IQ2_S, QType.IQ1_S, QType.IQ1_M)


def _requires_imatrix(level: str, name: str, target: QType) -> bool:
    """llama.cpp's rule (llama-quant.cpp, tensor_requires_imatrix): never the embeddings or the output head."""
    if name in ("token_embd.weight", "output.weight"):
        return False
    return target in _NEEDS_IMATRIX or (target == QType.Q2_K
                                         and LEVELS[level].file_type == LlamaFileType.MOSTLY_Q2_K_S)

"""Numbers only: ggml block formats, their reference codecs, numba kernels and quantization recipes.

Knows nothing of models or of the engine.
"""
from .tensor import QStack, QTensor, QType, block_size, matrices, nbytes_for, type_size

__all__ = ["QStack", "QTensor", "QType", "block_size", "matrices", "nbytes_for", "type_size"]

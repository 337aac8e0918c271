"""Numbers only: ggml block formats, their reference codecs, numba kernels and quantization recipes.

Knows nothing of models or of the engine.
"""
from .tensor import QTensor, QType, block_size, nbytes_for, type_size

__all__ = ["QTensor", "QType", "block_size", "type_size", "nbytes_for"]

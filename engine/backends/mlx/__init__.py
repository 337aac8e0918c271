"""The MLX backend: MLX arrays on Metal on a Mac, on the CPU elsewhere.

`backend.py` turns the weights into MLX arrays once (ggml blocks into affine groups through quant/affine.py) and runs
the forward pass as one lazy graph; `cache.py` is its KV cache. Importing this package imports mlx.
"""
from .backend import MLXBackend, Precision, choose_precision, to_affine
from .cache import KV_DTYPES, MLXKVCache

__all__ = ["KV_DTYPES", "MLXBackend", "MLXKVCache", "Precision", "choose_precision", "to_affine"]

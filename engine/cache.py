"""KV cache: room for n_ctx positions, memory committed only as positions fill.

Keys and values live per layer as (n_kv_heads, n_ctx, head_dim), head-major, so that attention reads one head's
positions contiguously. The arrays come from np.zeros, which the allocator serves with untouched zero pages for
large sizes: a 32K-position cache costs address space at load and memory only for the positions written.
f16 is stored as raw uint16 because numba has no float16 arrays; kernels decode it through a 64K-entry table.
"""
from __future__ import annotations

import numpy as np

from .config import ModelConfig
from .errors import ContextOverflowError

__all__ = ["KVCache", "KV_TYPES", "F16_TO_F32"]

KV_TYPES = {"f32": np.float32, "f16": np.uint16}

# Every float16 bit pattern decoded once; attention kernels index it with the stored uint16.
F16_TO_F32 = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)


class KVCache:
    def __init__(self, config: ModelConfig, n_ctx: int, kv_type: str = "f16"):
        if kv_type not in KV_TYPES:
            raise ValueError(f"kv_type must be one of {sorted(KV_TYPES)}, got {kv_type!r}")
        if not isinstance(n_ctx, int) or n_ctx <= 0:
            raise ValueError(f"n_ctx must be a positive integer, got {n_ctx!r}")
        self.n_ctx = n_ctx
        self.kv_type = kv_type
        shape = (config.n_layers, config.n_kv_heads, n_ctx, config.head_dim)
        self.k = np.zeros(shape, dtype=KV_TYPES[kv_type])
        self.v = np.zeros(shape, dtype=KV_TYPES[kv_type])
        self.n_past = 0

    @property
    def bytes_per_token(self) -> int:
        layers, heads, _, dim = self.k.shape
        return 2 * layers * heads * dim * self.k.itemsize

    def check_room(self, n_new: int) -> None:
        if self.n_past + n_new > self.n_ctx:
            raise ContextOverflowError(
                f"context overflow: {self.n_past} tokens in the cache + {n_new} new > n_ctx {self.n_ctx}")

    def store(self, layer: int, pos: int, k: np.ndarray, v: np.ndarray) -> None:
        """Write k, v of shape (T, n_kv_heads, head_dim) at positions pos..pos+T-1."""
        t = k.shape[0]
        if pos + t > self.n_ctx:
            raise ContextOverflowError(f"context overflow: position {pos + t} > n_ctx {self.n_ctx}")
        if self.kv_type == "f16":
            k = k.astype(np.float16).view(np.uint16)
            v = v.astype(np.float16).view(np.uint16)
        self.k[layer, :, pos:pos + t] = k.transpose(1, 0, 2)
        self.v[layer, :, pos:pos + t] = v.transpose(1, 0, 2)

    def trim(self, n: int) -> None:
        """Keep the first n positions (prompt reuse); later writes overwrite the rest."""
        if not 0 <= n <= self.n_past:
            raise ValueError(f"cannot trim a cache of {self.n_past} positions to {n}")
        self.n_past = n

    def reset(self) -> None:
        self.n_past = 0

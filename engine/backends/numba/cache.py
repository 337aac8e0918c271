"""KV cache: room for n_ctx positions, memory committed only as positions fill.

Keys and values live per layer as (n_kv_heads, n_ctx, row), head-major, so that attention reads one head's
positions contiguously. The arrays sit on fresh anonymous memory maps, whose pages the OS commits on first write:
a 32K-position cache costs address space at load and memory only for the positions written, and reset() gives it
all back. (np.zeros does this only when malloc chooses mmap, which depends on its thresholds and on what was
freed before: a recycled heap chunk gets zeroed, and so committed, whole.)

Formats (`kv_type`), each a row layout that the attention kernel decodes by the array's dtype:
  f32   float32, head_dim values                        4 bytes per value
  f16   uint16 float16 bit patterns (numba has no f16)  2 bytes per value
  q8_0  uint8 ggml Q8_0 blocks along head_dim: per 32 values one float16 scale then 32 int8, the bytes of
        llama.cpp's q8_0 cache type                     34/32 = 1.0625 bytes per value
"""
from __future__ import annotations

import mmap

import numpy as np
from mixlocal.quant import QType, block_size, type_size
from mixlocal.quant.quantize import quantize_fast

from ...config import ModelConfig
from ...errors import ContextOverflowError

__all__ = ["KV_TYPES", "KVCache", "kv_row_size"]

KV_TYPES = {"f32": np.float32, "f16": np.uint16, "q8_0": np.uint8}  # format -> storage dtype

_Q8_0_BLOCK, _Q8_0_BYTES = block_size(QType.Q8_0), type_size(QType.Q8_0)  # 32 values in 34 bytes


def kv_row_size(kv_type: str, head_dim: int) -> int:
    """Elements of the storage dtype that hold one head's key (or value) at one position."""
    if kv_type not in KV_TYPES:
        raise ValueError(f"kv_type must be one of {', '.join(KV_TYPES)}, got {kv_type!r}")
    if kv_type == "q8_0":
        if head_dim % _Q8_0_BLOCK:
            raise ValueError(f"kv_type q8_0 needs head_dim to be a multiple of {_Q8_0_BLOCK}, got {head_dim}")
        return head_dim // _Q8_0_BLOCK * _Q8_0_BYTES
    return head_dim


def _zero_pages(shape: tuple[int, ...], dtype) -> np.ndarray:
    """A zero array on its own anonymous map: nothing committed until written, unmapped when the array goes."""
    count = int(np.prod(shape))
    buf = mmap.mmap(-1, max(1, count * np.dtype(dtype).itemsize))
    return np.frombuffer(buf, dtype=dtype, count=count).reshape(shape)


class KVCache:
    def __init__(self, config: ModelConfig, n_ctx: int, kv_type: str = "f16"):
        if not isinstance(n_ctx, int) or isinstance(n_ctx, bool) or n_ctx <= 0:
            raise ValueError(f"n_ctx must be a positive integer, got {n_ctx!r}")
        self.row = kv_row_size(kv_type, config.head_dim)
        self.n_ctx = n_ctx
        self.kv_type = kv_type
        self.n_layers, self.n_kv_heads, self.head_dim = config.n_layers, config.n_kv_heads, config.head_dim
        self._allocate()

    def _allocate(self) -> None:
        shape = (self.n_layers, self.n_kv_heads, self.n_ctx, self.row)
        self.k = _zero_pages(shape, KV_TYPES[self.kv_type])
        self.v = _zero_pages(shape, KV_TYPES[self.kv_type])
        self.n_past = 0
        self._written = 0  # one past the highest position ever stored: what reset has to give back

    @property
    def bytes_per_token(self) -> int:
        """Bytes of keys and values that one position holds, over all layers."""
        return 2 * self.n_layers * self.n_kv_heads * self.row * self.k.itemsize

    @property
    def bytes_in_use(self) -> int:
        """Bytes that the positions held now occupy (memory is committed in pages, so this is a lower bound)."""
        return self.n_past * self.bytes_per_token

    def check_room(self, n_new: int) -> None:
        if self.n_past + n_new > self.n_ctx:
            raise ContextOverflowError(
                f"context overflow: {self.n_past} tokens in the cache + {n_new} new > n_ctx {self.n_ctx}")

    def encode(self, x: np.ndarray) -> np.ndarray:
        """float32 (T, n_kv_heads, head_dim) -> the stored rows (T, n_kv_heads, row)."""
        if self.kv_type == "f32":
            return x
        if self.kv_type == "f16":
            return x.astype(np.float16).view(np.uint16)
        t, h, d = x.shape
        return quantize_fast(QType.Q8_0, np.ascontiguousarray(x, dtype=np.float32).reshape(t * h, d)).reshape(t, h, -1)

    def store(self, layer: int, pos: int, k: np.ndarray, v: np.ndarray) -> None:
        """Write k, v of shape (T, n_kv_heads, head_dim) at positions pos..pos+T-1."""
        want = (self.n_kv_heads, self.head_dim)
        if k.shape != v.shape or k.ndim != 3 or k.shape[1:] != want:
            raise ValueError(f"KV store: k {k.shape} and v {v.shape} must both be (T, {want[0]}, {want[1]})")
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"KV store: layer {layer} outside 0..{self.n_layers - 1}")
        t = k.shape[0]
        if pos < 0 or pos + t > self.n_ctx:
            raise ContextOverflowError(f"context overflow: position {pos + t} > n_ctx {self.n_ctx}")
        self.k[layer, :, pos:pos + t] = self.encode(k).transpose(1, 0, 2)
        self.v[layer, :, pos:pos + t] = self.encode(v).transpose(1, 0, 2)
        self._written = max(self._written, pos + t)

    def advance(self, n: int) -> None:
        """Count n more positions as held, written by the caller straight into k and v (the decode step)."""
        self.check_room(n)
        self.n_past += n
        self._written = max(self._written, self.n_past)

    def trim(self, n: int) -> None:
        """Keep the first n positions (prompt reuse); later writes overwrite the rest."""
        if not 0 <= n <= self.n_past:
            raise ValueError(f"cannot trim a cache of {self.n_past} positions to {n}")
        self.n_past = n

    def reset(self) -> None:
        """Empty the cache and give its memory back: fresh zero pages, nothing committed until written again."""
        if self._written:
            self._allocate()
        self.n_past = 0

"""The MLX backend's KV cache: keys and values as MLX arrays, grown as positions fill."""
from __future__ import annotations

import mlx.core as mx

from ...config import ModelConfig
from ...errors import ContextOverflowError

__all__ = ["KV_DTYPES", "MLXKVCache"]

KV_DTYPES = {"f32": mx.float32, "f16": mx.float16, "bf16": mx.bfloat16}


class MLXKVCache:
    """Keys and values per layer as MLX arrays (1, Hkv, capacity, Dh), grown in steps of STEP positions as they
    fill (mlx-lm's scheme), never beyond n_ctx: a 32K context costs memory only for the positions used."""

    STEP = 256

    @staticmethod
    def check_type(kv_type: str) -> None:
        if kv_type not in KV_DTYPES:
            raise ValueError(f"kv_type must be one of {sorted(KV_DTYPES)}, got {kv_type!r}")

    def __init__(self, config: ModelConfig, n_ctx: int, kv_type: str = "f16"):
        self.check_type(kv_type)
        if not isinstance(n_ctx, int) or n_ctx <= 0:
            raise ValueError(f"n_ctx must be a positive integer, got {n_ctx!r}")
        self.n_ctx = n_ctx
        self.kv_type = kv_type
        self.dtype = KV_DTYPES[kv_type]
        self.n_layers, self.n_kv_heads, self.head_dim = config.n_layers, config.n_kv_heads, config.head_dim
        self.k: list[mx.array | None] = [None] * config.n_layers
        self.v: list[mx.array | None] = [None] * config.n_layers
        self.n_past = 0

    @property
    def capacity(self) -> int:
        return 0 if self.k[0] is None else self.k[0].shape[2]

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * self.dtype.size

    def check_room(self, n_new: int) -> None:
        if self.n_past + n_new > self.n_ctx:
            raise ContextOverflowError(
                f"context overflow: {self.n_past} tokens in the cache + {n_new} new > n_ctx {self.n_ctx}")

    def update_and_fetch(self, layer: int, pos: int, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        """Write k, v (1, Hkv, T, Dh) at positions pos.. and return all keys and values up to pos + T."""
        end = pos + k.shape[2]
        if end > self.n_ctx:
            raise ContextOverflowError(f"context overflow: position {end} > n_ctx {self.n_ctx}")
        have = 0 if self.k[layer] is None else self.k[layer].shape[2]
        if end > have:
            grown = min(self.n_ctx, -(-end // self.STEP) * self.STEP)
            shape = (1, self.n_kv_heads, grown - have, self.head_dim)
            # two separate arrays: slice assignment below updates an mx.array object in place
            k_new, v_new = mx.zeros(shape, dtype=self.dtype), mx.zeros(shape, dtype=self.dtype)
            self.k[layer] = k_new if have == 0 else mx.concatenate([self.k[layer], k_new], axis=2)
            self.v[layer] = v_new if have == 0 else mx.concatenate([self.v[layer], v_new], axis=2)
        self.k[layer][:, :, pos:end, :] = k.astype(self.dtype)
        self.v[layer][:, :, pos:end, :] = v.astype(self.dtype)
        return self.k[layer][:, :, :end, :], self.v[layer][:, :, :end, :]

    def arrays(self) -> list[mx.array]:
        return [a for a in self.k + self.v if a is not None]

    def trim(self, n: int) -> None:
        """Keep the first n positions (prompt reuse); later writes overwrite the rest."""
        if not 0 <= n <= self.n_past:
            raise ValueError(f"cannot trim a cache of {self.n_past} positions to {n}")
        self.n_past = n

    def reset(self) -> None:
        self.n_past = 0

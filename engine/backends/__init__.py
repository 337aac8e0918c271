"""What every backend promises: the Backend and KVCache protocols, and RouterTrace.

A backend turns (weights, tokens, its own KV cache) into logits. Loading runs in stages (engine/loader.py): a source
gives `ModelWeights` in the form it stores them, then `<Backend>.build(weights, n_ctx=..., ...)` makes the backend
and the cache it runs with; `LLM` drives them through these protocols only. Each backend is a folder here
(`numba/`, `mlx/`) that imports no other backend, and this module imports none, so loading one never loads the
other. An option a backend cannot honour is a ValueError naming it (`refuse_options`), never ignored.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from ..config import ModelConfig
    from ..weights import ModelWeights

__all__ = ["BACKENDS", "Backend", "KVCache", "RouterTrace", "refuse_options"]

BACKENDS = ("numba", "mlx")


@dataclass
class RouterTrace:
    """The named intermediates of one MoE block, so backends can be compared step by step."""
    logits: np.ndarray     # (T, E) float32
    expert_ids: np.ndarray  # (T, A) int64
    weights: np.ndarray    # (T, A) float32, renormalised over the A chosen


@runtime_checkable
class KVCache(Protocol):
    """Keys and values of the positions seen so far, in whatever form the backend's attention reads."""
    n_ctx: int      # positions it has room for
    n_past: int     # positions held now
    kv_type: str    # the element format, one of the backend's own list

    @property
    def bytes_per_token(self) -> int:
        """Bytes of keys and values that one position holds, over all layers."""

    def check_room(self, n_new: int) -> None:
        """ContextOverflowError if n_new more positions do not fit."""

    def trim(self, n: int) -> None:
        """Keep the first n positions (prompt reuse)."""

    def reset(self) -> None:
        """Empty the cache."""


@runtime_checkable
class Backend(Protocol):
    name: str
    config: ModelConfig
    trace: list[RouterTrace] | None  # set to [] to record each MoE block's routing

    @classmethod
    def build(cls, weights: ModelWeights, *, n_ctx: int, n_threads: int | None = None, kv_type: str = "f16",
              packed_cache: bool | None = None, kernels: str | None = None, mem_budget=None,
              expert_policy: str | None = None) -> tuple[Backend, KVCache]:
        """The backend for these weights and an empty cache for n_ctx positions. Options it cannot honour are a
        ValueError naming them."""

    def forward(self, tokens: np.ndarray, cache: KVCache, last_only: bool) -> np.ndarray:
        """Run T tokens at positions cache.n_past.., advance the cache; float32 logits (T, V), or (1, V)."""

    def close(self) -> None:
        """Release what the backend holds open (threads, files); the backend is unusable after."""


def refuse_options(backend: str, why: str, **options) -> None:
    """ValueError naming every option given (not None) that the backend has no use for, and why."""
    given = [name for name, value in options.items() if value is not None]
    if given:
        names = given[0] if len(given) == 1 else ", ".join(given[:-1]) + " and " + given[-1]
        raise ValueError(f"{names} {'is not an option' if len(given) == 1 else 'are not options'} of the {backend} "
                         f"backend ({why})")


"""Turning logits into the next token: repetition penalty, temperature, top-k, top-p, min-p, a seeded draw."""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

__all__ = ["Sampler", "SamplingParams"]


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.7
    top_k: int = 0            # 0 = off
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None

    def __post_init__(self):
        checks = [
            (self.temperature >= 0, "temperature must be >= 0"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.repeat_penalty > 0, "repeat_penalty must be > 0"),
            (self.repeat_last_n >= 0, "repeat_last_n must be >= 0"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    def with_(self, **kw) -> SamplingParams:
        return replace(self, **{k: v for k, v in kw.items() if v is not None})


class Sampler:
    """Stateful only in its random generator, so a seed makes a whole generation repeatable."""

    def __init__(self, params: SamplingParams):
        self.p = params
        self.rng = np.random.default_rng(params.seed)

    def penalize(self, logits: np.ndarray, history: list[int]) -> np.ndarray:
        p = self.p
        if not history or (p.repeat_penalty == 1.0 and p.presence_penalty == 0 and p.frequency_penalty == 0):
            return logits
        logits = logits.copy()
        if p.repeat_penalty != 1.0 and p.repeat_last_n:
            recent = np.unique(np.asarray(history[-p.repeat_last_n:]))
            vals = logits[recent]
            # llama.cpp's rule: shrink positive logits, push negative ones further down.
            logits[recent] = np.where(vals > 0, vals / p.repeat_penalty, vals * p.repeat_penalty)
        if p.presence_penalty or p.frequency_penalty:
            ids, counts = np.unique(np.asarray(history), return_counts=True)
            logits[ids] -= p.presence_penalty + p.frequency_penalty * counts
        return logits

    def probabilities(self, logits: np.ndarray, history: list[int]) -> np.ndarray:
        """The distribution the next token is drawn from, after every filter (temperature > 0)."""
        p = self.p
        z = self.penalize(np.asarray(logits, dtype=np.float64), history) / p.temperature
        keep = np.ones(z.shape, dtype=bool)
        if p.top_k and p.top_k < z.size:
            kth = np.partition(z, -p.top_k)[-p.top_k]
            keep &= z >= kth
        z = np.where(keep, z, -np.inf)
        probs = np.exp(z - z.max())
        probs /= probs.sum()
        if p.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cum = np.cumsum(probs[order])
            cut = int(np.searchsorted(cum, p.top_p)) + 1   # smallest prefix whose mass reaches top_p
            mask = np.zeros_like(keep)
            mask[order[:cut]] = True
            probs = np.where(mask, probs, 0.0)
        if p.min_p > 0:
            probs = np.where(probs >= p.min_p * probs.max(), probs, 0.0)
        return probs / probs.sum()

    def sample(self, logits: np.ndarray, history: list[int]) -> int:
        if self.p.temperature == 0:
            return int(np.argmax(self.penalize(np.asarray(logits, dtype=np.float64), history)))
        probs = self.probabilities(logits, history)
        return int(self.rng.choice(probs.size, p=probs))

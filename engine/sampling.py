"""Turning logits into the next token: repetition penalty, temperature, top-k, top-p, min-p, a seeded draw."""
from __future__ import annotations

from dataclasses import Field, dataclass, field, fields, replace

import numpy as np

__all__ = ["Range", "Sampler", "SamplingParams", "sampling_fields"]


@dataclass(frozen=True)
class Range:
    """The values a parameter takes: lo to hi (None: no upper bound), lo itself excluded when lo_open."""
    lo: float
    hi: float | None = None
    lo_open: bool = False

    def __contains__(self, value) -> bool:
        return (self.lo < value if self.lo_open else self.lo <= value) and (self.hi is None or value <= self.hi)

    def __str__(self) -> str:
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}]"


def _param(default, values: Range, help: str, *, api_default=None, api_values: Range | None = None,
           flags: tuple[str, ...] = ()):
    """A SamplingParams field and what every surface needs to offer it: the values the sampler accepts, a help
    line for the command line (flags, when not --name-with-dashes), and the server's default and range where OpenAI's
    API differs from ours (its clients expect temperature 1 and no top-p/min-p cut when they send nothing)."""
    return field(default=default, metadata={
        "values": values, "help": help, "flags": flags,
        "api_default": default if api_default is None else api_default,
        "api_values": api_values or values})


@dataclass(frozen=True)
class SamplingParams:
    """Every sampling parameter, its default and its range: the Python API (LLM.generate and friends take these
    names as keywords), the command line (one flag each) and the server (one request field each) derive theirs
    from the fields here, so a new parameter is added in one place."""
    temperature: float = _param(0.7, Range(0), "temperature, 0 for greedy", api_default=1.0,
                                api_values=Range(0, 2), flags=("--temp", "--temperature"))
    top_k: int = _param(0, Range(0), "keep only the k most likely tokens, 0 for off")
    top_p: float = _param(0.95, Range(0, 1, lo_open=True), "nucleus sampling mass", api_default=1.0)
    min_p: float = _param(0.05, Range(0, 1), "min-p cut, relative to the top token", api_default=0.0)
    repeat_penalty: float = _param(1.0, Range(0, lo_open=True), "repetition penalty, 1 for off",
                                   api_values=Range(0, 10, lo_open=True))
    repeat_last_n: int = _param(64, Range(0), "how many recent tokens the repetition penalty looks at")
    presence_penalty: float = _param(0.0, Range(-2, 2), "subtracted once from every token already in the context")
    frequency_penalty: float = _param(0.0, Range(-2, 2), "subtracted per occurrence of a token in the context")
    seed: int | None = None   # None: a different draw every time

    def __post_init__(self):
        for f in sampling_fields():
            values = f.metadata["values"]
            if getattr(self, f.name) not in values:
                raise ValueError(f"{f.name} must be {values}")

    def with_(self, **kw) -> SamplingParams:
        """A copy with the given fields changed; None keeps a field's value."""
        unknown = sorted(set(kw) - {f.name for f in fields(self)})
        if unknown:
            raise TypeError(f"unknown sampling parameter {unknown[0]!r}; the parameters are "
                            f"{', '.join(f.name for f in fields(self))}")
        return replace(self, **{k: v for k, v in kw.items() if v is not None})

    def as_kwargs(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def sampling_fields() -> tuple[Field, ...]:
    """The SamplingParams fields that carry a range and a help line: every one but the seed."""
    return tuple(f for f in fields(SamplingParams) if "values" in f.metadata)


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

"""Compute an importance matrix the way llama.cpp's llama-imatrix does, through the engine's own forward pass.

For every weight matrix of the blocks, the sum over the tokens of each input column's squared activation (and the
plain sum), and the token count; an expert stack gets one row and one count per expert, from the tokens routed to
that expert only. What is counted follows tools/imatrix/imatrix.cpp (collect_imatrix, compute_imatrix):

- the text is tokenized with BOS and cut into chunks of `chunk` tokens (llama-imatrix's -c; the last partial chunk
  is dropped, and `skip` whole chunks at the start are left out, its --chunk); each chunk starts from an empty KV
  cache with its first token replaced by BOS, and every token of it counts (the second half of a chunk matters only
  to the perplexity llama-imatrix prints, which is not computed here);
- a dense product is counted only when it runs on at least 16 tokens at once, and only inside the blocks (the
  output head is left out, as llama-imatrix leaves it out without --process-output); expert products always count.

The numba backend hands each product's input to `observer` (its `_observe` hook); this module only adds them up,
in float64. The result is a `quant.imatrix.Imatrix`, written with `quant.imatrix.write_imatrix`.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
from mixlocal.quant.imatrix import Imatrix, ImatrixEntry

__all__ = ["MIN_DENSE_TOKENS", "ImatrixCollector", "chunk_tokens", "compute_imatrix"]

MIN_DENSE_TOKENS = 16  # collect_imatrix: "if (src1->ne[1] < 16 ...) return false" for plain matrix products


class ImatrixCollector:
    """The observer the backend calls: (weight names, input rows (R, cols) float32, experts) where experts is None
    for a dense product, else (R, k) expert ids: row r of the input feeds the experts experts[r, :]."""

    def __init__(self, n_experts: int):
        self.n_experts = n_experts
        self.sums2: dict[str, np.ndarray] = {}
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, np.ndarray] = {}

    def _add(self, name: str, s2: np.ndarray, s: np.ndarray, n: np.ndarray) -> None:
        if name not in self.sums2:
            self.sums2[name], self.sums[name], self.counts[name] = s2.copy(), s.copy(), n.copy()
            return
        if self.sums2[name].shape != s2.shape:
            raise ValueError(f"{name}: inputs of {s2.shape} after {self.sums2[name].shape}; the model changed shape")
        self.sums2[name] += s2
        self.sums[name] += s
        self.counts[name] += n

    def __call__(self, names: Iterable[str], x: np.ndarray, experts: np.ndarray | None) -> None:
        x = np.asarray(x, dtype=np.float64).reshape(x.shape[0], -1)
        if experts is None:
            if x.shape[0] < MIN_DENSE_TOKENS:
                return
            s2, s = (x * x).sum(axis=0)[None], x.sum(axis=0)[None]
            n = np.array([x.shape[0]], np.int64)
        else:
            ids = np.asarray(experts).reshape(x.shape[0], -1)
            if ids.size and (ids.min() < 0 or ids.max() >= self.n_experts):
                raise ValueError(f"expert ids outside 0..{self.n_experts - 1} for {', '.join(names)}")
            routed = np.zeros((x.shape[0], self.n_experts))  # how many times row r goes to expert e
            np.add.at(routed, (np.repeat(np.arange(x.shape[0]), ids.shape[1]), ids.reshape(-1)), 1.0)
            s2, s = routed.T @ (x * x), routed.T @ x
            n = routed.sum(axis=0).astype(np.int64)
        for name in names:
            self._add(name, s2, s, n)

    def imatrix(self, datasets: list[str], chunk_count: int, chunk_size: int) -> Imatrix:
        entries = {name: ImatrixEntry(self.sums2[name].astype(np.float32), self.counts[name].astype(np.float32),
                                      self.sums[name].astype(np.float32)) for name in sorted(self.sums2)}
        return Imatrix(entries, datasets, chunk_count, chunk_size)


def chunk_tokens(ids: list[int], chunk: int, n_chunks: int | None, bos_id: int | None,
                 skip: int = 0) -> list[np.ndarray]:
    """The chunks llama-imatrix evaluates: after the first `skip` chunks, whole chunks of `chunk` tokens, at most
    n_chunks, each starting at BOS."""
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of tokens, got {chunk}")
    if n_chunks is not None and n_chunks < 1:
        raise ValueError(f"chunks must be positive, got {n_chunks}")
    if skip < 0:
        raise ValueError(f"the number of chunks to skip must be 0 or more, got {skip}")
    if skip and skip * chunk >= len(ids):
        raise ValueError(f"skipping {skip} chunks of {chunk} leaves none of the text's {len(ids)} tokens")
    ids = ids[skip * chunk:]
    available = len(ids) // chunk
    if available == 0:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one chunk of {chunk}; give more text or a "
                         "smaller chunk (-c)")
    count = available if n_chunks is None else min(n_chunks, available)
    out = []
    for i in range(count):
        c = np.array(ids[i * chunk:(i + 1) * chunk], dtype=np.int64)
        if bos_id is not None and bos_id >= 0:
            c[0] = bos_id
        out.append(c)
    return out


def compute_imatrix(llm, text: str, *, chunk: int = 512, n_chunks: int | None = None, skip: int = 0,
                    dataset: str = "", progress: Callable[[Iterable], Iterable] | None = None) -> Imatrix:
    """The importance matrix of `llm` (a loaded mixlocal LLM on the numba backend) over `text`."""
    backend = llm.backend
    if not hasattr(backend, "observer"):
        raise ValueError(f"{type(backend).__name__} cannot report the inputs of its products; "
                         "compute the importance matrix with backend='numba'")
    if chunk > llm.cache.n_ctx:
        raise ValueError(f"chunk {chunk} is longer than the context of {llm.cache.n_ctx}; load with n_ctx >= chunk")
    tok = llm.tokenizer
    bos = tok.bos_id if getattr(tok, "add_bos_token", True) else None
    chunks = chunk_tokens(tok.encode(text, add_bos=bos is not None), chunk, n_chunks, bos, skip)
    collector = ImatrixCollector(llm.config.n_experts)
    backend.observer = collector
    try:
        for ids in (progress(chunks) if progress else chunks):
            llm.reset()
            llm.eval(ids, logits="all")  # all rows through the last block, as llama-imatrix asks for all logits
    finally:
        backend.observer = None
        llm.reset()
    return collector.imatrix([dataset] if dataset else [], len(chunks), chunk)

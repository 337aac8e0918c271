"""One level of `mixlocal bench`, measured in a process of its own (`python -m mixlocal.engine.cli.bench_worker --worker
SPEC`, started by engine/cli/bench.py), so that its peak resident memory is its own.

A worker loads the model at its level, times prefill and decode, then runs the perplexity text:

- The text is cut into chunks of `ppl_ctx` tokens. Each chunk is evaluated from an empty context, starting with BOS,
  and only the predictions in its second half are scored, so every scored token has at least ppl_ctx/2 tokens of
  context (llama-perplexity's protocol).
- ppl is exp(mean negative log-likelihood) over the scored tokens.
- Quality against a reference, as llama-perplexity's KL-divergence mode reports it: `kld`, the mean
  KL(reference || level) of the next-token distributions, and `top1`, the fraction of positions where both pick the
  same most likely token.
  The reference keeps only its REF_TOP_K most likely tokens per position plus the probability left over ("tail"),
  so its distribution is stored coarsened into K+1 buckets. The KL of the coarsened distributions is a lower bound
  of the full one and equals it when the tail carries little mass; top-1 agreement is exact.
- The reference's numbers go to a compressed .npz (`--save-ref`), which a later run compares against (`--ref-file`):
  a float Mixtral does not fit a laptop, so its reference is made once where it fits.

Everything is measured through the public API (engine.load, LLM.eval, the tokenizer); a level quantized with an
importance matrix goes through engine.load's own stages instead, since engine.load takes none.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from ..weights import weight_stats

__all__ = ["REF_TOP_K", "BenchError", "Reference", "chunk_indices", "main"]

REF_TOP_K = 32
REF_FORMAT = 1


class BenchError(ValueError):
    """A bench that cannot run as asked; the message names the level, file or flag."""


def _load_and_size(spec: dict):
    """engine.load at the spec's level, and weight_stats of the weights the backend is built from: after any
    quantization, as load's on_weights hook sees them, since the MLX backend turns them into its own arrays and lets
    them go."""
    from mixlocal import engine

    if spec.get("imatrix"):
        return _load_with_imatrix(spec)
    seen: dict = {}
    llm = engine.load(spec["source"], quant=spec["quant"], backend=spec["backend"], n_threads=spec["threads"],
                      n_ctx=spec["n_ctx"], kv_type=spec.get("kv_type", "f16"),
                      on_weights=lambda weights: seen.update(stats=weight_stats(weights)))
    return llm, seen["stats"]


def _load_with_imatrix(spec: dict):
    """engine.load's stages, with quantize_weights given the importance matrix (engine.load takes none): the same
    source, options, checks and backend build as the run without it."""
    from mixlocal.quant.imatrix import read_imatrix

    from ..llm import LLM
    from ..loader import backend_class, read_source, resolve_backend
    from ..quantize import quantize_weights
    from ..weights import in_ggml_blocks

    cls = backend_class(resolve_backend(spec["backend"]))
    options = cls.check_options(n_ctx=spec["n_ctx"], n_threads=spec["threads"], kv_type=spec.get("kv_type", "f16"),
                                packed_cache=None, kernels=None, mem_budget=None, expert_policy=None)
    config, weights, tok, name = read_source(spec["source"])
    weights = quantize_weights(in_ggml_blocks(weights), spec["quant"], imatrix=read_imatrix(spec["imatrix"]))
    stats = weight_stats(weights)
    backend, cache = cls.build(weights, **options)
    return LLM(config, backend, tok, cache, name=name, source=str(spec["source"])), stats


# ---------------------------------------------------------------------------------------------------------------------
# Worker: one level, one process
# ---------------------------------------------------------------------------------------------------------------------

def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    z -= np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return z


def _peak_rss_bytes() -> int | None:
    """Peak resident memory, or None where the OS does not report it (Windows has no `resource`)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS reports bytes, Linux kibibytes


class Reference:
    """A reference level's top-k log-probabilities at every scored position, from or for an .npz file."""

    def __init__(self, tokens, ppl_ctx, top_ids, top_logprobs, tail, level, model):
        self.tokens, self.ppl_ctx = np.asarray(tokens, np.int32), int(ppl_ctx)
        self.top_ids, self.top_logprobs = np.asarray(top_ids, np.int32), np.asarray(top_logprobs, np.float32)
        self.tail, self.level, self.model = np.asarray(tail, np.float64), str(level), str(model)

    def save(self, path: Path) -> None:
        with open(path, "wb") as f:
            np.savez_compressed(f, format=REF_FORMAT, tokens=self.tokens, ppl_ctx=self.ppl_ctx, top_ids=self.top_ids,
                                top_logprobs=self.top_logprobs, tail=self.tail, level=self.level, model=self.model)

    @classmethod
    def load(cls, path: Path) -> Reference:
        try:
            with np.load(path, allow_pickle=False) as z:
                if int(z["format"]) != REF_FORMAT:
                    raise BenchError(f"{path}: reference format {int(z['format'])}, this mixlocal reads {REF_FORMAT}")
                return cls(z["tokens"], z["ppl_ctx"], z["top_ids"], z["top_logprobs"], z["tail"], z["level"],
                           z["model"])
        except BenchError:
            raise
        except (OSError, ValueError, KeyError) as e:
            raise BenchError(f"{path}: not a mixlocal reference file ({e})") from None

    def check_matches(self, tokens: np.ndarray, ppl_ctx: int, n_scored: int, where: str) -> None:
        if self.ppl_ctx != ppl_ctx:
            raise BenchError(f"{where}: the reference was made with --ppl-ctx {self.ppl_ctx}, this run uses {ppl_ctx}")
        if self.tokens.shape != tokens.shape or not np.array_equal(self.tokens, tokens):
            raise BenchError(f"{where}: the reference was made on a different text or tokenizer "
                             f"({self.tokens.size} tokens vs {tokens.size})")
        if self.top_ids.shape[0] != n_scored:
            raise BenchError(f"{where}: the reference scores {self.top_ids.shape[0]} positions, this run would "
                             f"score {n_scored} (a different --ppl-chunks?)")


def chunk_indices(n_tokens: int, ppl_ctx: int, max_chunks: int | None) -> list[int]:
    n_chunks = n_tokens // ppl_ctx
    if max_chunks is not None:
        n_chunks = min(n_chunks, max_chunks)
    return list(range(n_chunks))


def _emit(**event) -> None:
    print(json.dumps(event), flush=True)


def _worker(spec: dict) -> dict:
    from mixlocal import engine  # noqa: F401 - imported before the clock starts: load_s is the load, not Python's imports

    level, ppl_ctx = spec["quant"], spec["ppl_ctx"]
    n_prompt, n_gen = spec["n_prompt"], spec["n_gen"]
    t0 = time.perf_counter()
    llm, stats = _load_and_size(dict(spec, n_ctx=max(ppl_ctx, n_prompt + n_gen + 1)))
    load_s = time.perf_counter() - t0
    tokens = np.asarray(llm.tokenizer.encode(Path(spec["ppl_file"]).read_text(encoding="utf-8"), add_bos=False),
                        dtype=np.int32)
    chunks = chunk_indices(tokens.size, ppl_ctx, spec.get("ppl_chunks"))
    if not chunks:
        raise BenchError(f"{spec['ppl_file']}: {tokens.size} tokens, fewer than one --ppl-ctx chunk of {ppl_ctx}")
    half = ppl_ctx // 2
    ref = Reference.load(Path(spec["ref_file"])) if spec.get("ref_file") else None
    if ref is not None:
        ref.check_matches(tokens, ppl_ctx, len(chunks) * (ppl_ctx - half), spec["ref_file"])
    _emit(total=3 + len(chunks))
    _emit(step="loaded")

    # Speed. The first calls compile or fetch numba kernels from the cache; they are not what a user waits for
    # per token, so one short warm-up runs both paths before anything is timed.
    prompt = np.resize(tokens, n_prompt).tolist()  # the text itself, repeated if shorter than n_prompt
    llm.reset()
    last = llm.eval(prompt[:8], logits="last")[-1]
    llm.eval([int(np.argmax(last))], logits="last")
    llm.reset()
    t = time.perf_counter()
    last = llm.eval(prompt, logits="last")[-1]
    pp_tps = n_prompt / (time.perf_counter() - t)
    _emit(step="prefill")
    t = time.perf_counter()
    for _ in range(n_gen):  # greedy decode after the prompt: n_gen tokens whatever they are, EOS included
        last = llm.eval([int(np.argmax(last))], logits="last")[-1]
    tg_tps = n_gen / (time.perf_counter() - t) if n_gen else 0.0
    _emit(step="decode")

    # Quality.
    nll, top_ids, top_lps, tails, kl, agree = [], [], [], [], [], []
    at = 0  # scored positions so far: the row offset into the reference
    for ci in chunks:
        chunk = tokens[ci * ppl_ctx:(ci + 1) * ppl_ctx]
        llm.reset()
        logits = llm.eval([llm.tokenizer.bos_id] + chunk[:-1].tolist(), logits="all")  # row j predicts chunk[j]
        lp = _log_softmax(logits[half:])                                                  # (S, V) float64
        target = chunk[half:]
        rows = np.arange(lp.shape[0])
        nll.append(-lp[rows, target])
        ids = np.argpartition(-lp, REF_TOP_K, axis=1)[:, :REF_TOP_K]
        ids = np.take_along_axis(ids, np.argsort(-np.take_along_axis(lp, ids, 1), axis=1, kind="stable"), 1)
        top_ids.append(ids.astype(np.int32))
        top_lps.append(np.take_along_axis(lp, ids, 1).astype(np.float32))
        tails.append(_tail_mass(lp, ids))
        if ref is not None:
            span = slice(at, at + lp.shape[0])
            kl.append(_coarse_kl(ref.top_logprobs[span], ref.tail[span], lp, ref.top_ids[span]))
            agree.append(np.argmax(lp, axis=1) == ref.top_ids[span, 0])
        at += lp.shape[0]
        _emit(step="ppl")
    del llm
    result = {"quant": level, "size_bytes": stats["size_bytes"], "bits_per_weight": stats["bits_per_weight"],
              "load_s": load_s, "pp_tps": pp_tps, "tg_tps": tg_tps, "peak_rss_bytes": _peak_rss_bytes(),
              "ppl": float(np.exp(np.concatenate(nll).mean())), "kld": None, "top1": None}
    if spec.get("save_ref"):
        mine = Reference(tokens, ppl_ctx, np.concatenate(top_ids), np.concatenate(top_lps), np.concatenate(tails),
                          level, spec["source"])
        mine.save(Path(spec["save_ref"]))
    if ref is not None:
        result["kld"] = float(np.concatenate(kl).mean())
        result["top1"] = float(np.concatenate(agree).mean())
    return result


def _tail_mass(lp: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Probability outside ids per row, summed directly (1 - sum(top) would cancel when the top holds ~all of it)."""
    p = np.exp(lp)
    np.put_along_axis(p, ids, 0.0, axis=1)
    return p.sum(axis=1)


def _coarse_kl(ref_lp: np.ndarray, ref_tail: np.ndarray, lp: np.ndarray, ref_ids: np.ndarray) -> np.ndarray:
    """KL(ref || ours) per row over the reference's top-k tokens plus one bucket for everything else."""
    ref_lp = ref_lp.astype(np.float64)
    ours = np.take_along_axis(lp, ref_ids.astype(np.int64), 1)
    kl = (np.exp(ref_lp) * (ref_lp - ours)).sum(axis=1)
    our_tail = np.maximum(_tail_mass(lp, ref_ids.astype(np.int64)), 1e-300)
    with np.errstate(divide="ignore", invalid="ignore"):
        tail_term = np.where(ref_tail > 0, ref_tail * (np.log(np.maximum(ref_tail, 1e-300)) - np.log(our_tail)), 0.0)
    return kl + tail_term


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    try:
        _emit(result=_worker(spec))
    except (ValueError, OSError, MemoryError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {msg}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        sys.exit(main(sys.argv[2:]))
    print("engine.cli.bench_worker is run by `mixlocal bench`", file=sys.stderr)
    sys.exit(2)

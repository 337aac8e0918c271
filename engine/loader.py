"""engine.load: resolve a source, map its weights, pick a backend, build the LLM."""
from __future__ import annotations

import platform
import sys
from collections.abc import Callable
from pathlib import Path

from mixlocal.tokenizer import Tokenizer

from .cache import KVCache
from .errors import ModelFormatError
from .llm import LLM
from .machine import available_memory, physical_cores
from .weights import ModelWeights

__all__ = ["DEFAULT_MODEL", "DEFAULT_MODEL_DIR", "load", "open_source"]

DEFAULT_MODEL_DIR = Path(__file__).parent / "data" / "default"
DEFAULT_MODEL = DEFAULT_MODEL_DIR / "model.gguf"  # trained here by tools/train_default_model.py, q8_0 by our quantizer


def open_source(source, backend: str = "numba"):
    """Resolve a source to (config, weights, tokenizer, name). Sources never compute.

    backend ("numba" or "mlx") only matters for mlx-community folders, whose affine triplets the MLX backend takes
    as they are and the numba backend gets as ggml blocks."""
    if source is None:
        source = DEFAULT_MODEL
        if not source.exists():
            raise ModelFormatError(f"{source}: the embedded default model is not installed")
    from .sources.hub import looks_like_hub_id
    from .sources.hub import resolve as resolve_hub_id
    if looks_like_hub_id(source):  # owner/name[:TAG] that is not a local path: the cached hub snapshot
        source = resolve_hub_id(source)
    path = Path(source)
    if path.is_dir():
        from .sources.hf import load_hf
        from .sources.mlx import is_mlx_dir, load_mlx
        if is_mlx_dir(path):
            config, weights, tok_path = load_mlx(path, layout="mlx" if backend == "mlx" else "ggml")
            return config, weights, Tokenizer.from_file(tok_path), path.name
        if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
            config, weights, tok_path = load_hf(path)
            return config, weights, Tokenizer.from_file(tok_path), path.name
        raise ModelFormatError(f"{path}: not a model directory (needs config.json and *.safetensors)")
    if path.is_file():
        from .sources.gguf import load_gguf
        config, weights, meta = load_gguf(path)
        if "tokenizer.ggml.tokens" not in meta:
            raise ModelFormatError(f"{path}: GGUF has no tokenizer metadata (tokenizer.ggml.tokens)")
        return config, weights, Tokenizer.from_gguf_fields(meta, source=str(path)), config.name
    raise ModelFormatError(f"{path}: no such file or directory")


def load(source=None, *, quant: str | None = None, backend: str = "auto", n_ctx: int = 32768,
         n_threads: int | None = None, kv_type: str = "f16", packed_cache: bool | None = None,
         kernels: str | None = None, on_weights: Callable[[ModelWeights], None] | None = None,
         mem_budget=None, expert_policy: str = "lfru") -> LLM:
    """Load a model. source: None (the embedded default), an HF directory, a .gguf file, or a hub id.

    packed_cache (numba backend): the kernels' repacked form of Q4_0/Q8_0/Q4_K weights is written once to a file in
    the cache directory and memory-mapped on later loads (engine/packed_cache.py). None: only for models with at
    least 256 MB of such weights; False: repack in memory at every load; True: always.

    kernels (numba backend): the kernel family, "avx512vnni", "avxvnni", "avx2" or "portable"; None reads
    $MIXLOCAL_KERNELS, else takes the fastest this CPU runs. A family the CPU cannot run is a ValueError.

    on_weights: called with the ModelWeights the backend is about to be built from (after quant=), for callers that
    describe what runs (`mixlocal bench` sizes each level this way): the MLX backend converts them and lets them go.

    mem_budget (numba backend): the memory the model may use, in bytes or as "16GiB" / "12GB"; None: the memory
    available now. The KV cache for n_ctx tokens and a margin come off it; if the weights do not fit in the rest,
    the dense weights stay resident and each block keeps as many experts as fit, reading the others from the file
    when a token needs them (engine/backends/experts.py; expert_policy "lfru", "lfu" or "lru" picks which leave).
    A budget too small for the dense weights plus two experts per block is a MemoryBudgetError (a ValueError)."""
    if not isinstance(n_ctx, int) or n_ctx <= 0:
        raise ValueError(f"n_ctx must be a positive integer, got {n_ctx!r}")
    if n_threads is not None and (not isinstance(n_threads, int) or n_threads <= 0):
        raise ValueError(f"n_threads must be a positive integer, got {n_threads!r}")
    backend = resolve_backend(backend)
    if backend == "numba":
        from mixlocal.quant.kernels import resolve_family
        kernels = resolve_family(kernels)  # a bad name fails before the model is read
    # requantizing at load works on ggml blocks, so an MLX folder then comes in ggml layout for either backend
    config, weights, tok, name = open_source(source, backend if quant is None else "numba")
    if quant is not None:
        from .quantize import quantize_weights
        weights = quantize_weights(weights, quant)
    if tok.vocab_size > config.vocab_size:
        raise ModelFormatError(f"{name}: tokenizer has {tok.vocab_size} ids but the model only {config.vocab_size}")
    if on_weights is not None:
        on_weights(weights)
    if backend == "mlx":
        if mem_budget is not None:
            raise ValueError("mem_budget is a numba-backend option: MLX keeps the whole model in unified memory")
        from .backends.mlx import MLXBackend, MLXKVCache
        return LLM(config, MLXBackend(weights), tok, MLXKVCache(config, n_ctx, kv_type), name=name,
                   source=str(source))
    from .backends.numba_cpu import NumbaCPUBackend
    cache = KVCache(config, n_ctx, kv_type)  # pages are committed as positions fill, so this costs nothing yet
    weight_budget, said = weight_budget_for(mem_budget, cache.bytes_per_token * n_ctx)
    be = NumbaCPUBackend(weights, n_threads or physical_cores(), packed_cache=packed_cache, family=kernels,
                         weight_budget=weight_budget, expert_policy=expert_policy)
    if be.store is not None:
        b = be.budget
        print(f"mixlocal: memory budget {said}: dense weights {b['dense'] / 2**30:.2f} GiB resident, "
              f"{b['n_slots']} of {config.n_experts} experts per block in memory "
              f"({b['n_slots'] * b['slot'] * config.n_layers / 2**30:.2f} GiB), the rest read from "
              f"{be.store.reader.path} "
              "when needed", file=sys.stderr, flush=True)
    return LLM(config, be, tok, cache, name=name, source=str(source))


# Left out of a memory budget for what is not weights or KV cache: activations, the tokenizer, Python and numba.
BUDGET_MARGIN = 512 << 20


def weight_budget_for(mem_budget, kv_bytes: int) -> tuple[int | None, str]:
    """Bytes the weights may use under mem_budget (None: the memory available now), after the KV cache for the
    whole context and BUDGET_MARGIN; and how the budget reads in a message. None: no limit known."""
    from .backends.experts import MemoryBudgetError, parse_size
    if mem_budget is None:
        avail = available_memory()
        if avail is None:
            return None, "unknown"
        budget, said = avail, f"{avail / 2**30:.1f} GiB (available now)"
    else:
        budget = parse_size(mem_budget)
        said = f"{budget / 2**30:.1f} GiB"
    weights = budget - kv_bytes - BUDGET_MARGIN
    if weights <= 0:
        raise MemoryBudgetError(f"a memory budget of {budget / 2**30:.2f} GiB leaves nothing for the weights after "
                                f"the KV cache ({kv_bytes / 2**30:.2f} GiB for n_ctx tokens) and a "
                                f"{BUDGET_MARGIN >> 20} MiB margin; lower n_ctx or raise the budget")
    return weights, said


def _mlx_importable() -> bool:
    try:
        import mlx.core  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str) -> str:
    """"auto" is MLX on Apple Silicon when mlx imports, numba elsewhere."""
    if backend == "auto":
        apple = sys.platform == "darwin" and platform.machine() == "arm64"
        return "mlx" if apple and _mlx_importable() else "numba"
    if backend == "mlx" and not _mlx_importable():
        raise ValueError("backend 'mlx' needs the mlx package: pip install 'mixlocal[mlx]' (mlx[cpu] on Linux)")
    if backend not in ("numba", "mlx"):
        raise ValueError(f"unknown backend {backend!r}; choose auto, numba or mlx")
    return backend

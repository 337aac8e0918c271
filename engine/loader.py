"""engine.load in stages: resolve and read a source (backend-neutral), then `<Backend>.build(weights, ...)`.

A source gives `ModelWeights` in the form it stores them (`read_source`); requantizing (quant=) works on ggml blocks;
the backend chosen builds itself and its KV cache from the weights (engine/backends/__init__.py: the protocols)."""
from __future__ import annotations

import platform
import sys
from collections.abc import Callable
from pathlib import Path

from mixlocal.tokenizer import Tokenizer

from .backends import BACKENDS
from .errors import ModelFormatError
from .llm import LLM
from .weights import ModelWeights, in_ggml_blocks

__all__ = ["DEFAULT_MODEL", "DEFAULT_MODEL_DIR", "backend_class", "load", "open_source", "read_source"]

DEFAULT_MODEL_DIR = Path(__file__).parent / "data" / "default"
DEFAULT_MODEL = DEFAULT_MODEL_DIR / "model.gguf"  # trained here by tools/train_default_model.py, q8_0 by our quantizer


def read_source(source):
    """Resolve a source to (config, weights, tokenizer, name), the weights in the form the source stores them
    (an mlx-community folder's matrices stay MLX affine groups). Sources never compute."""
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
            config, weights, tok_path = load_mlx(path)
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


def open_source(source):
    """read_source with the weights in ggml blocks, the form requantizing, the GGUF writer and `mixlocal info`
    read (engine/weights.py: in_ggml_blocks)."""
    config, weights, tok, name = read_source(source)
    return config, in_ggml_blocks(weights), tok, name


def backend_class(name: str) -> type:
    """The class of a backend by name ("numba", "mlx"), importing only that backend."""
    if name == "numba":
        from .backends.numba.backend import NumbaCPUBackend
        return NumbaCPUBackend
    if name == "mlx":
        from .backends.mlx import MLXBackend
        return MLXBackend
    raise ValueError(f"unknown backend {name!r}; choose auto, {' or '.join(BACKENDS)}")


def load(source=None, *, quant: str | None = None, backend: str = "auto", n_ctx: int = 32768,
         n_threads: int | None = None, kv_type: str = "f16", packed_cache: bool | None = None,
         kernels: str | None = None, on_weights: Callable[[ModelWeights], None] | None = None,
         mem_budget=None, expert_policy: str | None = None) -> LLM:
    """Load a model. source: None (the embedded default), an HF directory, a .gguf file, or a hub id.

    n_threads (numba backend): compute threads; None: the physical cores.

    packed_cache (numba backend): the kernels' repacked form of Q4_0/Q8_0/Q4_K weights is written once to a file in
    the cache directory and memory-mapped on later loads (engine/backends/numba/packed_cache.py). None: only for
    models with at least 256 MB of such weights; False: repack in memory at every load; True: always.

    kernels (numba backend): the kernel family, "avx512vnni", "avxvnni", "avx2" or "portable"; None reads
    $MIXLOCAL_KERNELS, else takes the fastest this CPU runs. A family the CPU cannot run is a ValueError.

    on_weights: called with the ModelWeights the backend is about to be built from (after quant=), for callers that
    describe what runs (`mixlocal bench` sizes each level this way): the MLX backend converts them and lets them go.

    mem_budget (numba backend): the memory the model may use, in bytes or as "16GiB" / "12GB"; None: the memory
    available now. The KV cache for n_ctx tokens and a margin come off it; if the weights do not fit in the rest,
    the dense weights stay resident and each block keeps as many experts as fit, reading the others from the file
    when a token needs them (engine/backends/numba/experts.py; expert_policy "lfru" (None), "lfu" or "lru" picks
    which leave). A budget too small for the dense weights plus two experts per block is a MemoryBudgetError (a
    ValueError).

    A numba-backend option given to the MLX backend is a ValueError naming it."""
    if not isinstance(n_ctx, int) or n_ctx <= 0:
        raise ValueError(f"n_ctx must be a positive integer, got {n_ctx!r}")
    if n_threads is not None and (not isinstance(n_threads, int) or n_threads <= 0):
        raise ValueError(f"n_threads must be a positive integer, got {n_threads!r}")
    cls = backend_class(resolve_backend(backend))
    # every option is checked (a bad kernel family, budget or cache format) before the model is read
    options = cls.check_options(n_ctx=n_ctx, n_threads=n_threads, kv_type=kv_type, packed_cache=packed_cache,
                                kernels=kernels, mem_budget=mem_budget, expert_policy=expert_policy)
    config, weights, tok, name = read_source(source)
    if quant is not None:
        from .quantize import quantize_weights
        weights = quantize_weights(in_ggml_blocks(weights), quant)  # requantizing reads ggml blocks
    if tok.vocab_size > config.vocab_size:
        raise ModelFormatError(f"{name}: tokenizer has {tok.vocab_size} ids but the model only {config.vocab_size}")
    if on_weights is not None:
        on_weights(weights)
    be, cache = cls.build(weights, **options)
    return LLM(config, be, tok, cache, name=name, source=str(source))


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

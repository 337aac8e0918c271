"""Loading in stages (engine/loader.py, engine/backends/__init__.py): sources do not know the backend, every backend
builds itself and its KV cache behind the Backend / KVCache protocols, and an option a backend cannot honour is a
ValueError naming it, raised before the model is read."""
from __future__ import annotations

import numpy as np
import pytest
from mixlocal.engine.backends import Backend, KVCache
from mixlocal.engine.loader import open_source, read_source
from mixlocal.engine.sources.mlx import write_mlx_folder
from mixlocal.quant import QType, formats
from mixlocal.quant.affine import AffineTensor

from mixlocal import engine

IDS = [1, 415, 2936, 9060, 285, 1142, 754, 272]


def _has_mlx() -> bool:
    try:
        import mlx.core  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def mlx_folder(hf_model_dir, tmp_path_factory):
    _, weights, _, _ = read_source(hf_model_dir)
    return write_mlx_folder(weights, hf_model_dir / "tokenizer.model", tmp_path_factory.mktemp("mlx") / "m",
                            bits=4, group_size=32)


def test_a_source_gives_what_it_stores_whatever_the_backend(mlx_folder):
    _, stored, _, _ = read_source(mlx_folder)
    assert isinstance(stored.layers[0].w1, AffineTensor) and isinstance(stored.layers[0].wq, AffineTensor)
    _, blocks, _, _ = open_source(mlx_folder)  # ggml blocks for requantizing, export and info: 4-bit groups -> Q4_1
    assert blocks.layers[0].w1.qtype == QType.Q4_1 and blocks.layers[0].wq.qtype == QType.Q4_1
    got = formats.dequantize(QType.Q4_1, blocks.layers[0].w1.expert(1).rows_view())
    np.testing.assert_array_equal(got.reshape(stored.layers[0].w1.shape[1:]), stored.layers[0].w1.expert(1).dequantize())


def test_the_numba_backend_builds_from_the_stored_form(mlx_folder):
    """It turns the affine groups into ggml blocks itself: the same logits as a load of the ggml form."""
    llm = engine.load(mlx_folder, backend="numba", n_ctx=32, kv_type="f32")
    assert isinstance(llm.backend, Backend) and isinstance(llm.cache, KVCache)
    assert llm.backend.mats[0]["w1"].qtype == QType.Q4_1
    config, blocks, tok, name = open_source(mlx_folder)
    from mixlocal.engine.backends.numba.backend import NumbaCPUBackend
    from mixlocal.engine.llm import LLM
    be, cache = NumbaCPUBackend.build(blocks, n_ctx=32, kv_type="f32")
    np.testing.assert_array_equal(llm.eval(IDS), LLM(config, be, tok, cache, name=name).eval(IDS))


@pytest.mark.parametrize("option, value", [("n_threads", 2), ("packed_cache", False), ("kernels", "portable"),
                                           ("mem_budget", "8GiB"), ("expert_policy", "lru")])
def test_mlx_refuses_each_numba_option_before_reading_the_model(option, value, tmp_path):
    if not _has_mlx():
        pytest.skip("mlx is not installed")
    missing = tmp_path / "no_such_model.gguf"  # the option is refused first, so the source is never opened
    with pytest.raises(ValueError, match=f"{option} is not an option of the mlx backend"):
        engine.load(missing, backend="mlx", **{option: value})


def test_the_mlx_backend_and_its_cache_follow_the_protocols(mlx_folder):
    if not _has_mlx():
        pytest.skip("mlx is not installed")
    llm = engine.load(mlx_folder, backend="mlx", n_ctx=32, kv_type="f32")
    assert isinstance(llm.backend, Backend) and isinstance(llm.cache, KVCache)
    assert llm.eval(IDS).shape == (len(IDS), llm.config.vocab_size)


@pytest.mark.parametrize("kwargs, named", [({"expert_policy": "fifo"}, "expert_policy"), ({"kv_type": "bf16"}, "kv_type"),
                                           ({"mem_budget": "lots"}, "lots"), ({"kernels": "sse9"}, "sse9")])
def test_numba_options_are_checked_before_reading_the_model(kwargs, named, tmp_path):
    with pytest.raises(ValueError, match=named):
        engine.load(tmp_path / "no_such_model.gguf", backend="numba", **kwargs)

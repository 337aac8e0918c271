"""The MLX backend (mlx[cpu] here): against transformers in float32, against the numba backend on the same GGUF
file, and the exact mapping of ggml blocks onto MLX's affine groups against gguf-py's and our dequantizers."""
from __future__ import annotations

import logging

import numpy as np
import pytest
from conftest import in_ci, mean_kl, reference_logits, rel_err

try:
    import mlx.core as mx
except ImportError as e:  # CI installs mlx[cpu]: there a missing mlx must fail, never skip every test here
    if in_ci():
        raise
    pytest.skip(f"mlx is not installed ({e}); pip install -e '.[mlx]'", allow_module_level=True)

from mixlocal.engine.backends.mlx import (
    MLXBackend,
    MLXKVCache,
    Precision,
    choose_precision,
    to_affine,
)
from mixlocal.engine.sources.hf import load_hf
from mixlocal.quant import QTensor, QType, formats
from mixlocal.quant.affine import (
    BITS,
    AffineTensor,
    affine_from_ggml,
    ggml_from_affine,
    pack_bits,
    unpack_bits,
)

from mixlocal import engine

# 40 ids: 80 token-expert rows, enough for the sorted (prefill) expert path
PROMPT_IDS = [1, 415, 2936, 9060, 285, 1142, 754, 272, 17898, 3914, 28723, 13, 330, 1000, 2000, 3000, 31999, 5,
              22, 9, 1445, 7, 28705, 4, 17, 6880, 2012, 11, 12000, 23, 8, 600, 71, 28723, 13, 14, 15, 16, 300, 2]


@pytest.fixture(scope="module")
def ref_logits(hf_reference):
    return reference_logits(hf_reference, PROMPT_IDS)


@pytest.fixture(scope="module")
def llm(hf_model_dir):
    return engine.load(hf_model_dir, backend="mlx", n_ctx=4096, kv_type="f32")


@pytest.fixture(scope="module")
def numba_llm(hf_model_dir):
    return engine.load(hf_model_dir, backend="numba", n_ctx=256, kv_type="f32")


def check_close(ours, ref):
    assert ours.shape == ref.shape and ours.dtype == np.float32
    assert rel_err(ours, ref) < 1e-3
    assert mean_kl(ref, ours) < 1e-6


# ------------------------------------------------------------------ float32 against transformers

def test_prefill_matches_transformers(llm, ref_logits):
    llm.reset()
    check_close(llm.eval(PROMPT_IDS), ref_logits)
    assert llm.n_past == len(PROMPT_IDS)


def test_prefill_then_decode_matches_transformers(llm, ref_logits):
    """Chunks at cache offsets (the causal mask aligned to the end), single-token decode steps (gather without
    sorting), and a last chunk."""
    llm.reset()
    first = llm.eval(PROMPT_IDS[:7])
    steps = [llm.eval([t]) for t in PROMPT_IDS[7:12]]
    rest = llm.eval(PROMPT_IDS[12:])
    check_close(np.concatenate([first, *steps, rest]), ref_logits)


def test_last_logits_only(llm, ref_logits):
    llm.reset()
    last = llm.eval(PROMPT_IDS, logits="last")
    assert last.shape == (1, llm.config.vocab_size)
    check_close(last, ref_logits[-1:])


def test_router_trace_matches_numba(llm, numba_llm):
    traces = {}
    for name, model in (("mlx", llm), ("numba", numba_llm)):
        model.reset()
        model.backend.trace = []
        model.eval(PROMPT_IDS)
        traces[name], model.backend.trace = model.backend.trace, None
    assert len(traces["mlx"]) == len(traces["numba"]) == llm.config.n_layers
    for a, b in zip(traces["mlx"], traces["numba"]):
        np.testing.assert_allclose(a.logits, b.logits, rtol=1e-4, atol=1e-4)
        assert np.array_equal(np.sort(a.expert_ids, axis=1), np.sort(b.expert_ids, axis=1))
        assert len({tuple(sorted(r)) for r in a.expert_ids.tolist()}) >= 3  # routing really varies


def test_greedy_generation_and_prompt_reuse(llm, numba_llm):
    ours = llm.generate(PROMPT_IDS[:6], max_tokens=10, temperature=0)
    assert ours.tokens == numba_llm.generate(PROMPT_IDS[:6], max_tokens=10, temperature=0).tokens
    # a longer prompt sharing the first 6 ids reuses them (trim), and gives a fresh run's logits
    reused = llm.prefill(PROMPT_IDS[:12])
    assert llm.last_cached_tokens == 6
    llm.reset()
    np.testing.assert_allclose(reused, llm.prefill(PROMPT_IDS[:12]), rtol=1e-5, atol=1e-5)


def test_float16_params_on_cpu(hf_model_dir, ref_logits):
    """The CPU path with float16 weights held in memory: activations stay float32 and the dense experts are upcast
    for gather_mm, which takes float32 only on the CPU."""
    config, weights, _ = load_hf(hf_model_dir)
    prec = Precision(params=mx.float16, compute=mx.float32, dense_gather=mx.float32)
    be = MLXBackend(weights, prec)
    assert be.layers[0].w1.w.dtype == mx.float16 and be.layers[0].wq.w.dtype == mx.float16
    out = be.forward(np.array(PROMPT_IDS), MLXKVCache(config, 256, "f16"), last_only=False)
    assert out.dtype == np.float32
    assert rel_err(out, ref_logits) < 2e-2   # float16 weights and KV: half precision, not float32's 1e-6
    assert mean_kl(ref_logits, out) < 1e-3


def test_precision_is_chosen_per_device():
    cpu = choose_precision(mx.Device(mx.DeviceType.cpu))
    assert (cpu.compute, cpu.dense_gather) == (mx.float32, mx.float32)
    gpu = choose_precision(mx.Device(mx.DeviceType.gpu))
    assert gpu.compute == mx.float16


# ------------------------------------------------------------------ KV cache

def test_kv_cache_grows_in_steps_up_to_n_ctx(hf_model_dir):
    small = engine.load(hf_model_dir, backend="mlx", n_ctx=300, kv_type="f16")
    cache = small.cache
    assert cache.capacity == 0  # nothing committed at load, whatever n_ctx is
    small.eval(PROMPT_IDS[:10])
    assert cache.capacity == MLXKVCache.STEP and cache.k[0].dtype == mx.float16
    small.eval(list(range(3, 250)), logits="last")
    assert cache.capacity == 300 and cache.n_past == 257  # the second step is capped at n_ctx
    with pytest.raises(engine.ContextOverflowError, match="n_ctx 300"):
        small.eval(list(range(3, 50)), logits="last")
    assert cache.n_past == 257
    cache.trim(5)
    assert small.eval([7, 8]).shape == (2, small.config.vocab_size) and cache.n_past == 7
    with pytest.raises(ValueError):
        cache.trim(8)
    small.reset()
    assert small.n_past == 0


def test_32k_cache_costs_nothing_up_front(hf_model_dir):
    big = engine.load(hf_model_dir, backend="mlx", n_ctx=32768)
    assert big.n_ctx == 32768 and big.cache.capacity == 0
    big.eval(PROMPT_IDS[:3])
    assert big.cache.capacity == MLXKVCache.STEP


def test_auto_picks_mlx_only_on_apple_silicon(monkeypatch):
    from mixlocal.engine import loader
    monkeypatch.setattr(loader.sys, "platform", "linux")
    assert loader.resolve_backend("auto") == "numba"
    monkeypatch.setattr(loader.sys, "platform", "darwin")
    monkeypatch.setattr(loader.platform, "machine", lambda: "arm64")
    assert loader.resolve_backend("auto") == "mlx"
    monkeypatch.setattr(loader.platform, "machine", lambda: "x86_64")
    assert loader.resolve_backend("auto") == "numba"
    assert loader.resolve_backend("mlx") == "mlx"


def test_unknown_backend_is_value_error(hf_model_dir):
    with pytest.raises(ValueError, match="unknown backend"):
        engine.load(hf_model_dir, backend="cuda")


# ------------------------------------------------------------------ ggml blocks as MLX affine groups

EXACT = [QType.Q4_0, QType.Q4_1, QType.Q8_0, QType.Q5_0, QType.Q5_1, QType.Q4_K, QType.Q5_K]


def _ggml_tensor(qtype, rows=8, cols=512, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, cols)) * rng.uniform(0.01, 2.0, (rows, 1))).astype(np.float32)
    x[0, :64] = 0.0  # an all-zero block: scale 0
    return QTensor(qtype, (rows, cols), formats.quantize(qtype, x).reshape(-1))


@pytest.mark.parametrize("qtype", EXACT, ids=lambda q: q.name)
def test_ggml_blocks_map_exactly_onto_mlx_affine(qtype):
    """Q4_0 is scale d, bias -8d; Q4_1 is d, m; Q8_0 is d, -128d; Q5_x alike; Q4_K / Q5_K per 32-element
    sub-block. mx.dequantize of the mapped triplet equals gguf-py's (and our) dequantization bit for bit."""
    from gguf.quants import dequantize as gguf_dequantize
    t = _ggml_tensor(qtype)
    a = affine_from_ggml(t, "F32")
    assert a.group_size == 32
    ours = np.array(mx.dequantize(mx.array(a.packed), mx.array(a.scales), mx.array(a.biases), group_size=32,
                                  bits=a.bits))
    ref = gguf_dequantize(t.rows_view(), qtype)
    assert np.array_equal(ours, ref)
    assert np.array_equal(ours, formats.dequantize(qtype, t.rows_view()))


@pytest.mark.parametrize("qtype", [QType.Q4_0, QType.Q4_1, QType.Q8_0], ids=lambda q: q.name)
def test_32_element_formats_fit_float16_scales(qtype):
    t = _ggml_tensor(qtype, seed=1)
    a = affine_from_ggml(t, "F16")
    assert a.scales.dtype == np.float16
    f32 = [mx.array(x).astype(mx.float32) for x in (a.scales, a.biases)]
    ours = np.array(mx.dequantize(mx.array(a.packed), *f32, group_size=32, bits=a.bits))
    assert np.array_equal(ours, formats.dequantize(qtype, t.rows_view()))


@pytest.mark.parametrize("qtype", [QType.Q6_K, QType.Q3_K], ids=lambda q: q.name)
def test_16_element_k_formats_are_requantized_with_a_notice(qtype, caplog):
    t = _ggml_tensor(qtype, seed=2)
    with caplog.at_level(logging.WARNING, logger="mixlocal.mlx"):
        a = to_affine(t, "blk.0.test.weight")
    notices = [r.getMessage() for r in caplog.records]
    assert len(notices) == 1 and "blk.0.test.weight" in notices[0] and "requantized" in notices[0]
    ref = formats.dequantize(qtype, t.rows_view())
    err = np.abs(a.dequantize() - ref).max() / np.abs(ref).max()
    assert 0 < err < (0.01 if a.bits == 8 else 0.1)


def test_pack_bits_is_mlx_layout():
    """Our numpy packing against mx.quantize's own words, for every width MLX has."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((16, 256)).astype(np.float32)
    for bits in BITS:
        packed, s, b = mx.quantize(mx.array(w), group_size=64, bits=bits)
        deq = np.array(mx.dequantize(packed, s, b, group_size=64, bits=bits)).reshape(16, 4, 64)
        q = np.rint((deq - np.array(b)[..., None]) / np.array(s)[..., None]).astype(np.uint8).reshape(16, 256)
        assert np.array_equal(pack_bits(q, bits), np.array(packed)), bits
        assert np.array_equal(unpack_bits(np.array(packed), bits), q), bits


@pytest.mark.parametrize("bits,group_size", [(4, 32), (4, 64), (5, 128), (4, 128)])
def test_affine_groups_become_ggml_blocks_exactly(bits, group_size):
    """The numba backend's view of an MLX folder: Q4_1 / Q5_1 blocks that decode to mx.dequantize's values."""
    rng = np.random.default_rng(4)
    w = mx.array(rng.standard_normal((8, 256)).astype(np.float32))
    packed, s, b = mx.quantize(w, group_size=group_size, bits=bits)
    s, b = s.astype(mx.float16), b.astype(mx.float16)
    a = AffineTensor((8, 256), bits, group_size, np.array(packed), np.array(s), np.array(b), "F16")
    t = ggml_from_affine(a)
    assert t.qtype == (QType.Q4_1 if bits == 4 else QType.Q5_1)
    ref = np.array(mx.dequantize(packed, s.astype(mx.float32), b.astype(mx.float32), group_size=group_size,
                                 bits=bits))
    assert np.array_equal(formats.dequantize(t.qtype, t.rows_view()), ref)


def test_8_bit_groups_fall_back_to_float_with_a_notice(caplog):
    w = mx.array(np.random.default_rng(5).standard_normal((4, 128)).astype(np.float32))
    packed, s, b = mx.quantize(w, group_size=64, bits=8)
    a = AffineTensor((4, 128), 8, 64, np.array(packed), np.array(s), np.array(b), "F32")
    with caplog.at_level(logging.WARNING, logger="mixlocal.mlx"):
        t = ggml_from_affine(a, "x.weight")
    assert t.qtype == QType.F32 and len(caplog.records) == 1 and "x.weight" in caplog.records[0].getMessage()
    assert np.array_equal(formats.dequantize(t.qtype, t.rows_view()),
                          np.array(mx.dequantize(packed, s, b, group_size=64, bits=8)))


# ------------------------------------------------------------------ the same GGUF file on both backends

@pytest.fixture(scope="module")
def gguf_q4_0(hf_model_dir, tmp_path_factory):
    try:
        from gguf_fixtures import write_gguf_with_gguf_py
    except ImportError as e:
        pytest.skip(f"no GGUF fixture writer yet (tests/gguf_fixtures.py: {e})")
    return write_gguf_with_gguf_py(hf_model_dir, tmp_path_factory.mktemp("mlx_gguf") / "q4_0.gguf", QType.Q4_0)


@pytest.fixture(scope="module")
def gguf_on_mlx(gguf_q4_0):
    llm = engine.load(gguf_q4_0, backend="mlx", n_ctx=256, kv_type="f32")
    yield llm
    llm.reset()


def test_gguf_q4_0_on_mlx_matches_independent_reference(gguf_q4_0, gguf_on_mlx):
    """gguf-py's own dequantization in a float64 numpy forward pass (tests/numpy_reference.py) is the reference:
    the affine mapping of Q4_0 is exact, so only float32 rounding separates them."""
    from numpy_reference import forward as numpy_forward
    gguf_on_mlx.reset()
    ours = gguf_on_mlx.eval(PROMPT_IDS[:14])
    ref = numpy_forward(gguf_q4_0, PROMPT_IDS[:14])
    assert rel_err(ours, ref) < 1e-3
    assert mean_kl(ref, ours) < 1e-6


def test_gguf_q4_0_same_logits_on_mlx_and_numba(gguf_q4_0, gguf_on_mlx):
    from mixlocal.quant import kernels
    on_mlx = gguf_on_mlx
    on_mlx.reset()
    on_numba = engine.load(gguf_q4_0, backend="numba", n_ctx=256, kv_type="f32")
    assert on_mlx.backend.layers[0].w1.quantized and on_mlx.backend.layers[0].w1.group_size == 32
    # numba's packed Q4_0 kernels round activations to int8 per 32-block, as llama.cpp does; MLX computes with
    # float activations. That rounding is the one difference allowed, and it is far larger than float noise here.
    mats = getattr(on_numba.backend, "mats", None)
    int8_activations = bool(mats) and kernels.quantizes_activations(mats[0]["w1"], 1)
    bound = 1e-2 if int8_activations else 1e-4
    a, b = on_mlx.eval(PROMPT_IDS), on_numba.eval(PROMPT_IDS)
    assert mean_kl(b, a) < bound
    # and decode steps, through the unsorted gather path
    on_mlx.reset()
    on_numba.reset()
    steps = [(on_mlx.eval([t]), on_numba.eval([t])) for t in PROMPT_IDS[:4]]
    assert max(mean_kl(y, x) for x, y in steps) < bound


def test_gguf_q4_0_writes_mlx_folder_losslessly(gguf_q4_0, gguf_on_mlx, hf_model_dir, tmp_path):
    """Q4_0 blocks are affine groups of 32 (scale d, bias -8d): written with group_size=32 they are copied, not
    requantized, and GGUF's neighbour-pair q/k rows are put back in HF order. Same logits as the GGUF itself."""
    from mixlocal.engine.sources.gguf import load_gguf
    from mixlocal.engine.sources.mlx import write_mlx_folder
    _, weights, _ = load_gguf(gguf_q4_0)
    tok_bytes = (hf_model_dir / "tokenizer.model").read_bytes()  # as a GGUF source would rebuild them
    out = write_mlx_folder(weights, tok_bytes, tmp_path / "out", bits=4, group_size=32)
    gguf_on_mlx.reset()
    a = gguf_on_mlx.eval(PROMPT_IDS)
    b = engine.load(out, backend="mlx", n_ctx=64, kv_type="f32").eval(PROMPT_IDS)
    assert rel_err(b, a) < 1e-5 and mean_kl(a, b) < 1e-9
    # the stored triplet is the Q4_0 block itself: q in 0..15, bias exactly -8 * scale
    w = mx.load(str(out / "model.safetensors"))
    v_proj = "model.layers.0.self_attn.v_proj"
    assert np.array_equal(np.array(w[v_proj + ".biases"]), -8 * np.array(w[v_proj + ".scales"]))


def test_default_model_q4_0_gguf_same_logits_on_mlx_and_numba(tmp_path):
    """The issue's bar, KL < 1e-4 between the backends on one Q4_0 GGUF, on the trained default model: there the
    int8 activation rounding of numba's Q4_0 kernels is small, unlike on the random fixture above."""
    import dataclasses

    from mixlocal.engine.export import write_gguf
    from mixlocal.engine.loader import open_source
    from mixlocal.engine.quantize import requantize
    if not engine.DEFAULT_MODEL.exists():
        pytest.skip(f"the embedded default model is not installed yet ({engine.DEFAULT_MODEL})")
    _, w, tok, _ = open_source(None)

    def q4(t):
        return requantize(t, QType.Q4_0)
    mats = ("wq", "wk", "wv", "wo", "w1", "w3", "w2")
    w = dataclasses.replace(w, tok_embd=q4(w.tok_embd), output=q4(w.output),
                            layers=[dataclasses.replace(lw, **{k: q4(getattr(lw, k)) for k in mats})
                                    for lw in w.layers])
    path = write_gguf(w, tok, tmp_path / "default_q4_0.gguf")
    ids = tok.encode("The little cat sat on the mat and looked at the bird in the tree. Then it")
    a = engine.load(path, backend="mlx", n_ctx=128, kv_type="f32").eval(ids)
    b = engine.load(path, backend="numba", n_ctx=128, kv_type="f32").eval(ids)
    assert mean_kl(b, a) < 1e-4

"""The one-token decode step (NumbaCPUBackend._decode and ops.decode_*) against the T-token forward pass, and its
pieces against numpy."""
from __future__ import annotations

import numpy as np
import pytest
from mixlocal.engine.backends.numba import ops
from mixlocal.engine.backends.numba.ops import f32_to_f16_bits
from numba import njit

from mixlocal import engine


def _decode_logits(llm, prompt, steps, fused):
    llm.backend.fused_decode = fused
    llm.reset()
    llm.eval(prompt, logits="last")
    return np.concatenate([llm.eval([t], logits="last") for t in steps])


@pytest.mark.parametrize("kv_type", ["f32", "f16", "q8_0"])
def test_decode_step_gives_the_forward_pass_bits(kv_type):
    llm = engine.load(n_ctx=256, n_threads=2, kv_type=kv_type)
    assert llm.backend.fused_decode  # every matrix of the default model is packed q8_0
    rng = np.random.default_rng(1)
    prompt, steps = rng.integers(3, 32000, 12).tolist(), rng.integers(3, 32000, 20).tolist()
    fused = _decode_logits(llm, prompt, steps, True)
    k_fused, v_fused = llm.cache.k[:, :, :32].copy(), llm.cache.v[:, :, :32].copy()
    plain = _decode_logits(llm, prompt, steps, False)
    np.testing.assert_array_equal(fused, plain)
    np.testing.assert_array_equal(k_fused, llm.cache.k[:, :, :32])
    np.testing.assert_array_equal(v_fused, llm.cache.v[:, :, :32])


@pytest.mark.parametrize("quant", ["q4_0", "q4_k_m", "q6_k"])
def test_decode_step_on_other_formats(hf_model_dir, quant):
    """The formats with other kernels and layouts (Q6_K's activation sums per 16; Q4_K_M's per-tensor mix)."""
    llm = engine.load(str(hf_model_dir), quant=quant, n_ctx=64, n_threads=2)
    if not llm.backend.fused_decode:
        kinds = {type(m).__name__ + ":" + m.qtype.name for b in llm.backend.mats for m in b.values()}
        pytest.skip(f"{quant}: not every expert matrix has a packed decode kernel in the {llm.backend.kernels} "
                    f"family ({sorted(kinds)})")
    rng = np.random.default_rng(4)
    prompt, steps = rng.integers(3, 32000, 7).tolist(), rng.integers(3, 32000, 6).tolist()
    np.testing.assert_array_equal(_decode_logits(llm, prompt, steps, True), _decode_logits(llm, prompt, steps, False))


def test_decode_step_over_a_long_cache_matches():
    """Past 1024 positions the tiny model's attention runs on two threads with the keys split: the step must plan
    it as ops.attention does."""
    llm = engine.load(n_ctx=2048, n_threads=2)
    rng = np.random.default_rng(2)
    prompt, steps = rng.integers(3, 32000, 1100).tolist(), rng.integers(3, 32000, 3).tolist()
    np.testing.assert_array_equal(_decode_logits(llm, prompt, steps, True), _decode_logits(llm, prompt, steps, False))


def test_decode_step_is_skipped_while_tracing():
    llm = engine.load(n_ctx=64, n_threads=2)
    llm.eval([1, 415, 2936], logits="last")
    llm.backend.trace = []
    llm.eval([1014], logits="last")
    assert len(llm.backend.trace) == llm.config.n_layers  # the T-token path ran and recorded its router


@njit
def _f16_bits_of(x, out):
    for i in range(x.shape[0]):
        out[i] = f32_to_f16_bits(x[i])


def test_f32_to_f16_bits_rounds_as_numpy():
    rng = np.random.default_rng(0)
    x = np.concatenate([
        rng.standard_normal(100_000).astype(np.float32) * np.float32(10.0) ** rng.integers(-9, 6, 100_000),
        np.array([0.0, -0.0, 65504.0, 65519.99, 65520.0, 1e9, -1e9, np.inf, -np.inf, 6e-8, 2.9e-8, 3e-8,
                  1 + 2 ** -11, 1 + 3 * 2 ** -11, 5.96e-8, 6.1e-5], np.float32)])
    halves = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    finite = halves[np.isfinite(halves)].astype(np.float32)  # every float16 value, and the midpoints between them
    mids = ((finite[:-1].astype(np.float64) + finite[1:]) / 2).astype(np.float32)
    x = np.concatenate([x, finite, mids]).astype(np.float32)
    ours = np.empty(x.shape, np.uint16)
    _f16_bits_of(x, ours)
    with np.errstate(over="ignore"):  # the values past float16's range become inf, as they should
        ref = x.astype(np.float16).view(np.uint16)
    np.testing.assert_array_equal(ours, ref)


def test_route_rows_against_numpy_float64():
    rng = np.random.default_rng(3)
    h = rng.standard_normal((64, 256)).astype(np.float32)
    router = rng.standard_normal((8, 256)).astype(np.float32)
    h[:8] = np.abs(h[:8])
    router[5] = router[2] = np.abs(router[2]) * 2  # rows 0-7: a tie at the top, which a stable argsort breaks
    logits, ids, wts = ops.route_rows(h, router, 2)
    ref = h.astype(np.float64) @ router.T.astype(np.float64)
    np.testing.assert_allclose(logits, ref, rtol=1e-12, atol=1e-12)
    probs = np.exp(ref - ref.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    top = np.argsort(-probs, axis=1, kind="stable")[:, :2]
    np.testing.assert_array_equal(ids, top)
    assert (ids[:8] == [2, 5]).all()
    w = np.take_along_axis(probs, top, 1)
    np.testing.assert_allclose(wts, w / w.sum(1, keepdims=True), rtol=1e-6)
    assert wts.dtype == np.float32

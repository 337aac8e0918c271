"""KV cache formats and the attention kernel, each against a reference that is not our code.

Formats: stored bytes against numpy's float16 cast and gguf-py's Q8_0 quantizer. Attention: the numba kernel over
every format against a float64 numpy softmax over the keys and values as numpy / gguf-py decode them, for decode
(one query, key range split across workers), prefill chunks at an offset, block edges and several head layouts.
"""
from __future__ import annotations

import subprocess
import sys

import gguf
import numba
import numpy as np
import pytest
from mixlocal.engine.backends.numba import ops
from mixlocal.engine.backends.numba.cache import KV_TYPES, KVCache
from mixlocal.engine.config import ModelConfig
from numba import njit

from mixlocal import engine

Q8_0 = gguf.GGMLQuantizationType.Q8_0
MIXTRAL = ModelConfig(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
                      ffn_dim=14336, n_experts=8, n_experts_used=2)


def tiny_config(n_heads=4, n_kv_heads=2, head_dim=64, n_layers=2) -> ModelConfig:
    return ModelConfig(vocab_size=100, dim=n_heads * head_dim, n_layers=n_layers, n_heads=n_heads,
                       n_kv_heads=n_kv_heads, head_dim=head_dim, ffn_dim=64, n_experts=2, n_experts_used=1)


def decoded(raw: np.ndarray, kv_type: str, head_dim: int) -> np.ndarray:
    """float32 keys or values from stored rows, by the references: numpy for f16, gguf-py for q8_0."""
    if kv_type == "f32":
        return raw.astype(np.float32)
    if kv_type == "f16":
        return raw.view(np.float16).astype(np.float32)
    return gguf.quants.dequantize(np.ascontiguousarray(raw), Q8_0).reshape(*raw.shape[:-1], head_dim)


def encoded(x: np.ndarray, kv_type: str) -> np.ndarray:
    """Stored rows from float32 values, by the references."""
    if kv_type == "f32":
        return np.ascontiguousarray(x, dtype=np.float32)
    if kv_type == "f16":
        return x.astype(np.float16).view(np.uint16)
    return gguf.quants.quantize(x, Q8_0)


def reference_attention(q, k, v, pos0, scale):
    """float64 causal attention: q (T, H, Dh), k, v (Hkv, n, Dh) float32 -> (T, H, Dh)."""
    n_tok, n_heads, _ = q.shape
    g = n_heads // k.shape[0]
    out = np.empty(q.shape)
    for t in range(n_tok):
        for h in range(n_heads):
            keys = k[h // g, :pos0 + t + 1].astype(np.float64)
            s = keys @ q[t, h].astype(np.float64) * scale
            p = np.exp(s - s.max())
            out[t, h] = (p / p.sum()) @ v[h // g, :pos0 + t + 1].astype(np.float64)
    return out


# ------------------------------------------------------------------ formats

@pytest.mark.parametrize("kv_type", list(KV_TYPES))
def test_stored_rows_match_reference_encoders(kv_type):
    cfg = tiny_config()
    cache = KVCache(cfg, n_ctx=64, kv_type=kv_type)
    rng = np.random.default_rng(0)
    k = rng.standard_normal((9, 2, 64)).astype(np.float32) * 3
    v = rng.standard_normal((9, 2, 64)).astype(np.float32)
    k[0, 0, :32] = 0  # an all-zero block: Q8_0 scale 0
    cache.store(1, 20, k, v)
    for stored, x in ((cache.k, k), (cache.v, v)):
        np.testing.assert_array_equal(stored[1, :, 20:29], encoded(x, kv_type).transpose(1, 0, 2))
        assert not stored[0].any() and not stored[1, :, :20].any() and not stored[1, :, 29:].any()


def test_bytes_per_token_for_mixtral():
    per_token = {t: KVCache(MIXTRAL, 1, t).bytes_per_token for t in KV_TYPES}
    # 32 layers x K and V x 8 heads x 128 values
    assert per_token == {"f32": 32 * 2 * 8 * 128 * 4, "f16": 128 * 1024, "q8_0": 32 * 2 * 8 * 4 * 34}
    assert per_token["q8_0"] / per_token["f16"] == 34 / 64


def test_cache_rejects_bad_settings_and_writes():
    with pytest.raises(ValueError, match="kv_type"):
        KVCache(tiny_config(), 16, "q4_0")
    with pytest.raises(ValueError, match="multiple of 32"):
        KVCache(tiny_config(head_dim=48), 16, "q8_0")
    with pytest.raises(ValueError, match="n_ctx"):
        KVCache(tiny_config(), 0)
    cache = KVCache(tiny_config(), 16, "f16")
    x = np.zeros((4, 2, 64), np.float32)
    with pytest.raises(ValueError, match="must both be"):
        cache.store(0, 0, x, x[:, :1])
    with pytest.raises(engine.ContextOverflowError):
        cache.store(0, 13, x, x)
    with pytest.raises(ValueError, match="layer"):
        cache.store(2, 0, x, x)


MEMORY_PROBE = r"""
import sys, numpy as np
from mixlocal.engine.backends.numba.cache import KVCache
from mixlocal.engine.config import ModelConfig

def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS:")).split()[1]) * 1024

cfg = ModelConfig(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, ffn_dim=14336,
                  n_experts=8, n_experts_used=2)
x = np.random.default_rng(0).standard_normal((256, 8, 128)).astype(np.float32)
for kv_type in ("f16", "q8_0"):
    cache = KVCache(cfg, 32768, kv_type)
    cache.store(0, 0, x[:1], x[:1])  # first-use costs (code, quantizer) before measuring
    cache.reset()
    base = rss()
    for layer in range(32):
        cache.store(layer, 0, x, x)
    grown = rss() - base
    cache.reset()
    print(kv_type, cache.k.nbytes + cache.v.nbytes, 256 * cache.bytes_per_token, grown, rss() - base)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_memory_is_committed_for_positions_in_use_and_given_back():
    """A Mixtral-shape 32K cache reserves GiBs of address space; 256 stored positions cost their bytes, and
    reset() gives them back."""
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        kv_type, reserved, used, grown, after_reset = line.split()
        reserved, used, grown, after_reset = int(reserved), int(used), int(grown), int(after_reset)
        assert reserved == 32768 * 256 * {"f16": 512, "q8_0": 272}[kv_type]
        # pages: q8_0 rows of 136 bytes end mid-page, so each (layer, head) commits up to one page more
        assert used <= grown < used + 32 * 2 * 8 * 4096 + (4 << 20), line
        assert after_reset < 2 << 20, line


# ------------------------------------------------------------------ helpers the kernel is built on

@njit(cache=True)
def _decode_all(bits, out):
    for i in range(bits.size):
        out[i] = ops.f16_bits_to_f32(bits[i])


def test_f16_decode_is_exact_for_every_bit_pattern():
    bits = np.arange(1 << 16, dtype=np.uint16)
    ours = np.empty(bits.size, np.float32)
    _decode_all(bits, ours)
    ref = bits.view(np.float16).astype(np.float32)
    nan = np.isnan(ref)
    np.testing.assert_array_equal(np.isnan(ours), nan)
    np.testing.assert_array_equal(ours[~nan].view(np.uint32), ref[~nan].view(np.uint32))  # -0.0 too


@njit(cache=True)
def _exp_all(x, out):
    for i in range(x.size):
        out[i] = ops._exp_nonpos(x[i])


def test_softmax_exp_is_accurate_and_zero_below_range():
    x = np.concatenate([-np.geomspace(1e-8, 87, 200_000), np.linspace(-87, 0, 100_001)]).astype(np.float32)
    ours = np.empty_like(x)
    _exp_all(x, ours)
    ref = np.exp(x.astype(np.float64))
    assert np.max(np.abs(ours - ref) / ref) < 3e-7
    tail = np.array([-87.01, -100, -1e30, -np.inf], np.float32)
    out = np.empty_like(tail)
    _exp_all(tail, out)
    assert not out.any()


# ------------------------------------------------------------------ attention

# (T, H, Hkv, Dh, pos0, threads): decode with few KV heads (the key range split over workers and merged),
# decode Mixtral-shaped, prefill chunks at offsets, block edges (128 keys), one query head per KV head.
ATTENTION_CASES = [
    (1, 4, 2, 64, 1000, 2),
    (1, 4, 2, 64, 0, 2),
    (1, 32, 8, 128, 700, 2),
    (37, 4, 2, 64, 130, 2),
    (16, 8, 2, 64, 240, 1),
    (5, 4, 4, 64, 251, 2),
    (40, 6, 3, 32, 0, 2),
    (3, 32, 8, 128, 125, 1),
]


@pytest.mark.parametrize("kv_type", list(KV_TYPES))
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: "T{}_H{}_Hkv{}_Dh{}_pos{}_thr{}".format(*c))
def test_attention_matches_float64_reference(kv_type, case):
    n_tok, n_heads, n_kv, dh, pos0, threads = case
    rng = np.random.default_rng(abs(hash(case)) % 2**32)
    n_ctx = pos0 + n_tok + 7
    q = rng.standard_normal((n_tok, n_heads, dh)).astype(np.float32)
    k = (rng.standard_normal((n_kv, n_ctx, dh)) * 1.5).astype(np.float32)
    v = rng.standard_normal((n_kv, n_ctx, dh)).astype(np.float32)
    k_rows, v_rows = encoded(k, kv_type), encoded(v, kv_type)
    scale = 1 / np.sqrt(dh)
    ref = reference_attention(q, decoded(k_rows, kv_type, dh), decoded(v_rows, kv_type, dh), pos0, scale)
    before = numba.get_num_threads()
    ops.set_threads(threads)
    try:
        ours = ops.attention(q, k_rows, v_rows, pos0, scale, np.empty_like(q))
    finally:
        numba.set_num_threads(before)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=3e-6)


def test_decode_with_few_kv_heads_splits_the_keys():
    """With 2 KV heads and 2 workers, one query over a long cache runs as 8 jobs (the merge path is exercised by
    the cases above); with 8 KV heads it needs no split."""
    assert ops.attention_plan(1, 4, 2, 64, 32767, 2)["n_splits"] == 4
    assert ops.attention_plan(1, 32, 8, 128, 32767, 2)["n_splits"] == 1
    assert ops.attention_plan(512, 4, 2, 64, 0, 2)["n_splits"] == 1


def test_attention_scratch_is_independent_of_context():
    for n_tok in (1, 16, 512):
        sizes = {ops.attention_plan(n_tok, 32, 8, 128, pos0, 2)["scratch_bytes"] for pos0 in (0, 4000, 32768 - n_tok)}
        assert len(sizes) == 1
    assert ops.attention_plan(512, 32, 8, 128, 0, 2)["scratch_bytes"] < 1 << 20


def test_attention_rejects_bad_input_before_the_kernel():
    q = np.zeros((2, 4, 64), np.float32)
    k = np.zeros((2, 16, 64), np.uint16)
    out = np.empty_like(q)
    ops.attention(q, k, k, 14, 0.1, out)  # the last two positions: fine
    with pytest.raises(ValueError, match="outside the cache"):
        ops.attention(q, k, k, 15, 0.1, out)
    with pytest.raises(ValueError, match="head_dim"):
        ops.attention(q, np.zeros((2, 16, 68), np.uint16), np.zeros((2, 16, 68), np.uint16), 0, 0.1, out)
    with pytest.raises(ValueError, match="head_dim"):
        ops.attention(q, np.zeros((2, 16, 64), np.uint8), np.zeros((2, 16, 64), np.uint8), 0, 0.1, out)
    with pytest.raises(ValueError, match="multiple"):
        ops.attention(q, np.zeros((3, 16, 64), np.uint16), np.zeros((3, 16, 64), np.uint16), 0, 0.1, out)
    with pytest.raises(ValueError, match="differ"):
        ops.attention(q, k, k.astype(np.float32), 0, 0.1, out)
    with pytest.raises(ValueError, match="C-contiguous"):
        ops.attention(np.zeros((4, 2, 64), np.float32).transpose(1, 0, 2), k, k, 0, 0.1, out)
    with pytest.raises(ValueError, match="out"):
        ops.attention(q, k, k, 0, 0.1, np.empty((2, 4, 32), np.float32))

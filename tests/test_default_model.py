"""The embedded default model (trained here): it loads with no source, every format computes what gguf-py's
dequantized weights compute, quality falls as bits fall, our quantizer matches llama.cpp's, and llama.cpp gives
the same greedy continuations on it."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import mean_kl
from gguf_fixtures import llama_cpp_quantize, llama_cpp_status, run_llama_cpp
from mixlocal.engine.export import write_gguf
from mixlocal.engine.loader import open_source
from mixlocal.engine.quantize import requantize
from mixlocal.quant import QType, kernels
from numpy_reference import forward as numpy_forward

from mixlocal import engine

pytestmark = pytest.mark.skipif(not engine.DEFAULT_MODEL.exists(),
                                reason=f"the default model is not built yet ({engine.DEFAULT_MODEL})")

TEXT = ("The old man walked slowly down the road to the village. He was tired, but he was happy, because his "
        "daughter had come home after many years. When he reached the house, she was waiting at the door.")
PROMPTS = ["Once upon a time", "The meaning of life is", "In the beginning"]


@pytest.fixture(scope="module")
def default():
    config, weights, tok, _ = open_source(None)
    return config, weights, tok


@pytest.fixture(scope="module")
def f16_file(default, tmp_path_factory):
    _, weights, tok = default
    return write_gguf(weights, tok, tmp_path_factory.mktemp("default") / "f16.gguf", "f16")


@pytest.fixture(scope="module")
def ids(default):
    return default[2].encode(TEXT)[:48]


def test_load_with_no_source_generates_text():
    llm = engine.load(n_ctx=256)
    res = llm.generate("Once upon a time", max_tokens=24, temperature=0)
    assert res.finish_reason in ("length", "stop") and res.tokens
    words = res.text.split()
    assert len(words) >= 3 and sum(w.strip(".,;:!?\"'").isalpha() for w in words) >= 0.7 * len(words)


def test_default_is_q8_0_from_our_quantizer(default):
    _, weights, _ = default
    types = {t.qtype for t in weights.tensors().values() if not isinstance(t, np.ndarray)}
    assert types == {QType.Q8_0}


def uniform(weights, qtype):
    """Every matrix in one format (norms and router stay float)."""
    mats = ("wq", "wk", "wv", "wo", "w1", "w3", "w2")
    return dataclasses.replace(
        weights, tok_embd=requantize(weights.tok_embd, qtype), output=requantize(weights.output, qtype),
        layers=[dataclasses.replace(lw, **{k: requantize(getattr(lw, k), qtype) for k in mats})
                for lw in weights.layers])


@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                                   "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_every_format_matches_float64_reference(default, ids, tmp_path, qtype):
    """The issue's bar: KL < 1e-4 against a float64 numpy pass over gguf-py's dequantization of the same file.

    Formats whose kernels multiply 8-bit activations (llama.cpp's numerics, what reaches the bandwidth roofline) are
    compared with the same pass rounding activations the same way (gguf-py's Q8_0, or ggml's Q8_K for K-quants). For Q4_0 on this model that rounding
    alone moves the exact pass by KL 5.0e-4 (measured), and ours sits 8e-6 from the rounded pass."""
    _, weights, tok = default
    path = write_gguf(uniform(weights, QType[qtype]), tok, tmp_path / f"{qtype}.gguf")
    llm = engine.load(path, n_ctx=128, kv_type="f32")
    rounded = kernels.activation_type(llm.backend.mats[0]["w1"])
    assert mean_kl(numpy_forward(path, ids, activations=rounded and rounded.name), llm.eval(ids)) < 1e-4


@pytest.fixture(scope="module")
def level_kls(f16_file, ids):
    ref = engine.load(f16_file, n_ctx=128, kv_type="f32").eval(ids)
    kls = {}
    for level in ("q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_moe", "q4_0", "q3_k_m", "q2_k"):
        llm = engine.load(f16_file, quant=level, n_ctx=128, kv_type="f32")
        kls[level] = mean_kl(ref, llm.eval(ids))
    return kls


def test_quality_falls_as_bits_fall(level_kls):
    k = level_kls
    assert k["q2_k"] > k["q3_k_m"] > k["q4_0"] > k["q5_k_m"] > k["q6_k"] > k["q8_0"], k


@pytest.mark.skipif(llama_cpp_status() is not None, reason=str(llama_cpp_status()))
@pytest.mark.parametrize("level,ftype", [("q4_k_m", 15), ("q3_k_m", 12), ("q2_k", 10), ("q4_0", 2)])
def test_our_quantizer_no_worse_than_llama_cpp(f16_file, ids, level_kls, tmp_path, level, ftype):
    """KL against the float model, both files evaluated by the same engine: ours within 10% of llama-quantize's."""
    theirs_file = llama_cpp_quantize(f16_file, tmp_path / f"{level}.gguf", ftype)
    ref = engine.load(f16_file, n_ctx=128, kv_type="f32").eval(ids)
    theirs = mean_kl(ref, engine.load(theirs_file, n_ctx=128, kv_type="f32").eval(ids))
    assert level_kls[level] <= 1.1 * theirs, (level_kls[level], theirs)


@pytest.mark.skipif(llama_cpp_status() is not None, reason=str(llama_cpp_status()))
def test_llama_cpp_gives_the_same_greedy_continuations(default):
    """The shipped GGUF in llama.cpp: the same 32-token greedy continuation of three prompts as ours."""
    tok = default[2]
    prompts = [tok.encode(p) for p in PROMPTS]
    theirs = run_llama_cpp(engine.DEFAULT_MODEL, prompts, mode="greedy", n=32)
    llm = engine.load(n_ctx=128)
    for ids, ref in zip(prompts, theirs):
        llm.reset()
        assert llm.generate(ids, max_tokens=32, temperature=0).tokens == ref

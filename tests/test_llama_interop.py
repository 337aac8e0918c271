"""Both directions with llama.cpp (the prebuilt llama-cpp-python wheel): our GGUF files load there and compute
the same thing, and files made by llama.cpp's own quantizer load here."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import TINY, make_hf_checkpoint, mean_kl
from gguf_fixtures import llama_cpp_quantize, llama_cpp_status, run_llama_cpp
from mixlocal.engine.export import write_gguf
from mixlocal.engine.sources.hf import load_hf
from mixlocal.tokenizer import Tokenizer
from numpy_reference import forward as numpy_forward
from test_gguf_source import ACTIVATION_ROUNDING_KL

from mixlocal import engine

pytestmark = pytest.mark.skipif(llama_cpp_status() is not None, reason=str(llama_cpp_status()))

PROMPTS = [[1, 415, 2936, 9060, 285, 1142, 754, 272], [1, 330, 1000, 2000, 28723, 13], [1, 22557, 28725, 1526]]


def export(hf_dir, out, level):
    _, weights, tok_path = load_hf(hf_dir)
    return write_gguf(weights, Tokenizer.from_file(tok_path), out, level)


def test_our_f16_gguf_runs_in_llama_cpp(hf_model_dir, tmp_path):
    path = export(hf_model_dir, tmp_path / "f16.gguf", "f16")
    ref = run_llama_cpp(path, PROMPTS, mode="logits")
    llm = engine.load(path, n_ctx=64, kv_type="f32")
    for ids, theirs in zip(PROMPTS, ref):
        llm.reset()
        assert mean_kl(np.asarray(theirs, dtype=np.float32), llm.eval(ids)) < 1e-4


LLAMA_FTYPES = {"q8_0": 7, "q4_0": 2, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18, "q3_k_m": 12, "q2_k": 10}


@pytest.fixture(scope="module")
def f16_gguf(hf_model_dir, tmp_path_factory):
    return export(hf_model_dir, tmp_path_factory.mktemp("f16") / "f16.gguf", "f16")


@pytest.mark.parametrize("level", list(LLAMA_FTYPES))
def test_levels_match_llama_quantize(hf_model_dir, f16_gguf, tmp_path, level):
    """Our level picks llama-quantize's format for every tensor, and the simple formats are byte-identical."""
    from gguf import GGUFReader
    llama_file = llama_cpp_quantize(f16_gguf, tmp_path / "l.gguf", LLAMA_FTYPES[level])
    theirs = {t.name: t for t in GGUFReader(llama_file).tensors}
    ours = {t.name: t for t in GGUFReader(export(hf_model_dir, tmp_path / "o.gguf", level)).tensors}
    assert ours.keys() == theirs.keys()
    for name, t in ours.items():
        assert t.tensor_type == theirs[name].tensor_type, \
            f"{name}: {t.tensor_type.name} vs {theirs[name].tensor_type.name}"
        if t.tensor_type.name in ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "F32"):
            assert np.array_equal(np.asarray(t.data), np.asarray(theirs[name].data)), name


def test_llama_cpp_runs_our_quantized_file_as_its_own(hf_model_dir, f16_gguf, tmp_path):
    """On our q4_k_m file llama.cpp strays from the exact result no more than on the file it quantized itself."""
    ours = export(hf_model_dir, tmp_path / "o.gguf", "q4_k_m")
    own = llama_cpp_quantize(f16_gguf, tmp_path / "l.gguf", LLAMA_FTYPES["q4_k_m"])
    ids = PROMPTS[0]
    exact = numpy_forward(f16_gguf, ids)
    on_ours = np.asarray(run_llama_cpp(ours, [ids], "logits")[0], np.float32)
    on_own = np.asarray(run_llama_cpp(own, [ids], "logits")[0], np.float32)
    assert mean_kl(exact, on_ours) < 1.1 * mean_kl(exact, on_own)


@pytest.mark.parametrize("ftype,name", [(15, "Q4_K_M"), (2, "Q4_0"), (10, "Q2_K")])
def test_llama_cpp_quantized_files_load_here(f16_gguf, tmp_path, ftype, name):
    path = llama_cpp_quantize(f16_gguf, tmp_path / f"{name}.gguf", ftype)
    ours = engine.load(path, n_ctx=64, kv_type="f32")
    ids = PROMPTS[0]
    ref = numpy_forward(path, ids)
    theirs = np.asarray(run_llama_cpp(path, [ids], "logits")[0], np.float32)
    kl = mean_kl(ref, ours.eval(ids))
    # activation rounding on a chaotic random fixture: see test_gguf_source.ACTIVATION_ROUNDING_KL
    assert kl < ACTIVATION_ROUNDING_KL and kl < 1.5 * mean_kl(ref, theirs) + 1e-5


def test_mixed_fallback_file(tmp_path):
    """A width that is not a multiple of 256 makes llama.cpp's K-quant fall back per tensor: a mixed file."""
    from gguf import GGUFReader
    hf = make_hf_checkpoint(tmp_path / "wide384", dict(TINY, hidden_size=384, num_attention_heads=6,
                                                       num_key_value_heads=2))
    src = export(hf, tmp_path / "f16.gguf", "f16")
    path = llama_cpp_quantize(src, tmp_path / "mixed.gguf", 15)
    types = {t.tensor_type.name for t in GGUFReader(path).tensors}
    assert {"Q4_K"} & types and ({"Q5_0", "Q5_1", "Q8_0"} & types), types
    llm = engine.load(path, n_ctx=64, kv_type="f32")
    ids = PROMPTS[1]
    ref = numpy_forward(path, ids)
    theirs = np.asarray(run_llama_cpp(path, [ids], "logits")[0], np.float32)
    kl = mean_kl(ref, llm.eval(ids))
    assert kl < ACTIVATION_ROUNDING_KL and kl < 1.5 * mean_kl(ref, theirs) + 1e-5

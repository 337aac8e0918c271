"""The Mixtral-shape benchmark's inputs: the slice generator writes what gguf-py reads back, and mixlocal loads it.

No timing here (speed lives in bench/); these tests keep the benchmark from silently measuring a broken file.
"""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from make_mixtral_slice import MIXTRAL, SLICE_TYPES, tensor_plan, write_slice

# Same structure as Mixtral (GQA 4:1, 8 experts, 2 used), small enough for a test; widths are multiples of 256 so
# every slice type applies.
SMALL = replace(MIXTRAL, dim=512, ffn=768, n_heads=4, n_kv_heads=1, head_dim=128, vocab=600)


@pytest.fixture(scope="module")
def small_slices(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("slices")
    return {t: write_slice(d / f"small_{t}.gguf", t, n_blocks=1, shape=SMALL, seed=1) for t in SLICE_TYPES}


@pytest.mark.parametrize("qtype", sorted(SLICE_TYPES))
def test_slice_reads_back_in_gguf_py(small_slices, qtype):
    import gguf
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(small_slices[qtype])
    plan = tensor_plan(SMALL, 1)
    assert [t.name for t in reader.tensors] == [name for name, _, _ in plan]
    for t, (name, shape, kind) in zip(reader.tensors, plan):
        assert tuple(reversed(t.shape.tolist())) == shape, name          # gguf-py reports ggml order
        want = gguf.GGMLQuantizationType[qtype] if kind == "matrix" else gguf.GGMLQuantizationType.F32
        assert t.tensor_type == want, name
        values = dequantize(np.asarray(t.data), t.tensor_type).astype(np.float64)
        assert values.shape == shape and np.isfinite(values).all(), name
        if kind == "matrix":  # sane random weights: centred, std near a trained Mixtral's
            assert abs(values.mean()) < 1e-3, name
            assert 0.007 < values.std() < 0.016, (name, values.std())
        elif kind == "norm":
            assert 0.9 < values.mean() < 1.1, name
    fields = reader.fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["llama.block_count"].contents() == 1
    assert fields["llama.expert_count"].contents() == SMALL.n_experts
    assert fields["llama.expert_used_count"].contents() == SMALL.n_experts_used
    assert fields["llama.feed_forward_length"].contents() == SMALL.ffn
    assert fields["llama.attention.head_count_kv"].contents() == SMALL.n_kv_heads


def test_slice_tokenizer_is_mixtrals_first_pieces(small_slices):
    import sentencepiece
    from conftest import MIXTRAL_TOKENIZER
    from gguf import GGUFReader

    sp = sentencepiece.SentencePieceProcessor(model_file=str(MIXTRAL_TOKENIZER))
    tokens = GGUFReader(small_slices["Q4_0"]).fields["tokenizer.ggml.tokens"].contents()
    assert tokens == [sp.id_to_piece(i) for i in range(SMALL.vocab)]


def test_full_shape_plan_is_mixtral_8x7b():
    plan = {name: shape for name, shape, _ in tensor_plan(MIXTRAL, 4)}
    assert plan["token_embd.weight"] == (32000, 4096)
    assert plan["blk.3.attn_q.weight"] == (4096, 4096)
    assert plan["blk.3.attn_k.weight"] == (1024, 4096)
    assert plan["blk.0.ffn_gate_exps.weight"] == (8, 14336, 4096)
    assert plan["blk.0.ffn_down_exps.weight"] == (8, 4096, 14336)
    assert plan["blk.0.ffn_gate_inp.weight"] == (8, 4096)
    assert "blk.4.attn_q.weight" not in plan
    n_params = sum(int(np.prod(s)) for _, s, _ in tensor_plan(MIXTRAL, 32))
    assert round(n_params / 1e9, 1) == 46.7  # Mistral's published parameter count for Mixtral 8x7B


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_K"])
def test_mixlocal_loads_small_slice(small_slices, qtype):
    import engine

    llm = engine.load(str(small_slices[qtype]), n_ctx=64, n_threads=2)
    c = llm.config
    assert (c.dim, c.ffn_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.n_experts, c.n_experts_used,
            c.vocab_size) == (SMALL.dim, SMALL.ffn, 1, SMALL.n_heads, SMALL.n_kv_heads, SMALL.head_dim,
                              SMALL.n_experts, SMALL.n_experts_used, SMALL.vocab)
    assert llm.tokenizer.vocab_size == SMALL.vocab
    prompt = llm.tokenizer.encode("Hello world", add_bos=True)
    logits = llm.eval(prompt, logits="last")
    assert logits.shape == (1, SMALL.vocab) and np.isfinite(logits).all()
    assert logits.std() > 0  # random weights still give logits that differ between tokens


def test_slice_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown slice type"):
        write_slice(tmp_path / "x.gguf", "Q5_K", 1, SMALL)
    with pytest.raises(ValueError, match="too small"):
        write_slice(tmp_path / "x.gguf", "Q4_0", 1, replace(SMALL, vocab=100))

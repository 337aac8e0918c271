"""The Mixtral-shape benchmark's inputs: the slice generator writes what gguf-py reads back, and mixlocal loads it.

No timing here (speed lives in bench/); these tests keep the benchmark from silently measuring a broken file.
"""
from __future__ import annotations

import stat
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from make_mixtral_slice import (
    EMBED_STD,
    MIXTRAL,
    MIXTRAL_BLOCKS,
    SLICE_TYPES,
    WEIGHT_STD,
    tensor_plan,
    tensor_types,
    write_slice,
)

# Same structure as Mixtral (GQA 4:1, 8 experts, 2 used), small enough for a test; widths are multiples of 256 so
# every slice type applies.
SMALL = replace(MIXTRAL, dim=512, ffn=768, n_heads=4, n_kv_heads=1, head_dim=128, vocab=600)


# Q4_K_M's ffn_down changes with the block, so its slice has 4 blocks (the others 1)
N_BLOCKS = {"Q4_K_M": 4}


@pytest.fixture(scope="module")
def small_slices(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("slices")
    return {t: write_slice(d / f"small_{t}.gguf", t, n_blocks=N_BLOCKS.get(t, 1), shape=SMALL, seed=1)
            for t in SLICE_TYPES}


@pytest.mark.parametrize("qtype", sorted(SLICE_TYPES))
def test_slice_reads_back_in_gguf_py(small_slices, qtype):
    import gguf
    from gguf.quants import dequantize

    n_blocks = N_BLOCKS.get(qtype, 1)
    reader = gguf.GGUFReader(small_slices[qtype])
    plan = tensor_plan(SMALL, n_blocks)
    types = tensor_types(qtype, SMALL, n_blocks)
    assert [t.name for t in reader.tensors] == [name for name, _, _ in plan]
    for t, (name, shape, kind) in zip(reader.tensors, plan):
        assert tuple(reversed(t.shape.tolist())) == shape, name          # gguf-py reports ggml order
        want = gguf.GGMLQuantizationType[qtype if qtype in gguf.GGMLQuantizationType.__members__ else types[name]] \
            if kind == "matrix" else gguf.GGMLQuantizationType.F32
        assert t.tensor_type == want, name
        values = dequantize(np.asarray(t.data), t.tensor_type).astype(np.float64)
        assert values.shape == shape and np.isfinite(values).all(), name
        if kind == "matrix":  # sane random weights: centred, std near a trained Mixtral's (embedding: EMBED_STD)
            want_std = EMBED_STD if name == "token_embd.weight" else WEIGHT_STD
            assert abs(values.mean()) < 0.09 * want_std, name
            assert 0.7 * want_std < values.std() < 1.3 * want_std, (name, values.std())
        elif kind == "norm":
            assert 0.9 < values.mean() < 1.1, name
    fields = reader.fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["llama.block_count"].contents() == n_blocks
    assert fields["general.file_type"].contents() == SLICE_TYPES[qtype]
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


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_K", "Q4_K_M"])
def test_mixlocal_loads_small_slice(small_slices, qtype, monkeypatch):
    from mixlocal.engine.backends.numba import backend as numba_cpu

    from mixlocal import engine

    picked = []
    route = numba_cpu.route

    def spy(*a, **kw):
        trace = route(*a, **kw)
        picked.append(np.asarray(trace.expert_ids))
        return trace
    monkeypatch.setattr(numba_cpu, "route", spy)

    n_blocks = N_BLOCKS.get(qtype, 1)
    llm = engine.load(str(small_slices[qtype]), n_ctx=128, n_threads=2)
    c = llm.config
    assert (c.dim, c.ffn_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.n_experts, c.n_experts_used,
            c.vocab_size) == (SMALL.dim, SMALL.ffn, n_blocks, SMALL.n_heads, SMALL.n_kv_heads, SMALL.head_dim,
                              SMALL.n_experts, SMALL.n_experts_used, SMALL.vocab)
    assert llm.tokenizer.vocab_size == SMALL.vocab
    prompt = [1] + np.random.default_rng(0).integers(3, SMALL.vocab, 63).tolist()
    logits = llm.eval(prompt, logits="all")[-1:]  # "all": the last block routes every token, not just the last
    assert logits.shape == (1, SMALL.vocab) and np.isfinite(logits).all()
    assert logits.std() > 0  # random weights still give logits that differ between tokens
    # tokens spread over the experts in every block (weights with a biased mean would send them all to a few)
    assert len(picked) == n_blocks
    for ids in picked:
        counts = np.bincount(ids.ravel(), minlength=SMALL.n_experts)
        assert (counts > 0).sum() >= 6 and counts.max() <= 0.5 * ids.size, counts


def test_q4_k_m_types_follow_the_recipe():
    from mixlocal.quant.recipes import plan as recipe_plan

    full = {name: shape for name, shape, _ in tensor_plan(MIXTRAL, MIXTRAL_BLOCKS)}
    want = {name: q.name for name, q in recipe_plan("q4_k_m", full, MIXTRAL.n_experts, MIXTRAL_BLOCKS).items()}
    assert tensor_types("Q4_K_M", MIXTRAL, MIXTRAL_BLOCKS) == want  # 32 blocks: the real model's layout
    assert sum(want[f"blk.{i}.ffn_down_exps.weight"] == "Q6_K" for i in range(32)) == 16

    four = tensor_types("Q4_K_M", MIXTRAL, 4)
    # slice block j stands for block j * 32 // 4 of the real model
    assert [four[f"blk.{j}.ffn_down_exps.weight"] for j in range(4)] == [
        want[f"blk.{i}.ffn_down_exps.weight"] for i in (0, 8, 16, 24)] == ["Q6_K", "Q4_K", "Q4_K", "Q6_K"]
    for j in range(4):
        b = f"blk.{j}."
        assert [four[b + t + ".weight"] for t in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate_exps",
                                                   "ffn_up_exps", "attn_norm", "ffn_gate_inp")] == \
            ["Q4_K", "Q8_0", "Q8_0", "Q5_K", "Q4_K", "Q4_K", "F32", "F32"]
    assert (four["token_embd.weight"], four["output.weight"], four["output_norm.weight"]) == ("Q4_K", "Q6_K", "F32")
    assert set(tensor_types("Q4_0", MIXTRAL, 4).values()) == {"Q4_0", "F32"}


@pytest.mark.parametrize("qtype", ["Q4_K", "Q4_K_M"])
def test_llama_cpp_loads_small_slice(small_slices, qtype):
    from gguf_fixtures import llama_cpp_status, run_llama_cpp

    if (why := llama_cpp_status()) is not None:
        pytest.skip(why)
    [logits] = run_llama_cpp(small_slices[qtype], [[1, 300, 400]], mode="logits")
    logits = np.asarray(logits)
    assert logits.shape == (3, SMALL.vocab) and np.isfinite(logits).all() and logits.std() > 0


def test_slice_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown slice type"):
        write_slice(tmp_path / "x.gguf", "Q5_K_M", 1, SMALL)
    with pytest.raises(ValueError, match="too small"):
        write_slice(tmp_path / "x.gguf", "Q4_0", 1, replace(SMALL, vocab=100))


# ---------------------------------------------------------------------------------------------------------------
# the bench's kernel families and the llama.cpp build each is compared with
# ---------------------------------------------------------------------------------------------------------------

def test_parse_kernels(monkeypatch):
    families = pytest.importorskip("mixlocal.quant.kernels.families", reason="the kernel families have not landed yet")
    from bench_mixtral_shape import parse_kernels
    from numba.core import config

    runnable = families.host_families()
    assert parse_kernels(None) == [runnable[0]]
    assert parse_kernels("all") == list(runnable)
    assert parse_kernels("portable,PORTABLE, ") == ["portable"]
    with pytest.raises(SystemExit, match="not a kernel family"):
        parse_kernels("sse4")
    # a CPU that numba compiles for as a Haswell runs avx2 and portable only
    name, feats = families.emulation_env("avx2")["NUMBA_CPU_NAME"], families.emulation_env("avx2")["NUMBA_CPU_FEATURES"]
    monkeypatch.setattr(config, "CPU_NAME", name)
    monkeypatch.setattr(config, "CPU_FEATURES", feats)
    assert parse_kernels(None) == ["avx2"]
    assert parse_kernels("all") == ["avx2", "portable"]
    with pytest.raises(SystemExit, match="lacks"):
        parse_kernels("avx2,avx512vnni")


def test_result_names_differ_by_type_and_family():
    import argparse

    from bench_mixtral_shape import result_name

    args = argparse.Namespace(blocks=4, threads=2, clock="wall")
    names = {result_name(q, f, args) for q in SLICE_TYPES for f in ("avx512vnni", "avx2")}
    assert len(names) == 2 * len(SLICE_TYPES)
    assert result_name("Q4_K_M", "avx2", args).startswith("mixtral_shape_q4_k_m_avx2_")


def _fake_wheels(tmp_path: Path, pick: str | None, avx512: bool = True) -> Path:
    """A wheels folder like ../shared/wheels; pick: what its pick-llama-wheel prints ("avx512", "portable",
    "fail", or None for no script)."""
    d = tmp_path / "wheels"
    (d / "avx512").mkdir(parents=True)
    name = "llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl"
    (d / name).write_bytes(b"portable")
    if avx512:
        (d / "avx512" / name).write_bytes(b"avx512")
    if pick is not None:
        script = d / "pick-llama-wheel"
        body = {"avx512": f'echo "{d / "avx512" / name}"', "portable": f'echo "{d / name}"', "fail": "exit 1"}[pick]
        script.write_text("#!/bin/sh\n" + body + "\n")
        script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return d


def test_wheel_for_family(tmp_path):
    import llama_builds as lb

    d = _fake_wheels(tmp_path / "a", "avx512")
    portable = str(d / "llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl")
    fast = str(d / "avx512" / "llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl")
    assert lb.pick_wheel(d) == Path(fast)
    got = lb.wheel_for_family("avx512vnni", d)
    assert (got["wheel"], got["build"], got["matches_family"]) == (fast, "avx512", True)
    for family in ("avx2", "avxvnni"):
        got = lb.wheel_for_family(family, d)
        assert (got["wheel"], got["matches_family"], got["note"]) == (portable, True, None)
    got = lb.wheel_for_family("portable", d)
    assert got["wheel"] == portable and not got["matches_family"] and got["note"]

    # a CPU the AVX-512 build does not run: the AVX2 build, said so
    d = _fake_wheels(tmp_path / "b", "portable")
    got = lb.wheel_for_family("avx512vnni", d)
    assert got["wheel"].endswith("wheels/llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl")
    assert not got["matches_family"] and "lacks" in got["note"]
    # no script, or one that fails: the portable wheel
    for pick in (None, "fail"):
        d = _fake_wheels(tmp_path / f"c{pick}", pick)
        assert lb.pick_wheel(d) == d / "llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl"
        assert lb.wheel_for_family("avx512vnni", d)["build"] == "portable AVX2"
    # no wheels at all
    empty = tmp_path / "none"
    empty.mkdir()
    assert lb.pick_wheel(empty) is None
    assert lb.wheel_for_family("avx2", empty)["wheel"] is None


def test_llama_probe_reports_a_crash(tmp_path):
    import llama_builds as lb

    def fake(folder: str, body: str) -> Path:
        pkg = tmp_path / folder / "llama_cpp"
        pkg.mkdir(parents=True)
        (pkg / "__init__.py").write_text(body)
        return pkg.parent

    ok = fake("ok", '__version__ = "0.0"\nclass Llama:\n    def __init__(self, **kw): pass\n'
                    '    def eval(self, ids): pass\n')
    got = lb.probe(ok)
    assert got["ok"] and got["module"].startswith(str(ok))
    sigill = fake("sigill", "import os, signal\nos.kill(os.getpid(), signal.SIGILL)\n")
    got = lb.probe(sigill)
    assert not got["ok"] and "SIGILL" in got["reason"] and "Illegal instruction" in got["reason"]

"""quant.recipes against llama.cpp itself: tiny GGUFs written by gguf-py are quantized by llama.cpp's
llama_model_quantize (the llama-cpp-python wheel), and the format it picked for every tensor is compared with ours."""
from __future__ import annotations

import ctypes
import math

import gguf
import numpy as np
import pytest
from mixlocal.quant.recipes import LEVELS, Level, choose_type, plan
from mixlocal.quant.tensor import QType, nbytes_for

try:  # the llama.cpp probe lives with the formats tests (plain module when tests/ is not a package)
    from test_formats import _ggml_base
except ImportError:
    from tests.test_formats import _ggml_base

LLAMA_CPP_LEVELS = ["f32", "bf16", "f16", "q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_1", "q5_0", "q4_k_m", "q4_k_s",
                    "q4_1", "q4_0", "q3_k_l", "q3_k_m", "q3_k_s", "q2_k"]


def llama_tensors(n_layers: int, dim: int, ffn: int, n_experts: int, kv_dim: int, vocab: int,
                  output: bool = True) -> dict[str, tuple[int, ...]]:
    """GGUF names and numpy-order shapes of a llama-architecture MoE model with merged expert tensors."""
    t = {"token_embd.weight": (vocab, dim), "output_norm.weight": (dim,)}
    if output:
        t["output.weight"] = (vocab, dim)
    for i in range(n_layers):
        p = f"blk.{i}."
        t.update({p + "attn_norm.weight": (dim,), p + "attn_q.weight": (dim, dim), p + "attn_k.weight": (kv_dim, dim),
                  p + "attn_v.weight": (kv_dim, dim), p + "attn_output.weight": (dim, dim),
                  p + "ffn_norm.weight": (dim,), p + "ffn_gate_inp.weight": (n_experts, dim),
                  p + "ffn_gate_exps.weight": (n_experts, ffn, dim), p + "ffn_up_exps.weight": (n_experts, ffn, dim),
                  p + "ffn_down_exps.weight": (n_experts, dim, ffn)})
    return t


MIXTRAL_8X7B = llama_tensors(n_layers=32, dim=4096, ffn=14336, n_experts=8, kv_dim=1024, vocab=32000)


# ----------------------------------------------------------------------------------------------------------------------
# Against llama.cpp's own choices
# ----------------------------------------------------------------------------------------------------------------------

def write_tiny_gguf(path, *, n_layers, dim, ffn, n_experts, heads, kv_heads, vocab):
    shapes = llama_tensors(n_layers, dim, ffn, n_experts, dim // heads * kv_heads, vocab)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_embedding_length(dim)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_expert_count(n_experts)
    w.add_expert_used_count(2)
    w.add_rope_dimension_count(dim // heads)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    rng = np.random.default_rng(0)
    for name, shape in shapes.items():
        w.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return shapes


@pytest.fixture(scope="module")
def llama_quantize_types():
    """Quantize a GGUF with llama.cpp at a level; return {tensor name: type llama.cpp chose}."""
    lib, reason = _ggml_base()
    if lib is None:
        pytest.skip(reason)
    import llama_cpp

    def run(src, dst, level):
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = int(LEVELS[level].file_type)
        params.nthread = 2
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
        assert rc == 0, f"llama_model_quantize failed for {level}"
        return {t.name: QType(t.tensor_type) for t in gguf.GGUFReader(dst).tensors}
    return run


@pytest.fixture(scope="module")
def eight_expert_gguf(tmp_path_factory):
    # widths that are whole K blocks; 8 blocks so that use_more_bits picks some and not others; n_gqa = 4
    path = tmp_path_factory.mktemp("recipes") / "moe8.gguf"
    return path, write_tiny_gguf(path, n_layers=8, dim=256, ffn=256, n_experts=8, heads=8, kv_heads=2, vocab=256)


@pytest.fixture(scope="module")
def odd_width_gguf(tmp_path_factory):
    # width 288 = 9 * 32 is not a multiple of 256 (the K-format fallbacks); 4 experts; n_gqa = 3
    path = tmp_path_factory.mktemp("recipes") / "moe4.gguf"
    return path, write_tiny_gguf(path, n_layers=8, dim=288, ffn=256, n_experts=4, heads=9, kv_heads=3, vocab=320)


def _differences(ours, theirs):
    return {name: (ours[name].name, theirs[name].name) for name in ours if ours[name] != theirs[name]}


@pytest.mark.parametrize("level", LLAMA_CPP_LEVELS)
def test_eight_experts_match_llama_cpp(level, eight_expert_gguf, llama_quantize_types, tmp_path):
    src, shapes = eight_expert_gguf
    theirs = llama_quantize_types(src, tmp_path / f"{level}.gguf", level)
    assert set(theirs) == set(shapes)
    ours = plan(level, shapes, n_experts=8, n_layers=8, n_gqa=4)
    assert _differences(ours, theirs) == {}


@pytest.mark.parametrize("level", ["q4_k_m", "q4_k_s", "q3_k_l", "q3_k_m", "q3_k_s", "q2_k", "q5_k_m", "q5_k_s",
                                   "q6_k", "q5_1", "q5_0", "q4_1"])
def test_odd_width_and_four_experts_match_llama_cpp(level, odd_width_gguf, llama_quantize_types, tmp_path):
    src, shapes = odd_width_gguf
    theirs = llama_quantize_types(src, tmp_path / f"{level}.gguf", level)
    ours = plan(level, shapes, n_experts=4, n_layers=8, n_gqa=3)
    assert _differences(ours, theirs) == {}


# ----------------------------------------------------------------------------------------------------------------------
# The rules as documented (these hold without llama.cpp)
# ----------------------------------------------------------------------------------------------------------------------

def test_levels_describe_themselves():
    assert set(LLAMA_CPP_LEVELS) | {"q4_moe"} <= set(LEVELS)  # the classic list; IQ levels may add more
    for name, level in LEVELS.items():
        assert isinstance(level, Level) and level.name == name and len(level.description) > 20
        assert isinstance(level.file_type, gguf.LlamaFileType)


@pytest.mark.parametrize("level", list(LEVELS))
def test_router_and_norms_stay_f32(level):
    for name in ("blk.3.ffn_gate_inp.weight", "blk.3.attn_norm.weight", "blk.3.ffn_norm.weight", "output_norm.weight"):
        shape = (8, 4096) if "gate_inp" in name else (4096,)
        assert choose_type(level, name, shape, 8, None, 32) == QType.F32


def test_width_fallbacks():
    # 288 columns: whole 32-blocks, not whole 256-blocks
    assert choose_type("q4_k_m", "blk.1.attn_q.weight", (288, 288), 4, 1, 8) == QType.Q5_0
    assert choose_type("q5_k_m", "blk.1.attn_q.weight", (288, 288), 4, 1, 8) == QType.Q5_1
    assert choose_type("q6_k", "blk.1.attn_q.weight", (288, 288), 4, 1, 8) == QType.Q8_0
    assert choose_type("q2_k", "blk.1.attn_q.weight", (288, 288), 4, 1, 8) == QType.Q4_0
    assert choose_type("q4_k_m", "output.weight", (320, 288), 4, None, 8) == QType.Q8_0
    # 48 columns: not even whole 32-blocks
    assert choose_type("q4_k_m", "blk.1.attn_q.weight", (48, 48), 4, 1, 8) == QType.F16
    assert choose_type("q4_0", "blk.1.attn_q.weight", (48, 48), 4, 1, 8) == QType.F16


def test_tied_embeddings_take_the_output_rule():
    shapes = {k: v for k, v in llama_tensors(4, 256, 256, 8, 64, 512, output=False).items()}
    assert plan("q4_k_m", shapes, 8, 4)["token_embd.weight"] == QType.Q6_K
    assert choose_type("q4_k_m", "token_embd.weight", (512, 256), 8, None, 4) == QType.Q4_K


def test_q4_moe_rule_table():
    chosen = plan("q4_moe", MIXTRAL_8X7B, n_experts=8, n_layers=32)
    for name, qtype in chosen.items():
        if name.endswith("_norm.weight") or "ffn_gate_inp" in name:
            assert qtype == QType.F32, name
        elif "ffn_gate_exps" in name or "ffn_up_exps" in name:
            assert qtype == QType.Q4_K, name
        elif "ffn_down_exps" in name:
            layer = int(name.split(".")[1])
            assert qtype == (QType.Q6_K if layer < 4 or layer >= 28 else QType.Q5_K), name
        else:  # attention, embeddings, output head
            assert qtype == QType.Q8_0, name


def _file_bytes(level):
    chosen = plan(level, MIXTRAL_8X7B, n_experts=8, n_layers=32)
    return sum(nbytes_for(chosen[name], shape) for name, shape in MIXTRAL_8X7B.items())


def test_q4_moe_is_within_5_percent_of_q4_k_m_on_mixtral_shapes():
    q4_k_m, q4_moe = _file_bytes("q4_k_m"), _file_bytes("q4_moe")
    assert q4_k_m < q4_moe <= 1.05 * q4_k_m, (q4_k_m, q4_moe)


def test_sizes_rise_with_level():
    # q5_0 is left out: Q5_0 and Q5_K are both 5.5 bits, so it ties with q5_k_s
    order = ["q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_0", "q4_k_s", "q4_k_m", "q4_1", "q5_k_s", "q5_k_m", "q5_1",
             "q6_k", "q8_0", "f16"]
    sizes = [_file_bytes(level) for level in order]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)
    # f16: two bytes per matrix weight, four per norm or router weight
    kept_f32 = sum(math.prod(s) for n, s in MIXTRAL_8X7B.items() if n.endswith("_norm.weight") or "gate_inp" in n)
    n_weights = sum(math.prod(s) for s in MIXTRAL_8X7B.values())
    assert sizes[-1] == 2 * (n_weights - kept_f32) + 4 * kept_f32
    assert _file_bytes("bf16") == sizes[-1] and _file_bytes("f32") == 4 * n_weights


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="q4_k_xl"):
        choose_type("q4_k_xl", "blk.0.attn_q.weight", (256, 256), 8, 0, 4)
    with pytest.raises(ValueError, match="block 2"):
        choose_type("q4_0", "blk.2.attn_q.weight", (256, 256), 8, 3, 4)
    with pytest.raises(ValueError, match="outside"):
        choose_type("q4_0", "blk.9.attn_q.weight", (256, 256), 8, None, 4)
    with pytest.raises(ValueError, match="shape"):
        choose_type("q4_0", "blk.0.attn_q.weight", (0, 256), 8, 0, 4)

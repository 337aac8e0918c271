"""quant.recipes against llama.cpp itself: tiny GGUFs written by gguf-py are handed to llama.cpp's
llama_model_quantize (the llama-cpp-python wheel), and the format it picks for every tensor is compared with ours.
It is asked for a dry run, which picks every format by the same llama_tensor_get_type and logs it instead of writing
the file (a real IQ run takes ggml seconds per file); two real runs check that the log says what a file holds."""
from __future__ import annotations

import ctypes
import math
import re

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
IQ_LEVELS = ["iq4_nl", "iq4_xs", "iq3_m", "iq3_s", "iq3_xs", "iq3_xxs", "iq2_m", "iq2_s", "iq2_xs", "iq2_xxs",
             "iq1_m", "iq1_s"]


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

def write_tiny_gguf(path, *, n_layers, dim, ffn, n_experts, heads, kv_heads, vocab, output=True):
    shapes = llama_tensors(n_layers, dim, ffn, n_experts, dim // heads * kv_heads, vocab, output=output)
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

    def run(src, dst, level, imatrix_of=None):
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = int(LEVELS[level].file_type)
        params.nthread = 2
        if imatrix_of is not None:
            table, _keep = flat_imatrix_table(imatrix_of)
            params.imatrix = ctypes.cast(table, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
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


@pytest.fixture(scope="module")
def two_expert_tied_gguf(tmp_path_factory):
    # fewer than 4 experts and n_gqa = 1: the IQ levels' attn_v rules that neither file above reaches; no
    # output.weight, so token_embd takes the output head's rule
    path = tmp_path_factory.mktemp("recipes") / "moe2.gguf"
    return path, write_tiny_gguf(path, n_layers=8, dim=256, ffn=256, n_experts=2, heads=4, kv_heads=4, vocab=256,
                                 output=False)


TINY_GGUFS = {"eight_expert_gguf": (8, 4), "odd_width_gguf": (4, 3), "two_expert_tied_gguf": (2, 1)}  # experts, n_gqa


def flat_imatrix_table(shapes):
    """llama_model_quantize's importance matrix (what tools/quantize builds from an imatrix file), all ones: one
    row per expert for every tensor llama.cpp quantizes. The values do not enter the choice of formats."""
    import llama_cpp

    rows = [(name.encode(), np.ones(shape[-1] * (shape[0] if len(shape) == 3 else 1), np.float32))
            for name, shape in shapes.items() if len(shape) >= 2 and "_norm" not in name and "gate_inp" not in name]
    entry = llama_cpp.llama_model_imatrix_data
    table = (entry * (len(rows) + 1))(*[entry(n, a.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), a.size)
                                        for n, a in rows], entry(None, None, 0))
    return table, rows  # the arrays must outlive the call


_DRY_RUN_LINE = re.compile(r"\[\s*\d+/\s*\d+\]\s+(\S+)\s+- \[[^\]]*\], type =\s*(\w+), size =[^\n(]*(?:\((\w+)\))?\n")


@pytest.fixture(scope="module")
def llama_dry_run():
    """llama.cpp's choice for every tensor at a level, with or without an importance matrix, from the log of
    llama_model_quantize's dry run; and whether it says the real run would need an importance matrix."""
    lib, reason = _ggml_base()
    if lib is None:
        pytest.skip(reason)
    import llama_cpp
    from llama_cpp import _logger

    def run(src, shapes, level, imatrix):
        text = []

        @llama_cpp.llama_log_callback
        def collect(_level, msg, _user):
            text.append(msg.decode("utf-8", "replace"))

        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = int(LEVELS[level].file_type)
        params.dry_run = True
        if imatrix:
            table, _keep = flat_imatrix_table(shapes)
            params.imatrix = ctypes.cast(table, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
        try:
            rc = llama_cpp.llama_model_quantize(str(src).encode(), b"/nonexistent/unused.gguf", ctypes.byref(params))
        finally:
            llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
        log = "".join(text)
        assert rc == 0, log[-2000:]
        chosen = {m[1]: QType[(m[3] or m[2]).upper()] for m in _DRY_RUN_LINE.finditer(log)}
        return chosen, "will require an imatrix" in log
    return run


def _differences(ours, theirs):
    return {name: (ours[name].name, theirs[name].name) for name in ours if ours[name] != theirs[name]}


@pytest.mark.parametrize("imatrix", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("gguf_fixture", list(TINY_GGUFS))
@pytest.mark.parametrize("level", IQ_LEVELS + LLAMA_CPP_LEVELS)
def test_dry_run_matches_llama_cpp(level, gguf_fixture, imatrix, llama_dry_run, request):
    """Every llama.cpp level on every tiny file, with and without an importance matrix (which changes iq3_xxs,
    iq4_xs/iq4_nl and q4_0/q5_0), and whether llama.cpp would refuse it without one as engine.quantize does."""
    from mixlocal.engine.quantize import _requires_imatrix

    src, shapes = request.getfixturevalue(gguf_fixture)
    n_experts, n_gqa = TINY_GGUFS[gguf_fixture]
    theirs, needs = llama_dry_run(src, shapes, level, imatrix)
    assert set(theirs) == set(shapes)
    ours = plan(level, shapes, n_experts=n_experts, n_layers=8, n_gqa=n_gqa, imatrix=imatrix)
    assert _differences(ours, theirs) == {}
    if not imatrix:
        assert needs == any(_requires_imatrix(level, name, q) for name, q in ours.items() if q != QType.F32)


@pytest.mark.parametrize("level, imatrix", [("q3_k_m", False), ("q4_0", True)])
def test_dry_run_says_what_a_real_run_writes(level, imatrix, eight_expert_gguf, llama_dry_run, llama_quantize_types,
                                             tmp_path):
    """The log read above is what the written file holds (q3_k_m mixes four formats here; q4_0 with an importance
    matrix five, its first ffn_down blocks Q4_1)."""
    src, shapes = eight_expert_gguf
    written = llama_quantize_types(src, tmp_path / "q.gguf", level, shapes if imatrix else None)
    assert set(written) == set(shapes) and llama_dry_run(src, shapes, level, imatrix)[0] == written
    assert len(set(written.values())) >= 4


def test_iq_levels_on_mixtral_shapes():
    """The rules that make the IQ levels what they are on Mixtral 8x7B (8 experts, n_gqa 4, 32 blocks)."""
    iq2_m = plan("iq2_m", MIXTRAL_8X7B, n_experts=8, n_layers=32, imatrix=True)
    assert iq2_m["token_embd.weight"] == QType.IQ3_S and iq2_m["output.weight"] == QType.Q5_K
    assert iq2_m["blk.0.attn_v.weight"] == iq2_m["blk.0.attn_k.weight"] == QType.Q4_K  # no 8-expert Q8_0 here
    assert iq2_m["blk.3.ffn_down_exps.weight"] == QType.IQ3_S and iq2_m["blk.4.ffn_down_exps.weight"] == QType.IQ2_S
    assert iq2_m["blk.9.attn_output.weight"] == QType.Q5_K and iq2_m["blk.9.ffn_up_exps.weight"] == QType.IQ2_S
    iq3_xxs = plan("iq3_xxs", MIXTRAL_8X7B, n_experts=8, n_layers=32)
    assert iq3_xxs["blk.3.ffn_down_exps.weight"] == QType.Q4_K and iq3_xxs["blk.4.ffn_down_exps.weight"] == QType.Q3_K
    assert plan("iq3_xxs", MIXTRAL_8X7B, n_experts=8, n_layers=32, imatrix=True)["blk.4.ffn_down_exps.weight"] == \
        QType.IQ3_XXS
    assert iq3_xxs["blk.5.attn_q.weight"] == QType.IQ2_S and iq3_xxs["blk.5.attn_v.weight"] == QType.Q8_0
    iq4_xs = plan("iq4_xs", MIXTRAL_8X7B, n_experts=8, n_layers=32)
    assert iq4_xs["blk.0.ffn_down_exps.weight"] == QType.Q5_K and iq4_xs["blk.5.ffn_gate_exps.weight"] == QType.IQ4_XS
    assert plan("iq4_xs", MIXTRAL_8X7B, n_experts=8, n_layers=32, imatrix=True)["blk.0.ffn_down_exps.weight"] == \
        QType.IQ4_XS
    # q4_0 guards its first ffn_down blocks with Q4_1, only with an importance matrix
    assert plan("q4_0", MIXTRAL_8X7B, n_experts=8, n_layers=32, imatrix=True)["blk.3.ffn_down_exps.weight"] == \
        QType.Q4_1
    assert plan("q4_0", MIXTRAL_8X7B, n_experts=8, n_layers=32)["blk.3.ffn_down_exps.weight"] == QType.Q4_0


@pytest.mark.parametrize("level", ["iq1_s", "iq1_m"])
def test_iq1_levels_on_mixtral_shapes(level):
    """llama.cpp's IQ1 rules on Mixtral 8x7B (8 experts, n_gqa 4, 32 blocks): its IQ1/IQ2 branch, so no 8-expert Q8_0
    for attn_k/attn_v; attn_output Q5_K with 8 experts and IQ2_XXS without."""
    base = LEVELS[level].base
    chosen = plan(level, MIXTRAL_8X7B, n_experts=8, n_layers=32, imatrix=True)
    assert chosen["token_embd.weight"] == QType.Q2_K and chosen["output.weight"] == QType.Q5_K
    for i in (0, 3, 4, 17, 31):
        p = f"blk.{i}."
        assert chosen[p + "attn_v.weight"] == chosen[p + "attn_k.weight"] == QType.Q4_K
        assert chosen[p + "attn_q.weight"] == chosen[p + "ffn_gate_exps.weight"] == chosen[p + "ffn_up_exps.weight"] == base
        assert chosen[p + "attn_output.weight"] == QType.Q5_K
        assert chosen[p + "ffn_down_exps.weight"] == (QType.Q2_K if i < 4 else base)
        assert chosen[p + "ffn_gate_inp.weight"] == chosen[p + "attn_norm.weight"] == QType.F32
    assert plan(level, MIXTRAL_8X7B, n_experts=8, n_layers=32) == chosen  # no imatrix-dependent rule here
    # one dense model (no experts, n_gqa 1): attn_output IQ2_XXS, attn_v Q2_K, attn_k the base format
    dense = llama_tensors(8, 256, 512, 1, 256, 512)
    small = plan(level, dense, n_experts=1, n_layers=8, n_gqa=1, imatrix=True)
    assert small["blk.5.attn_output.weight"] == QType.IQ2_XXS and small["blk.5.attn_v.weight"] == QType.Q2_K
    assert small["blk.5.attn_k.weight"] == base and small["blk.0.ffn_down_exps.weight"] == QType.Q2_K


def test_iq1_sizes_below_iq2():
    sizes = [_file_bytes(level, imatrix=True) for level in ("iq1_s", "iq1_m", "iq2_xxs")]
    assert sizes == sorted(sizes) and len(set(sizes)) == 3
    # on Mixtral 8x7B: about 1.6 and 1.8 bits per weight over the whole file (the experts are 1.5625 / 1.75)
    n_weights = sum(math.prod(s) for s in MIXTRAL_8X7B.values())
    assert 1.56 < 8 * sizes[0] / n_weights < 1.75 < 8 * sizes[1] / n_weights < 1.95


def test_iq_width_fallbacks():
    # 288 columns: IQ formats of 256 fall back to IQ4_NL, whose blocks are 32; 48 columns: to F16
    for level in ("iq4_xs", "iq3_s", "iq2_m", "iq1_s", "iq1_m"):
        assert choose_type(level, "blk.1.ffn_gate_exps.weight", (8, 288, 288), 4, 1, 8, imatrix=True) == QType.IQ4_NL
        assert choose_type(level, "blk.1.ffn_gate_exps.weight", (8, 48, 48), 4, 1, 8, imatrix=True) == QType.F16
    assert choose_type("iq4_nl", "blk.1.ffn_gate_exps.weight", (8, 288, 288), 4, 1, 8) == QType.IQ4_NL
    assert choose_type("iq2_xs", "token_embd.weight", (320, 288), 4, None, 8, imatrix=True) == QType.Q4_0  # Q2_K's


# ----------------------------------------------------------------------------------------------------------------------
# A level whose formats we cannot encode yet
# ----------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def default_weights():
    from mixlocal.engine.loader import open_source
    return open_source(None)[1]


def _flat_imatrix(weights):
    from mixlocal.quant.imatrix import Imatrix, ImatrixEntry
    entries = {}
    for name, t in weights.tensors().items():
        if not isinstance(t, np.ndarray):
            n_mat = t.shape[0] if len(t.shape) == 3 else 1
            entries[name] = ImatrixEntry(sums2=np.ones((n_mat, t.shape[-1])), counts=np.ones(n_mat))
    return Imatrix(entries=entries, datasets=["flat"], chunk_count=1, chunk_size=1)


class _Started(Exception):
    """Raised by a progress hook: quantize_weights got past its checks and began the work."""


def _start_and_stop(items):
    raise _Started


def _missing(weights, level):
    from mixlocal.engine.quantize import target_types
    from mixlocal.quant.quantize import QUANTIZE_TYPES
    return sorted(q.name for q in set(target_types(weights, level, imatrix=True).values()) - set(QUANTIZE_TYPES))


@pytest.mark.parametrize("level", IQ_LEVELS)
def test_level_without_a_quantizer_says_which_format(level, default_weights):
    """Whichever is true now: every format the level picks has a quantizer in quant.quantize, and quantize_weights
    starts the work; or it is refused before any work by a MissingQuantizerError naming the formats it lacks."""
    from mixlocal.engine.quantize import MissingQuantizerError, quantize_weights

    im = _flat_imatrix(default_weights)
    missing = _missing(default_weights, level)
    if not missing:
        with pytest.raises(_Started):
            quantize_weights(default_weights, level, imatrix=im, progress=_start_and_stop)
        return
    with pytest.raises(MissingQuantizerError) as e:
        quantize_weights(default_weights, level, imatrix=im, progress=_start_and_stop)
    assert isinstance(e.value, ValueError)
    assert sorted(q.name for q in e.value.types) == missing and all(m in str(e.value) for m in missing)


def test_load_and_quantize_name_the_missing_format(default_weights, capsys, tmp_path, monkeypatch):
    """engine.load(quant=) and `mixlocal quantize --imatrix` on a level we cannot encode: the same error, one line
    on the command line, no file left behind. Once every IQ level has its quantizers, IQ3_S's is taken away here."""
    from mixlocal.engine import quantize as eq
    from mixlocal.engine.cli import main
    from mixlocal.engine.loader import DEFAULT_MODEL
    from mixlocal.quant.imatrix import write_imatrix

    from mixlocal import engine

    lacking = [(level, m) for level in IQ_LEVELS if (m := _missing(default_weights, level))]
    if not lacking:
        monkeypatch.setattr(eq, "QUANTIZE_TYPES", tuple(q for q in eq.QUANTIZE_TYPES if q != QType.IQ3_S))
        lacking = [("iq3_s", ["IQ3_S"])]
    level, missing = lacking[0]
    # engine.load takes no importance matrix; the format it cannot encode is still what it names first
    with pytest.raises(eq.MissingQuantizerError, match=missing[0]):
        engine.load(quant=level, n_ctx=64, n_threads=1)
    write_imatrix(tmp_path / "flat.gguf", _flat_imatrix(default_weights))
    out = tmp_path / "x.gguf"
    assert main(["quantize", str(DEFAULT_MODEL), str(out), "--type", level, "--allow-requantize",
                 "--imatrix", str(tmp_path / "flat.gguf")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0] and missing[0] in err[0], err
    assert not out.exists() and not (tmp_path / "x.gguf.part").exists()


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


def _file_bytes(level, imatrix=False):
    chosen = plan(level, MIXTRAL_8X7B, n_experts=8, n_layers=32, imatrix=imatrix)
    return sum(nbytes_for(chosen[name], shape) for name, shape in MIXTRAL_8X7B.items())


def test_q4_moe_is_within_5_percent_of_q4_k_m_on_mixtral_shapes():
    q4_k_m, q4_moe = _file_bytes("q4_k_m"), _file_bytes("q4_moe")
    assert q4_k_m < q4_moe <= 1.05 * q4_k_m, (q4_k_m, q4_moe)


def test_iq_sizes_rise_with_level():
    order = ["iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq3_xxs", "iq3_xs", "iq3_s", "iq3_m", "iq4_xs", "iq4_nl"]
    sizes = [_file_bytes(level, imatrix=True) for level in order]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)
    assert _file_bytes("iq4_xs") < _file_bytes("q4_k_s") and _file_bytes("q2_k") < _file_bytes("iq3_m")


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

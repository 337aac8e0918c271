"""mlx-community folders: one written by MLX's own mx.quantize / mx.save_safetensors loads on both backends, which
agree with each other and with mlx-lm; write_mlx_folder writes folders that mlx-lm itself loads."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import MIXTRAL_TOKENIZER, in_ci, mean_kl, rel_err

try:
    import mlx.core as mx
except ImportError as e:  # CI installs mlx[cpu]: there a missing mlx must fail, never skip every test here
    if in_ci():
        raise
    pytest.skip(f"mlx is not installed ({e}); pip install -e '.[mlx]'", allow_module_level=True)

from mixlocal.engine.sources import mlx as mlx_source
from mixlocal.engine.sources.hf import load_hf
from mixlocal.engine.sources.mlx import is_mlx_dir, write_mlx_folder
from mixlocal.quant import QType
from mixlocal.quant.affine import AffineTensor, quantize_affine

from mixlocal import engine

IDS = [1, 415, 2936, 9060, 285, 1142, 754, 272, 17898, 3914, 28723, 13, 330, 1000, 2000, 3000, 31999, 5]


def mlx_lm_or_skip():
    try:
        import mlx_lm
        import mlx_lm.utils
    except ImportError as e:  # in the dev extra: CI must have it
        if in_ci():
            raise
        pytest.skip(f"mlx-lm is not installed ({e}); pip install -e '.[dev]'")
    return mlx_lm


def write_mlx_community(hf_dir, out, *, stacked=True, bits=4, group_size=64):
    """An mlx-community folder made by MLX itself, as mlx-lm's converter lays it out: float16, every linear layer
    quantized (the router too), experts stacked as switch_mlp (or, as early conversions did, one triplet each)."""
    out.mkdir(parents=True, exist_ok=True)
    hf = mx.load(str(hf_dir / "model.safetensors"))
    cfg = json.loads((hf_dir / "config.json").read_text())
    res = {}

    def quantize(name, a):
        res[name + ".weight"], res[name + ".scales"], res[name + ".biases"] = mx.quantize(
            a.astype(mx.float16), group_size=group_size, bits=bits)

    for k, a in hf.items():
        if ".experts." in k:
            continue
        if a.ndim == 1:
            res[k] = a.astype(mx.float16)
        else:
            quantize(k.removesuffix(".weight"), a)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}.block_sparse_moe."
        for w, proj in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            mats = [hf[f"{p}experts.{e}.{w}.weight"] for e in range(cfg["num_local_experts"])]
            if stacked:
                quantize(f"{p}switch_mlp.{proj}", mx.stack(mats))
            else:
                for e, m in enumerate(mats):
                    quantize(f"{p}experts.{e}.{w}", m)
    mx.save_safetensors(str(out / "model.safetensors"), res, metadata={"format": "mlx"})
    cfg["quantization"] = {"group_size": group_size, "bits": bits}
    (out / "config.json").write_text(json.dumps(cfg))
    shutil.copy(MIXTRAL_TOKENIZER, out / "tokenizer.model")
    return out


@pytest.fixture(scope="module")
def community_dir(hf_model_dir, tmp_path_factory):
    return write_mlx_community(hf_model_dir, tmp_path_factory.mktemp("mlx_community"))


def mlx_lm_logits(folder, ids):
    """mlx-lm's own Mixtral on the folder, in float32 (its float16 default would add half-precision noise)."""
    from mlx_lm.utils import load_model
    model, _ = load_model(folder)
    model.set_dtype(mx.float32)
    return np.array(model(mx.array([ids]))[0])


# ------------------------------------------------------------------ reading

def test_community_folder_loads_on_both_backends_and_they_agree(community_dir):
    assert is_mlx_dir(community_dir)
    on_mlx = engine.load(community_dir, backend="mlx", n_ctx=64, kv_type="f32")
    on_numba = engine.load(community_dir, backend="numba", n_ctx=64, kv_type="f32")
    # MLX keeps the triplets as they are; numba gets the same groups as Q4_1 blocks, and the router as float
    assert (on_mlx.backend.layers[0].w1.bits, on_mlx.backend.layers[0].w1.group_size) == (4, 64)
    assert on_numba.backend.w.layers[0].w1.qtype == QType.Q4_1
    assert on_numba.backend.w.layers[0].router.dtype == np.float32
    a, b = on_mlx.eval(IDS), on_numba.eval(IDS)
    assert rel_err(a, b) < 1e-3
    assert mean_kl(a, b) < 1e-6
    assert on_mlx.generate(IDS[:5], max_tokens=8, temperature=0).tokens == \
        on_numba.generate(IDS[:5], max_tokens=8, temperature=0).tokens


def test_community_folder_matches_mlx_lm(community_dir):
    mlx_lm_or_skip()
    ours = engine.load(community_dir, backend="mlx", n_ctx=64, kv_type="f32").eval(IDS)
    ref = mlx_lm_logits(community_dir, IDS)
    assert rel_err(ours, ref) < 1e-3
    assert mean_kl(ref, ours) < 1e-6


def test_per_expert_triplets_load_like_stacked(hf_model_dir, community_dir, tmp_path):
    """Early mlx-community Mixtral conversions kept experts.{e}.w{1,2,3} triplets; they stack to the same model."""
    old = write_mlx_community(hf_model_dir, tmp_path / "old", stacked=False)
    a = engine.load(old, backend="mlx", n_ctx=64, kv_type="f32").eval(IDS[:6])
    b = engine.load(community_dir, backend="mlx", n_ctx=64, kv_type="f32").eval(IDS[:6])
    np.testing.assert_array_equal(a, b)


def test_8_bit_folder_on_both_backends(hf_model_dir, tmp_path):
    """8-bit groups have no ggml twin: numba gets them as float32 (with a notice), MLX runs them quantized."""
    d = write_mlx_community(hf_model_dir, tmp_path / "q8", bits=8, group_size=32)
    a = engine.load(d, backend="mlx", n_ctx=64, kv_type="f32").eval(IDS[:6])
    b = engine.load(d, backend="numba", n_ctx=64, kv_type="f32").eval(IDS[:6])
    assert mean_kl(a, b) < 1e-6


# ------------------------------------------------------------------ damaged folders

def _rewrite(folder, dst, edit):
    shutil.copytree(folder, dst)
    w = dict(mx.load(str(dst / "model.safetensors")))
    edit(w)
    mx.save_safetensors(str(dst / "model.safetensors"), w)
    return dst


def test_missing_biases_named(community_dir, tmp_path):
    d = _rewrite(community_dir, tmp_path / "d",
                 lambda w: w.pop("model.layers.1.self_attn.q_proj.biases"))
    with pytest.raises(engine.ModelFormatError, match=r"model\.layers\.1\.self_attn\.q_proj.*biases"):
        engine.load(d, backend="numba")


def test_scales_that_disagree_with_the_weights_named(community_dir, tmp_path):
    name = "model.layers.0.block_sparse_moe.switch_mlp.down_proj"
    d = _rewrite(community_dir, tmp_path / "d", lambda w: w.update({name + ".scales": w[name + ".scales"][..., :-1],
                                                                     name + ".biases": w[name + ".biases"][..., :-1]}))
    with pytest.raises(engine.ModelFormatError, match=name.replace(".", r"\.")):
        engine.load(d, backend="mlx")


def test_wrong_bits_in_config_named(community_dir, tmp_path):
    d = shutil.copytree(community_dir, tmp_path / "d")
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization"]["bits"] = 8
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(engine.ModelFormatError, match="do not fit 8-bit groups of 64"):
        engine.load(d, backend="numba")
    cfg["quantization"] = {"group_size": 32, "bits": 4, "mode": "mxfp4"}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(engine.ModelFormatError, match="mxfp4"):
        engine.load(d, backend="mlx")


def test_truncated_weights_named(community_dir, tmp_path):
    d = shutil.copytree(community_dir, tmp_path / "d")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(engine.ModelFormatError, match="truncated"):
        engine.load(d, backend="numba")


# ------------------------------------------------------------------ writing

def test_written_folder_loads_in_mlx_lm(hf_model_dir, tmp_path):
    mlx_lm = mlx_lm_or_skip()
    _, weights, tok = load_hf(hf_model_dir)
    out = write_mlx_folder(weights, tok, tmp_path / "out", bits=4, group_size=64)
    model, tokenizer = mlx_lm.load(str(out))
    ours = engine.load(out, backend="mlx", n_ctx=64, kv_type="f32")
    text = "Hello world, this is Mixtral. 1234 ünïcode"
    assert tokenizer.encode(text) == ours.tokenizer.encode(text)
    model.set_dtype(mx.float32)
    ref = np.array(model(mx.array([IDS]))[0])
    a = ours.eval(IDS)
    assert rel_err(a, ref) < 1e-3 and mean_kl(ref, a) < 1e-6
    b = engine.load(out, backend="numba", n_ctx=64, kv_type="f32").eval(IDS)
    assert mean_kl(a, b) < 1e-6


def test_written_folder_shards_like_mlx_lm(hf_model_dir, tmp_path, monkeypatch):
    mlx_lm_or_skip()
    monkeypatch.setattr(mlx_source, "_MAX_SHARD_BYTES", 3 << 20)
    _, weights, tok = load_hf(hf_model_dir)
    out = write_mlx_folder(weights, tok, tmp_path / "out", bits=4, group_size=32)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and (out / "model.safetensors.index.json").is_file()
    a = engine.load(out, backend="mlx", n_ctx=64, kv_type="f32").eval(IDS[:6])
    assert mean_kl(mlx_lm_logits(out, IDS[:6]), a) < 1e-6


def test_numpy_quantizer_is_as_accurate_as_mx_quantize():
    """write_mlx_folder quantizes without MLX; per weight it loses no more than mx.quantize does."""
    x = np.random.default_rng(0).standard_normal((64, 512)).astype(np.float32) * 0.05
    for bits in (4, 8):
        ours = quantize_affine(x, bits, 64, "F16").dequantize()
        packed, s, b = mx.quantize(mx.array(x).astype(mx.float16), group_size=64, bits=bits)
        theirs = np.array(mx.dequantize(packed, s, b, group_size=64, bits=bits).astype(mx.float32))
        assert np.sqrt(((ours - x) ** 2).mean()) <= 1.05 * np.sqrt(((theirs - x) ** 2).mean()), bits


def test_affine_tensor_rejects_inconsistent_triplets():
    packed = np.zeros((4, 16), np.uint32)
    with pytest.raises(ValueError, match="scales has shape"):
        AffineTensor((4, 128), 4, 64, packed, np.zeros((4, 3), np.float16), np.zeros((4, 2), np.float16))
    with pytest.raises(ValueError, match="group size"):
        AffineTensor((4, 128), 4, 16, packed, np.zeros((4, 8), np.float16), np.zeros((4, 8), np.float16))


def test_community_folder_requantized_at_load_on_mlx(community_dir, caplog):
    """quant= requantizes ggml blocks, so the folder comes in as ggml blocks, and MLX maps the result (Q4_0 exactly,
    Q6_K by requantizing, with a notice)."""
    import logging
    with caplog.at_level(logging.WARNING, logger="mixlocal.mlx"):
        llm = engine.load(community_dir, backend="mlx", quant="q4_0", n_ctx=64, kv_type="f32")
    assert (llm.backend.layers[0].w1.bits, llm.backend.layers[0].w1.group_size) == (4, 32)
    assert np.isfinite(llm.eval(IDS[:4])).all()

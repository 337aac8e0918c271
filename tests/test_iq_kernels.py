"""The packed IQ kernels (quant/kernels/iq_quads.py, iq_grid_quads.py, iq2_quads.py, iq_s_quads.py, iq_portable.py)
against gguf-py: dequantize with `gguf.quants.dequantize`, then matmul in float64 on activations rounded as the
kernels round them (Q8_K for every IQ format but IQ4_NL in the integer families, Q8_0 otherwise:
kernels.activation_type), in every kernel family this CPU runs.

Blocks are random bytes with float16 scales of a sane size (gguf-py has no IQ quantizer), so every code, every
6-bit sub-block scale and every sign pattern occurs. The 256-bit families also run in a child process whose numba
compiles for a CPU without AVX-512, as test_kernel_families does for the K-quants.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf_fixtures import write_gguf_with_gguf_py
from mixlocal.quant import QTensor, QType, kernels
from mixlocal.quant.kernels import families
from test_decode_step import _decode_logits
from test_iq_formats import _random_iq_quantizer, _set_scale
from test_kernels import assert_matches

from mixlocal import engine

ROOT = Path(__file__).resolve().parent.parent
IQ_PACKED = [QType.IQ4_XS, QType.IQ4_NL, QType.IQ3_XXS, QType.IQ3_S, QType.IQ2_XS, QType.IQ2_S, QType.IQ2_XXS,
             QType.IQ1_S, QType.IQ1_M]
IQ_PORTABLE_ONLY = []  # packed in the portable family only, so far
CASES = [(q, f) for q in IQ_PACKED for f in kernels.FAMILIES] + [(q, "portable") for q in IQ_PORTABLE_ONLY]


def iq_raw(qtype: QType, shape: tuple[int, ...], rng: np.random.Generator, scale=None) -> np.ndarray:
    """Random valid blocks (..., row_bytes): random codes and scale bits, the float16 d in the block's first bytes."""
    bs, ts = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, shape[:-1] + (shape[-1] // bs, ts), dtype=np.uint8)
    d = rng.random(raw.shape[:-1]) * 2e-3 + 1e-4 if scale is None else np.full(raw.shape[:-1], scale)
    _set_scale(raw, qtype, d)
    return raw.reshape(shape[:-1] + (-1,))


def weight_of(qtype: QType, raw: np.ndarray, shape: tuple[int, ...]) -> tuple[QTensor, np.ndarray]:
    ref = np.asarray(gguf.quants.dequantize(raw, qtype), np.float64).reshape(shape)
    return QTensor(qtype, shape, np.ascontiguousarray(raw).reshape(-1)), ref


def cols(qtype: QType) -> int:
    return 160 if qtype == QType.IQ4_NL else 512  # several (super-)blocks, 160 not a power of two


def family_or_skip(family: str) -> None:
    if family not in kernels.host_families():
        pytest.skip(f"this CPU cannot run the {family} kernels (it runs {', '.join(kernels.host_families())})")


def check_experts(p, ref: np.ndarray, x: np.ndarray, ids: np.ndarray, label: str) -> None:
    y = kernels.expert_linear(p, x, ids)
    for e in np.unique(ids):
        rows = ids == e
        assert_matches(y[rows], ref[e], x[rows], f"{label} expert {e}", act=kernels.activation_type(p))


def test_iq4_formats_have_packed_layouts_in_every_family():
    for family in kernels.FAMILIES:
        assert set(IQ_PACKED) <= kernels.packed_types(family)
        assert {q.name for q in IQ_PACKED} <= set(kernels._RUNS[family])
    assert set(IQ_PORTABLE_ONLY) <= kernels.packed_types("portable")
    # the packed arrays keep about the file's size: bytes per (super-)block, packed against the file's
    most = {QType.IQ4_XS: (138, 136), QType.IQ4_NL: (18, 18), QType.IQ3_XXS: (106, 98), QType.IQ3_S: (114, 110),
            QType.IQ2_XS: (74, 74), QType.IQ2_S: (82, 82),
            QType.IQ2_XXS: (66, 66), QType.IQ1_S: (50, 50), QType.IQ1_M: (58, 56)}
    for qtype in IQ_PACKED + IQ_PORTABLE_ONLY:
        for layout in ("quads", "rows") if qtype in IQ_PACKED else ("rows",):
            n_bytes = sum(int(np.prod(s)) * dt.itemsize for s, dt in kernels.packed_shapes(qtype, 1, 64, 512, layout))
            file_bytes = 64 * 512 // GGML_QUANT_SIZES[qtype][0] * GGML_QUANT_SIZES[qtype][1]
            assert file_bytes <= n_bytes <= file_bytes * most[qtype][0] // most[qtype][1], (qtype.name, layout)


@pytest.mark.parametrize(("qtype", "family"), CASES, ids=lambda c: getattr(c, "name", c))
def test_every_family_matches_reference(qtype, family):
    """Decode (1, 2 rows), a prefill with runs of 4+ rows per expert (40) and linear on 7 rows (the four-row loop and
    its remainder), on 70 rows (a padded last group) of 3 experts."""
    family_or_skip(family)
    n_exp, n, k = 3, 70, cols(qtype)
    rng = np.random.default_rng(1)
    w, ref = weight_of(qtype, iq_raw(qtype, (n_exp, n, k), rng), (n_exp, n, k))
    p = kernels.prepare(w, family=family)
    assert isinstance(p, kernels.PackedWeight) and p.family == family
    want_act = QType.Q8_K if qtype != QType.IQ4_NL and family != "portable" else QType.Q8_0
    assert kernels.activation_type(p) == want_act  # llama.cpp's rounding for the format
    for t in (1, 2, 40):
        check_experts(p, ref, rng.standard_normal((t, k)).astype(np.float32), rng.integers(0, n_exp, t),
                      f"{qtype.name} {family} T={t}")
    p2 = kernels.prepare(w.expert(2), family=family)
    x = rng.standard_normal((7, k)).astype(np.float32)
    assert_matches(kernels.linear(p2, x), ref[2], x, f"{qtype.name} {family} linear", act=kernels.activation_type(p2))


@pytest.mark.parametrize(("qtype", "family"), CASES, ids=lambda c: getattr(c, "name", c))
def test_extreme_codes_and_scales_do_not_overflow(qtype, family):
    """Every code at the codebook's ends (-127 and 113; IQ3_XXS: grid entry 0 with scale 1 and all signs +, entry 255
    with scale 31 and all signs -; IQ3_S: entry 0 (all 1) with scale 1 and signs +, entry 511 (1 1 15 15) with
    scale 31 and all signs -; IQ2_XS: entry 0 (all 8) with scales 1 and signs +, entry 511 (all 43) with scales 31
    and all eight signs - by parity; IQ2_S: entry 0 (all 8) with scales 1 and signs +, entry 1023 (all 43) with
    scales 31 and all signs -; IQ2_XXS: entry 0 with scale 1 and signs +, entry 255
    (8 25 8 8 25 43 43 43) with scale 31 and all signs -; IQ1_S/IQ1_M: entry 0 with scale 1 and delta +, entry 2047
    with scale 15 and delta -), every IQ4_XS sub-block scale at -32 or 31, activations at full scale with one sign: the largest integer sums the kernels can meet (AVX2's 16-bit pair sums among them)."""
    family_or_skip(family)
    n_exp, n, k = 2, 64, cols(qtype)
    rng = np.random.default_rng(2)
    raw = iq_raw(qtype, (n_exp, n, k), rng, scale=1e-3)
    bs, ts = GGML_QUANT_SIZES[qtype]
    blocks = raw.reshape(n_exp, n, k // bs, ts)
    code_at = {QType.IQ4_XS: 8, QType.IQ1_M: 0}.get(qtype, 2)
    blocks[0, :, :, code_at:] = 0x00       # expert 0: level -127 everywhere
    blocks[1, :, :, code_at:] = 0xFF       # expert 1: level 113 everywhere
    if qtype == QType.IQ1_M:
        _set_scale(blocks, qtype, np.full(blocks.shape[:-1], 1e-3))  # its d sits among the scale bits
    if qtype == QType.IQ4_XS:
        blocks[0, :, :, 2:8] = 0x00        # scale -32 (6-bit 0)
        blocks[1, :, :, 2:8] = 0xFF        # scale 31 (6-bit 63)
    w, ref = weight_of(qtype, raw, (n_exp, n, k))
    p = kernels.prepare(w, family=family)
    for sign in (1.0, -1.0):
        x = np.full((8, k), sign, np.float32)
        x[:, ::7] *= 0.5  # not all equal, still one sign
        check_experts(p, ref, x, np.array([0, 1] * 4), f"{qtype.name} {family} extreme sign {sign:+}")
        check_experts(p, ref, x[:1], np.array([1]), f"{qtype.name} {family} extreme decode sign {sign:+}")


@pytest.mark.parametrize(("qtype", "family"), CASES, ids=lambda c: getattr(c, "name", c))
def test_subnormal_half_scales(qtype, family):
    family_or_skip(family)
    n_exp, n, k = 2, 70, cols(qtype)
    rng = np.random.default_rng(3)
    raw = iq_raw(qtype, (n_exp, n, k), rng, scale=3e-5)  # float16 normals start at 6.1e-5
    w, ref = weight_of(qtype, raw, (n_exp, n, k))
    p = kernels.prepare(w, family=family)
    check_experts(p, ref, rng.standard_normal((9, k)).astype(np.float32), rng.integers(0, n_exp, 9),
                  f"{qtype.name} {family} subnormal")


@pytest.mark.parametrize("qtype", IQ_PACKED + IQ_PORTABLE_ONLY, ids=lambda q: q.name)
def test_decode_step_binds_the_packed_iq_kernels(hf_model_dir, tmp_path, qtype):
    """A model whose matrices are all IQ4: the one-token decode step (which binds each product's decode kernel
    with its activation buffers) gives the forward pass's logits bit for bit."""
    path = write_gguf_with_gguf_py(hf_model_dir, tmp_path / f"{qtype.name}.gguf", qtype,
                                   quantize=_random_iq_quantizer(int(qtype)))
    llm = engine.load(path, n_ctx=64, n_threads=2, backend="numba",
                      kernels="portable" if qtype in IQ_PORTABLE_ONLY else None)
    w1 = llm.backend.mats[0]["w1"]
    assert isinstance(w1, kernels.PackedWeight) and w1.qtype == qtype
    assert llm.backend.fused_decode
    rng = np.random.default_rng(5)
    prompt, steps = rng.integers(3, 32000, 7).tolist(), rng.integers(3, 32000, 6).tolist()
    np.testing.assert_array_equal(_decode_logits(llm, prompt, steps, True), _decode_logits(llm, prompt, steps, False))


_CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    sys.path.insert(0, "tests")
    from mixlocal.quant import QType, kernels
    from test_iq_kernels import IQ_PACKED, check_experts, cols, iq_raw, weight_of

    family = sys.argv[1]
    report = {"families": list(kernels.host_families()), "checked": []}
    rng = np.random.default_rng(4)
    for qtype in IQ_PACKED:
        shape = (2, 70, cols(qtype))
        w, ref = weight_of(qtype, iq_raw(qtype, shape, rng), shape)
        p = kernels.prepare(w)
        assert p.family == family, p.family
        for t in (1, 9):
            check_experts(p, ref, rng.standard_normal((t, shape[2])).astype(np.float32), rng.integers(0, 2, t),
                          f"{qtype.name} {family} T={t}")
        report["checked"].append(qtype.name)
    asm = ""
    for name in report["checked"]:
        for k in set(kernels._RUNS[family][name]):
            for sig in k.signatures:
                asm += k.inspect_asm(sig)
    report.update(zmm="zmm" in asm, vpshufb="vpshufb" in asm, vpdpbusd="vpdpbusd" in asm,
                  vpmaddubsw="vpmaddubsw" in asm)
    print(json.dumps(report))
""")


@pytest.mark.parametrize("family", ["avx2", "avxvnni"])
def test_256_bit_families_run_without_avx512(family, tmp_path):
    family_or_skip(family)
    # a fresh numba cache: kernels loaded from a cache have no assembly to inspect
    env = {**os.environ, **families.emulation_env(family), "PYTHONPATH": str(ROOT), "NUMBA_CACHE_DIR": str(tmp_path)}
    env.pop("NUMBA_DISABLE_JIT", None)
    out = subprocess.run([sys.executable, "-c", _CHILD, family], check=False, cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["families"][0] == family
    assert report["checked"] == [q.name for q in IQ_PACKED]
    assert report["vpshufb"], "the codebook lookup is not a byte shuffle"
    assert not report["zmm"], "a 256-bit family compiled to 512-bit registers"
    if family == "avx2":
        assert report["vpmaddubsw"] and not report["vpdpbusd"]
    else:
        assert report["vpdpbusd"]

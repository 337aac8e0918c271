"""quant.kernels against gguf-py: dequantize with `gguf.quants.dequantize`, then matmul in float64.

Weights are random but valid blocks: gguf-py's own quantizer where it has one, else random bytes with sane f16
scales. Shapes use row counts that are not multiples of anything (the runtime layouts pad row groups) and several
blocks per row. Activation counts cover decode (1, 2), a small batch (7) and prefill (33).
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from mixlocal.quant import QStack, QTensor, QType, kernels
from mixlocal.quant.formats import DECODE_ONLY_TYPES
from numpy_reference import q8k_round

ALL_TYPES = [QType.F32, QType.F16, QType.BF16, QType.Q8_0, QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1,
             QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K]
TOKEN_COUNTS = [1, 2, 7, 33]

# Byte offsets of the f16 scale fields inside one block, from ggml-common.h.
_F16_FIELDS = {QType.Q2_K: (80, 82), QType.Q3_K: (108,), QType.Q4_K: (0, 2), QType.Q5_K: (0, 2),
               QType.Q6_K: (208,)}


def random_weight_bytes(qtype: QType, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Raw uint8 bytes (..., row_bytes) of a valid tensor of this logical shape."""
    values = rng.standard_normal(shape).astype(np.float32) * 0.05
    values.reshape(-1)[rng.integers(0, values.size, max(1, values.size // 500))] *= 8  # a few outliers
    if qtype == QType.F32:
        return values.view(np.uint8)
    if qtype == QType.F16:
        return values.astype(np.float16).view(np.uint8)
    if qtype in _F16_FIELDS:  # gguf-py has no quantizer for these: random codes, sane scales
        bs, ts = GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, shape[:-1] + (shape[-1] // bs, ts), dtype=np.uint8)
        for off in _F16_FIELDS[qtype]:
            scale = (rng.random(raw.shape[:-1] + (1,)) * 0.01 + 1e-4).astype(np.float16)
            raw[..., off:off + 2] = scale.view(np.uint8)
        return raw.reshape(shape[:-1] + (-1,))
    return gguf.quants.quantize(values, qtype)


def act_of(p, n_rows: int) -> QType | None:
    """How the kernels round n_rows activation rows on weight p (None: they stay float)."""
    return kernels.activation_type(p) if kernels.quantizes_activations(p, n_rows) else None


def make_weight(qtype: QType, shape: tuple[int, ...], seed: int = 0) -> tuple[QTensor, np.ndarray]:
    """A QTensor and its float64 reference values from gguf-py."""
    raw = random_weight_bytes(qtype, shape, np.random.default_rng(seed))
    ref = gguf.quants.dequantize(raw, qtype).astype(np.float64).reshape(shape)
    return QTensor(qtype, shape, np.ascontiguousarray(raw).reshape(-1)), ref


def cols_for(qtype: QType) -> int:
    """A width of several blocks, and not a power of two where the format allows."""
    bs = GGML_QUANT_SIZES[qtype][0]
    return {1: 200, 32: 160, 256: 512}[bs]


def assert_matches(y: np.ndarray, w_ref: np.ndarray, x: np.ndarray, label: str, act: QType | None = None) -> None:
    """y against float64 x @ W.T, allowing float32 rounding scaled to each product's magnitude.

    A kernel that rounds the activations to 8 bits first (as llama.cpp does; act says how: kernels.activation_type)
    is compared with x rounded the same way by an outside reference: gguf-py's own Q8_0 quantizer, which stores the
    block scale in float16 where the kernels keep float32 (hence 2**-11 relative slack on each block), or ggml's
    Q8_K rounding (numpy_reference.q8k_round), whose scale is float32 like ours.
    """
    x64 = x.astype(np.float64)
    slack = 2e-5
    if act == QType.Q8_0:
        x64 = gguf.quants.dequantize(gguf.quants.quantize(x, QType.Q8_0), QType.Q8_0).astype(np.float64)
        slack += 2.0 ** -11
    elif act == QType.Q8_K:
        x64 = q8k_round(x)
    elif act is not None:
        raise ValueError(f"no reference rounding for {act}")
    want = x64 @ w_ref.T
    allowed = slack * (np.abs(x64) @ np.abs(w_ref).T) + 1e-7
    err = np.abs(y.astype(np.float64) - want)
    worst = np.argmax(err - allowed)
    assert np.all(err <= allowed), (
        f"{label}: error {err.flat[worst]:.3g} > allowed {allowed.flat[worst]:.3g} (|y| {abs(want.flat[worst]):.3g})")


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda q: q.name)
def test_linear_matches_gguf_reference(qtype):
    w, ref = make_weight(qtype, (37, cols_for(qtype)), seed=1)
    p = kernels.prepare(w)
    assert p.qtype == qtype and tuple(p.shape) == w.shape
    rng = np.random.default_rng(2)
    for t in TOKEN_COUNTS:
        x = rng.standard_normal((t, w.shape[1])).astype(np.float32)
        y = kernels.linear(p, x)
        assert y.shape == (t, w.shape[0]) and y.dtype == np.float32
        assert_matches(y, ref, x, f"{qtype.name} T={t}", act_of(p, t))


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda q: q.name)
def test_expert_linear_stacked_and_split(qtype):
    n_exp, n, k = 4, 70, cols_for(qtype)
    w, ref = make_weight(qtype, (n_exp, n, k), seed=3)
    stack = QStack(tuple(w.expert(e) for e in range(n_exp)))
    rng = np.random.default_rng(4)
    for form, weight in (("stacked", w), ("QStack", stack)):
        p = kernels.prepare(weight)
        assert p.qtype == qtype and tuple(p.shape) == (n_exp, n, k)
        for t in (1, 2, 7, 66):  # 66 = 33 tokens x 2 experts, the prefill shape
            x = rng.standard_normal((t, k)).astype(np.float32)
            ids = rng.integers(0, n_exp - 1, t)  # expert n_exp-1 stays unused
            y = kernels.expert_linear(p, x, ids)
            assert y.shape == (t, n)
            for e in np.unique(ids):
                rows = ids == e
                assert_matches(y[rows], ref[e], x[rows], f"{qtype.name} {form} T={t} expert {e}",
                               act_of(p, int(rows.sum())))


def test_linear_writes_into_out():
    w, ref = make_weight(QType.Q4_0, (37, 96))
    x = np.random.default_rng(0).standard_normal((3, 96)).astype(np.float32)
    out = np.full((3, 37), np.nan, dtype=np.float32)
    p = kernels.prepare(w)
    y = kernels.linear(p, x, out=out)
    assert y is out
    assert_matches(out, ref, x, "out=", act_of(p, 3))


def test_bad_inputs_raise_value_errors():
    w, _ = make_weight(QType.Q4_0, (4, 37, 64))
    p = kernels.prepare(w)
    x = np.zeros((2, 64), np.float32)
    with pytest.raises(ValueError, match="expert ids must be in"):
        kernels.expert_linear(p, x, np.array([0, 4]))
    with pytest.raises(ValueError, match="expert ids must be in"):
        kernels.expert_linear(p, x, np.array([-1, 0]))
    with pytest.raises(ValueError, match="one expert id per"):
        kernels.expert_linear(p, x, np.array([0]))
    with pytest.raises(ValueError, match="integers"):
        kernels.expert_linear(p, x, np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="do not fit"):
        kernels.expert_linear(p, np.zeros((2, 32), np.float32), np.array([0, 1]))
    with pytest.raises(ValueError, match="2-D weight"):
        kernels.linear(p, x)
    w2, _ = make_weight(QType.Q8_0, (5, 64))
    p2 = kernels.prepare(w2)
    with pytest.raises(ValueError, match="do not fit"):
        kernels.linear(p2, np.zeros((1, 63), np.float32))
    with pytest.raises(ValueError, match="out must be"):
        kernels.linear(p2, np.zeros((1, 64), np.float32), out=np.zeros((1, 5), np.float64))
    with pytest.raises(ValueError, match="stacked"):
        kernels.expert_linear(p2, np.zeros((1, 64), np.float32), np.array([0]))
    tq = QTensor(QType.TQ2_0, (2, 256), np.zeros(2 * GGML_QUANT_SIZES[QType.TQ2_0][1], np.uint8))
    with pytest.raises(ValueError, match="TQ2_0"):
        kernels.prepare(tq)


def test_empty_batches():
    w, _ = make_weight(QType.Q4_K, (3, 9, 256))
    p = kernels.prepare(w)
    assert kernels.expert_linear(p, np.zeros((0, 256), np.float32), np.zeros(0, np.int64)).shape == (0, 9)
    assert kernels.linear(kernels.prepare(w.expert(1)), np.zeros((0, 256), np.float32)).shape == (0, 9)


def test_prepare_can_place_packed_arrays_in_a_mapped_file(tmp_path):
    """The alloc hook lets a backend keep the repacked layout in a file it maps (a cache next to the model)."""
    w, ref = make_weight(QType.Q4_K, (2, 70, 512), seed=5)
    made = []

    def alloc(shape, dtype):
        a = np.lib.format.open_memmap(tmp_path / f"a{len(made)}.npy", mode="w+", dtype=dtype, shape=shape)
        made.append(a)
        return a

    p = kernels.prepare(w, alloc=alloc)
    assert made and all(any(np.shares_memory(a, m) for m in made) for a in p.arrays)
    x = np.random.default_rng(6).standard_normal((2, 512)).astype(np.float32)
    y = kernels.expert_linear(p, x, np.array([1, 0]))
    assert_matches(y[:1], ref[1], x[:1], "mapped expert 1", act_of(p, 1))
    assert_matches(y[1:], ref[0], x[1:], "mapped expert 0", act_of(p, 1))

    # a later load maps the same files again and rebuilds the weight without packing
    for a in made:
        a.flush()
    arrays = tuple(np.load(tmp_path / f"a{i}.npy", mmap_mode="c") for i in range(len(made)))
    again = kernels.PackedWeight(p.qtype, p.shape, arrays, p.family)
    np.testing.assert_array_equal(kernels.expert_linear(again, x, np.array([1, 0])), y)
    with pytest.raises(ValueError, match="needs C-contiguous arrays"):
        kernels.PackedWeight(p.qtype, p.shape, arrays[:1] + arrays[:1] + arrays[2:], p.family)


# gguf-py has no quantizer for the IQ formats: their packed kernels are tested on random blocks in test_iq_kernels.py
_IQ = frozenset(DECODE_ONLY_TYPES)  # every IQ format, so a new packed one needs no edit here


@pytest.mark.parametrize("qtype", sorted(kernels.packed_types("portable") - _IQ, key=lambda q: q.name),
                         ids=lambda q: q.name)
def test_packed_tiles_for_blas_match_reference(qtype):
    """The decode-tiles-into-BLAS prefill path on the packed layout (float activations, no rounding)."""
    w, ref = make_weight(qtype, (2, 70, cols_for(qtype)), seed=7)
    p = kernels.prepare(w, family="portable")
    x = np.random.default_rng(8).standard_normal((5, w.shape[2])).astype(np.float32)
    out = np.empty((5, 70), np.float32)
    kernels._packed_tiles(p, 1, x, out)
    assert_matches(out, ref[1], x, f"{qtype.name} tiles")


PACKED = sorted((kernels.packed_types("avx2") | kernels.packed_types("portable")) - _IQ, key=lambda q: q.name)


def family_or_skip(family: str, qtype: QType) -> None:
    """Skip, with the reason, a family this CPU cannot run or a format it has no packed layout for."""
    if family not in kernels.host_families():
        pytest.skip(f"this CPU cannot run the {family} kernels (it runs {', '.join(kernels.host_families())})")
    if qtype not in kernels.packed_types(family):
        pytest.skip(f"{family} has no packed layout for {qtype.name}: it runs the file-layout kernels")


def assert_experts_match(p, ref: np.ndarray, token_counts, rng: np.random.Generator, label: str) -> None:
    """expert_linear on random activations and expert ids against each expert's reference rows."""
    k = ref.shape[-1]
    for t in token_counts:
        x = rng.standard_normal((t, k)).astype(np.float32)
        ids = rng.integers(0, ref.shape[0], t)
        y = kernels.expert_linear(p, x, ids)
        for e in np.unique(ids):
            rows = ids == e
            assert_matches(y[rows], ref[e], x[rows], f"{label} T={t} expert {e}", act=kernels.activation_type(p))


@pytest.mark.parametrize("family", kernels.FAMILIES)
@pytest.mark.parametrize("qtype", PACKED, ids=lambda q: q.name)
def test_every_kernel_family_matches_reference(qtype, family):
    """Every kernel family this CPU runs, on every format it packs: decode (1, 2 rows), a prefill with runs of 4+
    rows per expert (40) and linear on a small batch (7: the four-row loop and its remainder)."""
    family_or_skip(family, qtype)
    n_exp, n, k = 3, 70, cols_for(qtype)
    w, ref = make_weight(qtype, (n_exp, n, k), seed=9)
    p = kernels.prepare(w, family=family)
    assert isinstance(p, kernels.PackedWeight) and p.family == family
    rng = np.random.default_rng(10)
    assert_experts_match(p, ref, (1, 2, 40), rng, f"{qtype.name} {family}")
    w2 = w.expert(2)
    p2 = kernels.prepare(w2, family=family)
    x = rng.standard_normal((7, k)).astype(np.float32)
    assert_matches(kernels.linear(p2, x), ref[2], x, f"{qtype.name} {family} linear",
                   act=kernels.activation_type(p2))


@pytest.mark.parametrize("family", kernels.FAMILIES)
@pytest.mark.parametrize("qtype", PACKED, ids=lambda q: q.name)
def test_packed_kernels_with_subnormal_half_scales(qtype, family):
    """Block scales below float16's normal range (Q4_K files can have them) decode exactly in the packed kernels."""
    family_or_skip(family, qtype)
    n_exp, n, k = 2, 70, cols_for(qtype)
    rng = np.random.default_rng(11)
    raw = random_weight_bytes(qtype, (n_exp, n, k), rng)
    ts = GGML_QUANT_SIZES[qtype][1]
    blocks = raw.reshape(-1, ts)
    assert np.shares_memory(blocks, raw)
    scales = (rng.random((blocks.shape[0], 1)) * 5.5e-5 + 1e-6).astype(np.float16)   # f16 normals start at 6.1e-5
    assert np.all(np.abs(scales) < np.float16(6.1e-5))
    for off in {QType.Q4_0: (0,), QType.Q8_0: (0,), **_F16_FIELDS}[qtype]:
        blocks[:, off:off + 2] = scales.view(np.uint8)
    ref = gguf.quants.dequantize(raw, qtype).astype(np.float64).reshape(n_exp, n, k)
    p = kernels.prepare(QTensor(qtype, (n_exp, n, k), np.ascontiguousarray(raw).reshape(-1)), family=family)
    assert_experts_match(p, ref, (1, 9), rng, f"{qtype.name} {family} subnormal scales")


def test_half_scale_conversion_matches_numpy_for_every_bit_pattern():
    from mixlocal.quant.kernels.portable import ROWS, _halves_to_float
    from numba import njit

    @njit
    def convert_all(h, out):
        for i in range(h.shape[0] // ROWS):
            _halves_to_float(h[i * ROWS:(i + 1) * ROWS], out[i * ROWS:(i + 1) * ROWS])

    bits = np.arange(1 << 16, dtype=np.uint16)
    out = np.empty(1 << 16, np.float32)
    convert_all(bits, out)
    want = bits.view(np.float16).astype(np.float32)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(out), nan)
    assert np.array_equal(out[~nan].view(np.uint32), want[~nan].view(np.uint32))   # signed zeros and infinities too


def test_blas_path_follows_numba_thread_count():
    """Prefill on a format without a packed layout goes through BLAS, which must use the caller's thread count;
    products below kernels.SERIAL_MAX_MACS run on one thread, BLAS included, and leave the caller's count as it was."""
    import numba
    from mixlocal.quant.kernels import blas as kernels_blas
    if kernels_blas.blas_threads() is None:
        pytest.skip("no OpenBLAS entry point found in numpy's libraries")
    unpacked = QType.Q5_1  # no family packs it: prefill decodes tiles for BLAS
    assert unpacked not in kernels.packed_types(kernels.resolve_family())
    big, ref_big = make_weight(unpacked, (2048, 256))   # 40 rows: 21M multiply-adds
    small, ref_small = make_weight(unpacked, (20, 256))  # 40 rows: 0.2M
    assert 40 * 20 * 256 < kernels.SERIAL_MAX_MACS <= 40 * 2048 * 256
    before = numba.get_num_threads()
    try:
        for n in sorted({1, before}):
            numba.set_num_threads(n)
            x = np.random.default_rng(n).standard_normal((40, 256)).astype(np.float32)
            assert_matches(kernels.linear(kernels.prepare(big), x), ref_big, x, f"{unpacked.name} threads={n}")
            assert kernels_blas.blas_threads() == n
            assert_matches(kernels.linear(kernels.prepare(small), x), ref_small, x, f"{unpacked.name} small threads={n}")
            assert kernels_blas.blas_threads() == 1
            assert numba.get_num_threads() == n
    finally:
        numba.set_num_threads(before)

"""quant.quantize (numba) against the numpy reference, llama.cpp's ggml, and numpy's own float16 rounding."""
from __future__ import annotations

import numpy as np
import pytest
from mixlocal.quant.formats import quantize
from mixlocal.quant.quantize import FAST_TYPES, _put_f16, quantize_fast
from mixlocal.quant.tensor import QType
from numba import njit

try:  # helpers shared with the formats tests (plain module when tests/ is not a package)
    from test_formats import awkward_rows, ggml_quantize, weights_with_outliers
except ImportError:
    from tests.test_formats import awkward_rows, ggml_quantize, weights_with_outliers  # noqa: F401 (a fixture)

QUANTIZED_FAST = [q for q in FAST_TYPES if q not in (QType.F32, QType.F16, QType.BF16)]


@pytest.fixture(scope="module")
def matrix():
    # an odd number of rows, so that the parallel split is uneven
    return np.concatenate([weights_with_outliers(37, 512, seed=11), awkward_rows(512)])


@pytest.mark.parametrize("qtype", FAST_TYPES, ids=lambda q: q.name)
def test_fast_equals_numpy_reference(qtype, matrix):
    fast = quantize_fast(qtype, matrix)
    ref = quantize(qtype, matrix)
    assert fast.dtype == np.uint8 and fast.shape == ref.shape
    differing = np.flatnonzero((fast != ref).any(axis=1))
    assert differing.size == 0, f"{qtype.name}: rows {differing.tolist()} differ from the numpy reference"


@pytest.mark.parametrize("qtype", QUANTIZED_FAST, ids=lambda q: q.name)
def test_fast_equals_llama_cpp(qtype, matrix, ggml_quantize):
    np.testing.assert_array_equal(quantize_fast(qtype, matrix), ggml_quantize(qtype, matrix))


def test_fast_accepts_strided_input(matrix):
    wide = np.concatenate([matrix, matrix], axis=1)
    np.testing.assert_array_equal(quantize_fast(QType.Q4_K, wide[:, :512]), quantize_fast(QType.Q4_K, matrix))
    np.testing.assert_array_equal(quantize_fast(QType.Q8_0, np.asfortranarray(matrix)),
                                  quantize(QType.Q8_0, matrix))


@njit(cache=True)
def _round_trip_halves(values):
    stored = np.zeros(2 * values.size, np.uint8)
    back = np.empty(values.size, np.float32)
    sf = np.empty(1, np.float32)
    su = sf.view(np.uint32)
    for i in range(values.size):
        back[i] = _put_f16(stored, 2 * i, values[i], sf, su)
    return stored.view(np.uint16), back


def test_f16_rounding_matches_numpy():
    # every finite half, the exact midpoints between neighbours (ties go to even), one float32 step either side
    # of each midpoint, random float32s over the whole half range, and the overflow edge
    halves = np.arange(0x7C00, dtype=np.uint16).view(np.float16).astype(np.float32)
    mids = ((halves[:-1].astype(np.float64) + halves[1:]) / 2).astype(np.float32)
    near = np.concatenate([np.nextafter(mids, np.float32(0)), np.nextafter(mids, np.float32(np.inf))])
    rng = np.random.default_rng(0)
    spread = (rng.standard_normal(100_000) * np.exp2(rng.uniform(-30, 17, 100_000))).astype(np.float32)
    edge = np.array([65504, 65519.996, 65520, 65536, 1e9, 2.0 ** -24, 2.0 ** -25, 2.0 ** -26, 2.0 ** -14,
                     np.nextafter(np.float32(2.0 ** -14), np.float32(0)), 0.0, -0.0], dtype=np.float32)
    values = np.concatenate([halves, mids, near, spread, edge])
    values = np.concatenate([values, -values])
    bits, back = _round_trip_halves(values)
    with np.errstate(over="ignore"):  # the overflow edge is meant to become infinity
        halves_np = values.astype(np.float16)
    np.testing.assert_array_equal(bits, halves_np.view(np.uint16))
    np.testing.assert_array_equal(back, halves_np.astype(np.float32))


def test_bad_input_raises_value_error_before_any_kernel():
    x = np.zeros((2, 256), np.float32)
    with pytest.raises(ValueError, match="2-D"):
        quantize_fast(QType.Q4_0, x[0])
    with pytest.raises(ValueError, match="float32"):
        quantize_fast(QType.Q4_0, x.astype(np.float64))
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize_fast(QType.Q4_K, x[:, :160])
    with pytest.raises(ValueError, match="NaN"):
        quantize_fast(QType.Q4_K, np.where(np.arange(256) == 7, np.inf, x).astype(np.float32))
    with pytest.raises(ValueError, match="IQ2_XXS"):
        quantize_fast(QType.IQ2_XXS, x)
    with pytest.raises(ValueError, match="12345"):
        quantize_fast(12345, x)


def test_empty_matrix():
    out = quantize_fast(QType.Q4_0, np.zeros((0, 64), np.float32))
    assert out.shape == (0, 36)

"""Quantizers with an importance matrix against llama.cpp's ggml (ggml_quantize_chunk with its imatrix argument).

Byte for byte on real-looking rows, on rows that take the rare branches, and on importance vectors that are
smooth, spiky, heavy-tailed or zero in places; IQ4_NL and IQ4_XS also without an importance matrix.
"""
from __future__ import annotations

import numpy as np
import pytest
from mixlocal.quant.formats import dequantize
from mixlocal.quant.quantize import IMATRIX_TYPES, quantize_fast
from mixlocal.quant.tensor import QType

try:  # helpers shared with the formats tests (plain module when tests/ is not a package)
    from test_formats import awkward_rows, weights_with_outliers
except ImportError:
    from tests.test_formats import awkward_rows, weights_with_outliers


def importance_vectors(cols: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Positive importances shaped like real ones (a few hot columns), plus vectors that stress the weighted sums."""
    rng = np.random.default_rng(seed)
    hot = rng.uniform(0.01, 0.2, cols)
    hot[rng.random(cols) < 0.02] *= 300  # massive-activation columns, as Mixtral's residual stream has
    return {
        "uniform": rng.uniform(0.01, 10, cols),
        "hot_columns": hot,
        "lognormal": np.exp(rng.standard_normal(cols) * 3),
        "some_zero": np.where(rng.random(cols) < 0.1, 0.0, rng.standard_normal(cols) ** 2),
        "tiny": rng.uniform(1e-30, 1e-28, cols),
        "one_column": np.where(np.arange(cols) == 3, 1.0, 0.0),
    }


@pytest.fixture(scope="module")
def matrix():
    return np.concatenate([weights_with_outliers(29, 512, seed=5), awkward_rows(512, seed=2)])


VECTORS = list(importance_vectors(512))


@pytest.mark.parametrize("which", VECTORS)
@pytest.mark.parametrize("qtype", IMATRIX_TYPES, ids=lambda q: q.name)
def test_weighted_equals_llama_cpp(qtype, which, matrix, ggml_weighted):
    qw = importance_vectors(512)[which].astype(np.float32)
    ours = quantize_fast(qtype, matrix, qw)
    theirs = ggml_weighted(qtype, matrix, qw)
    differing = np.flatnonzero((ours != theirs).any(axis=1))
    assert differing.size == 0, f"{qtype.name} with {which}: rows {differing.tolist()} differ from ggml"


@pytest.mark.parametrize("qtype", [QType.IQ4_NL, QType.IQ4_XS], ids=lambda q: q.name)
def test_iq4_without_imatrix_equals_llama_cpp(qtype, matrix, ggml_weighted):
    np.testing.assert_array_equal(quantize_fast(qtype, matrix), ggml_weighted(qtype, matrix, None))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("qtype", IMATRIX_TYPES, ids=lambda q: q.name)
def test_weighted_random_shapes(qtype, seed, ggml_weighted):
    """Fresh random rows and importances at a Mixtral-like width (4096: 16 super-blocks), another seed each time."""
    rng = np.random.default_rng(100 + seed)
    x = weights_with_outliers(8, 4096, seed=200 + seed)
    qw = (rng.standard_normal(4096) ** 2 * rng.uniform(0.1, 5)).astype(np.float32)
    np.testing.assert_array_equal(quantize_fast(qtype, x, qw), ggml_weighted(qtype, x, qw))


@pytest.mark.parametrize("qtype", [QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.IQ4_XS], ids=lambda q: q.name)
def test_imatrix_lowers_the_weighted_error(qtype):
    """What the importance matrix is for: on the columns it marks important, the error goes down."""
    rng = np.random.default_rng(7)
    x = weights_with_outliers(64, 1024, seed=8)
    qw = np.where(rng.random(1024) < 0.1, 100.0, 0.01).astype(np.float32)
    plain = dequantize(qtype, quantize_fast(qtype, x)).reshape(x.shape)
    weighted = dequantize(qtype, quantize_fast(qtype, x, qw)).reshape(x.shape)
    err_plain = float((qw * (plain - x) ** 2).sum())
    err_weighted = float((qw * (weighted - x) ** 2).sum())
    assert err_weighted < 0.9 * err_plain, (err_weighted, err_plain)


def test_formats_that_ignore_the_imatrix(matrix, ggml_weighted):
    qw = importance_vectors(512)["lognormal"].astype(np.float32)
    for qtype in (QType.Q8_0, QType.F16):
        np.testing.assert_array_equal(quantize_fast(qtype, matrix, qw), quantize_fast(qtype, matrix))
    np.testing.assert_array_equal(quantize_fast(QType.Q8_0, matrix, qw), ggml_weighted(QType.Q8_0, matrix, qw))


@pytest.mark.parametrize(("imatrix", "match"), [
    (np.ones(256, np.float32), r"shape \(256,\), expected \(512,\)"),
    (np.ones((2, 512), np.float32), "one value per input column"),
    (np.where(np.arange(512) == 9, np.nan, 1.0), "NaN or infinite"),
    (np.where(np.arange(512) == 9, -1.0, 1.0), "negative"),
    (np.arange(512), "must hold floats"),
])
def test_bad_imatrix_is_refused_before_any_kernel(imatrix, match):
    x = weights_with_outliers(2, 512)
    with pytest.raises(ValueError, match=match):
        quantize_fast(QType.Q4_K, x, imatrix)

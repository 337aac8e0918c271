"""IQ2 quantizers (quant.quantize_iq2) against llama.cpp's ggml: ggml_quantize_chunk with an importance matrix.

Byte for byte on real-looking rows, on rows that take the rare branches (an all-zero row, constants, one sign, a
lone spike), at several widths, with importance vectors that are smooth, spiky, heavy-tailed, zero in places or
zero but for one column. Also: the importance matrix lowers the weighted error, bad input is a ValueError before
any compiled code runs, and gguf-py decodes our blocks to the values our own decoder gives.
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest
from mixlocal.quant import quantize_iq2 as iq2
from mixlocal.quant.formats import dequantize, row_bytes
from mixlocal.quant.quantize_iq2 import (
    IMATRIX_REQUIRED,
    IQ2_DRIVERS,
    ImatrixRequiredError,
    quantize_iq2,
)
from mixlocal.quant.tensor import QType

try:  # helpers shared with the formats tests (plain module when tests/ is not a package)
    from test_formats import awkward_rows, weights_with_outliers
    from test_imatrix_quantize import importance_vectors
except ImportError:
    from tests.test_formats import awkward_rows, weights_with_outliers
    from tests.test_imatrix_quantize import importance_vectors

TYPES = list(IQ2_DRIVERS)
IDS = [q.name for q in TYPES]


def assert_same_bytes(ours: np.ndarray, theirs: np.ndarray, what: str) -> None:
    differing = np.flatnonzero((ours != theirs).any(axis=1))
    assert differing.size == 0, f"{what}: rows {differing.tolist()} differ from ggml"


@pytest.fixture(scope="module")
def matrix():
    return np.concatenate([weights_with_outliers(29, 512, seed=5), awkward_rows(512, seed=2)])


@pytest.mark.parametrize("which", list(importance_vectors(512)))
@pytest.mark.parametrize("qtype", TYPES, ids=IDS)
def test_equals_ggml(qtype, which, matrix, ggml_weighted):
    qw = importance_vectors(512)[which].astype(np.float32)
    assert_same_bytes(quantize_iq2(qtype, matrix, qw), ggml_weighted(qtype, matrix, qw), f"{qtype.name}/{which}")


@pytest.mark.parametrize(("rows", "cols", "seed"), [(3, 256, 0), (16, 1024, 1), (8, 4096, 2), (5, 14336, 3)])
@pytest.mark.parametrize("qtype", TYPES, ids=IDS)
def test_shapes_equal_ggml(qtype, rows, cols, seed, ggml_weighted):
    """Widths from one super-block to Mixtral's expert width, fresh rows and importances per seed, with a few
    columns whose importance and weights are both outsized (massive activations meet outlier weights)."""
    rng = np.random.default_rng(300 + seed)
    x = weights_with_outliers(rows, cols, seed=400 + seed)
    hot = rng.choice(cols, max(1, cols // 128), replace=False)
    x[:, hot] *= 20
    x[rows // 2] = 0  # an all-zero row
    qw = (rng.standard_normal(cols) ** 2 * rng.uniform(0.1, 5)).astype(np.float32)
    qw[hot] *= 1000
    assert_same_bytes(quantize_iq2(qtype, x, qw), ggml_weighted(qtype, x, qw), f"{qtype.name} {rows}x{cols}")


@pytest.mark.parametrize("qtype", [q for q in TYPES if q not in IMATRIX_REQUIRED], ids=lambda q: q.name)
def test_without_imatrix_equals_ggml(qtype, matrix, ggml_weighted):
    assert_same_bytes(quantize_iq2(qtype, matrix), ggml_weighted(qtype, matrix, None), qtype.name)


@pytest.mark.parametrize("qtype", TYPES, ids=IDS)
def test_imatrix_lowers_the_weighted_error(qtype):
    """What the importance matrix is for: against a flat one, the error on the columns it marks important drops."""
    rng = np.random.default_rng(7)
    x = weights_with_outliers(64, 1024, seed=8)
    qw = np.where(rng.random(1024) < 0.1, 100.0, 0.01).astype(np.float32)
    flat = dequantize(qtype, quantize_iq2(qtype, x, np.ones(1024, np.float32))).reshape(x.shape)
    weighted = dequantize(qtype, quantize_iq2(qtype, x, qw)).reshape(x.shape)
    err_flat = float((qw * (flat - x) ** 2).sum())
    err_weighted = float((qw * (weighted - x) ** 2).sum())
    assert err_weighted < 0.8 * err_flat, (err_weighted, err_flat)


@pytest.mark.parametrize("qtype", TYPES, ids=IDS)
def test_gguf_py_decodes_our_blocks(qtype):
    """gguf-py reads our blocks as our decoder does, and the values are a fit of the input (a loose one: 2 bits
    and the outliers of these rows leave IQ2_XXS about 0.7 of the rows' norm in error, ggml's bytes included)."""
    x = weights_with_outliers(12, 2048, seed=11)
    qw = importance_vectors(2048, seed=3)["hot_columns"].astype(np.float32)
    blocks = quantize_iq2(qtype, x, qw)
    theirs = np.asarray(gguf.quants.dequantize(blocks, qtype), np.float32).reshape(x.shape)
    np.testing.assert_array_equal(theirs, dequantize(qtype, blocks).reshape(x.shape))
    rel = np.sqrt(((theirs - x) ** 2).sum(axis=1) / (x ** 2).sum(axis=1))
    assert (rel < 0.9).all(), rel


@pytest.fixture
def no_kernels(monkeypatch):
    """Replace the compiled rows and the lattice tables with tripwires: refusals must come before either."""
    def tripwire(*_args):
        raise AssertionError("a kernel ran on bad input")
    monkeypatch.setattr(iq2, "_KERNELS", {q: tripwire for q in TYPES})
    monkeypatch.setattr(iq2, "_tables", tripwire)


@pytest.mark.parametrize(("imatrix", "match"), [
    (np.ones(256, np.float32), r"shape \(256,\), expected \(512,\)"),
    (np.ones((2, 512), np.float32), "one value per input column"),
    (np.where(np.arange(512) == 9, np.nan, 1.0), "NaN or infinite"),
    (np.where(np.arange(512) == 9, np.inf, 1.0), "NaN or infinite"),
    (np.where(np.arange(512) == 9, -1.0, 1.0), "negative"),
    (np.arange(512), "must hold floats"),
])
@pytest.mark.parametrize("qtype", TYPES, ids=IDS)
def test_bad_imatrix_is_refused_before_any_kernel(qtype, imatrix, match, no_kernels):
    with pytest.raises(ValueError, match=match):
        quantize_iq2(qtype, weights_with_outliers(2, 512), imatrix)


@pytest.mark.parametrize("qtype", TYPES, ids=IDS)
def test_bad_rows_are_refused_before_any_kernel(qtype, no_kernels):
    qw = np.ones(512, np.float32)
    x = weights_with_outliers(2, 512)
    x[1, 7] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        quantize_iq2(qtype, x, qw)
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize_iq2(qtype, weights_with_outliers(2, 384), np.ones(384, np.float32))
    with pytest.raises(ValueError, match="float32"):
        quantize_iq2(qtype, weights_with_outliers(2, 512).astype(np.float64), qw)


@pytest.mark.parametrize("qtype", [q for q in TYPES if q in IMATRIX_REQUIRED], ids=lambda q: q.name)
def test_missing_imatrix_is_refused_before_any_kernel(qtype, no_kernels):
    x = weights_with_outliers(2, 512)
    with pytest.raises(ImatrixRequiredError, match="needs an importance matrix"):
        quantize_iq2(qtype, x)
    out = np.empty((2, row_bytes(qtype, 512)), np.uint8)
    with pytest.raises(ImatrixRequiredError):  # the driver itself refuses too, whoever calls it
        IQ2_DRIVERS[qtype](x, np.zeros(512, np.float32), False, out)
    assert issubclass(ImatrixRequiredError, ValueError)


@pytest.mark.parametrize("qtype", TYPES, ids=IDS)
def test_driver_checks_its_buffers(qtype, no_kernels):
    x = weights_with_outliers(2, 512)
    qw = np.ones(512, np.float32)
    with pytest.raises(ValueError, match="out must be"):
        IQ2_DRIVERS[qtype](x, qw, True, np.empty((2, 3), np.uint8))
    with pytest.raises(ValueError, match="C-contiguous float32"):
        IQ2_DRIVERS[qtype](np.asfortranarray(x), qw, True, np.empty((2, row_bytes(qtype, 512)), np.uint8))


def test_neighbour_lists_match_their_definition():
    """Spot-check the tables against ggml's rule, written out plainly: for an index off the grid, every grid point
    at the two smallest squared distances (one for IQ2_S), by distance then index."""
    rng = np.random.default_rng(0)
    for qtype in TYPES:
        grid, kmap, nb = iq2._tables(qtype)
        nwant = 1 if qtype == QType.IQ2_S else 2
        on = np.flatnonzero(kmap >= 0)
        assert on.size == len(grid)
        for u in rng.choice(np.flatnonzero(kmap < 0), 50, replace=False):
            pos = 2 * ((u >> (2 * np.arange(8))) & 3) + 1
            d2 = ((grid.astype(int) - pos) ** 2).sum(axis=1)
            wanted = sorted(set(d2.tolist()))[:nwant]
            expect = sorted((d, j) for j, d in enumerate(d2.tolist()) if d in wanted)
            off = -int(kmap[u]) - 1
            n = int(nb[off])
            assert n == len(expect)
            assert nb[off + 1:off + 1 + n].tolist() == [j for _, j in expect]

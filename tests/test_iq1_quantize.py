"""IQ1 quantizers (quant.quantize_iq1) against llama.cpp's ggml: ggml_quantize_chunk with an importance matrix.

Byte for byte on real-looking rows, on rows that take the rare branches (an all-zero row, constants, one sign, a
lone spike, many equal values, which the sort of the split search must order as ggml's qsort does), at several
widths and magnitudes, with importance vectors that are smooth, spiky, heavy-tailed, tiny, zero in places or zero
but for one column. Also: both formats refuse to run without an importance matrix (ggml aborts), the importance
matrix lowers the weighted error, bad input is a ValueError before any compiled code runs, and gguf-py decodes our
blocks to the values our own decoder gives.
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest
from mixlocal.quant import quantize_iq1 as iq1
from mixlocal.quant.formats import dequantize, row_bytes
from mixlocal.quant.quantize import IMATRIX_REQUIRED, quantize_fast
from mixlocal.quant.quantize_iq1 import IQ1_DRIVERS, quantize_iq1
from mixlocal.quant.quantize_iq2 import ImatrixRequiredError
from mixlocal.quant.tensor import QType

try:  # helpers shared with the formats tests (plain module when tests/ is not a package)
    from test_formats import awkward_rows, weights_with_outliers
    from test_imatrix_quantize import importance_vectors
except ImportError:
    from tests.test_formats import awkward_rows, weights_with_outliers
    from tests.test_imatrix_quantize import importance_vectors

TYPES = list(IQ1_DRIVERS)
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
    assert_same_bytes(quantize_iq1(qtype, matrix, qw), ggml_weighted(qtype, matrix, qw), f"{qtype.name}/{which}")


@pytest.mark.parametrize(("rows", "cols", "seed"), [(3, 256, 0), (16, 1024, 1), (8, 4096, 2), (5, 14336, 3)])
@pytest.mark.parametrize("qtype", TYPES, ids=IDS)
def test_shapes_equal_ggml(qtype, rows, cols, seed, ggml_weighted):
    """Widths from one super-block to Mixtral's expert width, fresh rows and importances per seed, with a few
    columns whose importance and weights are both outsized, an all-zero row and a constant row."""
    rng = np.random.default_rng(500 + seed)
    x = weights_with_outliers(rows, cols, seed=600 + seed)
    hot = rng.choice(cols, max(1, cols // 128), replace=False)
    x[:, hot] *= 20
    x[rows // 2] = 0
    x[-1] = np.float32(0.02)
    qw = (rng.standard_normal(cols) ** 2 * rng.uniform(0.1, 5)).astype(np.float32)
    qw[hot] *= 1000
    assert_same_bytes(quantize_iq1(qtype, x, qw), ggml_weighted(qtype, x, qw), f"{qtype.name} {rows}x{cols}")


@pytest.mark.parametrize("scale", [1e-13, 1e-11, 1e-8, 1e-6, 1e-3, 1e3, 1e8, 1e15])
@pytest.mark.parametrize("qtype", TYPES, ids=IDS)
def test_magnitudes_equal_ggml(qtype, scale, ggml_weighted):
    """Rows at very small and very large magnitudes, around the sub-block cut-offs (1e-12 for IQ1_S, 1e-7 for IQ1_M)
    and far above them, where the f16 scale underflows or overflows."""
    x = (weights_with_outliers(6, 1024, seed=21) * np.float32(scale / 0.02)).astype(np.float32)
    qw = importance_vectors(1024, seed=4)["lognormal"].astype(np.float32)
    assert_same_bytes(quantize_iq1(qtype, x, qw), ggml_weighted(qtype, x, qw), f"{qtype.name} x{scale:g}")


@pytest.mark.parametrize("qtype", TYPES, ids=IDS)
def test_ties_equal_ggml(qtype, ggml_weighted):
    """Many equal values in a sub-block: the split search sorts them, and ggml's qsort (glibc's merge sort) keeps
    equal values in index order; so must we, or the cut between two levels falls elsewhere."""
    rng = np.random.default_rng(9)
    x = np.concatenate([
        rng.integers(-2, 3, (6, 1024)).astype(np.float32) * np.float32(0.01),  # five values only
        np.round(weights_with_outliers(6, 1024, seed=22) * 200) / np.float32(200),  # coarse grid
        np.sign(rng.standard_normal((4, 1024))).astype(np.float32) * np.float32(0.3),  # two values
        np.where(rng.random((4, 1024)) < 0.8, 0.0, rng.standard_normal((4, 1024))).astype(np.float32),  # mostly zero
    ])
    for which in ("uniform", "some_zero", "one_column"):
        qw = importance_vectors(1024, seed=5)[which].astype(np.float32)
        assert_same_bytes(quantize_iq1(qtype, x, qw), ggml_weighted(qtype, x, qw), f"{qtype.name}/{which}")
    flat = np.ones(1024, np.float32)  # equal importances too: only the index order tells the values apart
    assert_same_bytes(quantize_iq1(qtype, x, flat), ggml_weighted(qtype, x, flat), f"{qtype.name}/flat")


@pytest.mark.parametrize("qtype", TYPES, ids=IDS)
def test_quantize_fast_takes_the_same_path(qtype, matrix):
    qw = importance_vectors(512, seed=1)["hot_columns"].astype(np.float32)
    np.testing.assert_array_equal(quantize_fast(qtype, matrix, qw), quantize_iq1(qtype, matrix, qw))


@pytest.mark.parametrize("qtype", TYPES, ids=IDS)
def test_imatrix_lowers_the_weighted_error(qtype):
    """What the importance matrix is for: against a flat one, the error on the columns it marks important drops."""
    rng = np.random.default_rng(7)
    x = weights_with_outliers(64, 1024, seed=8)
    qw = np.where(rng.random(1024) < 0.1, 100.0, 0.01).astype(np.float32)
    flat = dequantize(qtype, quantize_iq1(qtype, x, np.ones(1024, np.float32))).reshape(x.shape)
    weighted = dequantize(qtype, quantize_iq1(qtype, x, qw)).reshape(x.shape)
    err_flat = float((qw * (flat - x) ** 2).sum())
    err_weighted = float((qw * (weighted - x) ** 2).sum())
    assert err_weighted < 0.8 * err_flat, (err_weighted, err_flat)


@pytest.mark.parametrize("qtype", TYPES, ids=IDS)
def test_gguf_py_decodes_our_blocks(qtype):
    """gguf-py reads our blocks as our decoder does, and the values are a (loose: 1.5 bits) fit of the input."""
    x = weights_with_outliers(12, 2048, seed=11)
    qw = importance_vectors(2048, seed=3)["hot_columns"].astype(np.float32)
    blocks = quantize_iq1(qtype, x, qw)
    theirs = np.asarray(gguf.quants.dequantize(blocks, qtype), np.float32).reshape(x.shape)
    np.testing.assert_array_equal(theirs, dequantize(qtype, blocks).reshape(x.shape))
    rel = np.sqrt(((theirs - x) ** 2).sum(axis=1) / (x ** 2).sum(axis=1))
    assert (rel < 1.0).all(), rel


@pytest.fixture
def no_kernels(monkeypatch):
    """Replace the compiled rows and the lattice tables with tripwires: refusals must come before either."""
    def tripwire(*_args):
        raise AssertionError("a kernel ran on bad input")
    monkeypatch.setattr(iq1, "_KERNELS", {q: tripwire for q in TYPES})
    monkeypatch.setattr(iq1, "_tables", tripwire)


@pytest.mark.parametrize("qtype", TYPES, ids=IDS)
def test_missing_imatrix_is_refused_before_any_kernel(qtype, no_kernels):
    x = weights_with_outliers(2, 512)
    assert qtype in IMATRIX_REQUIRED
    with pytest.raises(ImatrixRequiredError, match="needs an importance matrix"):
        quantize_iq1(qtype, x)
    with pytest.raises(ImatrixRequiredError, match="needs an importance matrix"):
        quantize_fast(qtype, x)
    out = np.empty((2, row_bytes(qtype, 512)), np.uint8)
    with pytest.raises(ImatrixRequiredError):  # the driver itself refuses too, whoever calls it
        IQ1_DRIVERS[qtype](x, np.zeros(512, np.float32), False, out)
    assert issubclass(ImatrixRequiredError, ValueError)


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
        quantize_iq1(qtype, weights_with_outliers(2, 512), imatrix)


@pytest.mark.parametrize("qtype", TYPES, ids=IDS)
def test_bad_rows_are_refused_before_any_kernel(qtype, no_kernels):
    qw = np.ones(512, np.float32)
    x = weights_with_outliers(2, 512)
    x[1, 7] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        quantize_iq1(qtype, x, qw)
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize_iq1(qtype, weights_with_outliers(2, 384), np.ones(384, np.float32))
    with pytest.raises(ValueError, match="float32"):
        quantize_iq1(qtype, weights_with_outliers(2, 512).astype(np.float64), qw)
    with pytest.raises(ValueError, match="2-D"):
        quantize_iq1(qtype, np.zeros(512, np.float32), qw)
    with pytest.raises(ValueError, match="makes IQ1_S, IQ1_M, not IQ2_XXS"):
        quantize_iq1(QType.IQ2_XXS, weights_with_outliers(2, 512), qw)


@pytest.mark.parametrize("qtype", TYPES, ids=IDS)
def test_driver_checks_its_buffers(qtype, no_kernels):
    x = weights_with_outliers(2, 512)
    qw = np.ones(512, np.float32)
    with pytest.raises(ValueError, match="out must be"):
        IQ1_DRIVERS[qtype](x, qw, True, np.empty((2, 3), np.uint8))
    with pytest.raises(ValueError, match="out must be"):
        IQ1_DRIVERS[qtype](x, qw, True, np.empty((3, row_bytes(qtype, 512)), np.uint8))
    with pytest.raises(ValueError, match="C-contiguous float32"):
        IQ1_DRIVERS[qtype](np.asfortranarray(x), qw, True, np.empty((2, row_bytes(qtype, 512)), np.uint8))
    with pytest.raises(ValueError, match="expected \\(512,\\) float32"):
        IQ1_DRIVERS[qtype](x, qw.astype(np.float64), True, np.empty((2, row_bytes(qtype, 512)), np.uint8))


def test_neighbour_lists_match_their_definition():
    """Spot-check the tables against ggml's rule, written out plainly: every reachable index (levels 0..2) is a grid
    point or has a list: every grid point at the three smallest squared distances, by distance then index."""
    levels, kmap, nb = iq1._tables()
    assert levels.shape == (2048, 8)
    reach = ((np.arange(3 ** 8)[:, None] // 3 ** np.arange(8)) % 3 << (2 * np.arange(8))).sum(axis=1)
    assert (kmap[reach] >= 0).sum() == 2048
    gpos = 2 * levels + 1
    rng = np.random.default_rng(0)
    off_grid = reach[kmap[reach] < 0]
    assert off_grid.size == 3 ** 8 - 2048
    for u in rng.choice(off_grid, 60, replace=False):
        pos = 2 * ((u >> (2 * np.arange(8))) & 3) + 1
        d2 = ((gpos - pos) ** 2).sum(axis=1)
        wanted = sorted(set(d2.tolist()))[:3]
        expect = sorted((d, j) for j, d in enumerate(d2.tolist()) if d in wanted)
        off = -int(kmap[u]) - 1
        n = int(nb[off])
        assert n == len(expect)
        assert nb[off + 1:off + 1 + n].tolist() == [j for _, j in expect]

"""IQ3 quantizers (quant.quantize_iq3) against llama.cpp's ggml: ggml_quantize_chunk with and without an imatrix.

Byte for byte on real-looking rows, on rows that take the rare branches (an all-zero row, all-zero or near-zero
groups of 32 inside a super-block, constants, one sign, a lone spike), at several widths, with importance vectors
that are smooth, spiky, heavy-tailed, zero in places or zero but for one column. Also: the importance matrix lowers
the weighted error, bad input is a ValueError before any compiled code runs, and gguf-py decodes our blocks to the
values our own decoder gives.
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest
from mixlocal.quant import quantize_iq3 as iq3
from mixlocal.quant.formats import dequantize, row_bytes
from mixlocal.quant.quantize_iq3 import IQ3_DRIVERS, IQ3_TYPES, quantize_iq3
from mixlocal.quant.tensor import QType

try:  # helpers shared with the formats tests (plain module when tests/ is not a package)
    from test_formats import awkward_rows, weights_with_outliers
    from test_imatrix_quantize import importance_vectors
except ImportError:
    from tests.test_formats import awkward_rows, weights_with_outliers
    from tests.test_imatrix_quantize import importance_vectors

TYPES = list(IQ3_TYPES)
IDS = [q.name for q in TYPES]


def assert_same_bytes(ours: np.ndarray, theirs: np.ndarray, what: str) -> None:
    differing = np.flatnonzero((ours != theirs).any(axis=1))
    assert differing.size == 0, f"{what}: rows {differing.tolist()} differ from ggml"


def sparse_groups(cols: int = 512, seed: int = 3) -> np.ndarray:
    """Rows whose super-blocks hold all-zero or near-zero groups of 32 between coded ones: IQ3_S then stores the
    next group's indices and signs in the skipped group's slots, IQ3_XXS zeroes groups below 1e-8."""
    rng = np.random.default_rng(seed)
    group = np.arange(cols) // 32
    base = rng.standard_normal(cols) * 0.02
    return np.array([
        np.where(group % 8 == 1, 0.0, base),
        np.where(np.isin(group % 8, [0, 2, 3, 6]), 0.0, base),
        np.where(group % 8 != 7, 0.0, base),
        np.where(group % 2 == 0, base * 1e-9, base),
        np.where(group % 8 == 4, -0.0, base),
    ], dtype=np.float32)


@pytest.fixture(scope="module")
def matrix():
    return np.concatenate([weights_with_outliers(29, 512, seed=5), awkward_rows(512, seed=2), sparse_groups(512)])


@pytest.mark.parametrize("which", [None, *importance_vectors(512)])
@pytest.mark.parametrize("qtype", TYPES, ids=IDS)
def test_equals_ggml(qtype, which, matrix, ggml_weighted):
    qw = None if which is None else importance_vectors(512)[which].astype(np.float32)
    assert_same_bytes(quantize_iq3(qtype, matrix, qw), ggml_weighted(qtype, matrix, qw), f"{qtype.name}/{which}")


@pytest.mark.parametrize(("rows", "cols", "seed"), [(3, 256, 0), (16, 1024, 1), (8, 4096, 2), (4, 14336, 3)])
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
    assert_same_bytes(quantize_iq3(qtype, x, qw), ggml_weighted(qtype, x, qw), f"{qtype.name} {rows}x{cols}")
    assert_same_bytes(quantize_iq3(qtype, x), ggml_weighted(qtype, x, None), f"{qtype.name} {rows}x{cols}, no imatrix")


@pytest.mark.parametrize("qtype", TYPES, ids=IDS)
def test_imatrix_lowers_the_weighted_error(qtype):
    """What the importance matrix is for: against none, the error on the columns it marks important drops."""
    rng = np.random.default_rng(7)
    x = weights_with_outliers(64, 1024, seed=8)
    qw = np.where(rng.random(1024) < 0.1, 100.0, 0.01).astype(np.float32)
    plain = dequantize(qtype, quantize_iq3(qtype, x)).reshape(x.shape)
    weighted = dequantize(qtype, quantize_iq3(qtype, x, qw)).reshape(x.shape)
    err_plain = float((qw * (plain - x) ** 2).sum())
    err_weighted = float((qw * (weighted - x) ** 2).sum())
    assert err_weighted < 0.8 * err_plain, (err_weighted, err_plain)


@pytest.mark.parametrize("qtype", TYPES, ids=IDS)
def test_gguf_py_decodes_our_blocks(qtype):
    """gguf-py reads our blocks as our decoder does, and the values are a 3-bit fit of the input."""
    x = weights_with_outliers(12, 2048, seed=11)
    qw = importance_vectors(2048, seed=3)["hot_columns"].astype(np.float32)
    blocks = quantize_iq3(qtype, x, qw)
    theirs = np.asarray(gguf.quants.dequantize(blocks, qtype), np.float32).reshape(x.shape)
    np.testing.assert_array_equal(theirs, dequantize(qtype, blocks).reshape(x.shape))
    rel = np.sqrt(((theirs - x) ** 2).sum(axis=1) / (x ** 2).sum(axis=1))
    assert (rel < 0.4).all(), rel


def test_neighbour_lists_are_the_nearest_points():
    """iq3xs_init_impl's lists: every off-lattice index lists all grid points at its 2 (IQ3_XXS) or 3 (IQ3_S)
    smallest squared distances, nearest first, ties by index; lattice indices map to their own point."""
    for qtype, nwant in ((QType.IQ3_XXS, 2), (QType.IQ3_S, 3)):
        grid, kmap, nb = iq3._tables(qtype)
        on = np.flatnonzero(kmap >= 0)
        assert on.size == len(grid)
        levels = (grid.astype(np.int64) - 1) // 2
        np.testing.assert_array_equal((levels[kmap[on]] << (3 * np.arange(4))).sum(axis=1), on)
        for u in (1, 7, 100, 2047, 4095):
            if kmap[u] >= 0:
                continue
            off = -kmap[u] - 1
            listed = nb[off + 1:off + 1 + nb[off]]
            pos = 2 * ((u >> (3 * np.arange(4))) & 7) + 1
            d2 = ((grid.astype(np.int64) - pos) ** 2).sum(axis=1)
            wanted = np.unique(d2)[:nwant]
            expect = sorted(np.flatnonzero(np.isin(d2, wanted)), key=lambda j: (d2[j], j))
            np.testing.assert_array_equal(listed, expect)


def test_quantize_fast_takes_the_iq3_drivers(matrix):
    """Once quant.quantize registers IQ3_DRIVERS, its entry point gives the same bytes."""
    from mixlocal.quant.quantize import QUANTIZE_TYPES, quantize_fast
    if QType.IQ3_XXS not in QUANTIZE_TYPES:
        pytest.skip("quant.quantize does not make the IQ3 formats yet")
    qw = importance_vectors(512)["lognormal"].astype(np.float32)
    for qtype in TYPES:
        np.testing.assert_array_equal(quantize_fast(qtype, matrix, qw), quantize_iq3(qtype, matrix, qw))


@pytest.fixture
def no_kernels(monkeypatch):
    """Replace the compiled rows and the lattice tables with tripwires: refusals must come before either."""
    def tripwire(*_args):
        raise AssertionError("a kernel ran on bad input")
    monkeypatch.setattr(iq3, "_KERNELS", {q: tripwire for q in TYPES})
    monkeypatch.setattr(iq3, "_tables", tripwire)


@pytest.mark.parametrize(("imatrix", "match"), [
    (np.ones(256, np.float32), r"shape \(256,\), expected \(512,\)"),
    (np.ones(768, np.float32), r"shape \(768,\), expected \(512,\)"),
    (np.ones((2, 512), np.float32), "one value per input column"),
    (np.where(np.arange(512) == 9, np.nan, 1.0), "NaN or infinite"),
    (np.where(np.arange(512) == 9, np.inf, 1.0), "NaN or infinite"),
    (np.where(np.arange(512) == 9, -1.0, 1.0), "negative"),
    (np.arange(512), "must hold floats"),
])
@pytest.mark.parametrize("qtype", TYPES, ids=IDS)
def test_bad_imatrix_is_refused_before_any_kernel(qtype, imatrix, match, no_kernels):
    with pytest.raises(ValueError, match=match):
        quantize_iq3(qtype, weights_with_outliers(2, 512), imatrix)


@pytest.mark.parametrize("qtype", TYPES, ids=IDS)
def test_bad_rows_are_refused_before_any_kernel(qtype, no_kernels):
    qw = np.ones(512, np.float32)
    x = weights_with_outliers(2, 512)
    for bad, match in ((np.where(np.arange(512) == 3, np.nan, x), "NaN or infinite"),
                       (np.where(np.arange(512) == 3, -np.inf, x), "NaN or infinite"),
                       (weights_with_outliers(2, 320), "multiple of 256|256"),
                       (x.astype(np.float64), "float32"),
                       (x[0], "2-D")):
        for imatrix in (None, qw[:bad.shape[-1]] if bad.ndim == 2 else qw):
            with pytest.raises(ValueError, match=match):
                quantize_iq3(qtype, bad, imatrix)


@pytest.mark.parametrize("qtype", TYPES, ids=IDS)
def test_driver_checks_its_arguments(qtype, no_kernels):
    """The drivers are called by quant.quantize with arrays it prepared; a wrong one is still a ValueError, not a
    write out of bounds."""
    x = weights_with_outliers(2, 512)
    qw = np.ones(512, np.float32)
    out = np.empty((2, row_bytes(qtype, 512)), np.uint8)
    driver = IQ3_DRIVERS[qtype]
    for args in ((x, qw, True, out[:1]), (x, qw[:256], True, out), (x, qw.astype(np.float64), True, out),
                 (np.asfortranarray(np.concatenate([x, x])), qw, True, np.empty((4, out.shape[1]), np.uint8)),
                 (x, qw, True, out.astype(np.int8))):
        with pytest.raises(ValueError):
            driver(*args)

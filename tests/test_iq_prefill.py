"""The lattice IQ formats' prefill kernels (iq_grid_quads.py, iq2_quads.py) against their decode kernels, row by row.

Prefill unpacks each super-block once per run of activation rows that share an expert, then takes the rows 4 at a
time and the rest one by one; a run of one row keeps the direct kernel. Both paths sum the same integers and meet
the float scales in the same order, so every row must come out as the one-row decode call gives it, whatever the
run lengths around it (test_iq_kernels.py checks the values themselves against gguf-py).
"""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from mixlocal.quant import QTensor, QType, kernels
from test_iq_formats import _set_scale

FORMATS = [QType.IQ3_XXS, QType.IQ2_XS, QType.IQ2_XXS, QType.IQ1_S, QType.IQ1_M]
INTEGER_FAMILIES = ["avx512vnni", "avxvnni", "avx2"]
# runs of 1, 2, 3, 4, 5 and 9 rows, experts revisited, so every tail of the 4-row passes occurs
EXPERTS = [0] + [1] * 2 + [2] * 3 + [0] * 5 + [1] * 9 + [2] * 4 + [1]


@pytest.mark.parametrize("family", INTEGER_FAMILIES)
@pytest.mark.parametrize("qtype", FORMATS, ids=lambda q: q.name)
def test_prefill_rows_match_decode(qtype, family):
    if family not in kernels.host_families():
        pytest.skip(f"this CPU cannot run the {family} kernels")
    rng = np.random.default_rng(7)
    n_exp, n, k = 3, 80, 512  # 80 rows: a partial second group of 64
    bs, ts = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (n_exp, n, k // bs, ts), dtype=np.uint8)
    _set_scale(raw, qtype, rng.random(raw.shape[:-1]) * 2e-3 + 1e-4)
    w = kernels.prepare(QTensor(qtype, (n_exp, n, k), raw.reshape(-1)), family=family)
    assert isinstance(w, kernels.PackedWeight)
    ids = np.array(EXPERTS, np.int64)
    x = rng.standard_normal((len(ids), k)).astype(np.float32)
    got = kernels.expert_linear(w, x, ids)
    want = np.concatenate([kernels.expert_linear(w, x[i:i + 1], ids[i:i + 1]) for i in range(len(ids))])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))

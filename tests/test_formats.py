"""quant.formats against other people's code: gguf-py (PyPI `gguf`) and llama.cpp's ggml (the llama-cpp-python wheel).

Nothing here compares our code with itself: dequantize is checked bit for bit against gguf.quants.dequantize, and
quantize byte for byte against gguf.quants.quantize and ggml's own reference quantizers, reached through ctypes.
"""
from __future__ import annotations

import ctypes
import functools
import itertools
import subprocess
import sys

import gguf
import numpy as np
import pytest
from mixlocal.quant.formats import (
    BLOCK_DTYPES,
    QK_K,
    SUPPORTED_TYPES,
    UnsupportedTypeError,
    block_dtype,
    dequantize,
    quantize,
    row_bytes,
)
from mixlocal.quant.tensor import QType

QUANTIZED = [q for q in SUPPORTED_TYPES if q not in (QType.F32, QType.F16, QType.BF16)]
K_TYPES = [QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K]
GGUF_QUANTIZES = [QType.Q8_0, QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1, QType.BF16]


# ----------------------------------------------------------------------------------------------------------------------
# llama.cpp's quantizer through ctypes. The wheel is built for one CPU, so loading it is first tried in a subprocess:
# an illegal instruction there costs a skip, not the test run.
# ----------------------------------------------------------------------------------------------------------------------

_PROBE = r"""
import ctypes, glob, os, numpy as np, llama_cpp
path = glob.glob(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.*"))[0]
lib = ctypes.CDLL(path)
lib.ggml_quantize_chunk.restype = ctypes.c_size_t
lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                    ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
x = np.linspace(-1, 1, 256, dtype=np.float32)
out = np.zeros(144, np.uint8)
assert lib.ggml_quantize_chunk(12, x.ctypes.data, out.ctypes.data, 0, 1, 256, None) == 144  # Q4_K
print(path)
"""


@functools.cache
def _ggml_base():
    """(library, None) when llama.cpp's ggml loads here, else (None, reason)."""
    try:
        probe = subprocess.run([sys.executable, "-c", _PROBE], check=False, capture_output=True, text=True,
                               timeout=120)
    except subprocess.TimeoutExpired:
        return None, "probing llama_cpp timed out"
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or [f"exit code {probe.returncode}"])[-1]
        return None, f"llama.cpp's ggml is not usable here (pip install ../shared/wheels/llama_cpp_python-*.whl): {last}"
    lib = ctypes.CDLL(probe.stdout.strip())
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    return lib, None


@pytest.fixture(scope="module")
def ggml_quantize():
    lib, reason = _ggml_base()
    if lib is None:
        pytest.skip(reason)

    def run(qtype: QType, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.zeros((x.shape[0], row_bytes(qtype, x.shape[1])), dtype=np.uint8)
        written = lib.ggml_quantize_chunk(int(qtype), x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1], None)
        assert written == out.nbytes
        return out
    return run


# ----------------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------------

def weights_with_outliers(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Real-looking weights: Gaussian, a row-dependent scale, and a few large outliers."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols)) * rng.uniform(0.005, 0.05, (rows, 1))
    outliers = rng.random((rows, cols)) < 0.003
    x[outliers] *= rng.uniform(8, 30, outliers.sum())
    return x.astype(np.float32)


def awkward_rows(cols: int = 512, seed: int = 1) -> np.ndarray:
    """Rows that take the rare branches: zeros (also -0.0), constants, one sign only, tiny and huge magnitudes,
    values on a grid, half-empty super-blocks, a lone spike."""
    rng = np.random.default_rng(seed)
    rows = [np.zeros(cols), np.where(np.arange(cols) % 3 == 0, -0.0, 0.0), np.full(cols, 0.37), np.full(cols, -1e-3),
            rng.standard_normal(cols) * 1e-7, rng.standard_normal(cols) * 1e-30, rng.standard_normal(cols) * 3e3,
            np.abs(rng.standard_normal(cols)), -np.abs(rng.standard_normal(cols)),
            np.where(rng.random(cols) < 0.5, 0.0, rng.standard_normal(cols)), np.round(rng.standard_normal(cols) * 4),
            np.where(np.arange(cols) % 37 == 0, 50.0, rng.standard_normal(cols)),
            np.where(np.arange(cols) == 5, 1.0, 0.0), np.where(np.arange(cols) < 256, 0.0, rng.standard_normal(cols)),
            rng.standard_t(3, cols)]
    return np.array(rows, dtype=np.float32)


def random_blocks(qtype: QType, n_rows: int, blocks_per_row: int, seed: int = 0) -> np.ndarray:
    """Random bytes for every field, except that the f16 scale fields hold sane finite values."""
    rng = np.random.default_rng(seed)
    dt = BLOCK_DTYPES[qtype]
    raw = rng.integers(0, 256, (n_rows * blocks_per_row, dt.itemsize), dtype=np.uint8)
    if qtype == QType.F32:
        raw = rng.standard_normal(raw.shape[0]).astype(np.float32).view(np.uint8).reshape(raw.shape)
    elif qtype == QType.F16:
        raw = rng.standard_normal(raw.shape[0]).astype(np.float16).view(np.uint8).reshape(raw.shape)
    elif qtype == QType.BF16:  # the upper halves of random float32s: any mantissa bits, sane exponents
        raw = (rng.standard_normal(raw.shape[0]).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
        raw = raw.view(np.uint8).reshape(-1, 2)
    elif dt.names:
        blocks = raw.view(dt).reshape(-1)
        for name in dt.names:
            if dt[name] == np.dtype("<f2"):
                blocks[name] = (rng.standard_normal(blocks.shape[0]) * 0.05).astype(np.float16)
    return raw.reshape(n_rows, blocks_per_row * dt.itemsize)


# ----------------------------------------------------------------------------------------------------------------------
# Block structs
# ----------------------------------------------------------------------------------------------------------------------

# Byte offsets of the fields of ggml-common.h's structs, in declaration order.
GGML_OFFSETS = {
    QType.Q8_0: {"d": 0, "qs": 2},
    QType.Q4_0: {"d": 0, "qs": 2},
    QType.Q4_1: {"d": 0, "m": 2, "qs": 4},
    QType.Q5_0: {"d": 0, "qh": 2, "qs": 6},
    QType.Q5_1: {"d": 0, "m": 2, "qh": 4, "qs": 8},
    QType.Q2_K: {"scales": 0, "qs": 16, "d": 80, "dmin": 82},
    QType.Q3_K: {"hmask": 0, "qs": 32, "scales": 96, "d": 108},
    QType.Q4_K: {"d": 0, "dmin": 2, "scales": 4, "qs": 16},
    QType.Q5_K: {"d": 0, "dmin": 2, "scales": 4, "qh": 16, "qs": 48},
    QType.Q6_K: {"ql": 0, "qh": 128, "scales": 192, "d": 208},
}


@pytest.mark.parametrize("qtype", SUPPORTED_TYPES, ids=lambda q: q.name)
def test_block_struct_matches_ggml(qtype):
    dt = block_dtype(qtype)
    assert dt.itemsize == gguf.GGML_QUANT_SIZES[qtype][1]
    if qtype in GGML_OFFSETS:
        assert {name: dt.fields[name][1] for name in dt.names} == GGML_OFFSETS[qtype]
    assert row_bytes(qtype, 4 * QK_K) == 4 * QK_K // gguf.GGML_QUANT_SIZES[qtype][0] * dt.itemsize


# ----------------------------------------------------------------------------------------------------------------------
# Dequantize
# ----------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", SUPPORTED_TYPES, ids=lambda q: q.name)
def test_dequantize_equals_gguf_bit_for_bit(qtype):
    data = random_blocks(qtype, 6, 64 if gguf.GGML_QUANT_SIZES[qtype][0] == 1 else 5, seed=int(qtype))
    data = data.reshape(2, 3, -1)  # leading axes are kept
    ours = dequantize(qtype, data)
    ref = gguf.quants.dequantize(data, qtype)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    assert np.isfinite(ours).all()
    np.testing.assert_array_equal(ours.view(np.uint32), np.asarray(ref, dtype=np.float32).view(np.uint32))


def test_q4_0_nibble_order_is_halves_not_interleaved():
    # ggml-common.h: low nibbles are elements 0-15, high nibbles 16-31
    block = np.zeros(18, dtype=np.uint8)
    block[0:2] = np.frombuffer(np.float16(0.5).tobytes(), dtype=np.uint8)
    block[2:] = np.arange(16, dtype=np.uint8) | (np.uint8(15) - np.arange(16, dtype=np.uint8)) << 4
    values = dequantize(QType.Q4_0, block)
    expected = 0.5 * np.concatenate([np.arange(16) - 8, 15 - np.arange(16) - 8])
    np.testing.assert_array_equal(values, expected.astype(np.float32))


# ----------------------------------------------------------------------------------------------------------------------
# Quantize
# ----------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", GGUF_QUANTIZES, ids=lambda q: q.name)
def test_quantize_equals_gguf(qtype):
    x = weights_with_outliers(16, 1024)
    np.testing.assert_array_equal(quantize(qtype, x), gguf.quants.quantize(x, qtype))


def test_f16_quantize_is_numpy_half():
    x = weights_with_outliers(4, 64)
    np.testing.assert_array_equal(quantize(QType.F16, x), gguf.quants.quantize(x, QType.F16).view(np.uint8))


@pytest.mark.parametrize("qtype", SUPPORTED_TYPES, ids=lambda q: q.name)
def test_quantize_equals_llama_cpp(qtype, ggml_quantize):
    x = np.concatenate([weights_with_outliers(24, 512, seed=3), awkward_rows(512)])
    ours = quantize(qtype, x)
    ref = ggml_quantize(qtype, x)
    differing = np.flatnonzero((ours != ref).any(axis=1))
    assert differing.size == 0, f"{qtype.name}: rows {differing.tolist()} differ from llama.cpp"


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda q: q.name)
def test_k_round_trip_rmse_within_5_percent_of_llama_cpp(qtype, ggml_quantize):
    x = weights_with_outliers(32, 2048, seed=5)
    rmse = np.sqrt(np.mean((dequantize(qtype, quantize(qtype, x)) - x) ** 2))
    rmse_llama = np.sqrt(np.mean((dequantize(qtype, ggml_quantize(qtype, x)) - x) ** 2))
    assert rmse <= 1.05 * rmse_llama, f"{qtype.name}: RMSE {rmse:.4g} vs llama.cpp {rmse_llama:.4g}"


def test_round_trip_error_falls_as_bits_rise():
    x = weights_with_outliers(16, 2048, seed=7)
    scale = np.sqrt(np.mean(x ** 2))

    def rel_rmse(q):
        return np.sqrt(np.mean((dequantize(q, quantize(q, x)) - x) ** 2)) / scale

    k_ladder = [rel_rmse(q) for q in (QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K, QType.Q8_0)]
    assert all(a > b for a, b in itertools.pairwise(k_ladder)), k_ladder
    legacy = [rel_rmse(q) for q in (QType.Q4_0, QType.Q5_0, QType.Q8_0)]
    assert all(a > b for a, b in itertools.pairwise(legacy)), legacy
    assert rel_rmse(QType.Q4_1) < rel_rmse(QType.Q4_0) and rel_rmse(QType.Q5_1) < rel_rmse(QType.Q5_0)
    assert k_ladder[0] < 0.5 and k_ladder[-1] < 0.02  # 2 bits still carry signal; 8 bits are near lossless


def test_q8_0_error_is_at_most_half_a_step():
    x = weights_with_outliers(8, 256, seed=9)
    blocks = quantize(QType.Q8_0, x).reshape(-1, 34)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)  # (n_blocks, 1)
    err = np.abs(dequantize(QType.Q8_0, blocks) - x.reshape(-1, 32))
    # half a step, plus what rounding the scale to f16 can add at the block's largest value (127 steps)
    assert (err <= d * (0.5 + 127 * 2.0 ** -11) + 1e-12).all()


@pytest.mark.parametrize("qtype", QUANTIZED, ids=lambda q: q.name)
def test_zeros_round_trip_to_zeros(qtype):
    x = np.zeros((2, 256), dtype=np.float32)
    np.testing.assert_array_equal(dequantize(qtype, quantize(qtype, x)), x)


def test_quantize_keeps_leading_axes():
    x = weights_with_outliers(6, 256).reshape(2, 3, 256)
    q = quantize(QType.Q4_K, x)
    assert q.shape == (2, 3, 144)
    np.testing.assert_array_equal(q.reshape(6, 144), quantize(QType.Q4_K, x.reshape(6, 256)))


# ----------------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------------

def test_unsupported_type_is_named():
    with pytest.raises(UnsupportedTypeError, match="TQ2_0"):
        dequantize(QType.TQ2_0, np.zeros((1, 66), np.uint8))
    with pytest.raises(ValueError, match="IQ2_XXS"):
        quantize(QType.IQ2_XXS, np.zeros((1, 256), np.float32))
    with pytest.raises(ValueError, match="9999"):
        block_dtype(9999)


def test_bad_shapes_and_values_raise_value_error():
    with pytest.raises(ValueError, match="multiple of 144"):
        dequantize(QType.Q4_K, np.zeros((2, 100), np.uint8))
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize(QType.Q4_K, np.zeros((2, 96), np.float32))
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize(QType.Q8_0, np.zeros(33, np.float32))
    with pytest.raises(ValueError, match="NaN"):
        quantize(QType.Q4_0, np.full((1, 32), np.nan, np.float32))
    with pytest.raises(ValueError, match="float"):
        quantize(QType.Q4_0, np.zeros((1, 32), np.int32))
    with pytest.raises(ValueError):
        quantize(QType.Q4_0, np.float32(1.0))

"""Matrix products on weights held in ggml block formats: the public entry of the numba kernels.

The API the engine uses:
  prepare(w, alloc=np.empty, *, family=None) -> the runtime form of a weight (called once at load; may repack)
  linear(w, x, out=None)       -> x @ W.T for a 2-D weight, x float32 (T, K), result float32 (T, N)
  expert_linear(w, x, experts) -> row r of x times expert experts[r] of a stacked (E, N, K) weight
  quantizes_activations(w, n)  -> whether that call rounds x to int8 per 32-block (llama.cpp's Q8_0) first

Kernel families by instruction set (families.py), chosen once per load: engine.load(kernels=...), else
$MIXLOCAL_KERNELS, else the fastest the CPU has. Each packed weight remembers its family.
  * avx512vnni, avxvnni, avx2 (one module each, the kernels themselves in quads.py): Q4_0, Q8_0, and the
    K-quants Q2_K, Q3_K, Q4_K, Q5_K, Q6_K.
    Rows repacked 64 to a group into quads of 16 rows x 4 code bytes; whole blocks are summed in int32 against int8
    activations by the family's byte multiply (vpdpbusd 512 or 256 bits, or vpmaddubsw + vpmaddwd).
    IQ4_XS and IQ4_NL in the same layout (iq_quads.py): nibbles mapped through the codebook by a byte shuffle;
    IQ3_XXS (iq_grid_quads.py) and IQ3_S (iq_s_quads.py) with their grid words gathered per 32-bit lane; IQ2_XS,
    IQ2_XXS, IQ1_S, IQ1_M (iq2_quads.py) and IQ2_S (iq_s_quads.py) with 8-value grid entries gathered per 64-bit
    lane, one row per lane pair.
  * portable (portable.py): Q4_0, Q8_0, Q4_K on any CPU. 64 interleaved rows, int8 activations, int16 block sums;
    LLVM picks the vector instructions. IQ4_XS and IQ4_NL in the same layout with int32 sums (iq_portable.py),
    and the lattice formats IQ3_XXS, IQ3_S, IQ2_XS, IQ2_XXS, IQ2_S, IQ1_S and IQ1_M decoded from the file's bytes.
  * file layout (generic.py): every other format, in every family. Decode fuses block decoding with the dot
    products; more than 16 activation rows decode tiles of rows for BLAS, run at numba's per-call thread count
    (blas.py).
Packed weights serve decode and prefill alike: one call takes all rows of all experts, grouped into runs that share
an expert, so each weight byte is read once per call. Nothing ever holds a whole matrix in float.

Shapes, dtypes and expert ids are all checked here, in Python, before any kernel touches memory: a kernel that reads
past a buffer kills the user's process.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numba
import numpy as np

from ..tensor import QStack, QTensor, QType, nbytes_for
from . import activations as act
from . import (
    avx2,
    avx512vnni,
    avxvnni,
    blas,
    families,
    iq2_quads,
    iq_grid_quads,
    iq_portable,
    iq_quads,
    iq_s_quads,
    quads,
)
from . import generic as gen
from . import portable as pk
from .families import FAMILIES, KernelFamilyError

__all__ = [
    "FAMILIES",
    "PACK_LAYOUT_VERSION",
    "PER16_TYPES",
    "SUPPORTED_TYPES",
    "KernelFamilyError",
    "KernelInputError",
    "PackedWeight",
    "activation_type",
    "expert_linear",
    "host_families",
    "layout_of",
    "linear",
    "packed_shapes",
    "packed_types",
    "packer",
    "prepare",
    "quantizes_activations",
    "resolve_family",
    "serial_below",
]

SUPPORTED_TYPES = frozenset(gen.FORMAT_CODE)

# Up to this many activation rows per matrix, decoding each weight row once and dotting it with every activation row
# beats decoding tiles for BLAS (the decode costs as much as the dots there).
_FUSED_MAX_ROWS = 16

# Rows of decoded float32 per BLAS tile: ~1 MiB at K=4096, so that the tile is still in L2 when sgemm reads it.
_TILE_FLOATS = 1 << 18


# Below this many multiply-adds a call runs on the calling thread alone. Waking a second thread and joining it costs
# more than it saves on small products, and when other load deschedules the peer, every join waits a scheduler slice
# for it (bench/bench_threads.py measures both).
SERIAL_MAX_MACS = 1 << 19


@contextmanager
def serial_below(work: int):
    """Run the enclosed kernels (and BLAS, which follows numba's count) on one thread if work < SERIAL_MAX_MACS."""
    n = numba.get_num_threads()
    if n == 1 or work >= SERIAL_MAX_MACS:
        yield
        return
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(n)


class KernelInputError(ValueError):
    """A weight or activation that the kernels cannot take (wrong shape, dtype, format or expert id)."""


# ---------------------------------------------------------------------------------------------------------------
# prepare
# ---------------------------------------------------------------------------------------------------------------

# Bump whenever a packed layout (packed_shapes, the pack_* kernels) changes: files that keep packed weights
# (engine/backends/numba/packed_cache.py) record it and are rebuilt when it differs.
PACK_LAYOUT_VERSION = 10

host_families = families.host_families
resolve_family = families.resolve

# The integer families' kernels by format: (decode, prefill). They share the quads layout; portable has its own.
# (the IQ formats' kernels come from iq_quads.py, iq_grid_quads.py, iq2_quads.py and iq_s_quads.py, built for each
# integer family)
_RUNS = {name: {**fam.RUNS, **iq_quads.make_iq_runs(fam.KEY), **iq_grid_quads.make_grid_runs(fam.KEY),
                **iq2_quads.make_iq2_runs(fam.KEY), **iq_s_quads.make_s_runs(fam.KEY)}
         for name, fam in (("avx512vnni", avx512vnni), ("avxvnni", avxvnni), ("avx2", avx2))}
_RUNS["portable"] = {"Q4_0": (pk.q4_0_runs,) * 2, "Q8_0": (pk.q8_0_runs,) * 2, "Q4_K": (pk.q4_k_runs,) * 2,
                     "IQ4_XS": (iq_portable.iq4_xs_runs,) * 2, "IQ4_NL": (iq_portable.iq4_nl_runs,) * 2,
                     "IQ3_XXS": (iq_portable.iq3_xxs_runs,) * 2, "IQ2_XS": (iq_portable.iq2_xs_runs,) * 2,
                     "IQ2_XXS": (iq_portable.iq2_xxs_runs,) * 2, "IQ1_S": (iq_portable.iq1_s_runs,) * 2,
                     "IQ1_M": (iq_portable.iq1_m_runs,) * 2, "IQ3_S": (iq_portable.iq3_s_runs,) * 2,
                     "IQ2_S": (iq_portable.iq2_s_runs,) * 2}
_LAYOUT_TYPES = {"quads": frozenset({QType.Q4_0, QType.Q8_0, QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K,
                                     QType.Q6_K, QType.IQ4_XS, QType.IQ4_NL, QType.IQ3_XXS, QType.IQ2_XS,
                                     QType.IQ2_XXS, QType.IQ1_S, QType.IQ1_M, QType.IQ3_S, QType.IQ2_S}),
                 "rows": frozenset({QType.Q4_0, QType.Q8_0, QType.Q4_K, QType.IQ4_XS, QType.IQ4_NL, QType.IQ3_XXS,
                                    QType.IQ2_XS, QType.IQ2_XXS, QType.IQ1_S, QType.IQ1_M, QType.IQ3_S,
                                    QType.IQ2_S})}


def layout_of(family: str) -> str:
    """The packed layout a family's kernels read: "quads" (the integer families) or "rows" (portable)."""
    return "rows" if family == "portable" else "quads"


def packed_types(family: str) -> frozenset:
    """Formats that the family repacks and runs with integer kernels; the rest read the file layout."""
    return _LAYOUT_TYPES[layout_of(family)]


@dataclass(frozen=True, eq=False)
class PackedWeight:
    """A weight repacked into groups of interleaved rows for one kernel family (see quads.py and portable.py).
    Shape is the logical one, (N, K) or (E, N, K); every array has a leading expert axis (1 for a 2-D weight)."""

    qtype: QType
    shape: tuple[int, ...]
    arrays: tuple[np.ndarray, ...]
    family: str = "portable"

    def __post_init__(self):
        # a PackedWeight may be rebuilt from a cache file, so its arrays are checked like any other input
        if len(self.shape) not in (2, 3) or min(self.shape) <= 0:
            raise KernelInputError(f"packed weight must be (rows, cols) or (experts, rows, cols), got {self.shape}")
        resolve_family(self.family)  # a family this CPU cannot run fails here, not in a kernel
        if self.qtype not in packed_types(self.family):
            raise KernelInputError(f"{self.qtype.name} has no packed layout for the {self.family} kernels")
        n_exp, n, k = (1,) + tuple(self.shape) if len(self.shape) == 2 else tuple(self.shape)
        want = packed_shapes(self.qtype, n_exp, n, k, self.layout)
        got = [(tuple(a.shape), a.dtype) for a in self.arrays]
        if len(got) != len(want) or any(g != w for g, w in zip(got, want)) \
                or not all(a.flags.c_contiguous for a in self.arrays):
            raise KernelInputError(f"packed {self.qtype.name} {self.shape} needs C-contiguous arrays {want}, got {got}")

    @property
    def layout(self) -> str:
        return layout_of(self.family)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays)

    @property
    def n_experts(self) -> int:
        return self.arrays[0].shape[0]


def packed_shapes(qtype: QType, n_exp: int, n: int, k: int, layout: str = "rows") -> list[tuple[tuple[int, ...], np.dtype]]:
    """The arrays of a PackedWeight: (shape, dtype) each, so that a caller can place them in a file it maps."""
    if layout not in _LAYOUT_TYPES:
        raise KernelInputError(f"unknown packed layout {layout!r}")
    if qtype not in _LAYOUT_TYPES[layout]:
        raise KernelInputError(f"{qtype.name} has no packed layout {layout!r}")
    g, rows, quads_ = -(-n // pk.ROWS), pk.ROWS, layout == "quads"
    u8, u16 = np.dtype(np.uint8), np.dtype(np.uint16)
    if qtype == QType.IQ4_XS:  # iq_quads.py, iq_portable.py
        codes = (n_exp, g, k // 256, 4, 8, 4, 16, 4) if quads_ else (n_exp, g, k // 256, 128, rows)
        return [(codes, u8), ((n_exp, g, k // 256, 8, rows), np.dtype(np.int8)), ((n_exp, g, k // 256, rows), u16)]
    if qtype == QType.IQ3_XXS:  # iq_grid_quads.py, iq_portable.py
        if not quads_:
            return [((n_exp, g, k // 256, 96, rows), u8), ((n_exp, g, k // 256, rows), u16)]
        return [((n_exp, g, k // 256, 4, 24, 16, 4), u8), ((n_exp, g, k // 256, 8, rows), u8),
                ((n_exp, g, k // 256, rows), u16)]
    if qtype == QType.IQ3_S:  # iq_s_quads.py, iq_portable.py
        if not quads_:
            return [((n_exp, g, k // 256, 108, rows), u8), ((n_exp, g, k // 256, rows), u16)]
        return [((n_exp, g, k // 256, 4, 26, 16, 4), u8), ((n_exp, g, k // 256, 8, rows), u8),
                ((n_exp, g, k // 256, rows), u16)]
    if qtype == QType.IQ2_S:  # iq_s_quads.py, iq_portable.py
        if not quads_:
            return [((n_exp, g, k // 256, 80, rows), u8), ((n_exp, g, k // 256, rows), u16)]
        return [((n_exp, g, k // 256, 4, 18, 16, 4), u8), ((n_exp, g, k // 256, 8, rows), u8),
                ((n_exp, g, k // 256, rows), u16)]
    if qtype == QType.IQ2_XS:  # iq2_quads.py, iq_portable.py
        if not quads_:
            return [((n_exp, g, k // 256, 72, rows), u8), ((n_exp, g, k // 256, rows), u16)]
        return [((n_exp, g, k // 256, 4, 16, 16, 4), u8), ((n_exp, g, k // 256, 8, rows), u8),
                ((n_exp, g, k // 256, rows), u16)]
    if qtype == QType.IQ2_XXS:  # iq2_quads.py, iq_portable.py
        if not quads_:
            return [((n_exp, g, k // 256, 64, rows), u8), ((n_exp, g, k // 256, rows), u16)]
        return [((n_exp, g, k // 256, 4, 16, 16, 4), u8), ((n_exp, g, k // 256, rows), u16)]
    if qtype in (QType.IQ1_S, QType.IQ1_M):  # iq2_quads.py, iq_portable.py
        if quads_:
            return [((n_exp, g, k // 256, 4, 12 if qtype == QType.IQ1_S else 14, 16, 4), u8),
                    ((n_exp, g, k // 256, rows), u16)]
        codes = (n_exp, g, k // 256, 48 if qtype == QType.IQ1_S else 56, rows)
        return [(codes, u8), ((n_exp, g, k // 256, rows), u16)]
    if qtype in (QType.Q4_0, QType.IQ4_NL):
        codes = (n_exp, g, k // 32, 4, 4, 16, 4) if quads_ else (n_exp, g, k // 32, 16, rows)
        return [(codes, u8), ((n_exp, g, k // 32, rows), u16)]
    if qtype == QType.Q8_0:
        codes = (n_exp, g, k // 32, 4, 8, 16, 4) if quads_ else (n_exp, g, k // 32, 32, rows)
        return [(codes, u8 if quads_ else np.dtype(np.int8)), ((n_exp, g, k // 32, rows), u16)]
    if qtype in (QType.Q4_K, QType.Q5_K):
        chunks = 5 if qtype == QType.Q5_K else 4
        codes = (n_exp, g, k // 256, chunks, 4, 8, 16, 4) if quads_ else (n_exp, g, k // 256, 128, rows)
        return [(codes, u8), ((n_exp, g, k // 256, 16, rows), u8), ((n_exp, g, k // 256, 2, rows), u16)]
    if qtype == QType.Q2_K:
        return [((n_exp, g, k // 256, 4, 16, 16, 4), u8), ((n_exp, g, k // 256, 16, rows), u8),
                ((n_exp, g, k // 256, 2, rows), u16)]
    if qtype == QType.Q3_K:
        return [((n_exp, g, k // 256, 4, 8, 3, 16, 4), u8), ((n_exp, g, k // 256, 16, rows), np.dtype(np.int8)),
                ((n_exp, g, k // 256, rows), u16)]
    return [((n_exp, g, k // 256, 8, 4, 6, 16, 4), u8), ((n_exp, g, k // 256, 16, rows), np.dtype(np.int8)),
            ((n_exp, g, k // 256, rows), u16)]  # Q6_K


_PACKERS = {"quads": {QType.Q4_0: quads.pack_q4_0, QType.Q8_0: quads.pack_q8_0, QType.Q2_K: quads.pack_q2_k,
                      QType.Q3_K: quads.pack_q3_k, QType.Q4_K: quads.pack_q4_k, QType.Q5_K: quads.pack_q5_k,
                      QType.Q6_K: quads.pack_q6_k, QType.IQ4_XS: iq_quads.pack_iq4_xs,
                      QType.IQ4_NL: iq_quads.pack_iq4_nl, QType.IQ3_XXS: iq_grid_quads.pack_iq3_xxs,
                      QType.IQ2_XS: iq2_quads.pack_iq2_xs, QType.IQ2_XXS: iq2_quads.pack_iq2_xxs,
                      QType.IQ1_S: iq2_quads.pack_iq1_s, QType.IQ1_M: iq2_quads.pack_iq1_m,
                      QType.IQ3_S: iq_s_quads.pack_iq3_s, QType.IQ2_S: iq_s_quads.pack_iq2_s},
            "rows": {QType.Q4_0: pk.pack_q4_0, QType.Q8_0: pk.pack_q8_0, QType.Q4_K: pk.pack_q4_k,
                     QType.IQ4_XS: iq_portable.pack_iq4_xs, QType.IQ4_NL: iq_portable.pack_iq4_nl,
                     QType.IQ3_XXS: iq_portable.pack_iq3_xxs, QType.IQ2_XS: iq_portable.pack_iq2_xs,
                     QType.IQ2_XXS: iq_portable.pack_iq2_xxs, QType.IQ1_S: iq_portable.pack_iq1_s,
                     QType.IQ1_M: iq_portable.pack_iq1_m, QType.IQ3_S: iq_portable.pack_iq3_s,
                     QType.IQ2_S: iq_portable.pack_iq2_s}}


def packer(qtype: QType, layout: str):
    """The numba function that repacks file rows of `qtype` into `layout` for one expert: pack(rows, *arrays), the
    arrays as packed_shapes gives them less the expert axis (int8 ones viewed as uint8). prepare() calls it; so
    does the memory-budget path, from its I/O thread."""
    return _PACKERS[layout][qtype]


def prepare(w, alloc=np.empty, *, family: str | None = None):
    """Return the form of w that linear/expert_linear run fastest on. It still has .qtype and .shape.

    family: the kernel family to run (families.py); None means $MIXLOCAL_KERNELS, else the fastest this CPU has. A
    family this CPU cannot run raises KernelFamilyError (a ValueError). Formats with a packed layout for the family
    are repacked into interleaved row groups (one pass, 0.5-2 GB/s per thread; the pack kernels run on numba's
    threads); the result is one new copy of the weight's bytes, so the file's pages can be dropped by the OS after
    load. alloc(shape, dtype) makes each packed array: pass one that returns views of a memory-mapped cache file to
    keep the packed form on disk; later loads rebuild it as PackedWeight(qtype, shape, arrays, family) from that
    file (checked on construction) without packing again. Other formats are returned as they are.
    """
    _check_weight(w)
    family = resolve_family(family)
    if isinstance(w, PackedWeight) or w.qtype not in packed_types(family):
        return w
    layout = layout_of(family)
    shape = tuple(w.shape)
    n_exp, n, k = (1,) + shape if len(shape) == 2 else shape
    arrays = []
    for arr_shape, dtype in packed_shapes(w.qtype, n_exp, n, k, layout):
        a = alloc(arr_shape, dtype)
        if a.shape != arr_shape or a.dtype != dtype or not a.flags.c_contiguous:
            raise KernelInputError(f"alloc returned {a.dtype}{a.shape}, need C-contiguous {dtype}{arr_shape}")
        arrays.append(a)
    pack = _PACKERS[layout][w.qtype]
    for e in range(n_exp):
        rows = w.rows_view() if len(shape) == 2 else _expert_rows(w, e)
        pack(rows, *[a[e].view(np.uint8) if a.dtype == np.int8 else a[e] for a in arrays])
    return PackedWeight(w.qtype, shape, tuple(arrays), family)


def _check_weight(w) -> None:
    if isinstance(w, PackedWeight):
        return  # built by prepare from a checked weight
    if isinstance(w, QStack):
        for m in w.mats:
            _check_weight(m)
        return
    if not isinstance(w, QTensor):
        raise KernelInputError(f"expected a QTensor or QStack weight, got {type(w).__name__}")
    if w.qtype not in SUPPORTED_TYPES:
        raise KernelInputError(f"no kernel for weight format {w.qtype.name}; supported: "
                               + ", ".join(sorted(t.name for t in SUPPORTED_TYPES)))
    if len(w.shape) not in (2, 3) or min(w.shape) <= 0:
        raise KernelInputError(f"weight must be (rows, cols) or (experts, rows, cols), got shape {w.shape}")
    want = nbytes_for(w.qtype, w.shape)
    if w.data.dtype != np.uint8 or w.data.ndim != 1 or w.data.nbytes != want:
        raise KernelInputError(f"{w.qtype.name} weight {w.shape} needs {want} uint8 bytes, "
                               f"got {w.data.nbytes} of {w.data.dtype}")


# ---------------------------------------------------------------------------------------------------------------
# linear / expert_linear
# ---------------------------------------------------------------------------------------------------------------

def _check_x(w, x) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != w.shape[-1]:
        raise KernelInputError(f"activations of shape {x.shape} do not fit weight {w.shape}: need (T, {w.shape[-1]})")
    if x.dtype.kind != "f":
        raise KernelInputError(f"activations must be floating point, got {x.dtype}")
    if x.dtype != np.float32 or not x.flags.c_contiguous:
        x = np.ascontiguousarray(x, dtype=np.float32)
    return x


def _check_out(out, t: int, n: int) -> np.ndarray:
    if out is None:
        return np.empty((t, n), dtype=np.float32)
    if not isinstance(out, np.ndarray) or out.dtype != np.float32 or out.shape != (t, n) \
            or not out.flags.c_contiguous or not out.flags.writeable:
        raise KernelInputError(f"out must be a writeable C-contiguous float32 array of shape {(t, n)}")
    return out


def linear(w, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """x @ W.T for a 2-D weight W (N, K): x float32 (T, K) -> float32 (T, N)."""
    if isinstance(w, QStack) or len(w.shape) != 2:
        raise KernelInputError(f"linear needs a 2-D weight, got shape {w.shape}; use expert_linear for experts")
    _check_weight(w)
    x = _check_x(w, x)
    out = _check_out(out, x.shape[0], w.shape[0])
    if not x.shape[0]:
        return out
    with serial_below(x.shape[0] * w.shape[0] * w.shape[1]):
        if isinstance(w, PackedWeight):
            _packed_runs(w, x, np.array([0, x.shape[0]], np.int64), np.zeros(1, np.int64), out)
        else:
            _matmul(w.qtype, w.rows_view(), x, out)
    return out


def expert_linear(w, x: np.ndarray, experts) -> np.ndarray:
    """Row r of x times expert experts[r] of a stacked (E, N, K) weight: x (R, K), experts (R,) -> (R, N).

    Rows are grouped by expert inside, so each expert's weights are read once for all of its rows.
    """
    if len(w.shape) != 3:
        raise KernelInputError(f"expert_linear needs a stacked (experts, rows, cols) weight, got shape {w.shape}")
    _check_weight(w)
    x = _check_x(w, x)
    packed = isinstance(w, PackedWeight)
    ids = _check_experts(experts, x.shape[0], w.shape[0], check_range=not packed)
    n = w.shape[1]
    out = np.empty((x.shape[0], n), dtype=np.float32)
    if not len(ids):
        return out
    with serial_below(len(ids) * n * w.shape[2]):
        _expert_linear(w, x, ids, out)
    return out


def _expert_linear(w, x: np.ndarray, ids: np.ndarray, out: np.ndarray) -> None:
    n_exp, n = w.shape[0], w.shape[1]
    packed = isinstance(w, PackedWeight)
    if packed:
        # one kernel call for all experts: runs of rows that share an expert, in expert order
        order = np.empty(len(ids), np.int64)
        run_start = np.empty(n_exp + 1, np.int64)
        run_expert = np.empty(n_exp, np.int64)
        n_runs = pk.expert_runs(ids, n_exp, order, run_start, run_expert)  # reads ids only, checks their range
        if n_runs < 0:
            raise KernelInputError(f"expert ids must be in [0, {n_exp}), got {ids.min()}..{ids.max()}")
        run_start, run_expert = run_start[:n_runs + 1], run_expert[:n_runs]
        if n_runs == 1 or n_runs == len(ids) and len(ids) <= 2 and ids[0] < ids[-1]:
            _packed_runs(w, x, run_start, run_expert, out)  # already in expert order: no gather or scatter
        else:
            y = np.empty_like(out)
            _packed_runs(w, np.ascontiguousarray(x[order]), run_start, run_expert, y)
            out[order] = y
        return
    if len(ids) == 1:  # a lone row needs no gather or scatter
        _matmul(w.qtype, _expert_rows(w, int(ids[0])), x, out)
        return
    order = np.argsort(ids, kind="stable")
    bounds = np.searchsorted(ids[order], np.arange(n_exp + 1))
    for e in range(n_exp):
        idx = order[bounds[e]:bounds[e + 1]]
        if idx.size:
            y = np.empty((idx.size, n), dtype=np.float32)
            _matmul(w.qtype, _expert_rows(w, e), np.ascontiguousarray(x[idx]), y)
            out[idx] = y


def _check_experts(experts, n_rows: int, n_exp: int, check_range: bool = True) -> np.ndarray:
    ids = experts if isinstance(experts, np.ndarray) else np.asarray(experts)
    if ids.shape != (n_rows,):
        raise KernelInputError(f"need one expert id per activation row: got ids of shape {ids.shape} "
                               f"for {n_rows} rows")
    if n_rows and ids.dtype.kind not in "iu":
        raise KernelInputError(f"expert ids must be integers, got {ids.dtype}")
    ids = ids.astype(np.int64, copy=False)
    if n_rows and check_range:
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= n_exp:
            raise KernelInputError(f"expert ids must be in [0, {n_exp}), got {lo}..{hi}")
    return ids


def _packed_runs(w: PackedWeight, x: np.ndarray, run_start: np.ndarray, run_expert: np.ndarray,
                 out: np.ndarray) -> None:
    """The integer kernels: x rows run_start[i]..run_start[i+1] use expert run_expert[i]."""
    m, k = x.shape
    n = w.shape[-2]
    decode, prefill = _RUNS[w.family][w.qtype.name]
    kernel = prefill if m >= 4 else decode
    xq = np.empty((m, k), np.int8)
    if activation_type(w) == QType.Q8_K:
        xd = np.empty((m, k // 256), np.float32)
        pairs, pairs16 = np.empty((m, k // 64), np.int32), np.empty((m, k // 32), np.int32)
        (act.quantize_q8_k if m > 4 else act.quantize_q8_k_serial)(x, xq, xd, pairs, pairs16)
        # the intrinsics take flat code, scale and activation arrays (free views); d, last, keeps its shape
        kernel(*[a.reshape(-1) for a in w.arrays[:-1]], w.arrays[-1], xq.reshape(-1), xd,
               pairs16 if w.qtype in PER16_TYPES else pairs, run_start, run_expert, n, out)
        return
    xd = np.empty((m, k // 32), np.float32)
    xs = np.empty((m, k // 32), np.int32)
    (pk.quantize_activations if m > 4 else pk.quantize_activations_serial)(x, xq, xd, xs)
    if w.layout == "quads":
        kernel(w.arrays[0].reshape(-1), *w.arrays[1:], xq.reshape(-1), xd, xs, run_start, run_expert, n, out)
        return
    kernel(*w.arrays, xq, xd, xs, run_start, run_expert, n, out)


def _packed_tiles(w: PackedWeight, e: int, x: np.ndarray, out: np.ndarray) -> None:
    """Prefill on a packed weight through BLAS: decode tiles of row groups to float32, sgemm each into out.

    Only for the portable layout; the integer families' kernels are faster than this at every batch size."""
    if w.layout != "rows":
        raise KernelInputError("tiles for BLAS are only decoded from the portable layout (prepare(family='portable'))")
    n, k = w.shape[-2], w.shape[-1]
    arrays = [a[e] for a in w.arrays]
    unpack = {QType.Q4_0: pk.unpack_q4_0, QType.Q8_0: pk.unpack_q8_0, QType.Q4_K: pk.unpack_q4_k}.get(w.qtype)
    if unpack is None:
        raise KernelInputError(f"no BLAS tiles are decoded from packed {w.qtype.name}")
    blas.match_numba_threads()
    groups_per_tile = max(1, _TILE_FLOATS // (k * pk.ROWS))
    n_groups = arrays[0].shape[0]
    tile = np.empty((groups_per_tile * pk.ROWS, k), np.float32)
    for g0 in range(0, n_groups, groups_per_tile):
        g1 = min(n_groups, g0 + groups_per_tile)
        t = tile[:(g1 - g0) * pk.ROWS]
        unpack(g0, g1, *arrays, t)
        r0, r1 = g0 * pk.ROWS, min(n, g1 * pk.ROWS)
        out[:, r0:r1] = x @ t[:r1 - r0].T


def _expert_rows(w, e: int) -> np.ndarray:
    if isinstance(w, QStack):
        return w.mats[e].rows_view()
    n = w.shape[1]
    return w.rows_view()[e * n:(e + 1) * n]


# ---------------------------------------------------------------------------------------------------------------
# the file-layout path, every format
# ---------------------------------------------------------------------------------------------------------------

def _matmul(qtype: QType, rows: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
    """out = x @ decode(rows).T; shapes already checked: rows (N, row_bytes), x (T, K), out (T, N)."""
    n, k = out.shape[1], x.shape[1]
    if qtype == QType.F32:
        blas.match_numba_threads()
        np.matmul(x, rows.view(np.float32).reshape(n, k).T, out=out)
        return
    fmt = gen.FORMAT_CODE[qtype]
    if x.shape[0] <= _FUSED_MAX_ROWS:
        gen.matmul_rows(fmt, rows, x, out, 16)
        return
    blas.match_numba_threads()
    tile_rows = max(16, _TILE_FLOATS // k)
    tile = np.empty((min(tile_rows, n), k), dtype=np.float32)
    for r0 in range(0, n, tile_rows):
        r1 = min(n, r0 + tile_rows)
        t = tile[:r1 - r0]
        gen.dequantize_rows(fmt, rows[r0:r1], t, 16)
        out[:, r0:r1] = x @ t.T


def quantizes_activations(w, n_rows: int) -> bool:
    """Whether linear/expert_linear round x to 8 bits (activation_type says how) for n_rows rows of x on w.

    Integer dot products on int8 activations are what make decode reach the memory roofline; their rounding is the
    one numeric difference from dequantize-then-matmul, so tests and backends can ask for it.
    """
    return isinstance(w, PackedWeight) and n_rows > 0


_K_TYPES = frozenset({QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K})

# formats whose kernels take the activations' sums per 16 values (pairs16 of activations.py), not per 32 (pairs):
# their sub-blocks (IQ1_M, IQ2_S: their scales) are 16 wide
PER16_TYPES = frozenset({QType.Q2_K, QType.Q3_K, QType.Q6_K, QType.IQ1_M, QType.IQ2_S})


# the IQ formats whose integer-family kernels take Q8_K activations, as llama.cpp's dot products for them do
_Q8_K_IQ_TYPES = frozenset({QType.IQ4_XS, QType.IQ3_XXS, QType.IQ3_S, QType.IQ2_XS, QType.IQ2_XXS, QType.IQ2_S,
                            QType.IQ1_S, QType.IQ1_M})


def activation_type(w) -> QType | None:
    """How linear/expert_linear round x on w: QType.Q8_0 (8 bits per 32 values, float32 scale), QType.Q8_K (per
    256, as llama.cpp does for K-quants: activations.py) or None (x stays float)."""
    if not isinstance(w, PackedWeight):
        return None
    if w.layout == "quads" and (w.qtype in _K_TYPES or w.qtype in _Q8_K_IQ_TYPES):
        return QType.Q8_K
    return QType.Q8_0

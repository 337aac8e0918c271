"""Interleaved runtime layouts for Q4_0, Q8_0 and Q4_K, and integer-dot kernels on 8-bit activations.

Why this layout: a matvec that walks one weight row at a time spends its time on horizontal sums and scalar scale
handling (about 2 GB/s here). Here rows are grouped ROWS at a time and, inside a group, byte j of every row's block
lies next to byte j of the neighbouring rows. The innermost loop then runs across rows, so one vector instruction
unpacks and multiplies 16-32 rows at once with a broadcast activation, and every row keeps its own accumulator in a
register lane. Activations are rounded to int8 per 32-block with a float scale (llama.cpp's Q8_0), so a whole block
is summed in integers and touches floats once.

The int16 accumulators rely on wrapping arithmetic: for Q4_0 and Q4_K the block sum of (q - 8) * x lies within
+-8*127*32 = 32512, so it is computed as sum(q * x) - 8 * sum(x) modulo 2**16 and comes out exact even though the
partial sums wrap.

Scales stay as float16 bits (converted in the kernel with the 2**112 trick, exact for normal and subnormal halves),
so a packed weight has about the size of the file's bytes: Q4_0 18 and Q8_0 34 bytes per 32 weights as in the file,
Q4_K 148 bytes per 256 (the file has 144: scales and mins are unpacked to one byte each).

Shapes are checked by the caller (quant/kernels.py) before anything here runs.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..f16 import HALVES_WIDTH
from ..f16 import (
    halves_to_float as _halves_to_float,  # the name quads.py and the IQ kernels import from here
)

__all__ = [
    "ROWS",
    "pack_q4_0",
    "pack_q4_k",
    "pack_q8_0",
    "q4_0_runs",
    "q4_k_runs",
    "q8_0_runs",
    "quantize_activations",
    "unpack_q4_0",
    "unpack_q4_k",
    "unpack_q8_0",
]

# Rows per interleaved group: 4 vectors of 16 int16 lanes; the last group of a matrix is padded with zero rows.
ROWS = 64
assert ROWS == HALVES_WIDTH  # a group's f16 scales convert in one vector (quant/f16.py: halves_to_float)


# ---------------------------------------------------------------------------------------------------------------
# activations
# ---------------------------------------------------------------------------------------------------------------

@njit(inline="always")
def _quantize_row(x, xq, xd, xs, m):
    for b in range(x.shape[1] // 32):
        amax = np.float32(0.0)
        for j in range(32):
            amax = max(amax, abs(x[m, b * 32 + j]))
        d = amax / np.float32(127.0)
        inv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
        s = 0
        for j in range(32):
            v = x[m, b * 32 + j] * inv
            q = np.int32(np.floor(abs(v) + np.float32(0.5)))
            if v < 0:
                q = -q
            xq[m, b * 32 + j] = q
            s += q
        xd[m, b] = d
        xs[m, b] = s


@njit(parallel=True, cache=True)
def quantize_activations(x, xq, xd, xs):
    """x (M, K) float32 -> xq int8 (M, K), per-32 scale xd (M, K/32) float32 and block sums xs (M, K/32) int32.

    Rounds like ggml's quantize_row_q8_0 (scale amax/127, round half away from zero) but keeps the scale in float32.
    No fastmath here: the rounding must not depend on reassociation.
    """
    for m in prange(x.shape[0]):
        _quantize_row(x, xq, xd, xs, m)


@njit(cache=True)
def quantize_activations_serial(x, xq, xd, xs):
    """quantize_activations for a few rows (decode), where starting threads costs more than the work."""
    for m in range(x.shape[0]):
        _quantize_row(x, xq, xd, xs, m)


@njit(cache=True)
def expert_runs(ids, n_exp, order, run_start, run_expert):
    """Group activation rows by expert: fills order (rows sorted by expert, stable), run_start and run_expert.

    Returns the number of runs, or -1 if an id is outside [0, n_exp) (checked before any kernel runs).
    """
    counts = np.zeros(n_exp + 1, np.int64)
    for i in range(ids.shape[0]):
        e = ids[i]
        if e < 0 or e >= n_exp:
            return -1
        counts[e + 1] += 1
    for e in range(n_exp):
        counts[e + 1] += counts[e]
    n_runs = 0
    for e in range(n_exp):
        if counts[e + 1] > counts[e]:
            run_start[n_runs] = counts[e]
            run_expert[n_runs] = e
            n_runs += 1
    run_start[n_runs] = ids.shape[0]
    fill = counts[:n_exp].copy()
    for i in range(ids.shape[0]):
        e = ids[i]
        order[fill[e]] = i
        fill[e] += 1
    return n_runs


@njit(inline="always")
def _run_task(task, n_groups, run_start, run_expert):
    """A kernel's parallel task -> (row group g, expert e, activation rows m0..m1): tasks go run by run."""
    run = task // n_groups
    return task % n_groups, run_expert[run], run_start[run], run_start[run + 1]


@njit(inline="always")
def _store_group(out, accf, g, m0, m1, n_rows):
    """Write row group g's accumulators for activation rows m0..m1 to out, dropping the last group's padding rows."""
    r_end = min(ROWS, n_rows - g * ROWS)
    for m in range(m0, m1):
        for r in range(r_end):
            out[m, g * ROWS + r] = accf[m - m0, r]


@njit(inline="always")
def _f16_bits(src, o):
    return np.uint16(np.uint32(src[o]) | (np.uint32(src[o + 1]) << 8))


# ---------------------------------------------------------------------------------------------------------------
# packing: file rows (N, row_bytes) -> groups of ROWS interleaved rows
# ---------------------------------------------------------------------------------------------------------------

@njit(inline="always")
def _pack_simple(rows, qs, d, block_bytes, pad_code):
    """Q4_0/Q8_0: rows (N, nb*block_bytes) -> qs (G, nb, block_bytes-2, ROWS), d (G, nb, ROWS) f16 bits.

    Writes run contiguously; the reads of one group (ROWS rows) stay in L2. Pad rows get scale 0.
    """
    n = rows.shape[0]
    n_groups, nb, n_codes = qs.shape[0], qs.shape[1], qs.shape[2]
    for g in prange(n_groups):
        r_end = min(ROWS, n - g * ROWS)
        for b in range(nb):
            o = b * block_bytes
            for r in range(r_end):
                d[g, b, r] = _f16_bits(rows[g * ROWS + r], o)
            for r in range(r_end, ROWS):
                d[g, b, r] = 0
            for j in range(n_codes):
                for r in range(r_end):
                    qs[g, b, j, r] = rows[g * ROWS + r, o + 2 + j]
                for r in range(r_end, ROWS):
                    qs[g, b, j, r] = pad_code


@njit(parallel=True, cache=True)
def pack_q4_0(rows, qs, d):
    """rows (N, nb*18) -> qs (G, nb, 16, ROWS) uint8, d (G, nb, ROWS) uint16 (f16 bits); pad rows are zero."""
    _pack_simple(rows, qs, d, 18, 0x88)


@njit(parallel=True, cache=True)
def pack_q8_0(rows, qs, d):
    """rows (N, nb*34) -> qs (G, nb, 32, ROWS) uint8 (int8 codes), d (G, nb, ROWS) uint16 (f16 bits)."""
    _pack_simple(rows, qs, d, 34, 0)


@njit(parallel=True, cache=True)
def pack_q4_k(rows, qs, scm, dd):
    """rows (N, nsb*144) -> qs (G, nsb, 128, ROWS), scm (G, nsb, 16, ROWS) (8 scales then 8 mins, 6 bits each),
    dd (G, nsb, 2, ROWS) uint16 (f16 bits of d and dmin)."""
    n = rows.shape[0]
    n_groups, nsb = qs.shape[0], qs.shape[1]
    for g in prange(n_groups):
        for r in range(ROWS):
            row = g * ROWS + r
            for b in range(nsb):
                if row < n:
                    src = rows[row]
                    o = b * 144
                    dd[g, b, 0, r] = _f16_bits(src, o)
                    dd[g, b, 1, r] = _f16_bits(src, o + 2)
                    for s in range(8):
                        if s < 4:
                            sc = src[o + 4 + s] & 63
                            mn = src[o + 8 + s] & 63
                        else:
                            sc = (src[o + 8 + s] & 15) | ((src[o + s] >> 6) << 4)
                            mn = (src[o + 8 + s] >> 4) | ((src[o + 4 + s] >> 6) << 4)
                        scm[g, b, s, r] = sc
                        scm[g, b, 8 + s, r] = mn
                    for j in range(128):
                        qs[g, b, j, r] = src[o + 16 + j]
                else:
                    dd[g, b, 0, r] = 0
                    dd[g, b, 1, r] = 0
                    for s in range(16):
                        scm[g, b, s, r] = 0
                    for j in range(128):
                        qs[g, b, j, r] = 0


# ---------------------------------------------------------------------------------------------------------------
# integer-dot kernels over "runs": consecutive activation rows that share one expert
# ---------------------------------------------------------------------------------------------------------------
# run_start (n_runs+1,) and run_expert (n_runs,) say which activation rows use which expert. Decode has one run per
# chosen expert (one row each); linear has one run; prefill has one run per expert, so each group of weights is read
# once per run and reused from L1 for every row in it. Tasks are (run, group) pairs split across threads.

@njit(parallel=True, cache=True, fastmath=True)
def q4_0_runs(qs, d, xq, xd, xs, run_start, run_expert, n_rows, out):
    n_groups, nb = qs.shape[1], qs.shape[2]
    n_runs = run_expert.shape[0]
    for task in prange(n_runs * n_groups):
        g, e, m0, m1 = _run_task(task, n_groups, run_start, run_expert)
        accf = np.zeros((m1 - m0, ROWS), np.float32)
        ds = np.empty(ROWS, np.float32)
        xb = np.empty(32, np.int16)
        for b in range(nb):
            _halves_to_float(d[e, g, b], ds)
            q = qs[e, g, b]
            for m in range(m0, m1):
                for j in range(32):
                    xb[j] = xq[m, b * 32 + j]
                scale = xd[m, b]
                offset = np.int16(8 * xs[m, b])
                a = accf[m - m0]
                for r in range(ROWS):
                    acc = np.int16(0)
                    for j in range(16):
                        v = np.int16(q[j, r])
                        acc = np.int16(acc + (v & 15) * xb[j] + (v >> 4) * xb[j + 16])
                    a[r] += np.float32(np.int16(acc - offset)) * (ds[r] * scale)
        _store_group(out, accf, g, m0, m1, n_rows)


@njit(parallel=True, cache=True, fastmath=True)
def q8_0_runs(qs, d, xq, xd, xs, run_start, run_expert, n_rows, out):
    n_groups, nb = qs.shape[1], qs.shape[2]
    n_runs = run_expert.shape[0]
    for task in prange(n_runs * n_groups):
        g, e, m0, m1 = _run_task(task, n_groups, run_start, run_expert)
        accf = np.zeros((m1 - m0, ROWS), np.float32)
        ds = np.empty(ROWS, np.float32)
        xb = np.empty(32, np.int32)
        for b in range(nb):
            _halves_to_float(d[e, g, b], ds)
            q = qs[e, g, b]
            for m in range(m0, m1):
                for j in range(32):
                    xb[j] = xq[m, b * 32 + j]
                scale = xd[m, b]
                a = accf[m - m0]
                for r in range(ROWS):
                    acc = np.int32(0)
                    for j in range(32):
                        acc = np.int32(acc + np.int32(q[j, r]) * xb[j])
                    a[r] += np.float32(acc) * (ds[r] * scale)
        _store_group(out, accf, g, m0, m1, n_rows)


@njit(parallel=True, cache=True, fastmath=True)
def q4_k_runs(qs, scm, dd, xq, xd, xs, run_start, run_expert, n_rows, out):
    n_groups, nsb = qs.shape[1], qs.shape[2]
    n_runs = run_expert.shape[0]
    for task in prange(n_runs * n_groups):
        g, e, m0, m1 = _run_task(task, n_groups, run_start, run_expert)
        accf = np.zeros((m1 - m0, ROWS), np.float32)
        dsup = np.empty(ROWS, np.float32)
        dmin = np.empty(ROWS, np.float32)
        xb = np.empty(64, np.int16)
        isum_lo = np.empty(ROWS, np.int16)
        isum_hi = np.empty(ROWS, np.int16)
        for b in range(nsb):
            _halves_to_float(dd[e, g, b, 0], dsup)
            _halves_to_float(dd[e, g, b, 1], dmin)
            sm = scm[e, g, b]
            for m in range(m0, m1):
                a = accf[m - m0]
                for c in range(4):  # sub-blocks 2c (low nibbles) and 2c+1 (high nibbles) share 32 bytes
                    q = qs[e, g, b, c * 32:(c + 1) * 32]
                    k0 = b * 256 + c * 64
                    for j in range(64):
                        xb[j] = xq[m, k0 + j]
                    # one loop per nibble: a 32-step body is what LLVM unrolls fully and vectorizes across rows
                    for r in range(ROWS):
                        acc = np.int16(0)
                        for j in range(32):
                            acc = np.int16(acc + (np.int16(q[j, r]) & 15) * xb[j])
                        isum_lo[r] = acc
                    for r in range(ROWS):
                        acc = np.int16(0)
                        for j in range(32):
                            acc = np.int16(acc + (np.int16(q[j, r]) >> 4) * xb[32 + j])
                        isum_hi[r] = acc
                    blk = k0 // 32
                    s_lo, s_hi = xd[m, blk], xd[m, blk + 1]
                    x_lo, x_hi = xs[m, blk], xs[m, blk + 1]
                    off_lo, off_hi = np.int16(8 * x_lo), np.int16(8 * x_hi)
                    for r in range(ROWS):
                        # sum(q * x) = centred sum + 8 * sum(x); the centred sum is exact in int16 (see module doc)
                        dot_lo = np.float32(np.int32(np.int16(isum_lo[r] - off_lo)) + 8 * x_lo)
                        dot_hi = np.float32(np.int32(np.int16(isum_hi[r] - off_hi)) + 8 * x_hi)
                        ds = dsup[r]
                        dm = dmin[r]
                        a[r] += s_lo * (ds * np.float32(sm[2 * c, r]) * dot_lo
                                        - dm * np.float32(sm[8 + 2 * c, r]) * np.float32(x_lo))
                        a[r] += s_hi * (ds * np.float32(sm[2 * c + 1, r]) * dot_hi
                                        - dm * np.float32(sm[9 + 2 * c, r]) * np.float32(x_hi))
        _store_group(out, accf, g, m0, m1, n_rows)


# ---------------------------------------------------------------------------------------------------------------
# back to float rows (prefill tiles for BLAS)
# ---------------------------------------------------------------------------------------------------------------

@njit(parallel=True, cache=True, fastmath=True)
def unpack_q4_0(g0, g1, qs, d, dst):
    """Decode groups g0..g1 of one packed Q4_0 matrix into dst ((g1-g0)*ROWS, K) float32; pad rows give zeros."""
    for g in prange(g0, g1):
        base = (g - g0) * ROWS
        scale = np.empty(ROWS, np.float32)
        for b in range(qs.shape[1]):
            _halves_to_float(d[g, b], scale)
            for r in range(ROWS):
                for j in range(16):
                    v = np.int32(qs[g, b, j, r])
                    dst[base + r, b * 32 + j] = scale[r] * np.float32((v & 15) - 8)
                    dst[base + r, b * 32 + 16 + j] = scale[r] * np.float32((v >> 4) - 8)


@njit(parallel=True, cache=True, fastmath=True)
def unpack_q8_0(g0, g1, qs, d, dst):
    """As unpack_q4_0, for packed Q8_0 (qs holds int8 codes)."""
    for g in prange(g0, g1):
        base = (g - g0) * ROWS
        scale = np.empty(ROWS, np.float32)
        for b in range(qs.shape[1]):
            _halves_to_float(d[g, b], scale)
            for r in range(ROWS):
                for j in range(32):
                    dst[base + r, b * 32 + j] = scale[r] * np.float32(qs[g, b, j, r])


@njit(parallel=True, cache=True, fastmath=True)
def unpack_q4_k(g0, g1, qs, scm, dd, dst):
    """As unpack_q4_0, for packed Q4_K."""
    for g in prange(g0, g1):
        base = (g - g0) * ROWS
        scale = np.empty(ROWS, np.float32)
        dmin = np.empty(ROWS, np.float32)
        for b in range(qs.shape[1]):
            _halves_to_float(dd[g, b, 0], scale)
            _halves_to_float(dd[g, b, 1], dmin)
            for r in range(ROWS):
                for s in range(8):
                    ds = scale[r] * np.float32(scm[g, b, s, r])
                    dm = dmin[r] * np.float32(scm[g, b, 8 + s, r])
                    c, shift = s // 2, 4 * (s % 2)
                    for l in range(32):
                        q = (np.int32(qs[g, b, c * 32 + l, r]) >> shift) & 15
                        dst[base + r, b * 256 + s * 32 + l] = ds * np.float32(q) - dm

"""IQ3_S and IQ2_S in the quads layout of the integer families (quads.py): the "_S" lattice formats, whose grid
indices carry high bits in a separate array and whose signs are stored one bit per value (no parity trick).

IQ3_S (ggml-common.h block_iq3_s, dequantize_row_iq3_s) codes 4 values at a time as a 9-bit index into iq3s_grid
(512 entries of 4 unsigned bytes, 1..15): the low 8 bits in qs[64], the 9th in qh[8] (bit k of qh[s] for the k-th
entry of sub-block s), one sign bit per value in signs[32] and a 4-bit scale per 32 values, value = d (2 s + 1) grid
sign. As for IQ3_XXS (iq_grid_quads.py), one grid entry is exactly one 32-bit lane of the quads layout: the kernel
puts the 9th bit under each lane's low index byte, gathers the lanes' grid words, negates the activation bytes under
the sign bits and sums with the family's unsigned-by-signed byte dot, the sub-block's int32 sums times 2 s + 1 in
integers. llama.cpp's AVX2 ggml_vec_dot_iq3_s_q8_K (ggml/src/ggml-cpu/arch/x86/quants.c) builds the indices the same
way (the qh byte shifted per lane and masked with 256) but for one row, 16 entries at a time; here a register holds
one entry of each of 16 rows, so the shift per entry is a constant. Activations are Q8_K, and a super-block meets its
float scales once per row: a[r] += xd * d_r * sum over s of (2 s_rs + 1) * dot_rs.

Layout (per expert; G groups of 64 rows, nsb super-blocks):
  codes (G, nsb, 4 quarters, 26 words, 16 rows, 4 bytes): a row's 26 words are the file's bytes after d in order:
        words 0-15 the grid indices' low bytes (byte k of word w: entry 4 w + k, values 16 w + 4 k..+3), words
        16-17 the qh bytes (byte l of word 16 + t: qh[4 t + l]), words 18-25 the sign bytes (word 18 + s: values
        32 s..32 s + 31, bit i of byte l the sign of value 32 s + 8 l + i)
  scales (G, nsb, 8, ROWS) uint8: 2 s + 1 (1..31) as int16-pair bytes (quads._put_pair)
  d (G, nsb, ROWS) f16 bits.  114 bytes per 256 (the file: 110).

IQ2_S (block_iq2_s, dequantize_row_iq2_s) codes 8 values at a time as a 10-bit index into iq2s_grid (1024 entries of
8 unsigned bytes, 8, 25 or 43): the low 8 bits in qs[0..31], the top 2 in qh[8] (bits 2 l, 2 l + 1 of qh[s] for
entry l of sub-block s), a sign byte per entry in qs[32..63] and a 4-bit scale per 16 values, value
d (0.5 + s) / 4 grid sign = d / 8 (2 s + 1) grid sign. As for IQ2_XS (iq2_quads.py), an entry is 8 values of one row,
gathered per 64-bit lane (two lanes per row, 8 rows per register), the activations negated per byte under the sign
bytes, the 16 values' int32 sums scaled by 2 s + 1 in integers; llama.cpp's AVX2 ggml_vec_dot_iq2_s_q8_K (same
file) builds the indices from qs and qh alike and applies the sign bytes to the activations.

Layout (per expert): codes (G, nsb, 4 quarters, 18 words, 16 rows, 4 bytes), again the file's bytes after d in
  order: words 0-7 the indices' low bytes (word s: sub-block s, byte l its entry l), words 8-15 the sign bytes (the
  same order), words 16-17 the qh bytes (byte l of word 16 + t: qh[4 t + l]); scales (G, nsb, 8, ROWS) uint8, the
  file's scale bytes (byte s: sub-block s, low nibble first); d (G, nsb, ROWS).  82 bytes per 256, as the file.

Prefill (runs of several activation rows) takes IQ3_XXS's way (iq_grid_quads.py): the grid gathers are the cost, so
each super-block is unpacked once per run into L1 as unsigned bytes 64 + signed value, every row then multiplies
those (its activations the signed operand) and 64 times its sums per scale group (IQ3_S: per 32, the Q8_K pairs;
IQ2_S: per 16, pairs16, hence PER16_TYPES) times the scales comes off in one 16-bit multiply-add. IQ3_S reuses
iq_grid_quads._u64_dot16; IQ2_S unpacks its gathered octets into the quads layout and reuses IQ2_XS's
iq2_quads._unpacked_dot16 (one scale multiply per 4 byte dots, no row sums).
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

# numba caches a kernel by its own file only: when a helper imported here changes, this file must change too
from ..iq_grids import IQ2S_GRID, IQ3S_GRID
from . import avx512vnni
from .iq2_quads import _BOUND as _BOUND2
from .iq2_quads import (
    UNPACKED,
    _c,
    _dup_rows,
    _gather8,
    _octet_idx,
    _odd,
    _row_sums,
    _sb_out,
    _signed,
    _store_as_quads,
    _store_scale_pairs,
    _unpacked_dot16,
    _unsigned_signed,
    _x_bytes,
)
from .iq2_quads import _sign_mask as _byte_sign_mask
from .iq_grid_quads import _gather, _sign_mask, _signed_grid, _signed_x, _u64_dot16
from .portable import ROWS, _halves_to_float, _run_task, _store_group
from .quads import (
    _BYTE_DOTS,
    QUARTER,
    _f16_bits,
    _literals,
    _load,
    _put_pair,
    _store_rows,
    _x_ptrs,
)
from .simd import I8, I32, I64, V16, data_ptr, prefetch_ahead, splat

__all__ = ["make_s_runs", "pack_iq2_s", "pack_iq3_s"]

W32 = ir.VectorType(ir.IntType(16), 32)
B32 = ir.VectorType(I8, 32)
B16 = ir.VectorType(I8, 16)
B64 = ir.VectorType(I8, 64)

# The grid as one little-endian uint32 per entry: the 4 bytes of a lane, in memory order.
_GRID3S = np.ascontiguousarray(IQ3S_GRID).view("<u4").reshape(-1).astype(np.uint32)
# ... each byte plus 64, the unsigned form iq_grid_quads._u64_dot16 multiplies (64 +- grid: 49..79)
_GRID3S_U = _GRID3S + np.uint32(0x40404040)

# The largest |u0 s0 + u1 s1| of two grid values (<= 15) by two activation bytes (AVX2 sums 16-bit lanes below it).
_BOUND3S = 2 * 15 * 127

_WORDS3S = 26  # code words per row and super-block
_WORDS2S = 18

_GRID2S = np.ascontiguousarray(IQ2S_GRID).view("<u8").reshape(-1).astype(np.uint64)
_GRID2S_U = _GRID2S + np.uint64(0x4040404040404040)  # each byte plus 64, as _GRID3S_U


def _iq3_s_idx(builder, wp, s, j):
    """Entry j of sub-block s of 16 rows: its low index byte with the 9th bit from the qh word moved under it."""
    def const(v):
        return splat(builder, ir.Constant(I32, v))
    word, k = _load(builder, wp, 2 * s + j // 4), j % 4
    low = builder.and_(builder.lshr(word, const(8 * k)) if k else word, const(255))
    qh, at = _load(builder, wp, 16 + s // 4), 8 * (s % 4) + j
    high = builder.shl(qh, const(8 - at)) if at <= 8 else builder.lshr(qh, const(at - 8))
    return builder.or_(low, builder.and_(high, const(256)))


@intrinsic(prefer_literal=True)
def _iq3_s_sb16(typingctx, fam, n, w, w_off, sp, sp_off, grid, x, x_off, x_stride, isum, out_off):
    """IQ3_S super-block, 16 rows (one quarter), against Q8_K activations, in integers:
    isum[j*ROWS + out_off + r] = sum over the 8 sub-blocks s of (2 s_rs + 1) * (grid values_rs . signed x_js).

    w: the quarter's 26 code words at w_off; sp: the scales as int16-pair bytes, pair t (sub-blocks 2t, 2t+1) at
    sp_off + 128 t; grid: the uint32 grid table."""
    lits = _literals(fam, n)
    if lits is None:
        return None
    f, n_x = lits
    dot = _BYTE_DOTS[f]
    sig = types.void(fam, n, w, w_off, sp, sp_off, grid, x, x_off, x_stride, isum, out_off)

    def codegen(context, builder, signature, args):
        (_, _, wa, wo, sa, so, ga, xa, xo, xst, ia, oo) = args
        wp = data_ptr(context, builder, signature.args[2], wa, wo, V16)
        scp = data_ptr(context, builder, signature.args[4], sa, so, B32)
        gp = data_ptr(context, builder, signature.args[6], ga, ir.Constant(I64, 0), I32)
        xps = _x_ptrs(context, builder, signature.args[7], xa, xo, xst, n_x)

        def const(v):
            return splat(builder, ir.Constant(I32, v))

        accs = [ir.Constant(V16, None)] * n_x
        for s in range(8):
            pair = builder.bitcast(builder.zext(_load(builder, scp, 4 * (s // 2)), W32), V16)
            scale = builder.and_(pair, const(0xFFFF)) if s % 2 == 0 else builder.lshr(pair, const(16))
            sw = _load(builder, wp, 18 + s)
            grids, masks = [], []
            for j in range(8):
                grids.append(_gather(builder, gp, _iq3_s_idx(builder, wp, s, j)))
                shift = 8 * (j // 2) + 4 * (j % 2)
                masks.append(_sign_mask(builder, builder.and_(builder.lshr(sw, const(shift)) if shift else sw,
                                                              const(15))))
            for jx, xp_ in enumerate(xps):
                pairs = [(grids[j], _signed_x(builder, _load(builder, xp_, 8 * s + j), masks[j])) for j in range(8)]
                accs[jx] = dot.scaled_dot(builder, accs[jx], pairs, _BOUND3S, scale)
        for jx in range(n_x):
            _store_rows(context, builder, signature.args[10], ia, oo, jx, accs[jx])
        return context.get_dummy_value()

    return sig, codegen


def _iq2_s_idx(builder, wp, s):
    """The 4 entries' 10-bit indices of sub-block s of 16 rows: low bytes with their 2 bits from the qh word."""
    words, qh = _load(builder, wp, s), _load(builder, wp, 16 + s // 4)
    idx = []
    for l in range(4):
        low = _c(builder.and_, _c(builder.lshr, words, 8 * l), 255) if l else _c(builder.and_, words, 255)
        at = 8 * (s % 4) + 2 * l  # the entry's 2 high bits in the qh word, moved to bits 8-9
        high = _c(builder.shl, qh, 8 - at) if at <= 8 else _c(builder.lshr, qh, at - 8)
        idx.append(builder.or_(low, _c(builder.and_, high, 0x300)))
    return idx


@intrinsic(prefer_literal=True)
def _iq2_s_sb16(typingctx, fam, n, w, w_off, sc, sc_off, grid, x, x_off, x_stride, isum, out_off):
    """IQ2_S super-block, 16 rows (two octets), against Q8_K activations, in integers:
    isum[j*ROWS + out_off + r] = sum over the 16 groups h of 16 values of (2 s_rh + 1) * (grid values . signed x_jh).

    w: the 16 rows' 18 code words at w_off (word i at w_off + 64 i bytes); sc: the scale bytes at sc_off (sub-block
    s: 16 rows' bytes at sc_off + 64 s); grid: the uint64 table."""
    lits = _literals(fam, n)
    if lits is None:
        return None
    f, n_x = lits
    dot, wide = _BYTE_DOTS[f], f == avx512vnni.KEY
    sig = types.void(fam, n, w, w_off, sc, sc_off, grid, x, x_off, x_stride, isum, out_off)

    def codegen(context, builder, signature, args):
        (_, _, wa, wo, sa, so, ga, xa, xo, xst, ia, oo) = args
        wp = data_ptr(context, builder, signature.args[2], wa, wo, V16)
        sp = data_ptr(context, builder, signature.args[4], sa, so, B64)
        gp = data_ptr(context, builder, signature.args[6], ga, ir.Constant(I64, 0), I64)
        xps = [data_ptr(context, builder, signature.args[7], xa, builder.add(xo, builder.mul(xst, ir.Constant(
            xst.type, j))), I64) for j in range(n_x)]
        accs = [[ir.Constant(V16, None)] * 2 for _ in range(n_x)]
        for s in range(8):
            sb = builder.zext(builder.load(builder.bitcast(builder.gep(sp, [ir.Constant(I64, s)]), B16.as_pointer()),
                                           align=1), V16)
            scales = [_odd(builder, _c(builder.and_, sb, 15)), _odd(builder, _c(builder.lshr, sb, 4))]
            xs = [_x_bytes(builder, xps, 4 * s + l) for l in range(4)]
            signs = _load(builder, wp, 8 + s)
            idx = _iq2_s_idx(builder, wp, s)
            for o in range(2):
                grids = [_gather8(builder, wide, gp, _octet_idx(builder, idx[l], o)) for l in range(4)]
                masks = [_byte_sign_mask(builder, signs, o, l) for l in range(4)]
                for h in range(2):
                    scale = _dup_rows(builder, scales[h], o)
                    for jx in range(n_x):
                        pairs = [(grids[l], _signed(builder, masks[l], xs[l][jx])) for l in (2 * h, 2 * h + 1)]
                        accs[jx][o] = dot.scaled_dot(builder, accs[jx][o], pairs, _BOUND2, scale)
        for jx in range(n_x):
            _store_rows(context, builder, signature.args[10], ia, oo, jx, _row_sums(builder, *accs[jx]))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic(prefer_literal=True)
def _iq3_s_unpack16(typingctx, fam, w, w_off, grid, u, u_off):
    """One quarter's super-block (16 rows x 256 values) as unsigned bytes 64 + signed grid value, into u at u_off:
    64 logical registers, sub-block s's entry j at register 8 s + j (the form iq_grid_quads._u64_dot16 reads, as
    for IQ3_XXS's prefill). grid: the table _GRID3S_U."""
    lits = _literals(fam)
    if lits is None:
        return None
    sig = types.void(fam, w, w_off, grid, u, u_off)

    def codegen(context, builder, signature, args):
        (_, wa, wo, ga, ua, uo) = args
        wp = data_ptr(context, builder, signature.args[1], wa, wo, V16)
        gp = data_ptr(context, builder, signature.args[3], ga, ir.Constant(I64, 0), I32)
        up = data_ptr(context, builder, signature.args[4], ua, uo, V16)
        for s in range(8):
            sw = _load(builder, wp, 18 + s)
            for j in range(8):
                shift = 8 * (j // 2) + 4 * (j % 2)
                nib = builder.and_(builder.lshr(sw, splat(builder, ir.Constant(I32, shift))) if shift else sw,
                                   splat(builder, ir.Constant(I32, 15)))
                grid_ = _gather(builder, gp, _iq3_s_idx(builder, wp, s, j))
                builder.store(_signed_grid(builder, grid_, _sign_mask(builder, nib)),
                              builder.gep(up, [ir.Constant(I64, 8 * s + j)]), align=1)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic(prefer_literal=True)
def _iq2_s_unpack16(typingctx, fam, w, w_off, sc, sc_off, grid, u, u_off):
    """One quarter's super-block (16 rows x 256 values) as unsigned bytes 64 + signed grid value (21..107), into u
    at u_off in the form iq2_quads._unpacked_dot16 reads (IQ2_XS's prefill): the quads layout, values 4 q..4 q + 3 at
    register q (each octet's gathered entry split into its two 4-value halves), then at 64 + t the scales 2 s + 1
    of sub-block t's two 16-value groups as an int16 pair. grid: the table _GRID2S_U."""
    lits = _literals(fam)
    if lits is None:
        return None
    wide = lits[0] == avx512vnni.KEY
    sig = types.void(fam, w, w_off, sc, sc_off, grid, u, u_off)

    def codegen(context, builder, signature, args):
        (_, wa, wo, sa, so, ga, ua, uo) = args
        wp = data_ptr(context, builder, signature.args[1], wa, wo, V16)
        sp = data_ptr(context, builder, signature.args[3], sa, so, B64)
        gp = data_ptr(context, builder, signature.args[5], ga, ir.Constant(I64, 0), I64)
        up = data_ptr(context, builder, signature.args[6], ua, uo, V16)
        _store_scale_pairs(builder, sp, up)
        for s in range(8):
            idx = _iq2_s_idx(builder, wp, s)
            signs = _load(builder, wp, 8 + s)
            for l in range(4):
                octs = [_unsigned_signed(builder, _byte_sign_mask(builder, signs, o, l),
                                         _gather8(builder, wide, gp, _octet_idx(builder, idx[l], o))) for o in range(2)]
                _store_as_quads(builder, up, octs, 4 * s + l)
        return context.get_dummy_value()

    return sig, codegen


# ---------------------------------------------------------------------------------------------------------------
# packing
# ---------------------------------------------------------------------------------------------------------------

@njit(parallel=True, cache=True)
def pack_iq3_s(rows, qs, sc, d):
    """rows (N, nsb*110) -> qs (G, nsb, 4, 26, 16, 4), sc (G, nsb, 8, ROWS) (2 s + 1 as int16-pair bytes), d (G,
    nsb, ROWS). Block: d | qs[64] | qh[8] | signs[32] | scales[4] (sub-block s: nibble s % 2 of scales[s // 2])."""
    n = rows.shape[0]
    n_groups, nsb = qs.shape[0], qs.shape[1]
    for g in prange(n_groups):
        r_end = min(ROWS, n - g * ROWS)
        for b in range(nsb):
            o = b * 110
            for r in range(ROWS):
                rq, rr = r // QUARTER, r % QUARTER
                if r < r_end:
                    src = rows[g * ROWS + r]
                    d[g, b, r] = _f16_bits(src, o)
                    for w in range(26):
                        for jj in range(4):
                            qs[g, b, rq, w, rr, jj] = src[o + 2 + 4 * w + jj]
                    for s in range(8):
                        ls = (np.uint32(src[o + 106 + s // 2]) >> (4 * (s % 2))) & 15
                        _put_pair(sc, g, b, 0, s, r, np.uint8(2 * ls + 1))
                else:
                    d[g, b, r] = 0
                    for s in range(8):
                        _put_pair(sc, g, b, 0, s, r, 0)
                    for w in range(26):
                        for jj in range(4):
                            qs[g, b, rq, w, rr, jj] = 0


@njit(parallel=True, cache=True)
def pack_iq2_s(rows, qs, sc, d):
    """rows (N, nsb*82) -> qs (G, nsb, 4, 18, 16, 4), sc (G, nsb, 8, ROWS), d (G, nsb, ROWS). Block: d | qs[32] low
    index bits | signs[32] | qh[8] (2 index bits per entry) | scales[8] (two 4-bit scales, low nibble first)."""
    n = rows.shape[0]
    n_groups, nsb = qs.shape[0], qs.shape[1]
    for g in prange(n_groups):
        r_end = min(ROWS, n - g * ROWS)
        for b in range(nsb):
            o = b * 82
            for r in range(ROWS):
                rq, rr = r // QUARTER, r % QUARTER
                live = r < r_end
                src = rows[g * ROWS + r] if live else rows[0]
                d[g, b, r] = _f16_bits(src, o) if live else 0
                for w in range(18):
                    for jj in range(4):
                        qs[g, b, rq, w, rr, jj] = src[o + 2 + 4 * w + jj] if live else 0
                for s in range(8):
                    sc[g, b, s, r] = src[o + 74 + s] if live else 0


# ---------------------------------------------------------------------------------------------------------------
# kernels over runs of activation rows that share an expert (portable.py's contract), built per family
# ---------------------------------------------------------------------------------------------------------------

@njit(inline="always")
def _s_sb_out(a, isum, o, dsup, xd):
    for r in range(ROWS):
        a[r] += xd * dsup[r] * np.float32(isum[o + r])


def make_s_runs(F: int) -> dict[str, tuple]:
    """{format name: (decode kernel, prefill kernel)} of the "_S" lattice formats for the family under F."""
    if F not in _BYTE_DOTS:
        raise KeyError(f"no byte multiplication registered under {F}")
    return {"IQ3_S": _make_iq3_s_runs(F), "IQ2_S": _make_iq2_s_runs(F)}


def _make_iq3_s_runs(F: int) -> tuple:
    """IQ3_S (decode, prefill) on Q8_K activations (xq, xd per 256; prefill takes the pair sums per 32, xp)."""
    QW = _WORDS3S * 64       # one quarter's code bytes per super-block
    BLOCK = 4 * QW           # one group's
    NX = 4  # activation rows per pass over the unpacked weights

    @njit(parallel=True, cache=True, fastmath=True)
    def iq3_s_runs(qs, sc, d, xq, xd, xp, run_start, run_expert, n_rows, out):
        n_groups, nsb = d.shape[1], d.shape[2]
        k = nsb * 256
        grid = _GRID3S
        for task in prange(run_expert.shape[0] * n_groups):
            g, e, m0, m1 = _run_task(task, n_groups, run_start, run_expert)
            accf = np.zeros((m1 - m0, ROWS), np.float32)
            dsup = np.empty(ROWS, np.float32)
            isum = np.empty(ROWS, np.int32)
            for b in range(nsb):
                _halves_to_float(d[e, g, b], dsup)
                sb = (e * n_groups + g) * nsb + b
                base = sb * BLOCK
                prefetch_ahead(qs, base, BLOCK)
                for m in range(m0, m1):
                    for rq in range(4):
                        _iq3_s_sb16(F, 1, qs, base + rq * QW, sc, sb * 512 + rq * 32, grid, xq, m * k + b * 256,
                                    0, isum, rq * QUARTER)
                    _s_sb_out(accf[m - m0], isum, 0, dsup, xd[m, b])
            _store_group(out, accf, g, m0, m1, n_rows)

    @njit(parallel=True, cache=True, fastmath=True)
    def iq3_s_runs_x4(qs, sc, d, xq, xd, xp, run_start, run_expert, n_rows, out):
        # as IQ3_XXS's prefill (iq_grid_quads.py): the grid gathers are the cost, so a run of several rows unpacks
        # each super-block once, to bytes in L1, and every row reads those
        n_groups, nsb = d.shape[1], d.shape[2]
        k = nsb * 256
        kp = k // 64
        grid, grid_u = _GRID3S, _GRID3S_U
        for task in prange(run_expert.shape[0] * n_groups):
            g, e, m0, m1 = _run_task(task, n_groups, run_start, run_expert)
            accf = np.zeros((m1 - m0, ROWS), np.float32)
            dsup = np.empty(ROWS, np.float32)
            isum = np.empty((m1 - m0) * ROWS, np.int32)
            u = np.empty(4 * 64 * 64, np.uint8)
            for b in range(nsb):
                _halves_to_float(d[e, g, b], dsup)
                sb = (e * n_groups + g) * nsb + b
                base = sb * BLOCK
                if m1 - m0 == 1:
                    for rq in range(4):
                        _iq3_s_sb16(F, 1, qs, base + rq * QW, sc, sb * 512 + rq * 32, grid, xq, m0 * k + b * 256,
                                    0, isum, rq * QUARTER)
                else:
                    for rq in range(4):
                        _iq3_s_unpack16(F, qs, base + rq * QW, grid_u, u, rq * 4096)
                    m = m0
                    while m < m1:
                        n_x = NX if m + NX <= m1 else 1
                        o = (m - m0) * ROWS
                        for rq in range(4):
                            if n_x == NX:
                                _u64_dot16(F, NX, u, rq * 4096, sc, sb * 512 + rq * 32, xq, m * k + b * 256, k,
                                           xp, m * kp + b * 4, kp, isum, o + rq * QUARTER)
                            else:
                                _u64_dot16(F, 1, u, rq * 4096, sc, sb * 512 + rq * 32, xq, m * k + b * 256, 0,
                                           xp, m * kp + b * 4, 0, isum, o + rq * QUARTER)
                        m += n_x
                for m in range(m0, m1):
                    _s_sb_out(accf[m - m0], isum, (m - m0) * ROWS, dsup, xd[m, b])
            _store_group(out, accf, g, m0, m1, n_rows)

    return iq3_s_runs, iq3_s_runs_x4


def _make_iq2_s_runs(F: int) -> tuple:
    """IQ2_S (decode, prefill) on Q8_K activations (xq, xd per 256; prefill takes the pair sums per 16, xp)."""
    QW = _WORDS2S * 64
    BLOCK = 4 * QW
    NX = 4  # activation rows per pass over the unpacked weights

    @njit(parallel=True, cache=True, fastmath=True)
    def iq2_s_runs(qs, sc, d, xq, xd, xp, run_start, run_expert, n_rows, out):
        n_groups, nsb = d.shape[1], d.shape[2]
        k = nsb * 256
        grid = _GRID2S
        for task in prange(run_expert.shape[0] * n_groups):
            g, e, m0, m1 = _run_task(task, n_groups, run_start, run_expert)
            accf = np.zeros((m1 - m0, ROWS), np.float32)
            dsup = np.empty(ROWS, np.float32)
            isum = np.empty(ROWS, np.int32)
            for b in range(nsb):
                _halves_to_float(d[e, g, b], dsup)
                sb = (e * n_groups + g) * nsb + b
                base = sb * BLOCK
                prefetch_ahead(qs, base, BLOCK)
                for m in range(m0, m1):
                    for rq in range(4):
                        _iq2_s_sb16(F, 1, qs, base + rq * QW, sc, sb * 512 + rq * QUARTER, grid, xq,
                                    m * k + b * 256, 0, isum, rq * QUARTER)
                    _sb_out(accf[m - m0], isum, 0, dsup, xd[m, b])
            _store_group(out, accf, g, m0, m1, n_rows)

    @njit(parallel=True, cache=True, fastmath=True)
    def iq2_s_runs_x4(qs, sc, d, xq, xd, xp, run_start, run_expert, n_rows, out):
        # as IQ3_S's: a run of several rows unpacks each super-block once (the gathers are the cost)
        n_groups, nsb = d.shape[1], d.shape[2]
        k = nsb * 256
        kp = k // 32
        grid, grid_u = _GRID2S, _GRID2S_U
        for task in prange(run_expert.shape[0] * n_groups):
            g, e, m0, m1 = _run_task(task, n_groups, run_start, run_expert)
            accf = np.zeros((m1 - m0, ROWS), np.float32)
            dsup = np.empty(ROWS, np.float32)
            isum = np.empty((m1 - m0) * ROWS, np.int32)
            u = np.empty(4 * UNPACKED, np.uint8)
            for b in range(nsb):
                _halves_to_float(d[e, g, b], dsup)
                sb = (e * n_groups + g) * nsb + b
                base = sb * BLOCK
                if m1 - m0 == 1:
                    for rq in range(4):
                        _iq2_s_sb16(F, 1, qs, base + rq * QW, sc, sb * 512 + rq * QUARTER, grid, xq,
                                    m0 * k + b * 256, 0, isum, rq * QUARTER)
                else:
                    for rq in range(4):
                        _iq2_s_unpack16(F, qs, base + rq * QW, sc, sb * 512 + rq * QUARTER, grid_u, u,
                                        rq * UNPACKED)
                    m = m0
                    while m < m1:
                        n_x = NX if m + NX <= m1 else 1
                        o = (m - m0) * ROWS
                        for rq in range(4):
                            if n_x == NX:
                                _unpacked_dot16(F, NX, 16, 64, u, rq * UNPACKED, xq, m * k + b * 256, k, xp,
                                                m * kp + b * 8, kp, isum, o + rq * QUARTER)
                            else:
                                _unpacked_dot16(F, 1, 16, 64, u, rq * UNPACKED, xq, m * k + b * 256, 0, xp,
                                                m * kp + b * 8, 0, isum, o + rq * QUARTER)
                        m += n_x
                for m in range(m0, m1):
                    _sb_out(accf[m - m0], isum, (m - m0) * ROWS, dsup, xd[m, b])
            _store_group(out, accf, g, m0, m1, n_rows)

    return iq2_s_runs, iq2_s_runs_x4

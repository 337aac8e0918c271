"""IQ3_XXS in the quads layout of the integer families (quads.py): packing and kernels for a lattice-grid format.

IQ3_XXS codes 4 values at a time as an index into iq3xxs_grid (256 entries of 4 unsigned bytes, 4..62), with a sign
per value and a 4-bit scale per sub-block of 32 (ggml-common.h block_iq3_xxs, dequantize_row_iq3_xxs: a value is
d * (0.5 + s) / 2 * grid * sign = d / 4 * (2 s + 1) * grid * sign). In the quads layout a 32-bit lane holds 4
consecutive values of one row, which is exactly one grid entry: the kernel fetches each lane's grid word (one load
per 4 values, as llama.cpp's AVX2 ggml_vec_dot_iq3_xxs_q8_K does with _mm256_set_epi32), puts each value's sign on the
activation byte it multiplies (x ^ m - m with m = 0xFF for a minus sign, which vpsignb does in llama.cpp), and sums
grid by signed activation with the family's unsigned-by-signed byte dot. Activations are Q8_K, as in llama.cpp, and a
super-block meets its float scales once per row: a[r] += xd * d_r / 4 * sum over s of ls_rs * dot_rs.

That is the decode kernel, where each weight meets one activation row. In prefill the gathers would be repeated for
every few rows and cost more than the byte dots, so a run of rows that share an expert unpacks each super-block once
(_iq3_xxs_unpack16) to 64 + signed grid value as unsigned bytes, 16 KiB that stay in L1, and every row multiplies
those against its own activations as the broadcast signed operand (_u64_dot16); 64 times each scale-weighted 32-sum
of the activations comes off again, two sub-blocks per 16-bit multiply-add.

Layout (per expert; G groups of 64 rows, nsb super-blocks):
  codes (G, nsb, 4 quarters, 24 words, 16 rows, 4 bytes): words 0-15 are the file's 64 grid-index bytes in order
        (byte k of word w indexes quad 4 w + k, values 16 w + 4 k..+3); word 16 + s holds sub-block s's 4 sign
        bytes, byte l the 8 signs of values 32 s + 8 l..+7 (ksigns_iq2xs applied: the file's 7 bits plus parity)
  scales (G, nsb, 8, ROWS) uint8: 2 s + 1 (1..31) as int16-pair bytes (quads._put_pair)
  d (G, nsb, ROWS) f16 bits.  106 bytes per 256 (the file: 98).
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

# numba caches a kernel by its own file only: when a helper imported here changes, this file must change too
from ..iq_grids import IQ3XXS_GRID, KSIGNS
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
from .simd import (
    I8,
    I32,
    I64,
    V8,
    V16,
    data_ptr,
    halves,
    intrinsic_fn,
    join,
    prefetch_ahead,
    splat,
)

__all__ = ["make_grid_runs", "pack_iq3_xxs"]

W32 = ir.VectorType(ir.IntType(16), 32)
B64 = ir.VectorType(I8, 64)
B32 = ir.VectorType(I8, 32)

# The grid as one little-endian uint32 per entry: the 4 bytes of a lane, in memory order.
_GRID3 = np.ascontiguousarray(IQ3XXS_GRID).view("<u4").reshape(-1).astype(np.uint32)
_KSIGNS = np.asarray(KSIGNS, np.uint8)
# ... each byte plus 64 (grid values are 4..62), the unsigned form the prefill kernel multiplies
_GRID3_U = _GRID3 + np.uint32(0x40404040)


def _gather(builder, base, idx):
    """base[idx[i]] for each of 16 lanes (base: pointer to uint32 table entries): vpgatherdd on each 256-bit half,
    which every integer family has (AVX2)."""
    fn = intrinsic_fn(builder, "llvm.x86.avx2.gather.d.d.256", V8, [V8, I8.as_pointer(), V8, V8, I8])
    ptr = builder.bitcast(base, I8.as_pointer())
    ones = ir.Constant(V8, [-1] * 8)
    return join(builder, *(builder.call(fn, [ir.Constant(V8, None), ptr, h, ones, ir.Constant(I8, 4)])
                           for h in halves(builder, idx)))


def _sign_mask(builder, nibble):
    """Per lane, a nibble of sign bits -> 4 bytes, byte k 0xFF where bit k is set, else 0."""
    spread = builder.and_(builder.mul(nibble, splat(builder, ir.Constant(I32, 0x01010101))),
                          splat(builder, ir.Constant(I32, 0x08040201)))
    set_ = builder.icmp_unsigned("!=", builder.bitcast(spread, B64), ir.Constant(B64, None))
    return builder.sext(set_, B64)


def _quad_sign_mask(builder, sw, j):
    """_sign_mask of quad j's nibble of the sign word sw (bits 4 j..4 j + 3 of each lane), without its multiply: the
    lane's sign byte j // 2 copied to all 4 bytes (a byte shuffle) and each byte tested against its own bit."""
    rep = builder.shuffle_vector(builder.bitcast(sw, B64), ir.Constant(B64, ir.Undefined),
                                 ir.Constant(ir.VectorType(I32, 64), [4 * (i // 4) + j // 2 for i in range(64)]))
    bits = builder.and_(rep, ir.Constant(B64, [1 << (4 * (j % 2) + i % 4) for i in range(64)]))
    return builder.sext(builder.icmp_unsigned("!=", bits, ir.Constant(B64, None)), B64)


def _signed_x(builder, x32, mask):
    """The 4 activation bytes x32 (one i32, in every lane) with each byte negated where mask has 0xFF."""
    xb = builder.bitcast(splat(builder, x32), B64)
    return builder.bitcast(builder.sub(builder.xor(xb, mask), mask), V16)


@intrinsic(prefer_literal=True)
def _iq3_xxs_sb16(typingctx, fam, n, w, w_off, sp, sp_off, grid, x, x_off, x_stride, isum, out_off):
    """IQ3_XXS super-block, 16 rows (one quarter), against Q8_K activations, in integers:
    isum[j*ROWS + out_off + r] = sum over the 8 sub-blocks s of ls_rs * (grid values_rs . signed x_js).

    w: the quarter's 24 code words at w_off; sp: the scales as int16-pair bytes, pair t (sub-blocks 2t, 2t+1) at
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
            words = [_load(builder, wp, 2 * s), _load(builder, wp, 2 * s + 1)]
            sw = _load(builder, wp, 16 + s)
            grids, masks = [], []
            for j in range(8):
                k = j % 4
                idx = builder.and_(builder.lshr(words[j // 4], const(8 * k)) if k else words[j // 4], const(255))
                grids.append(_gather(builder, gp, idx))
                shift = 8 * (j // 2) + 4 * (j % 2)
                masks.append(_sign_mask(builder, builder.and_(builder.lshr(sw, const(shift)) if shift else sw,
                                                              const(15))))
            for jx, xp_ in enumerate(xps):
                pairs = [(grids[j], _signed_x(builder, _load(builder, xp_, 8 * s + j), masks[j])) for j in range(8)]
                accs[jx] = dot.scaled_dot(builder, accs[jx], pairs, 2 * 62 * 127, scale)
        for jx in range(n_x):
            _store_rows(context, builder, signature.args[10], ia, oo, jx, accs[jx])
        return context.get_dummy_value()

    return sig, codegen


def _signed_grid(builder, grid, mask):
    """64 + grid * sign per byte, as unsigned bytes (2..126): grid holds 64 + g (the table _GRID3_U), a minus sign
    (mask 0xFF) turns it into 128 - (64 + g)."""
    gb = builder.bitcast(grid, B64)
    neg = builder.sub(ir.Constant(B64, [128] * 64), gb)
    return builder.bitcast(builder.select(builder.trunc(mask, ir.VectorType(ir.IntType(1), 64)), neg, gb), V16)


@intrinsic(prefer_literal=True)
def _iq3_xxs_unpack16(typingctx, fam, w, w_off, grid, u, u_off):
    """One quarter's super-block (16 rows x 256 values) as unsigned bytes 64 + signed grid value, into u at u_off:
    64 logical registers, sub-block s's quad j at register 8 s + j. grid: the table _GRID3_U."""
    lits = _literals(fam)
    if lits is None:
        return None
    sig = types.void(fam, w, w_off, grid, u, u_off)

    def codegen(context, builder, signature, args):
        (_, wa, wo, ga, ua, uo) = args
        wp = data_ptr(context, builder, signature.args[1], wa, wo, V16)
        gp = data_ptr(context, builder, signature.args[3], ga, ir.Constant(I64, 0), I32)
        up = data_ptr(context, builder, signature.args[4], ua, uo, V16)

        def const(v):
            return splat(builder, ir.Constant(I32, v))

        for s in range(8):
            words = [_load(builder, wp, 2 * s), _load(builder, wp, 2 * s + 1)]
            sw = _load(builder, wp, 16 + s)
            for j in range(8):
                k = j % 4
                idx = builder.and_(builder.lshr(words[j // 4], const(8 * k)) if k else words[j // 4], const(255))
                builder.store(_signed_grid(builder, _gather(builder, gp, idx), _quad_sign_mask(builder, sw, j)),
                              builder.gep(up, [ir.Constant(I64, 8 * s + j)]), align=1)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic(prefer_literal=True)
def _u64_dot16(typingctx, fam, n, u, u_off, sp, sp_off, x, x_off, x_stride, xp, xp_off, xp_stride, isum, out_off):
    """16 rows' super-block, unpacked to unsigned bytes 64 + v (_iq3_xxs_unpack16), against n rows of Q8_K
    activations: isum[j*ROWS + out_off + r] = sum over s of ls_rs * (sum of (64 + v) x_j - 64 sum x_j). The offset
    comes off once per sub-block pair: the scale pair times the activations' pair of 32-sums (xp) in one 16-bit
    multiply-add, shifted by 6. Weights are the unsigned side, so the activations are the broadcast signed operand."""
    lits = _literals(fam, n)
    if lits is None:
        return None
    f, n_x = lits
    dot = _BYTE_DOTS[f]
    sig = types.void(fam, n, u, u_off, sp, sp_off, x, x_off, x_stride, xp, xp_off, xp_stride, isum, out_off)

    def codegen(context, builder, signature, args):
        (_, _, ua, uo, sa, so, xa, xo, xst, pa, po, pst, ia, oo) = args
        up = data_ptr(context, builder, signature.args[2], ua, uo, V16)
        scp = data_ptr(context, builder, signature.args[4], sa, so, B32)
        xps = _x_ptrs(context, builder, signature.args[6], xa, xo, xst, n_x)
        pps = _x_ptrs(context, builder, signature.args[9], pa, po, pst, n_x)
        const = [splat(builder, ir.Constant(I32, v)) for v in (0xFFFF, 16, 6)]
        accs = [ir.Constant(V16, None)] * n_x
        corr = [ir.Constant(V16, None)] * n_x
        for s in range(8):
            pair = builder.bitcast(builder.zext(_load(builder, scp, 4 * (s // 2)), W32), V16)
            scale = builder.and_(pair, const[0]) if s % 2 == 0 else builder.lshr(pair, const[1])
            ws = [builder.load(builder.gep(up, [ir.Constant(I64, 8 * s + j)]), align=1) for j in range(8)]
            for jx, xp_ in enumerate(xps):
                pairs = [(ws[j], splat(builder, _load(builder, xp_, 8 * s + j))) for j in range(8)]
                accs[jx] = dot.scaled_dot(builder, accs[jx], pairs, 2 * 126 * 128, scale)
                if s % 2:
                    corr[jx] = dot.word_dot(builder, corr[jx], pair, splat(builder, _load(builder, pps[jx], s // 2)))
        for jx in range(n_x):
            _store_rows(context, builder, signature.args[12], ia, oo, jx,
                        builder.sub(accs[jx], builder.shl(corr[jx], const[2])))
        return context.get_dummy_value()

    return sig, codegen


# ---------------------------------------------------------------------------------------------------------------
# packing
# ---------------------------------------------------------------------------------------------------------------

@njit(parallel=True, cache=True)
def pack_iq3_xxs(rows, qs, sc, d):
    """rows (N, nsb*98) -> qs (G, nsb, 4, 24, 16, 4), sc (G, nsb, 8, ROWS) (2 s + 1 as int16-pair bytes), d (G, nsb,
    ROWS). Block: d | qs[64] grid indices | 8 x u32 (sub-block ib: 4 x 7 sign bits, then its 4-bit scale)."""
    n = rows.shape[0]
    n_groups, nsb = qs.shape[0], qs.shape[1]
    for g in prange(n_groups):
        r_end = min(ROWS, n - g * ROWS)
        for b in range(nsb):
            o = b * 98
            for r in range(ROWS):
                rq, rr = r // QUARTER, r % QUARTER
                if r < r_end:
                    src = rows[g * ROWS + r]
                    d[g, b, r] = _f16_bits(src, o)
                    for w in range(16):
                        for jj in range(4):
                            qs[g, b, rq, w, rr, jj] = src[o + 2 + 4 * w + jj]
                    for s in range(8):
                        a = o + 66 + 4 * s
                        aux = np.uint32(src[a]) | (np.uint32(src[a + 1]) << 8) | (np.uint32(src[a + 2]) << 16) \
                            | (np.uint32(src[a + 3]) << 24)
                        _put_pair(sc, g, b, 0, s, r, np.uint8(2 * (aux >> 28) + 1))
                        for l in range(4):
                            qs[g, b, rq, 16 + s, rr, l] = _KSIGNS[(aux >> (7 * l)) & 127]
                else:
                    d[g, b, r] = 0
                    for s in range(8):
                        _put_pair(sc, g, b, 0, s, r, 0)
                    for w in range(24):
                        for jj in range(4):
                            qs[g, b, rq, w, rr, jj] = 0


# ---------------------------------------------------------------------------------------------------------------
# kernels over runs of activation rows that share an expert (portable.py's contract), built per family
# ---------------------------------------------------------------------------------------------------------------

@njit(inline="always")
def _grid_sb_out(a, isum, o, dsup, xd):
    for r in range(ROWS):
        a[r] += xd * dsup[r] * np.float32(0.25) * np.float32(isum[o + r])


def make_grid_runs(F: int) -> dict[str, tuple]:
    """{format name: (decode kernel, prefill kernel)} of the lattice-grid IQ formats for the family under F."""
    if F not in _BYTE_DOTS:
        raise KeyError(f"no byte multiplication registered under {F}")
    return {"IQ3_XXS": _make_iq3_xxs_runs(F)}


def _make_iq3_xxs_runs(F: int) -> tuple:
    """IQ3_XXS (decode, prefill) on Q8_K activations (xq, xd per 256; the pair sums xp are not needed)."""
    BLOCK = ROWS * 96  # one group's code words per super-block
    NX = 4  # activation rows per pass over the unpacked weights

    @njit(parallel=True, cache=True, fastmath=True)
    def iq3_xxs_runs(qs, sc, d, xq, xd, xp, run_start, run_expert, n_rows, out):
        n_groups, nsb = d.shape[1], d.shape[2]
        k = nsb * 256
        grid = _GRID3
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
                        _iq3_xxs_sb16(F, 1, qs, base + rq * 1536, sc, sb * 512 + rq * 32, grid, xq, m * k + b * 256,
                                      0, isum, rq * QUARTER)
                    _grid_sb_out(accf[m - m0], isum, 0, dsup, xd[m, b])
            _store_group(out, accf, g, m0, m1, n_rows)

    @njit(parallel=True, cache=True, fastmath=True)
    def iq3_xxs_runs_x4(qs, sc, d, xq, xd, xp, run_start, run_expert, n_rows, out):
        # the grid gathers are the cost: a run of several rows unpacks each super-block once, to bytes in L1, and
        # every row reads those
        n_groups, nsb = d.shape[1], d.shape[2]
        k = nsb * 256
        kp = k // 64
        grid, grid_u = _GRID3, _GRID3_U
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
                        _iq3_xxs_sb16(F, 1, qs, base + rq * 1536, sc, sb * 512 + rq * 32, grid, xq, m0 * k + b * 256,
                                      0, isum, rq * QUARTER)
                else:
                    for rq in range(4):
                        _iq3_xxs_unpack16(F, qs, base + rq * 1536, grid_u, u, rq * 4096)
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
                    _grid_sb_out(accf[m - m0], isum, (m - m0) * ROWS, dsup, xd[m, b])
            _store_group(out, accf, g, m0, m1, n_rows)

    return iq3_xxs_runs, iq3_xxs_runs_x4

"""IQ4_XS and IQ4_NL in the quads layout of the integer families (quads.py): packing and kernels.

Both formats store 4-bit indices into one non-linear codebook of 16 int8 levels (kvalues_iq4nl, quant/iq_grids.py).
IQ4_XS is Q4_K's structure with that codebook: super-blocks of 256 with a float16 d and a signed 6-bit scale per
sub-block of 32 (no mins); IQ4_NL is Q4_0's: blocks of 32 with one float16 scale. So they take the Q4_K / Q4_0
packing (nibbles as they are, 4 consecutive code bytes of a row per 32-bit lane) and, in the kernel, each register
of nibbles goes through a byte shuffle with the codebook as its table (vpshufb, one 16-entry table per 128-bit
lane), then into the family's byte dot, as llama.cpp's AVX2 and AVX-512 kernels do (ggml/src/ggml-cpu/arch/x86/
quants.c: ggml_vec_dot_iq4_xs_q8_K, ggml_vec_dot_iq4_nl_q8_0).

The byte dots multiply unsigned by signed bytes. The VNNI families (32-bit accumulation) look up the codebook plus
128 (1..241, unsigned) and take 128 * sum(x) off again: for IQ4_XS through a 16-bit multiply-add of the sub-block
scale pairs against the activations' pair sums, as Q4_K's mins; for IQ4_NL as Q4_0's offset. AVX2's vpmaddubsw adds
neighbouring products in 16 bits, where 2 * 241 * 127 would saturate, so it looks up the signed levels and uses
|w| against x * sign(w) (vpsignb), whose pair sums stay below 2 * 127 * 127 = 32258, widening each one.

Layouts (per expert; G groups of 64 rows, nsb super-blocks, nb blocks of 32):
  IQ4_XS codes (G, nsb, 4 quarters, 8 sub-blocks, 4 quads, 16 rows, 4 bytes): quad jq of sub-block s holds file
         bytes 16 s + 4 jq..+3 of the row's qs (low nibbles elements 32 s + 4 jq.., high ones 32 s + 16 + 4 jq..);
         scales (G, nsb, 8, ROWS) int8 (ls - 32) as int16-pair bytes (quads._put_pair); d (G, nsb, ROWS) f16 bits.
         138 bytes per 256 (the file: 136).
  IQ4_NL codes (G, nb, 4 quarters, 4 quads, 16 rows, 4 bytes) as Q4_0; d (G, nb, ROWS). 18 bytes per 32 as the file.
Activations: Q8_K for IQ4_XS (activations.py), Q8_0 for IQ4_NL, as llama.cpp rounds them for these formats.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

# numba caches a kernel by its own file only: when a helper imported here changes, this file must change too
from ..iq_grids import KVALUES_IQ4NL
from . import avx2, avx512vnni, avxvnni
from .avxvnni import abs_and_sign
from .portable import ROWS, _halves_to_float, _run_task, _store_group
from .quads import (
    _BYTE_DOTS,
    QUARTER,
    _f16_bits,
    _literals,
    _load,
    _put_pair,
    _q4_0_row_out,
    _store_rows,
    _x_ptrs,
)
from .simd import (
    B32,
    I8,
    I32,
    V8,
    V16,
    data_ptr,
    halves,
    intrinsic_fn,
    join,
    prefetch_ahead,
    splat,
)

__all__ = ["make_iq_runs", "pack_iq4_nl", "pack_iq4_xs"]

W32 = ir.VectorType(ir.IntType(16), 32)
B64 = ir.VectorType(I8, 64)

# Per family: the width of its byte shuffle, and whether its byte dot takes unsigned weights of up to 241 (the
# codebook plus 128) without saturating.
_SHUFFLE_BITS = {avx512vnni.KEY: 512, avxvnni.KEY: 256, avx2.KEY: 256}
_UNSIGNED = {avx512vnni.KEY: True, avxvnni.KEY: True, avx2.KEY: False}

_SIGNED_TABLE = [int(v) for v in KVALUES_IQ4NL]
_UNSIGNED_TABLE = [int(v) + 128 - 256 * (int(v) + 128 > 127) for v in KVALUES_IQ4NL]  # 1..241 as i8 bit patterns


def _lookup(builder, bits, table, idx):
    """table[idx] for every byte of a logical register of indices 0..15 (the codebook in each 128-bit lane)."""
    if bits == 512:
        fn = intrinsic_fn(builder, "llvm.x86.avx512.pshuf.b.512", B64, [B64, B64])
        res = builder.call(fn, [ir.Constant(B64, table * 4), builder.bitcast(idx, B64)])
        return builder.bitcast(res, V16)
    fn = intrinsic_fn(builder, "llvm.x86.avx2.pshuf.b", B32, [B32, B32])
    tab = ir.Constant(B32, table * 2)
    return join(builder, *(builder.bitcast(builder.call(fn, [tab, builder.bitcast(h, B32)]), V8)
                           for h in halves(builder, idx)))


def _levels(builder, fam, v):
    """The codebook levels of a register's low and high nibbles (unsigned or signed, per _UNSIGNED)."""
    low, four = splat(builder, ir.Constant(I32, 0x0F0F0F0F)), splat(builder, ir.Constant(I32, 4))
    table = _UNSIGNED_TABLE if _UNSIGNED[fam] else _SIGNED_TABLE
    return (_lookup(builder, _SHUFFLE_BITS[fam], table, builder.and_(v, low)),
            _lookup(builder, _SHUFFLE_BITS[fam], table, builder.and_(builder.lshr(v, four), low)))


def _pairs(builder, fam, ws, xs):
    """(weight, activation) registers for the family's unsigned-by-signed dot: as they are if the levels are
    unsigned, else (|w|, x * sign(w)) (avxvnni.abs_and_sign on each 256-bit half)."""
    out = []
    for w, x in zip(ws, xs):
        x = splat(builder, x)
        if _UNSIGNED[fam]:
            out.append((w, x))
            continue
        parts = [abs_and_sign(builder, wh, xh) for wh, xh in zip(halves(builder, w), halves(builder, x))]
        out.append(tuple(join(builder, builder.bitcast(parts[0][i], V8), builder.bitcast(parts[1][i], V8))
                         for i in range(2)))
    return out


def _bound(fam):
    return 2 * 241 * 127 if _UNSIGNED[fam] else 2 * 127 * 127


@intrinsic(prefer_literal=True)
def _iq4_xs_sb16(typingctx, fam, n, w, w_off, sp, sp_off, x, x_off, x_stride, xp, xp_off, xp_stride, isum, osum,
                 out_off):
    """IQ4_XS super-block, 16 rows (one quarter), against Q8_K activations, in integers:
    isum[j*ROWS + out_off + r] = sum over the 8 sub-blocks s of ls_rs * (levels_rs . x_js) and, for unsigned levels
    (codebook + 128), osum[...] = sum over s of ls_rs * (sum of x_js), so the super-block's sum is
    d * xd * (isum - 128 osum); for signed levels osum is 0.

    w: the quarter's codes at w_off (sub-block s, quad jq at + (4 s + jq) * 64 bytes); sp: the scales as int16-pair
    bytes, pair t (sub-blocks 2t, 2t+1) at sp_off + 128 t; xp: each activation row's sums per 32 as int16 pairs
    (activations.py `pairs`) from xp_off + j*xp_stride."""
    lits = _literals(fam, n)
    if lits is None:
        return None
    f, n_x = lits
    dot = _BYTE_DOTS[f]
    sig = types.void(fam, n, w, w_off, sp, sp_off, x, x_off, x_stride, xp, xp_off, xp_stride, isum, osum, out_off)

    def codegen(context, builder, signature, args):
        (_, _, wa, wo, sa, so, xa, xo, xst, pa, po, pst, ia, oa, oo) = args
        wp = data_ptr(context, builder, signature.args[2], wa, wo, V16)
        scp = data_ptr(context, builder, signature.args[4], sa, so, B32)
        xps = _x_ptrs(context, builder, signature.args[6], xa, xo, xst, n_x)
        pps = _x_ptrs(context, builder, signature.args[9], pa, po, pst, n_x)
        sixteen = splat(builder, ir.Constant(I32, 16))
        accs = [ir.Constant(V16, None)] * n_x
        offs = [ir.Constant(V16, None)] * n_x
        for t in range(4):
            sc_pair = builder.bitcast(builder.sext(_load(builder, scp, 4 * t), W32), V16)
            scales = (builder.ashr(builder.shl(sc_pair, sixteen), sixteen), builder.ashr(sc_pair, sixteen))
            for half in range(2):
                s = 2 * t + half
                levels = [_levels(builder, f, _load(builder, wp, 4 * s + jq)) for jq in range(4)]
                ws = [lv[0] for lv in levels] + [lv[1] for lv in levels]
                for j, xp_ in enumerate(xps):
                    xs = [_load(builder, xp_, 8 * s + i) for i in range(8)]
                    accs[j] = dot.scaled_dot(builder, accs[j], _pairs(builder, f, ws, xs), _bound(f), scales[half])
            if _UNSIGNED[f]:
                for j, pp in enumerate(pps):
                    offs[j] = dot.word_dot(builder, offs[j], sc_pair, splat(builder, _load(builder, pp, t)))
        for j in range(n_x):
            _store_rows(context, builder, signature.args[12], ia, oo, j, accs[j])
            _store_rows(context, builder, signature.args[13], oa, oo, j, offs[j])
        return context.get_dummy_value()

    return sig, codegen


@intrinsic(prefer_literal=True)
def _iq4_nl_dot16(typingctx, fam, n, w, w_off, x, x_off, x_stride, out, out_off):
    """IQ4_NL block, 16 rows: out[j*ROWS + out_off + r] = sum_i level_ri * x_(row j, i) over the block's 32 codes,
    the levels unsigned (codebook + 128: the caller takes 128 * sum(x) off) or signed, per _UNSIGNED."""
    lits = _literals(fam, n)
    if lits is None:
        return None
    f, n_x = lits
    dot = _BYTE_DOTS[f]
    sig = types.void(fam, n, w, w_off, x, x_off, x_stride, out, out_off)

    def codegen(context, builder, signature, args):
        _, _, wa, wo, xa, xo, xst, oa, oo = args
        wp = data_ptr(context, builder, signature.args[2], wa, wo, V16)
        levels = [_levels(builder, f, _load(builder, wp, jq)) for jq in range(4)]
        ws = [lv[0] for lv in levels] + [lv[1] for lv in levels]
        for j, xp in enumerate(_x_ptrs(context, builder, signature.args[4], xa, xo, xst, n_x)):
            xs = [_load(builder, xp, i) for i in range(8)]
            _store_rows(context, builder, signature.args[7], oa, oo, j,
                        dot.dot(builder, ir.Constant(V16, None), _pairs(builder, f, ws, xs), _bound(f)))
        return context.get_dummy_value()

    return sig, codegen


# ---------------------------------------------------------------------------------------------------------------
# packing: file rows -> quarters of quads
# ---------------------------------------------------------------------------------------------------------------

@njit(parallel=True, cache=True)
def pack_iq4_xs(rows, qs, sc, d):
    """rows (N, nsb*136) -> qs (G, nsb, 4, 8, 4, 16, 4), sc (G, nsb, 8, ROWS) (ls - 32 as int16-pair bytes), d (G,
    nsb, ROWS). Block layout: ggml-common.h block_iq4_xs (d, scales_h, scales_l[4], qs[128]) and
    dequantize_row_iq4_xs (sub-block ib's 6-bit scale: nibble ib % 2 of scales_l[ib / 2], high bits 2 ib of
    scales_h; its 16 qs bytes at 16 ib: low nibbles elements 0-15, high ones 16-31)."""
    n = rows.shape[0]
    n_groups, nsb = qs.shape[0], qs.shape[1]
    for g in prange(n_groups):
        r_end = min(ROWS, n - g * ROWS)
        for b in range(nsb):
            o = b * 136
            for r in range(ROWS):
                rq, rr = r // QUARTER, r % QUARTER
                if r < r_end:
                    src = rows[g * ROWS + r]
                    d[g, b, r] = _f16_bits(src, o)
                    sh = np.int32(_f16_bits(src, o + 2))
                    for s in range(8):
                        ls = ((np.int32(src[o + 4 + s // 2]) >> (4 * (s % 2))) & 15) | (((sh >> (2 * s)) & 3) << 4)
                        _put_pair(sc, g, b, 0, s, r, np.uint8((ls - 32) & 255))
                    for s in range(8):
                        for jq in range(4):
                            for jj in range(4):
                                qs[g, b, rq, s, jq, rr, jj] = src[o + 8 + 16 * s + 4 * jq + jj]
                else:
                    d[g, b, r] = 0
                    for s in range(8):
                        _put_pair(sc, g, b, 0, s, r, 0)
                        for jq in range(4):
                            for jj in range(4):
                                qs[g, b, rq, s, jq, rr, jj] = 0


@njit(parallel=True, cache=True)
def pack_iq4_nl(rows, qs, d):
    """rows (N, nb*18) -> qs (G, nb, 4, 4, 16, 4), d (G, nb, ROWS) f16 bits; pad rows have scale 0."""
    n = rows.shape[0]
    n_groups, nb = qs.shape[0], qs.shape[1]
    for g in prange(n_groups):
        r_end = min(ROWS, n - g * ROWS)
        for b in range(nb):
            o = b * 18
            for r in range(ROWS):
                rq, rr = r // QUARTER, r % QUARTER
                live = r < r_end
                d[g, b, r] = _f16_bits(rows[g * ROWS + r], o) if live else 0
                for jq in range(4):
                    for jj in range(4):
                        qs[g, b, rq, jq, rr, jj] = rows[g * ROWS + r, o + 2 + 4 * jq + jj] if live else 0


# ---------------------------------------------------------------------------------------------------------------
# kernels over runs of activation rows that share an expert (portable.py's contract), built per family
# ---------------------------------------------------------------------------------------------------------------

@njit(inline="always")
def _iq4_xs_sb_out(a, isum, osum, o, dsup, xd, offset):
    for r in range(ROWS):
        a[r] += xd * dsup[r] * np.float32(np.int32(isum[o + r] - offset * osum[o + r]))


def make_iq_runs(F: int) -> dict[str, tuple]:
    """{format name: (decode kernel, prefill kernel)} of the IQ formats for the family registered under F."""
    if F not in _BYTE_DOTS or F not in _UNSIGNED:
        raise KeyError(f"no byte multiplication and shuffle registered under {F}")
    return {"IQ4_XS": _make_iq4_xs_runs(F), "IQ4_NL": _make_iq4_nl_runs(F)}


def _make_iq4_xs_runs(F: int) -> tuple:
    """IQ4_XS (decode, prefill) on Q8_K activations (xq, xd per 256, xp the pair sums per 64): each super-block summed
    in integers (_iq4_xs_sb16), then a[r] += xd * d_r * (isum_r - OFFSET osum_r)."""
    OFFSET = 128 if _UNSIGNED[F] else 0
    BLOCK = ROWS * 128  # one group's codes per super-block

    @njit(parallel=True, cache=True, fastmath=True)
    def iq4_xs_runs(qs, sc, d, xq, xd, xp, run_start, run_expert, n_rows, out):
        n_groups, nsb = d.shape[1], d.shape[2]
        k = nsb * 256
        for task in prange(run_expert.shape[0] * n_groups):
            g, e, m0, m1 = _run_task(task, n_groups, run_start, run_expert)
            accf = np.zeros((m1 - m0, ROWS), np.float32)
            dsup = np.empty(ROWS, np.float32)
            isum = np.empty(ROWS, np.int32)
            osum = np.empty(ROWS, np.int32)
            for b in range(nsb):
                _halves_to_float(d[e, g, b], dsup)
                sb = (e * n_groups + g) * nsb + b
                base = sb * BLOCK
                prefetch_ahead(qs, base, BLOCK)
                for m in range(m0, m1):
                    for rq in range(4):
                        _iq4_xs_sb16(F, 1, qs, base + rq * 2048, sc, sb * 512 + rq * 32, xq, m * k + b * 256, 0,
                                     xp, m * (k // 64) + b * 4, 0, isum, osum, rq * QUARTER)
                    _iq4_xs_sb_out(accf[m - m0], isum, osum, 0, dsup, xd[m, b], OFFSET)
            _store_group(out, accf, g, m0, m1, n_rows)

    @njit(parallel=True, cache=True, fastmath=True)
    def iq4_xs_runs_x4(qs, sc, d, xq, xd, xp, run_start, run_expert, n_rows, out):
        n_groups, nsb = d.shape[1], d.shape[2]
        k = nsb * 256
        for task in prange(run_expert.shape[0] * n_groups):
            g, e, m0, m1 = _run_task(task, n_groups, run_start, run_expert)
            accf = np.zeros((m1 - m0, ROWS), np.float32)
            dsup = np.empty(ROWS, np.float32)
            isum = np.empty(4 * ROWS, np.int32)
            osum = np.empty(4 * ROWS, np.int32)
            for b in range(nsb):
                _halves_to_float(d[e, g, b], dsup)
                sb = (e * n_groups + g) * nsb + b
                base = sb * BLOCK
                m = m0
                while m < m1:
                    n_x = 4 if m + 4 <= m1 else 1
                    for rq in range(4):
                        if n_x == 4:
                            _iq4_xs_sb16(F, 4, qs, base + rq * 2048, sc, sb * 512 + rq * 32, xq, m * k + b * 256,
                                         k, xp, m * (k // 64) + b * 4, k // 64, isum, osum, rq * QUARTER)
                        else:
                            _iq4_xs_sb16(F, 1, qs, base + rq * 2048, sc, sb * 512 + rq * 32, xq, m * k + b * 256,
                                         0, xp, m * (k // 64) + b * 4, 0, isum, osum, rq * QUARTER)
                    for j in range(n_x):
                        _iq4_xs_sb_out(accf[m + j - m0], isum, osum, j * ROWS, dsup, xd[m + j, b], OFFSET)
                    m += n_x
            _store_group(out, accf, g, m0, m1, n_rows)

    return iq4_xs_runs, iq4_xs_runs_x4


def _make_iq4_nl_runs(F: int) -> tuple:
    """IQ4_NL (decode, prefill) on Q8_0 activations (xq, xd and xs per 32): a[r] += d_r xd (isum_r - OFFSET xs)."""
    OFFSET = 128 if _UNSIGNED[F] else 0
    BLOCK = ROWS * 16

    @njit(parallel=True, cache=True, fastmath=True)
    def iq4_nl_runs(qs, d, xq, xd, xs, run_start, run_expert, n_rows, out):
        n_groups, nb = d.shape[1], d.shape[2]
        k = nb * 32
        for task in prange(run_expert.shape[0] * n_groups):
            g, e, m0, m1 = _run_task(task, n_groups, run_start, run_expert)
            accf = np.zeros((m1 - m0, ROWS), np.float32)
            ds = np.empty(ROWS, np.float32)
            isum = np.empty(ROWS, np.int32)
            for b in range(nb):
                _halves_to_float(d[e, g, b], ds)
                base = ((e * n_groups + g) * nb + b) * BLOCK
                prefetch_ahead(qs, base, BLOCK)
                for m in range(m0, m1):
                    for rq in range(4):
                        _iq4_nl_dot16(F, 1, qs, base + rq * 256, xq, m * k + b * 32, 0, isum, rq * QUARTER)
                    _q4_0_row_out(accf[m - m0], isum, 0, ds, xd[m, b], OFFSET * xs[m, b])
            _store_group(out, accf, g, m0, m1, n_rows)

    @njit(parallel=True, cache=True, fastmath=True)
    def iq4_nl_runs_x4(qs, d, xq, xd, xs, run_start, run_expert, n_rows, out):
        n_groups, nb = d.shape[1], d.shape[2]
        k = nb * 32
        for task in prange(run_expert.shape[0] * n_groups):
            g, e, m0, m1 = _run_task(task, n_groups, run_start, run_expert)
            accf = np.zeros((m1 - m0, ROWS), np.float32)
            ds = np.empty(ROWS, np.float32)
            isum = np.empty(4 * ROWS, np.int32)
            for b in range(nb):
                _halves_to_float(d[e, g, b], ds)
                base = ((e * n_groups + g) * nb + b) * BLOCK
                m = m0
                while m + 4 <= m1:
                    for rq in range(4):
                        _iq4_nl_dot16(F, 4, qs, base + rq * 256, xq, m * k + b * 32, k, isum, rq * QUARTER)
                    for j in range(4):
                        _q4_0_row_out(accf[m + j - m0], isum, j * ROWS, ds, xd[m + j, b], OFFSET * xs[m + j, b])
                    m += 4
                while m < m1:
                    for rq in range(4):
                        _iq4_nl_dot16(F, 1, qs, base + rq * 256, xq, m * k + b * 32, 0, isum, rq * QUARTER)
                    _q4_0_row_out(accf[m - m0], isum, 0, ds, xd[m, b], OFFSET * xs[m, b])
                    m += 1
            _store_group(out, accf, g, m0, m1, n_rows)

    return iq4_nl_runs, iq4_nl_runs_x4

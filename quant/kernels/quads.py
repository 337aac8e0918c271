"""The packed layout of the integer kernel families (AVX-512 VNNI, AVX-VNNI, AVX2) and their kernels, written once.

Why this layout: a matvec that walks one weight row at a time spends its time on horizontal sums; here rows are
grouped ROWS = 64 at a time and each group is cut into 4 quarters of 16 rows. Within a quarter, each 32-bit lane
holds 4 consecutive code bytes of one row (a "quad"), so one logical register (simd.py) holds quad jq of 16 rows and
one multiply-add instruction serves 16 rows against 4 broadcast activation bytes, every row keeping its own lane:
  Q4_0  (G, nb, 4 quarters, 4 quads, 16 rows, 4 bytes)   low nibbles are elements 4jq..4jq+3, high ones 16+4jq..
  Q8_0  (G, nb, 4 quarters, 8 quads, 16 rows, 4 bytes)   int8 codes 4jq..4jq+3
  Q4_K  (G, nsb, 4 chunks, 4 quarters, 8 quads, 16 rows, 4 bytes)  chunk c: low nibbles sub-block 2c, high 2c+1
  Q5_K  (G, nsb, 5 chunks, ...)  as Q4_K, chunk 4 holds the 32 bytes of high bits (bit 2c: sub-block 2c, 2c+1: 2c+1)
  Q6_K  (G, nsb, 8 chunks, 4 quarters, 6 quads, 16 rows, 4 bytes)  see pack_q6_k; 210 bytes per 256 as in the file
  Q2_K  (G, nsb, 4 quarters, 16 quads, 16 rows, 4 bytes)  the file's 2-bit codes as they are (4 quads per word, one
        shift apart; _k23_sb16); with the file's scale bytes as int16 pairs, 84 bytes per 256 as in the file
  Q3_K  (G, nsb, 4 quarters, 8 pairs, 3 words, 16 rows, 4 bytes)  8 3-bit codes in 3 bytes (pack_q3_k); 114 bytes
        per 256 with the scales as int16 pairs (the file: 110)
Scales are the arrays of portable.py (f16 bits, and for Q4_K/Q5_K the unpacked 6-bit scales and mins). Packed
weights are the file's size but for K-quant scales unpacked to a byte each (Q4_K 148 bytes per 256, Q5_K 180).

A family is one module (avx512vnni.py, avxvnni.py, avx2.py) that says how to multiply unsigned by signed bytes
(simd.ByteDot) and registers it under its key; make_runs(key) then builds this module's kernels for it. The
intrinsics below take that key as a compile-time literal, so each family gets its own compiled (and cached) kernels
from the one source. Codes are unsigned (nibbles 0..15, Q5 0..31, Q6 0..63, Q2 0..3, Q3 0..7) against signed int8
activations, so the ggml offsets (-8, -16, -32, Q3_K's -4) come off as offset * sum(x) per block; Q8_0 codes are signed on both sides and each
family has its own trick for that (signed_dot). Every sum stays far inside int32.

Shapes are checked by the caller (quant/kernels/__init__.py) before anything here runs; an intrinsic that reads past
a buffer kills the process.

One file of about 900 lines because numba caches a kernel by its own file only: the intrinsics, the packers that fix
the layout they read, and the run kernels that inline them must change together for a change to recompile them.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

# numba caches a kernel by its own file only: when the code of a helper imported here changes, this file must change
# too, or the cached kernels keep the old helper
from .portable import ROWS, _halves_to_float, _run_task, _store_group
from .simd import I8, I16, I32, I64, V16, ByteDot, data_ptr, prefetch_ahead, splat

B16 = ir.VectorType(I8, 16)  # one scale byte for each of a quarter's 16 rows
B32 = ir.VectorType(I8, 32)  # one min pair (2 bytes) for each of 16 rows
W32 = ir.VectorType(I16, 32)  # ... widened to 16 bits

__all__ = ["QUARTER", "make_runs", "pack_q2_k", "pack_q3_k", "pack_q4_0", "pack_q4_k", "pack_q5_k", "pack_q6_k",
           "pack_q8_0", "register"]

QUARTER = 16  # rows per logical register

_BYTE_DOTS: dict[int, ByteDot] = {}


def register(key: int, byte_dot: ByteDot) -> None:
    """Make a family's byte multiplication available to the intrinsics under `key` (simd.family_key)."""
    _BYTE_DOTS[key] = byte_dot


def _literals(*tys):
    """The values of compile-time literal arguments, or None while numba first types them as plain integers."""
    if not all(isinstance(t, types.IntegerLiteral) for t in tys):
        return None
    return [t.literal_value for t in tys]


def _x_ptrs(context, builder, aryty, xa, xo, xst, n):
    """Pointers (as 32-bit words) to the activations of n rows: x_off, x_off + x_stride, ..."""
    return [data_ptr(context, builder, aryty, xa, builder.add(xo, builder.mul(xst, ir.Constant(xst.type, j))), I32)
            for j in range(n)]


def _load(builder, ptr, i):
    return builder.load(builder.gep(ptr, [ir.Constant(I64, i)]), align=1)


def _store_rows(context, builder, aryty, oa, oo, j, acc):
    """Row j's 16 sums to out[j * ROWS + out_off ...] (each activation row owns ROWS entries of out)."""
    builder.store(acc, data_ptr(context, builder, aryty, oa, builder.add(oo, ir.Constant(oo.type, ROWS * j)), V16),
                  align=4)


# ---------------------------------------------------------------------------------------------------------------
# intrinsics: one block (or chunk) of 16 rows against n activation rows (n = 1 for decode, 4 for prefill, where each
# weight register is loaded and unpacked once for all of them)
# ---------------------------------------------------------------------------------------------------------------

@intrinsic(prefer_literal=True)
def _nibble_dot16(typingctx, fam, n, w, w_off, x, x_off, x_stride, out, out_off):
    """Q4_0 block, 16 rows: out[j*ROWS + out_off + r] = sum_i q_ri * x_(row j, i) over the block's 32 codes.

    w: uint8, 4 quads x 16 rows x 4 bytes from w_off; x: int8, each row's 32 activations from x_off + j*x_stride."""
    lits = _literals(fam, n)
    if lits is None:
        return None
    dot, n_x = _BYTE_DOTS[lits[0]], lits[1]
    sig = types.void(fam, n, w, w_off, x, x_off, x_stride, out, out_off)

    def codegen(context, builder, signature, args):
        _, _, wa, wo, xa, xo, xst, oa, oo = args
        wp = data_ptr(context, builder, signature.args[2], wa, wo, V16)
        low, four = splat(builder, ir.Constant(I32, 0x0F0F0F0F)), splat(builder, ir.Constant(I32, 4))
        nib = []
        for jq in range(4):
            v = _load(builder, wp, jq)
            nib.append((builder.and_(v, low), builder.and_(builder.lshr(v, four), low)))
        for j, xp in enumerate(_x_ptrs(context, builder, signature.args[4], xa, xo, xst, n_x)):
            pairs = [(nib[jq][0], splat(builder, _load(builder, xp, jq))) for jq in range(4)]
            pairs += [(nib[jq][1], splat(builder, _load(builder, xp, 4 + jq))) for jq in range(4)]
            _store_rows(context, builder, signature.args[7], oa, oo, j,
                        dot.dot(builder, ir.Constant(V16, None), pairs, 2 * 15 * 127))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic(prefer_literal=True)
def _kquant_sb16(typingctx, fam, bits, n, w, w_off, sm, sc_off, mn_off, x, x_off, x_stride, xp, xp_off, xp_stride,
                 isum, msum, out_off):
    """Q4_K/Q5_K super-block, 16 rows (one quarter), against Q8_K activations (activations.py), in integers:
    isum[j*ROWS + out_off + r] = sum over sub-blocks s of scale_rs * (codes_rs . x_js) and
    msum[...] = sum over s of min_rs * (sum of x_js), for n activation rows j.

    w: the quarter's codes of chunk 0 at w_off (chunk c at + c*2048 bytes; Q5_K's high bits at + 8192);
    sm: the super-block's unpacked scales (scale s of the quarter's 16 rows at sc_off + 64 s) and its mins as int16
    pairs (pair p at mn_off + 128 p: per row, the bytes of mins 2p and 2p+1); xp: each activation row's pair sums
    (activations.py) from xp_off + j*xp_stride."""
    lits = _literals(fam, bits, n)
    if lits is None:
        return None
    dot, q_bits, n_x = _BYTE_DOTS[lits[0]], lits[1], lits[2]
    sig = types.void(fam, bits, n, w, w_off, sm, sc_off, mn_off, x, x_off, x_stride, xp, xp_off, xp_stride,
                     isum, msum, out_off)

    def codegen(context, builder, signature, args):
        (_, _, _, wa, wo, sa, so, mo, xa, xo, xst, pa, po, pst, ia, ma, oo) = args
        wp = data_ptr(context, builder, signature.args[3], wa, wo, V16)
        sp = data_ptr(context, builder, signature.args[5], sa, so, B16)
        mp = data_ptr(context, builder, signature.args[5], sa, mo, B32)
        xps = _x_ptrs(context, builder, signature.args[8], xa, xo, xst, n_x)
        pps = _x_ptrs(context, builder, signature.args[11], pa, po, pst, n_x)
        low, four = splat(builder, ir.Constant(I32, 0x0F0F0F0F)), splat(builder, ir.Constant(I32, 4))
        bit = splat(builder, ir.Constant(I32, 0x01010101))
        bound = 2 * ((1 << q_bits) - 1) * 127
        accs = [ir.Constant(V16, None)] * n_x
        for c in range(4):
            codes = []
            for jq in range(8):
                v = _load(builder, wp, c * 32 + jq)
                q_lo, q_hi = builder.and_(v, low), builder.and_(builder.lshr(v, four), low)
                if q_bits == 5:
                    h = _load(builder, wp, 128 + jq)
                    lo_bit = builder.lshr(h, splat(builder, ir.Constant(I32, 2 * c))) if c else h
                    hi_bit = builder.lshr(h, splat(builder, ir.Constant(I32, 2 * c + 1)))
                    q_lo = builder.or_(q_lo, builder.shl(builder.and_(lo_bit, bit), four))
                    q_hi = builder.or_(q_hi, builder.shl(builder.and_(hi_bit, bit), four))
                codes.append((q_lo, q_hi))
            sc_lo = builder.zext(_load(builder, sp, 8 * c), V16)
            sc_hi = builder.zext(_load(builder, sp, 8 * c + 4), V16)
            for j, xp_ in enumerate(xps):
                accs[j] = dot.scaled_dot(builder, accs[j], [(codes[jq][0], splat(builder, _load(builder, xp_, 16 * c + jq)))
                                                            for jq in range(8)], bound, sc_lo)
                accs[j] = dot.scaled_dot(builder, accs[j], [(codes[jq][1], splat(builder, _load(builder, xp_, 16 * c + 8 + jq)))
                                                            for jq in range(8)], bound, sc_hi)
        mins = [builder.bitcast(builder.zext(_load(builder, mp, 4 * p), W32), V16) for p in range(4)]
        for j, pp in enumerate(pps):
            m = ir.Constant(V16, None)
            for p in range(4):
                m = dot.word_dot(builder, m, mins[p], splat(builder, _load(builder, pp, p)))
            _store_rows(context, builder, signature.args[14], ia, oo, j, accs[j])
            _store_rows(context, builder, signature.args[15], ma, oo, j, m)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic(prefer_literal=True)
def _q6_sb16(typingctx, fam, n, w, w_off, sp, sp_off, x, x_off, x_stride, xp, xp_off, xp_stride, isum, osum, out_off):
    """Q6_K super-block, 16 rows (one quarter), against Q8_K activations, in integers:
    isum[j*ROWS + out_off + r] = sum over the 16 sub-blocks s of scale_rs * (codes_rs . x_js), codes 0..63, and
    osum[...] = sum over s of scale_rs * (sum of x_js), so that the super-block's sum is d * xd * (isum - 32 osum).

    w: chunk 0 of the quarter at w_off (chunk t, codes 32t..32t+31, at + 1536 t bytes: 4 nibble quads, then 2 quads
    of 2-bit highs, pack_q6_k); sp: int8 scales as int16-pair bytes, pair t (sub-blocks 2t, 2t+1) at sp_off + 128 t;
    xp: each activation row's per-16 sums as int16 pairs (activations.py) from xp_off + j*xp_stride."""
    lits = _literals(fam, n)
    if lits is None:
        return None
    dot, n_x = _BYTE_DOTS[lits[0]], lits[1]
    sig = types.void(fam, n, w, w_off, sp, sp_off, x, x_off, x_stride, xp, xp_off, xp_stride, isum, osum, out_off)

    def codegen(context, builder, signature, args):
        (_, _, wa, wo, sa, so, xa, xo, xst, pa, po, pst, ia, oa, oo) = args
        wp = data_ptr(context, builder, signature.args[2], wa, wo, V16)
        scp = data_ptr(context, builder, signature.args[4], sa, so, B32)
        xps = _x_ptrs(context, builder, signature.args[6], xa, xo, xst, n_x)
        pps = _x_ptrs(context, builder, signature.args[9], pa, po, pst, n_x)
        low4 = splat(builder, ir.Constant(I32, 0x0F0F0F0F))
        low2 = splat(builder, ir.Constant(I32, 0x03030303))
        sixteen = splat(builder, ir.Constant(I32, 16))

        def shifted(v, k):
            return builder.lshr(v, splat(builder, ir.Constant(I32, k))) if k else v

        def up4(v):
            return builder.shl(v, splat(builder, ir.Constant(I32, 4)))

        accs = [ir.Constant(V16, None)] * n_x
        offs = [ir.Constant(V16, None)] * n_x
        for t in range(8):
            highs = [_load(builder, wp, 24 * t + 4 + i) for i in range(2)]
            codes = []
            for jq in range(4):
                v, h = _load(builder, wp, 24 * t + jq), highs[jq % 2]
                codes.append((builder.or_(builder.and_(v, low4), up4(builder.and_(shifted(h, 2 * (jq // 2)), low2))),
                              builder.or_(builder.and_(shifted(v, 4), low4),
                                          up4(builder.and_(shifted(h, 4 + 2 * (jq // 2)), low2)))))
            sc_pair = builder.bitcast(builder.sext(_load(builder, scp, 4 * t), W32), V16)
            sc_lo = builder.ashr(builder.shl(sc_pair, sixteen), sixteen)
            sc_hi = builder.ashr(sc_pair, sixteen)
            for j, (xp_, pp) in enumerate(zip(xps, pps)):
                accs[j] = dot.scaled_dot(builder, accs[j], [(codes[jq][0], splat(builder, _load(builder, xp_, 8 * t + jq)))
                                                            for jq in range(4)], 2 * 63 * 127, sc_lo)
                accs[j] = dot.scaled_dot(builder, accs[j], [(codes[jq][1], splat(builder, _load(builder, xp_, 8 * t + 4 + jq)))
                                                            for jq in range(4)], 2 * 63 * 127, sc_hi)
                offs[j] = dot.word_dot(builder, offs[j], sc_pair, splat(builder, _load(builder, pp, t)))
        for j in range(n_x):
            _store_rows(context, builder, signature.args[12], ia, oo, j, accs[j])
            _store_rows(context, builder, signature.args[13], oa, oo, j, offs[j])
        return context.get_dummy_value()

    return sig, codegen


@intrinsic(prefer_literal=True)
def _k23_sb16(typingctx, fam, bits, n, w, w_off, sp, sp_off, x, x_off, x_stride, xp, xp_off, xp_stride, isum, osum,
              out_off):
    """Q2_K (bits = 2) or Q3_K (bits = 3) super-block, 16 rows (one quarter), against Q8_K activations, in integers:
    isum[j*ROWS + out_off + r] = sum over the 16 sub-blocks s of scale_rs * (codes_rs . x_js), codes unsigned (0..3,
    Q3_K 0..7), and osum[...] = sum over s of m_rs * (sum of x_js), where m is Q2_K's min and Q3_K's scale (its
    offset of 4 comes off as 4 osum).

    w: the quarter's codes at w_off. Q2_K: 16 quads (quad q = 8 h + i: byte l of row r is the file's qs byte
    32 h + 4 i + l, whose bits 2 p..2 p+1 hold element 128 h + 32 p + 4 i + l), so one shift and one mask give the
    codes of 4 consecutive elements, and sub-block pair t = 4 h + p takes quads 8 h .. 8 h + 7 at shift 2 p. Q3_K:
    pair t (elements 32 t..32 t+31) in quads 3 t..3 t+2, 8 codes of 3 bits per 3 bytes (pack_q3_k).
    sp: the scales as int16-pair bytes, pair t (sub-blocks 2t, 2t+1) at sp_off + 128 t: Q2_K the file's bytes (scale
    in the low nibble, min in the high one), Q3_K int8 scales; xp: each activation row's per-16 sums as int16 pairs
    (activations.py) from xp_off + j*xp_stride."""
    lits = _literals(fam, bits, n)
    if lits is None:
        return None
    dot, q_bits, n_x = _BYTE_DOTS[lits[0]], lits[1], lits[2]
    sig = types.void(fam, bits, n, w, w_off, sp, sp_off, x, x_off, x_stride, xp, xp_off, xp_stride, isum, osum,
                     out_off)

    def codegen(context, builder, signature, args):
        (_, _, _, wa, wo, sa, so, xa, xo, xst, pa, po, pst, ia, oa, oo) = args
        wp = data_ptr(context, builder, signature.args[3], wa, wo, V16)
        scp = data_ptr(context, builder, signature.args[5], sa, so, B32)
        xps = _x_ptrs(context, builder, signature.args[7], xa, xo, xst, n_x)
        pps = _x_ptrs(context, builder, signature.args[10], pa, po, pst, n_x)

        def const(v):
            return splat(builder, ir.Constant(I32, v))

        bound = 2 * ((1 << q_bits) - 1) * 127
        quads_ = [_load(builder, wp, q) for q in range(24 if q_bits == 3 else 16)]
        if q_bits == 2:
            # fewer shifts (the VNNI families' bottleneck): codes at shift 2 and 6 are read in place as 4 x code
            # (mask 0x0C; their sub-block sums still fit int16) and summed apart, those at 4 and 6 from one shift by
            # 4; the mins likewise as 16 x min
            quads4 = [builder.lshr(v, const(4)) for v in quads_]
        accs = [ir.Constant(V16, None)] * n_x
        accs4 = [ir.Constant(V16, None)] * n_x
        offs = [ir.Constant(V16, None)] * n_x
        for t in range(8):
            h, p = divmod(t, 4)
            codes = []
            if q_bits == 2:
                for i in range(8):
                    v = quads_[8 * h + i]
                    codes.append(builder.and_(quads4[8 * h + i] if p >= 2 else v,
                                              const(0x0C0C0C0C if p % 2 else 0x03030303)))
            else:  # pack_q3_k: quads 0-5 are the 3-bit fields of the pair's three words, 6 and 7 split over them
                b0, b1, b2 = quads_[3 * t:3 * t + 3]
                seven = const(0x07070707)
                for v in (b0, b1, b2):
                    codes += [builder.and_(v, seven), builder.and_(builder.lshr(v, const(3)), seven)]
                for v, k in ((b0, 4), (b1, 5)):
                    codes.append(builder.or_(builder.and_(builder.lshr(v, const(6)), const(0x03030303)),
                                             builder.and_(builder.lshr(b2, const(k)), const(0x04040404))))
            raw = _load(builder, scp, 4 * t)
            if q_bits == 2:
                w16 = builder.bitcast(builder.zext(raw, W32), V16)
                sc_pair = builder.and_(w16, const(0x000F000F))
                m_pair = builder.and_(w16, const(0x00F000F0))
            else:
                sc_pair = m_pair = builder.bitcast(builder.sext(raw, W32), V16)
            times4 = q_bits == 2 and p % 2 == 1
            first = 32 * h + 8 * p if q_bits == 2 else 8 * t  # the activation word of quad 0
            for j, (xp_, pp) in enumerate(zip(xps, pps)):
                xs_ = [splat(builder, _load(builder, xp_, first + i)) for i in range(8)]
                lo, hi = list(zip(codes[:4], xs_[:4])), list(zip(codes[4:], xs_[4:]))
                if times4:
                    accs4[j] = dot.pair_scaled_dot(builder, accs4[j], lo, hi, 4 * bound, sc_pair)
                else:
                    accs[j] = dot.pair_scaled_dot(builder, accs[j], lo, hi, bound, sc_pair)
                offs[j] = dot.word_dot(builder, offs[j], m_pair, splat(builder, _load(builder, pp, t)))
        if q_bits == 2:  # exact: the parts are multiples of 4 and 16
            accs = [builder.add(a, builder.ashr(a4, const(2))) for a, a4 in zip(accs, accs4)]
            offs = [builder.ashr(o, const(4)) for o in offs]
        for j in range(n_x):
            _store_rows(context, builder, signature.args[13], ia, oo, j, accs[j])
            _store_rows(context, builder, signature.args[14], oa, oo, j, offs[j])
        return context.get_dummy_value()

    return sig, codegen


@intrinsic(prefer_literal=True)
def _int8_dot16(typingctx, fam, n, w, w_off, x, x_off, x_stride, out, out_off):
    """Q8_0 block, 16 rows: out[j*ROWS + out_off + r] = sum_i w_ri * x_(row j, i) over 32 signed codes (8 quads)."""
    lits = _literals(fam, n)
    if lits is None:
        return None
    dot, n_x = _BYTE_DOTS[lits[0]], lits[1]
    sig = types.void(fam, n, w, w_off, x, x_off, x_stride, out, out_off)

    def codegen(context, builder, signature, args):
        _, _, wa, wo, xa, xo, xst, oa, oo = args
        wp = data_ptr(context, builder, signature.args[2], wa, wo, V16)
        quads = [_load(builder, wp, jq) for jq in range(8)]
        for j, xp in enumerate(_x_ptrs(context, builder, signature.args[4], xa, xo, xst, n_x)):
            pairs = [(quads[jq], _load(builder, xp, jq)) for jq in range(8)]
            _store_rows(context, builder, signature.args[7], oa, oo, j, dot.signed_dot(builder, pairs))
        return context.get_dummy_value()

    return sig, codegen



# ---------------------------------------------------------------------------------------------------------------
# packing: file rows -> quarters of quads
# ---------------------------------------------------------------------------------------------------------------

@njit(inline="always")
def _f16_bits(src, o):
    return np.uint16(np.uint32(src[o]) | (np.uint32(src[o + 1]) << 8))


@njit(inline="always")
def _pack_blocks(rows, qs, d, block_bytes, n_quads, pad_code):
    """Q4_0/Q8_0: rows (N, nb*block_bytes) -> qs (G, nb, 4, n_quads, 16, 4), d (G, nb, ROWS) f16 bits."""
    n = rows.shape[0]
    n_groups, nb = qs.shape[0], qs.shape[1]
    for g in prange(n_groups):
        r_end = min(ROWS, n - g * ROWS)
        for b in range(nb):
            o = b * block_bytes
            for r in range(ROWS):
                d[g, b, r] = _f16_bits(rows[g * ROWS + r], o) if r < r_end else 0
            for r in range(ROWS):
                rq, rr = r // QUARTER, r % QUARTER
                if r < r_end:
                    src = rows[g * ROWS + r]
                    for jq in range(n_quads):
                        for jj in range(4):
                            qs[g, b, rq, jq, rr, jj] = src[o + 2 + jq * 4 + jj]
                else:
                    for jq in range(n_quads):
                        for jj in range(4):
                            qs[g, b, rq, jq, rr, jj] = pad_code


@njit(parallel=True, cache=True)
def pack_q4_0(rows, qs, d):
    """rows (N, nb*18) -> qs (G, nb, 4, 4, 16, 4) uint8, d (G, nb, ROWS) uint16; pad rows have scale 0."""
    _pack_blocks(rows, qs, d, 18, 4, 0x88)


@njit(parallel=True, cache=True)
def pack_q8_0(rows, qs, d):
    """rows (N, nb*34) -> qs (G, nb, 4, 8, 16, 4) uint8 (int8 codes), d (G, nb, ROWS) uint16."""
    _pack_blocks(rows, qs, d, 34, 8, 0)


@njit(inline="always")
def _put_pair(a, g, b, first, s, r, v):
    """Value s of row r into a[g, b, first:] (rows of ROWS bytes) as int16-pair bytes, the form a 16-bit multiply-add
    takes: pair p = s // 2 of quarter r // 16 is 32 bytes at 128 p + 32 (r // 16), row r's two bytes (values 2p,
    2p+1) at 2 (r % 16)."""
    i = (s // 2) * 128 + (r // QUARTER) * 32 + (r % QUARTER) * 2 + (s % 2)
    a[g, b, first + i // ROWS, i % ROWS] = v


@njit(inline="always")
def _pack_kquant(rows, qs, scm, dd, block_bytes, qh_at, qs_at):
    """Q4_K/Q5_K: the nibbles of chunk c (sub-blocks 2c, 2c+1) as qs[g, b, c]; Q5_K's 32 bytes of high bits
    (qh_at >= 0) as one more chunk, qs[g, b, 4], in the same quarters of quads."""
    n = rows.shape[0]
    n_groups, nsb = qs.shape[0], qs.shape[1]
    for g in prange(n_groups):
        r_end = min(ROWS, n - g * ROWS)
        for b in range(nsb):
            o = b * block_bytes
            for r in range(ROWS):
                if r < r_end:
                    src = rows[g * ROWS + r]
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
                        _put_pair(scm, g, b, 8, s, r, mn)
                else:
                    dd[g, b, 0, r] = 0
                    dd[g, b, 1, r] = 0
                    for s in range(8):
                        scm[g, b, s, r] = 0
                        _put_pair(scm, g, b, 8, s, r, 0)
            for r in range(ROWS):
                rq, rr = r // QUARTER, r % QUARTER
                for c in range(4):
                    for jq in range(8):
                        for jj in range(4):
                            qs[g, b, c, rq, jq, rr, jj] = rows[g * ROWS + r, o + qs_at + c * 32 + jq * 4 + jj] \
                                if r < r_end else 0
                if qh_at >= 0:
                    for jq in range(8):
                        for jj in range(4):
                            qs[g, b, 4, rq, jq, rr, jj] = rows[g * ROWS + r, o + qh_at + jq * 4 + jj] \
                                if r < r_end else 0


@njit(parallel=True, cache=True)
def pack_q4_k(rows, qs, scm, dd):
    """rows (N, nsb*144) -> qs (G, nsb, 4, 4, 8, 16, 4), scm (G, nsb, 16, ROWS) (scales scm[:, :, s, r], then the
    mins as int16-pair bytes, _put_min), dd (G, nsb, 2, ROWS)."""
    _pack_kquant(rows, qs, scm, dd, 144, -1, 16)


@njit(parallel=True, cache=True)
def pack_q5_k(rows, qs, scm, dd):
    """rows (N, nsb*176) -> qs (G, nsb, 5, 4, 8, 16, 4) (chunk 4: the high bits), scm and dd as for Q4_K."""
    _pack_kquant(rows, qs, scm, dd, 176, 16, 48)


@njit(parallel=True, cache=True)
def pack_q6_k(rows, qs, sc, d):
    """rows (N, nsb*210) -> qs (G, nsb, 8 chunks, 4, 6 quads, 16, 4), sc (G, nsb, 16, ROWS) int8, d (G, nsb, ROWS).

    Chunk t holds codes 32t..32t+31 of the super-block: quads 0-3 are nibbles (byte j: code j low, code 16+j high),
    quads 4-5 the 2-bit highs (byte j: codes j, j+8, j+16, j+24 at bits 0, 2, 4, 6).
    """
    n = rows.shape[0]
    n_groups, nsb = qs.shape[0], qs.shape[1]
    for g in prange(n_groups):
        r_end = min(ROWS, n - g * ROWS)
        low = np.empty(256, np.uint8)
        high = np.empty(256, np.uint8)
        for b in range(nsb):
            o = b * 210
            for r in range(ROWS):
                rq, rr = r // QUARTER, r % QUARTER
                if r < r_end:
                    src = rows[g * ROWS + r]
                    d[g, b, r] = _f16_bits(src, o + 208)
                    for s in range(16):
                        _put_pair(sc, g, b, 0, s, r, src[o + 192 + s])
                    for half in range(2):  # ggml's Q6_K element order (dequantize_row_q6_K)
                        for l in range(32):
                            a = src[o + half * 64 + l]
                            c = src[o + half * 64 + 32 + l]
                            h = src[o + 128 + half * 32 + l]
                            i = half * 128 + l
                            low[i], low[i + 32], low[i + 64], low[i + 96] = a & 15, c & 15, a >> 4, c >> 4
                            high[i], high[i + 32] = h & 3, (h >> 2) & 3
                            high[i + 64], high[i + 96] = (h >> 4) & 3, h >> 6
                else:
                    d[g, b, r] = 0
                    for s in range(16):
                        _put_pair(sc, g, b, 0, s, r, 0)
                    low[:] = 0
                    high[:] = 0
                flat = qs[g, b].reshape(-1)  # (8, 4, 6, 16, 4) contiguous
                for t in range(8):
                    c0 = t * 32
                    at = (t * 4 + rq) * 6 * 64 + rr * 4
                    for j in range(16):
                        flat[at + (j >> 2) * 64 + (j & 3)] = low[c0 + j] | (low[c0 + 16 + j] << 4)
                    for j in range(8):
                        flat[at + (4 + (j >> 2)) * 64 + (j & 3)] = (high[c0 + j] | (high[c0 + j + 8] << 2)
                                                                    | (high[c0 + j + 16] << 4) | (high[c0 + j + 24] << 6))




@njit(parallel=True, cache=True)
def pack_q2_k(rows, qs, scm, dd):
    """rows (N, nsb*84) -> qs (G, nsb, 4, 16 quads, 16, 4) (the file's 64 qs bytes, _k23_sb16), scm (G, nsb, 16,
    ROWS) (the file's 16 scale bytes as int16-pair bytes, _put_pair), dd (G, nsb, 2, ROWS) (d, dmin).

    Block layout: ggml-common.h block_q2_K and ggml/src/ggml-quants.c dequantize_row_q2_K (scales[16], qs[64], d,
    dmin; element 128 h + 32 p + l is bits 2p of qs[32 h + l], sub-block 8 h + 2 p + l // 16)."""
    n = rows.shape[0]
    n_groups, nsb = qs.shape[0], qs.shape[1]
    for g in prange(n_groups):
        r_end = min(ROWS, n - g * ROWS)
        for b in range(nsb):
            o = b * 84
            for r in range(ROWS):
                rq, rr = r // QUARTER, r % QUARTER
                if r < r_end:
                    src = rows[g * ROWS + r]
                    dd[g, b, 0, r] = _f16_bits(src, o + 80)
                    dd[g, b, 1, r] = _f16_bits(src, o + 82)
                    for s in range(16):
                        _put_pair(scm, g, b, 0, s, r, src[o + s])
                    for q in range(16):
                        for jj in range(4):
                            qs[g, b, rq, q, rr, jj] = src[o + 16 + 4 * q + jj]
                else:
                    dd[g, b, 0, r] = 0
                    dd[g, b, 1, r] = 0
                    for s in range(16):
                        _put_pair(scm, g, b, 0, s, r, 0)
                    for q in range(16):
                        for jj in range(4):
                            qs[g, b, rq, q, rr, jj] = 0


@njit(parallel=True, cache=True)
def pack_q3_k(rows, qs, sc, d):
    """rows (N, nsb*110) -> qs (G, nsb, 4, 8 pairs, 3 words, 16, 4), sc (G, nsb, 16, ROWS) int8 scales (6-bit, less
    32) as int16-pair bytes, d (G, nsb, ROWS).

    Codes (low | high << 2, 0..7) in element order: pair t of sub-blocks holds elements 32 t..32 t+31, quad k being
    32 t + 4 k..+3, in three words whose byte l (element 32 t + 4 k + l of each quad k) is
      word 0: c0 | c1 << 3 | (c6 & 3) << 6,  word 1: c2 | c3 << 3 | (c7 & 3) << 6,
      word 2: c4 | c5 << 3 | (c6 >> 2) << 6 | (c7 >> 2) << 7
    so that six quads take a mask (and a shift) each and two take five operations, instead of about five each from
    the file's 2-bit and 1-bit planes; 96 bytes per 256 as in the file.

    Block layout: ggml-common.h block_q3_K and ggml/src/ggml-quants.c dequantize_row_q3_K (hmask[32], qs[64],
    scales[12], d; element 128 h + 32 p + l has its low bits at bit 2p of qs[32 h + l] and its high bit at bit
    4 h + p of hmask[l]; scale s has its low 4 bits in byte s % 8 (high nibble from s = 8) and its high 2 bits in
    byte 8 + s % 4 at bit 2 (s // 4))."""
    n = rows.shape[0]
    n_groups, nsb = qs.shape[0], qs.shape[1]
    for g in prange(n_groups):
        r_end = min(ROWS, n - g * ROWS)
        code = np.empty(256, np.uint8)
        for b in range(nsb):
            o = b * 110
            for r in range(ROWS):
                rq, rr = r // QUARTER, r % QUARTER
                if r < r_end:
                    src = rows[g * ROWS + r]
                    d[g, b, r] = _f16_bits(src, o + 108)
                    for s in range(16):
                        lo = (src[o + 96 + s % 8] >> (4 * (s // 8))) & 15
                        hi = (src[o + 104 + s % 4] >> (2 * (s // 4))) & 3
                        _put_pair(sc, g, b, 0, s, r, np.uint8(((lo | (hi << 4)) - 32) & 255))
                    for h in range(2):
                        for p in range(4):
                            for l in range(32):
                                code[128 * h + 32 * p + l] = ((src[o + 32 + 32 * h + l] >> (2 * p)) & 3) \
                                    | (((src[o + l] >> (4 * h + p)) & 1) << 2)
                else:
                    d[g, b, r] = 0
                    for s in range(16):
                        _put_pair(sc, g, b, 0, s, r, 0)
                    code[:] = 0
                for t in range(8):
                    for jj in range(4):
                        c = code[32 * t + jj:32 * t + 32:4]  # c[k]: element 32 t + 4 k + jj
                        qs[g, b, rq, t, 0, rr, jj] = c[0] | (c[1] << 3) | ((c[6] & 3) << 6)
                        qs[g, b, rq, t, 1, rr, jj] = c[2] | (c[3] << 3) | ((c[7] & 3) << 6)
                        qs[g, b, rq, t, 2, rr, jj] = c[4] | (c[5] << 3) | ((c[6] >> 2) << 6) | ((c[7] >> 2) << 7)


# ---------------------------------------------------------------------------------------------------------------
# kernels over runs of activation rows that share an expert (the contract of portable.py), built per family
# ---------------------------------------------------------------------------------------------------------------
# qs arrives flattened to 1-D (a free view of the packed array) and xq flattened too, so the intrinsics get plain
# element offsets. Decode kernels prefetch a page ahead; prefill kernels (four activation rows per unpacked weight
# register) were not measured with prefetching.

@njit(inline="always")
def _q4_0_row_out(a, isum, o, ds, scale, offset):
    """One activation row's block: scale the integer sums isum[o:o+ROWS] into its accumulators a.

    The difference is cut back to int32 before it becomes a float: numba computes it in int64, and AVX2 has no
    vector int64 -> float conversion (it went scalar: Q4_0 prefill 24 GMAC/s on one core instead of ~60)."""
    for r in range(ROWS):
        a[r] += np.float32(np.int32(isum[o + r] - offset)) * (ds[r] * scale)


@njit(inline="always")
def _kquant_sb_out(a, isum, msum, o, dsup, dmin, xd):
    """One activation row's super-block: its integer sums (isum/msum[o:o+ROWS]) into its accumulators a."""
    for r in range(ROWS):
        a[r] += xd * (dsup[r] * np.float32(isum[o + r]) - dmin[r] * np.float32(msum[o + r]))


@njit(inline="always")
def _q6_k_sb_out(a, isum, osum, o, dsup, xd):
    for r in range(ROWS):
        a[r] += xd * dsup[r] * np.float32(np.int32(isum[o + r] - 32 * osum[o + r]))


@njit(inline="always")
def _q2_k_scales(dd, e, g, b, dsup, dmin):
    _halves_to_float(dd[e, g, b, 0], dsup)
    _halves_to_float(dd[e, g, b, 1], dmin)


@njit(inline="always")
def _q3_k_scales(d, e, g, b, dsup, dmin):
    _halves_to_float(d[e, g, b], dsup)


@njit(inline="always")
def _q3_k_sb_out(a, isum, osum, o, dsup, dmin, xd):
    for r in range(ROWS):
        a[r] += xd * dsup[r] * np.float32(np.int32(isum[o + r] - 4 * osum[o + r]))


def make_runs(F: int) -> dict[str, tuple]:
    """The kernels for the family registered under F: {format name: (decode kernel, prefill kernel)}.

    Prefill kernels are for calls with 4 or more activation rows; they are kernels of their own because folding
    their loop into the decode kernels made LLVM compile the decode loop 5-8% slower (model-level A/B)."""
    if F not in _BYTE_DOTS:
        raise KeyError(f"no byte multiplication registered under {F}")

    @njit(parallel=True, cache=True, fastmath=True)
    def q4_0_runs_x4(qs, d, xq, xd, xs, run_start, run_expert, n_rows, out):
        n_groups, nb = d.shape[1], d.shape[2]
        k = nb * 32
        block = ROWS * 16
        for task in prange(run_expert.shape[0] * n_groups):
            g, e, m0, m1 = _run_task(task, n_groups, run_start, run_expert)
            accf = np.zeros((m1 - m0, ROWS), np.float32)
            ds = np.empty(ROWS, np.float32)
            isum = np.empty(4 * ROWS, np.int32)
            for b in range(nb):
                _halves_to_float(d[e, g, b], ds)
                base = ((e * n_groups + g) * nb + b) * block
                m = m0
                while m + 4 <= m1:
                    for rq in range(4):
                        _nibble_dot16(F, 4, qs, base + rq * 256, xq, m * k + b * 32, k, isum, rq * QUARTER)
                    for j in range(4):
                        _q4_0_row_out(accf[m + j - m0], isum, j * ROWS, ds, xd[m + j, b], 8 * xs[m + j, b])
                    m += 4
                while m < m1:
                    for rq in range(4):
                        _nibble_dot16(F, 1, qs, base + rq * 256, xq, m * k + b * 32, 0, isum, rq * QUARTER)
                    _q4_0_row_out(accf[m - m0], isum, 0, ds, xd[m, b], 8 * xs[m, b])
                    m += 1
            _store_group(out, accf, g, m0, m1, n_rows)

    q4_k = _make_kquant_runs(F, 4)
    q5_k = _make_kquant_runs(F, 5)
    q6_k = _make_q6_k_runs(F)
    return {"Q4_0": (_make_block32_decode(F, False), q4_0_runs_x4), "Q8_0": (_make_block32_decode(F, True),) * 2,
            "Q2_K": _make_k23_runs(F, 2), "Q3_K": _make_k23_runs(F, 3), "Q4_K": q4_k, "Q5_K": q5_k, "Q6_K": q6_k}


def _make_block32_decode(F: int, SIGNED: bool):
    """The decode kernel of the 32-value block formats: Q4_0 (nibbles, offset 8) or Q8_0 (SIGNED int8 codes)."""
    QUAD_BYTES = 512 if SIGNED else 256  # one quarter's codes per block

    @njit(parallel=True, cache=True, fastmath=True)
    def block32_runs(qs, d, xq, xd, xs, run_start, run_expert, n_rows, out):
        n_groups, nb = d.shape[1], d.shape[2]
        k = nb * 32
        block = 4 * QUAD_BYTES
        for task in prange(run_expert.shape[0] * n_groups):
            g, e, m0, m1 = _run_task(task, n_groups, run_start, run_expert)
            accf = np.zeros((m1 - m0, ROWS), np.float32)
            ds = np.empty(ROWS, np.float32)
            isum = np.empty(ROWS, np.int32)
            for b in range(nb):
                _halves_to_float(d[e, g, b], ds)
                base = ((e * n_groups + g) * nb + b) * block
                prefetch_ahead(qs, base, block)
                for m in range(m0, m1):
                    for rq in range(4):
                        if SIGNED:
                            _int8_dot16(F, 1, qs, base + rq * QUAD_BYTES, xq, m * k + b * 32, 0, isum, rq * QUARTER)
                        else:
                            _nibble_dot16(F, 1, qs, base + rq * QUAD_BYTES, xq, m * k + b * 32, 0, isum, rq * QUARTER)
                    _q4_0_row_out(accf[m - m0], isum, 0, ds, xd[m, b], 0 if SIGNED else 8 * xs[m, b])
            _store_group(out, accf, g, m0, m1, n_rows)

    return block32_runs


def _make_kquant_runs(F: int, BITS: int) -> tuple:
    """Q4_K (BITS = 4) or Q5_K (BITS = 5): (decode, prefill) kernels on Q8_K activations (xq, xd per 256, xp the
    pair sums; activations.py). Each super-block is summed in integers (_kquant_sb16) and meets its float scales
    once per row: a[r] += xd * (d_r * isum_r - dmin_r * msum_r), as llama.cpp's vec_dot_q4_K_q8_K does."""
    CHUNKS = 5 if BITS == 5 else 4

    @njit(parallel=True, cache=True, fastmath=True)
    def kquant_runs(qs, scm, dd, xq, xd, xp, run_start, run_expert, n_rows, out):
        n_groups, nsb = dd.shape[1], dd.shape[2]
        k = nsb * 256
        block = ROWS * 32 * CHUNKS
        for task in prange(run_expert.shape[0] * n_groups):
            g, e, m0, m1 = _run_task(task, n_groups, run_start, run_expert)
            accf = np.zeros((m1 - m0, ROWS), np.float32)
            dsup = np.empty(ROWS, np.float32)
            dmin = np.empty(ROWS, np.float32)
            isum = np.empty(ROWS, np.int32)
            msum = np.empty(ROWS, np.int32)
            for b in range(nsb):
                _halves_to_float(dd[e, g, b, 0], dsup)
                _halves_to_float(dd[e, g, b, 1], dmin)
                sb = (e * n_groups + g) * nsb + b
                base = sb * block
                prefetch_ahead(qs, base, block)
                for m in range(m0, m1):
                    for rq in range(4):
                        _kquant_sb16(F, BITS, 1, qs, base + rq * 512, scm, sb * 1024 + rq * QUARTER,
                                     sb * 1024 + 512 + rq * 32, xq, m * k + b * 256, 0, xp, m * (k // 64) + b * 4, 0,
                                     isum, msum, rq * QUARTER)
                    _kquant_sb_out(accf[m - m0], isum, msum, 0, dsup, dmin, xd[m, b])
            _store_group(out, accf, g, m0, m1, n_rows)

    @njit(parallel=True, cache=True, fastmath=True)
    def kquant_runs_x4(qs, scm, dd, xq, xd, xp, run_start, run_expert, n_rows, out):
        n_groups, nsb = dd.shape[1], dd.shape[2]
        k = nsb * 256
        block = ROWS * 32 * CHUNKS
        for task in prange(run_expert.shape[0] * n_groups):
            g, e, m0, m1 = _run_task(task, n_groups, run_start, run_expert)
            accf = np.zeros((m1 - m0, ROWS), np.float32)
            dsup = np.empty(ROWS, np.float32)
            dmin = np.empty(ROWS, np.float32)
            isum = np.empty(4 * ROWS, np.int32)
            msum = np.empty(4 * ROWS, np.int32)
            for b in range(nsb):
                _halves_to_float(dd[e, g, b, 0], dsup)
                _halves_to_float(dd[e, g, b, 1], dmin)
                sb = (e * n_groups + g) * nsb + b
                base = sb * block
                m = m0
                while m < m1:
                    n_x = 4 if m + 4 <= m1 else 1
                    for rq in range(4):
                        if n_x == 4:
                            _kquant_sb16(F, BITS, 4, qs, base + rq * 512, scm, sb * 1024 + rq * QUARTER,
                                         sb * 1024 + 512 + rq * 32, xq, m * k + b * 256, k, xp,
                                         m * (k // 64) + b * 4, k // 64, isum, msum, rq * QUARTER)
                        else:
                            _kquant_sb16(F, BITS, 1, qs, base + rq * 512, scm, sb * 1024 + rq * QUARTER,
                                         sb * 1024 + 512 + rq * 32, xq, m * k + b * 256, 0, xp,
                                         m * (k // 64) + b * 4, 0, isum, msum, rq * QUARTER)
                    for j in range(n_x):
                        _kquant_sb_out(accf[m + j - m0], isum, msum, j * ROWS, dsup, dmin, xd[m + j, b])
                    m += n_x
            _store_group(out, accf, g, m0, m1, n_rows)

    return kquant_runs, kquant_runs_x4


def _make_q6_k_runs(F: int) -> tuple:
    """Q6_K (decode, prefill) kernels on Q8_K activations (xq, xd per 256, xp the per-16 sums as pairs): each
    super-block summed in integers (_q6_sb16), then a[r] += xd * d_r * (isum_r - 32 osum_r)."""

    @njit(parallel=True, cache=True, fastmath=True)
    def q6_k_runs(qs, sc, d, xq, xd, xp, run_start, run_expert, n_rows, out):
        n_groups, nsb = d.shape[1], d.shape[2]
        k = nsb * 256
        block = ROWS * 192
        for task in prange(run_expert.shape[0] * n_groups):
            g, e, m0, m1 = _run_task(task, n_groups, run_start, run_expert)
            accf = np.zeros((m1 - m0, ROWS), np.float32)
            dsup = np.empty(ROWS, np.float32)
            isum = np.empty(ROWS, np.int32)
            osum = np.empty(ROWS, np.int32)
            for b in range(nsb):
                _halves_to_float(d[e, g, b], dsup)
                sb = (e * n_groups + g) * nsb + b
                base = sb * block
                prefetch_ahead(qs, base, block)
                for m in range(m0, m1):
                    for rq in range(4):
                        _q6_sb16(F, 1, qs, base + rq * 384, sc, sb * 1024 + rq * 32, xq, m * k + b * 256, 0,
                                 xp, m * (k // 32) + b * 8, 0, isum, osum, rq * QUARTER)
                    _q6_k_sb_out(accf[m - m0], isum, osum, 0, dsup, xd[m, b])
            _store_group(out, accf, g, m0, m1, n_rows)

    @njit(parallel=True, cache=True, fastmath=True)
    def q6_k_runs_x4(qs, sc, d, xq, xd, xp, run_start, run_expert, n_rows, out):
        n_groups, nsb = d.shape[1], d.shape[2]
        k = nsb * 256
        block = ROWS * 192
        for task in prange(run_expert.shape[0] * n_groups):
            g, e, m0, m1 = _run_task(task, n_groups, run_start, run_expert)
            accf = np.zeros((m1 - m0, ROWS), np.float32)
            dsup = np.empty(ROWS, np.float32)
            isum = np.empty(4 * ROWS, np.int32)
            osum = np.empty(4 * ROWS, np.int32)
            for b in range(nsb):
                _halves_to_float(d[e, g, b], dsup)
                sb = (e * n_groups + g) * nsb + b
                base = sb * block
                m = m0
                while m < m1:
                    n_x = 4 if m + 4 <= m1 else 1
                    for rq in range(4):
                        if n_x == 4:
                            _q6_sb16(F, 4, qs, base + rq * 384, sc, sb * 1024 + rq * 32, xq, m * k + b * 256, k,
                                     xp, m * (k // 32) + b * 8, k // 32, isum, osum, rq * QUARTER)
                        else:
                            _q6_sb16(F, 1, qs, base + rq * 384, sc, sb * 1024 + rq * 32, xq, m * k + b * 256, 0,
                                     xp, m * (k // 32) + b * 8, 0, isum, osum, rq * QUARTER)
                    for j in range(n_x):
                        _q6_k_sb_out(accf[m + j - m0], isum, osum, j * ROWS, dsup, xd[m + j, b])
                    m += n_x
            _store_group(out, accf, g, m0, m1, n_rows)

    return q6_k_runs, q6_k_runs_x4


def _make_k23_runs(F: int, BITS: int) -> tuple:
    """Q2_K (BITS = 2) or Q3_K (BITS = 3): (decode, prefill) kernels on Q8_K activations (xq, xd per 256, xp the
    per-16 sums as pairs). Each super-block is summed in integers (_k23_sb16), then meets its float scales once per
    row: Q2_K a[r] += xd * (d_r * isum_r - dmin_r * msum_r), Q3_K a[r] += xd * d_r * (isum_r - 4 osum_r)."""
    QUAD_BYTES = 1024 if BITS == 2 else 1536  # one quarter's codes per super-block
    scales = _q2_k_scales if BITS == 2 else _q3_k_scales
    sb_out = _kquant_sb_out if BITS == 2 else _q3_k_sb_out

    @njit(parallel=True, cache=True, fastmath=True)
    def k23_runs(qs, sc, dd, xq, xd, xp, run_start, run_expert, n_rows, out):
        n_groups, nsb = dd.shape[1], dd.shape[2]
        k = nsb * 256
        block = 4 * QUAD_BYTES
        for task in prange(run_expert.shape[0] * n_groups):
            g, e, m0, m1 = _run_task(task, n_groups, run_start, run_expert)
            accf = np.zeros((m1 - m0, ROWS), np.float32)
            dsup = np.empty(ROWS, np.float32)
            dmin = np.empty(ROWS, np.float32)
            isum = np.empty(ROWS, np.int32)
            osum = np.empty(ROWS, np.int32)
            for b in range(nsb):
                scales(dd, e, g, b, dsup, dmin)
                sb = (e * n_groups + g) * nsb + b
                base = sb * block
                prefetch_ahead(qs, base, block)
                prefetch_ahead(sc, sb * 1024, 1024)
                for m in range(m0, m1):
                    for rq in range(4):
                        _k23_sb16(F, BITS, 1, qs, base + rq * QUAD_BYTES, sc, sb * 1024 + rq * 32, xq,
                                  m * k + b * 256, 0, xp, m * (k // 32) + b * 8, 0, isum, osum, rq * QUARTER)
                    sb_out(accf[m - m0], isum, osum, 0, dsup, dmin, xd[m, b])
            _store_group(out, accf, g, m0, m1, n_rows)

    @njit(parallel=True, cache=True, fastmath=True)
    def k23_runs_x4(qs, sc, dd, xq, xd, xp, run_start, run_expert, n_rows, out):
        n_groups, nsb = dd.shape[1], dd.shape[2]
        k = nsb * 256
        block = 4 * QUAD_BYTES
        for task in prange(run_expert.shape[0] * n_groups):
            g, e, m0, m1 = _run_task(task, n_groups, run_start, run_expert)
            accf = np.zeros((m1 - m0, ROWS), np.float32)
            dsup = np.empty(ROWS, np.float32)
            dmin = np.empty(ROWS, np.float32)
            isum = np.empty(4 * ROWS, np.int32)
            osum = np.empty(4 * ROWS, np.int32)
            for b in range(nsb):
                scales(dd, e, g, b, dsup, dmin)
                sb = (e * n_groups + g) * nsb + b
                base = sb * block
                m = m0
                while m < m1:
                    n_x = 4 if m + 4 <= m1 else 1
                    for rq in range(4):
                        if n_x == 4:
                            _k23_sb16(F, BITS, 4, qs, base + rq * QUAD_BYTES, sc, sb * 1024 + rq * 32, xq,
                                      m * k + b * 256, k, xp, m * (k // 32) + b * 8, k // 32, isum, osum,
                                      rq * QUARTER)
                        else:
                            _k23_sb16(F, BITS, 1, qs, base + rq * QUAD_BYTES, sc, sb * 1024 + rq * 32, xq,
                                      m * k + b * 256, 0, xp, m * (k // 32) + b * 8, 0, isum, osum, rq * QUARTER)
                    for j in range(n_x):
                        sb_out(accf[m + j - m0], isum, osum, j * ROWS, dsup, dmin, xd[m + j, b])
                    m += n_x
            _store_group(out, accf, g, m0, m1, n_rows)

    return k23_runs, k23_runs_x4

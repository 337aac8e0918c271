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
Scales are the arrays of portable.py (f16 bits, and for Q4_K/Q5_K the unpacked 6-bit scales and mins). Packed
weights are the file's size but for K-quant scales unpacked to a byte each (Q4_K 148 bytes per 256, Q5_K 180).

A family is one module (avx512vnni.py, avxvnni.py, avx2.py) that says how to multiply unsigned by signed bytes
(simd.ByteDot) and registers it under its key; make_runs(key) then builds this module's kernels for it. The
intrinsics below take that key as a compile-time literal, so each family gets its own compiled (and cached) kernels
from the one source. Codes are unsigned (nibbles 0..15, Q5 0..31, Q6 0..63) against signed int8 activations, so the
ggml offsets (-8, -16, -32) come off as offset * sum(x) per block; Q8_0 codes are signed on both sides and each
family has its own trick for that (signed_dot). Every sum stays far inside int32.

Shapes are checked by the caller (quant/kernels/__init__.py) before anything here runs; an intrinsic that reads past
a buffer kills the process.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

# numba caches a kernel by its own file only: when a helper imported here changes, this file must change too (the
# _halves_to_float rewrite of 2026-11-28 is one such change)
from .portable import ROWS, _halves_to_float, _run_task, _store_group
from .simd import I32, I64, V16, ByteDot, data_ptr, prefetch_ahead, splat

__all__ = ["QUARTER", "make_runs", "pack_q4_0", "pack_q4_k", "pack_q5_k", "pack_q6_k", "pack_q8_0", "register"]

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
def _kquant_dot16_split(typingctx, fam, bits, n, w, w_off, h_off, c, x, x_off, x_stride, out_lo, out_hi, out_off):
    """Q4_K/Q5_K chunk c, 16 rows: low nibbles of 8 quads against x[0:32], high nibbles against x[32:64], kept apart
    (two sub-blocks with their own scales). bits = 5 adds Q5_K's high bits (bit 2c, 2c+1 of the quads at h_off)."""
    lits = _literals(fam, bits, n)
    if lits is None:
        return None
    dot, q_bits, n_x = _BYTE_DOTS[lits[0]], lits[1], lits[2]
    sig = types.void(fam, bits, n, w, w_off, h_off, c, x, x_off, x_stride, out_lo, out_hi, out_off)

    def codegen(context, builder, signature, args):
        _, _, _, wa, wo, ho, cc, xa, xo, xst, la, ha, oo = args
        wp = data_ptr(context, builder, signature.args[3], wa, wo, V16)
        low, four = splat(builder, ir.Constant(I32, 0x0F0F0F0F)), splat(builder, ir.Constant(I32, 4))
        codes = []
        if q_bits == 5:
            hp = data_ptr(context, builder, signature.args[3], wa, ho, V16)
            bit = splat(builder, ir.Constant(I32, 0x01010101))
            shift = builder.trunc(builder.mul(cc, ir.Constant(cc.type, 2)), I32)
            sh_lo = splat(builder, shift)
            sh_hi = splat(builder, builder.add(shift, ir.Constant(I32, 1)))
        for jq in range(8):
            v = _load(builder, wp, jq)
            q_lo, q_hi = builder.and_(v, low), builder.and_(builder.lshr(v, four), low)
            if q_bits == 5:
                h = _load(builder, hp, jq)
                q_lo = builder.or_(q_lo, builder.shl(builder.and_(builder.lshr(h, sh_lo), bit), four))
                q_hi = builder.or_(q_hi, builder.shl(builder.and_(builder.lshr(h, sh_hi), bit), four))
            codes.append((q_lo, q_hi))
        bound = 2 * ((1 << q_bits) - 1) * 127
        for j, xp in enumerate(_x_ptrs(context, builder, signature.args[7], xa, xo, xst, n_x)):
            zero = ir.Constant(V16, None)
            acc_lo = dot.dot(builder, zero, [(codes[jq][0], splat(builder, _load(builder, xp, jq)))
                                             for jq in range(8)], bound)
            acc_hi = dot.dot(builder, zero, [(codes[jq][1], splat(builder, _load(builder, xp, 8 + jq)))
                                             for jq in range(8)], bound)
            _store_rows(context, builder, signature.args[10], la, oo, j, acc_lo)
            _store_rows(context, builder, signature.args[11], ha, oo, j, acc_hi)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic(prefer_literal=True)
def _q6_dot16_split(typingctx, fam, n, w, w_off, x, x_off, x_stride, out_lo, out_hi, out_off):
    """Q6_K chunk of 32 codes, 16 rows: 4 nibble quads and 2 quads of 2-bit highs rebuilt into 6-bit codes (0..63);
    elements 0-15 (low nibbles) go to out_lo, 16-31 (high nibbles) to out_hi, each summed against x."""
    lits = _literals(fam, n)
    if lits is None:
        return None
    dot, n_x = _BYTE_DOTS[lits[0]], lits[1]
    sig = types.void(fam, n, w, w_off, x, x_off, x_stride, out_lo, out_hi, out_off)

    def codegen(context, builder, signature, args):
        _, _, wa, wo, xa, xo, xst, la, ha, oo = args
        wp = data_ptr(context, builder, signature.args[2], wa, wo, V16)
        low4 = splat(builder, ir.Constant(I32, 0x0F0F0F0F))
        low2 = splat(builder, ir.Constant(I32, 0x03030303))

        def shifted(v, k):
            return builder.lshr(v, splat(builder, ir.Constant(I32, k))) if k else v

        def up4(v):
            return builder.shl(v, splat(builder, ir.Constant(I32, 4)))

        highs = [_load(builder, wp, 4 + i) for i in range(2)]
        codes = []
        for jq in range(4):
            v, h = _load(builder, wp, jq), highs[jq % 2]
            codes.append((builder.or_(builder.and_(v, low4), up4(builder.and_(shifted(h, 2 * (jq // 2)), low2))),
                          builder.or_(builder.and_(shifted(v, 4), low4),
                                      up4(builder.and_(shifted(h, 4 + 2 * (jq // 2)), low2)))))
        for j, xp in enumerate(_x_ptrs(context, builder, signature.args[4], xa, xo, xst, n_x)):
            zero = ir.Constant(V16, None)
            acc_lo = dot.dot(builder, zero, [(codes[jq][0], splat(builder, _load(builder, xp, jq)))
                                             for jq in range(4)], 2 * 63 * 127)
            acc_hi = dot.dot(builder, zero, [(codes[jq][1], splat(builder, _load(builder, xp, 4 + jq)))
                                             for jq in range(4)], 2 * 63 * 127)
            _store_rows(context, builder, signature.args[7], la, oo, j, acc_lo)
            _store_rows(context, builder, signature.args[8], ha, oo, j, acc_hi)
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
                        scm[g, b, 8 + s, r] = mn
                else:
                    dd[g, b, 0, r] = 0
                    dd[g, b, 1, r] = 0
                    for s in range(16):
                        scm[g, b, s, r] = 0
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
    """rows (N, nsb*144) -> qs (G, nsb, 4, 4, 8, 16, 4), scm (G, nsb, 16, ROWS), dd (G, nsb, 2, ROWS)."""
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
                        sc[g, b, s, r] = src[o + 192 + s]
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
                        sc[g, b, s, r] = 0
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
def _kquant_row_out(a, isum_lo, isum_hi, o, fsc, fmn, c, s_lo, s_hi, x_lo, x_hi):
    """One activation row's chunk c: scale the integer sums (isum_*[o:o+ROWS]) into its accumulators a."""
    for r in range(ROWS):
        a[r] += s_lo * (fsc[2 * c, r] * np.float32(isum_lo[o + r]) - fmn[2 * c, r] * x_lo)
        a[r] += s_hi * (fsc[2 * c + 1, r] * np.float32(isum_hi[o + r]) - fmn[2 * c + 1, r] * x_hi)


@njit(inline="always")
def _q6_k_row_out(a, isum_lo, isum_hi, o, dsup, scb, t, s, off_lo, off_hi):
    for r in range(ROWS):
        a[r] += s * dsup[r] * (np.float32(scb[2 * t, r]) * np.float32(np.int32(isum_lo[o + r] - off_lo))
                               + np.float32(scb[2 * t + 1, r]) * np.float32(np.int32(isum_hi[o + r] - off_hi)))


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
            "Q4_K": q4_k, "Q5_K": q5_k, "Q6_K": q6_k}


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
    """Q4_K (BITS = 4) or Q5_K (BITS = 5): (decode, prefill) kernels; the same scales and mins, Q5_K one more
    chunk of high bits per super-block."""
    CHUNKS = 5 if BITS == 5 else 4

    @njit(parallel=True, cache=True, fastmath=True)
    def kquant_runs(qs, scm, dd, xq, xd, xs, run_start, run_expert, n_rows, out):
        n_groups, nsb = dd.shape[1], dd.shape[2]
        k = nsb * 256
        block = ROWS * 32 * CHUNKS
        for task in prange(run_expert.shape[0] * n_groups):
            g, e, m0, m1 = _run_task(task, n_groups, run_start, run_expert)
            accf = np.zeros((m1 - m0, ROWS), np.float32)
            dsup = np.empty(ROWS, np.float32)
            dmin = np.empty(ROWS, np.float32)
            isum_lo = np.empty(ROWS, np.int32)
            isum_hi = np.empty(ROWS, np.int32)
            for b in range(nsb):
                _halves_to_float(dd[e, g, b, 0], dsup)
                _halves_to_float(dd[e, g, b, 1], dmin)
                sm = scm[e, g, b]
                base = ((e * n_groups + g) * nsb + b) * block
                if BITS == 5:
                    prefetch_ahead(qs, base + 4 * 2048, 2048)
                for m in range(m0, m1):
                    a = accf[m - m0]
                    for c in range(4):
                        if m == m0:  # a chunk (2 KiB) at a time, as measured
                            prefetch_ahead(qs, base + c * 2048, 2048)
                        k0 = b * 256 + c * 64
                        for rq in range(4):
                            _kquant_dot16_split(F, BITS, 1, qs, base + c * 2048 + rq * 512, base + 8192 + rq * 512,
                                                c, xq, m * k + k0, 0, isum_lo, isum_hi, rq * QUARTER)
                        blk = k0 // 32
                        s_lo, s_hi = xd[m, blk], xd[m, blk + 1]
                        x_lo, x_hi = np.float32(xs[m, blk]), np.float32(xs[m, blk + 1])
                        for r in range(ROWS):
                            ds = dsup[r]
                            dm = dmin[r]
                            a[r] += s_lo * (ds * np.float32(sm[2 * c, r]) * np.float32(isum_lo[r])
                                            - dm * np.float32(sm[8 + 2 * c, r]) * x_lo)
                            a[r] += s_hi * (ds * np.float32(sm[2 * c + 1, r]) * np.float32(isum_hi[r])
                                            - dm * np.float32(sm[9 + 2 * c, r]) * x_hi)
            _store_group(out, accf, g, m0, m1, n_rows)

    @njit(parallel=True, cache=True, fastmath=True)
    def kquant_runs_x4(qs, scm, dd, xq, xd, xs, run_start, run_expert, n_rows, out):
        n_groups, nsb = dd.shape[1], dd.shape[2]
        k = nsb * 256
        block = ROWS * 32 * CHUNKS
        for task in prange(run_expert.shape[0] * n_groups):
            g, e, m0, m1 = _run_task(task, n_groups, run_start, run_expert)
            accf = np.zeros((m1 - m0, ROWS), np.float32)
            dsup = np.empty(ROWS, np.float32)
            dmin = np.empty(ROWS, np.float32)
            fsc = np.empty((8, ROWS), np.float32)  # d * scale and dmin * min of each sub-block, once for all rows
            fmn = np.empty((8, ROWS), np.float32)
            isum_lo = np.empty(4 * ROWS, np.int32)
            isum_hi = np.empty(4 * ROWS, np.int32)
            for b in range(nsb):
                _halves_to_float(dd[e, g, b, 0], dsup)
                _halves_to_float(dd[e, g, b, 1], dmin)
                sm = scm[e, g, b]
                base = ((e * n_groups + g) * nsb + b) * block
                for s in range(8):
                    for r in range(ROWS):
                        fsc[s, r] = dsup[r] * np.float32(sm[s, r])
                        fmn[s, r] = dmin[r] * np.float32(sm[8 + s, r])
                m = m0
                while m < m1:
                    n_x = 4 if m + 4 <= m1 else 1
                    for c in range(4):
                        k0 = b * 256 + c * 64
                        blk = k0 // 32
                        for rq in range(4):
                            if n_x == 4:
                                _kquant_dot16_split(F, BITS, 4, qs, base + c * 2048 + rq * 512,
                                                    base + 8192 + rq * 512, c, xq, m * k + k0, k,
                                                    isum_lo, isum_hi, rq * QUARTER)
                            else:
                                _kquant_dot16_split(F, BITS, 1, qs, base + c * 2048 + rq * 512,
                                                    base + 8192 + rq * 512, c, xq, m * k + k0, 0,
                                                    isum_lo, isum_hi, rq * QUARTER)
                        for j in range(n_x):
                            _kquant_row_out(accf[m + j - m0], isum_lo, isum_hi, j * ROWS, fsc, fmn, c,
                                            xd[m + j, blk], xd[m + j, blk + 1],
                                            np.float32(xs[m + j, blk]), np.float32(xs[m + j, blk + 1]))
                    m += n_x
            _store_group(out, accf, g, m0, m1, n_rows)

    return kquant_runs, kquant_runs_x4


def _make_q6_k_runs(F: int) -> tuple:
    """Q6_K (decode, prefill) kernels; xs16 holds the activations' sums per 16 (the code offset 32 comes off with
    them)."""

    @njit(parallel=True, cache=True, fastmath=True)
    def q6_k_runs(qs, sc, d, xq, xd, xs16, run_start, run_expert, n_rows, out):
        n_groups, nsb = d.shape[1], d.shape[2]
        k = nsb * 256
        block = ROWS * 192
        for task in prange(run_expert.shape[0] * n_groups):
            g, e, m0, m1 = _run_task(task, n_groups, run_start, run_expert)
            accf = np.zeros((m1 - m0, ROWS), np.float32)
            dsup = np.empty(ROWS, np.float32)
            isum_lo = np.empty(ROWS, np.int32)
            isum_hi = np.empty(ROWS, np.int32)
            for b in range(nsb):
                _halves_to_float(d[e, g, b], dsup)
                scb = sc[e, g, b]
                base = ((e * n_groups + g) * nsb + b) * block
                for m in range(m0, m1):
                    for t in range(8):
                        if m == m0:
                            prefetch_ahead(qs, base + t * 1536, 1536)
                        for rq in range(4):
                            _q6_dot16_split(F, 1, qs, base + t * 1536 + rq * 384, xq, m * k + b * 256 + t * 32, 0,
                                            isum_lo, isum_hi, rq * QUARTER)
                        blk = b * 8 + t
                        _q6_k_row_out(accf[m - m0], isum_lo, isum_hi, 0, dsup, scb, t, xd[m, blk],
                                      32 * xs16[m, 2 * blk], 32 * xs16[m, 2 * blk + 1])
            _store_group(out, accf, g, m0, m1, n_rows)

    @njit(parallel=True, cache=True, fastmath=True)
    def q6_k_runs_x4(qs, sc, d, xq, xd, xs16, run_start, run_expert, n_rows, out):
        n_groups, nsb = d.shape[1], d.shape[2]
        k = nsb * 256
        block = ROWS * 192
        for task in prange(run_expert.shape[0] * n_groups):
            g, e, m0, m1 = _run_task(task, n_groups, run_start, run_expert)
            accf = np.zeros((m1 - m0, ROWS), np.float32)
            dsup = np.empty(ROWS, np.float32)
            isum_lo = np.empty(4 * ROWS, np.int32)
            isum_hi = np.empty(4 * ROWS, np.int32)
            for b in range(nsb):
                _halves_to_float(d[e, g, b], dsup)
                scb = sc[e, g, b]
                base = ((e * n_groups + g) * nsb + b) * block
                m = m0
                while m < m1:
                    n_x = 4 if m + 4 <= m1 else 1
                    for t in range(8):
                        for rq in range(4):
                            if n_x == 4:
                                _q6_dot16_split(F, 4, qs, base + t * 1536 + rq * 384, xq, m * k + b * 256 + t * 32,
                                                k, isum_lo, isum_hi, rq * QUARTER)
                            else:
                                _q6_dot16_split(F, 1, qs, base + t * 1536 + rq * 384, xq, m * k + b * 256 + t * 32,
                                                0, isum_lo, isum_hi, rq * QUARTER)
                        blk = b * 8 + t
                        for j in range(n_x):
                            _q6_k_row_out(accf[m + j - m0], isum_lo, isum_hi, j * ROWS, dsup, scb, t,
                                          xd[m + j, blk], 32 * xs16[m + j, 2 * blk], 32 * xs16[m + j, 2 * blk + 1])
                    m += n_x
            _store_group(out, accf, g, m0, m1, n_rows)

    return q6_k_runs, q6_k_runs_x4

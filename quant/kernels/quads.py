"""AVX-512 VNNI kernels for Q4_0, Q8_0, Q4_K and Q6_K: one `vpdpbusd` multiplies 64 byte pairs and sums them by fours.

The portable kernels (kernels_packed.py) leave the instruction choice to LLVM, which widens bytes to 16 bits and
multiplies 16-32 lanes per instruction. Here a numba intrinsic emits `llvm.x86.avx512.vpdpbusd.512` itself, which
does 64 multiply-adds per instruction: decode stops being compute-bound and prefill runs about 2.5x faster than the
portable kernels on one core. Only used where the host CPU has avx512vnni (checked in quant/kernels.py); the
intrinsic is never compiled elsewhere.

Layout: rows are grouped ROWS = 64 at a time as in kernels_packed.py, and each group is cut into 4 quarters of 16
rows (one 512-bit register of int32 lanes). Within a quarter, each 32-bit lane holds 4 consecutive code bytes of one
row ("quads"), so a register holds quad jq of 16 rows:
  Q4_0  (G, nb, 4 quarters, 4 quads, 16 rows, 4 bytes)   low nibbles are elements 4jq..4jq+3, high ones 16+4jq..
  Q8_0  (G, nb, 4 quarters, 8 quads, 16 rows, 4 bytes)   int8 codes 4jq..4jq+3
  Q4_K  (G, nsb, 4 chunks, 4 quarters, 8 quads, 16 rows, 4 bytes)  chunk c: low nibbles sub-block 2c, high 2c+1
  Q6_K  (G, nsb, 8 chunks, 4 quarters, 6 quads, 16 rows, 4 bytes)  see pack_q6_k; 210 bytes per 256 as in the file
Scales are the same arrays as in kernels_packed.py (f16 bits, and for Q4_K the unpacked 6-bit scales and mins).

vpdpbusd multiplies unsigned by signed bytes. Nibbles are unsigned (0..15), activations signed, so Q4_0 and Q4_K
need no trick (Q4_0's -8 comes off as 8 * sum(x) per block). Q8_0 codes are signed on both sides: the activations
are made unsigned by adding 128 (xor 0x80) and 128 * sum(w) is subtracted, sum(w) coming from one more vpdpbusd
against ones. Every sum stays far inside int32.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

# numba caches a kernel by its own file only: when a helper imported here changes, this file must change too (the
# _halves_to_float rewrite of 2026-11-28 is one such change)
from .portable import ROWS, _halves_to_float, _run_task, _store_group

__all__ = [
    "pack_q4_0",
    "pack_q4_k",
    "pack_q6_k",
    "pack_q8_0",
    "q4_0_runs",
    "q4_0_runs_x4",
    "q4_k_runs",
    "q4_k_runs_x4",
    "q6_k_runs",
    "q8_0_runs",
]

_I8 = ir.IntType(8)
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_V16 = ir.VectorType(_I32, 16)
_QUARTER = 16  # rows per register


def _data_ptr(context, builder, aryty, ary, offset, elt):
    """Pointer to element `offset` of a numba array, cast to a pointer of LLVM type elt."""
    arr = context.make_array(aryty)(context, builder, ary)
    return builder.bitcast(builder.gep(arr.data, [offset]), elt.as_pointer())


def _splat(builder, scalar32):
    vec = builder.insert_element(ir.Constant(_V16, ir.Undefined), scalar32, ir.Constant(_I32, 0))
    return builder.shuffle_vector(vec, ir.Constant(_V16, ir.Undefined), ir.Constant(_V16, [0] * 16))


def _dpbusd(builder):
    fnty = ir.FunctionType(_V16, [_V16, _V16, _V16])
    return cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.avx512.vpdpbusd.512")


# Decode streams every weight byte once, and on the Xeon we measured, the hardware prefetchers alone left about a
# third of the read bandwidth unused (likely because their streams stop at 4 KiB page boundaries). Asking for the
# lines one page ahead: 14336 x 4096 matrix, file-backed, 2 threads, Q4_0 14.7 -> 20.8 GB/s, Q4_K 17.4 -> 23.3;
# the 4-block Mixtral-shape decode, medians of 6 alternating runs, Q4_0 16.6 -> 19.1 tok/s, Q4_K 11.1 -> 11.8.
# Only the decode kernels prefetch: the prefill kernels (four activation rows per weight line) were not tried.
PREFETCH_AHEAD = 4096  # bytes


@intrinsic
def _prefetch(typingctx, a, off):
    """A hint to bring the 64-byte line holding a.flat[off] into L1 (never faults, even past the array's end)."""
    sig = types.void(a, off)

    def codegen(context, builder, signature, args):
        arr = context.make_array(signature.args[0])(context, builder, args[0])
        ptr = builder.bitcast(builder.gep(arr.data, [args[1]]), _I8.as_pointer())
        fnty = ir.FunctionType(ir.VoidType(), [_I8.as_pointer(), _I32, _I32, _I32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        builder.call(fn, [ptr, ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])  # read, L1, data
        return context.get_dummy_value()

    return sig, codegen


@njit(inline="always")
def _prefetch_ahead(qs, start, n_bytes):
    """Prefetch the n_bytes of codes that start PREFETCH_AHEAD bytes after qs[start] (qs is flat uint8)."""
    for p in range(0, n_bytes, 64):
        _prefetch(qs, start + PREFETCH_AHEAD + p)


@intrinsic
def _nibble_dot16(typingctx, w, w_off, x, x_off, out, out_off):
    """Q4_0 block, 16 rows: out[out_off + r] = sum_j q_rj * x_j over the block's 32 codes (q unsigned 0..15).

    w: uint8, 4 quads x 16 rows x 4 bytes from w_off; x: int8, the block's 32 activations from x_off."""
    sig = types.void(w, w_off, x, x_off, out, out_off)

    def codegen(context, builder, signature, args):
        wa, wo, xa, xo, oa, oo = args
        wp = _data_ptr(context, builder, signature.args[0], wa, wo, _V16)
        xp = _data_ptr(context, builder, signature.args[2], xa, xo, _I32)
        op = _data_ptr(context, builder, signature.args[4], oa, oo, _V16)
        dp = _dpbusd(builder)
        low = _splat(builder, ir.Constant(_I32, 0x0F0F0F0F))
        four = _splat(builder, ir.Constant(_I32, 4))
        acc = ir.Constant(_V16, None)
        for jq in range(4):
            v = builder.load(builder.gep(wp, [ir.Constant(_I64, jq)]), align=1)
            x_lo = builder.load(builder.gep(xp, [ir.Constant(_I64, jq)]), align=1)
            x_hi = builder.load(builder.gep(xp, [ir.Constant(_I64, 4 + jq)]), align=1)
            acc = builder.call(dp, [acc, builder.and_(v, low), _splat(builder, x_lo)])
            acc = builder.call(dp, [acc, builder.and_(builder.lshr(v, four), low), _splat(builder, x_hi)])
        builder.store(acc, op, align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _nibble_dot16_x4(typingctx, w, w_off, x, x_off, x_stride, out, out_off):
    """_nibble_dot16 for 4 activation rows at once (x_off, x_off + x_stride, ...): each weight register is loaded
    and unpacked once for all 4 (prefill). Row j's sums go to out[j * 64 + out_off ...]."""
    sig = types.void(w, w_off, x, x_off, x_stride, out, out_off)

    def codegen(context, builder, signature, args):
        wa, wo, xa, xo, xst, oa, oo = args
        wp = _data_ptr(context, builder, signature.args[0], wa, wo, _V16)
        dp = _dpbusd(builder)
        low = _splat(builder, ir.Constant(_I32, 0x0F0F0F0F))
        four = _splat(builder, ir.Constant(_I32, 4))
        xps = [_data_ptr(context, builder, signature.args[2], xa,
                         builder.add(xo, builder.mul(xst, ir.Constant(xst.type, j))), _I32) for j in range(4)]
        acc = [ir.Constant(_V16, None)] * 4
        for jq in range(4):
            v = builder.load(builder.gep(wp, [ir.Constant(_I64, jq)]), align=1)
            v_lo = builder.and_(v, low)
            v_hi = builder.and_(builder.lshr(v, four), low)
            for j in range(4):
                x_lo = builder.load(builder.gep(xps[j], [ir.Constant(_I64, jq)]), align=1)
                x_hi = builder.load(builder.gep(xps[j], [ir.Constant(_I64, 4 + jq)]), align=1)
                acc[j] = builder.call(dp, [acc[j], v_lo, _splat(builder, x_lo)])
                acc[j] = builder.call(dp, [acc[j], v_hi, _splat(builder, x_hi)])
        for j in range(4):
            op = _data_ptr(context, builder, signature.args[5], oa, builder.add(oo, ir.Constant(oo.type, 64 * j)),
                           _V16)
            builder.store(acc[j], op, align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _nibble_dot16_split(typingctx, w, w_off, x, x_off, out_lo, out_hi, out_off):
    """Q4_K chunk, 16 rows: low nibbles of 8 quads against x[0:32], high nibbles against x[32:64], kept apart."""
    sig = types.void(w, w_off, x, x_off, out_lo, out_hi, out_off)

    def codegen(context, builder, signature, args):
        wa, wo, xa, xo, la, ha, oo = args
        wp = _data_ptr(context, builder, signature.args[0], wa, wo, _V16)
        xp = _data_ptr(context, builder, signature.args[2], xa, xo, _I32)
        lp = _data_ptr(context, builder, signature.args[4], la, oo, _V16)
        hp = _data_ptr(context, builder, signature.args[5], ha, oo, _V16)
        dp = _dpbusd(builder)
        low = _splat(builder, ir.Constant(_I32, 0x0F0F0F0F))
        four = _splat(builder, ir.Constant(_I32, 4))
        acc_lo = ir.Constant(_V16, None)
        acc_hi = ir.Constant(_V16, None)
        for jq in range(8):
            v = builder.load(builder.gep(wp, [ir.Constant(_I64, jq)]), align=1)
            x_lo = builder.load(builder.gep(xp, [ir.Constant(_I64, jq)]), align=1)
            x_hi = builder.load(builder.gep(xp, [ir.Constant(_I64, 8 + jq)]), align=1)
            acc_lo = builder.call(dp, [acc_lo, builder.and_(v, low), _splat(builder, x_lo)])
            acc_hi = builder.call(dp, [acc_hi, builder.and_(builder.lshr(v, four), low), _splat(builder, x_hi)])
        builder.store(acc_lo, lp, align=4)
        builder.store(acc_hi, hp, align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _nibble_dot16_split_x4(typingctx, w, w_off, x, x_off, x_stride, out_lo, out_hi, out_off):
    """_nibble_dot16_split for 4 activation rows at once (x_off, x_off + x_stride, ...): each weight register is
    loaded and unpacked once for all 4 (prefill). Row j's sums go to out_lo/out_hi[j * 64 + out_off ...]."""
    sig = types.void(w, w_off, x, x_off, x_stride, out_lo, out_hi, out_off)

    def codegen(context, builder, signature, args):
        wa, wo, xa, xo, xst, la, ha, oo = args
        wp = _data_ptr(context, builder, signature.args[0], wa, wo, _V16)
        dp = _dpbusd(builder)
        low = _splat(builder, ir.Constant(_I32, 0x0F0F0F0F))
        four = _splat(builder, ir.Constant(_I32, 4))
        xps, lps, hps = [], [], []
        for j in range(4):
            off = builder.add(xo, builder.mul(xst, ir.Constant(xst.type, j)))
            xps.append(_data_ptr(context, builder, signature.args[2], xa, off, _I32))
            o = builder.add(oo, ir.Constant(oo.type, 64 * j))
            lps.append(_data_ptr(context, builder, signature.args[5], la, o, _V16))
            hps.append(_data_ptr(context, builder, signature.args[6], ha, o, _V16))
        acc_lo = [ir.Constant(_V16, None)] * 4
        acc_hi = [ir.Constant(_V16, None)] * 4
        for jq in range(8):
            v = builder.load(builder.gep(wp, [ir.Constant(_I64, jq)]), align=1)
            v_lo = builder.and_(v, low)
            v_hi = builder.and_(builder.lshr(v, four), low)
            for j in range(4):
                x_lo = builder.load(builder.gep(xps[j], [ir.Constant(_I64, jq)]), align=1)
                x_hi = builder.load(builder.gep(xps[j], [ir.Constant(_I64, 8 + jq)]), align=1)
                acc_lo[j] = builder.call(dp, [acc_lo[j], v_lo, _splat(builder, x_lo)])
                acc_hi[j] = builder.call(dp, [acc_hi[j], v_hi, _splat(builder, x_hi)])
        for j in range(4):
            builder.store(acc_lo[j], lps[j], align=4)
            builder.store(acc_hi[j], hps[j], align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _q6_dot16_split(typingctx, w, w_off, x, x_off, out_lo, out_hi, out_off):
    """Q6_K chunk of 32 codes, 16 rows: 4 nibble quads and 2 quads of 2-bit highs rebuilt into 6-bit codes (0..63);
    elements 0-15 (low nibbles) go to out_lo, 16-31 (high nibbles) to out_hi, each summed against x."""
    sig = types.void(w, w_off, x, x_off, out_lo, out_hi, out_off)

    def codegen(context, builder, signature, args):
        wa, wo, xa, xo, la, ha, oo = args
        wp = _data_ptr(context, builder, signature.args[0], wa, wo, _V16)
        xp = _data_ptr(context, builder, signature.args[2], xa, xo, _I32)
        lp = _data_ptr(context, builder, signature.args[4], la, oo, _V16)
        hp = _data_ptr(context, builder, signature.args[5], ha, oo, _V16)
        dp = _dpbusd(builder)
        low4 = _splat(builder, ir.Constant(_I32, 0x0F0F0F0F))
        low2 = _splat(builder, ir.Constant(_I32, 0x03030303))

        def shifted(v, n):
            return builder.lshr(v, _splat(builder, ir.Constant(_I32, n))) if n else v

        def up4(v):
            return builder.shl(v, _splat(builder, ir.Constant(_I32, 4)))

        highs = [builder.load(builder.gep(wp, [ir.Constant(_I64, 4 + i)]), align=1) for i in range(2)]
        acc_lo = ir.Constant(_V16, None)
        acc_hi = ir.Constant(_V16, None)
        for jq in range(4):
            v = builder.load(builder.gep(wp, [ir.Constant(_I64, jq)]), align=1)
            h = highs[jq % 2]
            q_lo = builder.or_(builder.and_(v, low4), up4(builder.and_(shifted(h, 2 * (jq // 2)), low2)))
            q_hi = builder.or_(builder.and_(shifted(v, 4), low4), up4(builder.and_(shifted(h, 4 + 2 * (jq // 2)), low2)))
            x_lo = builder.load(builder.gep(xp, [ir.Constant(_I64, jq)]), align=1)
            x_hi = builder.load(builder.gep(xp, [ir.Constant(_I64, 4 + jq)]), align=1)
            acc_lo = builder.call(dp, [acc_lo, q_lo, _splat(builder, x_lo)])
            acc_hi = builder.call(dp, [acc_hi, q_hi, _splat(builder, x_hi)])
        builder.store(acc_lo, lp, align=4)
        builder.store(acc_hi, hp, align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _int8_dot16(typingctx, w, w_off, x, x_off, out, out_off):
    """Q8_0 block, 16 rows: out[out_off + r] = sum_j w_rj * x_j over 32 signed codes (8 quads)."""
    sig = types.void(w, w_off, x, x_off, out, out_off)

    def codegen(context, builder, signature, args):
        wa, wo, xa, xo, oa, oo = args
        wp = _data_ptr(context, builder, signature.args[0], wa, wo, _V16)
        xp = _data_ptr(context, builder, signature.args[2], xa, xo, _I32)
        op = _data_ptr(context, builder, signature.args[4], oa, oo, _V16)
        dp = _dpbusd(builder)
        ones = _splat(builder, ir.Constant(_I32, 0x01010101))
        flip = ir.Constant(_I32, 0x80808080 - (1 << 32))  # x + 128 as unsigned bytes
        acc = ir.Constant(_V16, None)
        wsum = ir.Constant(_V16, None)
        for jq in range(8):
            v = builder.load(builder.gep(wp, [ir.Constant(_I64, jq)]), align=1)
            xq = builder.xor(builder.load(builder.gep(xp, [ir.Constant(_I64, jq)]), align=1), flip)
            acc = builder.call(dp, [acc, _splat(builder, xq), v])
            wsum = builder.call(dp, [wsum, ones, v])
        res = builder.sub(acc, builder.shl(wsum, _splat(builder, ir.Constant(_I32, 7))))
        builder.store(res, op, align=4)
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
                rq, rr = r // _QUARTER, r % _QUARTER
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


@njit(parallel=True, cache=True)
def pack_q4_k(rows, qs, scm, dd):
    """rows (N, nsb*144) -> qs (G, nsb, 4, 4, 8, 16, 4), scm (G, nsb, 16, ROWS), dd (G, nsb, 2, ROWS)."""
    n = rows.shape[0]
    n_groups, nsb = qs.shape[0], qs.shape[1]
    for g in prange(n_groups):
        r_end = min(ROWS, n - g * ROWS)
        for b in range(nsb):
            o = b * 144
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
                rq, rr = r // _QUARTER, r % _QUARTER
                for c in range(4):
                    for jq in range(8):
                        for jj in range(4):
                            qs[g, b, c, rq, jq, rr, jj] = rows[g * ROWS + r, o + 16 + c * 32 + jq * 4 + jj] \
                                if r < r_end else 0


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
                rq, rr = r // _QUARTER, r % _QUARTER
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
# kernels over runs of activation rows that share an expert (same contract as kernels_packed.py)
# ---------------------------------------------------------------------------------------------------------------
# qs arrives flattened to 1-D (a free view of the packed array) and xq flattened too, so the intrinsics get plain
# element offsets.

@njit(inline="always")
def _q4_0_row_out(a, isum, o, ds, scale, offset):
    """One activation row's block: scale the integer sums isum[o:o+ROWS] into its accumulators a."""
    for r in range(ROWS):
        a[r] += np.float32(isum[o + r] - offset) * (ds[r] * scale)


@njit(parallel=True, cache=True, fastmath=True)
def q4_0_runs(qs, d, xq, xd, xs, run_start, run_expert, n_rows, out):
    n_groups, nb = d.shape[1], d.shape[2]
    k = nb * 32
    n_runs = run_expert.shape[0]
    block = ROWS * 16
    for task in prange(n_runs * n_groups):
        g, e, m0, m1 = _run_task(task, n_groups, run_start, run_expert)
        accf = np.zeros((m1 - m0, ROWS), np.float32)
        ds = np.empty(ROWS, np.float32)
        isum = np.empty(ROWS, np.int32)
        for b in range(nb):
            _halves_to_float(d[e, g, b], ds)
            base = ((e * n_groups + g) * nb + b) * block
            _prefetch_ahead(qs, base, block)
            for m in range(m0, m1):
                for rq in range(4):
                    _nibble_dot16(qs, base + rq * 256, xq, m * k + b * 32, isum, rq * _QUARTER)
                scale = xd[m, b]
                offset = 8 * xs[m, b]
                a = accf[m - m0]
                for r in range(ROWS):
                    a[r] += np.float32(isum[r] - offset) * (ds[r] * scale)
        _store_group(out, accf, g, m0, m1, n_rows)


@njit(parallel=True, cache=True, fastmath=True)
def q4_0_runs_x4(qs, d, xq, xd, xs, run_start, run_expert, n_rows, out):
    """q4_0_runs for calls with 4 or more activation rows (prefill): four rows share each unpacked weight
    register. A kernel of its own, because folding this into q4_0_runs made LLVM compile the decode loop ~5-8%
    slower (model-level A/B, 3 alternations)."""
    n_groups, nb = d.shape[1], d.shape[2]
    k = nb * 32
    n_runs = run_expert.shape[0]
    block = ROWS * 16
    for task in prange(n_runs * n_groups):
        g, e, m0, m1 = _run_task(task, n_groups, run_start, run_expert)
        accf = np.zeros((m1 - m0, ROWS), np.float32)
        ds = np.empty(ROWS, np.float32)
        isum = np.empty(4 * ROWS, np.int32)
        for b in range(nb):
            _halves_to_float(d[e, g, b], ds)
            base = ((e * n_groups + g) * nb + b) * block
            m = m0
            while m + 4 <= m1:  # prefill: four activation rows share each unpacked weight register
                for rq in range(4):
                    _nibble_dot16_x4(qs, base + rq * 256, xq, m * k + b * 32, k, isum, rq * _QUARTER)
                for j in range(4):
                    _q4_0_row_out(accf[m + j - m0], isum, j * ROWS, ds, xd[m + j, b], 8 * xs[m + j, b])
                m += 4
            while m < m1:
                for rq in range(4):
                    _nibble_dot16(qs, base + rq * 256, xq, m * k + b * 32, isum, rq * _QUARTER)
                _q4_0_row_out(accf[m - m0], isum, 0, ds, xd[m, b], 8 * xs[m, b])
                m += 1
        _store_group(out, accf, g, m0, m1, n_rows)


@njit(parallel=True, cache=True, fastmath=True)
def q8_0_runs(qs, d, xq, xd, xs, run_start, run_expert, n_rows, out):
    n_groups, nb = d.shape[1], d.shape[2]
    k = nb * 32
    n_runs = run_expert.shape[0]
    block = ROWS * 32
    for task in prange(n_runs * n_groups):
        g, e, m0, m1 = _run_task(task, n_groups, run_start, run_expert)
        accf = np.zeros((m1 - m0, ROWS), np.float32)
        ds = np.empty(ROWS, np.float32)
        isum = np.empty(ROWS, np.int32)
        for b in range(nb):
            _halves_to_float(d[e, g, b], ds)
            base = ((e * n_groups + g) * nb + b) * block
            _prefetch_ahead(qs, base, block)
            for m in range(m0, m1):
                for rq in range(4):
                    _int8_dot16(qs, base + rq * 512, xq, m * k + b * 32, isum, rq * _QUARTER)
                scale = xd[m, b]
                a = accf[m - m0]
                for r in range(ROWS):
                    a[r] += np.float32(isum[r]) * (ds[r] * scale)
        _store_group(out, accf, g, m0, m1, n_rows)


@njit(inline="always")
def _q4_k_rows_out(a, isum_lo, isum_hi, o, fsc, fmn, c, s_lo, s_hi, x_lo, x_hi):
    """One activation row's chunk c: scale the integer sums (isum_*[o:o+ROWS]) into its accumulators a."""
    for r in range(ROWS):
        a[r] += s_lo * (fsc[2 * c, r] * np.float32(isum_lo[o + r]) - fmn[2 * c, r] * x_lo)
        a[r] += s_hi * (fsc[2 * c + 1, r] * np.float32(isum_hi[o + r]) - fmn[2 * c + 1, r] * x_hi)


@njit(parallel=True, cache=True, fastmath=True)
def q4_k_runs(qs, scm, dd, xq, xd, xs, run_start, run_expert, n_rows, out):
    n_groups, nsb = dd.shape[1], dd.shape[2]
    k = nsb * 256
    n_runs = run_expert.shape[0]
    block = ROWS * 128
    for task in prange(n_runs * n_groups):
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
            for m in range(m0, m1):
                a = accf[m - m0]
                for c in range(4):
                    if m == m0:  # a chunk (2 KiB) at a time, as measured
                        _prefetch_ahead(qs, base + c * 2048, 2048)
                    k0 = b * 256 + c * 64
                    for rq in range(4):
                        _nibble_dot16_split(qs, base + c * 2048 + rq * 512, xq, m * k + k0,
                                            isum_lo, isum_hi, rq * _QUARTER)
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
def q4_k_runs_x4(qs, scm, dd, xq, xd, xs, run_start, run_expert, n_rows, out):
    """q4_k_runs for calls with 4 or more activation rows (prefill): four rows share each unpacked weight
    register, and the sub-block scale products are made once per superblock for all rows."""
    n_groups, nsb = dd.shape[1], dd.shape[2]
    k = nsb * 256
    n_runs = run_expert.shape[0]
    block = ROWS * 128
    for task in prange(n_runs * n_groups):
        g, e, m0, m1 = _run_task(task, n_groups, run_start, run_expert)
        accf = np.zeros((m1 - m0, ROWS), np.float32)
        dsup = np.empty(ROWS, np.float32)
        dmin = np.empty(ROWS, np.float32)
        fsc = np.empty((8, ROWS), np.float32)  # prefill: d * scale and dmin * min of each sub-block, once
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
            while m + 4 <= m1:  # prefill: four activation rows share each unpacked weight register
                for c in range(4):
                    k0 = b * 256 + c * 64
                    for rq in range(4):
                        _nibble_dot16_split_x4(qs, base + c * 2048 + rq * 512, xq, m * k + k0, k,
                                               isum_lo, isum_hi, rq * _QUARTER)
                    blk = k0 // 32
                    for j in range(4):
                        _q4_k_rows_out(accf[m + j - m0], isum_lo, isum_hi, j * ROWS, fsc, fmn, c,
                                       xd[m + j, blk], xd[m + j, blk + 1],
                                       np.float32(xs[m + j, blk]), np.float32(xs[m + j, blk + 1]))
                m += 4
            while m < m1:
                for c in range(4):
                    k0 = b * 256 + c * 64
                    for rq in range(4):
                        _nibble_dot16_split(qs, base + c * 2048 + rq * 512, xq, m * k + k0,
                                            isum_lo, isum_hi, rq * _QUARTER)
                    blk = k0 // 32
                    _q4_k_rows_out(accf[m - m0], isum_lo, isum_hi, 0, fsc, fmn, c, xd[m, blk], xd[m, blk + 1],
                                   np.float32(xs[m, blk]), np.float32(xs[m, blk + 1]))
                m += 1
        _store_group(out, accf, g, m0, m1, n_rows)


@njit(parallel=True, cache=True, fastmath=True)
def q6_k_runs(qs, sc, d, xq, xd, xs16, run_start, run_expert, n_rows, out):
    """As q4_k_runs for Q6_K; xs16 holds the activations' sums per 16 (the code offset 32 comes off with them)."""
    n_groups, nsb = d.shape[1], d.shape[2]
    k = nsb * 256
    n_runs = run_expert.shape[0]
    block = ROWS * 192
    for task in prange(n_runs * n_groups):
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
                a = accf[m - m0]
                for t in range(8):
                    if m == m0:
                        _prefetch_ahead(qs, base + t * 1536, 1536)
                    for rq in range(4):
                        _q6_dot16_split(qs, base + t * 1536 + rq * 384, xq, m * k + b * 256 + t * 32,
                                        isum_lo, isum_hi, rq * _QUARTER)
                    blk = b * 8 + t
                    s = xd[m, blk]
                    off_lo = 32 * xs16[m, 2 * blk]
                    off_hi = 32 * xs16[m, 2 * blk + 1]
                    for r in range(ROWS):
                        a[r] += s * dsup[r] * (np.float32(scb[2 * t, r]) * np.float32(isum_lo[r] - off_lo)
                                               + np.float32(scb[2 * t + 1, r]) * np.float32(isum_hi[r] - off_hi))
        _store_group(out, accf, g, m0, m1, n_rows)

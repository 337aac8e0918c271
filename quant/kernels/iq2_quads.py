"""IQ2_XS and IQ2_XXS in the integer families: packing and kernels for lattice grids of 8 values per index.

IQ2_XS (ggml-common.h block_iq2_xs, dequantize_row_iq2_xs) codes 8 values at a time as one uint16: a 9-bit index
into iq2xs_grid (512 entries of 8 unsigned bytes, each 8, 25 or 43) and 7 sign bits, the eighth sign making the
count of minus signs even (ksigns_iq2xs); a 4-bit scale per 16 values gives d * (0.5 + s) / 4 = d / 8 * (2 s + 1).

One grid entry is 8 values of one row, so here a 64-bit lane is one row: a logical register (<16 x i32>) of grid
values holds 8 rows ("an octet") x 8 values, two 32-bit lanes per row, and the grid entries are fetched by
vpgatherdq, 8 at a time, against one load per 4 values if the entries were split into the 32-bit lanes of the quads
layout (as IQ3_XXS's 4-value entries are). The code words stay in the quads layout (one 32-bit word of 16 rows per
logical register), so indices, signs and scales are unpacked for 16 rows at a time. The 8 activation bytes are
broadcast to every lane, negated per byte under the row's signs (the sign bits become a byte mask in the kernel,
parity included, so the packed codes stay the file's 16 bits per 8 values), and multiplied by the family's
unsigned-by-signed byte dot; each 16 values' int32 sums are scaled by 2 s + 1 in integers, and a row's two lanes
are added once per super-block. Activations are Q8_K, so a super-block meets d / 8 and the activation scale once
per row, as in llama.cpp's AVX2 ggml_vec_dot_iq2_xs_q8_K (ggml/src/ggml-cpu/arch/x86/quants.c), which loads the
grid entries one by one for 4 x 8 values of one row and applies the signs to the activations with vpsignb.

That is the decode kernel. In prefill, where the gathers would be repeated for every 4 activation rows and cost more
than the byte dots, a run of rows that share an expert unpacks each super-block once (the _unpack16 intrinsics) to
unsigned bytes in the quads layout of quads.py (16 rows x 4 values per register, shuffled from the gathered octets:
one scale multiply per 4 or 8 byte dots and no row sums), 64 + signed grid value for IQ2, IQ1's table bytes as they
are, with the scales as int16 pairs after the values; every row then multiplies those against its activations
(_unpacked_dot16) and the offset comes off as the scale pairs times the activations' group sums.

IQ2_XXS (block_iq2_xxs, dequantize_row_iq2_xxs) is the same scheme on a smaller grid: per 32 values one uint32 of 4
8-bit indices into iq2xxs_grid (256 entries) and one of 4 x 7 sign bits with the sub-block's 4-bit scale on top,
d * (0.5 + s) / 4 again; the kernel differs only in where it finds indices, signs and scales.

Layouts (per expert; G groups of 64 rows, nsb super-blocks), codes (G, nsb, 4 quarters, 16 words, 16 rows, 4 bytes):
  IQ2_XS  word w of a row is the file's qs[2 w] | qs[2 w + 1] << 16, values 16 w..16 w + 15, whose scale is the
          nibble w % 2 of scales[w // 2]; scales (G, nsb, 8, ROWS) uint8: the file's scale bytes, byte s of each row
          (sub-block of 32 s); d (G, nsb, ROWS) f16 bits.  74 bytes per 256, as the file.
  IQ2_XXS word 2 s of a row holds sub-block s's 4 grid indices, word 2 s + 1 its signs and scale, as in the file;
          d (G, nsb, ROWS).  66 bytes per 256, as the file.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

# numba caches a kernel by its own file only: when a helper imported here changes, this file must change too
from ..iq_grids import IQ1S_GRID, IQ2XS_GRID, IQ2XXS_GRID
from . import avx2, avx512vnni, avxvnni
from .portable import ROWS, _halves_to_float, _run_task, _store_group
from .quads import _BYTE_DOTS, QUARTER, _f16_bits, _literals, _store_rows
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

__all__ = ["make_iq2_runs", "pack_iq1_m", "pack_iq1_s", "pack_iq2_xs", "pack_iq2_xxs"]

OCTET = 8  # rows per logical register of grid values: one 64-bit grid entry per row
B64 = ir.VectorType(I8, 64)
B32 = ir.VectorType(I8, 32)
B16 = ir.VectorType(I8, 16)
Q4 = ir.VectorType(I64, 4)
Q8 = ir.VectorType(I64, 8)
V4 = ir.VectorType(I32, 4)

# The grids as one little-endian uint64 per entry: a row's 8 values in memory order.
_GRID2 = np.ascontiguousarray(IQ2XS_GRID).view("<u8").reshape(-1).astype(np.uint64)
# ... each byte plus 64 (grid values are at most 43): the unsigned form the prefill kernels multiply
_GRID2_U = _GRID2 + np.uint64(0x4040404040404040)
_GRID2XXS = np.ascontiguousarray(IQ2XXS_GRID).view("<u8").reshape(-1).astype(np.uint64)
_GRID2XXS_U = _GRID2XXS + np.uint64(0x4040404040404040)

# IQ1_S/IQ1_M: values d (2 s + 1) (g +- 1/8) with g in -1, 0, 1, so 8 times a value over d (2 s + 1) is 8 g +- 1;
# 9 more makes it unsigned (0..18) for the byte dot, and 9 times the activations' sum comes off afterwards. The table
# holds 8 g + 9 + 1 at entries 0..2047 and 8 g + 9 - 1 at 2048..4095 (the delta's sign as index bit 11). llama.cpp's
# ggml_vec_dot_iq1_s_q8_K / iq1_m (ggml/src/ggml-cpu/arch/x86/quants.c) multiply the signed grid and add the delta
# from the block sums (IQ1_S) or a second byte dot against +-1 (IQ1_M); folding it into the table needs one dot.
_GRID1 = np.ascontiguousarray((8 * IQ1S_GRID.astype(np.int16)[None] + 9 + np.array([1, -1], np.int16)[:, None, None])
                              .astype(np.uint8)).reshape(4096, 8).view("<u8").reshape(-1)
_BOUND1 = 2 * 18 * 127

# 0x80 (as a signed byte) for a nibble with an odd number of bits set: the sign that makes a lattice point's count of
# minus signs even.
_PARITY_TOP = [-128 * (i.bit_count() & 1) for i in range(16)]

# The largest |u0 s0 + u1 s1| of two grid values by two activation bytes (AVX2 widens its 16-bit sums before this
# can saturate).
_BOUND = 2 * 43 * 127


# The families whose IQ2_XS and IQ2_XXS decode kernels load grid entries one by one (_load8), as llama.cpp's AVX2
# kernels do: with scalar index loads that beats two ymm vpgatherdq per octet, while one zmm gather (avx512vnni) beats
# eight loads. IQ1_S/IQ1_M and the prefill unpacking keep the gathers.
_ONE_BY_ONE = frozenset({avx2.KEY, avxvnni.KEY})


def _load8(builder, base, words, o, byte, bits, mask):
    """The grid entries of octet o's 8 rows loaded one by one, as llama.cpp's AVX2 kernels load them: each row's index
    read as a scalar (`bits` wide, at `byte` of its 32-bit lane of the code-word register at `words`, a <16 x i32>
    pointer), masked, and its uint64 entry at base[index] put into the row's lane. Reading the index from memory
    spares extracting it from a vector register (vpextrd, two uops on Intel)."""
    ity = ir.IntType(bits)
    wb = builder.bitcast(words, I8.as_pointer())
    vals = ir.Constant(Q8, ir.Undefined)
    for r in range(OCTET):
        at = builder.bitcast(builder.gep(wb, [ir.Constant(I64, 4 * (OCTET * o + r) + byte)]), ity.as_pointer())
        j = builder.and_(builder.zext(builder.load(at, align=1), I64), ir.Constant(I64, mask))
        vals = builder.insert_element(vals, builder.load(builder.gep(base, [j]), align=8), ir.Constant(I32, r))
    return builder.bitcast(vals, V16)


# The two shuffles that split two octets' registers (8 rows x 8 values each) into the quads layout's pair of
# registers: values 0-3 of all 16 rows, then values 4-7.
_OCTETS_TO_QUADS = [ir.Constant(V16, list(range(p, 32, 2))) for p in range(2)]


def _store_as_quads(builder, up, octs, k):
    """Two octets' registers of 8 values per row into the quads layout at registers 2 k and 2 k + 1 of up."""
    for half, sel in enumerate(_OCTETS_TO_QUADS):
        builder.store(builder.shuffle_vector(octs[0], octs[1], sel), builder.gep(up, [ir.Constant(I64, 2 * k + half)]),
                      align=1)


def _store_scale_pairs(builder, sp, up):
    """The 16 rows' 8 scale bytes (sp: register s holds scale byte s of every row, as IQ2_XS and IQ2_S pack
    scales), each nibble as 2 s + 1, into up's registers 64 + s as int16 pairs (the form _unpacked_dot16 reads)."""
    for t in range(8):
        sb = builder.zext(builder.load(builder.bitcast(builder.gep(sp, [ir.Constant(I64, t)]), B16.as_pointer()),
                                       align=1), V16)
        pair = builder.or_(_odd(builder, _c(builder.and_, sb, 15)),
                           _c(builder.shl, _odd(builder, _c(builder.lshr, sb, 4)), 16))
        builder.store(pair, builder.gep(up, [ir.Constant(I64, 64 + t)]), align=1)


def _gather8(builder, wide, base, idx):
    """base[idx[i]] for the 8 lanes of idx (<8 x i32>; base a pointer to uint64 entries) as one logical register:
    one vpgatherdq zmm on AVX-512, two ymm ones (AVX2's) otherwise."""
    ptr = builder.bitcast(base, I8.as_pointer())
    if wide:
        mask_t = ir.VectorType(ir.IntType(1), 8)
        fn = intrinsic_fn(builder, "llvm.x86.avx512.mask.gather.dpq.512", Q8, [Q8, I8.as_pointer(), V8, mask_t, I32])
        got = builder.call(fn, [ir.Constant(Q8, None), ptr, idx, ir.Constant(mask_t, [1] * 8), ir.Constant(I32, 8)])
        return builder.bitcast(got, V16)
    fn = intrinsic_fn(builder, "llvm.x86.avx2.gather.d.q.256", Q4, [Q4, I8.as_pointer(), V4, Q4, I8])
    undef = ir.Constant(V8, ir.Undefined)
    parts = [builder.call(fn, [ir.Constant(Q4, None), ptr,
                               builder.shuffle_vector(idx, undef, ir.Constant(V4, list(range(4 * h, 4 * h + 4)))),
                               ir.Constant(Q4, [-1] * 4), ir.Constant(I8, 8)]) for h in range(2)]
    return builder.bitcast(builder.shuffle_vector(parts[0], parts[1], ir.Constant(V8, list(range(8)))), V16)


def _c(op, v, k):
    """op(v, k in every lane) for a logical register v."""
    return op(v, ir.Constant(V16, [k] * 16))


def _with_parity(builder, seven):
    """Sign bytes (a logical register, 7 sign bits in the bytes that matter, 0 in their top bit and in the bits above each in
    its nibble-fold) with the eighth bit set to the parity of the seven (ksigns_iq2xs): each folded to a nibble of
    the same parity, then a byte shuffle with a table of nibble parities, as llama.cpp does."""
    nib = builder.and_(builder.xor(seven, _c(builder.lshr, seven, 4)), splat(builder, ir.Constant(I32, 0x0F0F0F0F)))
    fn = intrinsic_fn(builder, "llvm.x86.avx2.pshuf.b", B32, [B32, B32])
    top = join(builder, *(builder.bitcast(builder.call(fn, [ir.Constant(B32, _PARITY_TOP * 2), builder.bitcast(h, B32)]),
                                          V8) for h in halves(builder, nib)))
    return builder.or_(seven, top)


def _xs_signs(builder, words):
    """IQ2_XS: the 8 sign bits of both entries of each lane of words (two file uint16 per lane): entry 0's in byte 0,
    entry 1's in byte 2."""
    return _with_parity(builder, _c(builder.and_, _c(builder.lshr, words, 9), 0x007F007F))


def _xxs_signs(builder, words):
    """IQ2_XXS: the 4 x 7 sign bits of a sign-and-scale word spread to one byte per entry, with their parity bits."""
    spread = _c(builder.and_, words, 0x7F)
    for j in range(1, 4):
        spread = builder.or_(spread, _c(builder.and_, _c(builder.shl, words, j), 0x7F << (8 * j)))
    return _with_parity(builder, spread)


def _sign_mask(builder, signs, o, byte):
    """For octet o of the 16 rows in signs: byte j of row r's 64-bit lane set where bit j of the sign byte at `byte`
    of the row's lane is (an <64 x i1>)."""
    rep = builder.shuffle_vector(builder.bitcast(signs, B64), ir.Constant(B64, ir.Undefined), ir.Constant(
        ir.VectorType(I32, 64), [4 * (OCTET * o + r) + byte for r in range(OCTET) for _ in range(8)]))
    bits = builder.and_(rep, ir.Constant(B64, [1 << j for j in range(8)] * OCTET))
    return builder.icmp_unsigned("!=", bits, ir.Constant(B64, None))


def _dup_rows(builder, v, o):
    """The values of octet o's rows in a logical register of 16 rows -> each row's value in both of its lanes."""
    return builder.shuffle_vector(v, ir.Constant(V16, ir.Undefined), ir.Constant(V16, [OCTET * o + r // 2
                                                                                        for r in range(16)]))


def _odd(builder, v):
    return _c(builder.or_, _c(builder.shl, v, 1), 1)


def _octet_idx(builder, idx, o):
    return builder.shuffle_vector(idx, ir.Constant(V16, ir.Undefined), ir.Constant(V8, list(range(8 * o, 8 * o + 8))))


def _x_bytes(builder, xps, i):
    """Per activation row, the 8 bytes of x at xps[j][i] in every 64-bit lane, and their negation."""
    undef = ir.Constant(Q8, ir.Undefined)
    out = []
    for xp_ in xps:
        v = builder.insert_element(undef, builder.load(builder.gep(xp_, [ir.Constant(I64, i)]), align=1),
                                   ir.Constant(I32, 0))
        vb = builder.bitcast(builder.shuffle_vector(v, undef, ir.Constant(V8, [0] * 8)), B64)
        out.append((vb, builder.sub(ir.Constant(B64, None), vb)))
    return out


def _signed(builder, mask, xb):
    return builder.bitcast(builder.select(mask, xb[1], xb[0]), V16)


def _row_sums(builder, lo, hi):
    """Two octets' registers (two lanes per row) -> one register of their 16 rows' sums."""
    even = builder.shuffle_vector(lo, hi, ir.Constant(V16, list(range(0, 32, 2))))
    odd = builder.shuffle_vector(lo, hi, ir.Constant(V16, list(range(1, 32, 2))))
    return builder.add(even, odd)


@intrinsic(prefer_literal=True)
def _iq2_xs_sb16(typingctx, fam, n, w, w_off, sc, sc_off, grid, x, x_off, x_stride, isum, out_off):
    """IQ2_XS super-block, 16 rows (two octets), against Q8_K activations, in integers:
    isum[j*ROWS + out_off + r] = sum over the 16 groups h of 16 values of (2 s_rh + 1) * (grid values . signed x_jh).

    w: the 16 rows' code words at w_off (word h at w_off + 64 h bytes); sc: the scale bytes at sc_off (sub-block s:
    16 rows' bytes at sc_off + 64 s); grid: the uint64 table."""
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
            for h in range(2):
                xs = [_x_bytes(builder, xps, 4 * s + 2 * h + e) for e in range(2)]
                wq = builder.gep(wp, [ir.Constant(I64, 2 * s + h)])
                words = builder.load(wq, align=1)
                signs = _xs_signs(builder, words)
                idx = None if f in _ONE_BY_ONE else [_c(builder.and_, words, 511),
                                                     _c(builder.and_, _c(builder.lshr, words, 16), 511)]
                for o in range(2):
                    grids = [_load8(builder, gp, wq, o, 2 * e, 16, 511) if idx is None else
                             _gather8(builder, wide, gp, _octet_idx(builder, idx[e], o)) for e in range(2)]
                    masks = [_sign_mask(builder, signs, o, 2 * e) for e in range(2)]
                    scale = _dup_rows(builder, scales[h], o)
                    for jx in range(n_x):
                        pairs = [(grids[e], _signed(builder, masks[e], xs[e][jx])) for e in range(2)]
                        accs[jx][o] = dot.scaled_dot(builder, accs[jx][o], pairs, _BOUND, scale)
        for jx in range(n_x):
            _store_rows(context, builder, signature.args[10], ia, oo, jx, _row_sums(builder, *accs[jx]))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic(prefer_literal=True)
def _iq2_xs_unpack16(typingctx, fam, w, w_off, sc, sc_off, grid, u, u_off):
    """IQ2_XS: 16 rows' super-block as unsigned bytes 64 + signed grid value, into u at u_off in the quads layout
    (16 rows x 4 values per logical register, as quads.py's): values 4 q..4 q + 3 at register q, so a 16-value scale
    group is 4 registers of 16 rows and its scale multiplies once per 4 byte dots; then at 64 + t the scales 2 s + 1
    of groups 2 t, 2 t + 1 as int16 pairs (_unpacked_dot16). grid: the table _GRID2_U."""
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
        for h in range(16):
            words = builder.load(builder.gep(wp, [ir.Constant(I64, h)]), align=1)
            signs = _xs_signs(builder, words)
            idx = [_c(builder.and_, words, 511), _c(builder.and_, _c(builder.lshr, words, 16), 511)]
            for e in range(2):
                octs = [_unsigned_signed(builder, _sign_mask(builder, signs, o, 2 * e),
                                         _gather8(builder, wide, gp, _octet_idx(builder, idx[e], o))) for o in range(2)]
                _store_as_quads(builder, up, octs, 2 * h + e)
        return context.get_dummy_value()

    return sig, codegen


def _unsigned_signed(builder, mask, grid):
    """grid holds 64 + v per byte; where mask (<64 x i1>) is set, 64 - v = 128 - (64 + v)."""
    gb = builder.bitcast(grid, B64)
    return builder.bitcast(builder.select(mask, builder.sub(ir.Constant(B64, [128] * 64), gb), gb), V16)


@intrinsic(prefer_literal=True)
def _iq2_xxs_sb16(typingctx, fam, n, w, w_off, grid, x, x_off, x_stride, isum, out_off):
    """IQ2_XXS super-block, 16 rows (two octets), against Q8_K activations, in integers:
    isum[j*ROWS + out_off + r] = sum over the 8 sub-blocks s of (2 s_rs + 1) * (grid values . signed x_js).

    w: the 16 rows' code words at w_off as for IQ2_XS (words 2 s and 2 s + 1: indices, signs and scale)."""
    lits = _literals(fam, n)
    if lits is None:
        return None
    f, n_x = lits
    dot, wide = _BYTE_DOTS[f], f == avx512vnni.KEY
    sig = types.void(fam, n, w, w_off, grid, x, x_off, x_stride, isum, out_off)

    def codegen(context, builder, signature, args):
        (_, _, wa, wo, ga, xa, xo, xst, ia, oo) = args
        wp = data_ptr(context, builder, signature.args[2], wa, wo, V16)
        gp = data_ptr(context, builder, signature.args[4], ga, ir.Constant(I64, 0), I64)
        xps = [data_ptr(context, builder, signature.args[5], xa, builder.add(xo, builder.mul(xst, ir.Constant(
            xst.type, j))), I64) for j in range(n_x)]
        accs = [[ir.Constant(V16, None)] * 2 for _ in range(n_x)]
        for s in range(8):
            xs = [_x_bytes(builder, xps, 4 * s + e) for e in range(4)]
            wq = builder.gep(wp, [ir.Constant(I64, 2 * s)])
            words = builder.load(wq, align=1)
            aux = builder.load(builder.gep(wp, [ir.Constant(I64, 2 * s + 1)]), align=1)
            signs = _xxs_signs(builder, aux)
            scales = _odd(builder, _c(builder.lshr, aux, 28))
            idx = None if f in _ONE_BY_ONE else [_c(builder.and_, _c(builder.lshr, words, 8 * e) if e else words, 255)
                                                 for e in range(4)]
            for o in range(2):
                grids = [_load8(builder, gp, wq, o, e, 8, 255) if idx is None else
                         _gather8(builder, wide, gp, _octet_idx(builder, idx[e], o)) for e in range(4)]
                masks = [_sign_mask(builder, signs, o, e) for e in range(4)]
                scale = _dup_rows(builder, scales, o)
                for jx in range(n_x):
                    pairs = [(grids[e], _signed(builder, masks[e], xs[e][jx])) for e in range(4)]
                    accs[jx][o] = dot.scaled_dot(builder, accs[jx][o], pairs, _BOUND, scale)
        for jx in range(n_x):
            _store_rows(context, builder, signature.args[8], ia, oo, jx, _row_sums(builder, *accs[jx]))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic(prefer_literal=True)
def _iq2_xxs_unpack16(typingctx, fam, w, w_off, grid, u, u_off):
    """IQ2_XXS: 16 rows' super-block as unsigned bytes 64 + signed grid value, into u at u_off in the quads layout
    (values 4 q..4 q + 3 at register q), then 4 registers of the sub-block scales 2 s + 1 as int16 pairs (pair t:
    sub-blocks 2 t, 2 t + 1), which the file keeps inside the sign words. grid: the table _GRID2XXS_U."""
    lits = _literals(fam)
    if lits is None:
        return None
    wide = lits[0] == avx512vnni.KEY
    sig = types.void(fam, w, w_off, grid, u, u_off)

    def codegen(context, builder, signature, args):
        (_, wa, wo, ga, ua, uo) = args
        wp = data_ptr(context, builder, signature.args[1], wa, wo, V16)
        gp = data_ptr(context, builder, signature.args[3], ga, ir.Constant(I64, 0), I64)
        up = data_ptr(context, builder, signature.args[4], ua, uo, V16)
        scales = []
        for s in range(8):
            words = builder.load(builder.gep(wp, [ir.Constant(I64, 2 * s)]), align=1)
            aux = builder.load(builder.gep(wp, [ir.Constant(I64, 2 * s + 1)]), align=1)
            signs = _xxs_signs(builder, aux)
            scales.append(_odd(builder, _c(builder.lshr, aux, 28)))
            for e in range(4):
                idx = _c(builder.and_, _c(builder.lshr, words, 8 * e) if e else words, 255)
                octs = [_unsigned_signed(builder, _sign_mask(builder, signs, o, e),
                                         _gather8(builder, wide, gp, _octet_idx(builder, idx, o))) for o in range(2)]
                _store_as_quads(builder, up, octs, 4 * s + e)
        for t in range(4):
            builder.store(builder.or_(scales[2 * t], _c(builder.shl, scales[2 * t + 1], 16)),
                          builder.gep(up, [ir.Constant(I64, 64 + t)]), align=1)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic(prefer_literal=True)
def _unpacked_dot16(typingctx, fam, n, group, offset, u, u_off, x, x_off, x_stride, xp, xp_off, xp_stride, isum,
                    out_off):
    """16 rows' super-block unpacked to unsigned bytes offset + v in the quads layout (registers 0-63; the unpack
    intrinsics above) against n rows of Q8_K activations: isum[j*ROWS + out_off + r] = sum over the scale groups t
    (group = 16 or 32 values) of ls_rt * ((offset + v) . x_jt - offset * sum x_jt). The scales ls are int16 pairs
    at registers 64.. (groups 2 p, 2 p + 1 at 64 + p), xp each row's sums per group as int16 pairs (activations.py's
    pairs or pairs16), so one 16-bit multiply-add takes the offset off two groups."""
    lits = _literals(fam, n, group, offset)
    if lits is None:
        return None
    f, n_x, per, off = lits
    dot = _BYTE_DOTS[f]
    sig = types.void(fam, n, group, offset, u, u_off, x, x_off, x_stride, xp, xp_off, xp_stride, isum, out_off)
    bound = 2 * (64 + 43) * 128 if off == 64 else 2 * 18 * 128
    quads_per = per // 4

    def codegen(context, builder, signature, args):
        (_, _, _, _, ua, uo, xa, xo, xst, pa, po, pst, ia, oo) = args
        up = data_ptr(context, builder, signature.args[4], ua, uo, V16)
        xps = [data_ptr(context, builder, signature.args[6], xa, builder.add(xo, builder.mul(xst, ir.Constant(
            xst.type, j))), I32) for j in range(n_x)]
        pps = [data_ptr(context, builder, signature.args[9], pa, builder.add(po, builder.mul(pst, ir.Constant(
            pst.type, j))), I32) for j in range(n_x)]
        zero = ir.Constant(V16, None)
        accs = [zero] * n_x
        corr = [zero] * n_x
        for t in range(256 // per):
            pair = builder.load(builder.gep(up, [ir.Constant(I64, 64 + t // 2)]), align=1)
            scale = _c(builder.and_, pair, 0xFFFF) if t % 2 == 0 else _c(builder.lshr, pair, 16)
            q0 = quads_per * t
            ws = [builder.load(builder.gep(up, [ir.Constant(I64, q0 + q)]), align=1) for q in range(quads_per)]
            for jx, xp_ in enumerate(xps):
                pairs = [(ws[q], splat(builder, builder.load(builder.gep(xp_, [ir.Constant(I64, q0 + q)]),
                                                             align=1))) for q in range(quads_per)]
                accs[jx] = dot.scaled_dot(builder, accs[jx], pairs, bound, scale)
                if t % 2:
                    corr[jx] = dot.word_dot(builder, corr[jx], pair, splat(builder, builder.load(builder.gep(
                        pps[jx], [ir.Constant(I64, t // 2)]), align=1)))
        for jx in range(n_x):
            c = _c(builder.shl, corr[jx], 6) if off == 64 else _c(builder.mul, corr[jx], off)
            _store_rows(context, builder, signature.args[12], ia, oo, jx, builder.sub(accs[jx], c))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic(prefer_literal=True)
def _iq1_unpack16(typingctx, fam, kind, w, w_off, grid, u, u_off):
    """IQ1_S (kind 0) or IQ1_M (kind 1): 16 rows' super-block as the table's unsigned bytes 8 g + 9 +- 1 in the quads
    layout (values 4 q..4 q + 3 at register q), then the scale pairs for _unpacked_dot16 (groups of 32 values for
    IQ1_S, 16 for IQ1_M)."""
    lits = _literals(fam, kind)
    if lits is None:
        return None
    wide, m_kind = lits[0] == avx512vnni.KEY, lits[1]
    sig = types.void(fam, kind, w, w_off, grid, u, u_off)

    def codegen(context, builder, signature, args):
        (_, _, wa, wo, ga, ua, uo) = args
        wp = data_ptr(context, builder, signature.args[2], wa, wo, V16)
        gp = data_ptr(context, builder, signature.args[4], ga, ir.Constant(I64, 0), I64)
        up = data_ptr(context, builder, signature.args[5], ua, uo, V16)

        def put(i, v):
            builder.store(v, builder.gep(up, [ir.Constant(I64, i)]), align=1)

        for s in range(8):
            words = builder.load(builder.gep(wp, [ir.Constant(I64, s)]), align=1)
            qhw = builder.load(builder.gep(wp, [ir.Constant(I64, 8 + s // 2)]), align=1)
            qh = _c(builder.and_, qhw, 0xFFFF) if s % 2 == 0 else _c(builder.lshr, qhw, 16)
            low = [_c(builder.and_, _c(builder.lshr, words, 8 * l) if l else words, 255) for l in range(4)]
            if m_kind == 0:  # as _iq1_sb16
                sign = _c(builder.and_, _c(builder.lshr, qh, 4), 0x800)
                high = [_c(builder.and_, _c(builder.shl, qh, 8 - 3 * l) if l < 3 else _c(builder.lshr, qh, 1), 0x700)
                        for l in range(4)]
                idx = [builder.or_(builder.or_(lo, hi), sign) for lo, hi in zip(low, high)]
                if s % 2:
                    put(64 + s // 2, _c(builder.or_, _c(builder.and_, _c(builder.lshr, qhw, 11), 0x000E000E),
                                        0x00010001))
            else:
                idx = [builder.or_(lo, _c(builder.shl, _c(builder.and_, _c(builder.lshr, qh, 4 * l) if l else qh,
                                                          15), 8)) for l, lo in enumerate(low)]
                scw = builder.load(builder.gep(wp, [ir.Constant(I64, 12 + s // 4)]), align=1)
                sc16 = _c(builder.lshr, scw, 16 * ((s // 2) % 2) + 6 * (s % 2))
                halves_ = [_odd(builder, _c(builder.and_, _c(builder.lshr, sc16, 3 * h) if h else sc16, 7))
                           for h in range(2)]
                put(64 + s, builder.or_(halves_[0], _c(builder.shl, halves_[1], 16)))
            for l in range(4):
                octs = [_gather8(builder, wide, gp, _octet_idx(builder, idx[l], o)) for o in range(2)]
                _store_as_quads(builder, up, octs, 4 * s + l)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic(prefer_literal=True)
def _iq1_sb16(typingctx, fam, kind, n, w, w_off, grid, x, x_off, x_stride, xp, xp_off, xp_stride, isum, out_off):
    """IQ1_S (kind 0) or IQ1_M (kind 1) super-block, 16 rows (two octets), against Q8_K activations, in integers:
    isum[j*ROWS + out_off + r] = sum over the scale groups t (32 values for IQ1_S, 16 for IQ1_M) of
    (2 s_rt + 1) * ((8 g + 9 +- 1)_rt . x_jt - 9 * sum of x_jt), i.e. 8 times the values' sum over d (2 s + 1).

    w: the 16 rows' code words at w_off (IQ1_S: words 0-7 the index bytes of sub-block s, words 8-11 the uint16 qh
    of sub-blocks 2 p, 2 p + 1; IQ1_M: the same, then words 12-13 the scale words); xp: each activation row's sums
    as int16 pairs (activations.py: per 32 values for IQ1_S, per 16 for IQ1_M) from xp_off + j*xp_stride."""
    lits = _literals(fam, kind, n)
    if lits is None:
        return None
    f, m_kind, n_x = lits
    dot, wide = _BYTE_DOTS[f], f == avx512vnni.KEY
    sig = types.void(fam, kind, n, w, w_off, grid, x, x_off, x_stride, xp, xp_off, xp_stride, isum, out_off)

    def codegen(context, builder, signature, args):
        (_, _, _, wa, wo, ga, xa, xo, xst, pa, po, pst, ia, oo) = args
        wp = data_ptr(context, builder, signature.args[3], wa, wo, V16)
        gp = data_ptr(context, builder, signature.args[5], ga, ir.Constant(I64, 0), I64)
        xps = [data_ptr(context, builder, signature.args[6], xa, builder.add(xo, builder.mul(xst, ir.Constant(
            xst.type, j))), I64) for j in range(n_x)]
        pps = [data_ptr(context, builder, signature.args[9], pa, builder.add(po, builder.mul(pst, ir.Constant(
            pst.type, j))), I32) for j in range(n_x)]
        zero = ir.Constant(V16, None)
        accs = [[zero] * 2 for _ in range(n_x)]
        offs = [zero] * n_x
        for s in range(8):
            xs = [_x_bytes(builder, xps, 4 * s + l) for l in range(4)]
            words = builder.load(builder.gep(wp, [ir.Constant(I64, s)]), align=1)
            qhw = builder.load(builder.gep(wp, [ir.Constant(I64, 8 + s // 2)]), align=1)
            qh = _c(builder.and_, qhw, 0xFFFF) if s % 2 == 0 else _c(builder.lshr, qhw, 16)
            low = [_c(builder.and_, _c(builder.lshr, words, 8 * l) if l else words, 255) for l in range(4)]
            if m_kind == 0:  # qh: 4 x 3 index bits, the 3-bit scale, the delta's sign (bit 15 -> the table's bit 11)
                sign = _c(builder.and_, _c(builder.lshr, qh, 4), 0x800)
                high = [_c(builder.and_, _c(builder.shl, qh, 8 - 3 * l) if l < 3 else _c(builder.lshr, qh, 1), 0x700)
                        for l in range(4)]
                idx = [builder.or_(builder.or_(lo, hi), sign) for lo, hi in zip(low, high)]
                groups = [(_odd(builder, _c(builder.and_, _c(builder.lshr, qh, 12), 7)), range(4))]
                if s % 2:  # both sub-blocks' scales from the pair's qh word, against their two sums of x
                    pair = _c(builder.or_, _c(builder.and_, _c(builder.lshr, qhw, 11), 0x000E000E), 0x00010001)
                    for j, pp in enumerate(pps):
                        offs[j] = dot.word_dot(builder, offs[j], pair, splat(builder, builder.load(builder.gep(
                            pp, [ir.Constant(I64, s // 2)]), align=1)))
            else:  # qh nibble per 8 values: 3 index bits and the delta's sign, which lands on the table's bit 11
                idx = [builder.or_(lo, _c(builder.shl, _c(builder.and_, _c(builder.lshr, qh, 4 * l) if l else qh,
                                                          15), 8)) for l, lo in enumerate(low)]
                scw = builder.load(builder.gep(wp, [ir.Constant(I64, 12 + s // 4)]), align=1)
                sc16 = _c(builder.lshr, scw, 16 * ((s // 2) % 2) + 6 * (s % 2))
                halves_ = [_odd(builder, _c(builder.and_, _c(builder.lshr, sc16, 3 * h) if h else sc16, 7))
                           for h in range(2)]
                groups = [(halves_[0], range(2)), (halves_[1], range(2, 4))]
                pair = builder.or_(halves_[0], _c(builder.shl, halves_[1], 16))
                for j, pp in enumerate(pps):
                    offs[j] = dot.word_dot(builder, offs[j], pair, splat(builder, builder.load(builder.gep(
                        pp, [ir.Constant(I64, s)]), align=1)))
            for o in range(2):
                grids = [_gather8(builder, wide, gp, _octet_idx(builder, idx[l], o)) for l in range(4)]
                for scale, ls in groups:
                    sc = _dup_rows(builder, scale, o)
                    for j in range(n_x):
                        pairs = [(grids[l], builder.bitcast(xs[l][j][0], V16)) for l in ls]
                        accs[j][o] = dot.scaled_dot(builder, accs[j][o], pairs, _BOUND1, sc)
        for j in range(n_x):
            total = builder.sub(_row_sums(builder, *accs[j]), _c(builder.mul, offs[j], 9))
            _store_rows(context, builder, signature.args[12], ia, oo, j, total)
        return context.get_dummy_value()

    return sig, codegen


# ---------------------------------------------------------------------------------------------------------------
# packing
# ---------------------------------------------------------------------------------------------------------------

@njit(parallel=True, cache=True)
def pack_iq2_xs(rows, qs, sc, d):
    """rows (N, nsb*74) -> qs (G, nsb, 4, 16, 16, 4), sc (G, nsb, 8, ROWS), d (G, nsb, ROWS). Block: d | qs u16[32]
    (9-bit grid index, 7 sign bits) | scales u8[8] (two 4-bit scales, low nibble first)."""
    n = rows.shape[0]
    n_groups, nsb = qs.shape[0], qs.shape[1]
    for g in prange(n_groups):
        r_end = min(ROWS, n - g * ROWS)
        for b in range(nsb):
            o = b * 74
            for r in range(ROWS):
                ro, rr = r // QUARTER, r % QUARTER
                live = r < r_end
                src = rows[g * ROWS + r] if live else rows[0]
                d[g, b, r] = _f16_bits(src, o) if live else 0
                for w in range(16):
                    for jj in range(4):
                        qs[g, b, ro, w, rr, jj] = src[o + 2 + 4 * w + jj] if live else 0
                for s in range(8):
                    sc[g, b, s, r] = src[o + 66 + s] if live else 0


@njit(parallel=True, cache=True)
def pack_iq2_xxs(rows, qs, d):
    """rows (N, nsb*66) -> qs (G, nsb, 4, 16, 16, 4), d (G, nsb, ROWS). Block: d | 8 x (4 grid index bytes, then a
    uint32 of 4 x 7 sign bits and the 4-bit scale)."""
    n = rows.shape[0]
    n_groups, nsb = qs.shape[0], qs.shape[1]
    for g in prange(n_groups):
        r_end = min(ROWS, n - g * ROWS)
        for b in range(nsb):
            o = b * 66
            for r in range(ROWS):
                ro, rr = r // QUARTER, r % QUARTER
                live = r < r_end
                src = rows[g * ROWS + r] if live else rows[0]
                d[g, b, r] = _f16_bits(src, o) if live else 0
                for w in range(16):
                    for jj in range(4):
                        qs[g, b, ro, w, rr, jj] = src[o + 2 + 4 * w + jj] if live else 0


# ---------------------------------------------------------------------------------------------------------------
# kernels over runs of activation rows that share an expert (portable.py's contract), built per family
# ---------------------------------------------------------------------------------------------------------------

NX = 4  # activation rows per pass over the unpacked weights in prefill
UNPACKED = 72 * 64  # one quarter unpacked: 64 registers of values, up to 8 of scale pairs


@njit(cache=True)
def _sums16(xq, n, k):
    """Each row's sums of 16 activations as int16 pairs (groups 2 t, 2 t + 1), the layout of activations.py's
    pairs16, for kernels that are handed the per-32 pairs."""
    p = np.empty(n * (k // 32), np.int32)
    for m in range(n):
        for t in range(k // 32):
            lo = np.int32(0)
            hi = np.int32(0)
            for i in range(16):
                lo += np.int32(xq[m * k + 32 * t + i])
                hi += np.int32(xq[m * k + 32 * t + 16 + i])
            p[m * (k // 32) + t] = (lo & 0xFFFF) | (hi << 16)
    return p


@njit(inline="always")
def _sb_out(a, isum, o, dsup, xd):
    for r in range(ROWS):
        a[r] += xd * dsup[r] * np.float32(0.125) * np.float32(isum[o + r])


def make_iq2_runs(F: int) -> dict[str, tuple]:
    """{format name: (decode kernel, prefill kernel)} of the IQ2 formats for the family registered under F."""
    if F not in _BYTE_DOTS:
        raise KeyError(f"no byte multiplication registered under {F}")
    return {"IQ2_XS": _make_iq2_xs_runs(F), "IQ2_XXS": _make_iq2_xxs_runs(F), "IQ1_S": _make_iq1_runs(F, 0),
            "IQ1_M": _make_iq1_runs(F, 1)}


def _make_iq2_xs_runs(F: int) -> tuple:
    """IQ2_XS (decode, prefill) on Q8_K activations (xq, xd per 256; the pair sums xp are not needed)."""
    BLOCK = ROWS * 64  # one group's code words per super-block
    QUARTER_BYTES = 16 * 64

    @njit(parallel=True, cache=True, fastmath=True)
    def iq2_xs_runs(qs, sc, d, xq, xd, xp, run_start, run_expert, n_rows, out):
        n_groups, nsb = d.shape[1], d.shape[2]
        k = nsb * 256
        grid = _GRID2
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
                        _iq2_xs_sb16(F, 1, qs, base + rq * QUARTER_BYTES, sc, sb * 512 + rq * QUARTER, grid, xq,
                                     m * k + b * 256, 0, isum, rq * 16)
                    _sb_out(accf[m - m0], isum, 0, dsup, xd[m, b])
            _store_group(out, accf, g, m0, m1, n_rows)

    @njit(parallel=True, cache=True, fastmath=True)
    def iq2_xs_runs_x4(qs, sc, d, xq, xd, xp, run_start, run_expert, n_rows, out):
        # the grid gathers are the cost: a run of several rows unpacks each super-block once, to bytes in L1, and
        # every row reads those
        n_groups, nsb = d.shape[1], d.shape[2]
        k = nsb * 256
        grid, grid_u = _GRID2, _GRID2_U
        p16 = _sums16(xq, xd.shape[0], k)
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
                        _iq2_xs_sb16(F, 1, qs, base + rq * QUARTER_BYTES, sc, sb * 512 + rq * QUARTER, grid, xq,
                                     m0 * k + b * 256, 0, isum, rq * 16)
                else:
                    for rq in range(4):
                        _iq2_xs_unpack16(F, qs, base + rq * QUARTER_BYTES, sc, sb * 512 + rq * QUARTER, grid_u,
                                         u, rq * UNPACKED)
                    m = m0
                    while m < m1:
                        n_x = NX if m + NX <= m1 else 1
                        o = (m - m0) * ROWS
                        for rq in range(4):
                            if n_x == NX:
                                _unpacked_dot16(F, NX, 16, 64, u, rq * UNPACKED, xq, m * k + b * 256, k, p16,
                                                m * (k // 32) + b * 8, k // 32, isum, o + rq * 16)
                            else:
                                _unpacked_dot16(F, 1, 16, 64, u, rq * UNPACKED, xq, m * k + b * 256, 0, p16,
                                                m * (k // 32) + b * 8, 0, isum, o + rq * 16)
                        m += n_x
                for m in range(m0, m1):
                    _sb_out(accf[m - m0], isum, (m - m0) * ROWS, dsup, xd[m, b])
            _store_group(out, accf, g, m0, m1, n_rows)

    return iq2_xs_runs, iq2_xs_runs_x4


def _make_iq2_xxs_runs(F: int) -> tuple:
    """IQ2_XXS (decode, prefill) on Q8_K activations, as IQ2_XS's with the scales inside the code words."""
    BLOCK = ROWS * 64  # one group's code words per super-block
    QUARTER_BYTES = 16 * 64

    @njit(parallel=True, cache=True, fastmath=True)
    def iq2_xxs_runs(qs, d, xq, xd, xp, run_start, run_expert, n_rows, out):
        n_groups, nsb = d.shape[1], d.shape[2]
        k = nsb * 256
        grid = _GRID2XXS
        for task in prange(run_expert.shape[0] * n_groups):
            g, e, m0, m1 = _run_task(task, n_groups, run_start, run_expert)
            accf = np.zeros((m1 - m0, ROWS), np.float32)
            dsup = np.empty(ROWS, np.float32)
            isum = np.empty(ROWS, np.int32)
            for b in range(nsb):
                _halves_to_float(d[e, g, b], dsup)
                base = ((e * n_groups + g) * nsb + b) * BLOCK
                prefetch_ahead(qs, base, BLOCK)
                for m in range(m0, m1):
                    for rq in range(4):
                        _iq2_xxs_sb16(F, 1, qs, base + rq * QUARTER_BYTES, grid, xq, m * k + b * 256, 0, isum,
                                      rq * 16)
                    _sb_out(accf[m - m0], isum, 0, dsup, xd[m, b])
            _store_group(out, accf, g, m0, m1, n_rows)

    @njit(parallel=True, cache=True, fastmath=True)
    def iq2_xxs_runs_x4(qs, d, xq, xd, xp, run_start, run_expert, n_rows, out):
        # as iq2_xs_runs_x4: each super-block unpacked once per run
        n_groups, nsb = d.shape[1], d.shape[2]
        k = nsb * 256
        kp = k // 64
        grid, grid_u = _GRID2XXS, _GRID2XXS_U
        for task in prange(run_expert.shape[0] * n_groups):
            g, e, m0, m1 = _run_task(task, n_groups, run_start, run_expert)
            accf = np.zeros((m1 - m0, ROWS), np.float32)
            dsup = np.empty(ROWS, np.float32)
            isum = np.empty((m1 - m0) * ROWS, np.int32)
            u = np.empty(4 * UNPACKED, np.uint8)
            for b in range(nsb):
                _halves_to_float(d[e, g, b], dsup)
                base = ((e * n_groups + g) * nsb + b) * BLOCK
                if m1 - m0 == 1:
                    for rq in range(4):
                        _iq2_xxs_sb16(F, 1, qs, base + rq * QUARTER_BYTES, grid, xq, m0 * k + b * 256, 0, isum,
                                      rq * 16)
                else:
                    for rq in range(4):
                        _iq2_xxs_unpack16(F, qs, base + rq * QUARTER_BYTES, grid_u, u, rq * UNPACKED)
                    m = m0
                    while m < m1:
                        n_x = NX if m + NX <= m1 else 1
                        o = (m - m0) * ROWS
                        for rq in range(4):
                            if n_x == NX:
                                _unpacked_dot16(F, NX, 32, 64, u, rq * UNPACKED, xq, m * k + b * 256, k, xp,
                                                m * kp + b * 4, kp, isum, o + rq * 16)
                            else:
                                _unpacked_dot16(F, 1, 32, 64, u, rq * UNPACKED, xq, m * k + b * 256, 0, xp,
                                                m * kp + b * 4, 0, isum, o + rq * 16)
                        m += n_x
                for m in range(m0, m1):
                    _sb_out(accf[m - m0], isum, (m - m0) * ROWS, dsup, xd[m, b])
            _store_group(out, accf, g, m0, m1, n_rows)

    return iq2_xxs_runs, iq2_xxs_runs_x4


@njit(parallel=True, cache=True)
def pack_iq1_s(rows, qs, d):
    """rows (N, nsb*50) -> qs (G, nsb, 4, 12, 16, 4), d (G, nsb, ROWS). Block: d | qs[32] (the index's low 8 bits) |
    qh u16[8] (sub-block s: 4 x 3 high index bits, a 3-bit scale, the delta's sign); word w of a row is the block's
    bytes 2 + 4 w..5 + 4 w."""
    n = rows.shape[0]
    n_groups, nsb = qs.shape[0], qs.shape[1]
    for g in prange(n_groups):
        r_end = min(ROWS, n - g * ROWS)
        for b in range(nsb):
            o = b * 50
            for r in range(ROWS):
                ro, rr = r // QUARTER, r % QUARTER
                live = r < r_end
                src = rows[g * ROWS + r] if live else rows[0]
                d[g, b, r] = _f16_bits(src, o) if live else 0
                for w in range(12):
                    for jj in range(4):
                        qs[g, b, ro, w, rr, jj] = src[o + 2 + 4 * w + jj] if live else 0


@njit(parallel=True, cache=True)
def pack_iq1_m(rows, qs, d):
    """rows (N, nsb*56) -> qs (G, nsb, 4, 14, 16, 4), d (G, nsb, ROWS). Block: qs[32] | qh[16] (a nibble per 8
    values: 3 high index bits, the delta's sign) | scales u16[4] (3-bit scales per 16 values; the f16 d in the top
    nibbles, which pack into d); word w of a row is the block's bytes 4 w..4 w + 3."""
    n = rows.shape[0]
    n_groups, nsb = qs.shape[0], qs.shape[1]
    for g in prange(n_groups):
        r_end = min(ROWS, n - g * ROWS)
        for b in range(nsb):
            o = b * 56
            for r in range(ROWS):
                ro, rr = r // QUARTER, r % QUARTER
                live = r < r_end
                src = rows[g * ROWS + r] if live else rows[0]
                bits = np.uint32(0)
                for i in range(4):
                    bits |= (np.uint32(_f16_bits(src, o + 48 + 2 * i)) >> 12) << (4 * i)
                d[g, b, r] = np.uint16(bits) if live else 0
                for w in range(14):
                    for jj in range(4):
                        qs[g, b, ro, w, rr, jj] = src[o + 4 * w + jj] if live else 0


def _make_iq1_runs(F: int, KIND: int) -> tuple:
    """IQ1_S (KIND 0) or IQ1_M (KIND 1) (decode, prefill) on Q8_K activations; xp: the activation sums per 32
    values (IQ1_S, pairs of activations.py) or per 16 (IQ1_M, pairs16)."""
    WORDS = 12 if KIND == 0 else 14
    QUARTER_BYTES = WORDS * 64
    BLOCK = 4 * QUARTER_BYTES  # one group's code words per super-block
    PER_SB = 4 if KIND == 0 else 8  # xp entries per super-block
    GROUP = 32 if KIND == 0 else 16  # values per scale

    @njit(parallel=True, cache=True, fastmath=True)
    def iq1_runs(qs, d, xq, xd, xp, run_start, run_expert, n_rows, out):
        n_groups, nsb = d.shape[1], d.shape[2]
        k = nsb * 256
        grid = _GRID1
        for task in prange(run_expert.shape[0] * n_groups):
            g, e, m0, m1 = _run_task(task, n_groups, run_start, run_expert)
            accf = np.zeros((m1 - m0, ROWS), np.float32)
            dsup = np.empty(ROWS, np.float32)
            isum = np.empty(ROWS, np.int32)
            for b in range(nsb):
                _halves_to_float(d[e, g, b], dsup)
                base = ((e * n_groups + g) * nsb + b) * BLOCK
                prefetch_ahead(qs, base, BLOCK)
                for m in range(m0, m1):
                    for rq in range(4):
                        _iq1_sb16(F, KIND, 1, qs, base + rq * QUARTER_BYTES, grid, xq, m * k + b * 256, 0, xp,
                                  m * nsb * PER_SB + b * PER_SB, 0, isum, rq * QUARTER)
                    _sb_out(accf[m - m0], isum, 0, dsup, xd[m, b])
            _store_group(out, accf, g, m0, m1, n_rows)

    @njit(parallel=True, cache=True, fastmath=True)
    def iq1_runs_x4(qs, d, xq, xd, xp, run_start, run_expert, n_rows, out):
        # as iq2_xs_runs_x4: each super-block unpacked once per run
        n_groups, nsb = d.shape[1], d.shape[2]
        k = nsb * 256
        grid = _GRID1
        for task in prange(run_expert.shape[0] * n_groups):
            g, e, m0, m1 = _run_task(task, n_groups, run_start, run_expert)
            accf = np.zeros((m1 - m0, ROWS), np.float32)
            dsup = np.empty(ROWS, np.float32)
            isum = np.empty((m1 - m0) * ROWS, np.int32)
            u = np.empty(4 * UNPACKED, np.uint8)
            for b in range(nsb):
                _halves_to_float(d[e, g, b], dsup)
                base = ((e * n_groups + g) * nsb + b) * BLOCK
                if m1 - m0 == 1:
                    for rq in range(4):
                        _iq1_sb16(F, KIND, 1, qs, base + rq * QUARTER_BYTES, grid, xq, m0 * k + b * 256, 0, xp,
                                  m0 * nsb * PER_SB + b * PER_SB, 0, isum, rq * QUARTER)
                else:
                    for rq in range(4):
                        _iq1_unpack16(F, KIND, qs, base + rq * QUARTER_BYTES, grid, u, rq * UNPACKED)
                    m = m0
                    while m < m1:
                        n_x = NX if m + NX <= m1 else 1
                        o = (m - m0) * ROWS
                        for rq in range(4):
                            if n_x == NX:
                                _unpacked_dot16(F, NX, GROUP, 9, u, rq * UNPACKED, xq, m * k + b * 256, k, xp,
                                                m * nsb * PER_SB + b * PER_SB, nsb * PER_SB, isum, o + rq * QUARTER)
                            else:
                                _unpacked_dot16(F, 1, GROUP, 9, u, rq * UNPACKED, xq, m * k + b * 256, 0, xp,
                                                m * nsb * PER_SB + b * PER_SB, 0, isum, o + rq * QUARTER)
                        m += n_x
                for m in range(m0, m1):
                    _sb_out(accf[m - m0], isum, (m - m0) * ROWS, dsup, xd[m, b])
            _store_group(out, accf, g, m0, m1, n_rows)

    return iq1_runs, iq1_runs_x4

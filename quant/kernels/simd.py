"""LLVM IR building blocks shared by the integer kernel families (quads.py and one module per instruction set).

A "logical register" here is <16 x i32>: 16 weight rows x 4 consecutive code bytes (a quad), the unit of the
packed layout in quads.py. AVX-512 holds one in a zmm register; the 256-bit families split it into two halves of
8 rows. Each family supplies a ByteDot: how it multiplies unsigned by signed bytes and sums them by fours.
"""
from __future__ import annotations

import zlib
from pathlib import Path

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

__all__ = [
    "I8",
    "I16",
    "I32",
    "I64",
    "V8",
    "V16",
    "ByteDot",
    "data_ptr",
    "family_key",
    "halves",
    "join",
    "prefetch_ahead",
    "splat",
    "splat8",
]

I8 = ir.IntType(8)
I16 = ir.IntType(16)
I32 = ir.IntType(32)
I64 = ir.IntType(64)
V16 = ir.VectorType(I32, 16)  # one logical register: 16 rows x 4 bytes
V8 = ir.VectorType(I32, 8)    # half of one, a 256-bit register
B32 = ir.VectorType(I8, 32)   # the same 256 bits as bytes
W16 = ir.VectorType(I16, 16)  # ... and as 16-bit lanes


def data_ptr(context, builder, aryty, ary, offset, elt):
    """Pointer to element `offset` of a numba array, cast to a pointer of LLVM type elt."""
    arr = context.make_array(aryty)(context, builder, ary)
    return builder.bitcast(builder.gep(arr.data, [offset]), elt.as_pointer())


def splat(builder, scalar32):
    """A 32-bit value in all 16 lanes (the 4 activation bytes every row of a quad multiplies)."""
    vec = builder.insert_element(ir.Constant(V16, ir.Undefined), scalar32, ir.Constant(I32, 0))
    return builder.shuffle_vector(vec, ir.Constant(V16, ir.Undefined), ir.Constant(V16, [0] * 16))


def splat8(builder, value: int):
    return ir.Constant(V8, [value] * 8)


def halves(builder, v):
    """<16 x i32> -> its rows 0-7 and 8-15 as two <8 x i32> (free on a 256-bit target: they are two registers)."""
    undef = ir.Constant(V16, ir.Undefined)
    return (builder.shuffle_vector(v, undef, ir.Constant(V8, list(range(8)))),
            builder.shuffle_vector(v, undef, ir.Constant(V8, list(range(8, 16)))))


def join(builder, lo, hi):
    return builder.shuffle_vector(lo, hi, ir.Constant(V16, list(range(16))))


def intrinsic_fn(builder, name: str, ret, args):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, list(args)), name)


class ByteDot:
    """How one instruction-set family multiplies bytes. Every method takes and returns logical registers.

    dot(acc, pairs, bound): acc + sum over (u, s) in pairs of the 4-byte dot products of unsigned u by signed s, per
      32-bit lane. bound is the largest |u0*s0 + u1*s1| one pair of bytes can give: families that add products in
      16-bit lanes (AVX2) use it to add as many as cannot overflow before widening.
    signed_dot(pairs): the same sum for signed weights w and signed activations, from zero; pairs are (w, x) with x
      the 4 activation bytes as one i32 scalar (each family broadcasts it in its own way).
    """

    def dot(self, builder, acc, pairs, bound):
        raise NotImplementedError

    def signed_dot(self, builder, pairs):
        raise NotImplementedError

    def scaled_dot(self, builder, acc, pairs, bound, scale):
        """acc + scale * dot(pairs), per lane: scale is a logical register of int32 in int16 range (a K-quant
        sub-block scale per row). The VNNI families multiply the int32 sums; AVX2 puts the scale into the vpmaddwd
        that widens its 16-bit sums anyway, for free."""
        return builder.add(acc, builder.mul(self.dot(builder, ir.Constant(V16, None), pairs, bound), scale))

    def word_dot(self, builder, acc, a, b):
        """acc + a.lo * b.lo + a.hi * b.hi per 32-bit lane, the halves signed 16-bit (vpmaddwd / vpdpwssd)."""
        raise NotImplementedError

    def pair_scaled_dot(self, builder, acc, pairs_lo, pairs_hi, bound, scale_pair):
        """acc + scale_pair.lo * dot(pairs_lo) + scale_pair.hi * dot(pairs_hi) per lane, the halves of scale_pair
        signed 16-bit (two sub-blocks' scales of a row as int16 pair), for sub-blocks whose dot products fit int16
        (Q2_K, Q3_K: 16 codes of at most 7 by |x| <= 127). Here the two int32 sums become the halves of one lane and
        a single 16-bit multiply-add (word_dot) scales and adds both, instead of two 32-bit multiplies."""
        zero = ir.Constant(V16, None)
        lo = self.dot(builder, zero, pairs_lo, bound)
        hi = self.dot(builder, zero, pairs_hi, bound)
        both = builder.or_(builder.and_(lo, ir.Constant(V16, [0xFFFF] * 16)),
                           builder.shl(hi, ir.Constant(V16, [16] * 16)))
        return self.word_dot(builder, acc, both, scale_pair)


def family_key(*paths: Path | str) -> int:
    """The integer that names a family inside compiled kernels: a checksum of the modules that generate its code.

    numba's cache watches only the file that defines a kernel (quads.py): keying each family's kernels by the
    source of its instruction choices too makes them recompile when those change."""
    crc = 0
    for p in (Path(__file__), *map(Path, paths)):
        crc = zlib.crc32(p.read_bytes(), crc)
    return crc & 0x7FFFFFFF


# Decode streams every weight byte once, and on the Xeon we measured, the hardware prefetchers alone left about a
# third of the read bandwidth unused (likely because their streams stop at 4 KiB page boundaries), so the decode
# kernels ask for their lines one page ahead.
PREFETCH_AHEAD = 4096  # bytes


@intrinsic
def _prefetch(typingctx, a, off):
    """A hint to bring the 64-byte line holding a.flat[off] into L1 (never faults, even past the array's end)."""
    sig = types.void(a, off)

    def codegen(context, builder, signature, args):
        arr = context.make_array(signature.args[0])(context, builder, args[0])
        ptr = builder.bitcast(builder.gep(arr.data, [args[1]]), I8.as_pointer())
        fn = intrinsic_fn(builder, "llvm.prefetch.p0", ir.VoidType(), [I8.as_pointer(), I32, I32, I32])
        builder.call(fn, [ptr, ir.Constant(I32, 0), ir.Constant(I32, 3), ir.Constant(I32, 1)])  # read, L1, data
        return context.get_dummy_value()

    return sig, codegen


@njit(inline="always")
def prefetch_ahead(qs, start, n_bytes):
    """Prefetch the n_bytes of codes that start PREFETCH_AHEAD bytes after qs[start] (qs is flat uint8)."""
    for p in range(0, n_bytes, 64):
        _prefetch(qs, start + PREFETCH_AHEAD + p)

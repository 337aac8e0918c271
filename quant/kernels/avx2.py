"""AVX2: the integer dot products of CPUs without VNNI (Haswell to Raptor Lake's AVX2 path, Zen 1-3), as llama.cpp's
AVX2 path does them: `vpmaddubsw` multiplies unsigned by signed bytes and adds neighbours into 16-bit lanes, then
`vpmaddwd` against ones adds neighbouring 16-bit lanes into 32 bits. Each logical register (16 rows x 4 bytes) is two
ymm halves of 8 rows.

vpmaddubsw saturates at +-32767, so 16-bit partial sums are only added while they cannot reach it: nibbles (<= 15)
by int8 activations (|x| <= 127) give at most 3810 per lane, so a whole Q4_0 block (8 products) is summed in 16
bits and widened once; 5-bit codes take 4, 6-bit codes 2, and signed int8 (Q8_0, |w| <= 128) 1 per widening.
Q2_K/Q3_K sub-blocks (4 products of 2- or 3-bit codes) are each summed in 16 bits, then widened by their scale.
"""
from __future__ import annotations

from pathlib import Path

from llvmlite import ir

from . import quads
from .avxvnni import abs_and_sign
from .simd import (
    B32,
    V8,
    V16,
    W16,
    ByteDot,
    family_key,
    halves,
    intrinsic_fn,
    join,
    splat,
    splat8,
)

__all__ = ["KEY", "RUNS"]

_I16_MAX = 32767


def _maddubs(builder, u8, s8):
    fn = intrinsic_fn(builder, "llvm.x86.avx2.pmadd.ub.sw", W16, [B32, B32])
    return builder.call(fn, [builder.bitcast(u8, B32), builder.bitcast(s8, B32)])


def _pmaddwd(builder, a16, b16):
    fn = intrinsic_fn(builder, "llvm.x86.avx2.pmadd.wd", V8, [W16, W16])
    return builder.call(fn, [builder.bitcast(a16, W16), builder.bitcast(b16, W16)])


def _widen_add(builder, acc8, sum16, mult16=None):
    """acc8 + the neighbouring 16-bit sums added into 32 bits, each times mult16 (16-bit lanes; ones if None)."""
    return builder.add(acc8, _pmaddwd(builder, sum16, ir.Constant(W16, [1] * 16) if mult16 is None else mult16))


class _Avx2(ByteDot):
    def dot(self, builder, acc, pairs, bound, scale=None):
        per_widen = max(1, _I16_MAX // bound)
        acc_h = list(halves(builder, acc))
        mult = [None, None]
        if scale is not None:  # each row's scale in both 16-bit halves of its lane
            low16 = splat8(builder, 0xFFFF)
            mult = [builder.or_(builder.and_(h, low16), builder.shl(h, splat8(builder, 16)))
                    for h in halves(builder, scale)]
        split = [(halves(builder, u), halves(builder, s)) for u, s in pairs]
        for i in range(2):
            for start in range(0, len(split), per_widen):
                s16 = None
                for u, s in split[start:start + per_widen]:
                    p = _maddubs(builder, u[i], s[i])
                    s16 = p if s16 is None else builder.add(s16, p)
                acc_h[i] = _widen_add(builder, acc_h[i], s16, mult[i])
        return join(builder, *acc_h)

    def scaled_dot(self, builder, acc, pairs, bound, scale):
        return self.dot(builder, acc, pairs, bound, scale)

    def pair_scaled_dot(self, builder, acc, pairs_lo, pairs_hi, bound, scale_pair):
        # the scales go into the widening vpmaddwd, as in scaled_dot: each half sign-extended to its own lane
        sixteen = ir.Constant(V16, [16] * 16)
        acc = self.dot(builder, acc, pairs_lo, bound, builder.ashr(builder.shl(scale_pair, sixteen), sixteen))
        return self.dot(builder, acc, pairs_hi, bound, builder.ashr(scale_pair, sixteen))

    def word_dot(self, builder, acc, a, b):
        return join(builder, *(builder.add(c, _pmaddwd(builder, u, v))
                               for c, u, v in zip(halves(builder, acc), halves(builder, a), halves(builder, b))))

    def signed_dot(self, builder, pairs):
        acc = [ir.Constant(V8, None)] * 2
        for w, x in pairs:
            for i, (wh, xh) in enumerate(zip(halves(builder, w), halves(builder, splat(builder, x)))):
                acc[i] = _widen_add(builder, acc[i], _maddubs(builder, *abs_and_sign(builder, wh, xh)))
        return join(builder, *acc)


KEY = family_key(__file__, Path(__file__).with_name("avxvnni.py"))
quads.register(KEY, _Avx2())
RUNS = quads.make_runs(KEY)

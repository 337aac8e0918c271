"""AVX-512 VNNI: one 512-bit `vpdpbusd` multiplies 64 unsigned by signed byte pairs and adds them by fours into 16
int32 lanes, one logical register (16 rows x 4 bytes) per instruction. Zen 4, Ice Lake and later Xeons.

Signed weights (Q8_0) against signed activations: the activations are made unsigned by adding 128 (xor 0x80) and
128 * sum(w) comes off again, sum(w) from one more vpdpbusd against ones (AVX-512 has no vpsignb).
"""
from __future__ import annotations

from llvmlite import ir

from . import quads
from .simd import I32, V16, ByteDot, family_key, intrinsic_fn, splat

__all__ = ["KEY", "RUNS"]


def _dpbusd(builder):
    return intrinsic_fn(builder, "llvm.x86.avx512.vpdpbusd.512", V16, [V16, V16, V16])


class _Vnni512(ByteDot):
    def dot(self, builder, acc, pairs, bound):
        dp = _dpbusd(builder)
        for u, s in pairs:
            acc = builder.call(dp, [acc, u, s])
        return acc

    def signed_dot(self, builder, pairs):
        dp = _dpbusd(builder)
        ones = splat(builder, ir.Constant(I32, 0x01010101))
        flip = ir.Constant(I32, 0x80808080 - (1 << 32))  # x + 128 as unsigned bytes
        acc = wsum = ir.Constant(V16, None)
        for w, x in pairs:
            acc = builder.call(dp, [acc, splat(builder, builder.xor(x, flip)), w])
            wsum = builder.call(dp, [wsum, ones, w])
        return builder.sub(acc, builder.shl(wsum, splat(builder, ir.Constant(I32, 7))))

    def word_dot(self, builder, acc, a, b):
        fn = intrinsic_fn(builder, "llvm.x86.avx512.vpdpwssd.512", V16, [V16, V16, V16])
        return builder.call(fn, [acc, a, b])


KEY = family_key(__file__)
quads.register(KEY, _Vnni512())
RUNS = quads.make_runs(KEY)

"""AVX-VNNI: the 256-bit `vpdpbusd` (VEX-encoded) of Alder Lake and later laptops and Zen 5, which have no AVX-512
(or have it fused off). Each logical register (16 rows x 4 bytes) is two ymm halves of 8 rows.

Signed weights (Q8_0): |w| as the unsigned side and x with w's sign (vpsignb) as the signed one, so no correction
term is needed; |w| <= 128 and |x| <= 127 keep every product exact.
"""
from __future__ import annotations

from llvmlite import ir

from . import quads
from .simd import B32, V8, ByteDot, family_key, halves, intrinsic_fn, join, splat

__all__ = ["KEY", "RUNS"]


def _dpbusd(builder):
    return intrinsic_fn(builder, "llvm.x86.avx512.vpdpbusd.256", V8, [V8, V8, V8])


def abs_and_sign(builder, w8, x8):
    """(|w|, x * sign(w)) on 32 bytes: the unsigned-by-signed form of a signed-by-signed byte product."""
    sign_fn = intrinsic_fn(builder, "llvm.x86.avx2.psign.b", B32, [B32, B32])
    wb, xb = builder.bitcast(w8, B32), builder.bitcast(x8, B32)
    # psign(w, w) is |w| read as unsigned, -128 included (it stays 0x80 = 128)
    return builder.call(sign_fn, [wb, wb]), builder.call(sign_fn, [xb, wb])


class _AvxVnni(ByteDot):
    def dot(self, builder, acc, pairs, bound):
        dp = _dpbusd(builder)
        lo, hi = halves(builder, acc)
        for u, s in pairs:
            (u0, u1), (s0, s1) = halves(builder, u), halves(builder, s)
            lo = builder.call(dp, [lo, u0, s0])
            hi = builder.call(dp, [hi, u1, s1])
        return join(builder, lo, hi)

    def signed_dot(self, builder, pairs):
        dp = _dpbusd(builder)
        acc = [ir.Constant(V8, None)] * 2
        for w, x in pairs:
            for i, (wh, xh) in enumerate(zip(halves(builder, w), halves(builder, splat(builder, x)))):
                u, s = abs_and_sign(builder, wh, xh)
                acc[i] = builder.call(dp, [acc[i], builder.bitcast(u, V8), builder.bitcast(s, V8)])
        return join(builder, *acc)

    def word_dot(self, builder, acc, a, b):
        fn = intrinsic_fn(builder, "llvm.x86.avx512.vpdpwssd.256", V8, [V8, V8, V8])
        return join(builder, *(builder.call(fn, [c, u, v])
                               for c, u, v in zip(halves(builder, acc), halves(builder, a), halves(builder, b))))


KEY = family_key(__file__)
quads.register(KEY, _AvxVnni())
RUNS = quads.make_runs(KEY)

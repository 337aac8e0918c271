"""float16 inside numba kernels: the one place half <-> float conversions are defined.

numba has no float16 type on the CPU, so ggml's f16 scales and the f16 KV cache are held as uint16 bit patterns.
Every conversion here is LLVM's own (fpext / fptrunc on `half`): exact, vectorisable (vcvtph2ps / vcvtps2ph on x86
with F16C, fcvt on ARM), with no 64K-entry lookup table (a gather per element) and no exponent-rebias trick, which
turns f16 subnormals (|d| < 6.1e-5, which Q4_K super-block scales can be) into f32 denormals that cost Intel cores a
microcode assist of about 100 cycles per multiply.

- `f16_bits_to_f32(bits)`: one uint16 -> float32 (decoders of file-layout blocks, the KV cache's attention reads).
- `f16_at(src, o)`: the f16 stored little-endian at bytes src[o:o+2] -> float32 (a ggml block's scale).
- `halves_to_float(h, dst)`: a whole vector of `HALVES_WIDTH` f16 bit patterns -> float32 in one LLVM vector
  conversion (the packed kernels' per-block scales of 64 interleaved rows).
- `f32_to_f16_bits(x)`: float32 -> uint16 bits, rounded to nearest even as numpy's astype(float16).
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core.errors import TypingError
from numba.extending import intrinsic

__all__ = ["HALVES_WIDTH", "f16_at", "f16_bits_to_f32", "f32_to_f16_bits", "halves_to_float"]

HALVES_WIDTH = 64  # rows interleaved in a packed group (quant/kernels/portable.py's ROWS)


@intrinsic
def f16_bits_to_f32(typingctx, bits):
    """The float32 value of a float16 stored as its uint16 bit pattern."""
    if bits != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    return types.float32(types.uint16), codegen


@njit(inline="always")
def f16_at(src, o):
    """The f16 stored little-endian at src[o:o+2] (uint8), as float32."""
    return f16_bits_to_f32(np.uint16(np.uint32(src[o]) | (np.uint32(src[o + 1]) << 8)))


@intrinsic
def halves_to_float(typingctx, h, dst):
    """HALVES_WIDTH float16 bit patterns (C-contiguous uint16) -> HALVES_WIDTH float32, exactly, in one vector
    conversion."""
    for ty in (h, dst):
        if not isinstance(ty, types.Array) or ty.layout != "C" or ty.ndim != 1:
            raise TypingError(f"halves_to_float needs 1-D C-contiguous arrays, got {ty}")
    sig = types.void(h, dst)

    def codegen(context, builder, signature, args):
        src = context.make_array(signature.args[0])(context, builder, args[0])
        out = context.make_array(signature.args[1])(context, builder, args[1])
        halves = ir.VectorType(ir.HalfType(), HALVES_WIDTH)
        floats = ir.VectorType(ir.FloatType(), HALVES_WIDTH)
        v = builder.load(builder.bitcast(src.data, halves.as_pointer()), align=2)
        builder.store(builder.fpext(v, floats), builder.bitcast(out.data, floats.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def f32_to_f16_bits(typingctx, x):
    """The uint16 bit pattern of float32 x rounded to float16 (nearest even, as numpy's astype(float16))."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))
    return types.uint16(types.float32), codegen

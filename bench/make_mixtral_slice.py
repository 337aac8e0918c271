"""Write a GGUF with Mixtral-8x7B's exact tensor shapes but only a few blocks, filled with random quantized blocks.

    .venv/bin/python bench/make_mixtral_slice.py OUT.gguf [--type Q4_0|Q8_0|Q4_K|Q4_K_M|IQ4_XS|IQ3_XXS|IQ2_XS] [--blocks 4] [--seed 0]

Speed at the real shape is what this file is for: the matrices are Mixtral's (embedding 4096, 8 experts of 14336,
32 query and 8 KV heads of 128, vocabulary 32000), so kernels see the real strides, cache pressure and bytes per
token. The weights are random but sane: quant codes are uniform and the block scales are chosen so every weight
matrix has a standard deviation near 0.011 (a trained Mixtral's are 0.01-0.02), so activations neither vanish nor
blow up through the blocks; the token embedding's is 1 (EMBED_STD says why). Norm weights are about 1 and the router
is float32 with logits spread about 3, so tokens really pick different experts. The tokenizer metadata is Mixtral's own (mistral-common ships it), so
llama.cpp and mixlocal both load the file as a Mixtral.

Q4_0, Q8_0, Q4_K and the IQ types make every matrix that format (a downloaded IQ4_XS Mixtral keeps a few tensors,
such as the output head, in K formats; the slice measures the IQ kernels themselves). Q4_K_M mixes formats per tensor as llama-quantize does for a
Q4_K_M Mixtral (quant/recipes.py, level q4_k_m, 8 experts): Q4_K for the embedding, attn_q and the experts' gate and
up; Q8_0 attn_k and attn_v; Q5_K attn_output; Q6_K the output head; ffn_down Q6_K in the recipe's "more bits" blocks,
else Q4_K. Only ffn_down depends on the block, and the slice's blocks stand for blocks spread evenly over the 32 of
Mixtral-8x7B (slice block j takes the types of block j * 32 // N): with N = 4, blocks 0, 8, 16 and 24, whose ffn_down
are Q6_K, Q4_K, Q4_K, Q6_K, which is the real model's half-and-half mix (16 of its 32 ffn_down are Q6_K). Taking the
model's first N blocks instead would make every ffn_down Q6_K (blocks 0-3 are all in the first eighth, which always
gets more bits), and the slice would measure a heavier file than the one people download. With N = 32 both choices
give the real model's layout.

The file is written with gguf-py's GGUFWriter as raw quantized blocks, one tensor at a time, so writing a 26 GB
32-block file needs no more memory than the largest tensor (264 MB for Q4_0 experts).

The shape options (--dim, --ffn, --vocab ...) exist for tests, which want a small file with the same structure; a
vocabulary smaller than 32000 keeps the tokenizer's first pieces (control, byte and the most frequent merges).
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

__all__ = ["EMBED_STD", "MIXTRAL", "MIXTRAL_BLOCKS", "SLICE_TYPES", "SLICE_VERSION", "WEIGHT_STD", "SliceShape",
           "main", "random_blocks", "tensor_plan", "tensor_types", "write_slice"]


@dataclass(frozen=True)
class SliceShape:
    """The dimensions of a Mixtral-family model (Mixtral-8x7B's by default)."""
    dim: int = 4096
    ffn: int = 14336
    n_heads: int = 32
    n_kv_heads: int = 8
    head_dim: int = 128
    n_experts: int = 8
    n_experts_used: int = 2
    vocab: int = 32000
    context: int = 32768
    rope_theta: float = 1e6
    norm_eps: float = 1e-5


MIXTRAL = SliceShape()

# What the slice can be made of, with llama.cpp's file_type code: a single format, or a level that mixes them.
SLICE_TYPES = {"Q4_0": 2, "Q8_0": 7, "Q4_K": 14, "Q4_K_M": 15, "IQ4_XS": 30, "IQ3_XXS": 23, "IQ2_XS": 20}
# Slice types that are a quant/recipes.py level rather than one format
_MIXES = {"Q4_K_M": "q4_k_m"}
# Mixtral-8x7B's block count, which the mixes' per-block choices are made for
MIXTRAL_BLOCKS = 32

# Target standard deviation of every weight matrix; block scales are derived from it per format.
WEIGHT_STD = 0.0115
# The token embedding's: with WEIGHT_STD there too, each block's attention output (near-uniform attention over random
# keys: the running mean of the values, the same for every later token) outweighs the token's own embedding, every
# token's hidden state points the same way, and the router sends a 128-token prompt to 2-3 of the 8 experts of each
# block. With the embedding at unit scale the tokens stay apart and spread over all experts through 4 blocks.
EMBED_STD = 1.0
# Bumped when the same arguments write different weights, so that benches regenerate the slices they keep
SLICE_VERSION = 2
# Router logits spread like a trained Mixtral's (about 3), for unit-variance normalised activations.
ROUTER_LOGIT_STD = 3.0


def tensor_plan(shape: SliceShape, n_blocks: int) -> list[tuple[str, tuple[int, ...], str]]:
    """(GGUF name, logical numpy shape, kind) in llama.cpp's converter order; kind is "norm", "router" or "matrix"."""
    s = shape
    q_dim, kv_dim = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim
    plan = [("token_embd.weight", (s.vocab, s.dim), "matrix")]
    for i in range(n_blocks):
        p = f"blk.{i}."
        plan += [
            (p + "attn_norm.weight", (s.dim,), "norm"),
            (p + "attn_q.weight", (q_dim, s.dim), "matrix"),
            (p + "attn_k.weight", (kv_dim, s.dim), "matrix"),
            (p + "attn_v.weight", (kv_dim, s.dim), "matrix"),
            (p + "attn_output.weight", (s.dim, q_dim), "matrix"),
            (p + "ffn_norm.weight", (s.dim,), "norm"),
            (p + "ffn_gate_inp.weight", (s.n_experts, s.dim), "router"),
            (p + "ffn_gate_exps.weight", (s.n_experts, s.ffn, s.dim), "matrix"),
            (p + "ffn_down_exps.weight", (s.n_experts, s.dim, s.ffn), "matrix"),
            (p + "ffn_up_exps.weight", (s.n_experts, s.ffn, s.dim), "matrix"),
        ]
    plan += [("output_norm.weight", (s.dim,), "norm"), ("output.weight", (s.vocab, s.dim), "matrix")]
    return plan


def tensor_types(qtype: str, shape: SliceShape, n_blocks: int) -> dict[str, str]:
    """{GGUF name: ggml type name} for every tensor of the slice (norms and router are F32)."""
    plan = tensor_plan(shape, n_blocks)
    if qtype not in _MIXES:
        return {name: qtype if kind == "matrix" else "F32" for name, _, kind in plan}
    from mixlocal.quant.recipes import choose_type

    out = {}
    for name, tshape, kind in plan:
        stand_for = None
        if name.startswith("blk."):
            j = int(name.split(".")[1])
            stand_for = j * MIXTRAL_BLOCKS // n_blocks if n_blocks <= MIXTRAL_BLOCKS else j
            name_as = f"blk.{stand_for}." + name.split(".", 2)[2]
        else:
            name_as = name
        qt = choose_type(_MIXES[qtype], name_as, tshape, shape.n_experts, stand_for,
                         max(n_blocks, MIXTRAL_BLOCKS), n_gqa=shape.n_heads // shape.n_kv_heads)
        out[name] = qt.name
        if (kind == "matrix") != (qt.name != "F32"):
            raise AssertionError(f"{name}: the recipe gives {qt.name} to a {kind} tensor")
    return out


# ---------------------------------------------------------------------------------------------------------------
# random blocks, per format (layouts as in ggml-common.h; gguf.quants.dequantize is the reference in the tests)
# ---------------------------------------------------------------------------------------------------------------

def _random_bytes(rng: np.random.Generator, n: int) -> np.ndarray:
    # Generator.bytes is several times faster than integers(0, 256) and the codes only need to be uniform.
    return np.frombuffer(bytearray(rng.bytes(n)), dtype=np.uint8)


def _f16_bytes(values: np.ndarray) -> np.ndarray:
    """(n,) float -> (n, 2) little-endian float16 bytes."""
    return values.astype("<f2").view(np.uint8).reshape(-1, 2)


def _q4_0(rng, n_blocks: int, std: float) -> np.ndarray:
    # value = d * (q - 8). Uniform codes 0..15 would have mean -0.5 and bias every row sum; a code 0 becomes 8, so
    # q - 8 is symmetric in -7..7 (with zero twice as likely): mean 0, std 4.18.
    blocks = _random_bytes(rng, n_blocks * 18).reshape(n_blocks, 18)
    codes = blocks[:, 2:]
    codes += ((codes & 0x0F) == 0) * np.uint8(0x08) + ((codes & 0xF0) == 0) * np.uint8(0x80)
    d = std / 4.18 * rng.uniform(0.75, 1.25, n_blocks)
    blocks[:, 0:2] = _f16_bytes(d)
    return blocks


def _q8_0(rng, n_blocks: int, std: float) -> np.ndarray:
    # value = d * q; -128 becomes 0 so codes are symmetric in -127..127: mean 0, std 73.5
    blocks = _random_bytes(rng, n_blocks * 34).reshape(n_blocks, 34)
    codes = blocks[:, 2:]
    codes[codes == 0x80] = 0
    d = std / 73.5 * rng.uniform(0.75, 1.25, n_blocks)
    blocks[:, 0:2] = _f16_bytes(d)
    return blocks


def _q4_k(rng, n_blocks: int, std: float) -> np.ndarray:
    """Q4_K super-blocks of 256: d, dmin (f16), 12 bytes of 6-bit scales and mins for 8 sub-blocks, 128 bytes of codes.

    A sub-block's value is d*sc*q - dmin*m. With dmin = 8*d and m = round(sc*15/16) the offset sits near the middle
    of the code range (q = 7.5), as a real quantizer's mins do, so the weights are centred on zero.
    """
    blocks = _random_bytes(rng, n_blocks * 144).reshape(n_blocks, 144)
    sc = rng.integers(32, 64, (n_blocks, 8), dtype=np.uint8)                     # 6-bit scales, upper half
    m = np.rint(sc * (15.0 / 16.0)).astype(np.uint8)                               # 6-bit mins, <= 59
    d = std / (4.61 * 47.5) * rng.uniform(0.75, 1.25, n_blocks)            # 47.5: mean of sc
    blocks[:, 0:2] = _f16_bytes(d)
    blocks[:, 2:4] = _f16_bytes(8.0 * d)
    blocks[:, 4:16] = _k_scales_mins(sc, m)
    return blocks


def _k_scales_mins(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """ggml's get_scale_min_k4 packing of 8 six-bit scales and mins into 12 bytes (Q4_K and Q5_K): sub-blocks 0-3
    in the low 6 bits of bytes 0-7, sub-blocks 4-7 split into a low nibble (bytes 8-11) and the top two bits of
    bytes 0-7."""
    packed = np.empty((sc.shape[0], 12), np.uint8)
    packed[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    packed[:, 4:8] = m[:, 0:4] | ((m[:, 4:8] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:8] & 0x0F) | ((m[:, 4:8] & 0x0F) << 4)
    return packed


def _q5_k(rng, n_blocks: int, std: float) -> np.ndarray:
    """Q5_K super-blocks of 256: d, dmin (f16), 12 bytes of scales and mins as Q4_K, 32 bytes of high bits, 128 of
    low nibbles. Codes 0..31 (mean 15.5, std 9.23); dmin = 16*d and m = round(sc*15.5/16) centre them as for Q4_K."""
    blocks = _random_bytes(rng, n_blocks * 176).reshape(n_blocks, 176)
    sc = rng.integers(32, 64, (n_blocks, 8), dtype=np.uint8)
    m = np.rint(sc * (15.5 / 16.0)).astype(np.uint8)                               # <= 61
    d = std / (9.23 * 47.5) * rng.uniform(0.75, 1.25, n_blocks)
    blocks[:, 0:2] = _f16_bytes(d)
    blocks[:, 2:4] = _f16_bytes(16.0 * d)
    blocks[:, 4:16] = _k_scales_mins(sc, m)
    return blocks


def _q6_k(rng, n_blocks: int, std: float) -> np.ndarray:
    """Q6_K super-blocks of 256: 128 bytes of low nibbles, 64 of high bit pairs, 16 int8 scales, d (f16); a value is
    d * scale * (q - 32). Uniform codes 0..63 would have mean -0.5 (the bias Q4_0's comment warns about), so a
    code 0 becomes 32 by setting its high pair to 2: q - 32 is symmetric in -31..31, mean 0, std 18.0."""
    blocks = _random_bytes(rng, n_blocks * 210).reshape(n_blocks, 210)
    # dequantize_row_q6_K: per half of 128 values, ql[l] and ql[l+32] hold the low nibbles of values l, l+32
    # (low) and l+64, l+96 (high), and qh[l] their high pairs at bits 0, 2, 4, 6.
    ql = blocks[:, 0:128].reshape(n_blocks, 2, 2, 32)                              # (block, half, l // 32, l % 32)
    qh = blocks[:, 128:192].reshape(n_blocks, 2, 32)
    for k in range(4):
        nibble = (ql[:, :, k % 2] >> (4 * (k // 2))) & 0x0F
        zero = (nibble == 0) & (((qh >> (2 * k)) & 3) == 0)
        qh |= zero.astype(np.uint8) << np.uint8(2 * k + 1)
    blocks[:, 128:192] = qh.reshape(n_blocks, 64)
    sc = rng.integers(32, 64, (n_blocks, 16)).astype(np.int8)
    blocks[:, 192:208] = sc.view(np.uint8)
    d = std / (18.0 * 47.5) * rng.uniform(0.75, 1.25, n_blocks)
    blocks[:, 208:210] = _f16_bytes(d)
    return blocks


def _iq4_xs(rng, n_blocks: int, std: float) -> np.ndarray:
    """IQ4_XS super-blocks of 256: d (f16), scales_h (u16), scales_l[4], 128 bytes of codes (ggml-common.h
    block_iq4_xs); a value is d * (ls - 32) * kvalues_iq4nl[q]. The 16 levels have mean -5.9 and RMS 67.4, so each
    sub-block's scale gets a random sign (ls - 32 = +-16..31, RMS 23.95) and the weights are centred on zero."""
    blocks = _random_bytes(rng, n_blocks * 136).reshape(n_blocks, 136)
    mag = rng.integers(16, 32, (n_blocks, 8))
    ls = (32 + np.where(rng.random((n_blocks, 8)) < 0.5, -mag, mag)).astype(np.uint16)   # 6 bits: 1..16, 48..63
    blocks[:, 2:4] = (((ls >> 4) & 3) << (2 * np.arange(8, dtype=np.uint16))).sum(axis=1, dtype=np.uint16) \
        .astype("<u2").view(np.uint8).reshape(n_blocks, 2)
    blocks[:, 4:8] = ((ls[:, 0::2] & 15) | ((ls[:, 1::2] & 15) << 4)).astype(np.uint8)
    d = std / (67.4 * 23.95) * rng.uniform(0.75, 1.25, n_blocks)
    blocks[:, 0:2] = _f16_bytes(d)
    return blocks


def _grid_blocks(qtype: str, block_bytes: int):
    """IQ3_XXS / IQ2_XS super-blocks of 256: every byte after d (f16) is a grid index, sign pattern or 4-bit scale, and
    every value of them is valid, so the codes are random bytes; d comes from the spread of a sample decoded with
    d = 1 by gguf-py (the lattice values have no simple closed-form RMS)."""
    def make(rng, n_blocks: int, std: float) -> np.ndarray:
        import gguf
        blocks = _random_bytes(rng, n_blocks * block_bytes).reshape(n_blocks, block_bytes)
        sample = blocks[:256].copy()
        sample[:, 0:2] = _f16_bytes(np.ones(len(sample)))
        unit = float(gguf.quants.dequantize(sample, gguf.GGMLQuantizationType[qtype]).std())
        blocks[:, 0:2] = _f16_bytes(std / unit * rng.uniform(0.75, 1.25, n_blocks))
        return blocks
    return make


_MAKERS = {"Q4_0": (_q4_0, 32, 18), "Q8_0": (_q8_0, 32, 34), "Q4_K": (_q4_k, 256, 144),
           "Q5_K": (_q5_k, 256, 176), "Q6_K": (_q6_k, 256, 210), "IQ4_XS": (_iq4_xs, 256, 136),
           "IQ3_XXS": (_grid_blocks("IQ3_XXS", 98), 256, 98), "IQ2_XS": (_grid_blocks("IQ2_XS", 74), 256, 74)}


def random_blocks(qtype: str, shape: tuple[int, ...], rng: np.random.Generator,
                  std: float = WEIGHT_STD) -> np.ndarray:
    """Random blocks of one format for a tensor of logical shape (..., cols): uint8 (..., cols // block * block_bytes)."""
    if qtype not in _MAKERS:
        raise ValueError(f"no random blocks for {qtype}; formats: {', '.join(_MAKERS)}")
    make, per_block, block_bytes = _MAKERS[qtype]
    if shape[-1] % per_block:
        raise ValueError(f"{qtype} needs a last axis that is a multiple of {per_block}, got shape {shape}")
    n_blocks = int(np.prod(shape)) // per_block
    return make(rng, n_blocks, std).reshape(*shape[:-1], shape[-1] // per_block * block_bytes)


def _float_tensor(kind: str, shape: tuple[int, ...], dim: int, rng, router_logit_std: float) -> np.ndarray:
    if kind == "norm":
        return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    return (rng.standard_normal(shape) * (router_logit_std / np.sqrt(dim))).astype(np.float32)  # router


# ---------------------------------------------------------------------------------------------------------------
# the file
# ---------------------------------------------------------------------------------------------------------------

def _tokenizer_fields(vocab: int) -> dict:
    """Mixtral's tokenizer metadata (mistral-common's tokenizer.model.v1), cut to the first `vocab` pieces."""
    import mistral_common
    from mixlocal.tokenizer import Tokenizer
    from mixlocal.tokenizer import gguf_vocab as gv

    tok = Tokenizer.from_file(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1")
    fields = tok.gguf_metadata()
    n = len(fields[gv.TOKENS])
    if vocab > n:
        raise ValueError(f"vocab {vocab} is larger than the Mixtral tokenizer's {n} pieces")
    if vocab < 259:
        raise ValueError(f"vocab {vocab} is too small: Mixtral's control and byte pieces alone are 259")
    if vocab < n:
        for key in (gv.TOKENS, gv.SCORES, gv.TOKEN_TYPE):
            fields[key] = fields[key][:vocab]
    return fields


def write_slice(out: str | Path, qtype: str = "Q4_0", n_blocks: int = 4, shape: SliceShape = MIXTRAL,
                seed: int = 0, progress: bool = False, router_logit_std: float = ROUTER_LOGIT_STD) -> Path:
    """Write the slice GGUF to out (overwritten) and return its path.

    router_logit_std 0 writes all-zero routers: every token then goes to the same two experts of each block (the
    first two of eight equal logits), the degenerate working set that flatters a memory map."""
    import gguf
    from mixlocal.tokenizer import gguf_vocab

    if qtype not in SLICE_TYPES:
        raise ValueError(f"unknown slice type {qtype!r}; choose one of {', '.join(SLICE_TYPES)}")
    if n_blocks <= 0:
        raise ValueError(f"n_blocks must be positive, got {n_blocks}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    s = shape
    types = tensor_types(qtype, s, n_blocks)

    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name(f"mixtral-8x7b-shape-{n_blocks}blk-{qtype.lower()}-random")
    w.add_file_type(SLICE_TYPES[qtype])
    w.add_context_length(s.context)
    w.add_embedding_length(s.dim)
    w.add_block_count(n_blocks)
    w.add_feed_forward_length(s.ffn)
    w.add_head_count(s.n_heads)
    w.add_head_count_kv(s.n_kv_heads)
    w.add_rope_dimension_count(s.head_dim)
    w.add_rope_freq_base(s.rope_theta)
    w.add_layer_norm_rms_eps(s.norm_eps)
    w.add_expert_count(s.n_experts)
    w.add_expert_used_count(s.n_experts_used)
    w.add_vocab_size(s.vocab)
    gguf_vocab.write_fields(w, _tokenizer_fields(s.vocab))

    plan = tensor_plan(s, n_blocks)
    for name, tshape, kind in plan:
        if kind == "matrix":
            _, per_block, block_bytes = _MAKERS[types[name]]
            raw_type = gguf.GGMLQuantizationType[types[name]]
            byte_shape = (*tshape[:-1], tshape[-1] // per_block * block_bytes)
            w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=raw_type)
        else:
            w.add_tensor_info(name, tshape, np.dtype(np.float32), int(np.prod(tshape)) * 4)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    t0 = time.perf_counter()
    for i, (name, tshape, kind) in enumerate(plan):
        std = EMBED_STD if name == "token_embd.weight" else WEIGHT_STD
        data = random_blocks(types[name], tshape, rng, std) if kind == "matrix" else \
            _float_tensor(kind, tshape, s.dim, rng, router_logit_std)
        w.write_tensor_data(data)
        if progress and (i % 10 == 0 or i == len(plan) - 1):
            print(f"  {i + 1}/{len(plan)} tensors, {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    w.close()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--type", default="Q4_0", choices=sorted(SLICE_TYPES))
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--router-logit-std", type=float, default=ROUTER_LOGIT_STD,
                    help=f"spread of the router logits (default {ROUTER_LOGIT_STD}, a trained Mixtral's); 0 sends every "
                         "token to the same two experts")
    for field, default in asdict(MIXTRAL).items():
        if isinstance(default, int):
            ap.add_argument("--" + field.replace("_", "-"), type=int, default=default,
                            help=f"default {default} (Mixtral-8x7B)")
    args = ap.parse_args(argv)
    shape = replace(MIXTRAL, **{f: getattr(args, f) for f, v in asdict(MIXTRAL).items() if isinstance(v, int)})
    t0 = time.perf_counter()
    path = write_slice(args.out, args.type, args.blocks, shape, args.seed, progress=True,
                       router_logit_std=args.router_logit_std)
    print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # the tokenizer package, when run from a checkout
    sys.exit(main())

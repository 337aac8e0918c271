"""Quantization levels: which ggml format each GGUF tensor gets under a named level.

The llama.cpp levels reproduce `llama_tensor_get_type` (llama.cpp's src/llama-quant.cpp) for the llama architecture
without an importance matrix, so that our files mix formats as `llama-quantize` does for the same names. `q4_moe` is
our own level for mixtures of experts.

Names follow GGUF: `token_embd.weight`, `output.weight`, `output_norm.weight`, `blk.N.attn_{q,k,v,output}.weight`,
`blk.N.{attn,ffn}_norm.weight`, `blk.N.ffn_gate_inp.weight` (the router), `blk.N.ffn_{gate,up,down}_exps.weight`
(experts stacked (E, rows, cols)), and the older per-expert `blk.N.ffn_{gate,up,down}.E.weight`.

Rule table. "base" is the level's default type; i is the block index, n the number of blocks;
more_bits(i) = i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2 (llama.cpp's use_more_bits); 8 experts means n_experts == 8.

    tensor               f16   q8_0  q6_k  q5_k_m          q4_k_m          q4_0  q3_k_m             q2_k            q4_moe
    norms, router        F32   F32   F32   F32             F32             F32   F32                F32             F32
    token_embd           F16   Q8_0  Q6_K  Q5_K            Q4_K            Q4_0  Q3_K               Q2_K            Q8_0
    output               F16   Q8_0  Q6_K  Q6_K            Q6_K            Q6_K  Q6_K               Q6_K            Q8_0
    attn_q               F16   Q8_0  Q6_K  Q5_K            Q4_K            Q4_0  Q3_K               Q2_K            Q8_0
    attn_k               F16   Q8_0  Q6_K  Q5_K            Q4_K            Q4_0  Q3_K               Q2_K            Q8_0
      with 8 experts           Q8_0  Q8_0  Q8_0            Q8_0            Q8_0  Q8_0               Q8_0            Q8_0
    attn_v               F16   Q8_0  Q6_K  Q6_K if more_   Q6_K if more_   Q4_0  Q5_K if i < 2,     Q4_K if n_gqa   Q8_0
                                           bits(i), else   bits(i), else         else Q4_K          >= 4, else Q3_K
                                           Q5_K            Q4_K
      with 8 experts           Q8_0  Q8_0  Q8_0            Q8_0            Q8_0  Q8_0               Q8_0            Q8_0
    attn_output          F16   Q8_0  Q6_K  Q5_K            Q4_K            Q4_0  Q4_K               Q3_K            Q8_0
      with 8 experts           Q8_0  Q6_K  Q5_K            Q5_K            Q4_0  Q5_K               Q5_K            Q8_0
    ffn_gate, ffn_up     F16   Q8_0  Q6_K  Q5_K            Q4_K            Q4_0  Q3_K               Q2_K            Q4_K
    ffn_down             F16   Q8_0  Q6_K  Q6_K if more_   Q6_K if more_   Q4_0  Q5_K if i < n/16,  Q3_K            Q6_K if i < n/8
                                           bits(i), else   bits(i), else         else Q4_K                          or i >= 7n/8,
                                           Q5_K            Q4_K                                                     else Q5_K

The other llama.cpp levels differ from their base type only where the table's columns say for a like level:
    f32, bf16            every matrix in that type (f32: the norms and router too, which always are)
    q5_k_s               Q5_K; output Q6_K; attn_k/attn_v Q8_0 with 8 experts
    q5_1, q5_0, q4_1     the type everywhere; output Q6_K; attn_k/attn_v Q8_0 with 8 experts
    q4_k_s               Q4_K; output Q6_K; attn_v Q5_K in blocks 0-3 and ffn_down Q5_K for i < n/8; attn_output
                         Q5_K and attn_k/attn_v Q8_0 with 8 experts
    q3_k_l               Q3_K; output Q6_K; attn_v and ffn_down Q5_K; attn_output Q5_K without 8 experts (with 8 it
                         stays Q3_K: llama.cpp leaves Q3_K_L out of its 8-expert list); attn_k/attn_v Q8_0 with 8
    q3_k_s               Q3_K; output Q6_K; attn_output Q5_K and attn_k/attn_v Q8_0 with 8 experts

Then, as in llama.cpp, a width (the last, contiguous axis) that is not a multiple of the chosen block falls back:
Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, Q2_K/Q3_K -> Q4_0, and to F16 when even 32 does not divide it. For `output`
the fallback is Q8_0 directly. llama.cpp refuses a width not divisible by 32 for Q4_0/Q8_0 levels; we give F16.
Only tensors of two or more axes whose names end in "weight" are quantized, never `*_norm.weight` nor the router.

q4_moe, the reasoning: Mixtral's experts hold over 95% of its weights, so everything else (attention, embeddings,
output head) can take 8 bits for about 2% more file; expert gate and up take Q4_K as in q4_k_m; the down projections,
which q4_k_m splits between Q6_K and Q4_K, take Q5_K throughout, with Q6_K in the first and last eighth of the
blocks, where llama.cpp also finds errors hurt most. On Mixtral-8x7B's shapes the file is within 5% of q4_k_m's
(tests/test_recipes.py computes both).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from gguf import LlamaFileType

from .tensor import QType, block_size

__all__ = ["LEVELS", "Level", "choose_type", "plan"]


@dataclass(frozen=True)
class Level:
    """A named quantization level."""

    name: str
    base: QType  # the format most weights get
    file_type: LlamaFileType  # what GGUF's general.file_type records
    description: str


LEVELS: dict[str, Level] = {level.name: level for level in (
    Level("f32", QType.F32, LlamaFileType.ALL_F32,
          "32-bit floats everywhere: the source as it is, twice f16's size. For conversion, not for running."),
    Level("bf16", QType.BF16, LlamaFileType.MOSTLY_BF16,
          "bfloat16 for every matrix; norms and router in F32. The original Mixtral weights' own format."),
    Level("f16", QType.F16, LlamaFileType.MOSTLY_F16,
          "16-bit floats for every matrix; norms and router in F32. The reference, about 16 bits per weight."),
    Level("q8_0", QType.Q8_0, LlamaFileType.MOSTLY_Q8_0,
          "Q8_0 everywhere (8.5 bits per weight); nearly lossless."),
    Level("q6_k", QType.Q6_K, LlamaFileType.MOSTLY_Q6_K,
          "Q6_K everywhere (6.56 bits); attn_k/attn_v Q8_0 on 8-expert models."),
    Level("q5_k_m", QType.Q5_K, LlamaFileType.MOSTLY_Q5_K_M,
          "Q5_K (5.5 bits), with Q6_K for attn_v and ffn_down in about half the blocks and for the output head."),
    Level("q5_k_s", QType.Q5_K, LlamaFileType.MOSTLY_Q5_K_S,
          "Q5_K everywhere (5.5 bits), output head Q6_K; attn_k/attn_v Q8_0 on 8-expert models."),
    Level("q5_1", QType.Q5_1, LlamaFileType.MOSTLY_Q5_1,
          "Q5_1 everywhere (6 bits), output head Q6_K; a legacy format, Q5_K_M is smaller and better."),
    Level("q5_0", QType.Q5_0, LlamaFileType.MOSTLY_Q5_0,
          "Q5_0 everywhere (5.5 bits), output head Q6_K; a legacy format, Q5_K_S is as small and better."),
    Level("q4_k_m", QType.Q4_K, LlamaFileType.MOSTLY_Q4_K_M,
          "Q4_K (4.5 bits), with Q6_K for attn_v and ffn_down in about half the blocks and for the output head; "
          "llama.cpp's usual choice."),
    Level("q4_k_s", QType.Q4_K, LlamaFileType.MOSTLY_Q4_K_S,
          "Q4_K (4.5 bits), with Q5_K for attn_v in the first 4 blocks and ffn_down in the first eighth."),
    Level("q4_1", QType.Q4_1, LlamaFileType.MOSTLY_Q4_1,
          "Q4_1 everywhere (5 bits), output head Q6_K; a legacy format, Q4_K_S is smaller and better."),
    Level("q4_0", QType.Q4_0, LlamaFileType.MOSTLY_Q4_0,
          "Q4_0 everywhere (4.5 bits), output head Q6_K; the simplest and fastest 4-bit format."),
    Level("q3_k_l", QType.Q3_K, LlamaFileType.MOSTLY_Q3_K_L,
          "Q3_K (3.44 bits), with Q5_K for attention values and ffn_down."),
    Level("q3_k_m", QType.Q3_K, LlamaFileType.MOSTLY_Q3_K_M,
          "Q3_K (3.44 bits), with Q4_K/Q5_K for attention values, attention output and ffn_down."),
    Level("q3_k_s", QType.Q3_K, LlamaFileType.MOSTLY_Q3_K_S,
          "Q3_K everywhere (3.44 bits), output head Q6_K; degraded."),
    Level("q2_k", QType.Q2_K, LlamaFileType.MOSTLY_Q2_K,
          "Q2_K (2.63 bits), with Q3_K for ffn_down and higher formats for attention; visibly degraded."),
    Level("q4_moe", QType.Q4_K, LlamaFileType.MOSTLY_Q4_K_M,
          "Ours, for mixtures of experts: attention, embeddings and output head Q8_0; experts' gate/up Q4_K, "
          "down Q5_K (Q6_K in the first and last eighth of the blocks). About q4_k_m's size."),
)}

_BLOCK_RE = re.compile(r"^blk\.(\d+)\.")


def _category(name: str) -> str:
    """llama.cpp's tensor_get_category, first match wins (so ffn_gate_exps is 'ffn_gate')."""
    if name == "output.weight":
        return "output"
    if name == "token_embd.weight":
        return "token_embd"
    for key, category in (("attn_qkv.weight", "attn_v"), ("attn_kv_b.weight", "attn_v"), ("attn_v.weight", "attn_v"),
                          ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"),
                          ("attn_output.weight", "attn_output"),
                          ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down")):
        if key in name:
            return category
    return "other"


def _is_quantizable(name: str, shape: tuple[int, ...]) -> bool:
    """llama.cpp's tensor_allows_quantization for the tensors a llama-architecture model has."""
    return (len(shape) >= 2 and name.endswith("weight") and "_norm.weight" not in name
            and "ffn_gate_inp.weight" not in name)


def _more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _fallback(qtype: QType, cols: int) -> QType:
    """llama.cpp's tensor_type_fallback: a format whose block divides the width."""
    if qtype in (QType.F32, QType.F16, QType.BF16) or cols % block_size(qtype) == 0:
        return qtype
    wider = {QType.Q4_K: QType.Q5_0, QType.Q5_K: QType.Q5_1, QType.Q6_K: QType.Q8_0,
             QType.Q2_K: QType.Q4_0, QType.Q3_K: QType.Q4_0}.get(qtype, QType.F16)
    return wider if cols % block_size(wider) == 0 else QType.F16


def _llama_cpp_type(level: str, base: QType, category: str, cols: int, n_experts: int, i: int, n: int,
                    n_gqa: int) -> QType:
    """llama_tensor_get_type_impl, restricted to the levels in LEVELS (no imatrix, not Falcon, not a 70B)."""
    eight_experts = n_experts == 8
    if category == "output":
        return QType.Q8_0 if cols % block_size(base) else (base if base == QType.Q8_0 else QType.Q6_K)
    if category == "attn_v":
        new = base
        if level == "q2_k":
            new = QType.Q4_K if n_gqa >= 4 else QType.Q3_K
        elif level == "q3_k_m":
            new = QType.Q5_K if i < 2 else QType.Q4_K
        elif level == "q3_k_l":
            new = QType.Q5_K
        elif level in ("q4_k_m", "q5_k_m") and _more_bits(i, n):
            new = QType.Q6_K
        elif level == "q4_k_s" and i < 4:
            new = QType.Q5_K
        return QType.Q8_0 if eight_experts else new
    if category == "attn_k":
        return QType.Q8_0 if eight_experts else base
    if category == "ffn_down":
        if level == "q2_k":
            return QType.Q3_K
        if level == "q3_k_m":
            return QType.Q5_K if i < n // 16 else QType.Q4_K
        if level == "q3_k_l":
            return QType.Q5_K
        if level in ("q4_k_m", "q5_k_m") and _more_bits(i, n):
            return QType.Q6_K
        if level == "q4_k_s" and i < n // 8:
            return QType.Q5_K
        return base
    if category == "attn_output":
        if eight_experts and level in ("q2_k", "q3_k_s", "q3_k_m", "q4_k_s", "q4_k_m"):
            return QType.Q5_K
        if not eight_experts:
            return {"q2_k": QType.Q3_K, "q3_k_m": QType.Q4_K, "q3_k_l": QType.Q5_K}.get(level, base)
    return base


def _q4_moe_type(category: str, i: int, n: int) -> QType:
    if category in ("ffn_gate", "ffn_up"):
        return QType.Q4_K
    if category == "ffn_down":
        return QType.Q6_K if i < n // 8 or i >= 7 * n // 8 else QType.Q5_K
    return QType.Q8_0  # embeddings, output head, attention


def choose_type(level: str, tensor_name: str, shape: tuple[int, ...], n_experts: int,
                layer_index: int | None, n_layers: int, *, n_gqa: int = 4,
                tied_embeddings: bool = False) -> QType:
    """The ggml format for one tensor under a level.

    shape is in numpy order, the last axis the contiguous one (GGUF's ne[0]). layer_index is the block of a
    `blk.N.` tensor (None reads it from the name; ignored for other tensors). n_gqa is query heads per KV head
    (4 for Mixtral); tied_embeddings says the model has no output.weight, so token_embd serves as the output head.
    """
    if level not in LEVELS:
        raise ValueError(f"unknown quantization level {level!r}; known: {', '.join(LEVELS)}")
    shape = tuple(int(d) for d in shape)
    if not shape or any(d <= 0 for d in shape):
        raise ValueError(f"tensor {tensor_name}: bad shape {shape}")
    if n_layers <= 0:
        raise ValueError(f"n_layers must be positive, got {n_layers}")
    match = _BLOCK_RE.match(tensor_name)
    if match:
        named = int(match.group(1))
        if layer_index is None:
            layer_index = named
        elif layer_index != named:
            raise ValueError(f"tensor {tensor_name} is in block {named}, but layer_index is {layer_index}")
        if not 0 <= layer_index < n_layers:
            raise ValueError(f"tensor {tensor_name}: block {layer_index} is outside 0..{n_layers - 1}")
    i = layer_index if match else 0

    if not _is_quantizable(tensor_name, shape):
        return QType.F32
    base = LEVELS[level].base
    if base in (QType.F16, QType.F32, QType.BF16):
        return base
    category = _category(tensor_name)
    if tied_embeddings and category == "token_embd":
        category = "output"
    cols = shape[-1]
    if level == "q4_moe":
        chosen = _q4_moe_type(category, i, n_layers)
    else:
        chosen = _llama_cpp_type(level, base, category, cols, n_experts, i, n_layers, n_gqa)
    return _fallback(chosen, cols)


def plan(level: str, tensors: dict[str, tuple[int, ...]], n_experts: int, n_layers: int, *,
         n_gqa: int = 4) -> dict[str, QType]:
    """choose_type for every tensor of a model, given {name: shape}."""
    tied = "output.weight" not in tensors
    return {name: choose_type(level, name, shape, n_experts, None, n_layers, n_gqa=n_gqa, tied_embeddings=tied)
            for name, shape in tensors.items()}

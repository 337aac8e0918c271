"""Quantization levels: which ggml format each GGUF tensor gets under a named level.

The llama.cpp levels reproduce `llama_tensor_get_type` (llama.cpp's src/llama-quant.cpp) for the llama architecture,
with or without an importance matrix, so that our files mix formats as `llama-quantize` does for the same names.
`q4_moe` is our own level for mixtures of experts.

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

The IQ levels (base format in brackets; "low" is the level's ffn_down format for i < n/8):
    iq4_nl [IQ4_NL], iq4_xs [IQ4_XS]   output Q6_K; attn_v Q5_K if n_gqa >= 4; ffn_down Q5_K for i < n/8 without an
                                       imatrix; attn_output Q5_K and attn_k/attn_v Q8_0 with 8 experts
    iq3_s, iq3_xs [IQ3_S]              output Q6_K; attn_v Q4_K if n_gqa >= 4; iq3_xs: attn_q IQ3_XXS, attn_k IQ3_XXS
                                       without 8 experts, ffn_gate/ffn_up IQ3_XXS for n/8 <= i < 7n/8; attn_output
                                       Q5_K and attn_k/attn_v Q8_0 with 8 experts
    iq3_m [IQ3_S]                      output Q6_K; attn_v Q4_K; attn_output Q4_K (Q5_K with 8 experts); ffn_down Q4_K
                                       for i < n/8, and where more_bits(i) with 8 experts; attn_k/attn_v Q8_0 with 8
    iq3_xxs [IQ3_XXS]                  output Q5_K, token_embd IQ3_S; attn_q IQ2_S; attn_k IQ2_S without 8 experts;
                                       attn_v Q4_K if n_gqa >= 4, else IQ3_XXS with an imatrix and IQ3_S without;
                                       ffn_down without an imatrix Q4_K for i < n/8, else Q3_K; attn_output IQ3_S
                                       (Q5_K with 8 experts); attn_k/attn_v Q8_0 with 8 experts
    iq2_xxs [IQ2_XXS], iq2_xs [IQ2_XS] output Q5_K, token_embd Q2_K, low Q2_K; and as below
    iq1_s [IQ1_S], iq1_m [IQ1_M]       output Q5_K, token_embd Q2_K, low Q2_K; attn_output IQ2_XXS without 8 experts;
                                       and as below
    iq2_s [IQ2_XS], iq2_m [IQ2_S]      output Q5_K, token_embd IQ3_S, low IQ3_S; attn_output IQ3_S without 8 experts;
                                       all six: attn_v Q4_K if n_gqa >= 4 or 4+ experts (else Q2_K, or IQ3_S for
                                       iq2_s/iq2_m), attn_k Q4_K and attn_output Q5_K with 8 experts. llama.cpp's
                                       8-expert Q8_0 for attn_k/attn_v does not apply to these six.
With an importance matrix q4_0 and q5_0 also take Q4_1 / Q5_1 for ffn_down where i < n/8. llama.cpp refuses to make
IQ3_XXS, IQ2_XXS, IQ2_XS, IQ2_S, IQ1_S and IQ1_M (outside token_embd and the output head) without an importance
matrix.

Then, as in llama.cpp, a width (the last, contiguous axis) that is not a multiple of the chosen block falls back:
Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, Q2_K/Q3_K -> Q4_0, the IQ formats of 256 -> IQ4_NL, and to F16 when even
32 does not divide it. For `output`
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
    Level("iq4_nl", QType.IQ4_NL, LlamaFileType.MOSTLY_IQ4_NL,
          "IQ4_NL (4.5 bits: Q4_0's blocks of 32 on a non-linear grid), output head Q6_K; attn_v Q5_K, and ffn_down "
          "Q5_K in the first eighth of the blocks unless an importance matrix is given."),
    Level("iq4_xs", QType.IQ4_XS, LlamaFileType.MOSTLY_IQ4_XS,
          "IQ4_XS (4.25 bits), output head Q6_K; attn_v Q5_K, and ffn_down Q5_K in the first eighth of the blocks "
          "unless an importance matrix is given. Near q4_k_s's quality in less space."),
    Level("iq3_m", QType.IQ3_S, LlamaFileType.MOSTLY_IQ3_M,
          "IQ3_S (3.44 bits), with Q4_K for attn_v, attn_output and ffn_down in the first eighth of the blocks "
          "(on 8-expert models also in use_more_bits' blocks)."),
    Level("iq3_s", QType.IQ3_S, LlamaFileType.MOSTLY_IQ3_S,
          "IQ3_S everywhere (3.44 bits), output head Q6_K; attn_v Q4_K when 4+ query heads share a KV head."),
    Level("iq3_xs", QType.IQ3_S, LlamaFileType.MOSTLY_IQ3_XS,
          "IQ3_S (3.44 bits), with IQ3_XXS for attn_q and for ffn_gate/ffn_up in the middle blocks; about 3.3 bits."),
    Level("iq3_xxs", QType.IQ3_XXS, LlamaFileType.MOSTLY_IQ3_XXS,
          "IQ3_XXS (3.06 bits), with IQ2_S for attn_q, IQ3_S for token_embd, Q5_K for the output head; needs an "
          "importance matrix."),
    Level("iq2_m", QType.IQ2_S, LlamaFileType.MOSTLY_IQ2_M,
          "IQ2_S (2.56 bits), with IQ3_S for token_embd and ffn_down in the first eighth, Q4_K for attn_v; needs an "
          "importance matrix."),
    Level("iq2_s", QType.IQ2_XS, LlamaFileType.MOSTLY_IQ2_S,
          "IQ2_XS (2.31 bits), with iq2_m's IQ3_S token_embd and first-eighth ffn_down; needs an importance matrix."),
    Level("iq2_xs", QType.IQ2_XS, LlamaFileType.MOSTLY_IQ2_XS,
          "IQ2_XS (2.31 bits), with Q2_K for token_embd and ffn_down in the first eighth, Q4_K for attn_v; needs an "
          "importance matrix."),
    Level("iq2_xxs", QType.IQ2_XXS, LlamaFileType.MOSTLY_IQ2_XXS,
          "IQ2_XXS (2.06 bits), with Q2_K for token_embd and ffn_down in the first eighth, Q4_K for attn_v; needs an "
          "importance matrix. Badly degraded."),
    Level("iq1_m", QType.IQ1_M, LlamaFileType.MOSTLY_IQ1_M,
          "IQ1_M (1.75 bits), with Q2_K for token_embd and ffn_down in the first eighth, Q4_K for attn_v; needs an "
          "importance matrix. Barely usable: for experiments at the edge of what fits."),
    Level("iq1_s", QType.IQ1_S, LlamaFileType.MOSTLY_IQ1_S,
          "IQ1_S (1.56 bits), with Q2_K for token_embd and ffn_down in the first eighth, Q4_K for attn_v; needs an "
          "importance matrix. The smallest level; barely usable."),
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


_IQ_BELOW_4 = (QType.IQ1_S, QType.IQ1_M, QType.IQ2_XXS, QType.IQ2_XS, QType.IQ2_S, QType.IQ3_XXS, QType.IQ3_S)
_WIDER = {QType.Q4_K: QType.Q5_0, QType.Q5_K: QType.Q5_1, QType.Q6_K: QType.Q8_0, QType.Q2_K: QType.Q4_0,
          QType.Q3_K: QType.Q4_0, QType.IQ4_XS: QType.IQ4_NL, **{q: QType.IQ4_NL for q in _IQ_BELOW_4}}


def _fallback(qtype: QType, cols: int) -> QType:
    """llama.cpp's tensor_type_fallback: a format whose block divides the width."""
    if qtype in (QType.F32, QType.F16, QType.BF16) or cols % block_size(qtype) == 0:
        return qtype
    wider = _WIDER.get(qtype, QType.F16)
    return wider if cols % block_size(wider) == 0 else QType.F16


# llama.cpp's ftype groups, by level name
_IQ2_GROUP = ("iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq1_s", "iq1_m")  # its IQ1/IQ2 branch, replacing the usual rules
_IQ2_S_OR_M = ("iq2_s", "iq2_m")
_IQ1 = ("iq1_s", "iq1_m")
_OUTPUT_Q5_K = ("iq3_xxs", *_IQ2_GROUP)
_ATTN_OUTPUT_Q5_K_WITH_8 = ("q2_k", "iq3_xs", "iq3_xxs", "q3_k_s", "q3_k_m", "iq4_nl", "q4_k_s", "q4_k_m", "iq3_s",
                            "iq3_m", "iq4_xs")


def _llama_cpp_type(level: str, base: QType, category: str, cols: int, n_experts: int, i: int, n: int,
                    n_gqa: int, imatrix: bool) -> QType:
    """llama_tensor_get_type_impl, restricted to the levels in LEVELS (not Falcon, not a 70B), branch for branch.

    Its counters (i_attention_wv, i_ffn_down) count tensors in llama.cpp's load order, which sorts by block number:
    with one tensor per block and kind, as merged experts give, the counter is the block index i."""
    eight_experts = n_experts == 8
    if category == "output":
        if cols % block_size(base):
            return QType.Q8_0
        if level in _OUTPUT_Q5_K:
            return QType.Q5_K
        return base if base == QType.Q8_0 else QType.Q6_K
    if category == "token_embd":
        if level in ("iq2_xxs", "iq2_xs", *_IQ1):
            return QType.Q2_K
        if level in _IQ2_S_OR_M or level == "iq3_xxs":
            return QType.IQ3_S
        return base
    if level in _IQ2_GROUP:
        low = QType.IQ3_S if level in _IQ2_S_OR_M else QType.Q2_K
        if category == "attn_v":  # note: no 8-expert Q8_0 here, unlike every other level
            return QType.Q4_K if n_gqa >= 4 or n_experts >= 4 else low
        if category == "attn_k" and eight_experts:
            return QType.Q4_K
        if category == "ffn_down":
            return low if i < n // 8 else base
        if category == "attn_output":
            if eight_experts:
                return QType.Q5_K
            if level in _IQ1:
                return QType.IQ2_XXS
            return QType.IQ3_S if level in _IQ2_S_OR_M else base
        return base
    if category == "attn_v":
        new = base
        if level == "q2_k":
            new = QType.Q4_K if n_gqa >= 4 else QType.Q3_K
        elif level == "iq3_xxs":
            new = QType.Q4_K if n_gqa >= 4 else (QType.IQ3_XXS if imatrix else QType.IQ3_S)
        elif (level in ("iq3_xs", "iq3_s") and n_gqa >= 4) or level == "iq3_m":
            new = QType.Q4_K
        elif level == "q3_k_m":
            new = QType.Q5_K if i < 2 else QType.Q4_K
        elif level == "q3_k_l" or (level in ("iq4_nl", "iq4_xs") and n_gqa >= 4):
            new = QType.Q5_K
        elif level in ("q4_k_m", "q5_k_m") and _more_bits(i, n):
            new = QType.Q6_K
        elif level == "q4_k_s" and i < 4:
            new = QType.Q5_K
        return QType.Q8_0 if eight_experts else new
    if category == "attn_k":
        if eight_experts:
            return QType.Q8_0
        return {"iq3_xs": QType.IQ3_XXS, "iq3_xxs": QType.IQ2_S}.get(level, base)
    if category == "attn_q":
        return {"iq3_xs": QType.IQ3_XXS, "iq3_xxs": QType.IQ2_S}.get(level, base)
    if category == "ffn_down":
        if level == "q2_k":
            return QType.Q3_K
        if level == "iq3_xxs" and not imatrix:
            return QType.Q4_K if i < n // 8 else QType.Q3_K
        if level == "q3_k_m":
            return QType.Q5_K if i < n // 16 else QType.Q4_K
        if level == "iq3_m" and (i < n // 8 or (eight_experts and _more_bits(i, n))):
            return QType.Q4_K
        if level == "q3_k_l":
            return QType.Q5_K
        if level == "q4_k_m":
            return QType.Q6_K if _more_bits(i, n) else base
        if i < n // 8 and level in ("iq4_nl", "iq4_xs") and not imatrix:
            return QType.Q5_K
        if level == "q5_k_m" and _more_bits(i, n):
            return QType.Q6_K
        if level == "q4_k_s" and i < n // 8:
            return QType.Q5_K
        if level in ("q4_0", "q5_0") and imatrix and i < n // 8:
            # llama.cpp guards the first ffn_down blocks with the +1 format, only with an imatrix
            return QType.Q4_1 if level == "q4_0" else QType.Q5_1
        return base
    if category == "attn_output":
        if eight_experts:
            return QType.Q5_K if level in _ATTN_OUTPUT_Q5_K_WITH_8 else base
        return {"q2_k": QType.Q3_K, "iq3_xxs": QType.IQ3_S, "q3_k_m": QType.Q4_K, "q3_k_l": QType.Q5_K,
                "iq3_m": QType.Q4_K}.get(level, base)
    if category in ("ffn_gate", "ffn_up") and level == "iq3_xs" and n // 8 <= i < 7 * n // 8:
        return QType.IQ3_XXS
    return base


def _q4_moe_type(category: str, i: int, n: int) -> QType:
    if category in ("ffn_gate", "ffn_up"):
        return QType.Q4_K
    if category == "ffn_down":
        return QType.Q6_K if i < n // 8 or i >= 7 * n // 8 else QType.Q5_K
    return QType.Q8_0  # embeddings, output head, attention


def choose_type(level: str, tensor_name: str, shape: tuple[int, ...], n_experts: int,
                layer_index: int | None, n_layers: int, *, n_gqa: int = 4,
                tied_embeddings: bool = False, imatrix: bool = False) -> QType:
    """The ggml format for one tensor under a level.

    shape is in numpy order, the last axis the contiguous one (GGUF's ne[0]). layer_index is the block of a
    `blk.N.` tensor (None reads it from the name; ignored for other tensors). n_gqa is query heads per KV head
    (4 for Mixtral); tied_embeddings says the model has no output.weight, so token_embd serves as the output head.
    imatrix says an importance matrix is given: llama.cpp then picks other formats for a few tensors (iq3_xxs,
    iq4_xs/iq4_nl, q4_0/q5_0 ffn_down).
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
        chosen = _llama_cpp_type(level, base, category, cols, n_experts, i, n_layers, n_gqa, imatrix)
    return _fallback(chosen, cols)


def plan(level: str, tensors: dict[str, tuple[int, ...]], n_experts: int, n_layers: int, *,
         n_gqa: int = 4, imatrix: bool = False) -> dict[str, QType]:
    """choose_type for every tensor of a model, given {name: shape}."""
    tied = "output.weight" not in tensors
    return {name: choose_type(level, name, shape, n_experts, None, n_layers, n_gqa=n_gqa, tied_embeddings=tied,
                              imatrix=imatrix)
            for name, shape in tensors.items()}

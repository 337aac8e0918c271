"""ModelWeights: every tensor of a Mixtral model under GGUF names, checked against the config.

Sources (HF, GGUF, MLX) produce a dict of GGUF-named tensors; `assemble` checks each shape against the config and
builds the structure the backends read. One naming for all sources keeps recipes and error messages uniform.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from mixlocal.quant import QStack, QTensor, formats

from .config import ModelConfig
from .errors import ModelFormatError

__all__ = ["LayerWeights", "ModelWeights", "assemble", "expected_shapes", "in_ggml_blocks", "weight_stats"]

Matrix = QTensor
Experts = QTensor | QStack  # (E, rows, cols)


@dataclass
class LayerWeights:
    attn_norm: np.ndarray  # (D,) float32
    wq: Matrix             # (n_heads*head_dim, D)
    wk: Matrix             # (n_kv_heads*head_dim, D)
    wv: Matrix             # (n_kv_heads*head_dim, D)
    wo: Matrix             # (D, n_heads*head_dim)
    ffn_norm: np.ndarray   # (D,) float32
    router: np.ndarray     # (E, D) float32: the router stays unquantized
    w1: Experts            # gate (E, F, D)
    w3: Experts            # up   (E, F, D)
    w2: Experts            # down (E, D, F)


@dataclass
class ModelWeights:
    config: ModelConfig
    tok_embd: Matrix       # (V, D)
    layers: list[LayerWeights]
    norm: np.ndarray       # (D,) float32
    output: Matrix         # (V, D)
    origin: dict[str, str] = field(default_factory=dict)  # tensor name -> file it came from

    def tensors(self) -> dict[str, QTensor | QStack | np.ndarray]:
        """All tensors under their GGUF names, in file order."""
        out: dict = {"token_embd.weight": self.tok_embd}
        for i, lw in enumerate(self.layers):
            for name, attr in _LAYER_FIELDS.items():
                out[f"blk.{i}.{name}"] = getattr(lw, attr)
        out["output_norm.weight"] = self.norm
        out["output.weight"] = self.output
        return out


_LAYER_FIELDS = {
    "attn_norm.weight": "attn_norm",
    "attn_q.weight": "wq",
    "attn_k.weight": "wk",
    "attn_v.weight": "wv",
    "attn_output.weight": "wo",
    "ffn_norm.weight": "ffn_norm",
    "ffn_gate_inp.weight": "router",
    "ffn_gate_exps.weight": "w1",
    "ffn_up_exps.weight": "w3",
    "ffn_down_exps.weight": "w2",
}


def expected_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """GGUF name -> logical numpy shape (rows, cols) that the config implies."""
    shapes = {"token_embd.weight": (c.vocab_size, c.dim), "output_norm.weight": (c.dim,),
              "output.weight": (c.vocab_size, c.dim)}
    for i in range(c.n_layers):
        p = f"blk.{i}."
        shapes.update({
            p + "attn_norm.weight": (c.dim,),
            p + "attn_q.weight": (c.q_dim, c.dim),
            p + "attn_k.weight": (c.kv_dim, c.dim),
            p + "attn_v.weight": (c.kv_dim, c.dim),
            p + "attn_output.weight": (c.dim, c.q_dim),
            p + "ffn_norm.weight": (c.dim,),
            p + "ffn_gate_inp.weight": (c.n_experts, c.dim),
            p + "ffn_gate_exps.weight": (c.n_experts, c.ffn_dim, c.dim),
            p + "ffn_up_exps.weight": (c.n_experts, c.ffn_dim, c.dim),
            p + "ffn_down_exps.weight": (c.n_experts, c.dim, c.ffn_dim),
        })
    return shapes


def to_float(t: QTensor | np.ndarray) -> np.ndarray:
    """A small tensor (norm, router) as float32 numpy, in its logical shape."""
    if isinstance(t, np.ndarray):
        return np.ascontiguousarray(t, dtype=np.float32)
    return formats.dequantize(t.qtype, t.rows_view()).reshape(t.shape).astype(np.float32, copy=False)


def assemble(config: ModelConfig, tensors: dict, origin: dict[str, str]) -> ModelWeights:
    """Check every tensor against the config and build ModelWeights. Raises ModelFormatError naming the tensor."""
    want = expected_shapes(config)
    if "output.weight" not in tensors and "token_embd.weight" in tensors:
        tensors = dict(tensors, **{"output.weight": tensors["token_embd.weight"]})  # tied embeddings
        origin = dict(origin, **{"output.weight": origin.get("token_embd.weight", "?")})
    for name, shape in want.items():
        if name not in tensors:
            where = ", ".join(sorted(set(origin.values()))) or "the model"
            raise ModelFormatError(f"{where}: tensor {name} is missing")
        got = tuple(tensors[name].shape)
        if got != shape:
            raise ModelFormatError(
                f"{origin.get(name, 'the model')}: tensor {name} has shape {got}, config implies {shape}")

    def small(name):
        try:
            return to_float(tensors[name])
        except NotImplementedError as e:
            raise ModelFormatError(f"{origin.get(name)}: tensor {name}: {e}") from None

    layers = []
    for i in range(config.n_layers):
        p = f"blk.{i}."
        kw = {attr: tensors[p + name] for name, attr in _LAYER_FIELDS.items()}
        for attr in ("attn_norm", "ffn_norm", "router"):
            kw[attr] = small(p + {v: k for k, v in _LAYER_FIELDS.items()}[attr])
        layers.append(LayerWeights(**kw))
    return ModelWeights(config=config, tok_embd=tensors["token_embd.weight"], layers=layers,
                        norm=small("output_norm.weight"), output=tensors["output.weight"], origin=origin)


def in_ggml_blocks(weights: ModelWeights) -> ModelWeights:
    """The weights with every MLX affine matrix (an mlx-community folder as stored) as ggml blocks: 4- and 5-bit
    groups become Q4_1 / Q5_1 exactly, other widths float32 with a notice (quant/affine.py: ggml_from_affine).
    The same object when there is none, so GGUF and HF weights pass through untouched. Requantizing (quant=), the
    numba backend and the GGUF writer read ggml blocks."""
    from mixlocal.quant.affine import AffineTensor, ggml_from_affine
    tensors = weights.tensors()
    if not any(isinstance(t, AffineTensor) for t in tensors.values()):
        return weights
    done: dict[int, object] = {}  # tied embeddings: one tensor under two names, converted once
    out = {}
    for name, t in tensors.items():
        if isinstance(t, AffineTensor):
            if id(t) not in done:
                done[id(t)] = ggml_from_affine(t, f"{weights.origin.get(name, 'model')}: {name}")
            t = done[id(t)]
        out[name] = t
    return assemble(weights.config, out, weights.origin)


def weight_stats(weights) -> dict:
    """Per format: tensor count, elements and bytes; totals; and the bytes one decoded token reads.

    Tensors are counted under their GGUF names (all experts of a block in one tensor). Norms and the router are held
    as float32 at run time and are counted so. A tensor shared by two names (tied embeddings) counts once.
    """
    c = weights.config
    formats: dict[str, dict] = {}
    seen: set[int] = set()
    total_bytes = total_elems = expert_bytes = 0
    for name, t in weights.tensors().items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        if isinstance(t, np.ndarray):
            fmt, nbytes, nelem = t.dtype.name.upper().replace("FLOAT", "F"), int(t.nbytes), int(t.size)
        elif not hasattr(t, "qtype"):  # MLX affine groups as an mlx-community folder stores them
            fmt, nbytes, nelem = f"AFFINE{t.bits}_G{t.group_size}", int(t.nbytes), int(np.prod(t.shape))
        else:
            fmt, nbytes, nelem = t.qtype.name, int(t.nbytes), int(t.n_elements)
        f = formats.setdefault(fmt, {"tensors": 0, "elements": 0, "bytes": 0})
        f["tensors"] += 1
        f["elements"] += nelem
        f["bytes"] += nbytes
        total_bytes += nbytes
        total_elems += nelem
        if name.endswith("_exps.weight"):
            expert_bytes += nbytes
    for f in formats.values():
        f["bits_per_weight"] = 8.0 * f["bytes"] / f["elements"]
    # A decoded token reads every non-expert matrix once and n_used of n_experts experts per block; its embedding
    # row is a lookup, not a read of the whole table.
    embd = weights.tok_embd.nbytes
    per_token = total_bytes - expert_bytes - embd + expert_bytes * c.n_experts_used // c.n_experts
    return {"formats": dict(sorted(formats.items(), key=lambda kv: -kv[1]["bytes"])), "size_bytes": total_bytes,
            "n_elements": total_elems, "bits_per_weight": 8.0 * total_bytes / total_elems,
            "expert_bytes": expert_bytes, "bytes_per_decoded_token": per_token}

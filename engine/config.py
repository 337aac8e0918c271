"""ModelConfig: the numbers that define a Mixtral-family model, from HF config.json or GGUF metadata."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import ModelFormatError

__all__ = ["ModelConfig"]


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    dim: int                  # model width (hidden_size)
    n_layers: int
    n_heads: int              # query heads
    n_kv_heads: int
    head_dim: int
    ffn_dim: int              # one expert's hidden width (intermediate_size)
    n_experts: int
    n_experts_used: int
    norm_eps: float = 1e-5
    rope_theta: float = 1e6
    max_context: int = 32768
    # "half": element i rotates with i + head_dim/2 (HF checkpoints); "neighbor": 2i with 2i+1 (GGUF, whose
    # converter permuted the q and k rows). Attention scores are the same either way, so we keep the weights as
    # stored and let the RoPE kernel pair accordingly instead of permuting rows at load.
    rope_pairing: str = "half"
    bos_id: int = 1
    eos_id: int = 2
    name: str = "mixtral"

    def __post_init__(self):
        for field in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim",
                      "n_experts", "n_experts_used", "max_context"):
            v = getattr(self, field)
            if not isinstance(v, int) or v <= 0:
                raise ModelFormatError(f"config field {field} must be a positive integer, got {v!r}")
        if self.n_heads % self.n_kv_heads:
            raise ModelFormatError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.n_experts_used > self.n_experts:
            raise ModelFormatError(f"n_experts_used {self.n_experts_used} > n_experts {self.n_experts}")
        if self.head_dim % 2:
            raise ModelFormatError(f"head_dim {self.head_dim} must be even for RoPE")
        if self.rope_pairing not in ("half", "neighbor"):
            raise ModelFormatError(f"unknown rope_pairing {self.rope_pairing!r}")

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_hf(cls, path: str | Path) -> ModelConfig:
        """Read an HF config.json: the published Mixtral shape (top-level rope_theta, no head_dim) or the newer one
        transformers 5 writes (rope_parameters.rope_theta, head_dim)."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ModelFormatError(f"{path}: config.json not found") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelFormatError(f"{path}: not a readable JSON config ({e})") from None
        if not isinstance(raw, dict):
            raise ModelFormatError(f"{path}: config must be a JSON object")
        try:
            n_heads = int(raw["num_attention_heads"])
            dim = int(raw["hidden_size"])
            head_dim = raw.get("head_dim") or dim // n_heads
            rope = raw.get("rope_parameters") or {}
            theta = raw.get("rope_theta", rope.get("rope_theta", 1e6))
            return cls(
                vocab_size=int(raw["vocab_size"]),
                dim=dim,
                n_layers=int(raw["num_hidden_layers"]),
                n_heads=n_heads,
                n_kv_heads=int(raw.get("num_key_value_heads", n_heads)),
                head_dim=int(head_dim),
                ffn_dim=int(raw["intermediate_size"]),
                n_experts=int(raw.get("num_local_experts", 8)),
                n_experts_used=int(raw.get("num_experts_per_tok", 2)),
                norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
                rope_theta=float(theta),
                max_context=int(raw.get("max_position_embeddings", 32768)),
                rope_pairing="half",
                bos_id=int(raw.get("bos_token_id") or 1),
                eos_id=int(raw.get("eos_token_id") or 2),
                name=str(raw.get("_name_or_path") or path.parent.name or "mixtral"),
            )
        except KeyError as e:
            raise ModelFormatError(f"{path}: config.json lacks {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            if isinstance(e, ModelFormatError):
                raise
            raise ModelFormatError(f"{path}: bad value in config.json ({e})") from None

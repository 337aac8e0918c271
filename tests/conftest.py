"""Shared fixtures: tiny random Mixtral checkpoints in the published layout, built by transformers itself."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import mistral_common
import numpy as np
import pytest

MIXTRAL_TOKENIZER = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"

# A few hundred wide, GQA, 8 experts: small enough for CI, shaped so every K format applies (multiples of 256).
TINY = {"vocab_size": 32000, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 8, "num_experts_per_tok": 2,
        "rms_norm_eps": 1e-5, "max_position_embeddings": 32768}
# Default init gives router logits with a spread near 0.3, so the two chosen experts get almost equal weights.
# Scaled up, router logits spread about 3 (like a trained Mixtral's): tokens really prefer their experts.
ROUTER_GAIN = 3.0


def published_config(hp: dict) -> dict:
    """config.json as mistralai/Mixtral-8x7B-Instruct-v0.1 publishes it: top-level rope_theta, no head_dim."""
    return {
        "architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
        "hidden_act": "silu", "initializer_range": 0.02, "model_type": "mixtral", "output_router_logits": False,
        "rope_theta": 1e6, "router_aux_loss_coef": 0.02, "sliding_window": None, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "transformers_version": "4.36.0.dev0", "use_cache": True, **hp,
    }


def make_hf_checkpoint(out: Path, hp: dict = TINY, seed: int = 0, dtype: str = "bfloat16") -> Path:
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    model = MixtralForCausalLM(MixtralConfig(**hp, rope_theta=1e6))
    with torch.no_grad():
        for p in model.parameters():  # init_std 0.02 leaves activations tiny; widen so logits have real spread
            p.mul_(3.0)
        for layer in model.model.layers:
            layer.mlp.gate.weight.mul_(ROUTER_GAIN)
            for name in ("input_layernorm", "post_attention_layernorm"):
                getattr(layer, name).weight.copy_(1.0 + 0.1 * torch.randn_like(getattr(layer, name).weight))
    model.to(getattr(torch, dtype)).save_pretrained(out)
    (out / "config.json").write_text(json.dumps(published_config(hp), indent=2))
    shutil.copy(MIXTRAL_TOKENIZER, out / "tokenizer.model")
    return out


@pytest.fixture(scope="session")
def hf_model_dir(tmp_path_factory) -> Path:
    return make_hf_checkpoint(tmp_path_factory.mktemp("tiny_mixtral"))


@pytest.fixture(scope="session")
def hf_reference(hf_model_dir):
    """transformers' MixtralForCausalLM in float32, loaded from the same bf16 files: the reference."""
    import torch
    from transformers import MixtralForCausalLM

    torch.set_num_threads(2)
    model = MixtralForCausalLM.from_pretrained(hf_model_dir, dtype=torch.float32)
    model.eval()
    return model


def reference_logits(model, ids) -> np.ndarray:
    import torch
    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits[0].float().numpy()


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def mean_kl(ref_logits: np.ndarray, our_logits: np.ndarray) -> float:
    """Mean over rows of KL(ref || ours) of the softmax distributions, in float64."""
    def logsoftmax(z):
        z = z.astype(np.float64)
        z = z - z.max(axis=-1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    lp, lq = logsoftmax(ref_logits), logsoftmax(our_logits)
    return float((np.exp(lp) * (lp - lq)).sum(axis=-1).mean())


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def ggml_weighted():
    """ggml_quantize_chunk from llama-cpp-python's libggml, with an importance matrix or None: the reference bytes
    for every quantizer test (skipped with the reason when the library cannot be loaded)."""
    from mixlocal.quant.formats import row_bytes
    from mixlocal.quant.quantize import IMATRIX_REQUIRED
    try:  # plain module when tests/ is not a package
        from test_formats import _ggml_base
    except ImportError:
        from tests.test_formats import _ggml_base
    lib, reason = _ggml_base()
    if lib is None:
        pytest.skip(reason)

    def run(qtype, x: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
        # ggml aborts the process on IQ2_XXS/IQ2_XS/IQ1_S/IQ1_M without an imatrix: never ask it to
        assert imatrix is not None or qtype not in IMATRIX_REQUIRED
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.zeros((x.shape[0], row_bytes(qtype, x.shape[1])), dtype=np.uint8)
        qw = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
        written = lib.ggml_quantize_chunk(int(qtype), x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1],
                                          None if qw is None else qw.ctypes.data)
        assert written == out.nbytes
        return out
    return run

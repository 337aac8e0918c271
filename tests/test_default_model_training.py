"""The default model's build script: its export layout, its baselines, its corpus cleaning, and the shipped files.

References are not our code: transformers' MixtralForCausalLM loading the published checkpoint layout,
mistral-common's tokenizer file, and plain counting written out here for the n-gram baselines.
"""

from __future__ import annotations

import itertools
import json
import math
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import default_model_corpus as corpus
import train_default_model as trainer

# The trainer exports here; tools/ship_default_model.py then quantizes it to the packaged GGUF and moves the
# bf16 export to tools/.cache/default_hf, so the measured weights are looked for in both places.
SHIPPED = next((d for d in (REPO / "engine" / "data" / "default", REPO / "tools" / ".cache" / "default_hf")
                if (d / "model.safetensors").exists()), REPO / "engine" / "data" / "default")
RESULTS = REPO / "bench" / "results" / "default_model.json"


def _tiny_model(seed: int = 0):
    config = transformers.MixtralConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, rope_theta=1e6, rms_norm_eps=1e-5,
        tie_word_embeddings=False, max_position_embeddings=128)
    torch.manual_seed(seed)
    model = transformers.MixtralForCausalLM(config)
    with torch.no_grad():  # routers large enough that routing differs between tokens
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 1.0)
    return model.eval()


def test_export_reloads_in_transformers_with_the_same_logits(tmp_path):
    # intermediate_size != hidden_size, so a transposed or swapped w1/w2/w3 changes shapes or numbers
    model = _tiny_model()
    info = trainer.export(model, tmp_path)
    assert info["tensors"] == 3 + 2 * (4 + 2 + 1 + 3 * 4)
    with torch.no_grad():
        for p in model.parameters():  # what the bf16 file holds
            p.copy_(p.to(torch.bfloat16).float())
    reloaded = transformers.MixtralForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(3, 300, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        got = reloaded(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_exported_tensor_names_follow_the_published_layout(tmp_path):
    from safetensors import safe_open

    trainer.export(_tiny_model(), tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        names = f.keys()  # safe_open is not iterable
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in names}
        dtypes = {f.get_slice(k).get_dtype() for k in names}
    assert dtypes == {"BF16"}
    prefix = "model.layers.1.block_sparse_moe"
    assert shapes[f"{prefix}.gate.weight"] == (4, 64)
    assert shapes[f"{prefix}.experts.3.w1.weight"] == (96, 64)
    assert shapes[f"{prefix}.experts.3.w3.weight"] == (96, 64)
    assert shapes[f"{prefix}.experts.3.w2.weight"] == (64, 96)
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (32, 64)
    assert shapes["lm_head.weight"] == (300, 64)
    assert not any(".mlp." in k for k in shapes)


def test_ngram_baselines_match_plain_counting():
    rng = np.random.default_rng(3)
    vocab = 12
    train = rng.integers(0, vocab, 400)
    held = rng.integers(0, vocab, (3, 9))
    got = trainer.ngram_perplexities(train, held, vocab)

    unigram, bigram = Counter(train.tolist()), Counter(zip(train[:-1].tolist(), train[1:].tolist()))
    contexts = Counter(train[:-1].tolist())
    pairs = [(int(w[i - 1]), int(w[i])) for w in held for i in range(1, len(w))]
    for k, ppl in got["unigram"]["perplexity_by_k"].items():
        nll = [-math.log((unigram[b] + k) / (len(train) + k * vocab)) for _, b in pairs]
        assert ppl == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-9)
    for k, ppl in got["bigram"]["perplexity_by_k"].items():
        nll = [-math.log((bigram[(a, b)] + k) / (contexts[a] + k * vocab)) for a, b in pairs]
        assert ppl == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-9)
    assert got["bigram"]["perplexity"] == min(got["bigram"]["perplexity_by_k"].values())


def test_rst_cleaning_keeps_prose_and_drops_code_and_markup():
    source = """\
.. _tut-if:

More Control Flow Tools
=======================

Use the :keyword:`if` statement with ``x`` and see :func:`~os.path.join` or `the docs <https://x>`_.
It wraps onto a second line.  For example::

   >>> x = 1
   >>> print(x)

.. code-block:: python

   def f(): pass

.. note::

   Notes are prose and are kept here.
"""
    prose = corpus.rst_to_prose(source).splitlines()
    assert prose == [
        "More Control Flow Tools",
        "Use the if statement with x and see os.path.join or the docs. It wraps onto a second line. For example:",
        "Notes are prose and are kept here.",
    ]


def test_learning_rate_warms_up_then_decays_to_the_floor():
    rates = [trainer.learning_rate(s, 100, 1e-3, 10, 1e-4) for s in range(101)]
    assert rates[9] == pytest.approx(1e-3)
    assert rates[100] == pytest.approx(1e-4)
    assert all(a <= b for a, b in itertools.pairwise(rates[:10]))
    assert all(a >= b for a, b in itertools.pairwise(rates[10:]))


@pytest.mark.skipif(not (SHIPPED / "model.safetensors").exists(), reason="default model not built")
def test_shipped_model_is_the_measured_one():
    import mistral_common

    config = json.loads((SHIPPED / "config.json").read_text())
    assert config["model_type"] == "mixtral" and "head_dim" not in config
    assert config["sliding_window"] is None and config["rope_theta"] == 1e6
    assert config["num_local_experts"] == 8 and config["num_experts_per_tok"] == 2
    assert config["num_key_value_heads"] < config["num_attention_heads"]
    assert config["hidden_size"] % 256 == 0 and config["intermediate_size"] % 256 == 0
    reference_tokenizer = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    assert (SHIPPED / "tokenizer.model").read_bytes() == reference_tokenizer.read_bytes()

    model = transformers.MixtralForCausalLM.from_pretrained(SHIPPED, dtype=torch.float32).eval()
    params = sum(p.numel() for p in model.parameters())
    assert params * 1.0625 < 30e6  # q8_0: 34 bytes per 32 weights

    results = json.loads(RESULTS.read_text())
    assert results["model"]["parameters"] == params
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(SHIPPED / "tokenizer.model"))
    sample = results["samples"][0]
    ids = torch.tensor([[sp.bos_id(), *sp.encode(sample["prompt"])]])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=sample["sampling"]["max_new_tokens"], do_sample=False,
                             pad_token_id=sp.eos_id())
    assert sp.decode(out[0, ids.shape[1]:].tolist()) == sample["greedy"]


def test_balance_loss_sees_an_imbalance_that_pooling_over_layers_hides():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    # layer 0 always routes to experts 0 and 1, layer 1 always to experts 2 and 3: pooled, all 4 look even
    first = torch.tensor([[9.0, 8.0, 0.0, 0.0]]).repeat(32, 1)
    second = torch.tensor([[0.0, 0.0, 9.0, 8.0]]).repeat(32, 1)
    balanced = torch.randn(64, 4, generator=torch.Generator().manual_seed(0)) * 0.01
    pooled = load_balancing_loss_func((first, second), 4, 2)
    per_layer = trainer.per_layer_balance_loss((first, second), 4, 2)
    assert per_layer.item() > pooled.item() + 1.0
    assert trainer.per_layer_balance_loss((balanced, balanced), 4, 2).item() == pytest.approx(2.0, rel=0.05)

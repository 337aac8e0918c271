"""Train, evaluate and export mixlocal's embedded default model: a tiny Mixtral, trained here from scratch.

Why tools/: this script is neither part of the installed package (setuptools ships engine, quant and
tokenizer only, and torch is a dev dependency) nor a benchmark against a peer (bench/). It is a build
step whose product is package data, so it sits with its corpus fetcher in a folder of developer tools.

What it does, with one fixed seed:
1. fetches English text from Debian packages (tools/default_model_corpus.py) and tokenizes it with the
   real Mixtral tokenizer (mistral-common's tokenizer.model.v1, encoded with sentencepiece);
2. trains transformers' MixtralForCausalLM (8 experts, 2 per token, grouped-query attention, RoPE theta
   1e6) with AdamW, linear warmup then cosine decay, and the router's load-balancing auxiliary loss;
3. measures held-out perplexity against add-k unigram and bigram models over the same tokens, and how
   the router spreads held-out tokens over the experts;
4. exports engine/data/default/ (config.json in the published Mixtral shape, bf16 model.safetensors
   with the published tensor names, tokenizer.model), reloads it with from_pretrained and measures the
   shipped bf16 weights, samples continuations, and writes bench/results/default_model.{json,png}.

Reproduce:  .venv/bin/python tools/train_default_model.py
A quick check of the whole path: .venv/bin/python tools/train_default_model.py --steps 20 --out /tmp/dm
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

# The machine is shared: idle OpenMP threads that spin while a core is taken by someone else waste it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import sentencepiece as spm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from default_model_corpus import load_corpus

REPO = Path(__file__).resolve().parent.parent
SEED = 20240611

# The architecture. Width and expert FFN are multiples of 256 so that every K-quant block format applies.
ARCH = dict(  # noqa: C408 - keyword form, as transformers configs are written
    vocab_size=32000,
    hidden_size=256,
    intermediate_size=256,  # per expert
    num_hidden_layers=4,
    num_attention_heads=4,  # head_dim 64
    num_key_value_heads=2,  # grouped-query attention, 2 query heads per KV head
    num_local_experts=8,
    num_experts_per_tok=2,
    rope_theta=1e6,
    rms_norm_eps=1e-5,
    max_position_embeddings=32768,
    hidden_act="silu",
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)
ROUTER_AUX_LOSS_COEF = 0.02  # Mixtral's published value


def per_layer_balance_loss(router_logits, num_experts: int, top_k: int) -> torch.Tensor:
    """transformers' Switch-style load-balancing loss, taken per layer and averaged.

    transformers pools the routing of all layers before it multiplies token shares by router
    probabilities, so an expert dead in one layer and overused in another looks balanced: a first run
    trained that way ended with an expert that no held-out token chose, and one that every token chose.
    Balanced routing gives top_k (2.0 here), the value it is pushed towards."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    losses = [load_balancing_loss_func((layer,), num_experts, top_k) for layer in router_logits]
    return torch.stack(losses).mean()


def tokenizer_path() -> Path:
    import mistral_common

    path = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: mistral-common (dev extra) ships the Mixtral tokenizer there")
    return path


# ----------------------------------------------------------------------------------------------------
# data

def token_streams(sp: spm.SentencePieceProcessor, seed: int):
    """Train and held-out token streams: each document is BOS text EOS, documents in a seeded order."""
    documents, packages = load_corpus()
    ids = sp.encode([d.text for d in documents])
    stats = {name: {**meta, "documents": 0, "characters": 0, "train_tokens": 0, "held_out_tokens": 0}
             for name, meta in packages.items()}
    train, held = [], []
    for doc, doc_ids in zip(documents, ids):
        seq = [sp.bos_id(), *doc_ids, sp.eos_id()]
        entry = stats[doc.source]
        entry["documents"] += 1
        entry["characters"] += len(doc.text)
        entry["held_out_tokens" if doc.held_out else "train_tokens"] += len(seq)
        (held if doc.held_out else train).append(seq)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(train))
    train_stream = np.fromiter((t for i in order for t in train[i]), dtype=np.int64)
    held_stream = np.fromiter((t for seq in held for t in seq), dtype=np.int64)
    return train_stream, held_stream, stats


def windows(stream: np.ndarray, length: int) -> np.ndarray:
    """Non-overlapping windows of `length` tokens (the tail that does not fill one is dropped)."""
    n = len(stream) // length
    return stream[: n * length].reshape(n, length)


# ----------------------------------------------------------------------------------------------------
# n-gram baselines, scored on exactly the tokens the model is scored on

def ngram_perplexities(train: np.ndarray, held_windows: np.ndarray, vocab: int) -> dict:
    prev = held_windows[:, :-1].reshape(-1)
    target = held_windows[:, 1:].reshape(-1)
    unigram_counts = np.bincount(train, minlength=vocab).astype(np.float64)
    pair_keys = train[:-1] * vocab + train[1:]
    keys, counts = np.unique(pair_keys, return_counts=True)
    query = prev * vocab + target
    pos = np.clip(np.searchsorted(keys, query), 0, len(keys) - 1)
    pair_counts = np.where(keys[pos] == query, counts[pos], 0).astype(np.float64)
    context_counts = np.bincount(train[:-1], minlength=vocab).astype(np.float64)[prev]

    # The smoothing constant is picked on the held-out tokens themselves: that flatters the baselines,
    # which is the conservative side for a comparison the model has to win.
    result = {}
    for name, score in (
        ("unigram", lambda k: (unigram_counts[target] + k) / (len(train) + k * vocab)),
        ("bigram", lambda k: (pair_counts + k) / (context_counts + k * vocab)),
    ):
        table = {k: float(np.exp(-np.mean(np.log(score(k)))))
                 for k in (10.0, 3.0, 1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001, 0.0003)}
        best = min(table, key=table.get)
        result[name] = {"perplexity": table[best], "add_k": best, "perplexity_by_k": table}
    return result


# ----------------------------------------------------------------------------------------------------
# model

def build_model(seed: int):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    # router_aux_loss_coef 0 here: the trainer adds its per-layer balancing loss itself (see above).
    config = MixtralConfig(**ARCH, output_router_logits=True, router_aux_loss_coef=0.0,
                           sliding_window=None, attention_dropout=0.0)
    config._attn_implementation = "sdpa"
    return MixtralForCausalLM(config)


@torch.no_grad()
def evaluate(model, held_windows: np.ndarray, batch: int, num_experts: int,
             bf16: bool = False) -> tuple[float, np.ndarray]:
    """Held-out perplexity over held_windows[:, 1:], and per-layer counts of top-k expert choices.
    bf16=True (autocast) is for the cheap checkpoints along the curve; the reported figures are float32."""
    model.eval()
    total_nll, total_tokens = 0.0, 0
    layers = model.config.num_hidden_layers
    routing = np.zeros((layers, num_experts), dtype=np.int64)
    for start in range(0, len(held_windows), batch):
        chunk = torch.from_numpy(held_windows[start:start + batch])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(input_ids=chunk, output_router_logits=True)
        logits = out.logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1),
                                                reduction="sum")
        total_nll += nll.item()
        total_tokens += chunk[:, 1:].numel()
        for layer, router_logits in enumerate(out.router_logits):
            chosen = torch.topk(router_logits.float(), model.config.num_experts_per_tok, dim=-1).indices
            routing[layer] += np.bincount(chosen.reshape(-1).numpy(), minlength=num_experts)
    model.train()
    return math.exp(total_nll / total_tokens), routing


def learning_rate(step: int, total: int, peak: float, warmup: int, floor: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------------------
# export in the published Mixtral checkpoint layout

def published_config(config) -> dict:
    return {
        "architectures": ["MixtralForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "hidden_act": "silu",
        "hidden_size": config.hidden_size,
        "initializer_range": config.initializer_range,
        "intermediate_size": config.intermediate_size,
        "max_position_embeddings": config.max_position_embeddings,
        "model_type": "mixtral",
        "num_attention_heads": config.num_attention_heads,
        "num_experts_per_tok": config.num_experts_per_tok,
        "num_hidden_layers": config.num_hidden_layers,
        "num_key_value_heads": config.num_key_value_heads,
        "num_local_experts": config.num_local_experts,
        "output_router_logits": False,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": ARCH["rope_theta"],
        "router_aux_loss_coef": ROUTER_AUX_LOSS_COEF,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": config.vocab_size,
    }


def published_tensors(model) -> dict[str, torch.Tensor]:
    """transformers 5 keeps experts fused as (E, 2F, D) gate_up and (E, D, F) down; the published
    checkpoints name each expert's w1 (gate), w3 (up) and w2 (down) under block_sparse_moe."""
    tensors = {}
    for name, value in model.state_dict().items():
        value = value.detach().to(torch.bfloat16).contiguous()
        if ".mlp.experts.gate_up_proj" in name:
            prefix = name.replace(".mlp.experts.gate_up_proj", ".block_sparse_moe.experts")
            gate, up = value.chunk(2, dim=1)
            for e in range(value.shape[0]):
                tensors[f"{prefix}.{e}.w1.weight"] = gate[e].clone()
                tensors[f"{prefix}.{e}.w3.weight"] = up[e].clone()
        elif ".mlp.experts.down_proj" in name:
            prefix = name.replace(".mlp.experts.down_proj", ".block_sparse_moe.experts")
            for e in range(value.shape[0]):
                tensors[f"{prefix}.{e}.w2.weight"] = value[e].clone()
        elif ".mlp.gate.weight" in name:
            tensors[name.replace(".mlp.gate.", ".block_sparse_moe.gate.")] = value
        else:
            tensors[name] = value
    return tensors


def export(model, out_dir: Path) -> dict:
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(published_config(model.config), indent=2) + "\n")
    tensors = published_tensors(model)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    os.chmod(out_dir / "model.safetensors", 0o644)
    shutil.copyfile(tokenizer_path(), out_dir / "tokenizer.model")
    return {"tensors": len(tensors), "bytes": {p.name: p.stat().st_size for p in sorted(out_dir.iterdir())}}


# ----------------------------------------------------------------------------------------------------
# samples

PROMPTS = ["The meaning of life is", "Python is a programming language that", "Once upon a time,"]


@torch.no_grad()
def samples(model, sp, seed: int, new_tokens: int = 40) -> list[dict]:
    model.eval()
    out = []
    for prompt in PROMPTS:
        ids = torch.tensor([[sp.bos_id(), *sp.encode(prompt)]])
        greedy = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=sp.eos_id())
        torch.manual_seed(seed)
        sampled = model.generate(ids, max_new_tokens=new_tokens, do_sample=True, temperature=0.7, top_p=0.95,
                                 top_k=0, pad_token_id=sp.eos_id())
        out.append({
            "prompt": prompt,
            "greedy": sp.decode(greedy[0, ids.shape[1]:].tolist()),
            "sampled": sp.decode(sampled[0, ids.shape[1]:].tolist()),
            "sampling": {"temperature": 0.7, "top_p": 0.95, "seed": seed, "max_new_tokens": new_tokens},
        })
    return out


# ----------------------------------------------------------------------------------------------------

def plot(curves: dict, baselines: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    steps, loss = zip(*curves["train_loss"])
    left.plot(steps, loss, lw=0.6, alpha=0.5, label="train cross-entropy")
    k = 20
    if len(loss) > k:
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        left.plot(steps[k - 1:], smooth, label=f"mean of {k} steps")
    held_steps, held_ppl = zip(*curves["held_out_perplexity"])
    left.plot(held_steps, np.log(held_ppl), "o-", label="held-out cross-entropy")
    left.set_xlabel("step")
    left.set_ylabel("nats per token")
    left.legend()
    left.grid(alpha=0.3)
    right.plot(held_steps, held_ppl, "o-", label="model")
    for name, style in (("unigram", "--"), ("bigram", ":")):
        right.axhline(baselines[name]["perplexity"], ls=style, color="gray",
                      label=f"{name} add-k={baselines[name]['add_k']}: {baselines[name]['perplexity']:.0f}")
    right.set_yscale("log")
    right.set_xlabel("step")
    right.set_ylabel("held-out perplexity")
    right.legend()
    right.grid(alpha=0.3, which="both")
    fig.suptitle("mixlocal default model: tiny Mixtral trained from scratch")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=620)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--eval-every", type=int, default=60)
    parser.add_argument("--eval-windows", type=int, default=32, help="held-out windows used during training")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None,
                        help="write model and results here instead of engine/data/default and bench/results")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    np.random.seed(SEED)
    model_dir = args.out / "default" if args.out else REPO / "engine" / "data" / "default"
    results_dir = args.out if args.out else REPO / "bench" / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path()))
    train_stream, held_stream, corpus = token_streams(sp, SEED)
    train_windows = windows(train_stream, args.seq)
    held_windows = windows(held_stream, args.seq)
    print(f"corpus: {len(train_stream)} train tokens, {len(held_stream)} held-out tokens", flush=True)
    baselines = ngram_perplexities(train_stream, held_windows, ARCH["vocab_size"])
    print(f"unigram ppl {baselines['unigram']['perplexity']:.1f}, bigram ppl {baselines['bigram']['perplexity']:.1f}",
          flush=True)

    model = build_model(SEED)
    params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    generator = np.random.default_rng(SEED)
    order = np.concatenate([generator.permutation(len(train_windows))
                            for _ in range(math.ceil(args.steps * args.batch / len(train_windows)))])
    eval_subset = held_windows[np.linspace(0, len(held_windows) - 1, min(args.eval_windows, len(held_windows)))
                               .astype(int)]
    curves = {"train_loss": [], "aux_loss": [], "held_out_perplexity": []}
    model.train()
    train_started = time.time()
    for step in range(args.steps):
        lr = learning_rate(step, args.steps, args.lr, args.warmup, args.lr * 0.1)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = torch.from_numpy(train_windows[order[step * args.batch:(step + 1) * args.batch]])
        # Mixed precision: float32 master weights and optimizer, bf16 matmuls (AVX512-BF16 doubles their rate).
        # loss = cross-entropy (computed in float32 by transformers) + coef * per-layer load-balancing loss.
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=batch, labels=batch)
        balance = per_layer_balance_loss(out.router_logits, ARCH["num_local_experts"], ARCH["num_experts_per_tok"])
        (out.loss + ROUTER_AUX_LOSS_COEF * balance).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lm_loss = out.loss.item()
        curves["train_loss"].append((step, lm_loss))
        curves["aux_loss"].append((step, balance.item()))
        if step % 10 == 0:
            rate = (step + 1) * args.batch * args.seq / (time.time() - train_started)
            print(f"step {step:4d} lr {lr:.2e} loss {lm_loss:.3f} balance {balance.item():.3f} {rate:.0f} tok/s",
                  flush=True)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            ppl, _ = evaluate(model, eval_subset, args.batch, ARCH["num_local_experts"], bf16=True)
            curves["held_out_perplexity"].append((step + 1, ppl))
            print(f"step {step + 1}: held-out perplexity (subset) {ppl:.1f}", flush=True)
    train_seconds = time.time() - train_started

    float_ppl, _ = evaluate(model, held_windows, args.batch, ARCH["num_local_experts"])
    export_info = export(model, model_dir)

    # Everything below measures the shipped bf16 files, loaded back the way any HF user would load them.
    from transformers import MixtralForCausalLM

    shipped = MixtralForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    shipped_ppl, routing = evaluate(shipped, held_windows, args.batch, ARCH["num_local_experts"])
    share = routing / routing.sum(axis=1, keepdims=True)
    continuations = samples(shipped, sp, SEED)
    for s in continuations:
        print(f"{s['prompt']!r}\n  greedy:  {s['greedy']!r}\n  sampled: {s['sampled']!r}", flush=True)

    curves["held_out_perplexity"][-1] = (args.steps, float_ppl)  # the last point over the whole held-out set
    plot(curves, baselines, results_dir / "default_model_training.png")
    embed = ARCH["vocab_size"] * ARCH["hidden_size"]
    # Imported only now: importing engine imports numba and the kernels, which the training itself does not need
    sys.path.insert(0, str(REPO))
    from mixlocal.engine import machine

    result = {
        "model": {
            "architecture": "MixtralForCausalLM",
            **{k: ARCH[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                    "num_attention_heads", "num_key_value_heads", "num_local_experts",
                                    "num_experts_per_tok", "rope_theta", "rms_norm_eps")},
            "head_dim": ARCH["hidden_size"] // ARCH["num_attention_heads"],
            "parameters": params,
            "parameters_embedding_and_output_head": 2 * embed,
            "parameters_active_per_token": params - embed - ARCH["num_hidden_layers"] * (
                ARCH["num_local_experts"] - ARCH["num_experts_per_tok"]) * 3 * ARCH["hidden_size"] * ARCH[
                "intermediate_size"],
            "trained_context": args.seq,
            "files": export_info,
        },
        "corpus": {
            "packages": corpus,
            "train_tokens": len(train_stream),
            "held_out_tokens": len(held_stream),
            "held_out_tokens_scored": int(held_windows[:, 1:].size),
            "tokenizer": "mistral-common tokenizer.model.v1 (Mixtral), sentencepiece; each document BOS text EOS",
        },
        "training": {
            "seed": SEED, "steps": args.steps, "batch": args.batch, "sequence_length": args.seq,
            "tokens_seen": args.steps * args.batch * args.seq,
            "epochs": args.steps * args.batch * args.seq / len(train_stream),
            "optimizer": "AdamW betas (0.9, 0.95), weight decay 0.1 on matrices, grad clip 1.0",
            "precision": "float32 weights and optimizer state, bf16 autocast for the forward and backward matmuls",
            "held_out_curve": f"bf16 autocast over {len(eval_subset)} held-out windows along the way; "
                              "the last point is float32 over the whole held-out set",
            "schedule": f"linear warmup {args.warmup} steps to {args.lr}, cosine to {args.lr * 0.1}",
            "router_aux_loss_coef": ROUTER_AUX_LOSS_COEF,
            "router_aux_loss": "transformers' load_balancing_loss_func per layer, averaged over layers",
            "threads": args.threads,
            "train_wall_seconds": round(train_seconds, 1),
            "total_wall_seconds": round(time.time() - started, 1),
            "final_train_loss_mean_last_20": float(np.mean([l for _, l in curves["train_loss"][-20:]])),
            "curves": curves,
        },
        "held_out_perplexity": {
            "model_bf16_shipped": shipped_ppl,
            "model_float32_before_export": float_ppl,
            "unigram": baselines["unigram"],
            "bigram": baselines["bigram"],
            "unigram_over_model": baselines["unigram"]["perplexity"] / shipped_ppl,
            "bigram_over_model": baselines["bigram"]["perplexity"] / shipped_ppl,
        },
        "routing_held_out": {
            "what": "share of top-2 expert choices per layer over the held-out tokens (each row sums to 1)",
            "share_per_layer": share.round(4).tolist(),
            "counts_per_layer": routing.tolist(),
            "min_share": float(share.min()),
            "max_share": float(share.max()),
        },
        "samples": continuations,
        "machine": {"cpu": machine.cpu_model(), "logical_cpus": os.cpu_count(), "torch": torch.__version__,
                    "python": platform.python_version()},
        "command": "python tools/train_default_model.py " + " ".join(sys.argv[1:]),
    }
    (results_dir / "default_model.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("held_out_perplexity", "routing_held_out")}, indent=1))
    print(f"parameters {params}, train {train_seconds:.0f} s, total {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()

"""Expert-cache eviction policies compared on routing traces: hit rate by policy and slots per block.

    .venv/bin/python bench/bench_expert_cache.py [--tokens 2000] [--out FILE]

Traces: the trained default model's routing of held-out text (tools/default_model_corpus.py: documents the model
never saw, fetched from Debian's packages), token after token as decode meets them; and a routing with no locality
at all (each token picks A experts uniformly at random), the worst case. Each policy of engine/backends/numba/experts.py
(the same classes the engine runs) is replayed over each block's sequence of expert sets, for every slot count
from A to E-1, as ExpertStore.ensure does: the token's experts are needed together, a missing one evicts the
policy's victim among the slots the token does not need. Also reported: the routing itself (distinct experts per
block over 100 tokens, the entropy of expert use) and the share of guesses the next block's router gets right from
the current hidden state (the prefetch's guess), which needs the model's hidden states and comes from the same run.
Writes bench/results/expert_cache_<date>.json.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from mixlocal.engine.backends.numba.experts import POLICIES
from mixlocal.engine.machine import describe

from mixlocal import engine


def replay(sets: np.ndarray, n_experts: int, n_slots: int, policy: str) -> float:
    """Hit rate of one block's expert sets (T, A) through n_slots slots under `policy`."""
    pol = POLICIES[policy](n_slots, n_experts)
    slot_of = np.full(n_experts, -1, np.int64)
    expert_in = np.full(n_slots, -1, np.int64)
    hits = total = 0
    for need in sets:
        need = np.unique(need)
        busy = {int(slot_of[e]) for e in need if slot_of[e] >= 0}
        for e in need:
            total += 1
            if slot_of[e] >= 0:
                hits += 1
                continue
            slot = pol.victim([s for s in range(n_slots) if s not in busy], expert_in)
            if expert_in[slot] >= 0:
                slot_of[expert_in[slot]] = -1
            slot_of[e], expert_in[slot] = slot, e
            busy.add(slot)
        for e in need:
            pol.touch(int(slot_of[e]), int(e))
    return hits / total


def routing_stats(sets: np.ndarray, n_experts: int) -> dict:
    window = sets[:100]
    distinct = len(np.unique(window))
    counts = np.bincount(sets.reshape(-1), minlength=n_experts).astype(np.float64)
    p = counts / counts.sum()
    entropy = float(-(p[p > 0] * np.log2(p[p > 0])).sum())
    return {"distinct_experts_in_100_tokens": int(distinct), "entropy_bits": round(entropy, 3),
            "max_entropy_bits": round(float(np.log2(n_experts)), 3)}


def held_out_tokens(llm, n: int) -> list[int]:
    from default_model_corpus import load_corpus
    docs, _ = load_corpus()
    ids: list[int] = []
    for d in docs:
        if d.held_out:
            ids += llm.tokenizer.encode(d.text)
            if len(ids) >= n:
                break
    return ids[:n]


def trace_run(llm, ids: list[int]) -> tuple[list[np.ndarray], list[float]]:
    """Each block's expert sets (T, A) over ids, and per block l > 0 the share of its experts that block l-1's
    hidden state, put through block l's router, guessed."""
    be = llm.backend
    be.trace = []
    guesses = [[] for _ in range(llm.config.n_layers)]
    orig_moe = be.moe

    def moe(h, router, m, block):  # also record the hidden state each block routes from
        guesses[block].append(h.copy())
        return orig_moe(h, router, m, block)

    be.moe = moe
    llm.reset()
    for i in range(0, len(ids), 256):
        llm.eval(ids[i:i + 256])
    be.moe = orig_moe
    traces = [t.expert_ids for t in be.trace]
    n_layers, a = llm.config.n_layers, llm.config.n_experts_used
    per_block = [np.concatenate(traces[b::n_layers]) for b in range(n_layers)]
    right = []
    for b in range(1, n_layers):
        h_prev = np.concatenate(guesses[b - 1])
        logits = h_prev @ be.w.layers[b].router.T
        guess = np.argsort(-logits, axis=1)[:, :a]
        hit = [len(set(g) & set(t)) / a for g, t in zip(guess, per_block[b])]
        right.append(round(float(np.mean(hit)), 3))
    return per_block, right


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    llm = engine.load(n_ctx=args.tokens + 256, kv_type="f32")
    c = llm.config
    ids = held_out_tokens(llm, args.tokens)
    trained, guess_right = trace_run(llm, ids)
    rng = np.random.default_rng(args.seed)
    uniform = [np.stack([rng.choice(c.n_experts, c.n_experts_used, replace=False) for _ in ids])
               for _ in range(c.n_layers)]
    result = {"date": dt.date.today().isoformat(), "command": " ".join(sys.argv), "machine": describe(),
              "model": llm.name, "tokens": len(ids), "n_experts": c.n_experts, "n_used": c.n_experts_used,
              "prefetch_guess_right_by_block": guess_right, "traces": {}}
    for name, sets in (("trained_held_out", trained), ("no_locality", uniform)):
        block_stats = [routing_stats(s, c.n_experts) for s in sets]
        rates = {}
        for policy in POLICIES:
            rates[policy] = {str(n): round(float(np.mean([replay(s, c.n_experts, n, policy) for s in sets])), 4)
                             for n in range(c.n_experts_used, c.n_experts)}
        result["traces"][name] = {"routing_by_block": block_stats, "hit_rate": rates}
        print(name, json.dumps(block_stats[0]))
        for policy, r in rates.items():
            print(f"  {policy:5s} " + "  ".join(f"{n} slots {v:.3f}" for n, v in r.items()))
    print("prefetch guess right (blocks 1..):", guess_right)
    out = args.out or ROOT / "bench" / "results" / f"expert_cache_{result['date']}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    main()

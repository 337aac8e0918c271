"""The CPU backend: numba kernels turn (weights, tokens, cache) into logits.

Letters: T tokens in this call, D model width, H query heads, Hkv KV heads, Dh head width, E experts,
A active experts per token, F expert hidden width, V vocabulary.
"""
from __future__ import annotations

import os
import sys

import numba
import numpy as np
from mixlocal.quant import QType, formats, kernels
from mixlocal.quant.kernels import resolve_family

from ...config import ModelConfig
from ...machine import available_memory, physical_cores
from ...weights import ModelWeights, in_ggml_blocks
from .. import RouterTrace
from . import ops
from .cache import KVCache, kv_row_size
from .experts import POLICIES, ExpertStore, MemoryBudgetError, parse_size
from .packed_cache import MIN_CACHED_BYTES, cached_weights, prepare_weights

__all__ = ["BUDGET_MARGIN", "NumbaCPUBackend", "plan_budget", "weight_budget_for"]

# the matrices the kernels multiply by (GGUF name part -> layer attribute); the embedding is only gathered from
_PREPARED = {"attn_q": "wq", "attn_k": "wk", "attn_v": "wv", "attn_output": "wo", "ffn_gate_exps": "w1",
             "ffn_up_exps": "w3", "ffn_down_exps": "w2", "output": "output"}
_EXPERT_NAMES = {"ffn_gate_exps": "w1", "ffn_up_exps": "w3", "ffn_down_exps": "w2"}


def _runtime_bytes(w, family: str) -> int:
    """Memory a weight takes in the kernels' runtime form (packed, or the file's bytes)."""
    if not isinstance(w, (kernels.PackedWeight,)) and getattr(w, "qtype", None) in kernels.packed_types(family):
        shape = tuple(w.shape)
        n_exp, n, k = (1,) + shape if len(shape) == 2 else shape
        return sum(int(np.prod(s)) * d.itemsize
                   for s, d in kernels.packed_shapes(w.qtype, n_exp, n, k, kernels.layout_of(family)))
    if isinstance(w, np.ndarray):
        return w.nbytes
    return sum(m.data.nbytes for m in w.mats) if hasattr(w, "mats") else w.data.nbytes


def plan_budget(weights: ModelWeights, named: dict, family: str, weight_budget: int | None) -> dict:
    """How the weights fit in weight_budget bytes: {"dense", "experts", "slot", "n_slots", "slots_per_block",
    "resident_experts", "io"} (bytes; "slot" is the largest block's slot; expert slots per block). n_slots = n_experts
    means every expert resident, as without a budget; else n_slots is the fewest any block has, and the bytes left
    over give some blocks one more (blocks whose experts are larger, as in a Q4_K_M mix, cost more per slot). A budget
    that cannot hold the dense weights plus the experts one token uses per block raises MemoryBudgetError."""
    c = weights.config
    dense = sum(_runtime_bytes(w, family) for k, w in named.items() if k.split(".")[-2] not in _EXPERT_NAMES)
    dense += sum(lw.router.nbytes + lw.attn_norm.nbytes + lw.ffn_norm.nbytes for lw in weights.layers)
    layers = [{attr: getattr(lw, attr) for attr in _EXPERT_NAMES.values()} for lw in weights.layers]
    slots = [ExpertStore.slot_bytes(layer, family) for layer in layers]
    experts = sum(slots) * c.n_experts
    plan = {"budget": weight_budget, "dense": dense, "experts": experts, "slot": max(slots),
            "n_slots": c.n_experts, "slots_per_block": [c.n_experts] * c.n_layers, "resident_experts": experts,
            "io": 0}
    if weight_budget is None or dense + experts <= weight_budget:
        return plan
    io = ExpertStore.io_bytes(max(ExpertStore.largest_read(layer, family) for layer in layers))
    left = weight_budget - dense - io - sum(slots) * c.n_experts_used
    if left < 0:
        need = dense + io + sum(slots) * c.n_experts_used
        raise MemoryBudgetError(
            f"a weight budget of {weight_budget / 2**30:.2f} GiB cannot hold the dense weights "
            f"({dense / 2**30:.2f} GiB) plus {c.n_experts_used} experts per block ({c.n_layers} blocks x "
            f"{c.n_experts_used} x {max(slots) / 2**20:.0f} MiB): it needs at least {need / 2**30:.2f} GiB")
    per_block = [c.n_experts_used] * c.n_layers
    grew = True
    while grew:  # one more slot for every block in turn, while the budget lasts: the blocks stay within one of each other
        grew = False
        for b, size in enumerate(slots):
            if per_block[b] < c.n_experts and size <= left:
                per_block[b] += 1
                left -= size
                grew = True
    plan.update(n_slots=min(per_block), slots_per_block=per_block, io=io,
                resident_experts=sum(n * size for n, size in zip(per_block, slots)))
    return plan


def _single_origin(weights: ModelWeights) -> str:
    files = {weights.origin.get(f"blk.{i}.{name}.weight") for i in range(len(weights.layers))
             for name in _EXPERT_NAMES}
    if len(files) != 1 or None in files or not os.path.isfile(next(iter(files))):
        raise MemoryBudgetError("a memory budget needs every expert in one model file (GGUF); these come from "
                                f"{sorted(map(str, files))}")
    return files.pop()


def route(h: np.ndarray, router: np.ndarray, n_used: int) -> RouterTrace:
    """Softmax over all experts, take the top A, renormalise them (transformers' Mixtral); in float64, by the
    same compiled code as the one-token decode step, so both pick the same experts with the same weights."""
    logits, ids, w = ops.route_rows(h, router, n_used)
    return RouterTrace(logits.astype(np.float32), ids, w)


def limit_openmp_spinning() -> None:
    """Let numba's OpenMP threads spin only briefly (GOMP_SPINCOUNT=10000, ~10-50 us) before they sleep between
    parallel regions, unless the user set OMP_WAIT_POLICY or GOMP_SPINCOUNT.

    libgomp's default spins ~100x longer: a team thread keeps its core busy after each region, and every BLAS call
    (whose own threads then share those cores) and every other process waits for it. Sleeping at once costs a wake-up
    per region instead; a short spin keeps most of the decode speed of spinning and most of the prefill speed of
    sleeping (bench/bench_omp_wait.py measures the three). libgomp reads the variable when it loads, at numba's first parallel launch, so this must run before that; once
    loaded it is too late and this does nothing."""
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return
    from numba.np.ufunc import parallel
    if not getattr(parallel, "_is_initialized", False):
        os.environ["GOMP_SPINCOUNT"] = "10000"


def _act(rows: int, width: int) -> tuple:
    """Activations rounded for the integer kernels, in both forms (quant.kernels.activation_type): per 32 (xq int8
    (rows, width), xd float32 scale, xs int32 sum per 32) and per 256 (kq int8, kd float32 scale, kp int32 pair sums
    per 64, kp16 per 32; quant/kernels/activations.py)."""
    return (np.zeros((rows, width), np.int8), np.zeros((rows, width // 32), np.float32),
            np.zeros((rows, width // 32), np.int32),
            np.zeros((rows, width), np.int8), np.zeros((rows, width // 256), np.float32),
            np.zeros((rows, width // 64), np.int32), np.zeros((rows, width // 32), np.int32))


class DecodeState:
    """Buffers of the one-token decode step, allocated once per backend (llama2.c's RunState)."""

    def __init__(self, c: ModelConfig, tok_embd):
        d, a, f = c.dim, c.n_experts_used, c.ffn_dim
        self.embd_rows = tok_embd.rows_view()                        # (V, row bytes) the embedding table, as stored
        self.embd_row = np.zeros((1, self.embd_rows.shape[1]), self.embd_rows.dtype)  # the token's row, gathered
        self.x = np.zeros((1, d), np.float32)                        # (1, D) residual stream
        self.h = np.zeros((1, d), np.float32)                        # (1, D) rmsnorm(x)
        self.q = np.zeros((1, c.n_heads, c.head_dim), np.float32)    # (1, H, Dh)
        self.k = np.zeros((1, c.n_kv_heads, c.head_dim), np.float32)  # (1, Hkv, Dh)
        self.v = np.zeros((1, c.n_kv_heads, c.head_dim), np.float32)  # (1, Hkv, Dh)
        self.att = np.zeros((1, c.n_heads, c.head_dim), np.float32)  # (1, H, Dh) attention output
        self.g = np.zeros((a, f), np.float32)                        # (A, F) gate, then silu(gate) * up
        self.u = np.zeros((a, f), np.float32)                        # (A, F) up
        self.y = np.zeros((a, d), np.float32)                        # (A, D) wo's output in row 0, then experts'
        self.act_h = _act(1, d)                                      # h rounded, for wq, wk, wv
        self.act_att = _act(1, c.q_dim)                              # att rounded, for wo
        self.act_e = _act(a, d)                                      # h rounded, A copies, for w1, w3
        self.act_f = _act(a, f)                                      # g rounded, for w2
        self.act_head = _act(1, d)                                   # rmsnorm(x) rounded, for the output head
        self.one_start = np.array([0, 1], np.int64)                  # (2,) runs of a one-row product ...
        self.one_expert = np.zeros(1, np.int64)                      # (1,) ... whose weight is "expert" 0
        self.run_start = np.zeros(a + 1, np.int64)                   # (A+1,) expert rows: one run per expert
        self.run_expert = np.zeros(a, np.int64)                      # (A,) ascending
        self.logits = np.zeros(c.n_experts, np.float64)              # (E,) router logits
        self.probs = np.zeros(c.n_experts, np.float64)               # (E,) router softmax
        self.ids = np.zeros(a, np.int64)                             # (A,) chosen experts, most probable first
        self.wts = np.zeros(a, np.float32)                           # (A,) their renormalised weights
        self.guess = np.zeros(c.n_experts, np.float32)               # (E,) next block's router (memory budget)
        self.attention = ops.DecodeAttention(c.n_heads, c.n_kv_heads, c.head_dim)  # and its workspaces


def _bind(w, act: tuple, rows: int, run_start: np.ndarray, run_expert: np.ndarray, out: np.ndarray | None,
          x: np.ndarray | None = None) -> tuple | None:
    """(function, arguments, needs, serial) of a weight's product on the first `rows` rows of act into out (None:
    appended at the call); needs: the ops.ROUND_* forms of act it reads. For a packed weight: the run kernel
    quant.kernels._packed_runs picks for fewer than 4 rows, its inputs checked here once. Other weights:
    kernels.linear on x, the float input, if given (one-row products, where the file-layout kernel takes the float
    row); else None."""
    if not isinstance(w, kernels.PackedWeight):
        if x is None or len(w.shape) != 2:
            return None
        return _linear_into, (w, x) if out is None else (w, x, out), 0, False  # linear picks its threads
    kern, quads = kernels._RUNS[w.family][w.qtype.name][0], w.layout == "quads"
    xq, xd, xs, kq, kd, kp, kp16 = (a[:rows] for a in act)
    n, k = w.shape[-2], w.shape[-1]
    if xq.shape != (rows, k) or (out is not None and out.shape != (rows, n)):
        raise kernels.KernelInputError(f"decode buffers {xq.shape} -> {None if out is None else out.shape} do not "
                                       f"fit weight {w.shape}")  # a kernel would read or write past them
    if kernels.activation_type(w) == QType.Q8_K:  # as _packed_runs passes them
        arrays = (*(a.reshape(-1) for a in w.arrays[:-1]), w.arrays[-1])  # IQ2_XXS has no scale array
        args = (*arrays, kq.reshape(-1), kd, kp16 if w.qtype in kernels.PER16_TYPES else kp, run_start,
                run_expert, n)
        needs = ops.ROUND_Q8_K
    else:
        arrays = (w.arrays[0].reshape(-1), *w.arrays[1:]) if quads else tuple(w.arrays)
        args = (*arrays, xq.reshape(-1) if quads else xq, xd, xs, run_start, run_expert, n)
        needs = ops.ROUND_Q8_0
    if out is not None:
        args += (out,)
    return kern, args, needs, rows * n * k < kernels.SERIAL_MAX_MACS


def _linear_into(w, x: np.ndarray, out: np.ndarray) -> None:
    kernels.linear(w, x, out=out)


def _product(bound: tuple, threads: list, n_threads: int, *out) -> None:
    """Run a product _bind made, on one thread if it is small (quant.kernels.serial_below's rule), switching
    numba's count only when it differs from threads[0], the count set now."""
    kern, args, _, serial = bound
    want = 1 if serial else n_threads
    if want != threads[0]:
        numba.set_num_threads(want)
        threads[0] = want
    kern(*args, *out)


# Left out of a memory budget for what is not weights or KV cache: activations, the tokenizer, Python and numba, and
# slack for the page cache: with less, a budget filled to its end under a cgroup limit leaves the kernel evicting the
# mapped dense weights and code pages, which then fault back in from disk.
BUDGET_MARGIN = 1 << 30


def weight_budget_for(mem_budget, kv_bytes: int) -> tuple[int | None, str]:
    """Bytes the weights may use under mem_budget (None: the memory available now), after the KV cache for the
    whole context and BUDGET_MARGIN; and how the budget reads in a message. None: no limit known.

    With no budget asked for, the margin is at most half of what is available: on a machine with less than
    2 GiB free a small model still loads whole (a fixed 1 GiB would refuse even the embedded 50 MB model),
    and a large one gets the clear error of plan_budget naming what it needs."""
    margin = BUDGET_MARGIN
    if mem_budget is None:
        avail = available_memory()
        if avail is None:
            return None, "unknown"
        budget, said = avail, f"{avail / 2**30:.1f} GiB (available now)"
        margin = min(BUDGET_MARGIN, avail // 2)
    else:
        budget = parse_size(mem_budget)
        said = f"{budget / 2**30:.1f} GiB"
    weights = budget - kv_bytes - margin
    if weights <= 0:
        raise MemoryBudgetError(f"a memory budget of {budget / 2**30:.2f} GiB leaves nothing for the weights after "
                                f"the KV cache ({kv_bytes / 2**30:.2f} GiB for n_ctx tokens) and a "
                                f"{margin >> 20} MiB margin; lower n_ctx or raise the budget")
    return weights, said


class NumbaCPUBackend:
    name = "numba"

    @classmethod
    def check_options(cls, *, n_ctx: int, n_threads: int | None = None, kv_type: str = "f16",
                      packed_cache: bool | None = None, kernels: str | None = None, mem_budget=None,
                      expert_policy: str | None = None) -> dict:
        """The load options checked and resolved before the model is read: the kernel family (a family the CPU
        lacks is a KernelFamilyError), the thread count (None: the physical cores), the cache format, the budget
        and the eviction policy (None: "lfru")."""
        kv_row_size(kv_type, 64)  # a bad name is a ValueError listing the formats
        if mem_budget is not None:
            parse_size(mem_budget)
        policy = "lfru" if expert_policy is None else expert_policy
        if policy not in POLICIES:
            raise ValueError(f"expert_policy must be one of {', '.join(POLICIES)}, got {expert_policy!r}")
        return {"n_ctx": n_ctx, "n_threads": n_threads or physical_cores(), "kv_type": kv_type,
                "packed_cache": packed_cache, "kernels": resolve_family(kernels), "mem_budget": mem_budget,
                "expert_policy": policy}

    @classmethod
    def build(cls, weights: ModelWeights, *, n_ctx: int, n_threads: int | None = None, kv_type: str = "f16",
              packed_cache: bool | None = None, kernels: str | None = None, mem_budget=None,
              expert_policy: str | None = None) -> tuple[NumbaCPUBackend, KVCache]:
        """The backend and an empty KV cache for n_ctx positions. MLX affine weights become ggml blocks first
        (engine/weights.py: in_ggml_blocks). Under a memory budget (mem_budget, None: the memory available now) the
        KV cache for n_ctx positions and BUDGET_MARGIN come off it, and experts that do not fit are read from the
        file when needed (experts.py)."""
        o = cls.check_options(n_ctx=n_ctx, n_threads=n_threads, kv_type=kv_type, packed_cache=packed_cache,
                              kernels=kernels, mem_budget=mem_budget, expert_policy=expert_policy)
        weights = in_ggml_blocks(weights)
        c = weights.config
        cache = KVCache(c, n_ctx, kv_type)  # pages are committed as positions fill, so this costs nothing yet
        weight_budget, said = weight_budget_for(mem_budget, cache.bytes_per_token * n_ctx)
        be = cls(weights, o["n_threads"], packed_cache=packed_cache, family=o["kernels"],
                 weight_budget=weight_budget, expert_policy=o["expert_policy"])
        if be.store is not None:
            b = be.budget
            print(f"mixlocal: memory budget {said}: dense weights {b['dense'] / 2**30:.2f} GiB resident, "
                  f"{be.store.describe_slots()} of {c.n_experts} experts per block in memory "
                  f"({b['resident_experts'] / 2**30:.2f} GiB), the rest read from "
                  f"{be.store.reader.path} when needed", file=sys.stderr, flush=True)
        return be, cache

    def __init__(self, weights: ModelWeights, n_threads: int, packed_cache: bool | None = None,
                 family: str | None = None, weight_budget: int | None = None, expert_policy: str = "lfru"):
        """packed_cache: keep repacked weights in a mapped cache file (see packed_cache.py); None decides
        by size. family: the kernel family (quant/kernels/families.py); None: $MIXLOCAL_KERNELS, else the fastest
        this CPU runs. weight_budget: bytes the weights may take in memory (None: no limit); when all experts do
        not fit, each block keeps as many as fit in slots, read from the model file on demand (experts.py), with
        expert_policy ("lfru", "lfu", "lru") choosing which leaves."""
        self.kernels = kernels.resolve_family(family)  # before any work: a family the CPU lacks is a clear error
        self.config: ModelConfig = weights.config
        self.n_threads = n_threads
        self.w = weights
        c = self.config
        limit_openmp_spinning()
        ops.set_threads(n_threads)  # the repack kernels run on numba's threads too
        named = {name: t for name, t in weights.tensors().items() if name.split(".")[-2] in _PREPARED}
        self.store: ExpertStore | None = None
        self.budget = plan_budget(weights, named, self.kernels, weight_budget)
        if min(self.budget["slots_per_block"]) < c.n_experts:
            dense = {k: v for k, v in named.items() if k.split(".")[-2] not in _EXPERT_NAMES}
            path = _single_origin(weights)
            layers = [{attr: getattr(lw, attr) for attr in _EXPERT_NAMES.values()} for lw in weights.layers]
            found = None
            if packed_cache is not False and (packed_cache or self.budget["experts"] >= MIN_CACHED_BYTES):
                # a cache file of every weight, experts included, is used when there is one, but written only when
                # asked for (packed_cache=True): a model that does not fit in memory would take its size again on
                # disk, and missing experts are repacked from the model file on the I/O threads instead
                found = cached_weights(named, weights.origin, self.kernels, build=bool(packed_cache))
            if found is not None:  # read experts already packed: nothing to repack on a miss
                cached, path = found
                prepared = {k: cached[k] if k in cached else kernels.prepare(w, family=self.kernels)
                            for k, w in dense.items()}
                layers = [{attr: cached.get(f"blk.{i}.{name}.weight", layers[i][attr])
                           for name, attr in _EXPERT_NAMES.items()} for i in range(c.n_layers)]
            else:
                prepared = prepare_weights(dense, weights.origin, use_cache=packed_cache, family=self.kernels)
            self.store = ExpertStore(layers, str(path), c.n_experts, self.budget["slots_per_block"], self.kernels,
                                     policy=expert_policy)
            for i, pool in enumerate(self.store.pools):
                prepared.update({f"blk.{i}.{name}.weight": pool[attr] for name, attr in _EXPERT_NAMES.items()})
        else:
            prepared = prepare_weights(named, weights.origin, use_cache=packed_cache, family=self.kernels)
        self.mats = [{attr: prepared[f"blk.{i}.{name}.weight"] for name, attr in _PREPARED.items()
                      if name != "output"} for i in range(c.n_layers)]
        self.output = prepared["output.weight"]
        self.inv_freq = 1.0 / (c.rope_theta ** (np.arange(0, c.head_dim, 2, dtype=np.float64) / c.head_dim))
        self.pairs = ops.rope_pairs(c.head_dim, c.rope_pairing)
        self.scale = np.float32(1.0 / np.sqrt(c.head_dim))
        self.trace: list[RouterTrace] | None = None  # set to [] to record router intermediates
        self.observer = None  # engine/imatrix.py's collector: sees the input of every product (_observe)
        self._decode_plan = self._bind_decode()
        self.fused_decode = self._decode_plan is not None  # one-token steps through _decode

    def _bind_decode(self) -> tuple[DecodeState, list[dict], tuple] | None:
        """The one-token decode step's buffers and every product bound to them; None where it does not apply:
        expert matrices without a packed decode kernel, or 4+ active experts (where expert_linear picks the
        prefill kernels)."""
        c = self.config
        if c.n_experts_used >= 4:
            return None
        st = DecodeState(c, self.w.tok_embd)
        one, runs = (st.one_start, st.one_expert), (st.run_start, st.run_expert)
        blocks = []
        for m in self.mats:
            b = {"wq": _bind(m["wq"], st.act_h, 1, *one, st.q.reshape(1, -1), st.h),
                 "wk": _bind(m["wk"], st.act_h, 1, *one, st.k.reshape(1, -1), st.h),
                 "wv": _bind(m["wv"], st.act_h, 1, *one, st.v.reshape(1, -1), st.h),
                 "wo": _bind(m["wo"], st.act_att, 1, *one, st.y[:1], st.att.reshape(1, -1)),
                 "w1": _bind(m["w1"], st.act_e, c.n_experts_used, *runs, st.g),
                 "w3": _bind(m["w3"], st.act_e, c.n_experts_used, *runs, st.u),
                 "w2": _bind(m["w2"], st.act_f, c.n_experts_used, *runs, st.y)}
            if any(v is None for v in b.values()):
                return None
            blocks.append(b)
        return st, blocks, _bind(self.output, st.act_head, 1, *one, None, st.x)

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        t = self.w.tok_embd
        return np.ascontiguousarray(formats.dequantize(t.qtype, t.rows_view()[tokens]), dtype=np.float32)

    def forward(self, tokens: np.ndarray, cache: KVCache, last_only: bool) -> np.ndarray:
        """Run T tokens at positions cache.n_past.. and advance the cache. Returns (T, V) or (1, V) logits."""
        c = self.config
        ops.set_threads(self.n_threads)
        n_tok = tokens.shape[0]
        pos0 = cache.n_past
        cache.check_room(n_tok)
        if n_tok == 1 and self.fused_decode and self.trace is None and self.observer is None:
            return self._decode(tokens, cache)
        positions = np.arange(pos0, pos0 + n_tok, dtype=np.float64)
        x = self.embed(tokens)                                                    # (T, D)
        for li, lw in enumerate(self.w.layers):
            m = self.mats[li]
            last = last_only and li == c.n_layers - 1
            h = ops.rmsnorm(x, lw.attn_norm, c.norm_eps, np.empty_like(x))
            self._observe(li, ("attn_k", "attn_v"), h)
            k = kernels.linear(m["wk"], h).reshape(n_tok, c.n_kv_heads, c.head_dim)
            v = kernels.linear(m["wv"], h).reshape(n_tok, c.n_kv_heads, c.head_dim)
            ops.rope(k, positions, self.inv_freq, self.pairs)
            cache.store(li, pos0, k, v)
            if last:  # only the final token's row is wanted from here on
                h, x, q_pos0 = h[-1:], x[-1:], pos0 + n_tok - 1
            else:
                q_pos0 = pos0
            nq = h.shape[0]
            self._observe(li, ("attn_q",), h)
            q = kernels.linear(m["wq"], h).reshape(nq, c.n_heads, c.head_dim)
            ops.rope(q, positions[-nq:], self.inv_freq, self.pairs)
            att = ops.attention(q, cache.k[li], cache.v[li], q_pos0, self.scale, np.empty_like(q))
            self._observe(li, ("attn_output",), att.reshape(nq, c.q_dim))
            x = x + kernels.linear(m["wo"], att.reshape(nq, c.q_dim))
            h = ops.rmsnorm(x, lw.ffn_norm, c.norm_eps, np.empty_like(x))
            x = x + self.moe(h, lw.router, m, li)
        cache.n_past = pos0 + n_tok
        x = ops.rmsnorm(x, self.w.norm, c.norm_eps, np.empty_like(x))
        return kernels.linear(self.output, x)

    def _decode(self, tokens: np.ndarray, cache: KVCache) -> np.ndarray:
        """forward() for one token: the ops.decode_* steps between the weight products, on the DecodeState
        buffers."""
        c, pos = self.config, cache.n_past
        st, blocks, head = self._decode_plan
        n_threads = numba.get_num_threads()
        threads = [n_threads]  # the count set now: switched only when a product's size calls for another
        x = st.x
        if not 0 <= tokens[0] < st.embd_rows.shape[0]:  # np.take below clips instead of raising
            raise IndexError(f"token id {tokens[0]} outside the vocabulary of {st.embd_rows.shape[0]}")
        np.take(st.embd_rows, tokens, axis=0, out=st.embd_row, mode="clip")  # embed(), without its copies
        x[:] = formats.dequantize(self.w.tok_embd.qtype, st.embd_row)
        for li, (b, lw) in enumerate(zip(blocks, self.w.layers)):
            ops.decode_pre_attention(x, st.y, st.ids, st.wts, st.run_expert, li > 0, lw.attn_norm, c.norm_eps,
                                     st.h, st.act_h, b["wq"][2] | b["wk"][2] | b["wv"][2])
            _product(b["wk"], threads, n_threads)
            _product(b["wv"], threads, n_threads)
            _product(b["wq"], threads, n_threads)
            ops.decode_rope_store(st.q, st.k, st.v, pos, self.inv_freq, self.pairs, cache.k[li], cache.v[li])
            st.attention(st.q, cache.k[li], cache.v[li], pos, self.scale, st.att, n_threads, threads)
            ops.decode_round(st.att, st.act_att, b["wo"][2])
            _product(b["wo"], threads, n_threads)
            ops.decode_route(x, st.y, lw.ffn_norm, c.norm_eps, st.h, lw.router, st.logits, st.probs, st.ids, st.wts,
                             st.run_start, st.run_expert, st.act_e, b["w1"][2] | b["w3"][2])
            if self.store is not None:
                self._fetch_experts(li, st)
            _product(b["w1"], threads, n_threads)
            _product(b["w3"], threads, n_threads)
            ops.decode_silu(st.g, st.u, st.act_f, b["w2"][2])
            _product(b["w2"], threads, n_threads)
        cache.advance(1)
        ops.decode_pre_head(x, st.y, st.ids, st.wts, st.run_expert, self.w.norm, c.norm_eps, st.act_head, head[2])
        logits = np.empty((1, c.vocab_size), np.float32)  # the caller keeps each step's logits: a fresh array
        _product(head, threads, n_threads, logits)
        if threads[0] != n_threads:
            numba.set_num_threads(n_threads)
        return logits

    def _fetch_experts(self, li: int, st: DecodeState) -> None:
        """Budgeted decode: make this block's experts resident (their reads queued first), guess block li+1's
        experts from this hidden state and start reading them, and switch the step's expert ids to their slots."""
        store, c = self.store, self.config
        then = None
        if li + 1 < c.n_layers:
            guess = np.matmul(self.w.layers[li + 1].router, st.h[0], out=st.guess)
            then = (li + 1, np.argsort(-guess)[:c.n_experts_used])
        slots = store.ensure(li, st.ids, then_prefetch=then)
        st.ids[:] = slots
        st.run_expert[:] = np.sort(slots)

    def moe(self, h: np.ndarray, router: np.ndarray, m: dict, block: int) -> np.ndarray:
        """Route each token to A experts; each expert's weights are read once for all of its tokens."""
        r = route(h, router, self.config.n_experts_used)
        if self.trace is not None:
            self.trace.append(r)
        self._observe(block, ("ffn_gate_inp",), h)
        self._observe(block, ("ffn_gate_exps", "ffn_up_exps"), h, r.expert_ids)
        n_tok, n_act = r.expert_ids.shape
        experts = r.expert_ids.reshape(-1)                                        # (T*A,) token-major
        xa = np.repeat(h, n_act, axis=0)                                          # (T*A, D)
        if self.store is None:
            y = self._experts(m, xa, experts, self._down_observer(block, experts))  # (T*A, D)
        else:  # the chunk's experts a slot-full at a time, each read once for all of its tokens
            y = np.empty_like(xa)
            distinct = np.unique(experts)
            n_slots = self.store.slots_per_block[block]
            for g0 in range(0, len(distinct), n_slots):
                rows = np.flatnonzero(np.isin(experts, distinct[g0:g0 + n_slots]))
                slots = self.store.ensure(block, experts[rows])
                y[rows] = self._experts(m, np.ascontiguousarray(xa[rows]), slots,
                                        self._down_observer(block, experts[rows]))
        return np.einsum("tad,ta->td", y.reshape(n_tok, n_act, -1), r.weights)

    @staticmethod
    def _experts(m: dict, xa: np.ndarray, ids: np.ndarray, seen=None) -> np.ndarray:
        g = kernels.expert_linear(m["w1"], xa, ids)                              # (R, F)
        u = kernels.expert_linear(m["w3"], xa, ids)
        a = ops.silu_mul(g, u)
        if seen is not None:
            seen(a)
        return kernels.expert_linear(m["w2"], a, ids)                            # (R, D)

    # The importance-matrix hook: with `observer` set, every weight product's input is handed to it with the weight's
    # GGUF name; expert products also get the expert ids of each input row (real ids, not memory-budget slots).
    def _observe(self, block: int, names: tuple, x: np.ndarray, experts: np.ndarray | None = None) -> None:
        if self.observer is not None:
            self.observer([f"blk.{block}.{n}.weight" for n in names], x, experts)

    def _down_observer(self, block: int, experts: np.ndarray):
        if self.observer is None:
            return None
        return lambda a: self._observe(block, ("ffn_down_exps",), a, experts.reshape(-1, 1))

    def close(self) -> None:
        """Stop the expert reads (if a memory budget made any)."""
        if self.store is not None:
            self.store.close()

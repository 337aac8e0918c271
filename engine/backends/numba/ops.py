"""numba kernels for the parts of the forward pass that are not weight products: RMSNorm, RoPE, attention.

Shapes use T tokens, H query heads, Hkv KV heads, G = H / Hkv query heads per KV head, Dh head width.

Over 500 lines and one file for now: the T-token ops, routing and the one-token decode steps share the compiled row
helpers and fastmath flags that make a decode step's logits equal forward()'s bit for bit; attention (cache-row
decoding, blocked products, plan, workspaces, DecodeAttention) is the seam to split along next, once the tests and
benches that patch `ops.attention` and `ops._workspace` patch that module instead.
"""
from __future__ import annotations

import math

import numba
import numpy as np
from llvmlite import ir
from mixlocal.quant import QType, block_size, type_size
from mixlocal.quant.f16 import f16_bits_to_f32, f32_to_f16_bits
from mixlocal.quant.kernels import SERIAL_MAX_MACS, serial_below
from mixlocal.quant.kernels.activations import quantize_q8_k_row
from mixlocal.quant.kernels.portable import _quantize_row
from mixlocal.quant.quantize import _row_q8_0
from numba import njit, prange, types
from numba.extending import intrinsic, overload

__all__ = [
    "Q8_0_BLOCK",
    "Q8_0_BLOCK_BYTES",
    "attention",
    "attention_plan",
    "f16_bits_to_f32",
    "rmsnorm",
    "rope",
    "rope_pairs",
    "set_threads",
    "silu_mul",
]

KEY_BLOCK = 128       # keys decoded and scored together; with QUERY_BLOCK it bounds scratch at any context length
QUERY_BLOCK = 16      # queries of one job: they share each decoded key block, so K/V are read once per 16 queries
TILE = 4              # the score and value products work on 4 rows x 4 keys held in registers
JOBS_PER_THREAD = 4   # below this many (KV head, query block) jobs per thread the key range is split (decode)
# ggml Q8_0 (the q8_0 KV cache): 32 values share one float16 scale, stored first, then 32 int8 (34 bytes)
Q8_0_BLOCK, Q8_0_BLOCK_BYTES = block_size(QType.Q8_0), type_size(QType.Q8_0)

# fastmath without nnan/ninf: masked scores are -inf and must stay -inf. reassoc lets LLVM vectorise the sums.
_FAST = {"reassoc", "contract", "arcp", "nsz"}


# ----------------------------------------------------------------------------------------------------------------------
# RMSNorm, RoPE, SiLU
# ----------------------------------------------------------------------------------------------------------------------

def rmsnorm(x, w, eps, out):
    """out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w."""
    with serial_below(x.size):
        return _rmsnorm(x, w, eps, out)


@njit(inline="always")
def _rmsnorm_row(x, w, eps, out, t):
    d = x.shape[1]
    ss = 0.0
    for i in range(d):
        ss += x[t, i] * x[t, i]
    r = 1.0 / math.sqrt(ss / d + eps)
    for i in range(d):
        out[t, i] = np.float32(x[t, i] * r) * w[i]


@njit(parallel=True, cache=True, fastmath=False)
def _rmsnorm(x, w, eps, out):
    """out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w, accumulated in float64 like a careful reference."""
    for t in prange(x.shape[0]):
        _rmsnorm_row(x, w, eps, out, t)
    return out


def rope_pairs(head_dim: int, pairing: str) -> np.ndarray:
    """(head_dim/2, 2) element indices rotated together; row i uses frequency i."""
    half = head_dim // 2
    i = np.arange(half)
    if pairing == "half":
        return np.stack([i, i + half], axis=1).astype(np.int64)
    return np.stack([2 * i, 2 * i + 1], axis=1).astype(np.int64)


def rope(x, positions, inv_freq, pairs):
    """Rotate x (T, H, Dh) in place by each token's position."""
    with serial_below(x.size):
        _rope(x, positions, inv_freq, pairs)


@njit(inline="always")
def _rope_token(x, t, p, inv_freq, pairs):
    for i in range(pairs.shape[0]):
        ang = p * inv_freq[i]
        c = np.float32(math.cos(ang))
        s = np.float32(math.sin(ang))
        a = pairs[i, 0]
        b = pairs[i, 1]
        for j in range(x.shape[1]):
            x0 = x[t, j, a]
            x1 = x[t, j, b]
            x[t, j, a] = x0 * c - x1 * s
            x[t, j, b] = x1 * c + x0 * s


@njit(parallel=True, cache=True)
def _rope(x, positions, inv_freq, pairs):
    for t in prange(x.shape[0]):
        _rope_token(x, t, positions[t], inv_freq, pairs)


def silu_mul(g, u):
    """g <- silu(g) * u, in place."""
    with serial_below(g.size):
        return _silu_mul(g, u)


@njit(inline="always")
def _silu_mul_row(g, u, t):
    for i in range(g.shape[1]):
        v = g[t, i]
        g[t, i] = v / (np.float32(1.0) + np.exp(-v)) * u[t, i]


@njit(parallel=True, cache=True)
def _silu_mul(g, u):
    for t in prange(g.shape[0]):
        _silu_mul_row(g, u, t)
    return g


# ----------------------------------------------------------------------------------------------------------------------
# Bit-level helpers (float16 ones are quant/f16.py's).
# ----------------------------------------------------------------------------------------------------------------------

@intrinsic
def _f32_from_bits(typingctx, bits):
    if bits != types.int32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.int32), codegen


_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)       # ln 2 split so that n * _LN2_HI is exact for |n| < 2^8
_LN2_LO = np.float32(-2.12194440e-4)
_EXP_FLOOR = np.float32(-87.0)          # below this e^x is under float32's normal range: return 0


@njit(inline="always", fastmath=_FAST)
def _exp_nonpos(x):
    """e^x for x <= 0 (softmax arguments), relative error about 1e-7; exactly 0 for x < -87 and for -inf.

    libm's expf is a call per element and stops the loop from vectorising; this is range reduction to
    r in [-ln2/2, ln2/2], a degree-7 Taylor polynomial (remainder < 5e-9), and 2^n built from its bits."""
    xc = max(x, _EXP_FLOOR)
    # n = round(x / ln2): truncation toward zero of a value <= 0 rounds up, so subtracting 1/2 rounds to nearest.
    # (math.floor would be a libm call, which stops vectorisation.)
    n = np.float32(np.int32(xc * _LOG2E - np.float32(0.5)))
    r = xc - n * _LN2_HI - n * _LN2_LO
    p = np.float32(1.0 / 5040.0)
    p = p * r + np.float32(1.0 / 720.0)
    p = p * r + np.float32(1.0 / 120.0)
    p = p * r + np.float32(1.0 / 24.0)
    p = p * r + np.float32(1.0 / 6.0)
    p = p * r + np.float32(0.5)
    p = p * r + np.float32(1.0)
    p = p * r + np.float32(1.0)
    y = p * _f32_from_bits(np.int32((np.int64(n) + 127) << 23))  # 2^n: n + bias in the exponent field
    return y if x >= _EXP_FLOOR else np.float32(0.0)


# ----------------------------------------------------------------------------------------------------------------------
# Cache rows -> float32 scratch, one overload per KV format (chosen by the cache array's dtype):
#   float32 (n_ctx, Dh)      f32
#   uint16  (n_ctx, Dh)      f16 bit patterns
#   uint8   (n_ctx, Dh/32*34) q8_0: ggml Q8_0 blocks along the head dimension
# ----------------------------------------------------------------------------------------------------------------------

@njit(inline="always", fastmath=_FAST)
def _decode_f32(src, k0, n, dst):
    for r in range(n):
        for d in range(dst.shape[1]):
            dst[r, d] = src[k0 + r, d]


@njit(inline="always", fastmath=_FAST)
def _decode_f16(src, k0, n, dst):
    for r in range(n):
        for d in range(dst.shape[1]):
            dst[r, d] = f16_bits_to_f32(src[k0 + r, d])


@njit(inline="always", fastmath=_FAST)
def _decode_q8_0(src, k0, n, dst):
    n_blocks = src.shape[1] // Q8_0_BLOCK_BYTES
    per_block = dst.shape[1] // n_blocks  # 32, but read at run time: a literal trip count gets the inner loop
    #                                       fully unrolled into scalar code instead of vectorised (LLVM, measured)
    for r in range(n):
        row = k0 + r
        for b in range(n_blocks):
            o = b * Q8_0_BLOCK_BYTES
            scale = f16_bits_to_f32(np.uint16(src[row, o] | (np.uint32(src[row, o + 1]) << 8)))  # little-endian
            for i in range(per_block):
                dst[r, b * per_block + i] = scale * np.float32(np.int8(src[row, o + 2 + i]))


def _decode_rows(src, k0, n, n_pad, dst):  # pragma: no cover - replaced by the overload below inside numba
    raise NotImplementedError


@overload(_decode_rows, inline="always")
def _decode_rows_impl(src, k0, n, n_pad, dst):
    """dst[:n] = float32 rows k0..k0+n-1 of one head's cache; dst[n:n_pad] = 0 (padding keys get weight 0, and
    0 * a stale NaN would still be NaN)."""
    decode = {types.float32: _decode_f32, types.uint16: _decode_f16, types.uint8: _decode_q8_0}.get(src.dtype)
    if decode is None:
        return None

    def impl(src, k0, n, n_pad, dst):
        decode(src, k0, n, dst)
        for r in range(n, n_pad):
            for d in range(dst.shape[1]):
                dst[r, d] = np.float32(0.0)
    return impl


# ----------------------------------------------------------------------------------------------------------------------
# Register-blocked products on one key block. Each 4 x 4 tile keeps its 16 sums in registers while the head
# dimension streams through, so one load of a key (or value) row feeds four rows: written the plain way (one row,
# one key) the loops are bound by loads and stores at about half this speed (measured, Zen 4).
# ----------------------------------------------------------------------------------------------------------------------

@njit(fastmath=_FAST, cache=True)
def _block_scores(qs, kb, s, n_rows, n_keys):
    """s[r, j] = qs[r] . kb[j] for r < n_rows, j < n_keys (both multiples of TILE)."""
    dh = qs.shape[1]
    for r in range(0, n_rows, TILE):
        for j in range(0, n_keys, TILE):
            a0 = a1 = a2 = a3 = np.float32(0.0)
            b0 = b1 = b2 = b3 = np.float32(0.0)
            c0 = c1 = c2 = c3 = np.float32(0.0)
            e0 = e1 = e2 = e3 = np.float32(0.0)
            for d in range(dh):
                qa = qs[r, d]
                qb = qs[r + 1, d]
                qc = qs[r + 2, d]
                qe = qs[r + 3, d]
                k0 = kb[j, d]
                k1 = kb[j + 1, d]
                k2 = kb[j + 2, d]
                k3 = kb[j + 3, d]
                a0 += qa * k0
                a1 += qa * k1
                a2 += qa * k2
                a3 += qa * k3
                b0 += qb * k0
                b1 += qb * k1
                b2 += qb * k2
                b3 += qb * k3
                c0 += qc * k0
                c1 += qc * k1
                c2 += qc * k2
                c3 += qc * k3
                e0 += qe * k0
                e1 += qe * k1
                e2 += qe * k2
                e3 += qe * k3
            s[r, j], s[r, j + 1], s[r, j + 2], s[r, j + 3] = a0, a1, a2, a3
            s[r + 1, j], s[r + 1, j + 1], s[r + 1, j + 2], s[r + 1, j + 3] = b0, b1, b2, b3
            s[r + 2, j], s[r + 2, j + 1], s[r + 2, j + 2], s[r + 2, j + 3] = c0, c1, c2, c3
            s[r + 3, j], s[r + 3, j + 1], s[r + 3, j + 2], s[r + 3, j + 3] = e0, e1, e2, e3


@njit(fastmath=_FAST, cache=True)
def _block_values(p, vb, acc, n_rows, n_keys):
    """acc[r] += sum_j p[r, j] * vb[j] for r < n_rows, j < n_keys (both multiples of TILE)."""
    dh = vb.shape[1]
    for r in range(0, n_rows, TILE):
        for j in range(0, n_keys, TILE):
            pa0, pa1, pa2, pa3 = p[r, j], p[r, j + 1], p[r, j + 2], p[r, j + 3]
            pb0, pb1, pb2, pb3 = p[r + 1, j], p[r + 1, j + 1], p[r + 1, j + 2], p[r + 1, j + 3]
            pc0, pc1, pc2, pc3 = p[r + 2, j], p[r + 2, j + 1], p[r + 2, j + 2], p[r + 2, j + 3]
            pe0, pe1, pe2, pe3 = p[r + 3, j], p[r + 3, j + 1], p[r + 3, j + 2], p[r + 3, j + 3]
            for d in range(dh):
                v0 = vb[j, d]
                v1 = vb[j + 1, d]
                v2 = vb[j + 2, d]
                v3 = vb[j + 3, d]
                acc[r, d] += pa0 * v0 + pa1 * v1 + pa2 * v2 + pa3 * v3
                acc[r + 1, d] += pb0 * v0 + pb1 * v1 + pb2 * v2 + pb3 * v3
                acc[r + 2, d] += pc0 * v0 + pc1 * v1 + pc2 * v2 + pc3 * v3
                acc[r + 3, d] += pe0 * v0 + pe1 * v1 + pe2 * v2 + pe3 * v3


@njit(fastmath=_FAST, cache=True)
def _softmax_update(s, m, l, acc, n_rows, n_visible_of_row, g_per, n_keys_pad):
    """Online softmax step for one key block: turn row r's scores into weights against its new running max,
    and rescale what the row has accumulated so far. Row r sees its first n_visible_of_row(r) keys (causal)."""
    dh = acc.shape[1]
    for r in range(n_rows):
        lim = n_visible_of_row[r // g_per]
        if lim <= 0:  # the whole block is in this row's future
            for j in range(n_keys_pad):
                s[r, j] = np.float32(0.0)
            continue
        mx = m[r]
        for j in range(lim):
            v = s[r, j]
            mx = max(mx, v)
        tot = np.float32(0.0)
        for j in range(lim):
            e = _exp_nonpos(s[r, j] - mx)
            s[r, j] = e
            tot += e
        for j in range(lim, n_keys_pad):
            s[r, j] = np.float32(0.0)
        corr = _exp_nonpos(m[r] - mx)  # 0 on the row's first block, where m is -inf
        l[r] = l[r] * corr + tot
        m[r] = mx
        for d in range(dh):
            acc[r, d] *= corr


# ----------------------------------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------------------------------

def _round_up(n, k):
    return (n + k - 1) // k * k


@njit(parallel=True, fastmath=_FAST, cache=True)
def _attention_kernel(q, k_cache, v_cache, pos0, scale, n_splits, out,
                      ws_q, ws_k, ws_v, ws_s, ws_acc, ws_ml, ws_vis, part_ml, part_acc):
    """Causal attention of T queries at positions pos0.. over the cache, with an online softmax over key blocks.

    Jobs are (KV head, block of QUERY_BLOCK queries, key split); worker w takes jobs w, w + W, ... and owns row w
    of every ws_* scratch array, so scratch is fixed by the worker count and block sizes, not by T or n_ctx.
    With one key split a job writes `out` itself; with several (decode over a long cache with few KV heads) each
    job leaves its running max, sum and unnormalised output in part_* and a second pass merges them.
    """
    n_tok, n_heads, dh = q.shape
    n_kv = k_cache.shape[0]
    g_per = n_heads // n_kv
    n_qblk = (n_tok + QUERY_BLOCK - 1) // QUERY_BLOCK
    n_jobs = n_kv * n_qblk * n_splits
    n_workers = ws_q.shape[0]
    key_block = ws_k.shape[1]
    for w in prange(n_workers):
        qs, kb, vb, s, acc = ws_q[w], ws_k[w], ws_v[w], ws_s[w], ws_acc[w]
        m, l, vis = ws_ml[w, 0], ws_ml[w, 1], ws_vis[w]
        for job in range(w, n_jobs, n_workers):
            split = job % n_splits
            qb = (job // n_splits) % n_qblk
            kvh = job // (n_splits * n_qblk)
            t0 = qb * QUERY_BLOCK
            t1 = min(n_tok, t0 + QUERY_BLOCK)
            n_rows = (t1 - t0) * g_per
            n_rows_pad = (n_rows + TILE - 1) // TILE * TILE
            n_keys = pos0 + t1
            per_split = ((n_keys + n_splits - 1) // n_splits + key_block - 1) // key_block * key_block
            a = split * per_split
            b = min(n_keys, a + per_split)
            for r in range(n_rows_pad):  # scaled queries, zero rows as padding
                if r < n_rows:
                    t = t0 + r // g_per
                    h = kvh * g_per + r % g_per
                    for d in range(dh):
                        qs[r, d] = q[t, h, d] * scale
                else:
                    for d in range(dh):
                        qs[r, d] = np.float32(0.0)
                m[r] = -np.inf
                l[r] = np.float32(0.0)
                for d in range(dh):
                    acc[r, d] = np.float32(0.0)
            kh = k_cache[kvh]
            vh = v_cache[kvh]
            for k0 in range(a, b, key_block):
                nk = min(b, k0 + key_block) - k0
                nk_pad = (nk + TILE - 1) // TILE * TILE
                _decode_rows(kh, k0, nk, nk_pad, kb)
                _decode_rows(vh, k0, nk, nk_pad, vb)
                for t in range(t0, t1):
                    vis[t - t0] = min(nk, pos0 + t + 1 - k0)
                _block_scores(qs, kb, s, n_rows_pad, nk_pad)
                _softmax_update(s, m, l, acc, n_rows, vis, g_per, nk_pad)
                _block_values(s, vb, acc, n_rows_pad, nk_pad)
            if n_splits == 1:
                for r in range(n_rows):
                    t = t0 + r // g_per
                    h = kvh * g_per + r % g_per
                    inv = np.float32(1.0) / l[r]
                    for d in range(dh):
                        out[t, h, d] = acc[r, d] * inv
            else:
                for r in range(n_rows):
                    part_ml[job, 0, r] = m[r]
                    part_ml[job, 1, r] = l[r]
                    for d in range(dh):
                        part_acc[job, r, d] = acc[r, d]
    if n_splits > 1:
        rows = part_acc.shape[1]
        for item in prange(n_kv * n_qblk * rows):
            r = item % rows
            blk = item // rows  # kvh * n_qblk + qb
            t = (blk % n_qblk) * QUERY_BLOCK + r // g_per
            if r >= QUERY_BLOCK * g_per or t >= n_tok:
                continue
            h = (blk // n_qblk) * g_per + r % g_per
            j0 = blk * n_splits
            mx = part_ml[j0, 0, r]
            for sp in range(1, n_splits):
                v = part_ml[j0 + sp, 0, r]
                mx = max(mx, v)
            tot = np.float32(0.0)
            for d in range(dh):
                out[t, h, d] = np.float32(0.0)
            for sp in range(n_splits):
                if part_ml[j0 + sp, 1, r] == 0:  # no visible key in this split
                    continue
                wgt = _exp_nonpos(part_ml[j0 + sp, 0, r] - mx)
                tot += wgt * part_ml[j0 + sp, 1, r]
                for d in range(dh):
                    out[t, h, d] += wgt * part_acc[j0 + sp, r, d]
            inv = np.float32(1.0) / tot
            for d in range(dh):
                out[t, h, d] *= inv
    return out


@njit(cache=True)
def _split_count(n_jobs, n_keys, n_workers, key_block):
    """Key splits per (KV head, query block) job: only while there are fewer jobs than JOBS_PER_THREAD per worker,
    so n_jobs * splits < 2 * target whenever there is more than one split."""
    target = JOBS_PER_THREAD * n_workers
    return max(1, min(-(-target // n_jobs), -(-n_keys // key_block)))


def attention_plan(n_tok: int, n_heads: int, n_kv: int, head_dim: int, pos0: int, n_workers: int,
                   key_block: int | None = None) -> dict:
    """How a call is split into jobs and how much scratch it gets. The scratch depends on the worker count, the
    head shape and, through the query blocks, on min(T, a few blocks); never on pos0 or n_ctx."""
    g_per = n_heads // n_kv
    n_qblk = -(-n_tok // QUERY_BLOCK)
    rows = _round_up(QUERY_BLOCK * g_per, TILE)
    n_keys = pos0 + n_tok
    if key_block is None:
        key_block = KEY_BLOCK
    n_splits = _split_count(n_kv * n_qblk, n_keys, n_workers, key_block)
    n_parts = n_kv * n_qblk * n_splits if n_splits > 1 else 1
    shapes = {
        "ws_q": ((n_workers, rows, head_dim), np.float32),
        "ws_k": ((n_workers, key_block, head_dim), np.float32),
        "ws_v": ((n_workers, key_block, head_dim), np.float32),
        "ws_s": ((n_workers, rows, key_block), np.float32),
        "ws_acc": ((n_workers, rows, head_dim), np.float32),
        "ws_ml": ((n_workers, 2, rows), np.float32),
        "ws_vis": ((n_workers, QUERY_BLOCK), np.int64),
        "part_ml": ((n_parts, 2, rows), np.float32),
        "part_acc": ((n_parts, rows, head_dim), np.float32),
    }
    nbytes = sum(int(np.prod(shape)) * np.dtype(dt).itemsize for shape, dt in shapes.values())
    return {"n_splits": n_splits, "n_qblk": n_qblk, "shapes": shapes, "scratch_bytes": nbytes}


def _workspace(plan: dict) -> dict:
    """The scratch arrays of one call. Kept in one place so that tests can observe every byte the kernel gets."""
    return {name: np.empty(shape, dtype) for name, (shape, dtype) in plan["shapes"].items()}


def attention(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, pos0: int, scale: float,
              out: np.ndarray) -> np.ndarray:
    """Causal attention of q (T, H, Dh) at positions pos0..pos0+T-1 over one layer's cache, into out (T, H, Dh).

    k_cache, v_cache: (Hkv, n_ctx, row) in one of the KV formats (float32, uint16 f16 bits, uint8 q8_0 blocks);
    positions < pos0 + T must hold keys and values. Checked here, before the kernel reads anything."""
    if q.dtype != np.float32 or q.ndim != 3 or not q.flags.c_contiguous:
        raise ValueError(f"attention: q must be C-contiguous float32 (T, H, Dh), got {q.dtype} {q.shape}")
    n_tok, n_heads, dh = q.shape
    if out.shape != q.shape or out.dtype != np.float32:
        raise ValueError(f"attention: out must be float32 {q.shape}, got {out.dtype} {out.shape}")
    if k_cache.shape != v_cache.shape or k_cache.dtype != v_cache.dtype or k_cache.ndim != 3:
        raise ValueError(f"attention: K and V caches differ or are not 3-D: {k_cache.dtype} {k_cache.shape}, "
                         f"{v_cache.dtype} {v_cache.shape}")
    n_kv, n_ctx, row = k_cache.shape
    want_row = {np.dtype(np.float32): dh, np.dtype(np.uint16): dh,
                np.dtype(np.uint8): dh // Q8_0_BLOCK * Q8_0_BLOCK_BYTES}.get(k_cache.dtype)
    if want_row is None or row != want_row or (k_cache.dtype == np.uint8 and dh % Q8_0_BLOCK):
        raise ValueError(f"attention: cache rows of {row} {k_cache.dtype} do not hold head_dim {dh}")
    if n_kv == 0 or n_heads % n_kv:
        raise ValueError(f"attention: {n_heads} query heads are not a multiple of {n_kv} KV heads")
    if n_tok == 0 or pos0 < 0 or pos0 + n_tok > n_ctx:
        raise ValueError(f"attention: positions {pos0}..{pos0 + n_tok - 1} outside the cache of {n_ctx}")
    if not (k_cache.flags.c_contiguous and v_cache.flags.c_contiguous):
        raise ValueError("attention: caches must be C-contiguous")
    with serial_below(n_tok * (pos0 + n_tok) * n_heads * dh * 2):
        plan = attention_plan(n_tok, n_heads, n_kv, dh, pos0, numba.get_num_threads())
        ws = _workspace(plan)
        return _attention_kernel(q, k_cache, v_cache, pos0, np.float32(scale), plan["n_splits"], out,
                                 ws["ws_q"], ws["ws_k"], ws["ws_v"], ws["ws_s"], ws["ws_acc"], ws["ws_ml"],
                                 ws["ws_vis"], ws["part_ml"], ws["part_acc"])


def set_threads(n: int) -> None:
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))


# ----------------------------------------------------------------------------------------------------------------------
# Decode (one token): one compiled call between two weight products. Called op by op from Python, the tiny model's
# decode spent most of its time between the kernels (argument checks, numpy temporaries, dispatch, thread-count
# switches); here the steps between products run on buffers allocated once (the backend's DecodeState), and the
# weight kernels are called with their arguments bound once at load.
# Each op uses the same compiled arithmetic as the T-token path (the shared row helpers above, the same attention
# kernel, the same activation rounding), so a decode step gives the logits that forward() gives for one token.
# The weight kernels and the (parallel) attention kernel are called from Python, not from here: a compiled caller
# would bind them statically, numba's cache cannot keep a caller of a parallel function, and it would not see a
# change in the kernels' files (nor the kernel family chosen at load).
# ----------------------------------------------------------------------------------------------------------------------

def _store_kv_row(src, dst):  # pragma: no cover - replaced by the overload below inside numba
    raise NotImplementedError


@overload(_store_kv_row, inline="always")
def _store_kv_row_impl(src, dst):
    """dst (one cache row, the KV format's dtype) = src (head_dim float32), encoded as KVCache.encode does."""
    if dst.dtype == types.float32:
        def impl(src, dst):
            for d in range(src.shape[0]):
                dst[d] = src[d]
    elif dst.dtype == types.uint16:
        def impl(src, dst):
            for d in range(src.shape[0]):
                dst[d] = f32_to_f16_bits(src[d])
    elif dst.dtype == types.uint8:
        def impl(src, dst):
            _row_q8_0(src, dst)
    else:
        return None
    return impl


ROUTER_LANES = 8  # partial sums of the router's products: a fixed order that still vectorises


@njit(inline="always")
def _router_logits(h, t, router, out):
    """out (E,) float64 = router @ h[t], each product exact in float64 and summed in ROUTER_LANES fixed lanes, so
    that prefill and decode (both through here) get the same bits."""
    n_exp, d = router.shape
    lanes = np.empty(ROUTER_LANES, np.float64)
    for e in range(n_exp):
        for j in range(ROUTER_LANES):
            lanes[j] = 0.0
        for i0 in range(0, d - d % ROUTER_LANES, ROUTER_LANES):
            for j in range(ROUTER_LANES):
                lanes[j] += np.float64(h[t, i0 + j]) * np.float64(router[e, i0 + j])
        for i in range(d - d % ROUTER_LANES, d):
            lanes[0] += np.float64(h[t, i]) * np.float64(router[e, i])
        acc = 0.0
        for j in range(ROUTER_LANES):
            acc += lanes[j]
        out[e] = acc


@njit(inline="always")
def _route_probs(logits, probs, ids, wts):
    """Mixtral's routing from one token's router logits (E,) float64: softmax over all experts into probs, the
    len(ids) most probable into ids (ties to the lower index, as a stable argsort), their weights renormalised into
    wts (float32)."""
    n_exp = logits.shape[0]
    mx = logits[0]
    for e in range(1, n_exp):
        mx = max(mx, logits[e])
    tot = 0.0
    for e in range(n_exp):
        probs[e] = math.exp(logits[e] - mx)
        tot += probs[e]
    for e in range(n_exp):
        probs[e] /= tot
    sel = 0.0
    for a in range(ids.shape[0]):
        best = -1
        for e in range(n_exp):
            taken = False
            for b in range(a):
                if ids[b] == e:
                    taken = True
            if not taken and (best < 0 or probs[e] > probs[best]):
                best = e
        ids[a] = best
        sel += probs[best]
    for a in range(ids.shape[0]):
        wts[a] = np.float32(probs[ids[a]] / sel)


@njit(parallel=True, cache=True)
def _route_rows(h, router, logits, probs, ids, wts):
    for t in prange(h.shape[0]):
        _router_logits(h, t, router, logits[t])
        _route_probs(logits[t], probs[t], ids[t], wts[t])


def route_rows(h: np.ndarray, router: np.ndarray, n_used: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Router of each row of h (T, D) float32 over router (E, D) float32: (logits (T, E) float64, expert ids
    (T, A) int64, weights (T, A) float32), computed in float64 as the one-token decode does."""
    n_tok, n_exp = h.shape[0], router.shape[0]
    logits = np.empty((n_tok, n_exp), np.float64)
    probs = np.empty((n_tok, n_exp), np.float64)
    ids = np.empty((n_tok, n_used), np.int64)
    wts = np.empty((n_tok, n_used), np.float32)
    with serial_below(h.size * n_exp):
        _route_rows(np.ascontiguousarray(h, dtype=np.float32), router, logits, probs, ids, wts)
    return logits, ids, wts


# what a decode step rounds its activations into, a bit each (the numba backend's _bind says which a weight needs)
ROUND_Q8_0 = 1  # per 32 values: xq, xd, xs of act
ROUND_Q8_K = 2  # per 256 values (the K-quants in the integer families): kq, kd, kp, kp16 of act


@njit(inline="always")
def _quantize(x, t, act, needs):
    """Round row t of x into row 0 of act = (xq, xd, xs, kq, kd, kp, kp16) in the forms `needs` asks for (as
    linear() does), and copy it to every row of act (the A expert rows all start from the same h)."""
    xq, xd, xs, kq, kd, kp, kp16 = act
    if needs & ROUND_Q8_0:
        _quantize_row(x[t:t + 1], xq, xd, xs, 0)
    if needs & ROUND_Q8_K:
        quantize_q8_k_row(x, t, kq, kd, kp, kp16, 0)
    for r in range(1, xq.shape[0]):
        if needs & ROUND_Q8_0:
            xq[r] = xq[0]
            xd[r] = xd[0]
            xs[r] = xs[0]
        if needs & ROUND_Q8_K:
            kq[r] = kq[0]
            kd[r] = kd[0]
            kp[r] = kp[0]
            kp16[r] = kp16[0]


@njit(inline="always")
def _quantize_rows(x, act, needs):
    """Round every row of x into act, each row on its own (the expert outputs before ffn_down)."""
    xq, xd, xs, kq, kd, kp, kp16 = act
    for r in range(x.shape[0]):
        if needs & ROUND_Q8_0:
            _quantize_row(x, xq, xd, xs, r)
        if needs & ROUND_Q8_K:
            quantize_q8_k_row(x, r, kq, kd, kp, kp16, r)


@njit(inline="always")
def _add_experts(x, y, ids, wts, run_expert):
    """x[0] += sum over a of wts[a] * (the row of y from expert ids[a]), in the order of ids (as np.einsum)."""
    for i in range(x.shape[1]):
        acc = np.float32(0.0)
        for a in range(ids.shape[0]):
            r = 0
            while run_expert[r] != ids[a]:
                r += 1
            acc += y[r, i] * wts[a]
        x[0, i] = x[0, i] + acc


@njit(cache=True)
def decode_pre_attention(x, y, ids, wts, run_expert, pending, norm, eps, h, act, needs):
    """Block start: finish the previous block (x += its expert outputs, if pending), then h = rmsnorm(x), rounded
    into act for wq, wk, wv."""
    if pending:
        _add_experts(x, y, ids, wts, run_expert)
    _rmsnorm_row(x, norm, eps, h, 0)
    _quantize(h, 0, act, needs)


@njit(cache=True)
def decode_rope_store(q, k, v, pos, inv_freq, pairs, k_cache, v_cache):
    """RoPE on q and k, then k and v into row pos of the caches (Hkv, n_ctx, row), encoded in their format."""
    p = np.float64(pos)
    _rope_token(k, 0, p, inv_freq, pairs)
    _rope_token(q, 0, p, inv_freq, pairs)
    for j in range(k.shape[1]):
        _store_kv_row(k[0, j], k_cache[j, pos])
        _store_kv_row(v[0, j], v_cache[j, pos])


@njit(cache=True)
def decode_round(att, act, needs):
    """The attention output (1, H, Dh) rounded into act for wo."""
    _quantize(att.reshape(1, -1), 0, act, needs)


class DecodeAttention:
    """ops.attention for one query, on workspaces kept between calls (one set per worker count and key split
    count; the plan is attention()'s, so the same splits give the same sums)."""

    def __init__(self, n_heads: int, n_kv: int, head_dim: int):
        self.n_heads, self.n_kv, self.head_dim = n_heads, n_kv, head_dim
        self._ws: dict[tuple[int, int], tuple] = {}

    def __call__(self, q, k_cache, v_cache, pos: int, scale, out, n_threads: int, threads: list) -> None:
        """threads[0] is numba's thread count now; set to what this call needs, and left there."""
        serial = n_threads > 1 and (pos + 1) * self.n_heads * self.head_dim * 2 < SERIAL_MAX_MACS  # attention()'s
        n_workers = 1 if serial else n_threads
        n_splits = _split_count(self.n_kv, pos + 1, n_workers, KEY_BLOCK)
        ws = self._ws.get((n_workers, n_splits))
        if ws is None:
            w = _workspace(attention_plan(1, self.n_heads, self.n_kv, self.head_dim, pos, n_workers))
            ws = self._ws[(n_workers, n_splits)] = tuple(w[name] for name in (
                "ws_q", "ws_k", "ws_v", "ws_s", "ws_acc", "ws_ml", "ws_vis", "part_ml", "part_acc"))
        if threads[0] != n_workers:
            numba.set_num_threads(n_workers)
            threads[0] = n_workers
        _attention_kernel(q, k_cache, v_cache, pos, scale, n_splits, out, *ws)


@njit(cache=True)
def decode_route(x, y, norm, eps, h, router, logits, probs, ids, wts, run_start, run_expert, act, needs):
    """After attention: x += y[0] (wo's output), h = rmsnorm(x), the router's choice (ids, wts), the expert runs
    in ascending expert order as expert_linear groups them (one row each), and h rounded into every row of act
    for w1, w3."""
    for i in range(x.shape[1]):
        x[0, i] = x[0, i] + y[0, i]
    _rmsnorm_row(x, norm, eps, h, 0)
    _router_logits(h, 0, router, logits)
    _route_probs(logits, probs, ids, wts)
    for a in range(ids.shape[0]):
        run_expert[a] = ids[a]
        run_start[a] = a
    run_start[ids.shape[0]] = ids.shape[0]
    run_expert.sort()
    _quantize(h, 0, act, needs)


@njit(cache=True)
def decode_silu(g, u, act, needs):
    """g = silu(g) * u per expert row, rounded into act for w2."""
    for r in range(g.shape[0]):
        _silu_mul_row(g, u, r)
    _quantize_rows(g, act, needs)


@njit(cache=True)
def decode_pre_head(x, y, ids, wts, run_expert, norm, eps, act, needs):
    """After the last block: x += its expert outputs, x = rmsnorm(x), rounded into act for the output head."""
    _add_experts(x, y, ids, wts, run_expert)
    _rmsnorm_row(x, norm, eps, x, 0)
    _quantize(x, 0, act, needs)

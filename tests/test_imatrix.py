"""`mixlocal imatrix` and `mixlocal quantize --imatrix` against llama.cpp.

The statistics are compared with llama.cpp's own forward pass on the same float32 GGUF and the same chunks: its
cb_eval callback (llama_context_params.cb_eval, as tools/imatrix/imatrix.cpp's collect_imatrix uses it) sees each
MUL_MAT / MUL_MAT_ID input, here from Python through ctypes, in a subprocess. The quantized file is compared byte
for byte with ggml_quantize_chunk given the importance rows llama-quantize derives from the same file.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from mixlocal.engine.imatrix import MIN_DENSE_TOKENS, ImatrixCollector, chunk_tokens
from mixlocal.quant.imatrix import read_imatrix
from mixlocal.quant.quantize import IMATRIX_TYPES
from mixlocal.quant.tensor import QType

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import mean_kl
from gguf_fixtures import llama_cpp_status, run_llama_cpp, write_gguf_with_gguf_py
from numpy_reference import forward as numpy_forward
from test_gguf_source import IDS

from mixlocal import engine

TEXT = Path(__file__).resolve().parent.parent / "engine" / "data" / "ppl_text.txt"
CHUNK, CHUNKS = 64, 4

# llama.cpp's side: the statistics collect_imatrix would sum, gathered in float64 from cb_eval.
LLAMA_IMATRIX = r"""
import ctypes, glob, json, os, sys
import numpy as np
import llama_cpp as L

path, n_ctx = sys.argv[1], int(sys.argv[2])
chunks = json.loads(sys.stdin.read())

class Tensor(ctypes.Structure):  # struct ggml_tensor (ggml.h), stable across the 0.x releases
    pass
Tensor._fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
                   ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16),
                   ("flags", ctypes.c_int32), ("src", ctypes.POINTER(Tensor) * 10), ("view_src", ctypes.c_void_p),
                   ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64),
                   ("extra", ctypes.c_void_p), ("padding", ctypes.c_char * 8)]
base = ctypes.CDLL(glob.glob(os.path.join(os.path.dirname(L.__file__), "lib", "libggml-base.so*"))[0])
base.ggml_op_name.restype = ctypes.c_char_p
base.ggml_op_name.argtypes = [ctypes.c_int]

def weight_name(t):  # filter_tensor_name: "CPU#blk.0.attn_k.weight#0" -> "blk.0.attn_k.weight"
    s = t.name.decode()
    return s.split("#")[1] if "#" in s else s

def floats(addr, n):
    return np.ctypeslib.as_array((ctypes.c_float * n).from_address(addr)).astype(np.float64)

stats = {}
def collect(tp, ask, _):
    t = ctypes.cast(tp, ctypes.POINTER(Tensor)).contents
    op = base.ggml_op_name(t.op).decode()
    if ask:
        if op == "MUL_MAT_ID":
            return True
        if op != "MUL_MAT":
            return False
        s1 = t.src[1].contents
        return bool(s1.ne[1] >= 16 and s1.type == 0 and weight_name(t.src[0].contents).startswith("blk."))
    s0, s1 = t.src[0].contents, t.src[1].contents
    cols = s1.ne[0]
    if op == "MUL_MAT_ID":
        ids = t.src[2].contents
        e = stats.setdefault(weight_name(s0), [np.zeros((s0.ne[2], cols)), np.zeros(s0.ne[2])])
        for row in range(s1.ne[2]):
            for idx in range(ids.ne[0]):
                ex = ctypes.c_int32.from_address(ids.data + row * ids.nb[1] + idx * ids.nb[0]).value
                x = floats(s1.data + (idx % s1.ne[1]) * s1.nb[1] + row * s1.nb[2], cols)
                e[0][ex] += x * x
                e[1][ex] += 1
    else:
        e = stats.setdefault(weight_name(s0), [np.zeros((1, cols)), np.zeros(1)])
        for row in range(s1.ne[1]):
            x = floats(s1.data + row * s1.nb[1], cols)
            e[0][0] += x * x
        e[1][0] += s1.ne[1]
    return True

callback = L.ggml_backend_sched_eval_callback(collect)
L.llama_backend_init()
model = L.llama_model_load_from_file(path.encode(), L.llama_model_default_params())
cp = L.llama_context_default_params()
cp.n_ctx = cp.n_batch = cp.n_ubatch = n_ctx
cp.n_threads = cp.n_threads_batch = 2
cp.cb_eval = callback
ctx = L.llama_init_from_model(model, cp)
batch = L.llama_batch_init(n_ctx, 0, 1)
for ids in chunks:  # compute_imatrix: each chunk from an empty KV cache, all logits asked for
    L.llama_memory_clear(L.llama_get_memory(ctx), True)
    batch.n_tokens = len(ids)
    for k, tok in enumerate(ids):
        batch.token[k], batch.pos[k], batch.n_seq_id[k], batch.logits[k] = tok, k, 1, 1
        batch.seq_id[k][0] = 0
    assert L.llama_decode(ctx, batch) == 0
print(json.dumps({k: [v[0].tolist(), v[1].tolist()] for k, v in stats.items()}))
"""


@pytest.fixture(scope="module")
def f32_gguf(hf_model_dir, tmp_path_factory):
    return write_gguf_with_gguf_py(hf_model_dir, tmp_path_factory.mktemp("imx") / "f32.gguf",
                                   gguf.GGMLQuantizationType.F32)


def mixlocal_cli(*args, timeout=600):
    r = subprocess.run([sys.executable, "-m", "mixlocal", *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, check=False, env={**os.environ, "OMP_NUM_THREADS": "2"})
    return r


@pytest.fixture(scope="module")
def our_imatrix(f32_gguf, tmp_path_factory):
    out = tmp_path_factory.mktemp("imx_out") / "ours.gguf"
    r = mixlocal_cli("imatrix", "-m", f32_gguf, "-f", TEXT, "-o", out, "-c", CHUNK, "--chunks", CHUNKS, "-t", 2)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def test_matches_llama_cpp_cb_eval(f32_gguf, our_imatrix):
    why = llama_cpp_status()
    if why:
        pytest.skip(why)
    from mixlocal.tokenizer import Tokenizer
    tok = Tokenizer.from_gguf(f32_gguf)
    chunks = [c.tolist() for c in chunk_tokens(tok.encode(TEXT.read_text()), CHUNK, CHUNKS, tok.bos_id)]
    r = subprocess.run([sys.executable, "-c", LLAMA_IMATRIX, str(f32_gguf), str(CHUNK)], input=json.dumps(chunks),
                       capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    ref = json.loads(r.stdout.strip().splitlines()[-1])
    ours = read_imatrix(our_imatrix)
    assert ours.chunk_count == CHUNKS and ours.chunk_size == CHUNK
    assert sorted(ours.entries) == sorted(ref)
    assert len(ref) == 2 * 8  # per block: q, k, v, output, router, and the three expert stacks
    for name, (sums2, counts) in ref.items():
        e = ours.entries[name]
        np.testing.assert_array_equal(e.counts, counts, err_msg=name)  # the same tokens reach each expert
        sums2 = np.asarray(sums2)
        rel = np.abs(e.sums2 - sums2) / np.where(sums2 > 0, sums2, 1)
        assert rel.max() < 1e-3, (name, float(rel.max()))
    assert ours.entries["blk.0.attn_q.weight"].counts[0] == CHUNK * CHUNKS
    assert ours.entries["blk.1.ffn_down_exps.weight"].counts.sum() == 2 * CHUNK * CHUNKS  # two experts a token


def test_quantize_with_imatrix_equals_ggml(f32_gguf, our_imatrix, tmp_path, ggml_weighted):
    """Every matrix of `quantize --imatrix` equals ggml_quantize_chunk fed the file's importance rows (expert by
    expert for the stacks); matrices the file has no entry for (token_embd, output) equal ggml without one."""
    out = tmp_path / "q.gguf"
    r = mixlocal_cli("quantize", f32_gguf, out, "--type", "q3_k_m", "--imatrix", our_imatrix)
    assert r.returncode == 0, r.stderr[-2000:]
    im = read_imatrix(our_imatrix)
    src = {t.name: np.asarray(t.data, np.float32) for t in gguf.GGUFReader(f32_gguf).tensors}
    checked = set()
    for t in gguf.GGUFReader(out).tensors:
        qtype = QType(int(t.tensor_type))
        if qtype not in IMATRIX_TYPES:
            continue
        w = src[t.name]
        mats = w if w.ndim == 3 else w[None]
        got = np.asarray(t.data).reshape(mats.shape[0], mats.shape[1], -1)
        rows = im.importance(t.name, w.shape)
        for e in range(mats.shape[0]):
            want = ggml_weighted(qtype, mats[e], None if rows is None else rows[e])
            np.testing.assert_array_equal(got[e], want, err_msg=f"{t.name} expert {e} ({qtype.name})")
        checked.add((t.name.split(".")[-2], qtype.name, rows is not None))
    assert {("ffn_gate_exps", "Q3_K", True), ("ffn_down_exps", "Q4_K", True), ("attn_output", "Q5_K", True),
            ("token_embd", "Q3_K", False), ("output", "Q6_K", False)} <= checked  # attn_k/v are Q8_0 at 8 experts


def test_imatrix_changes_the_file(f32_gguf, our_imatrix, tmp_path):
    plain, weighted = tmp_path / "p.gguf", tmp_path / "w.gguf"
    assert mixlocal_cli("quantize", f32_gguf, plain, "--type", "q4_k_m").returncode == 0
    assert mixlocal_cli("quantize", f32_gguf, weighted, "--type", "q4_k_m", "--imatrix", our_imatrix).returncode == 0
    a = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(plain).tensors}
    b = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(weighted).tensors}
    assert np.array_equal(a["output.weight"], b["output.weight"])  # no entry: quantized as without a file
    assert not np.array_equal(a["blk.0.ffn_up_exps.weight"], b["blk.0.ffn_up_exps.weight"])


def test_cli_errors(f32_gguf, our_imatrix, tmp_path):
    r = mixlocal_cli("imatrix", "-m", f32_gguf, "-f", TEXT, "-o", our_imatrix, "-c", 64)
    assert r.returncode == 2 and "exists; add --force" in r.stderr
    short = tmp_path / "short.txt"
    short.write_text("only a few words")
    r = mixlocal_cli("imatrix", "-m", f32_gguf, "-f", short, "-o", tmp_path / "x.gguf", "-c", 64)
    assert r.returncode == 1 and "fewer than one chunk of 64" in r.stderr
    bad = tmp_path / "bad.dat"
    bad.write_bytes(b"\x00\x00")
    r = mixlocal_cli("quantize", f32_gguf, tmp_path / "q.gguf", "--type", "q4_k_m", "--imatrix", bad)
    assert r.returncode == 1 and "bad.dat" in r.stderr and not (tmp_path / "q.gguf").exists()


def test_legacy_output_format(f32_gguf, our_imatrix, tmp_path):
    dat = tmp_path / "ours.dat"
    r = mixlocal_cli("imatrix", "-m", f32_gguf, "-f", TEXT, "-o", dat, "-c", CHUNK, "--chunks", CHUNKS)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = read_imatrix(our_imatrix), read_imatrix(dat)
    assert a.entries.keys() == b.entries.keys() and b.chunk_count == CHUNKS
    for name, e in a.entries.items():
        shape = (e.counts.size, 8, e.sums2.shape[1]) if e.counts.size > 1 else (8, e.sums2.shape[1])
        # two runs of the model (threaded sums may round differently) and a float32 trip through mean * ncall
        np.testing.assert_allclose(b.importance(name, shape), a.importance(name, shape), rtol=1e-4)


def test_chunks_as_llama_imatrix():
    ids = list(range(100, 300))
    chunks = chunk_tokens(ids, 64, None, 1)
    assert len(chunks) == 3  # the 8 tokens past the last whole chunk are dropped
    assert [c[0] for c in chunks] == [1, 1, 1]
    assert chunks[1][1:].tolist() == ids[65:128]
    assert len(chunk_tokens(ids, 64, 2, 1)) == 2
    skipped = chunk_tokens(ids, 64, None, 1, skip=1)  # llama-imatrix --chunk 1: the text starts a chunk later
    assert len(skipped) == 2 and skipped[0][1:].tolist() == ids[65:128]
    with pytest.raises(ValueError, match="leaves none"):
        chunk_tokens(ids, 64, None, 1, skip=4)
    with pytest.raises(ValueError, match="fewer than one chunk"):
        chunk_tokens(ids[:10], 64, None, 1)


def test_collector_counts_routed_tokens_only():
    c = ImatrixCollector(n_experts=4)
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    c(["e.weight"], x, np.array([[0, 2], [2, 3], [0, 2]]))
    np.testing.assert_array_equal(c.counts["e.weight"], [2, 0, 3, 1])
    np.testing.assert_allclose(c.sums2["e.weight"][2], (x.astype(np.float64) ** 2).sum(axis=0))
    np.testing.assert_allclose(c.sums2["e.weight"][3], x[1].astype(np.float64) ** 2)
    assert not c.sums2["e.weight"][1].any()
    c(["d.weight"], x, None)  # a dense product under 16 tokens is skipped, as llama.cpp skips it
    assert "d.weight" not in c.sums2
    c(["d.weight"], np.ones((MIN_DENSE_TOKENS, 4), np.float32), None)
    assert c.counts["d.weight"].tolist() == [MIN_DENSE_TOKENS]


def test_memory_budget_counts_real_experts(f32_gguf):
    """Under a memory budget the expert products run on slot ids; the hook must still count each real expert."""
    from mixlocal.engine.backends.numba.backend import BUDGET_MARGIN
    from mixlocal.engine.imatrix import compute_imatrix

    import mixlocal

    text = TEXT.read_text()
    full = mixlocal.load(f32_gguf, n_ctx=CHUNK, n_threads=2)
    budgeted = mixlocal.load(f32_gguf, n_ctx=CHUNK, n_threads=2, mem_budget=BUDGET_MARGIN + (48 << 20))  # 48 MiB of weights
    try:
        assert budgeted.backend.budget["n_slots"] < 8  # experts really come and go here
        a = compute_imatrix(full, text, chunk=CHUNK, n_chunks=2)
        b = compute_imatrix(budgeted, text, chunk=CHUNK, n_chunks=2)
    finally:
        budgeted.close()
    for name, e in a.entries.items():
        np.testing.assert_array_equal(b.entries[name].counts, e.counts, err_msg=name)
        np.testing.assert_allclose(b.entries[name].sums2, e.sums2, rtol=1e-5, err_msg=name)


def test_levels_needing_an_imatrix_are_refused(f32_gguf, monkeypatch):
    """llama.cpp's rule: IQ3_XXS, IQ2_*, IQ1_* and q2_k_s's Q2_K are not made without an importance matrix. The
    recipe is made to pick IQ2_XS for every tensor here; every type ggml itself says needs one
    (ggml_quantize_requires_imatrix) is covered by the rule."""
    import ctypes

    from mixlocal.engine import quantize as eq
    from mixlocal.engine.loader import open_source
    from test_formats import _ggml_base
    lib, reason = _ggml_base()
    if lib is None:
        pytest.skip(reason)
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    for q in QType:
        if lib.ggml_quantize_requires_imatrix(int(q)):
            assert eq._requires_imatrix("q4_k_m", "blk.0.attn_q.weight", q), q.name
    assert not eq._requires_imatrix("q2_k", "blk.0.attn_q.weight", QType.Q2_K)  # only q2_k_s needs it for Q2_K
    assert not eq._requires_imatrix("q4_k_m", "output.weight", QType.IQ1_M)

    _c, weights, _t, _n = open_source(f32_gguf)
    monkeypatch.setattr(eq, "choose_type", lambda level, name, *a: QType.IQ2_XS)
    monkeypatch.setattr(eq, "QUANTIZE_TYPES", (*eq.QUANTIZE_TYPES, QType.IQ2_XS))  # else no encoder is said first
    seen = []
    # llama.cpp never asks an importance matrix for the embeddings or the output head, so a block tensor is named
    with pytest.raises(eq.MissingImatrixError, match=r"makes blk\.0\.\S+ IQ2_XS.*--imatrix"):
        eq.quantize_weights(weights, "q4_k_m", progress=lambda items: seen.extend(items) or items)
    assert seen == []  # refused before any tensor was quantized


LLAMA_QUANTIZE_WITH_IMATRIX = r"""
import ctypes, sys
import numpy as np
import llama_cpp as L
src, dst, ftype, npz = sys.argv[1:5]
d = np.load(npz)
names = [k.encode() for k in d.files]
arrays = [np.ascontiguousarray(d[k], np.float32).reshape(-1) for k in d.files]
Entry = L.llama_model_imatrix_data  # what tools/quantize hands llama_model_quantize: name, values, count
table = (Entry * (len(names) + 1))(*[Entry(n, a.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), a.size)
                                     for n, a in zip(names, arrays)], Entry(None, None, 0))
p = L.llama_model_quantize_default_params()
p.ftype, p.nthread = int(ftype), 2
p.imatrix = ctypes.cast(table, ctypes.POINTER(Entry))
sys.exit(L.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(p)))
"""


# Levels, llama.cpp's ftype numbers for them (llama.h, enum llama_ftype) and the format of most of their tensors
IQ_LEVEL_FTYPES = [("iq4_xs", 30), ("iq4_nl", 25), ("iq3_m", 27), ("iq3_s", 26), ("iq3_xs", 22), ("iq3_xxs", 23),
                   ("iq2_m", 29), ("iq2_s", 28), ("iq2_xs", 20), ("iq2_xxs", 19), ("iq1_m", 31), ("iq1_s", 24)]
# (llama_model_quantize_impl's default_type: IQ2_S files hold mostly IQ2_XS, IQ2_M files IQ2_S)
IQ_LEVEL_FORMAT = {"iq3_m": QType.IQ3_S, "iq3_xs": QType.IQ3_XXS, "iq2_m": QType.IQ2_S, "iq2_s": QType.IQ2_XS}


@pytest.mark.parametrize(("level", "ftype"), [("q4_k_m", 15), ("q3_k_m", 12), *IQ_LEVEL_FTYPES])
def test_whole_file_equals_llama_model_quantize(f32_gguf, our_imatrix, tmp_path, level, ftype):
    """llama.cpp's own quantizer (llama_model_quantize), given our file's importance values as llama-quantize
    derives them (in_sum2 / counts per expert, 1 where no token went), writes the same bytes for every tensor as
    mixlocal quantize --imatrix. For the IQ levels, llama.cpp's file then runs in mixlocal no further from the float64
    pass over gguf-py's dequantized weights than llama.cpp itself runs it."""
    why = llama_cpp_status()
    if why:
        pytest.skip(why)
    im = read_imatrix(our_imatrix)
    src = {t.name: tuple(int(d) for d in t.shape[::-1]) for t in gguf.GGUFReader(f32_gguf).tensors}
    values = {name: im.importance(name, src[name]) for name in im.entries}
    np.savez(tmp_path / "values.npz", **values)
    theirs = tmp_path / "llama.gguf"
    r = subprocess.run([sys.executable, "-c", LLAMA_QUANTIZE_WITH_IMATRIX, str(f32_gguf), str(theirs), str(ftype),
                        str(tmp_path / "values.npz")], capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    ours = tmp_path / "ours.gguf"
    r = mixlocal_cli("quantize", f32_gguf, ours, "--type", level, "--imatrix", our_imatrix)
    assert r.returncode == 0, r.stderr[-2000:]
    a = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
    b = {t.name: t for t in gguf.GGUFReader(ours).tensors}
    assert a.keys() == b.keys()
    for name, t in a.items():
        assert t.tensor_type == b[name].tensor_type, name
        np.testing.assert_array_equal(np.asarray(b[name].data), np.asarray(t.data), err_msg=name)
    if not level.startswith("iq"):
        return
    want = IQ_LEVEL_FORMAT.get(level) or QType[level.upper()]
    assert a["blk.0.ffn_up_exps.weight"].tensor_type == want, level
    ref = numpy_forward(theirs, IDS)
    own = np.asarray(run_llama_cpp(theirs, [IDS], "logits")[0], np.float32)
    ours = engine.load(theirs, n_ctx=64, kv_type="f32", backend="numba").eval(IDS)
    assert mean_kl(ref, ours) < 2 * mean_kl(ref, own)

"""The `mixlocal` command line, driven in subprocesses as a user runs it, on the tiny fixture Mixtral.

References: transformers (greedy generation, perplexity on gguf-py-quantized weights), sentencepiece (token ids),
the safetensors library (tensor inventory), gguf-py (the GGUF that quantize writes), PIL via matplotlib (the PNG).
"""
from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import MIXTRAL_TOKENIZER

REPO_ROOT = Path(__file__).resolve().parent.parent
FIELDS = ["quant", "size_bytes", "bits_per_weight", "load_s", "pp_tps", "tg_tps", "peak_rss_bytes", "ppl", "kld",
          "top1"]
# Small enough for CI; one thread, because on a shared 2-core machine numba's OpenMP threads stall each other.
BENCH_ARGS = ["-p", "16", "-n", "4", "--ppl-ctx", "64", "--ppl-chunks", "2", "--threads", "1"]


def run_cli(*args, timeout: float = 300, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run([sys.executable, "-m", "mixlocal.engine.cli", *map(str, args)], check=False, capture_output=True,
                          text=True, cwd=REPO_ROOT, env=env, timeout=timeout, input=stdin)


def one_error_line(r: subprocess.CompletedProcess, status: int) -> str:
    assert r.returncode == status, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


@pytest.fixture(scope="module")
def sp():
    import sentencepiece
    return sentencepiece.SentencePieceProcessor(model_file=str(MIXTRAL_TOKENIZER))


# ---------------------------------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------------------------------

def test_generate_greedy_matches_transformers(hf_model_dir, hf_reference, sp):
    import torch

    prompt = "The old lighthouse keeper said"
    r = run_cli("generate", "-m", hf_model_dir, "-p", "-", "-n", 8, "--temp", 0, "--threads", 1, stdin=prompt)
    assert r.returncode == 0, r.stderr
    ids = [sp.bos_id()] + sp.encode(prompt)
    with torch.no_grad():
        out = hf_reference.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=2,
                                    pad_token_id=2)[0].tolist()
    new = [t for t in out[len(ids):] if t != 2]
    # The continuation decodes together with the prompt: its first word keeps its leading space.
    assert r.stdout == sp.decode(ids[1:] + new) + "\n"
    timing = r.stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"prefill {len(ids)} tokens at [\d.]+ tok/s, decode \d+ tokens at [\d.]+ tok/s \(length\)",
                        timing), timing


# ---------------------------------------------------------------------------------------------------------------------
# info
# ---------------------------------------------------------------------------------------------------------------------

def test_info_counts_what_the_files_hold(hf_model_dir):
    from safetensors import safe_open

    r = run_cli("info", hf_model_dir, "--json", "--n-ctx", 1000)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    raw = json.loads((hf_model_dir / "config.json").read_text())
    shapes, dtypes = {}, {}
    for f in hf_model_dir.glob("*.safetensors"):
        with safe_open(f, framework="pt") as st:
            for name in st.keys():  # noqa: SIM118 - safe_open is not iterable
                s = st.get_slice(name)
                shapes[name], dtypes[name] = s.get_shape(), s.get_dtype()
    n = {name: int(np.prod(s)) for name, s in shapes.items()}
    assert info["n_elements"] == sum(n.values())
    # Matrices stay in the file's bf16; norms and router are held as float32 (and counted so).
    small = [k for k in n if k.endswith(("norm.weight", "gate.weight"))]
    assert info["formats"]["BF16"]["elements"] == sum(v for k, v in n.items() if k not in small)
    assert info["formats"]["BF16"]["bytes"] == 2 * info["formats"]["BF16"]["elements"]
    assert info["formats"]["F32"]["elements"] == sum(n[k] for k in small)
    assert {dtypes[k] for k in n} == {"BF16"}
    # Under GGUF names all experts of a block and projection are one tensor: embeddings and output head, then per
    # layer q, k, v, o and three expert stacks; the float32 ones are the final norm and per layer two norms and
    # the router.
    layers = raw["num_hidden_layers"]
    assert info["formats"]["BF16"]["tensors"] == 2 + 7 * layers
    assert info["formats"]["F32"]["tensors"] == 1 + 3 * layers
    kv = 2 * raw["num_hidden_layers"] * raw["num_key_value_heads"] * (raw["hidden_size"] // raw["num_attention_heads"]) * 2
    assert info["kv_bytes_per_token"] == kv and info["kv_bytes_at_n_ctx"] == kv * 1000
    text = run_cli("info", hf_model_dir, "--n-ctx", 1000)
    assert text.returncode == 0 and "BF16" in text.stdout and "KV cache (f16)" in text.stdout


# ---------------------------------------------------------------------------------------------------------------------
# errors: one clear line, no traceback
# ---------------------------------------------------------------------------------------------------------------------

def main_error_line(capsys, argv: list, status: int) -> str:
    """engine.cli.main in this process: the same code path as the console script, without a process start."""
    from mixlocal.engine.cli import main

    assert main([str(a) for a in argv]) == status
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_bad_flags_are_one_line(hf_model_dir, capsys):
    line = one_error_line(run_cli("generate", "-m", hf_model_dir, "-p", "hi", "--bogus"), 2)  # the real script
    assert line == "mixlocal: unrecognized arguments: --bogus (see mixlocal --help)"
    line = main_error_line(capsys, ["generate", "-m", hf_model_dir, "-p", "hi", "-n", "many"], 2)
    assert "invalid int value: 'many'" in line
    line = main_error_line(capsys, ["bench", "-m", hf_model_dir, "--quants", "q8_0", "-p", "0"], 1)
    assert "-p must be at least 8" in line
    assert "invalid choice: 'frobnicate'" in main_error_line(capsys, ["frobnicate"], 2)
    line = main_error_line(capsys, ["bench", "-m", hf_model_dir, "--quants", "q8_0,q9_9"], 1)
    assert "unknown quantization level 'q9_9'" in line and "q4_k_m" in line


def test_unreadable_model_is_one_line(tmp_path, capsys):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"this is not a gguf file" * 10)
    line = one_error_line(run_cli("generate", "-m", junk, "-p", "hi"), 1)
    assert line.startswith("mixlocal: error:") and "junk.gguf" in line
    (tmp_path / "empty").mkdir()
    line = main_error_line(capsys, ["info", tmp_path / "empty"], 1)
    assert "empty" in line
    line = main_error_line(capsys, ["bench", "-m", junk, "--quants", "q8_0"], 1)
    assert "junk.gguf" in line


# ---------------------------------------------------------------------------------------------------------------------
# bench
# ---------------------------------------------------------------------------------------------------------------------

def reference_perplexity(model, sp, text: str, ppl_ctx: int, n_chunks: int) -> float:
    """The bench's protocol done independently on transformers: chunks of ppl_ctx text tokens, each run from BOS,
    the second half of each chunk scored."""
    import torch

    tokens = sp.encode(text)
    nll = []
    for c in range(n_chunks):
        chunk = tokens[c * ppl_ctx:(c + 1) * ppl_ctx]
        with torch.no_grad():
            logits = model(torch.tensor([[sp.bos_id()] + chunk[:-1]])).logits[0].double()
        lp = torch.log_softmax(logits, dim=-1)
        half = ppl_ctx // 2
        nll += [-float(lp[j, chunk[j]]) for j in range(half, ppl_ctx)]
    return float(np.exp(np.mean(nll)))


def q8_0_roundtrip(model):
    """A copy of the transformers model whose matrices went through gguf-py's Q8_0 quantize/dequantize, as the
    q8_0 level stores every matrix (norms and router stay float)."""
    import copy

    import torch
    from gguf import GGMLQuantizationType, quants

    q = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in q.named_parameters():
            if p.ndim == 2 and not name.endswith("gate.weight"):
                w = p.float().numpy()
                back = quants.dequantize(quants.quantize(w, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0)
                p.copy_(torch.from_numpy(np.ascontiguousarray(back, dtype=np.float32)))
    return q


def test_bench_levels_json_csv_plot_and_saved_reference(hf_model_dir, hf_reference, sp, tmp_path):
    out = tmp_path / "r"
    ref = tmp_path / "ref.npz"
    r = run_cli("bench", "-m", hf_model_dir, "--quants", "q8_0,q4_0", *BENCH_ARGS, "--save-ref", ref,
                "--json", f"{out}.json", "--csv", f"{out}.csv", "--plot", f"{out}.png")
    assert r.returncode == 0, r.stderr
    report = json.loads(Path(f"{out}.json").read_text())
    assert set(report) == {"machine", "model", "results"}
    rows = report["results"]
    assert [row["quant"] for row in rows] == ["q8_0", "q4_0"]
    for row in rows:
        assert list(row) == FIELDS
        assert isinstance(row["size_bytes"], int) and isinstance(row["peak_rss_bytes"], int)
        for k in ("bits_per_weight", "load_s", "pp_tps", "tg_tps", "ppl", "kld", "top1"):
            assert isinstance(row[k], float), k
        assert row["load_s"] > 0 and row["pp_tps"] > 0 and row["tg_tps"] > 0
        assert row["peak_rss_bytes"] > row["size_bytes"]  # each process held at least its own weights
    q8, q4 = rows
    assert report["model"]["reference"] == "q8_0" and q8["kld"] == 0.0 and q8["top1"] == 1.0
    assert q4["size_bytes"] < q8["size_bytes"] and q4["bits_per_weight"] < q8["bits_per_weight"]
    assert q4["kld"] > 0 and q4["top1"] < 1

    # The reference's perplexity, recomputed on transformers (float32) with weights through gguf-py's own Q8_0.
    # The engine keeps K and V in f16, and this random model's logits are wide (ppl ~1e6), so the log-perplexities
    # agree to a few thousandths (measured 0.0034), not to float32 rounding.
    text = (REPO_ROOT / "engine" / "data" / "ppl_text.txt").read_text()
    expected = reference_perplexity(q8_0_roundtrip(hf_reference), sp, text, 64, 2)
    assert abs(np.log(q8["ppl"]) - np.log(expected)) < 1e-2

    with open(f"{out}.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == FIELDS and [t["quant"] for t in table] == ["q8_0", "q4_0"]
    assert float(table[1]["kld"]) == pytest.approx(q4["kld"], rel=1e-12)

    import matplotlib.image
    img = matplotlib.image.imread(f"{out}.png")
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 400

    # A later run compares against the saved reference: fewer bits, more divergence.
    r2 = run_cli("bench", "-m", hf_model_dir, "--quants", "q2_k", *BENCH_ARGS, "--ref-file", ref, "--json",
                 tmp_path / "r2.json")
    assert r2.returncode == 0, r2.stderr
    report2 = json.loads((tmp_path / "r2.json").read_text())
    q2 = report2["results"][0]
    assert report2["model"]["reference"] == str(ref)
    assert q2["bits_per_weight"] < q4["bits_per_weight"] and q2["kld"] > q4["kld"] and q2["top1"] <= q4["top1"]
    assert "q2_k" in r2.stdout and "kld" in r2.stdout

    # The saved reference belongs to its text and chunking; another setting is refused in one line.
    line = one_error_line(run_cli("bench", "-m", hf_model_dir, "--quants", "q2_k", "--ppl-ctx", 32,
                                  "--ref-file", ref), 1)
    assert "--ppl-ctx 64" in line


def test_bench_with_imatrix_measures_each_level_twice(tmp_path):
    """--imatrix on the embedded model: every level quantized from the same source without and with the matrix
    (computed by mixlocal imatrix on text the perplexity chunks do not score), side by side in the table, the JSON,
    the CSV and the plot; q8_0, whose formats ignore a matrix, measured once; iq2_xxs only with it."""
    im = tmp_path / "im.gguf"
    r = run_cli("imatrix", "-f", REPO_ROOT / "engine" / "data" / "ppl_text.txt", "-o", im, "-c", 64, "--chunk", 4,
                "--chunks", 2, "-t", 1)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "r"
    r = run_cli("bench", "--quants", "q8_0,q4_k_m,iq2_xxs", *BENCH_ARGS, "--imatrix", im, "--json", f"{out}.json",
                "--csv", f"{out}.csv", "--plot", f"{out}.png")
    assert r.returncode == 0, r.stderr
    report = json.loads(Path(f"{out}.json").read_text())
    assert set(report) == {"machine", "model", "results", "skipped", "comparison"}
    assert report["model"]["imatrix"] == str(im) and report["model"]["reference"] == "q8_0"
    rows = report["results"]
    assert [(row["quant"], row["imatrix"]) for row in rows] == [("q8_0", False), ("q8_0", True), ("q4_k_m", False),
                                                                ("q4_k_m", True), ("iq2_xxs", True)]
    assert all(list(row) == FIELDS + ["imatrix"] for row in rows)
    [skip] = report["skipped"]
    assert (skip["quant"], skip["imatrix"]) == ("iq2_xxs", False) and "importance matrix" in skip["reason"]

    q8, q4, iq2 = report["comparison"]
    assert q8["quant"] == "q8_0" and q8["imatrix_changes_nothing"]
    assert q8["kld"] == q8["kld_imatrix"] == 0.0 and q8["size_bytes"] == q8["size_bytes_imatrix"]
    assert q4["quant"] == "q4_k_m" and not q4["imatrix_changes_nothing"]
    assert q4["size_bytes"] == q4["size_bytes_imatrix"]  # the same formats, other bytes: other divergence
    assert q4["kld"] > 0 and q4["kld_imatrix"] > 0 and q4["kld"] != q4["kld_imatrix"]
    assert iq2["quant"] == "iq2_xxs" and iq2["kld"] is None and iq2["size_bytes"] is None
    assert iq2["size_bytes_imatrix"] < q4["size_bytes_imatrix"] and iq2["kld_imatrix"] > q4["kld_imatrix"]
    by_row = {(row["quant"], row["imatrix"]): row for row in rows}
    assert q4["kld_imatrix"] == by_row[("q4_k_m", True)]["kld"] and q4["ppl"] == by_row[("q4_k_m", False)]["ppl"]

    text = r.stdout
    assert "q4_k_m +imatrix" in text and "kld +imx" in text and "q8_0 (=)" in text
    assert "skipped iq2_xxs: iq2_xxs makes" in text
    with open(f"{out}.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [(t["quant"], t["imatrix"]) for t in table][-1] == ("iq2_xxs", "True") and len(table) == 5
    import matplotlib.image
    img = matplotlib.image.imread(f"{out}.png")
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 400


def test_bench_ranks_every_level_by_precision():
    """The run's reference is its least-quantized level: every level load() accepts has a rank, the IQ1 levels last."""
    from mixlocal.engine.cli import bench
    from mixlocal.quant.recipes import LEVELS

    unranked = set(LEVELS) - set(bench._PRECISION_ORDER)
    assert not unranked, f"levels without a precision rank: {sorted(unranked)}"
    assert bench.least_quantized(["iq1_s", "iq1_m", "iq2_xxs"]) == "iq2_xxs"
    assert bench.least_quantized(["iq1_s", "iq1_m"]) == "iq1_m"


def test_bench_skips_what_it_cannot_make(monkeypatch, capsys, tmp_path):
    """Before any worker: a level with a format we cannot encode is skipped with the reason (IQ3_S's quantizer taken
    away here), a level that needs an importance matrix is skipped without one, and a run left with no level to be
    the reference says so in one line."""
    from mixlocal.engine import quantize as eq
    from mixlocal.engine.cli import bench
    from mixlocal.engine.loader import open_source

    monkeypatch.setattr(eq, "QUANTIZE_TYPES", tuple(q for q in eq.QUANTIZE_TYPES if q.name != "IQ3_S"))
    weights = open_source(None)[1]
    skipped = bench._refusals(weights, ["q8_0", "iq3_s", "iq2_xs"], None)
    assert set(skipped) == {("iq3_s", False), ("iq2_xs", False)}
    assert "IQ3_S" in skipped[("iq3_s", False)] and "cannot quantize" in skipped[("iq3_s", False)]
    assert "importance matrix" in skipped[("iq2_xs", False)]
    settings = bench.BenchSettings(source=None, levels=["iq3_s", "iq2_xs", "q8_0"])
    assert settings.reference_level(skipped) == "q8_0"
    with pytest.raises(bench.BenchError, match="--ref iq3_s cannot be measured: iq3_s needs IQ3_S"):
        bench.BenchSettings(source=None, levels=["iq3_s", "q8_0"], ref="iq3_s").reference_level(skipped)

    line = main_error_line(capsys, ["bench", "--quants", "iq2_xs,iq3_s", "-p", 16, "-n", 1], 1)
    assert "no level of the run can be measured without an importance matrix" in line
    line = main_error_line(capsys, ["bench", "--quants", "q8_0", "--imatrix", tmp_path / "none.gguf"], 1)
    assert "none.gguf: importance matrix not found" in line

    report = {"model": {"name": "m", "reference": "q8_0", "ppl_text": "t.txt"}, "results": [],
              "skipped": [{"quant": "iq3_s", "imatrix": False, "reason": skipped[("iq3_s", False)]}]}
    assert bench.format_table(report).splitlines()[-1] == f"skipped iq3_s: {skipped[('iq3_s', False)]}"


# ---------------------------------------------------------------------------------------------------------------------
# quantize and serve
# ---------------------------------------------------------------------------------------------------------------------

def test_quantize_writes_a_gguf_that_gguf_py_reads(hf_model_dir, tmp_path, capsys):
    import torch
    from gguf import GGMLQuantizationType, GGUFReader, quants
    from safetensors import safe_open

    out = tmp_path / "tiny-q8_0.gguf"
    r = run_cli("quantize", hf_model_dir, out, "--type", "q8_0")
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "tiny-q8_0.gguf.part").exists()
    reader = GGUFReader(out)
    tensors = {t.name: t for t in reader.tensors}
    layers = json.loads((hf_model_dir / "config.json").read_text())["num_hidden_layers"]
    assert len(tensors) == 3 + 10 * layers
    for name, t in tensors.items():
        small = name.endswith(("norm.weight", "ffn_gate_inp.weight"))
        assert t.tensor_type == (GGMLQuantizationType.F32 if small else GGMLQuantizationType.Q8_0), name
    down = quants.dequantize(np.asarray(tensors["blk.1.ffn_down_exps.weight"].data), GGMLQuantizationType.Q8_0)
    with safe_open(next(hf_model_dir.glob("*.safetensors")), framework="pt") as st:
        w2 = st.get_tensor("model.layers.1.block_sparse_moe.experts.3.w2.weight").to(torch.float32).numpy()
    assert down.shape[1:] == w2.shape
    assert np.abs(down[3] - w2).max() <= np.abs(w2).max() / 127  # Q8_0: half a step of a 127-level block scale

    assert "--force" in main_error_line(capsys, ["quantize", hf_model_dir, out, "--type", "q8_0"], 2)
    line = main_error_line(capsys, ["quantize", hf_model_dir, tmp_path / "x.gguf", "--type", "q7"], 2)
    assert "unknown level 'q7'" in line


def test_serve_is_wired_to_the_server(hf_model_dir):
    import socket
    import time
    import urllib.request

    help_text = run_cli("serve", "--help")
    assert help_text.returncode == 0 and "--port" in help_text.stdout
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    proc = subprocess.Popen([sys.executable, "-m", "mixlocal.engine.cli", "serve", "-m", str(hf_model_dir), "--port", str(port),
                             "--threads", "1"], cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as resp:
                    models = json.loads(resp.read())
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read()
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(0.3)
        assert models["object"] == "list" and models["data"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# ---------------------------------------------------------------------------------------------------------------------
# kernel families
# ---------------------------------------------------------------------------------------------------------------------

def test_info_names_the_kernel_family_and_an_unknown_one_is_one_error_line():
    from mixlocal.quant.kernels import host_families

    r = run_cli("info", "--json")
    assert r.returncode == 0, r.stderr
    k = json.loads(r.stdout)["kernels"]
    assert k == {"chosen": host_families()[0], "cpu_runs": list(host_families())}
    r = run_cli("info", "--kernels", "portable")
    assert "kernels (numba backend): portable; this CPU runs " + ", ".join(host_families()) in r.stdout
    line = one_error_line(run_cli("generate", "-p", "Hi", "-n", "2", "--kernels", "neon"), 1)
    assert "'neon' is not a kernel family; choose one of avx512vnni, avxvnni, avx2, portable" in line


def test_generate_gives_the_same_greedy_text_with_every_family_this_cpu_runs():
    """Each family rounds activations the same way (int8 per 32-block) and sums exactly in integers, so greedy text
    from the embedded model must not depend on the family."""
    from mixlocal.quant.kernels import host_families

    texts = {}
    for family in host_families():
        r = run_cli("generate", "-p", "The meaning of life is", "-n", "12", "--temp", "0", "--kernels", family,
                    "--no-packed-cache")
        assert r.returncode == 0, r.stderr
        texts[family] = r.stdout
    assert len(set(texts.values())) == 1, texts

"""Command-line habits people bring from llama.cpp, ollama and mlx-lm: --version, sampling errors before the model
loads, a closed pipe is not an error, and no silent requantization."""
from __future__ import annotations

import subprocess
import sys

import pytest
from test_cli import REPO_ROOT, one_error_line, run_cli

from mixlocal import engine


def test_version():
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"mixlocal {engine.__version__}"
    assert engine.__version__ and engine.__version__ != "0+unknown"  # the package is installed (make test)


@pytest.mark.parametrize("command", ["generate", "chat"])
@pytest.mark.parametrize("flag,value,mentions", [("--temp", "-1", "temperature"), ("--top-p", "2", "top_p"),
                                                 ("--top-k", "-5", "top_k"), ("-n", "-1", "max-tokens")])
def test_bad_sampling_values_fail_before_anything_is_printed(command, flag, value, mentions):
    args = [command, flag, value] + (["-p", "Hello"] if command == "generate" else [])
    r = run_cli(*args, stdin="")
    line = one_error_line(r, 2)
    assert mentions in line and r.stdout == ""  # the prompt was not echoed: nothing ran


def test_a_closed_pipe_is_not_an_error():
    for cmd in ("info", "generate -p Hello -n 40 --temp 0"):
        # pipefail: the pipeline's status is mixlocal's, not head's
        p = subprocess.run(["bash", "-o", "pipefail", "-c", f"{sys.executable} -m mixlocal {cmd} | head -c 5"],
                           cwd=REPO_ROOT, check=False, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
        assert "Broken pipe" not in p.stderr and "Traceback" not in p.stderr, p.stderr
        assert len(p.stdout) == 5


def test_quantize_refuses_to_requantize_unless_asked(tmp_path):
    src = engine.DEFAULT_MODEL  # q8_0
    line = one_error_line(run_cli("quantize", src, tmp_path / "a.gguf", "--type", "q4_0"), 2)
    assert "already quantized (Q8_0)" in line and "--allow-requantize" in line
    assert not (tmp_path / "a.gguf").exists()
    r = run_cli("quantize", src, tmp_path / "b.gguf", "--type", "q4_0", "--allow-requantize")
    assert r.returncode == 0, r.stderr
    assert engine.load(tmp_path / "b.gguf", n_ctx=64).eval([1, 2]).shape == (2, 32000)

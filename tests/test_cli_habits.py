"""Command-line habits people bring from llama.cpp, ollama and mlx-lm: --version, sampling errors before the model
loads, a closed pipe is not an error, no silent requantization, a word before kernels compile (and one kernel cache),
every quantization level in any case, one-shot instructions through the chat template, and consistent help.

References: mistral-common (the Mixtral v1 chat encoding), gguf-py (what quantize wrote), quant.recipes (checked
against llama.cpp in test_recipes.py)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

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


# ---------------------------------------------------------------------------------------------------------------------
# item 2: compiling kernels says so, once, and the speed line leaves it out; one kernel cache for every entry point
# ---------------------------------------------------------------------------------------------------------------------

TIMING = re.compile(r"prefill (\d+) tokens at ([\d.]+) tok/s, decode (\d+) tokens at ([\d.]+) tok/s")


def _fresh_cache_env(cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "XDG_CACHE_HOME")}
    env["MIXLOCAL_CACHE_DIR"] = str(cache)
    return env


def test_first_run_announces_compilation_and_later_entry_points_reuse_it(tmp_path):
    console_script = Path(sys.executable).parent / "mixlocal"
    if not console_script.exists():
        pytest.skip("the mixlocal console script is not installed (make dev installs it)")
    env = _fresh_cache_env(tmp_path / "cache")
    args = ["generate", "-p", "Hello", "-n", "4", "--temp", "0", "-t", "1"]
    first = subprocess.run([str(console_script), *args], env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                           timeout=900, check=False)
    assert first.returncode == 0, first.stderr
    assert "compiling kernels for this CPU (once, about" in first.stderr, first.stderr
    compiled = re.search(r"compiled (\d+) kernels in ([\d.]+) s", first.stderr)
    assert compiled and int(compiled.group(1)) > 0, first.stderr
    # the kernels went into the mixlocal cache, not beside the source nor into a checkout's .numba_cache
    assert any((tmp_path / "cache" / "numba").rglob("*.nbi"))
    # the speed line leaves the compilation out: 2 prompt tokens cannot take the seconds the compile did
    m = TIMING.search(first.stderr)
    prefill_tokens, prefill_tps = int(m.group(1)), float(m.group(2))
    assert prefill_tokens / prefill_tps < float(compiled.group(2)) / 4, first.stderr
    # another entry point finds the same kernels: no compilation, no notice
    second = subprocess.run([sys.executable, "-m", "mixlocal", *args], env=env, cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=300, check=False)
    assert second.returncode == 0, second.stderr
    assert "compiling" not in second.stderr and "compiled" not in second.stderr, second.stderr
    assert second.stdout == first.stdout


def test_on_a_terminal_the_spinner_leaves_the_line_before_the_answer(tmp_path):
    pexpect = pytest.importorskip("pexpect")
    env = _fresh_cache_env(tmp_path / "cache")
    child = pexpect.spawn(sys.executable, ["-m", "mixlocal", "generate", "-p", "Hello", "-n", "6", "--temp", "0",
                                           "-t", "1"], cwd=str(REPO_ROOT), env=env, encoding="utf-8", timeout=900)
    child.expect(pexpect.EOF)
    screen = child.before
    child.close()
    assert child.exitstatus == 0, screen
    spinner, _, rest = screen.rpartition("\r\x1b[K")  # the spinner's last redraw, then the line cleared
    assert "compiling kernels for this CPU (once, about" in spinner and spinner.count("\r") > 1
    answer, compiled = rest.split("\r\n")[:2]
    assert answer.startswith("Hello") and "compiling" not in answer  # nothing drawn over the streamed text
    assert re.fullmatch(r"mixlocal: compiled \d+ kernels in [\d.]+ s; .*", compiled), rest


def test_make_run_compiles_where_the_command_does():
    """The Makefile exports a checkout-local NUMBA_CACHE_DIR for the tests only, so `make run` (whose recipe
    is the installed command) compiles into ~/.cache/mixlocal/numba like every other entry point."""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    p = subprocess.run(["make", "-s", "--no-print-directory", "--eval",
                        "mixlocal-print-cache: ; @echo \"[$$NUMBA_CACHE_DIR]\"", "mixlocal-print-cache"],
                       cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)
    if p.returncode != 0 and "No such file" in p.stderr:
        pytest.skip("make is not installed")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"


def test_kernel_cache_lives_in_the_mixlocal_cache(tmp_path):
    from mixlocal.engine.backends.numba.packed_cache import cache_dir

    from mixlocal.paths import cache_root, numba_cache_dir
    env = _fresh_cache_env(tmp_path)
    code = "import os, mixlocal; print(os.environ['NUMBA_CACHE_DIR'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(tmp_path / "numba")
    own = subprocess.run([sys.executable, "-c", code], env={**env, "NUMBA_CACHE_DIR": str(tmp_path / "mine")},
                         capture_output=True, text=True, check=True)
    assert own.stdout.strip() == str(tmp_path / "mine")  # the user's choice wins
    assert cache_dir().parent == cache_root()  # packed weights and kernels share one root
    assert numba_cache_dir() == Path(os.environ["NUMBA_CACHE_DIR"])


# ---------------------------------------------------------------------------------------------------------------------
# item 3: every classic level, in any case
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spelled", ["Q4_K_S", "q5_1", "BF16", "Q3_K_L"])
def test_quantize_takes_every_level_in_any_case(spelled, hf_model_dir, tmp_path):
    import gguf
    from mixlocal.quant.recipes import LEVELS, plan
    out = tmp_path / "out.gguf"
    r = run_cli("quantize", hf_model_dir, out, "--type", spelled)
    assert r.returncode == 0, r.stderr
    reader = gguf.GGUFReader(out)
    level = spelled.lower()
    assert int(reader.fields["general.file_type"].parts[-1][0]) == int(LEVELS[level].file_type)
    config = engine.load(out, n_ctx=64).config
    written = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}
    expected = plan(level, written, n_experts=config.n_experts, n_layers=config.n_layers)
    assert {t.name: t.tensor_type for t in reader.tensors} == expected


def test_unknown_level_is_one_usage_line_listing_the_levels():
    line = one_error_line(run_cli("quantize", "x.gguf", "y.gguf", "--type", "Q4_K_XL"), 2)
    assert "Q4_K_XL" in line and "q3_k_s" in line and "q4_moe" in line


# ---------------------------------------------------------------------------------------------------------------------
# item 5: generate through the chat template, --system, --no-display-prompt; chat from a pipe
# ---------------------------------------------------------------------------------------------------------------------

def _v1_tokens(system: str | None, user: str) -> list[int]:
    from mistral_common.protocol.instruct.messages import SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
    messages = ([SystemMessage(content=system)] if system else []) + [UserMessage(content=user)]
    return MistralTokenizer.v1().encode_chat_completion(ChatCompletionRequest(messages=messages)).tokens


@pytest.mark.parametrize("flags,system", [(["--chat"], None), (["--system", "You answer in one word."],
                                                                "You answer in one word.")])
def test_generate_chat_runs_the_prompt_through_the_template(flags, system):
    question = "What is the capital of France?"
    r = run_cli("generate", "-p", question, "-n", 12, "--temp", 0, "-t", 1, *flags)
    assert r.returncode == 0, r.stderr
    ids = _v1_tokens(system, question)  # mistral-common's Mixtral v1 encoding, the reference for the format
    assert int(TIMING.search(r.stderr).group(1)) == len(ids)
    assert not r.stdout.startswith(question)  # the answer alone, as ollama run prints it
    llm = engine.load(n_ctx=256)
    expected = llm.generate(ids, max_tokens=12, temperature=0, continuation=False).text
    assert r.stdout == expected + "\n"


def test_no_display_prompt_prints_the_continuation_only():
    args = ["generate", "-p", "Once upon a time", "-n", 10, "--temp", 0, "-t", 1]
    shown, hidden = run_cli(*args), run_cli(*args, "--no-display-prompt")
    assert shown.returncode == 0 and hidden.returncode == 0, (shown.stderr, hidden.stderr)
    assert shown.stdout.startswith("Once upon a time")
    assert hidden.stdout == shown.stdout[len("Once upon a time"):]


def test_chat_from_a_pipe_prints_answers_only():
    r = run_cli("chat", "-n", 6, "--temp", 0, "-t", 1, stdin="Hello there\nHow are you?\n")
    assert r.returncode == 0, r.stderr
    assert ">>>" not in r.stdout and "..." not in r.stdout
    assert len(re.findall(r"\[prompt \d+ tokens", r.stderr)) == 2  # both lines were answered
    assert "mixlocal chat with" not in r.stderr  # the banner is for a terminal


# ---------------------------------------------------------------------------------------------------------------------
# item 8: one metavar for the model, -t/-c, --kv-type wherever a model loads, serve's flags explained
# ---------------------------------------------------------------------------------------------------------------------

def _help(command: str) -> str:
    r = run_cli(command, "--help")
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.parametrize("command", ["generate", "chat", "info", "quantize", "bench", "serve"])
def test_help_is_consistent(command):
    text = _help(command)
    assert "MODEL" in text and "SRC" not in text
    assert "THREADS" not in text and "N_CTX" not in text and "KV_TYPE" not in text
    if command in ("generate", "chat", "bench", "serve"):
        assert "-t N, --threads N" in text
    if command in ("generate", "chat", "info", "serve"):
        assert "-c N, --n-ctx N" in text
    if command in ("generate", "chat", "info", "serve", "bench"):
        assert re.search(r"--kv-type \{f16,f32,q8_0\}\s+KV cache element type \(default f16\)", text), text
    if command == "quantize":
        assert "(default: the embedded model)" not in text


def test_serve_flags_all_have_help_and_defaults():
    text = _help("serve")
    options = re.split(r"\n  (?=-)", text.split("options:", 1)[1])
    for block in options[1:]:
        flag = block.split()[0]
        described = " ".join(block.split())
        assert len(described) > len(block.split("  ")[0]) + 5, f"{flag} has no help"
    for flag in ("--port", "--backend", "--quant", "--log-level", "--kv-type", "--host"):
        block = next(b for b in options if b.startswith(flag) or f" {flag}" in b.split("\n")[0])
        assert "default" in block, block


def test_json_convention_stdout_or_file(tmp_path):
    shown = run_cli("info", "--json")
    assert shown.returncode == 0, shown.stderr
    out = tmp_path / "info.json"
    written = run_cli("info", "--json", out)
    assert written.returncode == 0, written.stderr
    assert json.loads(out.read_text()) == json.loads(shown.stdout)
    assert "config:" in written.stdout  # with a FILE, the text report still goes to stdout
    # `info --json model.gguf` takes the model for the FILE: refused before it could write over the model
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF")
    line = one_error_line(run_cli("info", "--json", model), 2)
    assert ".json" in line and model.read_bytes() == b"GGUF"

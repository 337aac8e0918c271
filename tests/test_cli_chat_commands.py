"""`mixlocal chat`'s commands as ollama users type them: /help, /set PARAMETER VALUE, /save and /load of a
conversation, and triple-quoted multi-line messages; through a pipe (answers only on stdout) and in a terminal.

Prompt lengths are checked against mistral-common's Mixtral v1 encoding of the same messages; the stats line after
each answer reads `[prompt P tokens, C cached; N tokens ...]`."""
from __future__ import annotations

import json
import os
import re
import sys

import pytest
from test_cli import REPO_ROOT, run_cli

PROMPT = re.compile(r"\[prompt (\d+) tokens")


def v1_tokens(messages: list[dict]) -> list[int]:
    from mistral_common.protocol.instruct.messages import (
        AssistantMessage,
        SystemMessage,
        UserMessage,
    )
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    request = ChatCompletionRequest(messages=[kinds[m["role"]](content=m["content"]) for m in messages])
    return MistralTokenizer.v1().encode_chat_completion(request).tokens


def chat(*lines: str, flags=()) -> tuple[str, str]:
    r = run_cli("chat", "-n", 12, "-t", 1, *flags, stdin="".join(line + "\n" for line in lines))
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    return r.stdout, r.stderr


QUESTION = "What is the capital of France?"


def test_set_temperature_changes_the_next_answer():
    greedy = run_cli("generate", "--chat", "-p", QUESTION, "-n", 12, "--temp", 0, "-t", 1)
    assert greedy.returncode == 0, greedy.stderr
    sampled, _ = chat(QUESTION, flags=("--seed", 1))
    assert sampled != greedy.stdout  # at the default temperature this seed draws another answer
    out, err = chat("/set temperature 0", QUESTION, flags=("--seed", 1))
    assert "(set temperature to 0.0)" in err
    assert out == greedy.stdout


def test_set_checks_values_as_the_flags_do():
    out, err = chat("/set temperature -1", "/set top_p 2", "/set top_k x", "/set colour 3", "/set parameter top_k 5",
                    "/set")
    assert out == ""
    assert "cannot set temperature to -1" in err and "cannot set top_p to 2" in err and "cannot set top_k to x" in err
    assert "unknown parameter 'colour'" in err
    assert "(set top_k to 5)" in err and "top_k=5" in err  # ollama's '/set parameter' spelling too; /set shows them


def test_save_then_load_continues_the_conversation(tmp_path):
    saved = tmp_path / "conversation.json"
    chat("Hello there", "Tell me a story", f"/save {saved}", flags=("--temp", 0))
    messages = json.loads(saved.read_text())
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert [m["content"] for m in messages[::2]] == ["Hello there", "Tell me a story"]
    _, err = chat(f"/load {saved}", "And then?", flags=("--temp", 0))
    assert "(loaded 4 messages" in err
    [prompt] = PROMPT.findall(err)
    assert int(prompt) == len(v1_tokens(messages + [{"role": "user", "content": "And then?"}]))


def test_load_refuses_a_file_that_is_not_a_conversation(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"role": "wizard", "content": "hi"}]))
    out, err = chat(f"/load {bad}", f"/load {tmp_path / 'missing.json'}")
    assert "message 0 needs a role" in err and "cannot read" in err and out == ""


def test_triple_quotes_make_one_message_of_several_lines():
    _, err = chat('"""', "line one", "line two", '"""', flags=("--temp", 0))
    [prompt] = PROMPT.findall(err)
    assert int(prompt) == len(v1_tokens([{"role": "user", "content": "line one\nline two"}]))
    _, err = chat('"""line one', 'line two"""', flags=("--temp", 0))
    assert PROMPT.findall(err) == [prompt]


def test_help_and_continuation_prompt_in_a_terminal():
    pexpect = pytest.importorskip("pexpect")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    child = pexpect.spawn(sys.executable, ["-m", "mixlocal", "chat", "-n", "4", "-t", "1"], cwd=str(REPO_ROOT),
                          env=env, encoding="utf-8", timeout=120, dimensions=(40, 200))
    child.expect_exact(">>> ")
    child.sendline("/help")
    for command in ("/set PARAMETER VALUE", "/save FILE", "/load FILE", '"""'):
        child.expect_exact(command)
    child.expect_exact(">>> ")
    child.sendline('"""')
    child.expect_exact("... ")
    child.sendline("two lines")
    child.expect_exact("... ")
    child.sendline('"""')
    child.expect(r"\[prompt \d+ tokens")
    child.expect_exact(">>> ")
    child.sendline("/bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0

"""`mixlocal chat` under a pseudo-terminal, typed at as a person would: turns, history, KV reuse, /reset, Ctrl-C.

Prompt lengths are checked against mistral-common's Mixtral v1 encoding (MistralTokenizer.v1), the reference for
the chat format. Each turn's stats line reads `[prompt P tokens, C cached; N tokens at ...]`.
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

pexpect = pytest.importorskip("pexpect")

REPO_ROOT = Path(__file__).resolve().parent.parent
STATS = r"\[prompt (\d+) tokens, (\d+) cached; (\d+) tokens( at [\d.]+ tok/s|, stopped)\]"


@pytest.fixture(scope="module")
def v1_length():
    from mistral_common.protocol.instruct.messages import UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    tok = MistralTokenizer.v1()

    def length(*user_texts: str) -> int:
        request = ChatCompletionRequest(messages=[UserMessage(content=t) for t in user_texts])
        return len(tok.encode_chat_completion(request).tokens)
    return length


def _sigint_ignored():
    """What a shell does to a command it starts in the background (CI may start the suite so): SIGINT ignored,
    and Python keeps it ignored unless the program takes it back."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def spawn_chat(model_dir, *args, preexec_fn=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    child = pexpect.spawn(sys.executable, ["-m", "mixlocal.engine.cli", "chat", "-m", str(model_dir), "--threads", "1", *args],
                          cwd=str(REPO_ROOT), env=env, encoding="utf-8", timeout=120, dimensions=(40, 200),
                          preexec_fn=preexec_fn)
    child.expect_exact(">>> ")
    return child


def turn(child, text: str) -> tuple[int, int, int]:
    child.sendline(text)
    child.expect(STATS)
    stats = tuple(int(g) for g in child.match.groups()[:3])
    child.expect_exact(">>> ")
    return stats


def stopped_turn(child, text: str) -> tuple[int, int, int]:
    """Send text, press Ctrl-C once the answer streams, and return the turn's stats."""
    child.sendline(text)
    child.expect_exact(text)  # the terminal's echo of what was typed
    child.expect(r"\S{3}")      # the answer has begun
    child.sendintr()
    child.expect(STATS)
    assert child.match.group(4) == ", stopped"
    stats = tuple(int(g) for g in child.match.groups()[:3])
    child.expect_exact(">>> ")
    return stats


def test_chat_keeps_history_reuses_the_cache_and_resets(hf_model_dir, v1_length):
    child = spawn_chat(hf_model_dir, "-n", "5", "--temp", "0")
    p1, c1, n1 = turn(child, "Hello there")
    assert (p1, c1) == (v1_length("Hello there"), 0) and 1 <= n1 <= 5
    # The second prompt is the first exchange (its answer and EOS) plus the new turn; only the new part is
    # prefilled: everything the model has already read is in the cache.
    p2, c2, n2 = turn(child, "Tell me more")
    assert p2 == p1 + n1 + 1 + v1_length("Tell me more") - 1  # one BOS for the whole conversation
    assert c2 == p1 + n1
    p3, c3, _ = turn(child, "And once more")
    assert p3 == p2 + n2 + 1 + v1_length("And once more") - 1 and c3 == p2 + n2

    child.sendline("/reset")
    child.expect_exact("(conversation cleared)")
    child.expect_exact(">>> ")
    assert turn(child, "Hello there")[:2] == (v1_length("Hello there"), 0)

    child.sendline("/nonsense")
    child.expect_exact("unknown command /nonsense")
    child.expect_exact(">>> ")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_ctrl_c_stops_the_answer_not_the_program(hf_model_dir, v1_length):
    # Answers of up to 4000 tokens: only Ctrl-C can end them within the test's time.
    child = spawn_chat(hf_model_dir, "-n", "4000", "--n-ctx", "8192", "--seed", "1", preexec_fn=_sigint_ignored)
    p1, c1, n1 = stopped_turn(child, "Write a very long story")
    assert (p1, c1) == (v1_length("Write a very long story"), 0) and n1 < 4000
    # Still alive, and the stopped answer is part of the history: the model has read it, so it stays cached.
    # (Ctrl-C may land between showing a token and reading it back in: then that one token is prefilled again.)
    p2, c2, _ = stopped_turn(child, "Go on")
    assert p2 == p1 + n1 + 1 + v1_length("Go on") - 1
    assert p1 + n1 - 1 <= c2 <= p1 + n1
    child.sendintr()  # at the prompt, Ctrl-C only clears the line
    child.expect_exact(">>> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0

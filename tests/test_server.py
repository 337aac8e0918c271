"""The OpenAI-compatible server, live on loopback, with the official openai SDK as its client.

Two servers run as `python -m mixlocal.engine.server` subprocesses on 127.0.0.1 (free ports) over the tiny random Mixtral:
- `server`: --api-key, --alias tiny-alias, --max-tokens 12 (requests that set none stay short), n_ctx 512;
- `shift_server`: n_ctx 48 and --context-shift, no key, no default limit.
Answers are checked against references that are not ours: mistral-common's Mixtral v1 prompt ids, transformers'
MixtralForCausalLM (greedy tokens and log-probabilities, teacher-forced), sentencepiece's decoder.
"""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import sentencepiece
from conftest import MIXTRAL_TOKENIZER, reference_logits
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from openai import OpenAI

ROOT = Path(__file__).resolve().parents[1]
SEED_MODEL_ID = "mistralai/mixtral-8x7b-instruct"
SEED_MESSAGES = [{"role": "user", "content": "What is the meaning of life?"}]
OPENROUTER_HEADERS = {"HTTP-Referer": "https://example.org", "X-Title": "mixlocal tests"}
API_KEY = "test-key"


# ---------------------------------------------------------------------------------------------------------------------
# Live servers
# ---------------------------------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """`python -m mixlocal.engine.server` in a subprocess on 127.0.0.1; stopped (SIGINT, then kill) at the end."""

    def __init__(self, model_dir: Path, log_path: Path, *args: str):
        self.model_dir, self.log_path, self.args = model_dir, log_path, args
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self) -> LiveServer:
        for _ in range(3):   # a free port can be taken between the probe and the bind: try another
            port = _free_port()
            self.url = f"http://127.0.0.1:{port}"
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "mixlocal.engine.server", "-m", str(self.model_dir), "--host", "127.0.0.1",
                     "--port", str(port), "--log-level", "warning", *self.args],
                    cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "MIXLOCAL_API_KEY": ""})
            deadline = time.monotonic() + 180
            while self.proc.poll() is None and time.monotonic() < deadline:
                try:
                    if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                        return self
                except httpx.HTTPError:
                    time.sleep(0.2)
            self.stop()
        raise RuntimeError(f"the server did not start; its log:\n{self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()


@pytest.fixture(scope="module")
def server(hf_model_dir, tmp_path_factory):
    live = LiveServer(hf_model_dir, tmp_path_factory.mktemp("server") / "server.log", "--api-key", API_KEY,
                      "--alias", "tiny-alias", "--max-tokens", "12", "--n-ctx", "512", "--kv-type", "f32").start()
    yield live
    live.stop()


@pytest.fixture(scope="module")
def shift_server(hf_model_dir, tmp_path_factory):
    live = LiveServer(hf_model_dir, tmp_path_factory.mktemp("shift") / "server.log", "--n-ctx", "48",
                      "--context-shift", "--kv-type", "f32").start()
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model_name(hf_model_dir):
    return hf_model_dir.name   # what the server loaded: the name every response must carry


# ---------------------------------------------------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mistral_v1():
    return MistralTokenizer.v1()


@pytest.fixture(scope="module")
def spm():
    return sentencepiece.SentencePieceProcessor(model_file=str(MIXTRAL_TOKENIZER))


def mistral_ids(mistral_v1, messages) -> list[int]:
    return mistral_v1.encode_chat_completion(ChatCompletionRequest(messages=messages)).tokens


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64) - z.max()
    return z - np.log(np.exp(z).sum())


def check_greedy_against_transformers(model, prompt_ids: list[int], entries) -> list[int]:
    """Each token the server chose at temperature 0 is transformers' argmax given the same prefix (ties within the
    backends' float difference allowed), and its logprobs are transformers'. Returns the token ids."""
    ids = [e.id for e in entries]       # "id": llama.cpp's extension to OpenAI's logprob entries
    logits = reference_logits(model, prompt_ids + ids)
    for i, entry in enumerate(entries):
        row = logits[len(prompt_ids) - 1 + i]
        tol = 2e-3 * float(np.abs(row).max())
        assert row[entry.id] >= row.max() - tol, f"token {i}: {entry.id} is not the argmax {int(row.argmax())}"
        ref = log_softmax(row)
        assert abs(entry.logprob - ref[entry.id]) < tol
        top = entry.top_logprobs
        assert [t.logprob for t in top] == sorted((t.logprob for t in top), reverse=True)
        np.testing.assert_allclose([t.logprob for t in top], np.sort(ref)[::-1][:len(top)], atol=tol)
        if top:
            assert top[0].logprob == pytest.approx(entry.logprob, abs=1e-9)   # greedy: the chosen one is the best
    return ids


def sse_events(response: httpx.Response) -> list[str]:
    return [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]


# ---------------------------------------------------------------------------------------------------------------------
# The seed's request
# ---------------------------------------------------------------------------------------------------------------------

def test_seed_request(server, model_name, mistral_v1):
    client = OpenAI(base_url=server.url + "/v1", api_key=API_KEY)
    completion = client.chat.completions.create(
        model="mistralai/mixtral-8x7b-instruct",
        messages=[{"role": "user", "content": "What is the meaning of life?"}],
    )
    assert completion.object == "chat.completion"
    assert completion.model == model_name     # the id routes to the loaded model and never disguises it
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    usage = completion.usage
    assert usage.prompt_tokens == len(mistral_ids(mistral_v1, SEED_MESSAGES))
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    # the server was started with --max-tokens 12 for requests that set no limit
    assert choice.finish_reason in ("stop", "length")
    assert usage.completion_tokens == 12 if choice.finish_reason == "length" else usage.completion_tokens < 12


def test_seed_request_streaming_with_openrouter_headers(client, model_name):
    stream = client.chat.completions.create(model=SEED_MODEL_ID, messages=SEED_MESSAGES, stream=True,
                                            extra_headers=OPENROUTER_HEADERS)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.model == model_name for c in chunks)
    assert len({c.id for c in chunks}) == 1
    finishes = [c.choices[0].finish_reason for c in chunks]
    assert finishes[-1] in ("stop", "length") and not any(finishes[:-1])
    assert all(c.usage is None for c in chunks)     # usage only when stream_options asks for it
    assert "".join(c.choices[0].delta.content or "" for c in chunks)


def test_stream_framing_and_usage_chunk(server, model_name):
    body = {"model": "tiny-alias", "messages": SEED_MESSAGES, "max_tokens": 5, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    usage_chunk, final = chunks[-1], chunks[-2]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 5
    assert final["choices"][0]["finish_reason"] == "length" and final["choices"][0]["delta"] == {}
    assert all(c["usage"] is None for c in chunks[:-1])
    assert {c["model"] for c in chunks} == {model_name}


# ---------------------------------------------------------------------------------------------------------------------
# Answers against transformers
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
def test_greedy_answer_and_logprobs_match_transformers(client, hf_reference, mistral_v1, spm, stream):
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name three colours."}]
    kw = {"model": "tiny-alias", "messages": messages, "temperature": 0, "max_tokens": 6, "logprobs": True, "top_logprobs": 3}
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **kw))
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        entries = [e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    else:
        resp = client.chat.completions.create(**kw)
        text, entries = resp.choices[0].message.content, resp.choices[0].logprobs.content
    ids = check_greedy_against_transformers(hf_reference, mistral_ids(mistral_v1, messages), entries)
    assert text == spm.decode(ids)
    for e in entries:
        assert bytes(e.bytes).decode("utf-8", errors="replace") == e.token


def test_completions_continue_the_prompt(client, model_name, mistral_v1, spm, hf_reference):
    prompt_ids = mistral_ids(mistral_v1, SEED_MESSAGES)
    chat = client.chat.completions.create(model=SEED_MODEL_ID, messages=SEED_MESSAGES, temperature=0, max_tokens=6,
                                          logprobs=True)
    ids = check_greedy_against_transformers(hf_reference, prompt_ids, chat.choices[0].logprobs.content)

    done = client.completions.create(model=SEED_MODEL_ID, prompt=prompt_ids, temperature=0, max_tokens=6, logprobs=2)
    assert done.object == "text_completion" and done.model == model_name
    assert done.usage.prompt_tokens == len(prompt_ids)
    # a continuation decodes together with its prompt (keeping the space before its first word)
    assert spm.decode(prompt_ids) + done.choices[0].text == spm.decode(prompt_ids + ids)
    lp = done.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == len(ids)
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 2 and max(top.values()) == pytest.approx(chosen, abs=1e-9)

    text_prompt = "Once upon a time"
    pieces = [c.choices[0].text for c in client.completions.create(model="tiny-alias", prompt=text_prompt,
                                                                    max_tokens=4, stream=True)]
    whole = client.completions.create(model="tiny-alias", prompt=text_prompt, max_tokens=4, temperature=0)
    assert whole.usage.prompt_tokens == 1 + len(spm.encode(text_prompt))     # BOS + sentencepiece's ids
    assert "".join(pieces) and whole.choices[0].finish_reason == "length"


@pytest.mark.parametrize("ids", [[736, 403], [28705, 29340, 3614], [28705, 13, 13, 1014, 948], [918], [259, 989],
                                 [1014, 948], [13, 736]], ids=lambda ids: "-".join(map(str, ids)))
def test_completion_text_keeps_the_space_before_its_first_word(spm, ids):
    """LLM decodes a continuation with a decoder primed by the prompt (what sentencepiece's fresh decode drops
    at the start, the space before the first word, stays), checked against sentencepiece decoding both as one."""
    from mixlocal.tokenizer import Tokenizer

    tok = Tokenizer.from_file(MIXTRAL_TOKENIZER)
    prompt = tok.encode("Once upon a time", add_bos=True)
    primed = tok.detokenizer()
    for t in prompt:
        primed.feed(t)
    text = "".join(primed.feed(t) for t in ids) + primed.flush()
    whole, head = spm.decode(prompt + ids), spm.decode(prompt)
    assert whole.startswith(head) and text == whole[len(head):]


# ---------------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------------

def test_models_name_the_loaded_model(client, model_name):
    models = client.models.list()
    assert [m.id for m in models.data] == [model_name]
    assert set(models.data[0].aliases) == {"tiny-alias", SEED_MODEL_ID}
    assert client.models.retrieve(SEED_MODEL_ID).id == model_name
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    resp = client.chat.completions.create(model="tiny-alias", messages=SEED_MESSAGES, max_tokens=2)
    assert resp.model == model_name


# ---------------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------------

CHAT_ERRORS = [
    ("malformed JSON", b'{"model": "tiny-alias", "messages": [', 400, "JSON"),
    ("not an object", b"[1, 2, 3]", 400, "object"),
    ("missing model", {"messages": SEED_MESSAGES}, 400, "model"),
    ("missing messages", {"model": SEED_MODEL_ID}, 400, "messages"),
    ("empty messages", {"model": SEED_MODEL_ID, "messages": []}, 400, "messages"),
    ("message not an object", {"model": SEED_MODEL_ID, "messages": ["hi"]}, 400, "messages[0]"),
    ("wrong type", {"model": SEED_MODEL_ID, "messages": SEED_MESSAGES, "temperature": "hot"}, 400, "temperature"),
    ("negative max_tokens", {"model": SEED_MODEL_ID, "messages": SEED_MESSAGES, "max_tokens": -5}, 400, "max_tokens"),
    ("n=9", {"model": SEED_MODEL_ID, "messages": SEED_MESSAGES, "n": 9}, 400, "'n'"),
    ("top_p out of range", {"model": SEED_MODEL_ID, "messages": SEED_MESSAGES, "top_p": 1.5}, 400, "top_p"),
    ("unknown role", {"model": SEED_MODEL_ID, "messages": [{"role": "tool", "content": "x"}]}, 400, "role"),
    ("roles out of order", {"model": SEED_MODEL_ID, "messages": [{"role": "assistant", "content": "x"}]}, 400,
     "assistant"),
    ("tool_choice naming no tool", {"model": SEED_MODEL_ID, "messages": SEED_MESSAGES,
                                    "tools": [{"type": "function", "function": {"name": "f"}}],
                                    "tool_choice": {"type": "function", "function": {"name": "g"}}}, 400, "'g'"),
    ("tools and response_format", {"model": SEED_MODEL_ID, "messages": SEED_MESSAGES,
                                   "tools": [{"type": "function", "function": {"name": "f"}}],
                                   "response_format": {"type": "json_object"}}, 400, "tools"),
    ("legacy functions", {"model": SEED_MODEL_ID, "messages": SEED_MESSAGES,
                          "functions": [{"name": "f"}]}, 400, "functions"),
    ("schema that does not compile", {"model": SEED_MODEL_ID, "messages": SEED_MESSAGES, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}}, 400, "response_format"),
    ("bad regex grammar", {"model": SEED_MODEL_ID, "messages": SEED_MESSAGES, "grammar": {"regex": "(a"}}, 400,
     "grammar"),
    ("bad logit_bias", {"model": SEED_MODEL_ID, "messages": SEED_MESSAGES, "logit_bias": {"x": 1}}, 400,
     "logit_bias"),
    ("top_logprobs alone", {"model": SEED_MODEL_ID, "messages": SEED_MESSAGES, "top_logprobs": 2}, 400,
     "top_logprobs"),
    ("stream_options alone", {"model": SEED_MODEL_ID, "messages": SEED_MESSAGES,
                              "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("unknown model", {"model": "gpt-4o", "messages": SEED_MESSAGES}, 404, "gpt-4o"),
]


@pytest.mark.parametrize("name, body, status, mentions", CHAT_ERRORS, ids=[c[0] for c in CHAT_ERRORS])
def test_chat_errors_in_openai_shape(server, name, body, status, mentions):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + "/v1/chat/completions", content=content, timeout=30,
                   headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    assert r.status_code == status
    error = r.json()["error"]
    assert set(error) >= {"message", "type", "code"}
    assert mentions in error["message"]


@pytest.mark.parametrize("body, mentions", [
    ({"model": SEED_MODEL_ID}, "prompt"),
    ({"model": SEED_MODEL_ID, "prompt": "hi", "echo": True}, "echo"),
    ({"model": SEED_MODEL_ID, "prompt": "hi", "logprobs": 9}, "logprobs"),
    ({"model": SEED_MODEL_ID, "prompt": ["a", "b"]}, "prompt"),
    ({"model": SEED_MODEL_ID, "prompt": [1, 99999]}, "99999"),
])
def test_completion_errors(server, body, mentions):
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=30,
                   headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 400 and mentions in r.json()["error"]["message"]


def test_sdk_errors(client, server):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=SEED_MODEL_ID, messages=SEED_MESSAGES, max_tokens=-1)
    assert e.value.code == "invalid_value" and "max_tokens" in e.value.message
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=SEED_MODEL_ID, messages=SEED_MESSAGES, n=9)
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="mistralai/mistral-large", messages=SEED_MESSAGES)
    assert e.value.code == "model_not_found"
    wrong = OpenAI(base_url=server.url + "/v1", api_key="not-the-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model=SEED_MODEL_ID, messages=SEED_MESSAGES)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    missing = httpx.post(server.url + "/v1/chat/completions", json={"model": SEED_MODEL_ID, "messages": SEED_MESSAGES})
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/health").json()["status"] == "ok"          # health needs no key
    nowhere = httpx.get(server.url + "/v1/engines", headers={"Authorization": f"Bearer {API_KEY}"})
    assert nowhere.status_code == 404 and "error" in nowhere.json()


def test_prompt_longer_than_the_context(client):
    long = [{"role": "user", "content": "tell me more " * 200}]    # about 600 tokens, n_ctx is 512
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=SEED_MODEL_ID, messages=long, max_tokens=2)
    assert e.value.code == "context_length_exceeded"
    assert "512" in e.value.message and "context" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=SEED_MODEL_ID, prompt="tell me more " * 200, max_tokens=2)
    assert e.value.code == "context_length_exceeded"


# ---------------------------------------------------------------------------------------------------------------------
# Load: concurrency, hang-ups, the prompt cache
# ---------------------------------------------------------------------------------------------------------------------

def test_concurrent_clients_each_get_their_own_answer(server, hf_reference, mistral_v1):
    questions = ["Why is the sky blue?", "Write a haiku.", "Count to five.", "What is 2 + 2?"]
    results, errors = {}, []
    barrier = threading.Barrier(len(questions))

    def ask(i: int, question: str) -> None:
        sdk = OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
        kw = {"model": SEED_MODEL_ID, "messages": [{"role": "user", "content": question}], "temperature": 0,
                  "max_tokens": 5, "logprobs": True}
        barrier.wait()
        try:
            if i % 2:
                chunks = list(sdk.chat.completions.create(stream=True, **kw))
                results[i] = [e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
            else:
                results[i] = sdk.chat.completions.create(**kw).choices[0].logprobs.content
        except Exception as e:  # noqa: BLE001 - reported below; an assertion in a thread would be lost
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(i, q)) for i, q in enumerate(questions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and sorted(results) == list(range(len(questions)))
    for i, question in enumerate(questions):   # no answer leaked into another's cache or stream
        prompt = mistral_ids(mistral_v1, [{"role": "user", "content": question}])
        check_greedy_against_transformers(hf_reference, prompt, results[i])


def test_client_hanging_up_mid_stream_cancels_its_generation(client, server):
    before = server.health()
    stream = client.chat.completions.create(model=SEED_MODEL_ID, messages=SEED_MESSAGES, max_tokens=450,
                                            stream=True)
    seen = 0
    for chunk in stream:
        seen += bool(chunk.choices and chunk.choices[0].delta.content)
        if seen == 2:
            break
    stream.close()    # hang up, 448 tokens early

    deadline = time.monotonic() + 60    # not a timing assertion: only how long to wait before giving up
    while time.monotonic() < deadline:
        now = server.health()
        if now["cancelled"] > before["cancelled"] and not now["busy"]:
            break
        time.sleep(0.05)
    assert now["cancelled"] == before["cancelled"] + 1
    assert now["finished"] == before["finished"]       # it was stopped, not run to its end
    after = client.chat.completions.create(model=SEED_MODEL_ID, messages=SEED_MESSAGES, max_tokens=3)
    assert after.choices[0].finish_reason in ("length", "stop") and after.usage.completion_tokens <= 3


def test_prompt_cache_reuse_in_usage(client, mistral_v1):
    first = [{"role": "user", "content": "Tell me about caches."}]
    a = client.chat.completions.create(model=SEED_MODEL_ID, messages=first, temperature=0, max_tokens=3)
    n_first = len(mistral_ids(mistral_v1, first))
    assert a.usage.prompt_tokens == n_first
    again = client.chat.completions.create(model=SEED_MODEL_ID, messages=first, temperature=0, max_tokens=3)
    # all of the prompt is in the cache; its last token is run again to give the next token's logits
    assert again.usage.prompt_tokens_details.cached_tokens == n_first - 1
    longer = first + [{"role": "assistant", "content": "They keep things."}, {"role": "user", "content": "More?"}]
    b = client.chat.completions.create(model=SEED_MODEL_ID, messages=longer, temperature=0, max_tokens=3)
    n_longer = len(mistral_ids(mistral_v1, longer))
    assert b.usage.prompt_tokens == n_longer
    assert n_first <= b.usage.prompt_tokens_details.cached_tokens < n_longer


def test_bounded_load(server, model_name, tmp_path):
    spec = importlib.util.spec_from_file_location("bench_server_load", ROOT / "bench" / "bench_server_load.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.run_load(server.url + "/v1", api_key=API_KEY, clients=3, requests=2, max_tokens=4,
                            deadline_s=40)
    assert result["lost"] == [] and result["unfinished_clients"] == 0
    assert result["sent"] >= 1 and result["ok"] == result["sent"]   # every request that went out was answered
    assert result["models_seen"] == [model_name]
    assert set(result["latency_s"]) == {"p50", "p90", "p99", "max", "mean"}


# ---------------------------------------------------------------------------------------------------------------------
# Context shift and the end of the context (n_ctx 48)
# ---------------------------------------------------------------------------------------------------------------------

def test_context_shift_drops_oldest_turns_and_keeps_the_system_prompt(shift_server, mistral_v1, model_name):
    system = {"role": "system", "content": "Be brief."}
    turns = []
    for i, fruit in enumerate(["apples", "pears", "plums"]):
        turns += [{"role": "user", "content": f"Say something about {fruit}."},
                  {"role": "assistant", "content": f"{fruit.title()} grow on trees."}]
    messages = [system, *turns, {"role": "user", "content": "And cherries?"}]
    n_ctx, max_tokens = 48, 4
    full = len(mistral_ids(mistral_v1, messages))
    assert full + max_tokens > n_ctx     # the shift must really be needed
    dropped = next(k for k in range(2, len(turns) + 1, 2)
                   if len(mistral_ids(mistral_v1, [system, *turns[k:], messages[-1]])) + max_tokens <= n_ctx)
    kept = len(mistral_ids(mistral_v1, [system, *turns[dropped:], messages[-1]]))

    sdk = OpenAI(base_url=shift_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    resp = sdk.chat.completions.create(model=SEED_MODEL_ID, messages=messages, max_tokens=max_tokens)
    note = resp.context_shift
    assert note["dropped_messages"] == dropped and note["prompt_tokens_before"] == full
    assert "context shift" in note["message"]
    assert resp.usage.prompt_tokens == kept and resp.model == model_name

    raw = sdk.chat.completions.with_raw_response.create(model=SEED_MODEL_ID, messages=messages,
                                                        max_tokens=max_tokens, stream=True)
    assert raw.headers["x-context-shift"] == f"dropped {dropped} messages"
    chunks = list(raw.parse())
    assert chunks[0].context_shift["dropped_messages"] == dropped

    too_long = [system, {"role": "user", "content": "words " * 60}]
    with pytest.raises(openai.BadRequestError) as e:
        sdk.chat.completions.create(model=SEED_MODEL_ID, messages=too_long, max_tokens=max_tokens)
    assert e.value.code == "context_length_exceeded"


def test_without_max_tokens_the_answer_runs_to_the_end_of_the_context(shift_server, mistral_v1):
    sdk = OpenAI(base_url=shift_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    resp = sdk.chat.completions.create(model=SEED_MODEL_ID, messages=SEED_MESSAGES)
    assert resp.usage.prompt_tokens == len(mistral_ids(mistral_v1, SEED_MESSAGES))
    if resp.choices[0].finish_reason == "length":
        assert resp.usage.total_tokens == 48


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------

def test_serve_arguments_and_exposure_warning(tmp_path, capsys, monkeypatch):
    import argparse

    from mixlocal.engine.server import add_serve_arguments, run_serve

    monkeypatch.delenv("MIXLOCAL_API_KEY", raising=False)
    # run_serve sets a default OMP_WAIT_POLICY; keep that from leaking into the rest of the session
    monkeypatch.setenv("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args([])
    assert (args.host, args.port, args.api_key, args.alias, args.context_shift) == ("127.0.0.1", 8080, None, [],
                                                                                   False)
    args = parser.parse_args(["-m", "m", "--alias", "a", "--alias", "b", "--n-ctx", "64", "--threads", "1"])
    assert args.alias == ["a", "b"] and args.n_ctx == 64 and args.threads == 1

    missing = str(tmp_path / "no-such-model")   # load fails before anything binds, so no socket is opened
    for argv, warned in ([["--host", "0.0.0.0"], True], [["--host", "0.0.0.0", "--api-key", "k"], False],
                         [["--host", "::1"], False], [[], False]):
        with pytest.raises(ValueError):
            run_serve(parser.parse_args(["-m", missing, *argv]))
        err = capsys.readouterr().err
        assert ("warning" in err and "--api-key" in err) == warned


def test_create_app_in_process(hf_model_dir, model_name):
    """create_app is what embedders and tests use: the same routes, run here through starlette's TestClient."""
    from mixlocal.engine.server import create_app
    from starlette.testclient import TestClient

    from mixlocal import engine

    llm = engine.load(hf_model_dir, n_ctx=64)
    app = create_app(llm, api_key="k", aliases=("house-model",), context_shift=True)
    auth = {"Authorization": "Bearer k"}
    with TestClient(app) as tc:
        r = tc.post("/v1/chat/completions", headers=auth,
                    json={"model": "house-model", "messages": SEED_MESSAGES, "max_tokens": 2})
        assert r.status_code == 200 and r.json()["model"] == model_name == llm.name
        assert r.json()["usage"]["completion_tokens"] <= 2
        assert tc.post("/v1/chat/completions", json={"model": "house-model", "messages": SEED_MESSAGES}).status_code == 401
        assert tc.get("/v1/models", headers=auth).json()["data"][0]["id"] == llm.name
        assert tc.get("/health").json()["finished"] == 1


# ---------------------------------------------------------------------------------------------------------------------
# Structured output through the openai SDK
# ---------------------------------------------------------------------------------------------------------------------

VERDICT = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]},
                                            "n": {"type": "integer", "minimum": 0, "maximum": 9}},
           "required": ["answer", "n"], "additionalProperties": False}


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_response_format(client, stream):
    fmt = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": VERDICT, "strict": True}}
    kw = {"model": SEED_MODEL_ID, "messages": SEED_MESSAGES, "max_tokens": 40, "seed": 3, "response_format": fmt}
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **kw))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason][-1]
    else:
        resp = client.chat.completions.create(**kw)
        text, finish = resp.choices[0].message.content, resp.choices[0].finish_reason
    assert finish == "stop", text
    out = json.loads(text)
    assert set(out) == {"answer", "n"} and out["answer"] in ("yes", "no") and 0 <= out["n"] <= 9


def test_completions_take_response_format_and_logit_bias(client, spm):
    resp = client.completions.create(model=SEED_MODEL_ID, prompt="The verdict:", max_tokens=40, seed=1,
                                     extra_body={"response_format": {"type": "json_schema", "json_schema": {
                                         "name": "verdict", "schema": VERDICT}}})
    assert set(json.loads(resp.choices[0].text)) == {"answer", "n"}
    plain = client.completions.create(model=SEED_MODEL_ID, prompt="Once upon a time", max_tokens=1, temperature=0)
    pushed = client.completions.create(model=SEED_MODEL_ID, prompt="Once upon a time", max_tokens=1,
                                       temperature=0, logit_bias={"42": 100})
    assert pushed.choices[0].text == spm.decode([42]) != plain.choices[0].text


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}}, "required": ["city"],
                   "additionalProperties": False}}}


@pytest.mark.parametrize("stream", [False, True])
def test_tool_calls_through_the_sdk(client, stream):
    """A named tool_choice: the answer is one call with an id, the function's name and arguments that follow its
    schema; finish_reason tool_calls; streamed as delta.tool_calls, which the SDK assembles."""
    kw = {"model": SEED_MODEL_ID, "messages": [{"role": "user", "content": "Weather in Paris?"}],
          "tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
          "max_tokens": 40, "seed": 4}
    if stream:
        chunks = [c for c in client.chat.completions.create(stream=True, **kw) if c.choices]
        calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
        finish = chunks[-1].choices[0].finish_reason
        assert calls[0].index == 0
    else:
        resp = client.chat.completions.create(**kw)
        calls, finish = resp.choices[0].message.tool_calls, resp.choices[0].finish_reason
        assert resp.choices[0].message.content is None
    assert finish == "tool_calls" and len(calls) == 1
    call = calls[0]
    assert call.id.startswith("call_") and call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["city"] in ("Paris", "Oslo")

    # the result goes back as a "tool" message; the next answer may call again or answer in words
    history = kw["messages"] + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": call.id, "type": "function", "function": {
            "name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21C"}]
    again = client.chat.completions.create(model=SEED_MODEL_ID, messages=history, tools=[WEATHER_TOOL],
                                           max_tokens=30, seed=5)
    choice = again.choices[0]
    assert choice.finish_reason in ("stop", "tool_calls", "length")
    assert (choice.message.tool_calls is not None) == (choice.finish_reason == "tool_calls")


@pytest.mark.parametrize("stream", [False, True])
def test_n_choices(client, stream):
    """n > 1: every choice is a whole generation (seed + i), indexed; the prompt counts once in the usage."""
    kw = {"model": SEED_MODEL_ID, "messages": SEED_MESSAGES, "max_tokens": 8, "seed": 11, "n": 3,
          "temperature": 1.0}
    one = client.chat.completions.create(**{**kw, "n": 1})
    if stream:
        texts = {}
        usage = None
        for c in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
            for ch in c.choices:
                texts[ch.index] = texts.get(ch.index, "") + (ch.delta.content or "")
            usage = c.usage or usage
        got = [texts[i] for i in range(3)]
    else:
        resp = client.chat.completions.create(**kw)
        assert [c.index for c in resp.choices] == [0, 1, 2]
        got, usage = [c.message.content for c in resp.choices], resp.usage
    assert got[0] == one.choices[0].message.content      # choice 0 is the n=1 answer with the same seed
    assert len(set(got)) > 1                              # the others draw with other seeds
    assert usage.prompt_tokens == one.usage.prompt_tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


NESTED_SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "score": {"type": "number", "minimum": 0, "maximum": 1},
    "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3},
    "address": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]},
                                                 "zip": {"type": "integer", "minimum": 1000, "maximum": 9999}},
                "required": ["city", "zip"], "additionalProperties": False}},
    "required": ["name", "age", "score", "tags", "address"], "additionalProperties": False}


@pytest.fixture(scope="module")
def default_server(tmp_path_factory):
    """The embedded trained model, served."""
    live = LiveServer(ROOT / "engine" / "data" / "default" / "model.gguf",
                      tmp_path_factory.mktemp("default") / "server.log", "--n-ctx", "512", "--kv-type", "f32").start()
    yield live
    live.stop()


@pytest.mark.parametrize("which", ["random tiny model", "embedded model"])
def test_fifty_json_schema_samples_validate(request, which):
    """Nested objects, arrays, enums, required fields, bounded numbers: 50 seeded samples at temperature 1 parse
    and validate, on the embedded model and on a random tiny model that never writes JSON by itself."""
    import jsonschema
    live = request.getfixturevalue("server" if which == "random tiny model" else "default_server")
    c = OpenAI(base_url=live.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": NESTED_SCHEMA, "strict": True}}
    free = c.chat.completions.create(model=SEED_MODEL_ID, messages=SEED_MESSAGES, max_tokens=40, seed=0,
                                     temperature=1.0)
    with pytest.raises(json.JSONDecodeError):
        json.loads(free.choices[0].message.content)  # unconstrained, it is not JSON
    for seed in range(50):
        resp = c.chat.completions.create(model=SEED_MODEL_ID, messages=SEED_MESSAGES, max_tokens=200, seed=seed,
                                         temperature=1.0, response_format=fmt)
        assert resp.choices[0].finish_reason == "stop", (seed, resp.choices[0].message.content)
        jsonschema.validate(json.loads(resp.choices[0].message.content), NESTED_SCHEMA)


def test_tool_choice_none_never_calls_and_a_named_function_always_is(client):
    msgs = [{"role": "user", "content": "Weather in Oslo?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    for seed in range(10):
        none = client.chat.completions.create(model=SEED_MODEL_ID, messages=msgs, tools=[WEATHER_TOOL],
                                              tool_choice="none", max_tokens=12, seed=seed)
        assert none.choices[0].message.tool_calls is None and none.choices[0].finish_reason != "tool_calls"
        called = client.chat.completions.create(model=SEED_MODEL_ID, messages=msgs, tools=[WEATHER_TOOL],
                                                tool_choice=named, max_tokens=40, seed=seed)
        calls = called.choices[0].message.tool_calls
        assert called.choices[0].finish_reason == "tool_calls" and [t.function.name for t in calls] == \
            ["get_weather"]


@pytest.mark.parametrize("body, mentions", [
    ({"grammar": {"regex": "[^\\s\\S]"}}, "allows no output"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "big", "schema": {
        "type": "object", "properties": {f"p{i}": {"type": "string", "description": "x" * 40} for i in range(5000)}}}}},
     "too large"),
])
def test_impossible_or_huge_constraints_are_400s_and_the_server_stays_up(server, body, mentions):
    for stream in (False, True):
        r = httpx.post(server.url + "/v1/chat/completions", timeout=60, headers={"Authorization": f"Bearer {API_KEY}"},
                       json={"model": SEED_MODEL_ID, "messages": SEED_MESSAGES, "stream": stream, **body})
        assert r.status_code == 400 and mentions in r.json()["error"]["message"], r.text
    assert server.health()["status"] == "ok"

"""LLM: the object a user holds. eval / generate / stream / create_chat_completion over one KV cache."""
from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from mixlocal.tokenizer import StopMatcher

from .backends import KVCache
from .config import ModelConfig
from .errors import ContextOverflowError
from .sampling import Sampler, SamplingParams

if TYPE_CHECKING:
    from .constraints import Constraint

__all__ = ["LLM", "GenerationResult"]

N_BATCH = 512  # prefill chunk: bounds activation memory for long prompts, as llama.cpp's n_batch does


@dataclass
class GenerationResult:
    text: str
    tokens: list[int]
    finish_reason: str                      # "stop" or "length"
    usage: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)


@dataclass
class _Step:
    """One event of the generation loop: a text piece (possibly empty) and the token that made it."""
    text: str
    token: int | None
    logits: np.ndarray | None = None


class LLM:
    def __init__(self, config: ModelConfig, backend, tokenizer, cache: KVCache, name: str, source: str = ""):
        self.config = config
        self.backend = backend
        self.tokenizer = tokenizer
        self.cache = cache
        self.name = name
        self.source = source
        self._history: list[int] = []   # token ids whose K/V are in the cache, in order
        self.last_cached_tokens = 0

    # ------------------------------------------------------------------ context
    @property
    def n_ctx(self) -> int:
        return self.cache.n_ctx

    @property
    def n_past(self) -> int:
        return self.cache.n_past

    @property
    def history(self) -> list[int]:
        return list(self._history)

    def reset(self) -> None:
        self.cache.reset()
        self._history.clear()

    def close(self) -> None:
        """Release what the backend holds open (the expert reader of a memory budget); the LLM is unusable after."""
        close = getattr(self.backend, "close", None)
        if close is not None:
            close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_tokens(self, tokens) -> np.ndarray:
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise ValueError(f"tokens must be a 1-D sequence of ids, got shape {arr.shape}")
        if arr.size == 0:
            raise ValueError("tokens must not be empty")
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"token ids must be integers, got {arr.dtype}")
        bad = (arr < 0) | (arr >= self.config.vocab_size)
        if bad.any():
            raise ValueError(f"token id {int(arr[bad][0])} is outside the vocabulary [0, {self.config.vocab_size})")
        return arr.astype(np.int64)

    def eval(self, tokens, *, logits: str = "all") -> np.ndarray:
        """Append tokens to the context and return their logits: (T, V), or (1, V) for logits="last"."""
        if logits not in ("all", "last"):
            raise ValueError(f'logits must be "all" or "last", got {logits!r}')
        arr = self._check_tokens(tokens)
        self.cache.check_room(arr.size)
        rows = []
        for start in range(0, arr.size, N_BATCH):
            chunk = arr[start:start + N_BATCH]
            final = start + N_BATCH >= arr.size
            try:
                out = self.backend.forward(chunk, self.cache, last_only=(logits == "last"))
            except SystemError as e:
                # Ctrl-C while numba loads a kernel from its cache (a first call) surfaces as "returned a result
                # with an exception set": give the caller the KeyboardInterrupt it pressed, not an internal error.
                if isinstance(e.__cause__, KeyboardInterrupt):
                    raise KeyboardInterrupt from e
                raise
            self._history.extend(int(t) for t in chunk)
            if logits == "all" or final:
                rows.append(out)
        return rows[0] if len(rows) == 1 else np.concatenate(rows, axis=0)

    def prefill(self, prompt_ids: list[int]) -> np.ndarray:
        """Reuse the longest common prefix of prompt ids and cached ids; evaluate the rest. Returns last logits."""
        arr = self._check_tokens(prompt_ids)
        if arr.size > self.n_ctx:
            raise ContextOverflowError(f"prompt of {arr.size} tokens exceeds the context of {self.n_ctx} tokens")
        common = 0
        for a, b in zip(self._history, arr.tolist()):
            if a != b:
                break
            common += 1
        common = min(common, arr.size - 1)  # the last prompt token must run to give logits
        self.cache.trim(common)
        del self._history[common:]
        self.last_cached_tokens = common
        return self.eval(arr[common:], logits="last")[-1]

    # ------------------------------------------------------------------ generation
    def _encode_prompt(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_bos=True)
        return [int(t) for t in self._check_tokens(prompt)]

    def _steps(self, prompt_ids: list[int], params: SamplingParams, max_tokens: int,
               stop: list[str] | None, stats: dict, continuation: bool = True,
               constraint: Constraint | None = None, bias: np.ndarray | None = None) -> Iterator[_Step]:
        if not isinstance(max_tokens, int) or max_tokens < 0:
            raise ValueError(f"max_tokens must be a non-negative integer, got {max_tokens!r}")
        sampler = Sampler(params)
        t0 = time.perf_counter()
        logits = self.prefill(prompt_ids)
        t1 = time.perf_counter()
        stats.update(prompt_tokens=len(prompt_ids), cached_tokens=self.last_cached_tokens,
                     prefill_s=t1 - t0, prefilled=len(prompt_ids) - self.last_cached_tokens,
                     completion_tokens=0, decode_s=0.0, decoded=0, finish_reason="length")
        detok = self.tokenizer.detokenizer()
        if continuation:
            # The new text continues the prompt, so it decodes as one with it: a decoder that has seen the prompt
            # keeps the space before the first new word, which sentencepiece drops at the start of a decode.
            for t in prompt_ids:
                detok.feed(t)
        matcher = StopMatcher(list(stop or []))
        eos = self.tokenizer.eos_id
        for _ in range(max_tokens):
            z = logits if bias is None else logits + bias
            if constraint is not None:
                if constraint.finished:  # the output is complete: only EOS could follow
                    stats["finish_reason"] = "stop"
                    break
                z = constraint.mask(z)
            tok = sampler.sample(z, self._history)
            if tok == eos:
                stats["finish_reason"] = "stop"
                break
            if constraint is not None:
                constraint.advance(tok)
            stats["completion_tokens"] += 1
            emit, stopped = matcher.feed(detok.feed(tok))
            yield _Step(emit, tok, logits)
            if stopped:
                stats["finish_reason"] = "stop"
                return
            if self.cache.n_past >= self.n_ctx:
                break  # the context is full: finish_reason stays "length"
            t = time.perf_counter()
            logits = self.eval([tok], logits="last")[-1]
            stats["decode_s"] += time.perf_counter() - t
            stats["decoded"] += 1
        if constraint is not None:
            stats["mask_s"], stats["masks"] = constraint.mask_s, constraint.masks
        tail, _ = matcher.feed(detok.flush())
        tail += matcher.flush()
        if tail:
            yield _Step(tail, None)

    @staticmethod
    def _summaries(stats: dict) -> tuple[dict, dict]:
        usage = {"prompt_tokens": stats["prompt_tokens"], "completion_tokens": stats["completion_tokens"],
                 "total_tokens": stats["prompt_tokens"] + stats["completion_tokens"],
                 "prompt_tokens_details": {"cached_tokens": stats["cached_tokens"]}}
        timings = {"prefill_s": stats["prefill_s"], "prefill_tokens": stats["prefilled"],
                   "prefill_tps": stats["prefilled"] / stats["prefill_s"] if stats["prefill_s"] > 0 else 0.0,
                   "decode_s": stats["decode_s"], "decode_tokens": stats["decoded"],
                   "decode_tps": stats["decoded"] / stats["decode_s"] if stats["decode_s"] > 0 else 0.0}
        if stats.get("masks"):
            timings["grammar_mask_ms_per_token"] = 1000 * stats["mask_s"] / stats["masks"]
        return usage, timings

    def stream_steps(self, prompt, *, max_tokens: int = 256, stop: list[str] | str | None = None,
                     continuation: bool = True, response_format: dict | None = None, grammar=None,
                     logit_bias: dict | None = None, **sampling) -> Iterator[_Step]:
        """Every step of a generation: `.text` (possibly empty), `.token` (None for the final flush of held-back
        text) and `.logits`, the raw logits the token was drawn from, valid only until the next step. For callers
        that need per-token data (the server's logprobs). Returns the GenerationResult.

        sampling: SamplingParams fields by name (temperature, top_k, top_p, min_p, repeat_penalty, ...); None keeps
        the default. continuation=True means the text continues the prompt and keeps the space before its first
        word; chat answers pass False.

        response_format (OpenAI's: {"type": "json_object"} or {"type": "json_schema", "json_schema": {"name",
        "schema"}}) or grammar (a Lark string, {"lark": ...} or {"regex": ...}) constrains the output token by token
        (engine/constraints.py); the timings then carry grammar_mask_ms_per_token. logit_bias: {token id: bias in
        [-100, 100]} added to the logits before every draw, as OpenAI's."""
        params = SamplingParams().with_(**sampling)
        from .constraints import Constraint, grammar_for
        spec = grammar_for(response_format, grammar)
        constraint = Constraint(self.tokenizer, spec, self.config.vocab_size) if spec is not None else None
        bias = _bias_vector(logit_bias, self.config.vocab_size)
        stats: dict = {}
        pieces, tokens = [], []
        for step in self._steps(self._encode_prompt(prompt), params, max_tokens, _stops(stop), stats, continuation,
                                constraint, bias):
            if step.token is not None:
                tokens.append(step.token)
            pieces.append(step.text)
            yield step
        usage, timings = self._summaries(stats)
        return GenerationResult("".join(pieces), tokens, stats["finish_reason"], usage, timings)

    def stream(self, prompt, *, max_tokens: int = 256, stop: list[str] | str | None = None,
               continuation: bool = True, **sampling) -> Iterator[str]:
        """Yield text pieces as they are made. The generator's return value is the GenerationResult. sampling:
        SamplingParams fields by name, and response_format, grammar, logit_bias, as for stream_steps."""
        steps = self.stream_steps(prompt, max_tokens=max_tokens, stop=stop, continuation=continuation, **sampling)
        while True:
            try:
                step = next(steps)
            except StopIteration as done:
                return done.value
            if step.text:
                yield step.text

    def generate(self, prompt, *, max_tokens: int = 256, stop: list[str] | str | None = None,
                 continuation: bool = True, **sampling) -> GenerationResult:
        """Generate up to max_tokens after prompt (text or token ids); temperature=0 is greedy. sampling:
        SamplingParams fields by name, and response_format, grammar, logit_bias, as for stream_steps."""
        steps = self.stream(prompt, max_tokens=max_tokens, stop=stop, continuation=continuation, **sampling)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value

    def create_chat_completion(self, messages: list[dict], *, max_tokens: int = 256, stream: bool = False,
                               tools: list[dict] | None = None, tool_choice=None, parallel_tool_calls=None,
                               **sampling):
        """OpenAI-shaped chat completion, in the server's shapes (engine/server/responses.py): a dict, or with
        stream=True an iterator of chunk dicts whose last one carries the usage.

        tools / tool_choice / parallel_tool_calls: OpenAI's; answers come back as message.tool_calls with
        finish_reason "tool_calls", and "tool" messages in `messages` carry the results back (engine/tools.py says
        how they are written into the Mixtral prompt). sampling also takes response_format, grammar, logit_bias."""
        # Imported here: only this method needs the server's package
        from .server.responses import ResponseShape
        from .tools import answer_schema, render_messages, tool_spec

        spec = tool_spec(tools, tool_choice, parallel_tool_calls)
        if spec.active:
            if sampling.get("response_format") is not None or sampling.get("grammar") is not None:
                raise ValueError("tools cannot be combined with response_format or grammar")
            sampling["response_format"] = {"type": "json_schema", "json_schema": {
                "name": "tool_answer", "schema": answer_schema(spec)}}
        prompt_ids = self.tokenizer.encode_chat(render_messages(messages, spec))
        shape = ResponseShape("chat", self.name, self.tokenizer)
        if stream:
            return self._chat_chunks(prompt_ids, max_tokens, sampling, shape, spec.active)
        res = self.generate(prompt_ids, max_tokens=max_tokens, continuation=False, **sampling)
        text, calls, finish = res.text, None, res.finish_reason
        if spec.active:
            text, calls, finish = _parse_tool_answer(text, finish)
        return shape.complete(text, finish, res.usage, res.timings, None, calls)

    def _chat_chunks(self, prompt_ids, max_tokens, sampling, shape, tools_active: bool = False):
        yield shape.chunk(None, first=True)
        gen = self.stream(prompt_ids, max_tokens=max_tokens, continuation=False, **sampling)
        held = []  # a tool answer is known once it is whole
        while True:
            try:
                piece = next(gen)
            except StopIteration as done:
                res: GenerationResult = done.value
                break
            if tools_active:
                held.append(piece)
            else:
                yield shape.chunk(piece)
        finish = res.finish_reason
        if tools_active:
            content, calls, finish = _parse_tool_answer("".join(held), finish)
            if calls:
                yield shape.chunk(None, tool_calls=calls)
            elif content:
                yield shape.chunk(content)
        yield {**shape.chunk(None, finish_reason=finish), "usage": res.usage}


def _parse_tool_answer(text: str, finish_reason: str):
    from .tools import parse_answer
    return parse_answer(text, finish_reason)


def _bias_vector(logit_bias, n: int) -> np.ndarray | None:
    """OpenAI's logit_bias ({token id (int or its string): bias in [-100, 100]}) as a vector over the vocabulary."""
    if not logit_bias:
        return None
    if not isinstance(logit_bias, dict):
        raise ValueError("logit_bias must map token ids to numbers")  # noqa: TRY004 (bad input: a ValueError)
    bias = np.zeros(n, np.float32)
    for key, value in logit_bias.items():
        try:
            tok = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"logit_bias key {key!r} is not a token id") from None
        if not 0 <= tok < n:
            raise ValueError(f"logit_bias token id {tok} is outside the vocabulary of {n}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise ValueError(f"logit_bias value for token {tok} must be a number in [-100, 100], got {value!r}")
        bias[tok] = value
    return bias


def _stops(stop) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if not all(isinstance(s, str) for s in stop):
        raise ValueError("stop must be a string or a list of strings")
    return [s for s in stop if s]

"""OpenAI request bodies, checked: every field the server reads is validated here, before any model call.

A value the server cannot honour (n above 8, the legacy `functions`, audio ...) is a 400 that names the field,
never silently ignored. Fields this server does not know at all (`user`, `metadata`, OpenRouter's
`provider` or `transforms` ...) are ignored, as llama.cpp's server ignores them, so that clients written for
hosted APIs keep working.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ..sampling import SamplingParams, sampling_fields
from ..tools import ToolError, ToolSpec, answer_schema, render_messages, tool_spec

__all__ = [
    "APIError",
    "ChatRequest",
    "CompletionRequest",
    "GenerationRequest",
    "parse_chat_request",
    "parse_completion_request",
    "parse_json_body",
]

MAX_TOP_LOGPROBS = 20          # OpenAI's limit for chat; the legacy completions API allows 5
MAX_COMPLETION_LOGPROBS = 5


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


# ---------------------------------------------------------------------------------------------------------------------
# The parsed requests
# ---------------------------------------------------------------------------------------------------------------------

@dataclass
class GenerationRequest:
    """What both endpoints share: the model id, sampling, limits, streaming and logprobs."""
    model: str
    max_tokens: int | None = None           # None: until EOS or the end of the context
    sampling: SamplingParams = field(default_factory=lambda: api_sampling({}))
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    top_logprobs: int | None = None         # None: no logprobs; 0..N: logprobs with that many alternatives
    structure: dict = field(default_factory=dict)  # response_format / grammar / logit_bias, for LLM.stream_steps
    n: int = 1                              # choices: generated one after another, the prompt evaluated once

    def sampling_kwargs(self) -> dict:
        return {**self.sampling.as_kwargs(), "stop": self.stop, **self.structure}


@dataclass
class ChatRequest(GenerationRequest):
    messages: list[dict] = field(default_factory=list)   # as the Mixtral prompt takes them (engine/tools.py)
    tools: ToolSpec = field(default_factory=lambda: ToolSpec([], None))


@dataclass
class CompletionRequest(GenerationRequest):
    prompt: str | list[int] = ""


# ---------------------------------------------------------------------------------------------------------------------
# Field readers: each returns the default for an absent or null field and raises a 400 naming the field otherwise
# ---------------------------------------------------------------------------------------------------------------------

def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(body: dict, name: str, default: float, lo: float, hi: float, *, lo_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise bad_request(f"'{name}' must be a number, got {json.dumps(value)}", name, "invalid_type")
    value = float(value)
    if not (lo < value if lo_open else lo <= value) or value > hi:
        interval = f"({lo:g}, {hi:g}]" if lo_open else f"[{lo:g}, {hi:g}]"
        raise bad_request(f"'{name}' must be in {interval}, got {value:g}", name)
    return value


def _integer(body: dict, name: str, default: int | None, lo: int, hi: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if not _is_int(value):
        raise bad_request(f"'{name}' must be an integer, got {json.dumps(value)}", name, "invalid_type")
    if value < lo or (hi is not None and value > hi):
        bound = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        raise bad_request(f"'{name}' must be {bound}, got {value}", name)
    return value


def _boolean(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(f"'{name}' must be true or false, got {json.dumps(value)}", name, "invalid_type")
    return value


def _unsupported(body: dict, name: str, allowed: Any, why: str) -> None:
    """A feature this server does not implement: only its neutral value (or absence) passes."""
    value = body.get(name)
    if value is None or value == allowed or (allowed == () and value in ([], {}, "")):
        return
    raise bad_request(f"'{name}' is not supported by this server: {why}", name, "unsupported_parameter")


def parse_json_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad_request(f"the request body is not valid JSON: {e}", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(body).__name__}", None,
                          "invalid_json")
    return body


def _common(body: dict) -> dict:
    """Fields shared by chat and completions, as keyword arguments of GenerationRequest."""
    model = body.get("model")
    if model is None:
        raise bad_request("'model' is required", "model", "missing_required_parameter")
    if not isinstance(model, str) or not model:
        raise bad_request(f"'model' must be a non-empty string, got {json.dumps(model)}", "model", "invalid_type")


    # max_completion_tokens is the newer name for max_tokens in OpenAI's chat API
    limit_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    kw = {
        "model": model,
        "n": _integer(body, "n", 1, 1, MAX_CHOICES),
        "max_tokens": _integer(body, limit_name, None, 1),
        "sampling": api_sampling(body),
        "stop": _stop(body),
        "stream": _boolean(body, "stream", False),
    }

    kw["structure"] = _structure(body)
    options = body.get("stream_options")
    if options is not None:
        if not kw["stream"]:
            raise bad_request("'stream_options' is only allowed when 'stream' is true", "stream_options")
        if not isinstance(options, dict):
            raise bad_request("'stream_options' must be an object", "stream_options", "invalid_type")
        kw["include_usage"] = _boolean(options, "include_usage", False)

    return kw


def _check_compiles(fmt, param: str, grammar=None) -> str | None:
    """The llguidance grammar for a response_format or grammar, or a 400 naming `param` if it cannot compile."""
    from llguidance import LLMatcher

    from ..constraints import ConstraintError, grammar_for
    try:
        spec = grammar_for(fmt, grammar)
        if spec is not None:
            error = LLMatcher.validate_grammar(spec)
            if error:
                raise ConstraintError(f"cannot compile the grammar: {error}")
    except ConstraintError as e:
        raise bad_request(f"'{param}': {e}", param) from None
    return spec


MAX_CHOICES = 8  # n: each choice is a whole generation on the one worker


def _structure(body: dict) -> dict:
    """response_format (OpenAI's), grammar (a Lark string, or {"lark"} / {"regex"}) and logit_bias, checked here
    so that a schema or grammar that cannot be compiled is a 400 naming the problem, not a failed generation."""
    out = {}
    fmt, grammar = body.get("response_format"), body.get("grammar")
    param = "grammar" if grammar is not None else "response_format"
    spec = _check_compiles(fmt, param, grammar)
    if spec is not None:
        out["response_format" if grammar is None else "grammar"] = fmt if grammar is None else grammar
    bias = body.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, dict):
            raise bad_request("'logit_bias' must map token ids to numbers", "logit_bias", "invalid_type")
        for key, value in bias.items():
            if not (isinstance(key, str) and key.isdigit()) or isinstance(value, bool) \
                    or not isinstance(value, (int, float)) or not -100 <= value <= 100:
                raise bad_request(f"'logit_bias' maps token ids to numbers in [-100, 100]; got {key!r}: "
                                  f"{json.dumps(value)}", "logit_bias")
        if bias:
            out["logit_bias"] = {int(k): float(v) for k, v in bias.items()}
    return out


def api_sampling(body: dict) -> SamplingParams:
    """The request's SamplingParams: every field of it is a request field of the same name, read with OpenAI's
    default and range where they differ from ours (sampling.py says which); the seed may be -1 for random."""
    kw = {}
    for f in sampling_fields():
        values = f.metadata["api_values"]
        if isinstance(f.default, int):
            kw[f.name] = _integer(body, f.name, f.metadata["api_default"], int(values.lo) + values.lo_open,
                                  None if values.hi is None else int(values.hi))
        else:
            kw[f.name] = _number(body, f.name, f.metadata["api_default"], values.lo,
                                 float("inf") if values.hi is None else values.hi, lo_open=values.lo_open)
    seed = body.get("seed")
    if seed is not None:
        if not _is_int(seed) or seed < -1:
            raise bad_request(f"'seed' must be a non-negative integer (or -1 for random), got {json.dumps(seed)}",
                              "seed", "invalid_type" if not _is_int(seed) else "invalid_value")
        kw["seed"] = None if seed == -1 else seed
    try:  # the sampler's own checks, so that a bad value is a 400 and not a failure mid-stream
        return SamplingParams(**kw)
    except ValueError as e:
        raise bad_request(str(e)) from None


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise bad_request("'stop' must be a string or a list of strings", "stop", "invalid_type")
    return [s for s in stop if s]   # OpenAI ignores empty stop strings; matching one would end every answer at once


# ---------------------------------------------------------------------------------------------------------------------
# Endpoints
# ---------------------------------------------------------------------------------------------------------------------

def parse_chat_request(body: dict) -> ChatRequest:
    kw = _common(body)
    messages = body.get("messages")
    if messages is None:
        raise bad_request("'messages' is required", "messages", "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list of messages", "messages", "invalid_type")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise bad_request(f"messages[{i}] must be an object with a string 'role'", f"messages[{i}]",
                              "invalid_type")
        if message["role"] == "developer":   # OpenAI's newer name for the system role
            message = {**message, "role": "system"}
        checked.append(message)

    _unsupported(body, "functions", (), "use 'tools', which replaced it")
    _unsupported(body, "function_call", "none", "use 'tool_choice', which replaced it")
    try:
        tools = tool_spec(body.get("tools"), body.get("tool_choice"), body.get("parallel_tool_calls"))
    except ToolError as e:
        raise bad_request(str(e), "tools") from None
    if tools.active:
        if kw["structure"].get("response_format") is not None or "grammar" in kw["structure"]:
            raise bad_request("'tools' cannot be combined with 'response_format' or 'grammar': tool answers are "
                              "constrained to their own JSON shape", "tools")
        kw["structure"]["response_format"] = {"type": "json_schema", "json_schema": {
            "name": "tool_answer", "schema": answer_schema(tools)}}
        _check_compiles(kw["structure"]["response_format"], "tools")
    try:
        checked = render_messages(checked, tools)
    except ToolError as e:
        raise bad_request(str(e), "messages") from None
    _unsupported(body, "modalities", ["text"], "text output only")
    _unsupported(body, "audio", (), "text output only")

    logprobs = _boolean(body, "logprobs", False)
    top = _integer(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS)
    if top is not None and not logprobs:
        raise bad_request("'top_logprobs' requires 'logprobs' to be true", "top_logprobs")
    if logprobs:
        kw["top_logprobs"] = top or 0
    return ChatRequest(messages=checked, tools=tools, **kw)


def parse_completion_request(body: dict) -> CompletionRequest:
    kw = _common(body)
    if "prompt" not in body or body["prompt"] is None:
        raise bad_request("'prompt' is required", "prompt", "missing_required_parameter")
    prompt = body["prompt"]
    # OpenAI accepts a string, a list of strings, a list of token ids, or a list of lists; one prompt per request here
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, list):
        if not prompt or not all(_is_int(t) for t in prompt):
            raise bad_request("'prompt' must be a string, or a non-empty list of token ids; several prompts in one "
                              "request are not supported", "prompt", "invalid_type")
    elif not isinstance(prompt, str):
        raise bad_request(f"'prompt' must be a string or a list of token ids, got {json.dumps(prompt)[:80]}",
                          "prompt", "invalid_type")
    _unsupported(body, "echo", False, "the prompt is not repeated in the answer")
    _unsupported(body, "suffix", "", "no fill-in-the-middle")
    _unsupported(body, "best_of", 1, "one candidate per request")
    kw["top_logprobs"] = _integer(body, "logprobs", None, 0, MAX_COMPLETION_LOGPROBS)
    return CompletionRequest(prompt=prompt, **kw)

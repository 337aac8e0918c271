"""OpenAI response bodies: chat completions and their chunks, text completions and theirs, logprobs, SSE framing.

`model` is always the name of the model that is really loaded, whatever id the request used to reach it.
"""
from __future__ import annotations

import json
import re
import time
import uuid

from .worker import TokenLogprob

__all__ = ["SSE_DONE", "ResponseShape", "sse", "token_text"]

SSE_DONE = "data: [DONE]\n\n"
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def token_text(tokenizer, token_id: int) -> tuple[str, list[int]]:
    """A token as OpenAI's logprobs show it: its text (sentencepiece's "▁" as a space) and its UTF-8 bytes. A
    byte-fallback token is one raw byte, which on its own may not be valid UTF-8."""
    piece = tokenizer.id_to_piece(token_id)
    match = _BYTE_PIECE.fullmatch(piece)
    if match and not tokenizer.is_control(token_id):
        raw = bytes([int(match.group(1), 16)])
    else:
        raw = piece.replace("\u2581", " ").encode("utf-8")
    return raw.decode("utf-8", errors="replace"), list(raw)


class ResponseShape:
    """Builds the bodies of one response: one id and one creation time for all its chunks."""

    def __init__(self, kind: str, model: str, tokenizer, extra: dict | None = None):
        assert kind in ("chat", "completion")
        self.kind = kind
        self.model = model
        self.tokenizer = tokenizer
        self.extra = extra or {}        # non-standard top-level fields, e.g. a context-shift note
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self._text_offset = 0           # legacy completions logprobs: where the next token's text begins

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    # ------------------------------------------------------------------ logprobs
    def _chat_logprob(self, lp: TokenLogprob) -> dict:
        def entry(token_id: int, logprob: float) -> dict:
            text, raw = token_text(self.tokenizer, token_id)
            return {"token": text, "logprob": logprob, "bytes": raw, "id": token_id}
        return {**entry(lp.token, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}

    def logprobs(self, entries: list[TokenLogprob] | None) -> dict | None:
        if entries is None:
            return None
        if self.kind == "chat":
            return {"content": [self._chat_logprob(lp) for lp in entries], "refusal": None}
        tokens, offsets = [], []
        for lp in entries:
            text, _ = token_text(self.tokenizer, lp.token)
            tokens.append(text)
            offsets.append(self._text_offset)
            self._text_offset += len(text)
        return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in entries],
                "top_logprobs": [{token_text(self.tokenizer, t)[0]: v for t, v in lp.top} for lp in entries],
                "text_offset": offsets}

    # ------------------------------------------------------------------ whole responses
    def complete(self, text: str | None, finish_reason: str, usage: dict, timings: dict,
                 entries: list[TokenLogprob] | None, tool_calls: list[dict] | None = None) -> dict:
        logprobs = self.logprobs(entries)
        if self.kind == "chat":
            message = {"role": "assistant", "content": text, "refusal": None}
            if tool_calls:
                message["tool_calls"] = tool_calls
            choice = {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}
            body = self._head("chat.completion")
        else:
            choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
            body = self._head("text_completion")
        return {**body, "choices": [choice], "usage": usage, "timings": timings, **self.extra}

    # ------------------------------------------------------------------ streaming
    def chunk(self, text: str | None, *, first: bool = False, finish_reason: str | None = None,
              entries: list[TokenLogprob] | None = None, include_usage: bool = False,
              tool_calls: list[dict] | None = None, index: int = 0) -> dict:
        """One streamed chunk. For chat, `first` makes the opening chunk that carries the assistant role; tool_calls
        makes one that carries whole calls (delta.tool_calls, each with its index, as the openai SDK assembles)."""
        if self.kind == "chat":
            delta: dict = {}
            if first:
                delta = {"role": "assistant", "content": ""}
            elif tool_calls:
                delta = {"tool_calls": [{"index": i, **c} for i, c in enumerate(tool_calls)]}
            elif text is not None:
                delta = {"content": text}
            choice = {"index": index, "delta": delta, "logprobs": self.logprobs(entries),
                      "finish_reason": finish_reason}
            body = self._head("chat.completion.chunk")
        else:
            choice = {"index": index, "text": text or "", "logprobs": self.logprobs(entries),
                      "finish_reason": finish_reason}
            body = self._head("text_completion")
        body["choices"] = [choice]
        if include_usage:
            body["usage"] = None       # OpenAI: null on every chunk but the last, which carries the usage
        if first or finish_reason is not None:
            body.update(self.extra)
        return body

    def usage_chunk(self, usage: dict) -> dict:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {**self._head(obj), "choices": [], "usage": usage}

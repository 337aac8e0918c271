"""Prompts for the server: token ids for a request, checked against the context, and context shift.

A prompt that does not leave room in the context for an answer is a 400 by default. With context shift on, the
oldest turns of a conversation are dropped (a user message together with the assistant reply that follows it)
until the prompt leaves room for the answer; system messages are always kept. llama.cpp's server does the same
with its context shift, though it cuts tokens rather than whole turns; whole turns keep the chat format valid.
"""
from __future__ import annotations

from dataclasses import dataclass

from .requests import APIError

__all__ = ["Prompt", "answer_room", "chat_prompt", "completion_prompt"]

DEFAULT_ANSWER_ROOM = 512    # context kept free for an answer when shifting and the request gave no max_tokens


@dataclass
class Prompt:
    ids: list[int]
    dropped_messages: int = 0            # context shift: how many of the oldest messages were left out
    tokens_before_shift: int | None = None

    def shift_note(self, n_ctx: int) -> dict | None:
        """What the response says about a context shift (None when nothing was dropped)."""
        if not self.dropped_messages:
            return None
        return {"dropped_messages": self.dropped_messages, "prompt_tokens_before": self.tokens_before_shift,
                "prompt_tokens_after": len(self.ids), "n_ctx": n_ctx,
                "message": f"context shift: the conversation ({self.tokens_before_shift} tokens) did not leave room "
                           f"for an answer in the context of {n_ctx} tokens, so its {self.dropped_messages} oldest "
                           f"non-system messages were left out; the system prompt was kept"}


def answer_room(max_tokens: int | None, n_ctx: int) -> int:
    """Room to keep for the answer when shifting: max_tokens, but never more than half the context, so that an
    optimistic max_tokens does not throw the whole history away."""
    return min(max_tokens if max_tokens is not None else DEFAULT_ANSWER_ROOM, n_ctx // 2)


def overflow(n_prompt: int, n_ctx: int, *, shift_hint: bool) -> APIError:
    hint = ("shorten it, or start the server with a larger --n-ctx" +
            (" or with --context-shift to drop the oldest turns" if shift_hint else ""))
    return APIError(400, f"the prompt is {n_prompt} tokens, which leaves no room for an answer in this server's "
                         f"context of {n_ctx} tokens (prompt and answer together); {hint}",
                    code="context_length_exceeded", param="messages" if shift_hint else "prompt")


def _encode_chat(tokenizer, messages: list[dict]) -> list[int]:
    try:
        return tokenizer.encode_chat(messages)
    except ValueError as e:
        raise APIError(400, f"messages: {e}", param="messages", code="invalid_value") from None


def chat_prompt(tokenizer, messages: list[dict], n_ctx: int, *, max_tokens: int | None,
                context_shift: bool) -> Prompt:
    ids = _encode_chat(tokenizer, messages)
    if not context_shift:
        if len(ids) >= n_ctx:
            raise overflow(len(ids), n_ctx, shift_hint=True)
        return Prompt(ids)
    room = answer_room(max_tokens, n_ctx)
    if len(ids) + room <= n_ctx:
        return Prompt(ids)

    # Turns are dropped two messages at a time from the front, so that what remains still starts with a user
    # message; the last user message (and an assistant prefix after it) always stays.
    turn_at = [i for i, m in enumerate(messages) if m.get("role") != "system"]
    keep_last = 2 if turn_at and messages[turn_at[-1]].get("role") == "assistant" else 1
    droppable = max(0, (len(turn_at) - keep_last) // 2)    # whole (user, assistant) pairs

    def without(pairs: int) -> list[dict]:
        gone = set(turn_at[:2 * pairs])
        return [m for i, m in enumerate(messages) if i not in gone]

    def first_fit(limit: int) -> tuple[int, list[int]] | None:
        # Fewer tokens with every pair dropped: binary search for the fewest pairs that fit.
        lo, hi, best = 1, droppable, None
        while lo <= hi:
            mid = (lo + hi) // 2
            cand = _encode_chat(tokenizer, without(mid))
            if len(cand) <= limit:
                best, hi = (mid, cand), mid - 1
            else:
                lo = mid + 1
        return best

    found = first_fit(n_ctx - room)
    if found is None and len(ids) >= n_ctx:
        found = first_fit(n_ctx - 1)        # no room for a full answer anywhere: settle for a prompt that fits
    if found is None:
        if len(ids) < n_ctx:
            return Prompt(ids)              # nothing to drop, but it fits: answer in what room there is
        smallest = len(_encode_chat(tokenizer, without(droppable))) if droppable else len(ids)
        raise APIError(400, f"the prompt is {len(ids)} tokens and even with context shift (keeping the system "
                            f"prompt and the last user message: {smallest} tokens) it leaves no room for an "
                            f"answer in this server's context of {n_ctx} tokens; start the server with a larger "
                            f"--n-ctx", code="context_length_exceeded", param="messages")
    pairs, shifted = found
    return Prompt(shifted, dropped_messages=2 * pairs, tokens_before_shift=len(ids))


def completion_prompt(tokenizer, prompt: str | list[int], n_ctx: int) -> Prompt:
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt, add_bos=True)
    else:
        bad = [t for t in prompt if not 0 <= t < tokenizer.vocab_size]
        if bad:
            raise APIError(400, f"prompt: token id {bad[0]} is outside the vocabulary [0, {tokenizer.vocab_size})",
                           param="prompt", code="invalid_value")
        ids = list(prompt)
    if len(ids) >= n_ctx:
        raise overflow(len(ids), n_ctx, shift_hint=False)
    return Prompt(ids)

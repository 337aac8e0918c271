"""Structured output: before each draw, the tokens that cannot continue a valid output are masked out.

The grammar side is llguidance (the engine llama.cpp, vLLM and SGLang use; JSON schema, regex and Lark): it keeps
the parse state and, for a state, computes the set of allowed tokens over our sentencepiece vocabulary, byte-fallback
pieces included. Here: what a request may ask for (OpenAI's response_format, a Lark or regex grammar, a tool-call
shape), compiled into one llguidance grammar; and a Constraint the generation loop asks for a mask before each draw
and tells each drawn token. A grammar that cannot be compiled is a ConstraintError (a ValueError) naming the problem.
"""
from __future__ import annotations

import json
import time
import weakref
from typing import Any

import numpy as np

__all__ = ["Constraint", "ConstraintError", "grammar_for", "lltokenizer"]


class ConstraintError(ValueError):
    """A response_format, grammar or tool list that cannot be turned into a constraint."""


# A schema or grammar larger than this is refused before llguidance compiles it: compiling is superlinear in the
# worst case, and a request must not be able to hold the server's one worker for long
MAX_GRAMMAR_BYTES = 256 << 10


_LLTOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _Wrapped:
    """What llguidance's TokenizerWrapper reads: the bytes of every token and a tokenize function."""

    def __init__(self, tok):
        self.tokens = tok.token_bytes()
        self.eos_token_id = tok.eos_id
        self.bos_token_id = tok.bos_id if tok.bos_id >= 0 else None
        self.special_token_ids = [i for i, b in enumerate(self.tokens) if b.startswith(b"\xff")]
        self._tok = tok
        self._lead = tok.encode("\n", add_bos=False)

    def __call__(self, text):
        """The tokens of text where it stands in the middle of an output: sentencepiece puts a space ("▁") before
        text at the start, so the text is encoded after a newline (a byte piece no merge crosses) and that prefix
        is cut off again."""
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        ids = self._tok.encode("\n" + text, add_bos=False)
        if ids[:len(self._lead)] == self._lead:
            return ids[len(self._lead):]
        return self._tok.encode(text, add_bos=False)


def lltokenizer(tok):
    """llguidance's view of a Tokenizer (built once per tokenizer: ~0.5 s for 32000 pieces)."""
    ll = _LLTOKENIZERS.get(tok)
    if ll is None:
        import llguidance
        ll = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Wrapped(tok)))
        _LLTOKENIZERS[tok] = ll
    return ll


def grammar_for(response_format: Any = None, grammar: Any = None) -> str | None:
    """The llguidance grammar a request asks for, or None (free text).

    response_format: OpenAI's {"type": "text"}, {"type": "json_object"} (any JSON object) or {"type": "json_schema",
    "json_schema": {"name", "schema", "strict"}}. grammar: a Lark grammar as a string, or {"lark": ...} /
    {"regex": ...}. At most one of the two."""
    from llguidance import LLMatcher
    size = len(json.dumps(response_format if grammar is None else grammar, default=str))
    if size > MAX_GRAMMAR_BYTES:
        raise ConstraintError(f"the {'grammar' if grammar is not None else 'schema'} is too large ({size} bytes; "
                              f"at most {MAX_GRAMMAR_BYTES})")
    if response_format is not None and grammar is not None:
        raise ConstraintError("give response_format or grammar, not both")
    if grammar is not None:
        if isinstance(grammar, str):
            return LLMatcher.grammar_from_lark(grammar)
        if isinstance(grammar, dict) and len(grammar) == 1 and "lark" in grammar and isinstance(grammar["lark"], str):
            return LLMatcher.grammar_from_lark(grammar["lark"])
        if isinstance(grammar, dict) and len(grammar) == 1 and "regex" in grammar \
                and isinstance(grammar["regex"], str):
            return LLMatcher.grammar_from_regex(grammar["regex"])
        raise ConstraintError("grammar must be a Lark grammar string, or {'lark': ...} or {'regex': ...}")
    if response_format is None:
        return None
    if not isinstance(response_format, dict) or not isinstance(response_format.get("type"), str):
        raise ConstraintError("response_format must be an object with a 'type'")
    kind = response_format["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return _json_grammar({"type": "object"})
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise ConstraintError("response_format json_schema needs {'name': ..., 'schema': {...}}")
        return _json_grammar(spec.get("schema", {}))
    raise ConstraintError(f"response_format type {kind!r} is not one of text, json_object, json_schema")


def _json_grammar(schema: dict) -> str:
    """JSON for the schema, laid out as json.dumps does (", " and ": ", no other whitespace): with free whitespace
    a model can pad an answer with newlines until max_tokens and never close it."""
    from llguidance import LLMatcher
    options = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
    try:
        return LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=options)
    except (ValueError, TypeError) as e:
        raise ConstraintError(f"cannot read the JSON schema: {e}") from None


class Constraint:
    """One generation's parse state: mask(logits) before a draw, advance(token) after it."""

    def __init__(self, tok, grammar: str, n_logits: int):
        from llguidance import LLMatcher
        from llguidance.numpy import allocate_token_bitmask
        ll = lltokenizer(tok)
        ok, messages = LLMatcher.validate_grammar_with_warnings(grammar, ll)
        if ok is True:  # is_error
            raise ConstraintError(f"cannot compile the grammar: {messages[0] if messages else 'invalid'}")
        self.matcher = LLMatcher(ll, grammar)
        if self.matcher.is_error():
            raise ConstraintError(f"cannot compile the grammar: {self.matcher.get_error()}")
        self.n_vocab = ll.vocab_size
        self.n_logits = n_logits
        self.bits = allocate_token_bitmask(1, self.n_vocab)
        self.mask_s = 0.0  # time spent computing masks, to compare with the decode step
        self.masks = 0
        self.mask(np.zeros(n_logits, np.float32))  # a grammar that allows nothing fails here, before any work
        self.mask_s, self.masks = 0.0, 0

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """logits with every token the grammar does not allow next set to -inf (a new array)."""
        from llguidance.numpy import fill_next_token_bitmask
        t0 = time.perf_counter()
        fill_next_token_bitmask(self.matcher, self.bits, 0)
        allowed = np.unpackbits(self.bits[0].view(np.uint8), bitorder="little")[:self.n_vocab].astype(bool)
        out = np.full(self.n_logits, -np.inf, dtype=np.float32)
        n = min(self.n_vocab, self.n_logits)
        if self.matcher.is_error() or not allowed[:n].any():  # llguidance: an empty language is an error state
            raise ConstraintError("the grammar allows no output here" if self.masks == 0 else
                                  "the grammar allows no continuation of the output so far")
        out[:n] = np.where(allowed[:n], logits[:n], -np.inf)
        self.mask_s += time.perf_counter() - t0
        self.masks += 1
        return out

    def advance(self, token: int) -> None:
        if not self.matcher.consume_token(int(token)):
            raise ConstraintError(f"token {token} does not continue the grammar: {self.matcher.get_error()}")

    @property
    def finished(self) -> bool:
        """The output is complete: only EOS may follow."""
        return self.matcher.is_stopped()

    @property
    def accepting(self) -> bool:
        return self.matcher.is_accepting()

"""Chat prompts: Mixtral Instruct v1, and Jinja chat templates from GGUF files.

Mixtral Instruct v1 is `<s>[INST] user [/INST] answer</s>[INST] next [/INST]` where <s> and </s> are the BOS and
EOS ids and "[INST]" is plain text. Each user turn and each answer is encoded on its own (so each gets
sentencepiece's dummy-prefix space), as mistral-common does; concatenating the text and encoding it once would
give different ids.

A template taken from a downloaded file is untrusted input, so it runs in jinja2's immutable sandbox. Its output
is tokenized with control-token strings ("<s>", "</s>") mapped to their ids, as llama.cpp does, but the same
strings inside message text stay plain text: they are swapped for private-use characters before rendering and
swapped back afterwards.
"""
from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

from .errors import TokenizerError

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

__all__ = ["encode_mixtral_v1", "encode_with_template", "guess_chat_format", "render_template", "split_specials"]

_PART_JOIN = "\n\n"   # mistral-common joins the text parts of one message, and the system messages, with this


# ---------------------------------------------------------------------------------------------------------------------
# Mixtral Instruct v1
# ---------------------------------------------------------------------------------------------------------------------

def _field(message: Any, name: str, index: int) -> Any:
    if isinstance(message, Mapping):
        return message.get(name)
    if hasattr(message, name):
        return getattr(message, name)
    raise TokenizerError(f"message {index} must be a mapping with 'role' and 'content', got "
                         f"{type(message).__name__}")


def _text_content(content: Any, index: int, role: str) -> str:
    """A message's text: a str, or OpenAI-style parts [{"type": "text", "text": ...}] joined by a blank line."""
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, Mapping) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise TokenizerError(f"message {index} ({role}): content part of type {kind!r} is not supported; "
                                     f"the Mixtral v1 format takes text only")
        return _PART_JOIN.join(texts)
    if content is None:
        raise TokenizerError(f"message {index} ({role}) has no content")
    raise TokenizerError(f"message {index} ({role}): content must be a str or a list of text parts, got "
                         f"{type(content).__name__}")


def encode_mixtral_v1(tokenizer: Tokenizer, messages: list[Any]) -> list[int]:
    """Mixtral Instruct v1 prompt ids, identical to mistral-common's `MistralTokenizer.v1()`.

    System messages (anywhere but right after an assistant message) are joined by a blank line and put before the
    first user message, followed by a blank line. The other messages must alternate user, assistant, user, ... A final assistant message is
    rejected, as mistral-common rejects it, unless it carries `"prefix": True`: then its text is the start of the
    answer, with no EOS, for the model to continue.
    """
    if isinstance(messages, (str, bytes)) or not hasattr(messages, "__iter__"):
        raise TokenizerError(f"messages must be a list of messages, got {type(messages).__name__}")
    messages = list(messages)
    if not messages:
        raise TokenizerError("the conversation is empty: give at least one user message")

    system_parts: list[str] = []
    turns: list[tuple[int, str, str, bool]] = []   # (message index, role, text, prefix)
    previous_role = None
    for index, message in enumerate(messages):
        role = _field(message, "role", index)
        if role == "system" and previous_role == "assistant":
            raise TokenizerError(f"message {index}: a system message cannot follow an assistant message "
                                 f"(mistral-common rejects it too); put system messages before the answers")
        previous_role = role
        if role == "system":
            text = _text_content(_field(message, "content", index), index, role)
            if text:  # mistral-common skips empty system messages
                system_parts.append(text)
        elif role in ("user", "assistant"):
            if role == "assistant" and _field(message, "tool_calls", index):
                raise TokenizerError(f"message {index} (assistant) has tool calls, which the Mixtral v1 format "
                                     f"cannot express")
            text = _text_content(_field(message, "content", index), index, role)
            turns.append((index, role, text, bool(_field(message, "prefix", index))))
        else:
            raise TokenizerError(f"message {index}: role {role!r} is not supported by the Mixtral v1 format "
                                 f"(system, user and assistant only)")

    if not turns:
        # mistral-common: a conversation of system messages alone becomes one empty user turn
        turns = [(len(messages), "user", "", False)]
    for position, (index, role, _, prefix) in enumerate(turns):
        expected = "user" if position % 2 == 0 else "assistant"
        if role != expected:
            raise TokenizerError(f"message {index} is from the {role} where a {expected} message was expected: "
                                 f"apart from system messages, roles must alternate user, assistant, user, ...")
        if prefix and (role != "assistant" or position != len(turns) - 1):
            raise TokenizerError(f"message {index}: only the last message, from the assistant, can be a prefix")
    last_index, last_role, _, last_prefix = turns[-1]
    if last_role == "assistant" and not last_prefix:
        raise TokenizerError(f"message {last_index}: the conversation ends with an assistant message; end with a "
                             f"user message, or set \"prefix\": True on it to have the model continue it")

    system_prompt = _PART_JOIN.join(system_parts)
    ids = [tokenizer.bos_id]
    for position, (index, role, text, prefix) in enumerate(turns):
        if role == "user":
            if position == 0 and system_prompt:
                text = system_prompt + _PART_JOIN + text
            ids += tokenizer.encode(f"[INST] {text} [/INST]", add_bos=False)
        else:
            if not text:
                raise TokenizerError(f"message {index} (assistant) has empty content")
            ids += tokenizer.encode(text, add_bos=False)
            if not prefix:
                ids.append(tokenizer.eos_id)
    return ids


# ---------------------------------------------------------------------------------------------------------------------
# Jinja templates
# ---------------------------------------------------------------------------------------------------------------------

class TemplateRaisedError(TokenizerError):
    """The chat template itself rejected the conversation (its `raise_exception`)."""


def _raise_exception(message: str) -> None:
    raise TemplateRaisedError(f"chat template: {message}")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    # jinja's own tojson escapes HTML characters, which chat templates do not expect
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # the options HF transformers uses, so templates written for it render the same here
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except TemplateError as exc:
        raise TokenizerError(f"chat template does not compile: {exc}") from None


def render_template(template: str, messages: list[Any], **context: Any) -> str:
    """Render a chat template in the sandbox; template errors become TokenizerError."""
    from jinja2 import TemplateError

    compiled = _compile(template)
    try:
        return compiled.render(messages=messages, **context)
    except TemplateError as exc:
        raise TokenizerError(f"chat template failed: {type(exc).__name__}: {exc}") from None


def split_specials(text: str, specials: Mapping[str, int]) -> Iterator[tuple[bool, str]]:
    """Yield (is_special, part) over `text`, splitting out the special strings, longest first."""
    pattern = _special_pattern(tuple(sorted(specials, key=len, reverse=True)))
    pos = 0
    for match in pattern.finditer(text):
        if match.start() > pos:
            yield False, text[pos:match.start()]
        yield True, match.group()
        pos = match.end()
    if pos < len(text):
        yield False, text[pos:]


@functools.lru_cache(maxsize=8)
def _special_pattern(specials: tuple[str, ...]) -> re.Pattern:
    if not specials:
        return re.compile(r"(?!)")
    return re.compile("|".join(re.escape(s) for s in specials))


def _all_strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from _all_strings(k)
            yield from _all_strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _all_strings(v)


def _replace_strings(value: Any, table: Mapping[str, str], pattern: re.Pattern) -> Any:
    if isinstance(value, str):
        return pattern.sub(lambda m: table[m.group()], value)
    if isinstance(value, Mapping):
        return {k: _replace_strings(v, table, pattern) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_replace_strings(v, table, pattern) for v in value]
    return value


def _private_characters(count: int, avoid: set[str]) -> list[str]:
    """`count` private-use characters that appear nowhere in the inputs."""
    out = []
    for start, stop in ((0xE000, 0xF900), (0xF0000, 0xFFFFE), (0x100000, 0x10FFFE)):
        for code in range(start, stop):
            if chr(code) not in avoid:
                out.append(chr(code))
                if len(out) == count:
                    return out
    raise TokenizerError("the messages use every private-use character; cannot protect special strings")


def encode_with_template(tokenizer: Tokenizer, template: str, messages: list[Any], *,
                         add_generation_prompt: bool = True, **extra: Any) -> list[int]:
    if isinstance(messages, (str, bytes)) or not hasattr(messages, "__iter__"):
        raise TokenizerError(f"messages must be a list of messages, got {type(messages).__name__}")
    messages = [dict(m) if isinstance(m, Mapping) else {"role": _field(m, "role", i), "content": _field(m, "content", i)}
                for i, m in enumerate(messages)]
    if not messages:
        raise TokenizerError("the conversation is empty: give at least one user message")

    # Hide special strings in the messages behind private-use characters, so only the template can make specials.
    specials = tokenizer._special_ids
    used = set("".join(_all_strings(messages)) + template + "".join(_all_strings(extra)))
    present = [s for s in specials if any(s in text for text in _all_strings(messages))]
    hidden: dict[str, str] = {}
    if present:
        present.sort(key=len, reverse=True)
        hidden = dict(zip(present, _private_characters(len(present), used)))
        messages = _replace_strings(messages, hidden, _special_pattern(tuple(present)))

    pieces = tokenizer._piece_texts
    token = (lambda i: pieces[i] if 0 <= i < len(pieces) else "")
    rendered = render_template(template, messages, bos_token=token(tokenizer.bos_id),
                               eos_token=token(tokenizer.eos_id), unk_token=token(tokenizer.unk_id),
                               add_generation_prompt=add_generation_prompt, **extra)

    ids: list[int] = []
    restore = {c: s for s, c in hidden.items()}
    restore_pattern = _special_pattern(tuple(restore)) if restore else None
    for is_special, part in split_specials(rendered, specials):
        if is_special:
            ids.append(specials[part])
        elif part:
            if restore_pattern is not None:
                part = restore_pattern.sub(lambda m: restore[m.group()], part)
            ids.extend(tokenizer.encode(part, add_bos=False))

    # llama.cpp drops a BOS the template wrote and adds one when the model asks for it: one BOS either way
    if tokenizer.add_bos_token and tokenizer.bos_id >= 0 and (not ids or ids[0] != tokenizer.bos_id):
        ids.insert(0, tokenizer.bos_id)
    return ids


def guess_chat_format(template: str | None, special_ids: Mapping[str, int]) -> str:
    """"mixtral" when there is no template or it is Mistral's [INST] format over a vocabulary where "[INST]" is
    plain text (Mixtral 8x7B, Mistral 7B v0.1/v0.2); otherwise "template". Callers that know better set
    `Tokenizer.default_chat_format`."""
    if template is None:
        return "mixtral"
    if "[INST]" in template and "[INST]" not in special_ids and "<<SYS>>" not in template:
        return "mixtral"
    return "template"

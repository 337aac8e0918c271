"""A sentencepiece model to and from GGUF's tokenizer metadata.

llama.cpp's converter stores a sentencepiece vocabulary as `tokenizer.ggml.model = "llama"` plus three parallel
arrays (tokens, scores, token_type) and the special ids. That is everything sentencepiece's BPE encoder needs: it
merges the adjacent pair whose merged piece has the highest score, falls back to byte pieces for characters outside
the vocabulary, and never matches control pieces in text. The normalizer settings that GGUF does not store are
llama.cpp's assumptions for this vocabulary type: no Unicode normalization, whitespace escaped as "▁", a dummy
prefix space unless `tokenizer.ggml.add_space_prefix` says otherwise, and runs of spaces kept.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import TokenizerError
from .model_proto import ModelSpec, ModelType, Piece, PieceType, build_model_proto

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

__all__ = ["GGUFVocab", "fields_from_tokenizer", "read_tokenizer_fields", "vocab_from_fields", "write_fields"]

MODEL = "tokenizer.ggml.model"
TOKENS = "tokenizer.ggml.tokens"
SCORES = "tokenizer.ggml.scores"
TOKEN_TYPE = "tokenizer.ggml.token_type"
BOS_ID = "tokenizer.ggml.bos_token_id"
EOS_ID = "tokenizer.ggml.eos_token_id"
UNK_ID = "tokenizer.ggml.unknown_token_id"
PAD_ID = "tokenizer.ggml.padding_token_id"
ADD_BOS = "tokenizer.ggml.add_bos_token"
ADD_EOS = "tokenizer.ggml.add_eos_token"
ADD_SPACE_PREFIX = "tokenizer.ggml.add_space_prefix"
REMOVE_EXTRA_WS = "tokenizer.ggml.remove_extra_whitespaces"
PRECOMPILED_CHARSMAP = "tokenizer.ggml.precompiled_charsmap"
CHAT_TEMPLATE = "tokenizer.chat_template"

# llama.cpp's defaults for a "llama" vocabulary when a key is absent
_DEFAULT_IDS = {BOS_ID: 1, EOS_ID: 2, UNK_ID: 0}


@dataclass
class GGUFVocab:
    model_proto: bytes
    spec: ModelSpec
    bos_id: int
    eos_id: int
    unk_id: int
    pad_id: int
    add_bos_token: bool
    add_eos_token: bool
    chat_template: str | None


def read_tokenizer_fields(source: str | os.PathLike | Any) -> dict[str, Any]:
    """The `tokenizer.*` metadata of a GGUF file (a path or an open `gguf.GGUFReader`) as plain python values."""
    if isinstance(source, (str, os.PathLike)):
        from gguf import GGUFReader

        path = os.fspath(source)
        try:
            reader = GGUFReader(path, "r")
        except FileNotFoundError as exc:
            raise TokenizerError(f"{path}: no such GGUF file") from exc
        except (ValueError, OSError) as exc:
            raise TokenizerError(f"{path}: not a readable GGUF file: {exc}") from exc
    else:
        reader = source
        if not hasattr(reader, "fields"):
            raise TokenizerError(f"expected a GGUF path, a gguf.GGUFReader or a dict of fields, got "
                                 f"{type(source).__name__}")
    fields: dict[str, Any] = {}
    for name, field in reader.fields.items():
        if not name.startswith("tokenizer."):
            continue
        try:
            value = field.contents()
        except UnicodeDecodeError as exc:
            raise TokenizerError(f"GGUF field {name} holds a string that is not valid UTF-8") from exc
        if name == PRECOMPILED_CHARSMAP:
            value = bytes(value)
        fields[name] = value
    return fields


def _int(fields: Mapping[str, Any], key: str, source: str, size: int, default: int | None) -> int | None:
    value = fields.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            value = int(value)
        except (TypeError, ValueError):
            raise TokenizerError(f"{source}: {key} must be an integer, got {value!r}") from None
    if not 0 <= value < size:
        raise TokenizerError(f"{source}: {key} = {value} is outside the vocabulary of {size} tokens")
    return value


def _bool(fields: Mapping[str, Any], key: str, default: bool) -> bool:
    return bool(fields.get(key, default))


def vocab_from_fields(fields: Mapping[str, Any], source: str = "<GGUF metadata>") -> GGUFVocab:
    """Rebuild the sentencepiece ModelProto that the GGUF tokenizer metadata describes."""
    model = fields.get(MODEL)
    if model is None:
        raise TokenizerError(f"{source}: no {MODEL} key, so this GGUF carries no tokenizer")
    if model != "llama":
        raise TokenizerError(f"{source}: {MODEL} is {model!r}; only sentencepiece vocabularies ('llama'), "
                             f"such as Mixtral's, are supported")
    tokens = fields.get(TOKENS)
    if tokens is None:
        raise TokenizerError(f"{source}: no {TOKENS} key")
    tokens = list(tokens)
    size = len(tokens)
    if size == 0:
        raise TokenizerError(f"{source}: {TOKENS} is empty")
    scores = list(fields.get(SCORES, [0.0] * size))
    types = list(fields.get(TOKEN_TYPE, [int(PieceType.NORMAL)] * size))
    for key, values in ((SCORES, scores), (TOKEN_TYPE, types)):
        if len(values) != size:
            raise TokenizerError(f"{source}: {key} has {len(values)} entries but {TOKENS} has {size}")

    pieces = []
    for i, (text, score, kind) in enumerate(zip(tokens, scores, types)):
        if not isinstance(text, str) or not text:
            raise TokenizerError(f"{source}: token {i} is {text!r}; sentencepiece needs a non-empty string")
        try:
            kind = PieceType(int(kind))
        except ValueError:
            raise TokenizerError(f"{source}: token {i} ({text!r}) has unknown token type {kind!r}") from None
        pieces.append(Piece(text, float(score), kind))

    bos = _int(fields, BOS_ID, source, size, _DEFAULT_IDS[BOS_ID])
    eos = _int(fields, EOS_ID, source, size, _DEFAULT_IDS[EOS_ID])
    unk = _int(fields, UNK_ID, source, size, _DEFAULT_IDS[UNK_ID])
    pad = _int(fields, PAD_ID, source, size, None)
    if not any(p.type == PieceType.UNKNOWN for p in pieces):
        # sentencepiece insists on an unknown piece; llama.cpp does not, so old converters may not mark one
        pieces[unk] = Piece(pieces[unk].text, pieces[unk].score, PieceType.UNKNOWN)

    spec = ModelSpec(
        pieces=pieces,
        model_type=ModelType.BPE,
        byte_fallback=any(p.type == PieceType.BYTE for p in pieces),
        unk_piece=tokens[unk],
        bos_piece=tokens[bos],
        eos_piece=tokens[eos],
        # a name absent from the vocabulary, so sentencepiece reports no padding unless GGUF names one
        pad_piece=tokens[pad] if pad is not None else "<pad>" if "<pad>" not in set(tokens) else "\u2400pad\u2400",
        add_dummy_prefix=_bool(fields, ADD_SPACE_PREFIX, True),
        remove_extra_whitespaces=_bool(fields, REMOVE_EXTRA_WS, False),
        escape_whitespaces=True,
        precompiled_charsmap=bytes(fields.get(PRECOMPILED_CHARSMAP, b"")),
        ids={"unk": unk, "bos": bos, "eos": eos, "pad": -1 if pad is None else pad},
    )
    template = fields.get(CHAT_TEMPLATE)
    if template is not None and not isinstance(template, str):
        raise TokenizerError(f"{source}: {CHAT_TEMPLATE} must be a string, got {type(template).__name__}")
    return GGUFVocab(
        model_proto=build_model_proto(spec),
        spec=spec,
        bos_id=bos, eos_id=eos, unk_id=unk, pad_id=-1 if pad is None else pad,
        add_bos_token=_bool(fields, ADD_BOS, True),
        add_eos_token=_bool(fields, ADD_EOS, False),
        chat_template=template,
    )


def fields_from_tokenizer(tokenizer: Tokenizer) -> dict[str, Any]:
    """The GGUF tokenizer metadata for `tokenizer`: what llama.cpp's converter writes for a sentencepiece model."""
    spec = tokenizer._spec
    if spec.model_type != ModelType.BPE:
        raise TokenizerError(f"{tokenizer.source}: a {spec.model_type.name} sentencepiece model cannot be stored as "
                             f"GGUF's 'llama' vocabulary, which is BPE")
    if spec.treat_whitespace_as_suffix or not spec.escape_whitespaces:
        raise TokenizerError(f"{tokenizer.source}: GGUF's 'llama' vocabulary cannot express this model's "
                             f"whitespace handling")
    fields: dict[str, Any] = {
        MODEL: "llama",
        TOKENS: [p.text for p in spec.pieces],
        SCORES: [float(p.score) for p in spec.pieces],
        TOKEN_TYPE: [int(p.type) for p in spec.pieces],
    }
    for key, value in ((BOS_ID, tokenizer.bos_id), (EOS_ID, tokenizer.eos_id),
                       (UNK_ID, tokenizer.unk_id), (PAD_ID, tokenizer.pad_id)):
        if value >= 0:
            fields[key] = int(value)
    fields[ADD_BOS] = tokenizer.add_bos_token
    fields[ADD_EOS] = tokenizer.add_eos_token
    fields[ADD_SPACE_PREFIX] = spec.add_dummy_prefix
    fields[REMOVE_EXTRA_WS] = spec.remove_extra_whitespaces
    if spec.precompiled_charsmap:
        fields[PRECOMPILED_CHARSMAP] = bytes(spec.precompiled_charsmap)
    if tokenizer.chat_template is not None:
        fields[CHAT_TEMPLATE] = tokenizer.chat_template
    return fields


def write_fields(writer, fields: Mapping[str, Any]) -> None:
    """Add tokenizer metadata to a `gguf.GGUFWriter` with the value types llama.cpp reads."""
    setters = {
        MODEL: writer.add_tokenizer_model,
        TOKENS: writer.add_token_list,
        SCORES: writer.add_token_scores,
        TOKEN_TYPE: writer.add_token_types,
        BOS_ID: writer.add_bos_token_id,
        EOS_ID: writer.add_eos_token_id,
        UNK_ID: writer.add_unk_token_id,
        PAD_ID: writer.add_pad_token_id,
        ADD_BOS: writer.add_add_bos_token,
        ADD_EOS: writer.add_add_eos_token,
        ADD_SPACE_PREFIX: writer.add_add_space_prefix,
        REMOVE_EXTRA_WS: writer.add_remove_extra_whitespaces,
        PRECOMPILED_CHARSMAP: writer.add_precompiled_charsmap,
        CHAT_TEMPLATE: writer.add_chat_template,
    }
    for key, value in fields.items():
        if key not in setters:
            raise TokenizerError(f"no GGUF writer method for tokenizer key {key!r}")
        setters[key](value)

"""Tokenizer: Mixtral's sentencepiece model, from a tokenizer.model file or rebuilt from GGUF metadata.

Encoding and decoding are sentencepiece's own (the library runs the model), so ids and text are exactly the
reference's. This class adds what sentencepiece does not have: loading from GGUF, the chat formats, streaming
decode and the metadata a GGUF writer needs.
"""
from __future__ import annotations

import operator
import os
from collections.abc import Iterable, Mapping
from typing import Any

import sentencepiece

from . import chat, gguf_vocab
from .errors import TokenizerError
from .model_proto import ModelSpec, PieceType, parse_model_proto
from .streaming import Detokenizer

__all__ = ["Tokenizer"]

CHAT_FORMATS = ("mixtral", "template")


class Tokenizer:
    """A sentencepiece tokenizer with Mixtral Instruct's chat format.

    Build one with `from_file`, `from_gguf` or `from_gguf_fields`. `encode` and `decode` give exactly
    sentencepiece's ids and text; `encode_chat` gives exactly mistral-common's v1 chat encoding.
    """

    def __init__(
        self,
        model_proto: bytes,
        *,
        source: str = "<sentencepiece model>",
        bos_id: int | None = None,
        eos_id: int | None = None,
        unk_id: int | None = None,
        pad_id: int | None = None,
        add_bos_token: bool = True,
        add_eos_token: bool = False,
        chat_template: str | None = None,
        _spec: ModelSpec | None = None,
    ) -> None:
        self.source = source
        # `_spec` lets a caller that just built `model_proto` from a spec skip parsing it again
        self._spec: ModelSpec = _spec if _spec is not None else parse_model_proto(model_proto)
        if self._spec.has_denormalizer:
            raise TokenizerError(f"{source}: the model has denormalization rules, which this tokenizer does not "
                                 f"support (streaming decode could not reproduce them)")
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
        except (RuntimeError, OSError) as exc:
            raise TokenizerError(f"{source}: sentencepiece cannot load the model: {exc}") from exc
        n = self._sp.get_piece_size()
        if n != len(self._spec.pieces):
            raise TokenizerError(f"{source}: sentencepiece loaded {n} pieces but the model lists "
                                 f"{len(self._spec.pieces)}")

        self._piece_types = [p.type for p in self._spec.pieces]
        # text of each piece as decode writes it (before the "▁" -> " " step), and the byte of each byte piece
        self._piece_texts = [p.text for p in self._spec.pieces]
        self._piece_bytes = [_byte_value(p.text, i, source) if p.type == PieceType.BYTE else -1
                             for i, p in enumerate(self._spec.pieces)]

        def pick(given: int | None, from_sp: int, name: str) -> int:
            value = from_sp if given is None else given
            if value != -1 and not 0 <= value < n:
                raise TokenizerError(f"{source}: {name} id {value} is outside the vocabulary (size {n})")
            return value

        self._bos_id = pick(bos_id, self._sp.bos_id(), "BOS")
        self._eos_id = pick(eos_id, self._sp.eos_id(), "EOS")
        self._unk_id = pick(unk_id, self._sp.unk_id(), "unknown-token")
        self._pad_id = pick(pad_id, self._sp.pad_id(), "padding")
        self.add_bos_token = bool(add_bos_token)
        self.add_eos_token = bool(add_eos_token)
        self.chat_template = chat_template
        # Strings that the template path maps to single ids, as llama.cpp does: control and unknown pieces.
        self._special_ids = {p.text: i for i, p in enumerate(self._spec.pieces)
                             if p.type in (PieceType.CONTROL, PieceType.UNKNOWN)}
        self.default_chat_format = chat.guess_chat_format(chat_template, self._special_ids)

    # -----------------------------------------------------------------------------------------------------------------
    # construction
    # -----------------------------------------------------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | os.PathLike, *, chat_template: str | None = None) -> Tokenizer:
        """Load a sentencepiece `tokenizer.model` (as found in HF and MLX model directories)."""
        path = os.fspath(path)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise TokenizerError(f"{path}: cannot read the tokenizer model: {exc}") from exc
        return cls(data, source=path, chat_template=chat_template)

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> Tokenizer:
        """Rebuild the sentencepiece model from a GGUF file's metadata; vocab-only GGUF files work too."""
        path = os.fspath(path)
        return cls.from_gguf_fields(gguf_vocab.read_tokenizer_fields(path), source=path)

    @classmethod
    def from_gguf_fields(cls, fields: Mapping[str, Any] | Any, *, source: str = "<GGUF metadata>") -> Tokenizer:
        """Same as `from_gguf`, from metadata already read: a dict of GGUF keys to plain python values
        (`"tokenizer.ggml.tokens"`: list[str], ...), or an open `gguf.GGUFReader`."""
        if not isinstance(fields, Mapping):
            fields = gguf_vocab.read_tokenizer_fields(fields)
        vocab = gguf_vocab.vocab_from_fields(fields, source)
        return cls(vocab.model_proto, source=source, bos_id=vocab.bos_id, eos_id=vocab.eos_id,
                   unk_id=vocab.unk_id, pad_id=vocab.pad_id, add_bos_token=vocab.add_bos_token,
                   add_eos_token=vocab.add_eos_token, chat_template=vocab.chat_template, _spec=vocab.spec)

    # -----------------------------------------------------------------------------------------------------------------
    # vocabulary
    # -----------------------------------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self._piece_types)

    @property
    def bos_id(self) -> int:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def unk_id(self) -> int:
        return self._unk_id

    @property
    def pad_id(self) -> int:
        """-1 when the model has no padding token (Mixtral has none)."""
        return self._pad_id

    def id_to_piece(self, token_id: int) -> str:
        return self._piece_texts[self._check_id(token_id)]

    def piece_to_id(self, piece: str) -> int | None:
        token_id = self._sp.piece_to_id(piece)
        return token_id if self._piece_texts[token_id] == piece else None

    def token_bytes(self) -> list[bytes]:
        """The bytes each id stands for in decoded text, as a grammar engine matches them: "▁" is a space, a byte
        piece its byte; control and unknown pieces are 0xFF followed by their text (llguidance's mark for tokens
        that never appear in text)."""
        out = []
        for text, kind, byte in zip(self._piece_texts, self._piece_types, self._piece_bytes):
            if kind == PieceType.BYTE:
                out.append(bytes([byte]))
            elif kind in (PieceType.CONTROL, PieceType.UNKNOWN):
                out.append(b"\xff" + text.encode("utf-8"))
            else:
                out.append(text.replace("\u2581", " ").encode("utf-8"))
        return out

    def is_control(self, token_id: int) -> bool:
        return self._piece_types[self._check_id(token_id)] == PieceType.CONTROL

    def _check_id(self, token_id: Any) -> int:
        try:
            value = operator.index(token_id)
        except TypeError:
            raise TokenizerError(f"token ids must be integers, got {type(token_id).__name__}: {token_id!r}") from None
        if not 0 <= value < len(self._piece_types):
            raise TokenizerError(f"token id {value} is out of range for a vocabulary of {len(self._piece_types)}")
        return value

    # -----------------------------------------------------------------------------------------------------------------
    # text
    # -----------------------------------------------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """sentencepiece's ids for `text`, after BOS if `add_bos`. Strings such as "<s>" or "[INST]" in the text
        are plain text here, never special ids."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode takes a str, got {type(text).__name__}")
        _check_encodable(text)
        ids = self._sp.encode(text)
        if add_bos:
            if self._bos_id < 0:
                raise TokenizerError(f"{self.source}: the model has no BOS token; call encode with add_bos=False")
            ids.insert(0, self._bos_id)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """sentencepiece's text for `ids`; control tokens such as BOS and EOS decode to nothing."""
        if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
            raise TokenizerError(f"decode takes a sequence of token ids, got {type(ids).__name__}")
        checked = [self._check_id(i) for i in ids]
        return self._sp.decode(checked)

    def detokenizer(self) -> Detokenizer:
        """An incremental decoder whose pieces join to `decode(ids)` for every split of the ids."""
        return Detokenizer(self)

    def encode_chat(self, messages: list[Mapping[str, Any]], chat_format: str | None = None, *,
                    add_generation_prompt: bool = True, **template_kwargs: Any) -> list[int]:
        """Prompt ids for an OpenAI-style message list.

        chat_format "mixtral" (the default for Mixtral) is Mixtral Instruct v1, identical to mistral-common's
        `MistralTokenizer.v1().encode_chat_completion`; "template" renders the model's Jinja chat template in a
        sandbox. `add_generation_prompt` and `template_kwargs` only matter to templates.
        """
        chat_format = chat_format or self.default_chat_format
        if chat_format == "mixtral":
            return chat.encode_mixtral_v1(self, messages)
        if chat_format == "template":
            if self.chat_template is None:
                raise TokenizerError(f"{self.source}: no chat template (tokenizer.chat_template) to render; "
                                     f"use chat_format='mixtral'")
            return chat.encode_with_template(self, self.chat_template, messages,
                                             add_generation_prompt=add_generation_prompt, **template_kwargs)
        raise TokenizerError(f"unknown chat_format {chat_format!r}; choose one of {CHAT_FORMATS}")

    # -----------------------------------------------------------------------------------------------------------------
    # GGUF
    # -----------------------------------------------------------------------------------------------------------------

    def gguf_metadata(self) -> dict[str, Any]:
        """GGUF tokenizer keys and plain python values that rebuild this tokenizer (and that llama.cpp loads)."""
        return gguf_vocab.fields_from_tokenizer(self)

    def write_gguf_metadata(self, writer) -> None:
        """Add `gguf_metadata()` to a `gguf.GGUFWriter`, each key with the value type llama.cpp expects."""
        gguf_vocab.write_fields(writer, self.gguf_metadata())

    def __repr__(self) -> str:
        return (f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_id={self.eos_id}, chat_format={self.default_chat_format!r})")


def _byte_value(piece: str, index: int, source: str) -> int:
    # sentencepiece names byte pieces <0x00> .. <0xFF>
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            return int(piece[3:5], 16)
        except ValueError:
            pass
    raise TokenizerError(f"{source}: piece {index} has type BYTE but is {piece!r}, not <0xNN>")


def _check_encodable(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise TokenizerError(f"text has a lone surrogate {text[exc.start]!r} at index {exc.start}, "
                             f"which is not valid Unicode text") from None

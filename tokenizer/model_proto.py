"""sentencepiece's ModelProto, read and written without the protobuf package.

The sentencepiece wheel ships generated protobuf classes, but they need `google.protobuf`, which we do not want as a
runtime dependency for a handful of fields. The wire format is simple: each field is a varint key
(field number << 3 | wire type) followed by a varint, a 4- or 8-byte little-endian value, or a length-prefixed blob.
Field numbers below are those of sentencepiece_model.proto.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum

from .errors import TokenizerError

__all__ = ["ModelSpec", "Piece", "PieceType", "build_model_proto", "parse_model_proto"]


class PieceType(IntEnum):
    """ModelProto.SentencePiece.Type; GGUF's `tokenizer.ggml.token_type` uses the same numbers."""

    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


class ModelType(IntEnum):
    UNIGRAM = 1
    BPE = 2
    WORD = 3
    CHAR = 4


@dataclass(frozen=True)
class Piece:
    text: str
    score: float
    type: PieceType


@dataclass
class ModelSpec:
    """The parts of a ModelProto that change how text is encoded or decoded. Defaults are the proto's own."""

    pieces: list[Piece]
    model_type: ModelType = ModelType.UNIGRAM
    byte_fallback: bool = False
    treat_whitespace_as_suffix: bool = False
    unk_surface: str = " \u2047 "
    unk_piece: str = "<unk>"
    bos_piece: str = "<s>"
    eos_piece: str = "</s>"
    pad_piece: str = "<pad>"
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True
    precompiled_charsmap: bytes = b""
    # A denormalizer rewrites decoded text; streaming decode cannot reproduce it piece by piece.
    has_denormalizer: bool = False
    ids: dict[str, int] = field(default_factory=dict)  # trainer_spec's unk/bos/eos/pad ids, informational


# ModelProto
_PIECES, _TRAINER_SPEC, _NORMALIZER_SPEC, _DENORMALIZER_SPEC = 1, 2, 3, 5
# ModelProto.SentencePiece
_PIECE_TEXT, _PIECE_SCORE, _PIECE_TYPE = 1, 2, 3
# TrainerSpec
_MODEL_TYPE, _VOCAB_SIZE, _TREAT_WS_AS_SUFFIX, _BYTE_FALLBACK = 3, 4, 24, 35
_UNK_ID, _BOS_ID, _EOS_ID, _PAD_ID, _UNK_SURFACE = 40, 41, 42, 43, 44
_UNK_PIECE, _BOS_PIECE, _EOS_PIECE, _PAD_PIECE = 45, 46, 47, 48
# NormalizerSpec
_NORM_NAME, _CHARSMAP, _ADD_DUMMY_PREFIX, _REMOVE_EXTRA_WS, _ESCAPE_WS = 1, 2, 3, 4, 5

_VARINT, _FIXED64, _BYTES, _FIXED32 = 0, 1, 2, 5


# ---------------------------------------------------------------------------------------------------------------------
# wire format
# ---------------------------------------------------------------------------------------------------------------------

def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise TokenizerError("sentencepiece model: truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise TokenizerError("sentencepiece model: varint longer than 10 bytes")


def _fields(data: bytes):
    """Yield (field number, wire type, value) for one message; value is an int, or bytes for fixed and blobs."""
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, pos = _read_varint(data, pos)
        elif wire == _BYTES:
            size, pos = _read_varint(data, pos)
            value, pos = data[pos:pos + size], pos + size
            if pos > len(data):
                raise TokenizerError(f"sentencepiece model: field {number} runs past the end of its message")
        elif wire == _FIXED32:
            value, pos = data[pos:pos + 4], pos + 4
        elif wire == _FIXED64:
            value, pos = data[pos:pos + 8], pos + 8
        else:
            raise TokenizerError(f"sentencepiece model: unsupported wire type {wire} in field {number}")
        if pos > len(data):
            raise TokenizerError(f"sentencepiece model: field {number} runs past the end of its message")
        yield number, wire, value


def _signed32(value: int) -> int:
    # int32 fields are sign-extended to 64 bits on the wire
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int32 values go out as ten-byte two's complement, as protobuf does
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _key(number: int, wire: int) -> bytes:
    return _varint(number << 3 | wire)


def _int_field(number: int, value: int) -> bytes:
    return _key(number, _VARINT) + _varint(int(value))


def _bytes_field(number: int, value: bytes | str) -> bytes:
    if isinstance(value, str):
        value = value.encode("utf-8")
    return _key(number, _BYTES) + _varint(len(value)) + value


def _float_field(number: int, value: float) -> bytes:
    return _key(number, _FIXED32) + struct.pack("<f", value)


# ---------------------------------------------------------------------------------------------------------------------
# ModelProto
# ---------------------------------------------------------------------------------------------------------------------

def _text(value, what: str) -> str:
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TokenizerError(f"sentencepiece model: {what} is not valid UTF-8") from exc


_TYPES = {int(t): t for t in PieceType}


def _parse_piece(data: bytes, index: int) -> Piece:
    # Fast path for the layout sentencepiece writes: text, score, then the type unless it is NORMAL.
    # Loading a 32000-piece model is several times faster with it.
    if len(data) >= 2 and data[0] == 0x0A and data[1] < 0x80:
        end = 2 + data[1]
        if len(data) >= end + 5 and data[end] == 0x15:
            rest = len(data) - end - 5
            kind = 1 if rest == 0 else data[end + 6] if rest == 2 and data[end + 5] == 0x18 else None
            if kind in _TYPES:
                return Piece(_text(data[2:end], f"piece {index}"), struct.unpack_from("<f", data, end + 1)[0],
                             _TYPES[kind])
    text, score, kind = "", 0.0, PieceType.NORMAL
    for n, w, v in _fields(data):
        if n == _PIECE_TEXT:
            text = _text(v, f"piece {index}")
        elif n == _PIECE_SCORE and w == _FIXED32:
            score = struct.unpack("<f", v)[0]
        elif n == _PIECE_TYPE:
            if v not in _TYPES:
                raise TokenizerError(f"sentencepiece model: piece {index} has unknown type {v}")
            kind = _TYPES[v]
    return Piece(text, score, kind)


def parse_model_proto(data: bytes) -> ModelSpec:
    spec = ModelSpec(pieces=[])
    for number, _, value in _fields(data):
        if number == _PIECES:
            spec.pieces.append(_parse_piece(value, len(spec.pieces)))
        elif number == _TRAINER_SPEC:
            for n, _, v in _fields(value):
                if n == _MODEL_TYPE:
                    try:
                        spec.model_type = ModelType(v)
                    except ValueError:
                        raise TokenizerError(f"sentencepiece model: unknown model_type {v}")
                elif n == _BYTE_FALLBACK:
                    spec.byte_fallback = bool(v)
                elif n == _TREAT_WS_AS_SUFFIX:
                    spec.treat_whitespace_as_suffix = bool(v)
                elif n == _UNK_SURFACE:
                    spec.unk_surface = _text(v, "unk_surface")
                elif n in (_UNK_PIECE, _BOS_PIECE, _EOS_PIECE, _PAD_PIECE):
                    name = {_UNK_PIECE: "unk_piece", _BOS_PIECE: "bos_piece",
                            _EOS_PIECE: "eos_piece", _PAD_PIECE: "pad_piece"}[n]
                    setattr(spec, name, _text(v, name))
                elif n in (_UNK_ID, _BOS_ID, _EOS_ID, _PAD_ID):
                    spec.ids[{_UNK_ID: "unk", _BOS_ID: "bos", _EOS_ID: "eos", _PAD_ID: "pad"}[n]] = _signed32(v)
        elif number == _NORMALIZER_SPEC:
            for n, _, v in _fields(value):
                if n == _CHARSMAP:
                    spec.precompiled_charsmap = bytes(v)
                elif n == _ADD_DUMMY_PREFIX:
                    spec.add_dummy_prefix = bool(v)
                elif n == _REMOVE_EXTRA_WS:
                    spec.remove_extra_whitespaces = bool(v)
                elif n == _ESCAPE_WS:
                    spec.escape_whitespaces = bool(v)
        elif number == _DENORMALIZER_SPEC:
            spec.has_denormalizer = any(n == _CHARSMAP and len(v) > 0 for n, _, v in _fields(value))
    return spec


def build_model_proto(spec: ModelSpec) -> bytes:
    """Serialize `spec` as a ModelProto that sentencepiece loads (`SentencePieceProcessor(model_proto=...)`)."""
    out = bytearray()
    for piece in spec.pieces:
        body = _bytes_field(_PIECE_TEXT, piece.text) + _float_field(_PIECE_SCORE, piece.score)
        body += _int_field(_PIECE_TYPE, int(piece.type))
        out += _bytes_field(_PIECES, body)

    trainer = _int_field(_MODEL_TYPE, int(spec.model_type)) + _int_field(_VOCAB_SIZE, len(spec.pieces))
    trainer += _int_field(_TREAT_WS_AS_SUFFIX, spec.treat_whitespace_as_suffix)
    trainer += _int_field(_BYTE_FALLBACK, spec.byte_fallback)
    for name, number in (("unk", _UNK_ID), ("bos", _BOS_ID), ("eos", _EOS_ID), ("pad", _PAD_ID)):
        if name in spec.ids:
            trainer += _int_field(number, spec.ids[name])
    trainer += _bytes_field(_UNK_SURFACE, spec.unk_surface)
    trainer += _bytes_field(_UNK_PIECE, spec.unk_piece) + _bytes_field(_BOS_PIECE, spec.bos_piece)
    trainer += _bytes_field(_EOS_PIECE, spec.eos_piece) + _bytes_field(_PAD_PIECE, spec.pad_piece)
    out += _bytes_field(_TRAINER_SPEC, trainer)

    normalizer = b"" if spec.precompiled_charsmap else _bytes_field(_NORM_NAME, "identity")
    if spec.precompiled_charsmap:
        normalizer += _bytes_field(_CHARSMAP, spec.precompiled_charsmap)
    normalizer += _int_field(_ADD_DUMMY_PREFIX, spec.add_dummy_prefix)
    normalizer += _int_field(_REMOVE_EXTRA_WS, spec.remove_extra_whitespaces)
    normalizer += _int_field(_ESCAPE_WS, spec.escape_whitespaces)
    out += _bytes_field(_NORMALIZER_SPEC, normalizer)
    return bytes(out)

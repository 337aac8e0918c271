"""Text out of a token stream: an incremental decoder and a stop-string matcher.

`Detokenizer` turns ids into text one at a time so that the pieces, joined, equal sentencepiece's decode of all the
ids, whichever way the ids were split. Two things make that harder than printing each piece:

- byte-fallback tokens: a character outside the vocabulary arrives as its UTF-8 bytes, one token each (an emoji is
  four). Bytes are held until they form a whole character, so no replacement character is emitted for a character
  that is still arriving. Bytes that can never form one become U+FFFD, one per byte, exactly as sentencepiece does.
- the leading-space rule: sentencepiece drops the "▁" that its dummy prefix put before the first word, but only on
  the first piece that produces text (control tokens such as <s> do not count).

`StopMatcher` finds stop strings in streamed text across token boundaries. Text that may be the start of a stop
string is held back until it is known not to be one, and stop text is never emitted.
"""
from __future__ import annotations

from .errors import TokenizerError
from .model_proto import PieceType

__all__ = ["Detokenizer", "StopMatcher"]

_SPACE_SYMBOL = "\u2581"
_REPLACEMENT = "\ufffd"


def _utf8_length(lead: int) -> int:
    """Bytes in the UTF-8 sequence that `lead` starts, by sentencepiece's rule (0: cannot start one)."""
    if lead < 0x80:
        return 1
    if lead & 0xE0 == 0xC0:
        return 2
    if lead & 0xF0 == 0xE0:
        return 3
    if lead & 0xF8 == 0xF0:
        return 4
    return 0


def decode_bytes(pending: bytearray, final: bool) -> str:
    """Decode and remove the complete characters at the front of `pending`.

    sentencepiece decodes a run of byte tokens one character at a time; a sequence that is malformed, overlong,
    a surrogate or above U+10FFFF yields U+FFFD and consumes one byte. A sequence cut short by the end of the run
    is malformed too, so with `final` False an unfinished sequence is left in `pending` to wait for more bytes.
    """
    out = []
    i = 0
    while i < len(pending):
        need = _utf8_length(pending[i])
        if need == 1:
            out.append(chr(pending[i]))
            i += 1
            continue
        available = len(pending) - i
        continuation = pending[i + 1:i + min(need, available)]
        if need == 0 or any(b & 0xC0 != 0x80 for b in continuation):
            out.append(_REPLACEMENT)  # malformed whatever follows
            i += 1
            continue
        if available < need:
            if not final:
                break
            out.append(_REPLACEMENT)
            i += 1
            continue
        try:
            # Python's strict decoder rejects exactly what sentencepiece rejects in a whole sequence
            out.append(bytes(pending[i:i + need]).decode("utf-8"))
            i += need
        except UnicodeDecodeError:
            out.append(_REPLACEMENT)
            i += 1
    del pending[:i]
    return "".join(out)


class Detokenizer:
    """Incremental decoder: `feed(id)` returns the text that is now certain, `flush()` the rest at the end.

    For any ids and any split, `"".join(feed(i) for i in ids) + flush()` equals `tokenizer.decode(ids)`.
    After `flush()` the decoder starts a new sequence.
    """

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self._kinds: list[PieceType] = tokenizer._piece_types
        self._pieces: list[str] = tokenizer._piece_texts
        self._bytes: list[int] = tokenizer._piece_bytes
        spec = tokenizer._spec
        self._strips_first_space = spec.add_dummy_prefix or spec.remove_extra_whitespaces
        self._strips_all_leading_spaces = spec.remove_extra_whitespaces
        self._unk_surface = spec.unk_surface
        self._reset()

    def _reset(self) -> None:
        self._pending = bytearray()      # byte-token bytes not yet forming a whole character
        self._at_start = True            # sentencepiece's is_bos_ws: a leading "▁" may still be dropped
        self._dropped_space = False      # the previous piece had its leading "▁" dropped
        self._produced_text = False      # any text so far, emitted or pending

    def feed(self, token_id: int) -> str:
        token_id = self._tokenizer._check_id(token_id)
        kind = self._kinds[token_id]
        if kind == PieceType.BYTE:
            self._pending.append(self._bytes[token_id])
            self._produced_text = True  # a byte run always yields at least one character
            return decode_bytes(self._pending, final=False)

        out = decode_bytes(self._pending, final=True)  # a run of byte tokens ends at any other token
        if self._dropped_space or self._produced_text:
            self._at_start = False
        self._dropped_space = False
        if kind == PieceType.CONTROL:
            return out
        if kind == PieceType.UNKNOWN:
            self._produced_text = True
            return out + self._unk_surface

        piece = self._pieces[token_id]
        if self._at_start and self._strips_first_space and piece.startswith(_SPACE_SYMBOL):
            piece = piece[1:]
            # with remove_extra_whitespaces every leading "▁" goes, so the start has not been passed yet
            self._dropped_space = not self._strips_all_leading_spaces
        text = piece.replace(_SPACE_SYMBOL, " ")
        if text:
            self._produced_text = True
        return out + text

    def flush(self) -> str:
        out = decode_bytes(self._pending, final=True)
        self._reset()
        return out


class StopMatcher:
    """Watch streamed text for stop strings.

    `feed(text)` returns `(emit, stopped)`: `emit` is the text now known to come before any stop string; when
    `stopped` is True a stop string has been completed, `emit` ends where it begins, and everything after is
    dropped. `flush()` returns the held-back text at the end of a stream that did not stop.

    Where stop strings overlap, the one that is completed first wins (the longest, if several end at the same
    character), so the result does not depend on how the text was split into pieces.
    """

    def __init__(self, stops: list[str] | tuple[str, ...] | str | None) -> None:
        if stops is None:
            stops = []
        if isinstance(stops, str):
            stops = [stops]
        stops = list(stops)
        for stop in stops:
            if not isinstance(stop, str):
                raise TokenizerError(f"stop strings must be str, got {type(stop).__name__}: {stop!r}")
            if not stop:
                raise TokenizerError("an empty stop string would match everywhere; remove it")
        self.stops: list[str] = list(dict.fromkeys(stops))
        self._longest = max((len(s) for s in self.stops), default=0)
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if not self.stops:
            return text, False
        buffer = self._held + text
        best_end = best_start = None
        for stop in self.stops:
            start = buffer.find(stop)
            if start < 0:
                continue
            end = start + len(stop)
            if best_end is None or end < best_end or (end == best_end and start < best_start):
                best_end, best_start = end, start
        if best_start is not None:
            self.stopped = True
            self._held = ""
            return buffer[:best_start], True
        keep = self._partial_suffix_start(buffer)
        self._held = buffer[keep:]
        return buffer[:keep], False

    def _partial_suffix_start(self, buffer: str) -> int:
        """Index of the longest suffix of `buffer` that is a proper prefix of some stop string."""
        for start in range(max(0, len(buffer) - self._longest + 1), len(buffer)):
            tail = buffer[start:]
            if any(stop.startswith(tail) for stop in self.stops):
                return start
        return len(buffer)

    def flush(self) -> str:
        out = "" if self.stopped else self._held
        self._held = ""
        return out

"""A fast GGUF header reader: metadata and tensor infos parsed straight from a memory map, tensors as views of it.

Why not gguf-py's GGUFReader: it makes several numpy views per metadata value, so Mixtral's 32000-token vocabulary
(three parallel arrays) costs 1-3 s of start-up on every load. Here strings are decoded from one `mmap` with
`struct` and numeric arrays come out of `np.frombuffer` in one call, which takes a few tens of milliseconds.

The result has the shape `engine.sources.gguf.read_gguf` returns, so it can stand in for GGUFReader there:
  metadata  {key: plain Python value}, exactly what `ReaderField.contents()` gives for every field, including
            gguf-py's pseudo-keys GGUF.version, GGUF.tensor_count and GGUF.kv_count
  tensors   [GGUFTensor], with the attributes of gguf-py's ReaderTensor that readers use: name, tensor_type,
            shape (ggml order, innermost first, as a uint64 array), n_elements, n_bytes, data_offset, and data,
            a read-only 1-D uint8 view of the file's bytes (reshape or .view() it as needed)

Every count, length and offset is checked against the file's size before it is used, and every failure is a
ModelFormatError naming the file (and the key or tensor), so a damaged file never reaches a kernel. Little-endian
files only (big-endian GGUF files exist but nobody ships Mixtral in one).
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import ModelFormatError

__all__ = ["GGUFTensor", "read_gguf_fast"]

_GGUF_DEFAULT_ALIGNMENT = 32
_MAX_DIMS = 4              # GGML_MAX_DIMS
_MAX_ARRAY_DEPTH = 4       # arrays of arrays: gguf-py flattens them; nobody nests deeper

# GGUF value types: id -> (struct format, size); strings (8) and arrays (9) are handled apart
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8",
          12: "<f8"}
_STRING, _ARRAY, _UINT32 = 8, 9, 4
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    tensor_type: GGMLQuantizationType
    shape: np.ndarray        # ggml order (innermost first), uint64, like gguf-py's ReaderTensor.shape
    n_elements: int
    n_bytes: int
    data_offset: int         # absolute byte offset in the file
    data: np.ndarray         # 1-D uint8 view of the memory map, read-only


class _Cursor:
    """Reads little-endian values from the map with a bounds check on every read."""

    def __init__(self, buf, path: Path):
        self.buf = buf
        self.size = len(buf)
        self.pos = 0
        self.path = path
        self.where = "header"

    def fail(self, msg: str):
        raise ModelFormatError(f"{self.path}: {msg} ({self.where}, at byte {self.pos})")

    def need(self, n: int) -> int:
        if n < 0 or self.pos + n > self.size:
            self.fail(f"needs {n} bytes but the file ends at byte {self.size}")
        p = self.pos
        self.pos += n
        return p

    def u32(self) -> int:
        return _U32.unpack_from(self.buf, self.need(4))[0]

    def u64(self) -> int:
        return _U64.unpack_from(self.buf, self.need(8))[0]

    def string(self) -> str:
        n = self.u64()
        p = self.need(n)
        try:
            return str(self.buf[p:p + n], "utf-8")
        except UnicodeDecodeError:
            self.fail("a string is not valid UTF-8")

    def value(self, vtype: int, depth: int = 0):
        if vtype in _SCALARS:
            fmt = _SCALARS[vtype]
            return struct.unpack_from(fmt, self.buf, self.need(struct.calcsize(fmt)))[0]
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            return self.array(depth)
        self.fail(f"unknown metadata value type {vtype}")

    def array(self, depth: int) -> list:
        if depth >= _MAX_ARRAY_DEPTH:
            self.fail(f"arrays nested deeper than {_MAX_ARRAY_DEPTH}")
        itype = self.u32()
        n = self.u64()
        if itype in _NUMPY:
            dtype = np.dtype(_NUMPY[itype])
            if n > (self.size - self.pos) // dtype.itemsize:
                self.fail(f"an array of {n} values does not fit in the file")
            if itype == 7:  # bools: any nonzero byte is True, as numpy's bool view reads it
                raw = np.frombuffer(self.buf, np.uint8, n, self.need(n))
                return (raw != 0).tolist()
            return np.frombuffer(self.buf, dtype, n, self.need(n * dtype.itemsize)).tolist()
        if itype == _STRING:
            if n > (self.size - self.pos) // 8:
                self.fail(f"an array of {n} strings does not fit in the file")
            return self._strings(n)
        if itype == _ARRAY:
            if n > (self.size - self.pos) // 12:
                self.fail(f"an array of {n} arrays does not fit in the file")
            out = []
            for _ in range(n):  # gguf-py flattens nested arrays; so do we
                out.extend(self.array(depth + 1))
            return out
        self.fail(f"unknown array element type {itype}")

    def _strings(self, n: int) -> list[str]:
        buf, size, unpack = self.buf, self.size, _U64.unpack_from
        pos = self.pos
        out = [None] * n
        try:
            for i in range(n):
                if pos + 8 > size:
                    break
                length = unpack(buf, pos)[0]
                pos += 8
                end = pos + length
                if end > size:
                    break
                out[i] = str(buf[pos:end], "utf-8")
                pos = end
            else:
                self.pos = pos
                return out
        except UnicodeDecodeError:
            self.pos = pos
            self.fail(f"string {i} of an array is not valid UTF-8")
        self.pos = pos
        self.fail(f"string {i} of an array of {n} runs past the end of the file")


def read_gguf_fast(path: str | Path) -> tuple[dict[str, Any], list[GGUFTensor]]:
    """Parse a GGUF file's metadata and tensor infos. Returns (metadata, tensors); tensor data stays in the map."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size < 24:
                raise ModelFormatError(f"{path}: too short to be a GGUF file ({size} bytes)")
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except FileNotFoundError:
        raise ModelFormatError(f"{path}: file not found") from None
    except (OSError, ValueError) as e:
        raise ModelFormatError(f"{path}: cannot map the file ({e})") from None
    c = _Cursor(memoryview(mm), path)

    if bytes(c.buf[:4]) != b"GGUF":
        raise ModelFormatError(f"{path}: bad magic {bytes(c.buf[:4])!r}, not a GGUF file")
    c.pos = 4
    version = c.u32()
    if version not in (2, 3):
        if version & 0xFFFF == 0:
            raise ModelFormatError(f"{path}: big-endian GGUF files are not supported")
        raise ModelFormatError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
    n_tensors, n_kv = c.u64(), c.u64()
    # every key-value takes at least 13 bytes and every tensor info at least 33: reject absurd counts up front
    if n_kv > size // 13 or n_tensors > size // 33:
        raise ModelFormatError(f"{path}: header claims {n_tensors} tensors and {n_kv} metadata keys, "
                               f"more than a {size}-byte file can hold")

    meta: dict[str, Any] = {"GGUF.version": version, "GGUF.tensor_count": n_tensors, "GGUF.kv_count": n_kv}
    alignment = _GGUF_DEFAULT_ALIGNMENT
    for i in range(n_kv):
        c.where = f"metadata key {i}"
        key = c.string()
        c.where = f"metadata key {key!r}"
        if key in meta:
            c.fail("duplicate metadata key")
        vtype = c.u32()
        meta[key] = c.value(vtype)
        if key == "general.alignment":
            a = meta[key]
            if vtype != _UINT32 or a == 0 or a & (a - 1):
                c.fail(f"general.alignment must be a power of two stored as uint32, got {a!r}")
            alignment = a

    infos = []
    for i in range(n_tensors):
        c.where = f"tensor info {i}"
        name = c.string()
        c.where = f"tensor {name!r}"
        n_dims = c.u32()
        if not 1 <= n_dims <= _MAX_DIMS:
            c.fail(f"has {n_dims} dimensions (1 to {_MAX_DIMS} allowed)")
        dims = [c.u64() for _ in range(n_dims)]
        raw_type = c.u32()
        offset = c.u64()
        infos.append((name, dims, raw_type, offset))
    data_start = -(-c.pos // alignment) * alignment

    data = np.frombuffer(mm, dtype=np.uint8)
    tensors = []
    seen = set()
    for name, dims, raw_type, offset in infos:
        where = f"{path}: tensor {name}"
        if name in seen:
            raise ModelFormatError(f"{where} appears twice")
        seen.add(name)
        try:
            qtype = GGMLQuantizationType(raw_type)
        except ValueError:
            raise ModelFormatError(f"{where} has unknown type id {raw_type}") from None
        block, type_size = GGML_QUANT_SIZES[qtype]
        n_elements = 1
        for d in dims:
            if d == 0:
                raise ModelFormatError(f"{where} has a zero dimension {dims}")
            n_elements *= d
        if n_elements >= 1 << 62:
            raise ModelFormatError(f"{where} claims {n_elements} elements")
        if dims[0] % block:
            raise ModelFormatError(f"{where}: {qtype.name} rows of {dims[0]} are not whole blocks of {block}")
        n_bytes = n_elements // block * type_size
        if offset % alignment:
            raise ModelFormatError(f"{where}: data offset {offset} is not a multiple of the alignment {alignment}")
        start = data_start + offset
        if start + n_bytes > size:
            raise ModelFormatError(f"{where} ends at byte {start + n_bytes} beyond the file ({size} bytes)")
        tensors.append(GGUFTensor(name, qtype, np.array(dims, dtype=np.uint64), n_elements, n_bytes, start,
                                  data[start:start + n_bytes]))
    return meta, tensors

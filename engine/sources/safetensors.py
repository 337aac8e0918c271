"""A memory-mapped safetensors reader that understands bf16.

safetensors' own numpy API refuses bf16, and its torch API would pull torch in at run time. The format is simple
(8-byte little-endian header length, a JSON header, then raw data), so we parse it and map the data ourselves;
every tensor becomes a zero-copy QTensor over one np.memmap of the file.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from quant import QTensor, QType

from ..errors import ModelFormatError

__all__ = ["DTYPES", "read_safetensors"]

DTYPES = {"BF16": (QType.BF16, 2), "F16": (QType.F16, 2), "F32": (QType.F32, 4)}
_MAX_HEADER = 100 * 1024 * 1024


def read_safetensors(path: str | Path) -> dict[str, QTensor]:
    """Map a .safetensors file. Every entry is checked against the file's size before any view is made."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelFormatError(f"{path}: file too short for a safetensors header ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > min(_MAX_HEADER, size - 8):
                raise ModelFormatError(f"{path}: safetensors header length {n} exceeds the file ({size} bytes)")
            header_bytes = f.read(n)
    except FileNotFoundError:
        raise ModelFormatError(f"{path}: file not found") from None
    except OSError as e:
        raise ModelFormatError(f"{path}: cannot read ({e})") from None
    try:
        header = json.loads(header_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFormatError(f"{path}: damaged safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise ModelFormatError(f"{path}: safetensors header is not a JSON object")

    data_start = 8 + n
    data_len = size - data_start
    mm = np.memmap(path, dtype=np.uint8, mode="r") if size > data_start else np.zeros(0, np.uint8)
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (a, b) = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ModelFormatError(f"{path}: tensor {name}: malformed header entry {info!r}") from None
        if dtype not in DTYPES:
            raise ModelFormatError(f"{path}: tensor {name}: dtype {dtype} is not supported (BF16, F16, F32 are)")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise ModelFormatError(f"{path}: tensor {name}: bad shape {shape!r}")
        if not (isinstance(a, int) and isinstance(b, int) and 0 <= a <= b):
            raise ModelFormatError(f"{path}: tensor {name}: bad data offsets {[a, b]}")
        qtype, itemsize = DTYPES[dtype]
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if b - a != count * itemsize:
            raise ModelFormatError(f"{path}: tensor {name}: {b - a} bytes for shape {shape} of {dtype}")
        if b > data_len:
            raise ModelFormatError(
                f"{path}: tensor {name} ends at byte {data_start + b} but the file has {size} bytes (truncated?)")
        tensors[name] = QTensor(qtype, tuple(shape), mm[data_start + a:data_start + b])
    return tensors

"""The safetensors file format, read and written with numpy over memory maps (bf16 included).

safetensors' own numpy API refuses bf16, and its torch API would pull torch in at run time. The format is simple
(8-byte little-endian header length, a JSON header, then raw data), so we parse it and map the data ourselves:
every tensor is a zero-copy view of one np.memmap of its file, checked against the file's size before it is made.
HF checkpoints (sources/hf.py) and mlx-community folders (sources/mlx.py, which adds uint32) both read through here.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from mixlocal.quant import QTensor, QType

from ..errors import ModelFormatError

__all__ = ["DTYPES", "NUMPY_DTYPES", "RawTensor", "map_safetensors", "read_safetensors", "shard_files",
           "write_safetensors"]

DTYPES = {"BF16": QType.BF16, "F16": QType.F16, "F32": QType.F32}  # what a float checkpoint may hold
NUMPY_DTYPES = {"U32": np.dtype(np.uint32), "F16": np.dtype(np.float16), "BF16": np.dtype(np.uint16),  # bf16 raw
                "F32": np.dtype(np.float32)}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class RawTensor:
    dtype: str            # the safetensors dtype name
    array: np.ndarray     # memory-mapped view in its shape (bf16 as uint16)
    file: str


def map_safetensors(path: str | Path, allowed: tuple[str, ...] = tuple(NUMPY_DTYPES)) -> dict[str, RawTensor]:
    """Map a .safetensors file whose tensors have one of the `allowed` dtypes. Raises ModelFormatError naming the
    file and tensor for anything damaged, truncated or not allowed."""
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
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (a, b) = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ModelFormatError(f"{path}: tensor {name}: malformed header entry {info!r}") from None
        if dtype not in allowed:
            raise ModelFormatError(f"{path}: tensor {name}: dtype {dtype} is not supported "
                                   f"({', '.join(allowed)} are)")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise ModelFormatError(f"{path}: tensor {name}: bad shape {shape!r}")
        if not (isinstance(a, int) and isinstance(b, int) and 0 <= a <= b):
            raise ModelFormatError(f"{path}: tensor {name}: bad data offsets {[a, b]}")
        np_dtype = NUMPY_DTYPES[dtype]
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if b - a != count * np_dtype.itemsize:
            raise ModelFormatError(f"{path}: tensor {name}: {b - a} bytes for shape {shape} of {dtype}")
        if b > data_len:
            raise ModelFormatError(
                f"{path}: tensor {name} ends at byte {data_start + b} but the file has {size} bytes (truncated?)")
        view = mm[data_start + a:data_start + b].view(np_dtype).reshape(shape) if count else np.zeros(shape, np_dtype)
        out[name] = RawTensor(dtype, view, str(path))
    return out


def read_safetensors(path: str | Path) -> dict[str, QTensor]:
    """A float checkpoint file (BF16/F16/F32) as zero-copy QTensors."""
    return {name: QTensor(DTYPES[r.dtype], tuple(r.array.shape), r.array.reshape(-1).view(np.uint8))
            for name, r in map_safetensors(path, tuple(DTYPES)).items()}


def shard_files(path: Path) -> list[Path]:
    """The weight files of a folder: those its model.safetensors.index.json names, else every *.safetensors."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelFormatError(f"{index}: damaged shard index ({e})") from None
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise ModelFormatError(f"{path}: shard index names missing files: {', '.join(missing)}")
        return [path / f for f in files]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelFormatError(f"{path}: no *.safetensors files")
    return files


def write_safetensors(path: Path, entries: list[tuple[str, str, tuple[int, ...]]], fill,
                      metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file of (name, dtype, shape) entries; fill(name, out_array) writes each tensor's data
    straight into the file's memory map, so a large model is never held in memory whole."""
    header, offset = {"__metadata__": dict(metadata or {})}, 0
    for name, dtype, shape in entries:
        nbytes = int(np.prod(shape, dtype=np.int64)) * NUMPY_DTYPES[dtype].itemsize
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        f.truncate(8 + len(text) + offset)
    if offset == 0:
        return
    mm = np.memmap(path, dtype=np.uint8, mode="r+", offset=8 + len(text), shape=(offset,))
    for name, dtype, shape in entries:
        a, b = header[name]["data_offsets"]
        fill(name, mm[a:b].view(NUMPY_DTYPES[dtype]).reshape(shape))
    mm.flush()
    del mm

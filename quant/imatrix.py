"""Importance-matrix files in llama.cpp's two formats, read and written.

An importance matrix holds, for every weight matrix a model multiplies by, the sum over the tokens it saw of each
input column's squared activation (and the plain sum), with the token count. An expert stack (ffn_*_exps) has one
row of sums and one count per expert, counting only the tokens routed to that expert. The quantizers use the mean
square per column (`Imatrix.importance`), which is what llama-quantize computes from either file.

- GGUF (llama.cpp tools/imatrix/imatrix.cpp, save_imatrix): `general.type` "imatrix", `imatrix.datasets` (strings),
  `imatrix.chunk_count` and `imatrix.chunk_size` (u32); per matrix `<name>.in_sum2` (f32, ggml ne [cols, n_mat]),
  `<name>.counts` (f32, ne [1, n_mat]) and, from newer llama.cpp, `<name>.in_sum` (like in_sum2).
- legacy `.dat` (save_imatrix_legacy): int32 entry count; per entry int32 name length, the name, int32 ncall,
  int32 nval, nval float32 holding mean squares times ncall; then int32 chunk count, int32 length and the dataset
  name. It keeps one count per entry, so the experts of a stack are not told apart in it.

Every problem with a file is an `ImatrixFileError` (a ValueError) naming the file and what is wrong.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["Imatrix", "ImatrixEntry", "ImatrixFileError", "read_imatrix", "write_imatrix"]

_GGUF_MAGIC = b"GGUF"


class ImatrixFileError(ValueError):
    """An importance-matrix file that cannot be read or does not fit the model it is used with."""


@dataclass
class ImatrixEntry:
    """One matrix's statistics: sums2 and sums (n_mat, cols) float32, counts (n_mat,) tokens per matrix."""
    sums2: np.ndarray
    counts: np.ndarray
    sums: np.ndarray | None = None
    legacy: bool = False  # read from a .dat file: sums2 holds mean squares times counts[0] (ncall)

    def values(self) -> np.ndarray:
        """Mean squared activation per column, (n_mat, cols) float32, as llama-quantize derives it: sums2 / count,
        and 1 for a matrix that saw no token (an expert nothing was routed to)."""
        counts = self.counts.astype(np.float32)
        if self.legacy:
            return self.sums2 / counts[:, None] if counts[0] > 0 else self.sums2.copy()
        out = np.ones_like(self.sums2)
        seen = counts > 0
        out[seen] = self.sums2[seen] / counts[seen, None]
        return out


@dataclass
class Imatrix:
    entries: dict[str, ImatrixEntry]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0

    def importance(self, name: str, shape: tuple[int, ...]) -> np.ndarray | None:
        """The importance rows for the weight `name` of `shape` ((rows, cols) or (n_expert, rows, cols)):
        (n_mat, cols) float32, one row per expert; None when the file has no entry for it (the matrix is then
        quantized without one, as llama-quantize does)."""
        e = self.entries.get(name)
        if e is None:
            return None
        cols = shape[-1]
        n_mat = shape[0] if len(shape) == 3 else 1
        v = e.values()
        if v.size != cols * n_mat:
            raise ImatrixFileError(f"imatrix entry {name} has {v.size} values, but the model's {name} of shape "
                                   f"{tuple(shape)} needs {cols * n_mat} ({n_mat} x {cols} columns)")
        return np.ascontiguousarray(v.reshape(n_mat, cols), dtype=np.float32)


# ----------------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------------

def read_imatrix(path: str | Path) -> Imatrix:
    """Read a GGUF or legacy .dat importance matrix (told apart by the GGUF magic, as llama.cpp does)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise ImatrixFileError(f"cannot read imatrix file {path}: {e.strerror or e}") from None
    return _read_gguf(path) if head == _GGUF_MAGIC else _read_legacy(path)


def _checked(path: Path, name: str, a: np.ndarray, what: str) -> np.ndarray:
    a = np.ascontiguousarray(a, dtype=np.float32)
    if not np.isfinite(a).all():
        raise ImatrixFileError(f"{path}: {name}.{what} holds NaN or infinite values")
    if what in ("in_sum2", "counts") and (a < 0).any():
        raise ImatrixFileError(f"{path}: {name}.{what} holds negative values")
    return a


def _read_gguf(path: Path) -> Imatrix:
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, struct.error, IndexError, KeyError, TypeError, OverflowError, OSError) as e:  # gguf-py's
        raise ImatrixFileError(f"{path} is not a readable GGUF file: {e}") from None
    parts: dict[str, dict[str, np.ndarray]] = {}
    for t in reader.tensors:
        for suffix in (".in_sum2", ".counts", ".in_sum"):
            if t.name.endswith(suffix):
                if t.tensor_type != gguf.GGMLQuantizationType.F32:
                    raise ImatrixFileError(f"{path}: tensor {t.name} is {t.tensor_type.name}, expected F32")
                dims = [int(d) for d in t.shape]  # ggml order: ne0 (cols) first
                data = np.asarray(t.data, dtype=np.float32).reshape(-1)
                cols = dims[0] if dims else 1
                parts.setdefault(t.name[:-len(suffix)], {})[suffix[1:]] = data.reshape(-1, cols)
                break
    if not parts:
        raise ImatrixFileError(f"{path}: GGUF file holds no imatrix tensors (<name>.in_sum2 and <name>.counts)")
    fields = reader.fields
    missing = [k for k in ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size") if k not in fields]
    if missing:
        raise ImatrixFileError(f"{path}: missing imatrix metadata {', '.join(missing)}")
    entries = {}
    for name in sorted(parts):
        p = parts[name]
        if "in_sum2" not in p or "counts" not in p:
            raise ImatrixFileError(f"{path}: mismatched sums and counts for {name} (has {', '.join(sorted(p))})")
        sums2 = _checked(path, name, p["in_sum2"], "in_sum2")
        counts = _checked(path, name, p["counts"], "counts").reshape(-1)
        if sums2.size % counts.size:
            raise ImatrixFileError(f"{path}: {name} has {sums2.size} sums for {counts.size} counts")
        sums2 = sums2.reshape(counts.size, -1)
        sums = None
        if "in_sum" in p:
            if p["in_sum"].size != sums2.size:
                raise ImatrixFileError(f"{path}: {name}.in_sum has {p['in_sum'].size} values, in_sum2 {sums2.size}")
            sums = _checked(path, name, p["in_sum"], "in_sum").reshape(sums2.shape)
        entries[name] = ImatrixEntry(sums2, counts, sums)
    datasets_field = fields["imatrix.datasets"]
    datasets = [bytes(datasets_field.parts[i]).decode("utf-8", "replace") for i in datasets_field.data]
    return Imatrix(entries, datasets, _u32(path, fields["imatrix.chunk_count"]), _u32(path, fields["imatrix.chunk_size"]))


def _u32(path: Path, f) -> int:
    try:
        return int(f.parts[f.data[0]][0])
    except (IndexError, TypeError, ValueError):
        raise ImatrixFileError(f"{path}: metadata {f.name} is not a number") from None


def _read_legacy(path: Path) -> Imatrix:
    raw = path.read_bytes()
    pos = 0

    def take(n: int, what: str) -> bytes:
        nonlocal pos
        if n < 0 or pos + n > len(raw):
            raise ImatrixFileError(f"{path}: truncated legacy imatrix file (reading {what} at byte {pos})")
        pos += n
        return raw[pos - n:pos]

    def i32(what: str) -> int:
        return struct.unpack("<i", take(4, what))[0]

    if len(raw) < 4:
        raise ImatrixFileError(f"{path}: neither a GGUF file nor a legacy imatrix (.dat) file: only {len(raw)} bytes")
    n_entries = i32("the entry count")
    if n_entries < 1 or n_entries > len(raw) // 16:
        raise ImatrixFileError(f"{path}: neither a GGUF imatrix nor a legacy .dat one "
                               f"(first word {n_entries} is no entry count)")
    entries = {}
    max_ncall = 0
    for i in range(n_entries):
        n = i32(f"entry {i}'s name length")
        if not 0 < n <= 4096:
            raise ImatrixFileError(f"{path}: entry {i} has a name length of {n}")
        try:
            name = take(n, f"entry {i}'s name").decode("utf-8")
        except UnicodeDecodeError:
            raise ImatrixFileError(f"{path}: entry {i}'s name is not UTF-8") from None
        ncall = i32(f"{name}'s call count")
        nval = i32(f"{name}'s value count")
        if nval < 1 or ncall < 0:
            raise ImatrixFileError(f"{path}: entry {name} has {nval} values and {ncall} calls")
        values = np.frombuffer(take(4 * nval, f"{name}'s values"), dtype="<f4").astype(np.float32).reshape(1, nval)
        entries[name] = ImatrixEntry(_checked(path, name, values, "in_sum2"), np.array([ncall], np.float32),
                                     legacy=True)
        max_ncall = max(max_ncall, ncall)
    chunk_count, datasets = max_ncall, []
    if pos + 4 <= len(raw):  # the trailer (chunk count, dataset name) is optional in llama.cpp's reader
        chunk_count = i32("the chunk count")
        if pos + 4 <= len(raw):
            n = i32("the dataset name length")
            datasets = [take(n, "the dataset name").decode("utf-8", "replace")]
    return Imatrix(entries, datasets, chunk_count, 0)


# ----------------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------------

def write_imatrix(path: str | Path, im: Imatrix, *, legacy: bool = False) -> None:
    """Write `im` as llama.cpp's GGUF imatrix, or with legacy=True as its .dat format (entries in name order)."""
    path = Path(path)
    if legacy:
        _write_legacy(path, im)
        return
    import gguf

    writer = gguf.GGUFWriter(str(path), arch="imatrix")
    writer.kv_data[0].pop("general.architecture", None)  # llama-imatrix writes none; gguf-py adds it unasked
    writer.add_string("general.type", "imatrix")
    writer.add_array("imatrix.datasets", list(im.datasets))
    writer.add_uint32("imatrix.chunk_count", int(im.chunk_count))
    writer.add_uint32("imatrix.chunk_size", int(im.chunk_size))
    for name in sorted(im.entries):
        e = im.entries[name]
        if e.legacy:
            raise ImatrixFileError(f"{name} came from a legacy .dat file, whose sums are not kept; "
                                   "write it back with legacy=True")
        n_mat = e.counts.size
        writer.add_tensor(f"{name}.in_sum2", np.ascontiguousarray(e.sums2, np.float32).reshape(n_mat, -1))
        writer.add_tensor(f"{name}.counts", np.ascontiguousarray(e.counts, np.float32).reshape(n_mat, 1))
        if e.sums is not None:
            writer.add_tensor(f"{name}.in_sum", np.ascontiguousarray(e.sums, np.float32).reshape(n_mat, -1))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _write_legacy(path: Path, im: Imatrix) -> None:
    chunk = max(int(im.chunk_size), 1)
    out = bytearray()
    stored = []
    for name in sorted(im.entries):
        e = im.entries[name]
        if e.legacy:
            stored.append((name, int(e.counts[0]), e.sums2.reshape(-1).astype(np.float32)))
            continue
        if not (e.counts > 0).any():
            continue  # llama.cpp skips an entry with no data at all
        ncall = (int(e.counts.max()) + chunk - 1) // chunk
        counts = np.where(e.counts > 0, e.counts, 1).astype(np.float32)
        sums = np.where(e.counts[:, None] > 0, e.sums2, 1).astype(np.float32)
        stored.append((name, ncall, ((sums / counts[:, None]) * np.float32(ncall)).reshape(-1)))
    out += struct.pack("<i", len(stored))
    for name, ncall, values in stored:
        b = name.encode("utf-8")
        out += struct.pack("<i", len(b)) + b + struct.pack("<ii", ncall, values.size)
        out += values.astype("<f4").tobytes()
    out += struct.pack("<i", int(im.chunk_count))
    ds = (im.datasets[-1] if im.datasets else "").encode("utf-8")
    out += struct.pack("<i", len(ds)) + ds
    path.write_bytes(bytes(out))

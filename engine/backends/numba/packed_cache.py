"""The repacked weights of a model kept in one memory-mapped file, so that only a model's first load pays the repack.

kernels.prepare rewrites Q4_0 / Q8_0 / Q4_K (and Q5_K / Q6_K for the integer families) matrices into interleaved row
groups. Done in anonymous memory at every load, that costs ~3 s per GB and a second copy of every packed matrix in
RAM (Mixtral's 26 GB would not fit twice in 24 GiB). Here the packed arrays are written once into a cache file
through prepare's alloc hook, and later loads map that file copy-on-write: start-up is a header check, and the
packed pages are file pages the OS can drop, so peak RSS stays near one copy of the model. The original file's pages
for packed tensors are never touched again.

File: 8 bytes MAGIC, u64 header length, a JSON header, zero padding, then every array at a 4096-aligned offset. The
header carries the descriptor (source files with size and mtime, layout version, packed layout, every entry's name,
format and shape; the layout is shared by the integer kernel families) and where each array lies. A file is used
only if its descriptor equals the one this load computes and every array lies inside the file; otherwise it is
rebuilt. A new file is written under a temporary name and renamed when complete, so a crash mid-write never leaves a
file that looks valid.

Where: $MIXLOCAL_CACHE_DIR, else $XDG_CACHE_HOME/mixlocal, else ~/.cache/mixlocal; in its `packed/` folder, not next
to the model, because model folders (the hub cache, package data) are often read-only or shared.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import struct
import sys
from pathlib import Path

import numpy as np
from mixlocal.quant import kernels

from ...machine import available_memory

__all__ = ["MIN_CACHED_BYTES", "cache_dir", "cached_weights", "prepare_weights"]

MAGIC = b"MIXLPACK"
FILE_VERSION = 1
ALIGN = 4096
# Below this the repack takes well under a second, so a cache file would only add clutter (tests, the default model).
MIN_CACHED_BYTES = 256 << 20
_MAX_HEADER = 64 << 20
_DISK_MARGIN = 1 << 30  # leave this much free on the cache's disk


def cache_dir() -> Path:
    """The folder that holds the .mixpack files."""
    root = os.environ.get("MIXLOCAL_CACHE_DIR")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = (Path(xdg) if xdg else Path.home() / ".cache") / "mixlocal"
    return Path(root) / "packed"


def _note(msg: str) -> None:
    print(f"mixlocal: {msg}", file=sys.stderr, flush=True)


def _plan(named: dict, family: str) -> tuple[list[dict], int]:
    """The arrays prepare() would make for each packable weight, at 4096-aligned offsets in a cache file's data
    section, and that section's size."""
    entries, offset = [], 0
    for name, w in named.items():
        if w.qtype not in kernels.packed_types(family):
            continue
        shape = tuple(int(s) for s in w.shape)
        n_exp, n, k = (1,) + shape if len(shape) == 2 else shape
        arrays = []
        for arr_shape, dtype in kernels.packed_shapes(w.qtype, n_exp, n, k, kernels.layout_of(family)):
            nbytes = int(np.prod(arr_shape)) * dtype.itemsize
            arrays.append({"offset": offset, "shape": list(arr_shape), "dtype": dtype.str})
            offset += -(-nbytes // ALIGN) * ALIGN
        entries.append({"name": name, "qtype": int(w.qtype), "shape": list(shape), "arrays": arrays})
    return entries, offset


def _sources(named: dict, origin: dict[str, str], entries: list[dict]) -> list[list] | None:
    """(path, size, mtime_ns) of every file the packed weights come from, or None when one is not a plain file (a
    weight made at load, e.g. by quant=): such weights cannot be recognised on the next load."""
    files = set()
    for e in entries:
        where = origin.get(e["name"])
        if not where or not os.path.isfile(where):
            return None
        files.add(os.path.realpath(where))
    out = []
    for f in sorted(files):
        st = os.stat(f)
        out.append([f, st.st_size, st.st_mtime_ns])
    return out


def prepare_weights(named: dict, origin: dict[str, str], *, use_cache: bool | None = None,
                    family: str | None = None) -> dict:
    """kernels.prepare for every weight in `named` (GGUF name -> QTensor/QStack), through a mapped cache file.

    use_cache: None decides by size (a cache only pays from MIN_CACHED_BYTES of packed weights), True always
    caches when the weights come from files, False packs in memory like kernels.prepare. family: the kernel family
    (kernels.resolve_family); the integer families share one layout, so they share a cache file."""
    family = kernels.resolve_family(family)
    entries, total = _plan(named, family)

    def in_memory():
        avail = available_memory()
        if avail is not None and total > 0.8 * avail:
            # a second copy of the weights would bring in the OOM killer: the file-layout kernels read the map as is
            _note(f"the packed weights ({total / 1e9:.1f} GB) would not fit in the {avail / 1e9:.1f} GB of free "
                  "memory; using the file layout unpacked (slower prefill)")
            return dict(named)
        return {name: kernels.prepare(w, family=family) for name, w in named.items()}

    if use_cache is False or not entries or (use_cache is None and total < MIN_CACHED_BYTES):
        return in_memory()
    found = _cached(named, origin, family, entries, total)
    if found is None:
        return in_memory()
    packed, _ = found
    return {name: packed[name] if name in packed else kernels.prepare(w, family=family) for name, w in named.items()}


def cached_weights(named: dict, origin: dict[str, str], family: str,
                   build: bool = True) -> tuple[dict, Path] | None:
    """The packed form of every packable weight in `named`, mapped from the cache file (built now if missing and
    `build`), and that file's path; None when there is no cache file (weights not from files, no room on disk, or
    none yet and not `build`). Never packs in memory: the memory budget path (experts.py) reads experts from this
    file, or else from the model file, but must not hold a packed copy of them all."""
    family = kernels.resolve_family(family)
    entries, total = _plan(named, family)
    if not entries:
        return None
    return _cached(named, origin, family, entries, total, build)


def _cached(named: dict, origin: dict[str, str], family: str, entries: list[dict],
            total: int, build: bool = True) -> tuple[dict, Path] | None:
    sources = _sources(named, origin, entries)
    if sources is None:
        return None
    descriptor = {"file_version": FILE_VERSION, "layout_version": kernels.PACK_LAYOUT_VERSION,
                  "layout": kernels.layout_of(family),
                  "sources": sources, "entries": entries}
    path = cache_dir() / _file_name(sources, descriptor)
    packed = _open(path, descriptor, named, total, family)
    if packed is None and build:
        packed = _build(path, descriptor, named, total, family)
    return None if packed is None else (packed, path)


def _file_name(sources: list, descriptor: dict) -> str:
    first = Path(sources[0][0])
    model = hashlib.sha256(json.dumps([s[0] for s in sources]).encode()).hexdigest()[:12]
    version = hashlib.sha256(json.dumps(descriptor, sort_keys=True).encode()).hexdigest()[:12]
    return f"{first.stem}-{model}-{version}.mixpack"


def _header_bytes(descriptor: dict) -> bytes:
    body = json.dumps(descriptor, sort_keys=True).encode()
    raw = MAGIC + struct.pack("<Q", len(body)) + body
    return raw + b"\0" * (-len(raw) % ALIGN)


def _arrays(buf, data_start: int, entry: dict) -> list[np.ndarray]:
    """One entry's arrays as views of the mapped file (the planned offsets were checked against its size)."""
    out = []
    for a in entry["arrays"]:
        count = int(np.prod(a["shape"]))
        view = np.frombuffer(buf, dtype=np.dtype(a["dtype"]), count=count, offset=data_start + a["offset"])
        out.append(view.reshape(a["shape"]))
    return out


def _open(path: Path, descriptor: dict, named: dict, total: int, family: str) -> dict | None:
    """The packed weights mapped from an existing cache file, or None if there is none or it does not fit."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            if len(head) < 16 or head[:8] != MAGIC:
                raise ValueError("bad magic")
            (n,) = struct.unpack("<Q", head[8:])
            if n > _MAX_HEADER:
                raise ValueError("header too long")
            stored = json.loads(f.read(n))
            if stored != json.loads(json.dumps(descriptor, sort_keys=True)):
                raise ValueError("made for other weights")
            data_start = 16 + n + (-(16 + n) % ALIGN)
            size = os.fstat(f.fileno()).st_size
            if data_start + total > size:
                raise ValueError(f"truncated ({size} bytes, needs {data_start + total})")
            # copy-on-write keeps the arrays writable (numba compiles one signature for mapped and packed-in-memory
            # weights); nothing writes to them, so every page stays a clean file page
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        _note(f"packed-weight cache {path} is unusable ({e}); rebuilding it")
        return None
    return {e["name"]: kernels.PackedWeight(named[e["name"]].qtype, tuple(e["shape"]),
                                            tuple(_arrays(buf, data_start, e)), family)
            for e in descriptor["entries"]}


def _build(path: Path, descriptor: dict, named: dict, total: int, family: str) -> dict | None:
    """Pack every weight straight into a new cache file; None (pack in memory instead) if the disk has no room."""
    header = _header_bytes(descriptor)
    size = len(header) + total
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(path.parent).free
    except OSError as e:
        _note(f"cannot use the packed-weight cache in {path.parent} ({e}); packing in memory")
        return None
    if free < size + _DISK_MARGIN:
        _note(f"{path.parent} has {free / 1e9:.1f} GB free, the packed weights need {size / 1e9:.1f} GB; "
              "packing in memory")
        return None
    model_prefix = path.name.rsplit("-", 1)[0] + "-"
    for old in path.parent.glob(model_prefix + "*.mixpack"):  # the same model's caches for older file versions
        old.unlink(missing_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    _note(f"repacking {total / 1e9:.2f} GB of weights once into {path}")
    try:
        with open(tmp, "w+b") as f:
            if hasattr(os, "posix_fallocate"):
                # reserve the blocks now: a disk that fills up under a shared mapping signals SIGBUS mid-write
                os.posix_fallocate(f.fileno(), 0, size)
            else:
                f.truncate(size)
            f.write(header)
            f.flush()
            buf = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_WRITE)
            out = {}
            for e in descriptor["entries"]:
                slots = iter(_arrays(buf, len(header), e))
                out[e["name"]] = kernels.prepare(named[e["name"]], alloc=lambda shape, dtype, s=slots: next(s),
                                                 family=family)
            buf.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        _note(f"cannot write the packed-weight cache {path} ({e}); packing in memory")
        return None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out

"""Experts kept and fetched under a memory budget: a fixed pool of slots per block, filled by large reads.

Why: a 4-bit Mixtral is 25-28 GB and most laptops have 16 GB. Run from a memory map (llama.cpp, ollama), every token
faults missing expert pages in 4 KiB at a time and the page cache evicts pages without knowing what an expert is.
Here the dense weights (attention, norms, routers, embedding, head) stay resident, and each block's experts live in
`n_slots` slots of anonymous memory: a slot holds one expert's three matrices (gate, up, down) in the kernels'
runtime form. A missing expert is read from the model file with a few large `pread`s (O_DIRECT where the file
system allows it, so the page cache keeps no second copy; else the pages read are dropped after use) and repacked
into its slot. Which expert leaves is the eviction policy's choice (POLICIES). bench/bench_expert_cache.py replays
them on routing traces: on the trained default model's held-out routing, frequency-based policies keep more of the
experts a block keeps coming back to than LRU does, and LFRU's decay lets that popularity follow the text; it is
the default.

Prefetch: the numba backend asks for block l+1's likely experts (block l+1's router applied to block l's hidden
state, as mixtral-offloading does) while block l computes; an I/O thread reads them into staging buffers, and the
block's `ensure` repacks them when they are really needed (a wrong guess costs one read, nothing is evicted for it).

The pools are ordinary stacked weights with n_slots experts, so the kernels run on them unchanged with slot ids in
place of expert ids: the logits equal the unbudgeted engine's exactly.

A little over 500 lines in one file because its three parts (eviction policies, the reader, the slot store) are
one mechanism with one user, ExpertStore, and no other code reads the reader or the policies.
"""
from __future__ import annotations

import mmap
import os
import re
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numba
import numpy as np
from mixlocal.quant import QStack, QTensor, kernels
from mixlocal.quant.tensor import nbytes_for
from numba import njit

__all__ = ["POLICIES", "ExpertStore", "MemoryBudgetError", "parse_size"]

_ALIGN = 4096  # O_DIRECT wants offsets, lengths and buffers aligned to the logical block size; a page covers it
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000 ** 2, "mb": 1000 ** 2, "g": 1000 ** 3, "gb": 1000 ** 3,
          "t": 1000 ** 4, "tb": 1000 ** 4, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


class MemoryBudgetError(ValueError):
    """A memory budget that cannot be parsed, or that cannot hold the dense weights plus the experts one token
    needs per block."""


def parse_size(value) -> int:
    """Bytes from 17179869184, "16GiB", "16G" (10**9, as disks are sold), "12.5GB", "800MiB"."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        n = int(value)
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([a-zA-Z]*)\s*", str(value))
        if not m or m.group(2).lower() not in _UNITS:
            raise MemoryBudgetError(f"cannot read memory size {value!r}: use bytes or a number with a unit, "
                                    "e.g. 16GiB, 12GB, 800MiB")
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise MemoryBudgetError(f"memory size must be positive, got {value!r}")
    return n


# ---------------------------------------------------------------------------------------------------------------
# eviction policies: each picks the slot to refill among `candidates` (slots whose expert the step does not need)
# ---------------------------------------------------------------------------------------------------------------

class _Policy:
    def __init__(self, n_slots: int, n_experts: int):
        self.clock = 0

    def touch(self, slot: int, expert: int) -> None:
        self.clock += 1

    def victim(self, candidates: list[int], expert_in: np.ndarray) -> int:
        raise NotImplementedError


class LRU(_Policy):
    """The slot used longest ago."""

    def __init__(self, n_slots, n_experts):
        super().__init__(n_slots, n_experts)
        self.last = np.zeros(n_slots, np.int64)

    def touch(self, slot, expert):
        super().touch(slot, expert)
        self.last[slot] = self.clock

    def victim(self, candidates, expert_in):
        return min(candidates, key=lambda s: (expert_in[s] >= 0, self.last[s]))


class LFU(_Policy):
    """The slot whose expert was used least often since the start (ties: least recently)."""

    def __init__(self, n_slots, n_experts):
        super().__init__(n_slots, n_experts)
        self.count = np.zeros(n_experts, np.int64)
        self.last = np.zeros(n_slots, np.int64)

    def touch(self, slot, expert):
        super().touch(slot, expert)
        self.count[expert] += 1
        self.last[slot] = self.clock

    def victim(self, candidates, expert_in):
        return min(candidates, key=lambda s: (expert_in[s] >= 0, self.count[expert_in[s]] if expert_in[s] >= 0
                                              else 0, self.last[s]))


class LFRU(_Policy):
    """Frequency with recency: each use adds 1 to an expert's score, and scores decay by half every `half_life`
    uses of the block, so old popularity fades (the LRFU family)."""

    def __init__(self, n_slots, n_experts, half_life: int = 64):
        super().__init__(n_slots, n_experts)
        self.score = np.zeros(n_experts, np.float64)
        self.stamp = np.zeros(n_experts, np.int64)
        self.decay = 0.5 ** (1.0 / half_life)

    def _now(self, expert):
        return self.score[expert] * self.decay ** (self.clock - self.stamp[expert])

    def touch(self, slot, expert):
        super().touch(slot, expert)
        self.score[expert] = self._now(expert) + 1.0
        self.stamp[expert] = self.clock

    def victim(self, candidates, expert_in):
        return min(candidates, key=lambda s: (expert_in[s] >= 0, self._now(expert_in[s]) if expert_in[s] >= 0
                                              else 0.0))


POLICIES = {"lru": LRU, "lfu": LFU, "lfru": LFRU}


# ---------------------------------------------------------------------------------------------------------------
# where an expert's bytes lie in the model file
# ---------------------------------------------------------------------------------------------------------------

def _file_offset(data: np.ndarray, path: str) -> int | None:
    """Offset of data's first byte in the file `path`, if data is a view of a map of that whole file."""
    root = data
    while isinstance(root.base, np.ndarray):
        root = root.base
    if not isinstance(root.base, (mmap.mmap, memoryview)):
        return None
    whole = np.frombuffer(root.base, np.uint8)  # the map itself, from its first byte
    try:
        if whole.nbytes != os.path.getsize(path):
            return None
    except OSError:
        return None
    off = data.ctypes.data - whole.ctypes.data
    return off if 0 <= off and off + data.nbytes <= whole.nbytes else None


def _expert_reads(w, path: str) -> list[list[tuple[int, int]]] | None:
    """Per expert of a stacked (E, N, K) weight, the (offset, nbytes) of each array to read from `path`: the file
    layout's rows (one read), or a packed cache's arrays (one read per array); None if w is not mapped from path."""
    if isinstance(w, kernels.PackedWeight):
        per_array = []
        for a in w.arrays:
            off = _file_offset(a, path)
            if off is None:
                return None
            per_array.append((off, a[0].nbytes))
        return [[(off + e * n, n) for off, n in per_array] for e in range(w.shape[0])]
    if isinstance(w, QStack):
        out = []
        for m in w.mats:
            off = _file_offset(m.data, path)
            if off is None:
                return None
            out.append([(off, m.data.nbytes)])
        return out
    if not isinstance(w, QTensor) or len(w.shape) != 3:
        return None
    off = _file_offset(w.data, path)
    if off is None:
        return None
    n_exp, n, k = w.shape
    per = nbytes_for(w.qtype, (n, k))
    return [[(off + e * per, per)] for e in range(n_exp)]


class _Reader:
    """Large reads from one file: O_DIRECT into page-aligned buffers where the file system takes it, else plain
    reads after which the pages read are dropped from the page cache (so the file is not held twice)."""

    def __init__(self, path: str):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        self.direct_fd = None
        # Windows has no positional reads: one file object, seek + readinto under a lock
        self._file = None if hasattr(os, "preadv") else open(path, "rb", buffering=0)  # noqa: SIM115
        self._file_lock = threading.Lock()
        if hasattr(os, "O_DIRECT"):
            try:
                self.direct_fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
            except OSError:
                self.direct_fd = None

    def read_into(self, buf: memoryview, offset: int, nbytes: int) -> memoryview:
        """Read nbytes at offset; returns a view of them inside buf (sized by window_bytes)."""
        if self.direct_fd is not None:
            start = offset - offset % _ALIGN
            end = -(-(offset + nbytes) // _ALIGN) * _ALIGN
            try:
                self._read_fully(self.direct_fd, buf[:end - start], start)
                return buf[offset - start:offset - start + nbytes]
            except OSError:  # e.g. EINVAL: this file system refuses O_DIRECT after all
                os.close(self.direct_fd)
                self.direct_fd = None
        got = self._read_fully(self.fd, buf[:nbytes], offset, allow_short=False)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, offset, nbytes, os.POSIX_FADV_DONTNEED)
        return got

    def _pread(self, fd: int, view: memoryview, offset: int) -> int:
        if self._file is None:
            return os.preadv(fd, [view], offset)
        with self._file_lock:
            self._file.seek(offset)
            return self._file.readinto(view)

    def _read_fully(self, fd: int, view: memoryview, offset: int, allow_short: bool = True) -> memoryview:
        done = 0
        while done < len(view):
            n = self._pread(fd, view[done:], offset + done)
            if n == 0:
                if allow_short and done:  # O_DIRECT past the end of file: the tail is simply shorter
                    break
                raise OSError(f"unexpected end of file at {offset + done}")
            done += n
        return view

    @staticmethod
    def window_bytes(nbytes: int) -> int:
        return nbytes + 2 * _ALIGN

    def close(self) -> None:
        for fd in (self.fd, self.direct_fd):
            if fd is not None:
                os.close(fd)
        self.fd = self.direct_fd = None
        if self._file is not None:
            self._file.close()


def _aligned_buffer(nbytes: int) -> memoryview:
    """Page-aligned anonymous memory (what O_DIRECT needs)."""
    return memoryview(mmap.mmap(-1, max(nbytes, 1)))


# ---------------------------------------------------------------------------------------------------------------
# the store
# ---------------------------------------------------------------------------------------------------------------

MATS = ("w1", "w3", "w2")  # gate, up, down: a slot holds all three of one expert
_IO_THREADS = 2


@dataclass
class ExpertStats:
    hits: int = 0
    misses: int = 0
    prefetched: int = 0       # reads started on a guess
    prefetch_used: int = 0    # ... that the block then needed
    bytes_read: int = 0
    wait_s: float = 0.0       # time the compute thread waited for reads (and their repacking)
    copy_s: float = 0.0       # time the compute thread spent copying staged experts into slots
    per_block: list = field(default_factory=list)

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 1.0


class _Staging:
    """One expert read (and repacked) ahead of its slot: each matrix in the pool's runtime form, one expert deep."""

    def __init__(self, pools: dict):
        self.arrays = {name: tuple(_aligned_array((1,) + a.shape[1:], a.dtype) for a in _pool_arrays(w))
                       for name, w in pools.items()}
        self.future: Future | None = None
        self.key: tuple[int, int] | None = None  # (block, expert)


def _pool_arrays(w) -> tuple[np.ndarray, ...]:
    """A pool's arrays, each with the slot axis first (a file-layout pool is one (n_slots, bytes) array)."""
    if isinstance(w, kernels.PackedWeight):
        return w.arrays
    return (w.data.reshape(w.shape[0], -1),)


def _aligned_array(shape, dtype) -> np.ndarray:
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return np.frombuffer(_aligned_buffer(nbytes), np.uint8, count=nbytes).view(dtype).reshape(shape)


@njit(nogil=True, cache=True)
def _pack2(pack, rows, a, b):
    pack(rows, a, b)


@njit(nogil=True, cache=True)
def _pack3(pack, rows, a, b, c):
    pack(rows, a, b, c)


class ExpertStore:
    """Slots for every block's experts, filled on demand (ensure) and on guesses (prefetch).

    layers: per block {"w1", "w3", "w2"}: the stacked expert weights to read from, either the model file's QTensor
    (or QStack) of `path`, or the PackedWeight mapped from the packed-weight cache file `path`, whose bytes are
    already in the kernels' form (nothing to repack)."""

    def __init__(self, layers: list[dict], path: str, n_experts: int, n_slots: int, family: str,
                 policy: str = "lfru", n_staging: int = 2):
        if policy not in POLICIES:
            raise MemoryBudgetError(f"unknown eviction policy {policy!r}; choose {', '.join(POLICIES)}")
        self.family, self.n_experts, self.n_slots = family, n_experts, n_slots
        self.reader = _Reader(path)
        self.sources = []   # per block: {mat: per expert, [(offset, nbytes)] of each array to read}
        self.pools = []     # per block: {mat: stacked weight with n_slots experts}
        self.qtypes = []
        for lw in layers:
            src, pool, qt = {}, {}, {}
            for name in MATS:
                w = lw[name]
                src[name] = _expert_reads(w, path)
                if src[name] is None:
                    raise MemoryBudgetError(f"{name} experts are not read from {path}: a memory budget needs the "
                                            "experts in the model file (not made at load, e.g. by quant=)")
                qt[name] = w.qtype
                pool[name] = self._make_pool(w.qtype, tuple(w.shape[1:]))
            self.sources.append(src)
            self.pools.append(pool)
            self.qtypes.append(qt)
        self.repack = not isinstance(layers[0]["w1"], kernels.PackedWeight)
        self.slot_of = np.full((len(layers), n_experts), -1, np.int64)
        self.expert_in = np.full((len(layers), n_slots), -1, np.int64)
        self.policies = [POLICIES[policy](n_slots, n_experts) for _ in layers]
        self.stats = ExpertStats(per_block=[[0, 0] for _ in layers])
        largest = max(n for s in self.sources for per in s.values() for reads in per for _, n in reads)
        self._window_bytes = _Reader.window_bytes(largest)
        self._local = threading.local()  # each I/O thread's read buffer
        self.staging = [_Staging(self.pools[0]) for _ in range(n_staging)]
        # two I/O threads, so that one reads while the other repacks what it read (each repack on one core)
        self._io = ThreadPoolExecutor(max_workers=_IO_THREADS, thread_name_prefix="mixlocal-experts",
                                      initializer=numba.set_num_threads, initargs=(1,))
        self._lock = threading.Lock()
        self._closed = False

    # -- sizes ----------------------------------------------------------------------------------------------------

    def _make_pool(self, qtype, shape):
        n, k = shape
        if qtype in kernels.packed_types(self.family):
            arrays = tuple(np.zeros(s, d) for s, d in
                           kernels.packed_shapes(qtype, self.n_slots, n, k, kernels.layout_of(self.family)))
            return kernels.PackedWeight(qtype, (self.n_slots, n, k), arrays, self.family)
        return QTensor(qtype, (self.n_slots, n, k), np.zeros(nbytes_for(qtype, (self.n_slots, n, k)), np.uint8))

    @staticmethod
    def slot_bytes(layer: dict, family: str) -> int:
        """Memory one slot takes: one expert's three matrices in the kernels' runtime form."""
        total = 0
        for name in MATS:
            w = layer[name]
            _, n, k = w.shape
            if w.qtype in kernels.packed_types(family):
                total += sum(int(np.prod(s)) * d.itemsize
                             for s, d in kernels.packed_shapes(w.qtype, 1, n, k, kernels.layout_of(family)))
            else:
                total += nbytes_for(w.qtype, (n, k))
        return total

    @staticmethod
    def largest_read(layer: dict, family: str) -> int:
        """The most one read brings: one matrix of one expert, in the file's layout or its packed form."""
        out = 0
        for name in MATS:
            w = layer[name]
            _, n, k = w.shape
            out = max(out, nbytes_for(w.qtype, (n, k)))
            if w.qtype in kernels.packed_types(family):
                out = max(out, max(int(np.prod(s)) * d.itemsize for s, d in
                                   kernels.packed_shapes(w.qtype, 1, n, k, kernels.layout_of(family))))
        return out

    @staticmethod
    def staging_bytes(slot: int, largest_read: int, n_staging: int = 2) -> int:
        """Memory besides the slots: the staged experts and the I/O threads' read windows."""
        return n_staging * slot + _IO_THREADS * _Reader.window_bytes(largest_read)

    @property
    def nbytes(self) -> int:
        pools = sum(a.nbytes for p in self.pools for w in p.values() for a in _pool_arrays(w))
        staged = sum(a.nbytes for st in self.staging for arrays in st.arrays.values() for a in arrays)
        return pools + staged + _IO_THREADS * self._window_bytes

    # -- reads ----------------------------------------------------------------------------------------------------

    def _read(self, arrays: dict, block: int, expert: int) -> None:
        """On an I/O thread: the expert's three matrices into `arrays` ({mat: its arrays, expert axis of 1}: a
        staging buffer, or the slot itself), repacked for the kernels if read from the model file (the repack runs
        here, without the GIL, on one core, while the compute thread goes on)."""
        window = getattr(self._local, "window", None)
        if window is None:
            window = self._local.window = _aligned_buffer(self._window_bytes)
        n_read = 0
        for name in MATS:
            reads, dst = self.sources[block][name][expert], arrays[name]
            if self.repack and isinstance(self.pools[block][name], kernels.PackedWeight):
                (offset, nbytes), = reads
                raw = np.frombuffer(self.reader.read_into(window, offset, nbytes), np.uint8)
                pool = self.pools[block][name]
                rows = raw.reshape(pool.shape[1], -1)
                pack = kernels.packer(self.qtypes[block][name], kernels.layout_of(self.family))
                outs = [a[0].view(np.uint8) if a.dtype == np.int8 else a[0] for a in dst]
                (_pack2 if len(outs) == 2 else _pack3)(pack, rows, *outs)
            else:  # bytes already in the pool's form: the packed cache's arrays, or a file-layout pool
                for (offset, nbytes), a in zip(reads, dst):
                    a.reshape(-1).view(np.uint8)[:] = np.frombuffer(
                        self.reader.read_into(window, offset, nbytes), np.uint8)
            n_read += sum(n for _, n in reads)
        with self._lock:
            self.stats.bytes_read += n_read

    def _start(self, block: int, expert: int) -> _Staging | None:
        """Begin reading (block, expert) into a free staging buffer; None if every buffer is busy."""
        for st in self.staging:
            if st.key is None:
                st.key = (block, expert)
                st.future = self._io.submit(self._read, st.arrays, block, expert)
                return st
        return None

    def _staged(self, block: int, expert: int) -> _Staging | None:
        for st in self.staging:
            if st.key == (block, expert):
                return st
        return None

    def prefetch(self, block: int, experts) -> None:
        """Start reading the experts of `block` that are guessed and not resident (best effort, never blocks)."""
        if self._closed:
            return
        for e in experts:
            e = int(e)
            if self.slot_of[block, e] >= 0 or self._staged(block, e) is not None:
                continue
            st = self._start(block, e)
            if st is None:
                return
            self.stats.prefetched += 1

    def _drop_stale(self, block: int) -> None:
        """Free the buffers of finished guesses for blocks other than this one and the next."""
        keep = (block, (block + 1) % len(self.pools))
        for st in self.staging:
            if st.key is not None and st.key[0] not in keep and st.future.done():
                st.key, st.future = None, None

    # -- the step's experts ---------------------------------------------------------------------------------------

    def ensure(self, block: int, experts: np.ndarray) -> np.ndarray:
        """Make the experts of `block` resident (at most n_slots distinct); returns their slot ids, same shape."""
        need = np.unique(experts)
        if len(need) > self.n_slots:
            raise MemoryBudgetError(f"block {block} needs {len(need)} experts at once, only {self.n_slots} slots")
        slot_of, expert_in, pol = self.slot_of[block], self.expert_in[block], self.policies[block]
        self._drop_stale(block)
        busy = {int(slot_of[e]) for e in need if slot_of[e] >= 0}
        missing = [int(e) for e in need if slot_of[e] < 0]
        hits = len(need) - len(missing)
        self.stats.hits += hits
        self.stats.misses += len(missing)
        self.stats.per_block[block][0] += hits
        self.stats.per_block[block][1] += len(missing)
        def claim(e: int) -> int:  # the slot expert e will take: the policy's victim among those not needed now
            slot = pol.victim([s for s in range(self.n_slots) if s not in busy], expert_in)
            old = expert_in[slot]
            if old >= 0:
                slot_of[old] = -1
            expert_in[slot] = -1
            busy.add(slot)
            return slot

        # experts read on a guess are copied from their staging buffer; the rest are read straight into the slot
        # they take (no copy), all reads started before the first wait
        pending = []
        for e in missing:
            st = self._staged(block, e)
            if st is not None:
                self.stats.prefetch_used += 1
                pending.append((e, claim(e), st, st.future))
            else:
                slot = claim(e)
                target = {name: tuple(a[slot:slot + 1] for a in _pool_arrays(self.pools[block][name]))
                          for name in MATS}
                pending.append((e, slot, None, self._io.submit(self._read, target, block, e)))
        for e, slot, st, future in pending:
            t0 = time.perf_counter()
            future.result()
            t1 = time.perf_counter()
            if st is not None:
                self._fill(block, slot, st)
                st.key, st.future = None, None
            slot_of[e], expert_in[slot] = slot, e
            self.stats.wait_s += t1 - t0
            self.stats.copy_s += time.perf_counter() - t1
        for e in need:
            pol.touch(int(slot_of[e]), int(e))
        return slot_of[experts]

    def _fill(self, block: int, slot: int, st: _Staging) -> None:
        """Copy a staged expert into slot `slot` of the block's pools."""
        for name in MATS:
            for pool_array, staged in zip(_pool_arrays(self.pools[block][name]), st.arrays[name]):
                pool_array[slot] = staged[0].reshape(pool_array.shape[1:])

    def close(self) -> None:
        """Stop the I/O thread (reads in flight finish) and close the file."""
        if self._closed:
            return
        self._closed = True
        self._io.shutdown(wait=True, cancel_futures=True)
        self.reader.close()

    def __del__(self):
        if not getattr(self, "_closed", True):  # a store dropped without close(): still let its thread go
            self.close()

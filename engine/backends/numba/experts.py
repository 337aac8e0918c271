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
state, as mixtral-offloading does) while block l computes; an I/O thread reads and repacks them straight into the
slots the policy gives up (nothing is copied when the guess is right; a wrong guess costs a read and an eviction).

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

__all__ = ["POLICIES", "ExpertStore", "MemoryBudgetError", "parse_size", "slot_range"]

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
    per_block: list = field(default_factory=list)

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 1.0


def _pool_arrays(w) -> tuple[np.ndarray, ...]:
    """A pool's arrays, each with the slot axis first (a file-layout pool is one (n_slots, bytes) array)."""
    if isinstance(w, kernels.PackedWeight):
        return w.arrays
    return (w.data.reshape(w.shape[0], -1),)


@njit(nogil=True, cache=True)
def _pack2(pack, rows, a, b):
    pack(rows, a, b)


@njit(nogil=True, cache=True)
def _pack3(pack, rows, a, b, c):
    pack(rows, a, b, c)


def slot_range(per_block) -> str:
    """'4' or '4-5': slots per block as messages say them."""
    lo, hi = min(per_block), max(per_block)
    return str(lo) if lo == hi else f"{lo}-{hi}"


class ExpertStore:
    """Slots for every block's experts, filled on demand (ensure) and on guesses (prefetch).

    layers: per block {"w1", "w3", "w2"}: the stacked expert weights to read from, either the model file's QTensor
    (or QStack) of `path`, or the PackedWeight mapped from the packed-weight cache file `path`, whose bytes are
    already in the kernels' form (nothing to repack). n_slots: slots per block, one count for all or one per block
    (a budget that does not divide evenly gives some blocks one more)."""

    def __init__(self, layers: list[dict], path: str, n_experts: int, n_slots, family: str,
                 policy: str = "lfru"):
        if policy not in POLICIES:
            raise MemoryBudgetError(f"unknown eviction policy {policy!r}; choose {', '.join(POLICIES)}")
        per_block = [int(n_slots)] * len(layers) if np.ndim(n_slots) == 0 else [int(n) for n in n_slots]
        if len(per_block) != len(layers) or min(per_block) < 1:
            raise MemoryBudgetError(f"slots per block {n_slots!r} do not fit {len(layers)} blocks")
        self.family, self.n_experts, self.slots_per_block = family, n_experts, tuple(per_block)
        self.reader = _Reader(path)
        self.sources = []   # per block: {mat: per expert, [(offset, nbytes)] of each array to read}
        self.pools = []     # per block: {mat: stacked weight with that block's slot count}
        self.qtypes = []
        for lw, n in zip(layers, per_block):
            src, pool, qt = {}, {}, {}
            for name in MATS:
                w = lw[name]
                src[name] = _expert_reads(w, path)
                if src[name] is None:
                    raise MemoryBudgetError(f"{name} experts are not read from {path}: a memory budget needs the "
                                            "experts in the model file (not made at load, e.g. by quant=)")
                qt[name] = w.qtype
                pool[name] = self._make_pool(w.qtype, n, tuple(w.shape[1:]))
            self.sources.append(src)
            self.pools.append(pool)
            self.qtypes.append(qt)
        self.repack = not isinstance(layers[0]["w1"], kernels.PackedWeight)
        self.slot_of = np.full((len(layers), n_experts), -1, np.int64)
        self.expert_in = [np.full(n, -1, np.int64) for n in per_block]
        # reads into a slot not yet waited for (guesses, and demand reads until ensure collects them), and the slots
        # filled on a guess that no step has used yet
        self.pending: list[dict[int, Future]] = [{} for _ in layers]
        self.guessed: list[set[int]] = [set() for _ in layers]
        self.policies = [POLICIES[policy](n, n_experts) for n in per_block]
        self.stats = ExpertStats(per_block=[[0, 0] for _ in layers])
        largest = max(n for s in self.sources for per in s.values() for reads in per for _, n in reads)
        self._window_bytes = _Reader.window_bytes(largest)
        self._local = threading.local()  # each I/O thread's read buffer
        # two I/O threads, so that one reads while the other repacks what it read (each repack on one core)
        self._io = ThreadPoolExecutor(max_workers=_IO_THREADS, thread_name_prefix="mixlocal-experts",
                                      initializer=numba.set_num_threads, initargs=(1,))
        self._lock = threading.Lock()
        self._closed = False

    @property
    def n_slots(self) -> int:
        """The fewest slots any block has: at most this many distinct experts are ever needed at once."""
        return min(self.slots_per_block)

    def describe_slots(self) -> str:
        """'4' or '4-5': the slots per block, for messages."""
        return slot_range(self.slots_per_block)

    # -- sizes ----------------------------------------------------------------------------------------------------

    def _make_pool(self, qtype, n_slots: int, shape):
        n, k = shape
        if qtype in kernels.packed_types(self.family):
            arrays = tuple(np.zeros(s, d) for s, d in
                           kernels.packed_shapes(qtype, n_slots, n, k, kernels.layout_of(self.family)))
            return kernels.PackedWeight(qtype, (n_slots, n, k), arrays, self.family)
        return QTensor(qtype, (n_slots, n, k), np.zeros(nbytes_for(qtype, (n_slots, n, k)), np.uint8))

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
    def io_bytes(largest_read: int) -> int:
        """Memory besides the slots: the I/O threads' read windows."""
        return _IO_THREADS * _Reader.window_bytes(largest_read)

    @property
    def nbytes(self) -> int:
        pools = sum(a.nbytes for p in self.pools for w in p.values() for a in _pool_arrays(w))
        return pools + _IO_THREADS * self._window_bytes

    # -- reads ----------------------------------------------------------------------------------------------------

    def _read(self, arrays: dict, block: int, expert: int) -> None:
        """On an I/O thread: the expert's three matrices into `arrays` ({mat: its slot's arrays, slot axis of 1}),
        repacked for the kernels if read from the model file (the repack runs here, without the GIL, on one core,
        while the compute thread goes on)."""
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

    def _fill(self, block: int, slot: int, expert: int) -> None:
        """Start reading `expert` straight into `slot` (the caller has freed it); the read is pending until waited."""
        target = {name: tuple(a[slot:slot + 1] for a in _pool_arrays(self.pools[block][name])) for name in MATS}
        self.expert_in[block][slot] = expert
        self.slot_of[block, expert] = slot
        self.pending[block][slot] = self._io.submit(self._read, target, block, expert)

    def _free(self, block: int, slot: int) -> None:
        """Empty `slot` for a new expert: a read still writing into it finishes first."""
        future = self.pending[block].pop(slot, None)
        if future is not None:
            t0 = time.perf_counter()
            future.result()
            self.stats.wait_s += time.perf_counter() - t0
        self.guessed[block].discard(slot)  # a guess never used: its read was wasted
        old = self.expert_in[block][slot]
        if old >= 0:
            self.slot_of[block, old] = -1
        self.expert_in[block][slot] = -1

    def _victim(self, block: int, keep: set, idle_only: bool = False) -> int | None:
        """The policy's choice among the block's slots outside `keep`, preferring slots no read is writing into
        (taking only those if idle_only); None if there is none."""
        free = [s for s in range(self.slots_per_block[block]) if s not in keep]
        idle = [s for s in free if s not in self.pending[block] or self.pending[block][s].done()]
        candidates = idle if idle or idle_only else free
        return self.policies[block].victim(candidates, self.expert_in[block]) if candidates else None

    def prefetch(self, block: int, experts) -> None:
        """Start reading the guessed experts of `block` that are not resident, each straight into the slot the
        policy would give up next (as mixtral-offloading does): nothing is copied when the guess is right, and a
        wrong guess costs one read and one eviction. Never waits."""
        if self._closed:
            return
        guess = [int(e) for e in experts]
        keep = {int(self.slot_of[block, e]) for e in guess if self.slot_of[block, e] >= 0}
        for e in guess:
            if self.slot_of[block, e] >= 0:
                continue
            # never wait here: a slot whose earlier read is still running is not taken for a guess
            slot = self._victim(block, keep, idle_only=True)
            if slot is None:
                return
            self._free(block, slot)
            keep.add(slot)
            self._fill(block, slot, e)
            self.guessed[block].add(slot)
            self.stats.prefetched += 1

    # -- the step's experts ---------------------------------------------------------------------------------------

    def ensure(self, block: int, experts: np.ndarray, then_prefetch: tuple | None = None) -> np.ndarray:
        """Make the experts of `block` resident (at most its slot count distinct); returns their slot ids, same
        shape. then_prefetch: (block, guessed experts) to prefetch once this block's own reads are queued, so that
        guesses for the next block never delay the reads this one waits for."""
        need = [int(e) for e in np.unique(experts)]
        if len(need) > self.slots_per_block[block]:
            raise MemoryBudgetError(f"block {block} needs {len(need)} experts at once, only "
                                    f"{self.slots_per_block[block]} slots")
        slot_of = self.slot_of[block]
        keep = {int(slot_of[e]) for e in need if slot_of[e] >= 0}
        hits = 0
        for e in need:
            slot = int(slot_of[e])
            if slot < 0:
                continue
            if slot in self.guessed[block]:  # read on a guess: a disk read all the same, but started early
                self.guessed[block].discard(slot)
                self.stats.prefetch_used += 1
            else:
                hits += 1
        for e in need:
            if slot_of[e] < 0:
                slot = self._victim(block, keep)
                self._free(block, slot)
                keep.add(slot)
                self._fill(block, slot, e)
        if then_prefetch is not None:
            self.prefetch(*then_prefetch)
        misses = len(need) - hits
        self.stats.hits += hits
        self.stats.misses += misses
        self.stats.per_block[block][0] += hits
        self.stats.per_block[block][1] += misses
        t0 = time.perf_counter()
        for e in need:
            future = self.pending[block].pop(int(slot_of[e]), None)
            if future is not None:
                future.result()
        self.stats.wait_s += time.perf_counter() - t0
        pol = self.policies[block]
        for e in need:
            pol.touch(int(slot_of[e]), e)
        return slot_of[np.asarray(experts)]

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

"""Experts under a memory budget (engine/backends/numba/experts.py): the same logits as with every expert resident, with
slots few enough to force evictions; budgets that cannot work fail at load with the numbers; reads bypass or drop
the page cache; the I/O thread stops on close and on Ctrl-C."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import gguf
import numpy as np
import pytest
from mixlocal.engine.backends.numba.backend import BUDGET_MARGIN
from mixlocal.engine.backends.numba.experts import (
    LFRU,
    LFU,
    LRU,
    ExpertStore,
    MemoryBudgetError,
    _Reader,
    parse_size,
)

from mixlocal import engine

N_CTX = 256


def budget_for(llm, n_slots: int) -> int:
    """The mem_budget that leaves exactly n_slots expert slots per block for llm's model."""
    b = llm.backend.budget
    kv = llm.cache.bytes_per_token * N_CTX
    layer = {m: getattr(llm.backend.w.layers[0], m) for m in ("w1", "w3", "w2")}
    io = ExpertStore.io_bytes(ExpertStore.largest_read(layer, llm.backend.kernels))
    return b["dense"] + io + n_slots * b["slot"] * llm.config.n_layers + kv + BUDGET_MARGIN + 1


@pytest.fixture(scope="module")
def full():
    llm = engine.load(n_ctx=N_CTX, kv_type="f32")
    assert llm.backend.store is None  # the embedded model fits: no budget path
    return llm


def prompt(llm) -> list[int]:
    return llm.tokenizer.encode("Once upon a time, a small dragon found a book of spells in the library")


@pytest.mark.parametrize("n_slots", [2, 3, 6])
def test_budgeted_logits_equal_unbudgeted(full, n_slots):
    ids = prompt(full)
    full.reset()
    want_prefill = full.eval(ids)
    want_steps = [full.eval([t]) for t in ids[:8]]
    with engine.load(n_ctx=N_CTX, kv_type="f32", mem_budget=budget_for(full, n_slots)) as llm:
        store = llm.backend.store
        assert store is not None and store.n_slots == n_slots
        assert llm.backend.fused_decode
        assert np.array_equal(llm.eval(ids), want_prefill)
        for t, want in zip(ids[:8], want_steps):
            assert np.array_equal(llm.eval([t]), want)
        s = store.stats
        assert s.misses > 0 and s.bytes_read >= s.misses * llm.backend.budget["slot"] // 2
        if n_slots < 8:
            # the prompt's tokens use more experts per block than there are slots: experts were evicted
            assert s.misses > n_slots * llm.config.n_layers
        assert 0 <= s.prefetch_used <= s.prefetched


def test_leftover_budget_gives_some_blocks_one_more_slot(full):
    """A budget between two whole slot counts is not wasted: the first blocks get one slot more, and the logits stay
    exact."""
    ids = prompt(full)
    full.reset()
    want = full.eval(ids)
    want_steps = [full.eval([t]) for t in ids[:6]]
    budget = budget_for(full, 3) + 2 * full.backend.budget["slot"]
    with engine.load(n_ctx=N_CTX, kv_type="f32", mem_budget=budget) as llm:
        store = llm.backend.store
        assert list(store.slots_per_block) == [4, 4] + [3] * (llm.config.n_layers - 2)
        assert [p["w1"].shape[0] for p in store.pools] == list(store.slots_per_block)
        assert store.describe_slots() == "3-4"
        assert llm.backend.budget["resident_experts"] == sum(store.slots_per_block) * llm.backend.budget["slot"]
        assert np.array_equal(llm.eval(ids), want)
        for t, w in zip(ids[:6], want_steps):
            assert np.array_equal(llm.eval([t]), w)
        assert store.stats.prefetched > 0  # decode guessed, and read the guesses straight into slots


def test_blocks_with_larger_experts_cost_more_per_slot(tmp_path):
    """A mix whose blocks carry different expert types (q4_k_m gives some blocks' ffn_down more bits): the budget
    prices each block's slots at its own size, the pools take each block's own shapes, and the logits stay exact."""
    from mixlocal.engine.export import write_gguf
    from mixlocal.engine.loader import open_source
    _, weights, tokenizer, _ = open_source(None)
    path = write_gguf(weights, tokenizer, tmp_path / "mix.gguf", level="q4_k_m")
    ref = engine.load(path, n_ctx=N_CTX, kv_type="f32")
    sizes = {ExpertStore.slot_bytes({m: getattr(lw, m) for m in ("w1", "w3", "w2")}, ref.backend.kernels)
             for lw in ref.backend.w.layers}
    assert len(sizes) > 1, "the mix should give blocks different expert sizes"
    ids = prompt(ref)
    want = ref.eval(ids)
    # three slots of the largest block's size per block, and room for one more in the two blocks of smallest slots
    budget = budget_for(ref, 3) + 2 * min(sizes) - ref.config.n_layers * (max(sizes) - min(sizes)) + 1
    with engine.load(path, n_ctx=N_CTX, kv_type="f32", mem_budget=budget) as llm:
        b, store = llm.backend.budget, llm.backend.store
        size_of = [ExpertStore.slot_bytes({m: getattr(lw, m) for m in ("w1", "w3", "w2")}, llm.backend.kernels)
                   for lw in llm.backend.w.layers]
        assert b["resident_experts"] == sum(n * z for n, z in zip(store.slots_per_block, size_of))
        assert b["resident_experts"] + b["dense"] + b["io"] <= b["budget"]
        assert b["budget"] - b["resident_experts"] - b["dense"] - b["io"] < min(sizes)  # nothing left unused
        assert min(store.slots_per_block) >= 3 and max(store.slots_per_block) > min(store.slots_per_block)
        assert store.nbytes == b["resident_experts"] + b["io"]
        assert np.array_equal(llm.eval(ids), want)
        assert store.stats.misses > 0


def test_budget_reads_experts_already_packed_from_the_cache_file(full, tmp_path, monkeypatch):
    """With a packed-weight cache file, a missing expert's bytes are read from it as they are: no repack."""
    monkeypatch.setenv("MIXLOCAL_CACHE_DIR", str(tmp_path))
    ids = prompt(full)
    full.reset()
    want = full.eval(ids)
    with engine.load(n_ctx=N_CTX, kv_type="f32", packed_cache=True, mem_budget=budget_for(full, 3)) as llm:
        store = llm.backend.store
        assert not store.repack and store.reader.path.startswith(str(tmp_path))
        assert np.array_equal(llm.eval(ids), want)
        assert store.stats.misses > 0


def test_budget_uses_a_whole_model_cache_but_writes_one_only_when_asked(full, tmp_path, monkeypatch):
    """A model that does not fit in memory would take its size again on disk as a packed cache: by default the
    budget path repacks missing experts from the model file and writes no cache of them; packed_cache=True writes
    one, and later default loads read experts from it."""
    from mixlocal.engine.backends.numba import backend as numba_backend
    monkeypatch.setenv("MIXLOCAL_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(numba_backend, "MIN_CACHED_BYTES", 0)  # the embedded model stands for a large one
    budget = budget_for(full, 3)
    ids = prompt(full)
    full.reset()
    want = full.eval(ids)

    def expert_caches():
        return [p for p in tmp_path.rglob("*.mixpack") if p.stat().st_size > full.backend.budget["experts"]]

    with engine.load(n_ctx=N_CTX, kv_type="f32", mem_budget=budget) as llm:
        assert llm.backend.store.repack and not expert_caches()
        assert np.array_equal(llm.eval(ids), want)
    with engine.load(n_ctx=N_CTX, kv_type="f32", mem_budget=budget, packed_cache=True) as llm:
        assert not llm.backend.store.repack and len(expert_caches()) == 1
    with engine.load(n_ctx=N_CTX, kv_type="f32", mem_budget=budget) as llm:
        assert not llm.backend.store.repack
        assert np.array_equal(llm.eval(ids), want)


def test_budget_on_file_layout_and_per_expert_tensors(hf_model_dir, tmp_path):
    """A format the kernels do not repack (Q4_1: slots hold file bytes) in an early-Mixtral GGUF (one tensor per
    expert), written by gguf-py."""
    from gguf_fixtures import write_gguf_with_gguf_py
    path = write_gguf_with_gguf_py(hf_model_dir, tmp_path / "q4_1.gguf", gguf.GGMLQuantizationType.Q4_1,
                                   per_expert=True)
    ref = engine.load(path, n_ctx=N_CTX, kv_type="f32")
    ids = list(range(3, 40))
    want = ref.eval(ids)
    with engine.load(path, n_ctx=N_CTX, kv_type="f32", mem_budget=budget_for(ref, 2)) as llm:
        assert llm.backend.store.n_slots == 2
        assert np.array_equal(llm.eval(ids), want)
        assert llm.backend.store.stats.misses > 0


def test_too_small_budget_is_a_clear_error(full):
    with pytest.raises(MemoryBudgetError, match="cannot hold the dense weights"):
        engine.load(n_ctx=N_CTX, kv_type="f32", mem_budget=budget_for(full, 1))
    with pytest.raises(MemoryBudgetError, match="KV cache"):
        engine.load(n_ctx=N_CTX, kv_type="f32", mem_budget="100MiB")
    with pytest.raises(ValueError, match="cannot read memory size"):
        engine.load(n_ctx=N_CTX, mem_budget="sixteen gigs")


def test_quantized_at_load_cannot_be_budgeted():
    """Weights made at load (quant=) are not in any file, so nothing could read an evicted expert back."""
    q4 = engine.load(n_ctx=N_CTX, kv_type="f32", quant="q4_0")
    with pytest.raises(MemoryBudgetError, match="model file"):
        engine.load(n_ctx=N_CTX, kv_type="f32", quant="q4_0", mem_budget=budget_for(q4, 2))


def test_parse_size():
    assert parse_size("16GiB") == 16 << 30
    assert parse_size("12GB") == 12 * 10**9
    assert parse_size("800MiB") == 800 << 20
    assert parse_size(" 1.5 gib ") == 3 << 29
    assert parse_size(4096) == 4096
    for bad in ("", "GiB", "-1GiB", "12 parsecs", 0, True):
        with pytest.raises(MemoryBudgetError):
            parse_size(bad)


def test_eviction_policies_pick_as_documented():
    expert_in = np.array([0, 1, 2], np.int64)
    lru, lfu, lfru = LRU(3, 8), LFU(3, 8), LFRU(3, 8, half_life=2)
    # expert 0 used three times long ago, 1 once long ago, 2 once just now
    for slot, e in [(0, 0), (0, 0), (0, 0), (1, 1), (2, 2)]:
        for p in (lru, lfu, lfru):
            p.touch(slot, e)
    assert lru.victim([0, 1, 2], expert_in) == 0    # least recently used
    assert lfu.victim([0, 1, 2], expert_in) == 1    # least often (tie with 2 broken by age)
    for _ in range(12):                             # expert 2 becomes busy; 0's old count decays away
        lfru.touch(2, 2)
    assert lfru.victim([0, 1], expert_in) == 1       # decayed: 0 (three uses) still outweighs 1 (one use)
    empty = np.array([0, -1, 2], np.int64)
    assert all(p.victim([0, 1, 2], empty) == 1 for p in (lru, lfu, lfru))  # an empty slot first


@pytest.mark.parametrize("direct", [True, False], ids=["o_direct", "buffered"])
def test_reader_returns_the_file_bytes(tmp_path, direct):
    """O_DIRECT where the file system allows it; plain reads that then drop the pages where it does not."""
    from mixlocal.engine.backends.numba.experts import _aligned_buffer
    path = tmp_path / "data.bin"
    data = np.random.default_rng(0).integers(0, 256, 3 * 4096 + 123, dtype=np.uint8)
    data.tofile(path)
    r = _Reader(str(path))
    if direct and r.direct_fd is None:
        pytest.skip("this file system refuses O_DIRECT")
    if not direct and r.direct_fd is not None:
        os.close(r.direct_fd)
        r.direct_fd = None
    buf = _aligned_buffer(_Reader.window_bytes(len(data)))
    for off, n in [(0, 4096), (17, 5000), (4095, 2), (len(data) - 300, 300)]:
        got = np.frombuffer(r.read_into(buf, off, n), np.uint8)
        assert np.array_equal(got, data[off:off + n]), (off, n)
    assert (r.direct_fd is not None) == direct
    r.close()


def test_io_thread_stops_on_close(full):
    llm = engine.load(n_ctx=N_CTX, kv_type="f32", mem_budget=budget_for(full, 2))
    llm.eval(prompt(full)[:6])
    llm.close()
    llm.close()  # twice is fine
    assert not [t for t in __import__("threading").enumerate() if t.name.startswith("mixlocal-experts")]


@pytest.mark.skipif(sys.platform == "win32", reason="Windows delivers no SIGINT to a child process")
def test_ctrl_c_during_generation_exits_cleanly(full, tmp_path):
    budget = budget_for(full, 2)
    script = textwrap.dedent(f"""
        import sys
        from mixlocal import engine
        llm = engine.load(n_ctx={N_CTX}, kv_type="f32", mem_budget={budget})
        print("loaded", flush=True)
        try:
            for _ in range(100000):
                llm.reset()
                llm.eval(list(range(3, 60)))
        except KeyboardInterrupt:
            print("interrupted", flush=True)
            sys.exit(3)
    """)
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    try:
        assert p.stdout.readline().strip() == "loaded"
        time.sleep(1.0)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 3, err
    assert "interrupted" in out


def test_ctrl_c_inside_a_numba_first_call_is_a_keyboard_interrupt(full, monkeypatch):
    """numba turns a KeyboardInterrupt raised while it loads a cached kernel into a SystemError ("returned a result
    with an exception set"); the full suite once hit that in the test above. eval hands back the KeyboardInterrupt."""
    def interrupted(*args, **kwargs):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as e:
            raise SystemError("CPUDispatcher(<function _silu_mul>) returned a result with an exception set") from e

    monkeypatch.setattr(full.backend, "forward", interrupted)
    full.reset()
    with pytest.raises(KeyboardInterrupt):
        full.eval([3, 4, 5])

    def broken(*args, **kwargs):
        raise SystemError("something else")

    monkeypatch.setattr(full.backend, "forward", broken)
    with pytest.raises(SystemError, match="something else"):
        full.eval([3, 4, 5])


@pytest.mark.parametrize("files,want", [
    ({"/proc/self/cgroup": ["4:memory:/bench", "1:cpu:/"],
      "/sys/fs/cgroup/memory/bench/memory.limit_in_bytes": ["17179869184"],
      "/sys/fs/cgroup/memory/bench/memory.usage_in_bytes": ["1073741824"]}, (16 << 30, 1 << 30)),
    ({"/proc/self/cgroup": ["0::/user.slice/app"],
      "/sys/fs/cgroup/user.slice/app/memory.max": ["12884901888"],
      "/sys/fs/cgroup/user.slice/app/memory.current": ["0"]}, (12 << 30, 0)),
    ({"/proc/self/cgroup": ["0::/"], "/sys/fs/cgroup/memory.max": ["max"]}, None),
    ({"/proc/self/cgroup": ["4:memory:/"],
      "/sys/fs/cgroup/memory/memory.limit_in_bytes": ["9223372036854771712"]}, None),
    ({}, None),
])
def test_memory_limit_of_the_cgroup(monkeypatch, files, want):
    """The default budget sees a container's or bench's memory limit, which /proc/meminfo does not show."""
    from mixlocal.engine import machine
    monkeypatch.setattr(machine, "_lines", lambda path: files.get(path, []))
    monkeypatch.setattr(machine, "meminfo", lambda: {"MemAvailable": 20 << 30})
    assert machine.cgroup_memory() == want
    assert machine.available_memory() == (20 << 30 if want is None else want[0] - want[1])


def test_cli_shows_and_takes_the_budget(full):
    """`info --mem-budget` shows the placement engine.load would choose; `generate --mem-budget` gives the same
    greedy text as without one and says what the budget cost; a too-small budget is one error line."""
    from test_cli import one_error_line, run_cli
    budget = budget_for(full, 3)
    r = run_cli("info", "--json", "--mem-budget", budget, "--n-ctx", N_CTX, "--kv-type", "f32")
    assert r.returncode == 0, r.stderr
    mem = json.loads(r.stdout)["memory"]
    assert mem["n_slots"] == 3 and mem["slots_per_block"] == [3] * full.config.n_layers
    assert mem["resident_experts"] == 3 * mem["slot"] * full.config.n_layers
    args = ("generate", "-p", "Once upon a time", "-n", "12", "--temp", "0", "--n-ctx", N_CTX, "--kv-type", "f32")
    free = run_cli(*args)
    tight = run_cli(*args, "--mem-budget", budget)
    assert free.returncode == 0 and tight.returncode == 0, tight.stderr
    assert tight.stdout == free.stdout
    assert "experts 3/8 per block resident, hit rate" in tight.stderr and "waiting on the disk" in tight.stderr
    assert "experts" not in free.stderr.splitlines()[-1]
    line = one_error_line(run_cli(*args, "--mem-budget", budget_for(full, 1)), 1)
    assert "cannot hold the dense weights" in line

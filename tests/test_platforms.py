"""Where laptops are: the CI workflow for a public host is valid, and every OS-specific call has a fallback that is
exercised here by taking the platform facts away (no /proc, no sysconf, no positional reads, no O_DIRECT, no
`resource`)."""
from __future__ import annotations

import builtins
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / ".github" / "workflows" / "ci.yml"
ACTIONS = {"actions/checkout@v4", "actions/setup-python@v5", "actions/cache@v4"}


def test_workflow_is_valid_and_covers_each_platform():
    wf = yaml.safe_load(WORKFLOW.read_text())
    assert wf["name"] == "ci"
    assert {"push", "pull_request"} <= set(wf[True] if True in wf else wf["on"])  # YAML 1.1 reads `on` as True
    jobs = wf["jobs"]
    runners = {name: job["runs-on"] for name, job in jobs.items()}
    assert runners == {"linux-x86_64": "ubuntu-24.04", "macos-arm64": "macos-14", "windows-x86_64": "windows-2022",
                       "linux-arm64": "ubuntu-24.04-arm"}
    for name, job in jobs.items():
        assert job["timeout-minutes"] <= 90, name
        uses = {s["uses"] for s in job["steps"] if "uses" in s}
        assert uses == ACTIONS, (name, uses)  # checkout, python, and the numba cache: nothing else
        cache = next(s for s in job["steps"] if s.get("uses", "").startswith("actions/cache"))
        assert cache["with"]["path"] == ".numba_cache"
        runs = " ".join(s.get("run", "") for s in job["steps"])
        assert "pytest" in runs, name
        for never in ("cmake", "CMAKE_ARGS", "llama-cpp-python", "llama_cpp_python", "make "):
            assert never not in runs, (name, never)  # llama.cpp is never compiled, nothing outside PyPI
    assert wf["env"]["NUMBA_CACHE_DIR"].endswith("/.numba_cache")
    assert "MIXLOCAL_KERNELS" in str(jobs["macos-arm64"]) and "test_mlx_backend.py" in str(jobs["macos-arm64"])


def test_machine_facts_without_proc(monkeypatch):
    """macOS and Windows have no /proc: the CPU comes from `platform`, memory from sysconf, else None."""
    from mixlocal.engine import machine
    monkeypatch.setattr(machine, "_lines", lambda path: [])
    assert machine.cpu_flags() == frozenset()
    assert isinstance(machine.cpu_model(), str)
    assert machine.physical_cores() >= 1
    assert machine.meminfo() == {}
    assert machine.total_memory() == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert machine.available_memory() == machine.total_memory()

    def no_sysconf(name):
        raise ValueError(name)
    monkeypatch.setattr(os, "sysconf", no_sysconf)
    assert machine.total_memory() is None and machine.available_memory() is None
    assert machine.describe()["ram_bytes"] is None
    from mixlocal.engine.backends.numba.backend import weight_budget_for
    assert weight_budget_for(None, 1 << 20) == (None, "unknown")  # no limit known: every expert resident


def test_default_budget_on_a_machine_short_of_memory(monkeypatch, capsys):
    """With no budget asked for and 460 MiB available, the embedded model (about 50 MB) still loads and runs with
    every expert resident: the margin left for the process shrinks to half of what there is. An explicit budget
    keeps the whole margin, so the same 460 MiB asked for is a clear error."""
    from mixlocal.engine import machine
    from mixlocal.engine.backends.numba import backend as nb

    from mixlocal import engine
    avail = 460 << 20
    monkeypatch.setattr(nb, "available_memory", lambda: avail)
    monkeypatch.setattr(machine, "available_memory", lambda: avail)
    weights, said = nb.weight_budget_for(None, 1 << 20)
    assert weights == avail - (1 << 20) - avail // 2 and "available now" in said
    llm = engine.load(None, backend="numba", n_ctx=64)
    assert llm.backend.store is None  # every expert resident, as without a budget
    assert llm.generate("Hello", max_tokens=3)
    with pytest.raises(nb.MemoryBudgetError, match="1024 MiB margin"):
        nb.weight_budget_for("460MiB", 1 << 20)


def test_expert_reads_without_positional_reads_or_o_direct(tmp_path, monkeypatch):
    """Windows: no os.preadv and no O_DIRECT; the reader seeks a file object under a lock instead."""
    from mixlocal.engine.backends.numba.experts import _aligned_buffer, _Reader
    path = tmp_path / "data.bin"
    data = np.random.default_rng(1).integers(0, 256, 5 * 4096 + 77, dtype=np.uint8)
    data.tofile(path)
    monkeypatch.delattr(os, "preadv")
    monkeypatch.delattr(os, "O_DIRECT")
    monkeypatch.delattr(os, "posix_fadvise")
    r = _Reader(str(path))
    assert r.direct_fd is None and r._file is not None
    buf = _aligned_buffer(_Reader.window_bytes(len(data)))
    for off, n in [(0, 100), (4096, 8192), (len(data) - 77, 77)]:
        assert np.array_equal(np.frombuffer(r.read_into(buf, off, n), np.uint8), data[off:off + n])
    with pytest.raises(OSError, match="end of file"):
        r.read_into(buf, len(data) - 10, 20)
    r.close()


def test_packed_cache_without_fallocate(tmp_path, monkeypatch):
    """No posix_fallocate (macOS, Windows): the cache file is sized by truncate and still works."""
    from mixlocal import engine
    monkeypatch.setenv("MIXLOCAL_CACHE_DIR", str(tmp_path))
    monkeypatch.delattr(os, "posix_fallocate")
    from mixlocal.engine.backends.numba import packed_cache
    monkeypatch.setattr(packed_cache, "_DISK_MARGIN", 0)  # about truncate, not about how full the host's disk is
    want = engine.load(n_ctx=64, kv_type="f32", packed_cache=False).eval([1, 2, 3])
    got = engine.load(n_ctx=64, kv_type="f32", packed_cache=True).eval([1, 2, 3])
    assert list(tmp_path.rglob("*.mixpack")), "no cache file was written"
    assert np.array_equal(got, want)


def test_peak_rss_without_resource(monkeypatch):
    """Windows has no `resource`: the level bench reports peak RSS as unknown ("-") instead of failing."""
    from mixlocal.engine.cli import bench_worker
    from mixlocal.engine.cli.common import human_bytes
    real_import = builtins.__import__

    def no_resource(name, *a, **kw):
        if name == "resource":
            raise ImportError("no resource here")
        return real_import(name, *a, **kw)
    monkeypatch.setattr(builtins, "__import__", no_resource)
    assert bench_worker._peak_rss_bytes() is None
    assert human_bytes(None) == "-"


def test_an_arm_cpu_gets_the_portable_family(monkeypatch):
    """An ARM laptop (or any CPU whose features LLVM reports without x86 vector extensions, or none at all) runs the
    portable kernels, and asking for an x86 family there is a clear error."""
    from llvmlite import binding
    from mixlocal.quant.kernels import families
    arm = {"neon": True, "fp-armv8": True, "crc": True, "dotprod": True}
    monkeypatch.setattr(binding, "get_host_cpu_features", lambda: arm)
    assert families.host_families() == ("portable",)
    assert families.resolve(None) == "portable"
    with pytest.raises(families.KernelFamilyError, match="avx2"):
        families.resolve("avx2")

    def no_features():
        raise RuntimeError("no feature list")
    monkeypatch.setattr(binding, "get_host_cpu_features", no_features)
    assert families.host_families() == ("portable",)

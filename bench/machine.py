"""What every bench records about where it ran: the CPU model, the machine's memory, a process's own memory.

The machine itself is read by engine/machine.py (the CLI reports it too); this module keeps the bench result
files' own keys.
"""
from __future__ import annotations

import datetime as dt
import importlib.util
import os
import platform
import sys
from pathlib import Path


def _engine_machine():
    """engine/machine.py of this checkout, loaded by path: `import engine` would load numba and numpy into a bench's
    parent process before it sets its OpenMP variables, and would take the engine from MIXLOCAL_SRC, an export that
    may predate the module (bench_mixtral_shape measures such exports). The module imports only the standard
    library."""
    spec = importlib.util.spec_from_file_location("_mixlocal_machine",
                                                  Path(__file__).resolve().parents[1] / "engine" / "machine.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


machine = _engine_machine()

__all__ = ["cpu_flags", "cpu_model", "describe_run", "mem_info", "proc_memory"]

# the instruction sets that decide which kernels mixlocal and llama.cpp can run (names as in /proc/cpuinfo)
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni")
cpu_model = machine.cpu_model


def describe_run() -> dict:
    """The fields that open a result file: when, the command line, and the machine."""
    return {"date": dt.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.executable).name] + sys.argv),
            "machine": {"cpu": cpu_model(), "cpu_flags": cpu_flags(), "cores": os.cpu_count(),
                        "platform": platform.platform(), **mem_info()}}


def cpu_flags() -> dict[str, bool]:
    """Which of ISA_FLAGS the CPU reports (Linux; empty elsewhere)."""
    have = machine.cpu_flags()
    return {f: f in have for f in ISA_FLAGS} if have else {}


def mem_info() -> dict:
    """MemTotal and MemAvailable in GB (Linux; empty elsewhere)."""
    return {key + "_GB": round(value / 1e9, 2) for key, value in machine.meminfo().items()}


def proc_memory() -> dict:
    """This process's peak and current resident memory (GB), split into anonymous and file-backed pages."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[{"VmHWM": "peak_rss_GB", "VmRSS": "rss_GB", "RssAnon": "rss_anon_GB",
                     "RssFile": "rss_file_GB"}[key]] = round(int(value.split()[0]) * 1024 / 1e9, 3)
    except OSError:
        pass
    return out

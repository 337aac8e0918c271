"""The machine mixlocal runs on: CPU model, instruction-set flags, cores and memory, read in one place.

The loader takes its default thread count from here, `mixlocal info` and `mixlocal bench` report it, and every
bench result opens with it (bench/machine.py). Linux answers from /proc; elsewhere, what `platform` and `os` know,
and the Linux-only answers are empty.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path

__all__ = ["available_memory", "cgroup_memory", "cpu_flags", "cpu_model", "describe", "meminfo", "physical_cores",
           "total_memory"]


def _lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []


def _field(line: str) -> str:
    return line.split(":", 1)[1].strip()


def cpu_model() -> str:
    """The CPU's marketing name ("Intel(R) Xeon(R) ..."), or the processor or architecture name off Linux."""
    for line in _lines("/proc/cpuinfo"):
        if line.startswith("model name"):
            return _field(line)
    return platform.processor() or platform.machine()


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as /proc/cpuinfo names them (avx2, avx512_vnni, ...); empty off Linux."""
    for line in _lines("/proc/cpuinfo"):
        if line.startswith("flags"):
            return frozenset(_field(line).split())
    return frozenset()


def physical_cores() -> int:
    """Physical cores (hyperthreads share one core's units, and decode gains nothing from them)."""
    pairs = set()
    phys = None
    for line in _lines("/proc/cpuinfo"):
        if line.startswith("physical id"):
            phys = _field(line)
        elif line.startswith("core id"):
            pairs.add((phys, _field(line)))
    if pairs:
        return len(pairs)
    return max(1, (os.cpu_count() or 2) // (2 if platform.machine() in ("x86_64", "AMD64") else 1))


def meminfo() -> dict[str, int]:
    """MemTotal and MemAvailable from /proc/meminfo, in bytes, under those names; empty off Linux."""
    out = {}
    for line in _lines("/proc/meminfo"):
        key, _, value = line.partition(":")
        if key in ("MemTotal", "MemAvailable"):
            try:
                out[key] = int(value.split()[0]) * 1024
            except (ValueError, IndexError):
                pass
    return out


def total_memory() -> int | None:
    """Installed memory in bytes: MemTotal, else the page count times the page size; None if neither is known."""
    total = meminfo().get("MemTotal")
    if total is not None:
        return total
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def describe() -> dict:
    """What the machine is, in one dict: CPU model, physical and logical cores, installed memory in bytes. Nothing
    that changes from one moment to the next (available memory, load), so two reports compare equal."""
    return {"cpu": cpu_model(), "physical_cores": physical_cores(), "logical_cpus": os.cpu_count(),
            "ram_bytes": total_memory()}


def cgroup_memory() -> tuple[int, int] | None:
    """(limit, usage) in bytes of the memory cgroup this process runs in (a container, systemd-run -p MemoryMax,
    a bench), or None when there is no limit or no cgroup to read. Linux only: cgroup v2's memory.max, else v1's
    memory.limit_in_bytes; /proc/meminfo does not see either."""
    for line in _lines("/proc/self/cgroup"):
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # v2
            for root in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
                limit = _first_line(f"{root}{path}/memory.max")
                if limit is not None:
                    usage = _first_line(f"{root}{path}/memory.current")
                    return _limited(limit, usage)
        elif "memory" in controllers.split(","):
            base = f"/sys/fs/cgroup/memory{path}"
            return _limited(_first_line(f"{base}/memory.limit_in_bytes"), _first_line(f"{base}/memory.usage_in_bytes"))
    return None


def _first_line(path: str) -> str | None:
    lines = _lines(path)
    return lines[0].strip() if lines else None


def _limited(limit: str | None, usage: str | None) -> tuple[int, int] | None:
    if limit is None or not limit.isdigit():  # "max" (v2) or nothing to read
        return None
    n = int(limit)
    if n >= 1 << 60:  # v1's "unlimited" is the largest page-aligned long
        return None
    return n, int(usage) if usage and usage.isdigit() else 0


def available_memory() -> int | None:
    """Bytes this process can still use: MemAvailable (else installed memory), and no more than what its memory
    cgroup leaves; None if nothing is known."""
    avail = meminfo().get("MemAvailable") or total_memory()
    group = cgroup_memory()
    if group is not None:
        room = max(0, group[0] - group[1])
        avail = room if avail is None else min(avail, room)
    return avail

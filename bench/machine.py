"""What every bench records about where it ran: the CPU model, the machine's memory, a process's own memory."""
from __future__ import annotations

import datetime as dt
import os
import platform
import sys
from pathlib import Path

__all__ = ["cpu_flags", "cpu_model", "describe_run", "mem_info", "proc_memory"]

# the instruction sets that decide which kernels mixlocal and llama.cpp can run (names as in /proc/cpuinfo)
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni")


def describe_run() -> dict:
    """The fields that open a result file: when, the command line, and the machine."""
    return {"date": dt.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.executable).name] + sys.argv),
            "machine": {"cpu": cpu_model(), "cpu_flags": cpu_flags(), "cores": os.cpu_count(),
                        "platform": platform.platform(), **mem_info()}}


def cpu_flags() -> dict[str, bool]:
    """Which of ISA_FLAGS the CPU reports (Linux; empty elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return {f: f in have for f in ISA_FLAGS}
    except OSError:
        pass
    return {}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def mem_info() -> dict:
    """MemTotal and MemAvailable in GB (Linux; empty elsewhere)."""
    out = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, value = line.split(":", 1)
            if key in ("MemTotal", "MemAvailable"):
                out[key + "_GB"] = round(int(value.split()[0]) * 1024 / 1e9, 2)
    except OSError:
        pass
    return out


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

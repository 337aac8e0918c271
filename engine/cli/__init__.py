"""`mixlocal`, the command line: main.py parses and runs generate, pull, info, quantize and serve; chat.py and
bench.py (with bench_worker.py, one level per process) are the two commands with rooms of their own; common.py
holds the flags, loading and formatting they share."""
from __future__ import annotations

from .main import build_parser, main

__all__ = ["build_parser", "main"]

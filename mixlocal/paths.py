"""Where mixlocal keeps things on disk, importable before numba is.

Everything mixlocal writes lives under one folder: $MIXLOCAL_CACHE_DIR, else $XDG_CACHE_HOME/mixlocal, else
~/.cache/mixlocal. `packed/` holds the repacked weights (engine/backends/numba/packed_cache.py), `numba/` the
compiled kernels, `models.json` the local model paths the command line has used. Models pulled from the hub stay
in the Hugging Face cache (HF_HUB_CACHE, HF_HOME), which huggingface_hub owns.

The kernel folder is set here, before any kernel module is imported, because numba fixes a function's cache
location when the function is decorated: set later, the console script, `python -m mixlocal` and `make run` would
each compile into a different place (numba's default is a __pycache__ beside the installed source).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ["cache_root", "numba_cache_dir", "use_kernel_cache"]


def cache_root() -> Path:
    """mixlocal's cache folder (the same rule as the packed-weight cache's)."""
    root = os.environ.get("MIXLOCAL_CACHE_DIR")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = (Path(xdg) if xdg else Path.home() / ".cache") / "mixlocal"
    return Path(root)


def numba_cache_dir() -> Path:
    """Where compiled kernels are kept: $NUMBA_CACHE_DIR when the user set it, else the cache's numba/ folder."""
    return Path(os.environ.get("NUMBA_CACHE_DIR") or cache_root() / "numba")


def use_kernel_cache() -> None:
    """Point numba's cache at numba_cache_dir() unless the user chose a place (NUMBA_CACHE_DIR)."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return
    os.environ["NUMBA_CACHE_DIR"] = str(numba_cache_dir())
    if "numba" in sys.modules:  # imported before mixlocal: numba read its environment already
        from numba.core import config
        config.reload_config()

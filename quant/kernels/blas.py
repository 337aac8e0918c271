"""Keep numpy's BLAS at the caller's thread count, so that BLAS and numba never run more threads than asked for.

The engine sets the thread count with numba.set_num_threads (per calling thread); numpy's OpenBLAS keeps its own
count (all cores by default). Before each BLAS call the kernels copy numba's count into OpenBLAS through its C
entry point, found in the library numpy loaded (as threadpoolctl does, without the dependency). Where no OpenBLAS is
found (Accelerate on macOS, an MKL numpy) this does nothing.
"""
from __future__ import annotations

import ctypes
import glob
import os

import numba
import numpy as np

__all__ = ["blas_threads", "match_numba_threads"]

_GETTERS = ("scipy_openblas_get_num_threads64_", "scipy_openblas_get_num_threads", "openblas_get_num_threads64_",
            "openblas_get_num_threads")
_SETTERS = ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads", "openblas_set_num_threads64_",
            "openblas_set_num_threads")


def _find(names):
    here = os.path.dirname(np.__file__)
    for path in sorted(glob.glob(os.path.join(here, "..", "numpy.libs", "*openblas*"))
                       + glob.glob(os.path.join(here, ".dylibs", "*openblas*"))):
        try:
            lib = ctypes.CDLL(path)  # already loaded by numpy: this returns the same library
        except OSError:
            continue
        for name in names:
            fn = getattr(lib, name, None)
            if fn is not None:
                return fn
    return None


_setter = _find(_SETTERS)
_getter = _find(_GETTERS)
if _setter is not None:
    _setter.argtypes, _setter.restype = [ctypes.c_int], None
if _getter is not None:
    _getter.argtypes, _getter.restype = [], ctypes.c_int
_current = [None]


def match_numba_threads() -> None:
    """Set OpenBLAS's thread count to numba's current one (cheap when unchanged)."""
    if _setter is None:
        return
    n = numba.get_num_threads()
    if _current[0] != n:
        _setter(n)
        _current[0] = n


def blas_threads() -> int | None:
    """OpenBLAS's current thread count, or None where it cannot be read."""
    return None if _getter is None else int(_getter())

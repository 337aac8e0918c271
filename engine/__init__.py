"""mixlocal's engine: load a Mixtral model from any source and run it.

    from mixlocal import engine
    llm = engine.load()                      # the embedded default model
    print(llm.generate("Once upon a time", max_tokens=32).text)
"""
from __future__ import annotations

from .errors import ContextOverflowError, ModelFormatError
from .loader import DEFAULT_MODEL, DEFAULT_MODEL_DIR, load


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("mixlocal")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


__version__ = _version()

__all__ = ["DEFAULT_MODEL", "DEFAULT_MODEL_DIR", "ContextOverflowError", "ModelFormatError", "__version__", "load"]

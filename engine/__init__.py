"""mixlocal's engine: load a Mixtral model from any source and run it.

    import engine
    llm = engine.load()                      # the embedded default model
    print(llm.generate("Once upon a time", max_tokens=32).text)
"""
from __future__ import annotations

from .errors import ContextOverflowError, ModelFormatError
from .loader import DEFAULT_MODEL, DEFAULT_MODEL_DIR, load

__all__ = ["DEFAULT_MODEL", "DEFAULT_MODEL_DIR", "ContextOverflowError", "ModelFormatError", "load"]

"""mixlocal: quantized Mixtral 8x7B Instruct on a laptop, offline.

    import mixlocal
    llm = mixlocal.load()                    # the embedded default model; any GGUF, HF or MLX folder, or hub id
    print(llm.generate("Once upon a time", max_tokens=32).text)

The code lives in three rooms that install under this one name, so nothing generic lands in site-packages:
`mixlocal.engine` (models, backends, server, CLI), `mixlocal.quant` (formats and kernels) and `mixlocal.tokenizer`.
"""
from __future__ import annotations

import os

# In a checkout (or a source copy a bench runs from) the rooms are the repository's top-level folders, beside this
# one; an installed wheel carries them inside this package, and then there is nothing to add.
_here = os.path.dirname(os.path.abspath(__file__))
if not os.path.isdir(os.path.join(_here, "engine")):
    __path__.append(os.path.dirname(_here))

# before the kernels are imported: every entry point compiles into one place, ~/.cache/mixlocal/numba (paths.py)
from .paths import use_kernel_cache

use_kernel_cache()

from .engine import (
    DEFAULT_MODEL,
    DEFAULT_MODEL_DIR,
    ContextOverflowError,
    ModelFormatError,
    __version__,
    load,
)

__all__ = ["DEFAULT_MODEL", "DEFAULT_MODEL_DIR", "ContextOverflowError", "ModelFormatError", "__version__", "load"]

"""Mixtral's tokenizer from any source, the Instruct chat format, streaming detokenization and stop strings.

Knows nothing of the engine. `Tokenizer` is the entry point; `StopMatcher` watches streamed text for stop strings.
"""
from .errors import TokenizerError
from .streaming import Detokenizer, StopMatcher
from .tokenizer import Tokenizer

__all__ = ["Detokenizer", "StopMatcher", "Tokenizer", "TokenizerError"]

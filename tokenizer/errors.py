"""The tokenizer's one error type: bad input or a bad model file, always a ValueError."""

__all__ = ["TokenizerError"]


class TokenizerError(ValueError):
    """A tokenizer file, a token id, a message list or a template that cannot be used; the message names it."""

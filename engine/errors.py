"""The errors a user sees. Both are ValueError subclasses so that callers can catch bad input in one place."""


class ModelFormatError(ValueError):
    """A model file is missing, damaged, or disagrees with its own metadata. The message names file and tensor."""


class ContextOverflowError(ValueError):
    """More tokens than the context holds. The message names the limit."""

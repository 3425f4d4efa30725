"""Every exception type the serving side raises, in one place (the ground floor).

Modules raise these and re-export the ones their callers know them by (for example
``persona4rec.index.UnknownItemError``), so both imports keep working. Each type
subclasses the built-in a caller would catch without knowing persona4rec.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "CacheCorruptError",
    "ConcurrentMutationError",
    "EmptyHistoryError",
    "EncoderMismatchError",
    "IndexFormatError",
    "ModelNotFoundError",
    "UnknownItemError",
]


class IndexFormatError(ValueError):
    """A persona index file that cannot be trusted: truncated, corrupted, or of another version."""


class UnknownItemError(KeyError):
    """An item id that the index does not hold (or that was removed)."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class ConcurrentMutationError(RuntimeError):
    """A mutation was attempted while another mutation holds the index."""


class ModelNotFoundError(FileNotFoundError):
    """No usable encoder model was found; the message lists what was looked for, and where."""


class EncoderMismatchError(ValueError):
    """Vectors made by one encoder were about to be mixed with another encoder's."""


class EmptyHistoryError(ValueError):
    """The user has no usable interaction (none given, all filtered by rating, or all empty).

    Catch it to fall back to a non-personalised ranking (e.g. popularity).
    """

    def __init__(self, message: str, *, user_id: Any = None, given: int = 0, below_min_rating: int = 0,
                 empty_text: int = 0):
        super().__init__(message)
        self.user_id = user_id
        self.given = given
        self.below_min_rating = below_min_rating
        self.empty_text = empty_text


class CacheCorruptError(RuntimeError):
    """An interaction-embedding cache directory is damaged beyond a crash-truncated tail."""

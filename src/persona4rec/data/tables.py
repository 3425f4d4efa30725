"""Typed in-memory tables shared by every loader: one review table, one item table."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


class DataFormatError(ValueError):
    """A data file does not have the expected shape; the message names file, line and field."""


def _obj(values: list[Any] | np.ndarray) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = list(values)
    return out


@dataclass
class ReviewTable:
    """One row per review. Columns are numpy arrays of equal length.

    ``timestamp`` is float64 seconds since the epoch (loaders convert milliseconds and
    date strings), ``raw`` keeps each original record so nothing is lost in loading.
    ``skipped_lines`` counts malformed lines dropped under ``lenient=True``.
    """

    user: np.ndarray
    item: np.ndarray
    rating: np.ndarray
    timestamp: np.ndarray
    title: np.ndarray
    text: np.ndarray
    raw: np.ndarray
    source: str = ""
    skipped_lines: int = 0

    @classmethod
    def from_columns(
        cls,
        user: list[str],
        item: list[str],
        rating: list[float],
        timestamp: list[float],
        title: list[str],
        text: list[str],
        raw: list[dict[str, Any]] | None = None,
        source: str = "",
        skipped_lines: int = 0,
    ) -> "ReviewTable":
        n = len(user)
        lengths = {len(item), len(rating), len(timestamp), len(title), len(text)}
        if lengths != {n} or (raw is not None and len(raw) != n):
            raise ValueError("ReviewTable columns must all have the same length")
        return cls(
            user=_obj(user),
            item=_obj(item),
            rating=np.asarray(rating, dtype=np.float32),
            timestamp=np.asarray(timestamp, dtype=np.float64),
            title=_obj(title),
            text=_obj(text),
            raw=_obj(raw if raw is not None else [{} for _ in range(n)]),
            source=source,
            skipped_lines=skipped_lines,
        )

    def __len__(self) -> int:
        return len(self.user)

    def take(self, rows: np.ndarray) -> "ReviewTable":
        """The sub-table of the given row indices (or boolean mask), in that order."""
        rows = np.asarray(rows)
        return ReviewTable(
            user=self.user[rows],
            item=self.item[rows],
            rating=self.rating[rows],
            timestamp=self.timestamp[rows],
            title=self.title[rows],
            text=self.text[rows],
            raw=self.raw[rows],
            source=self.source,
            skipped_lines=self.skipped_lines,
        )


@dataclass
class ItemTable:
    """One row per item: display title, description, category and the original record."""

    item: np.ndarray
    title: np.ndarray
    description: np.ndarray
    category: np.ndarray
    raw: np.ndarray
    source: str = ""
    skipped_lines: int = 0
    _position: dict[str, int] = field(default_factory=dict, repr=False)

    @classmethod
    def from_columns(
        cls,
        item: list[str],
        title: list[str],
        description: list[str],
        category: list[str],
        raw: list[dict[str, Any]] | None = None,
        source: str = "",
        skipped_lines: int = 0,
    ) -> "ItemTable":
        n = len(item)
        return cls(
            item=_obj(item),
            title=_obj(title),
            description=_obj(description),
            category=_obj(category),
            raw=_obj(raw if raw is not None else [{} for _ in range(n)]),
            source=source,
            skipped_lines=skipped_lines,
        )

    def __post_init__(self) -> None:
        # Later rows win, matching how metadata dumps repeat corrected records.
        self._position = {str(i): k for k, i in enumerate(self.item)}

    def __len__(self) -> int:
        return len(self.item)

    def title_of(self, item_id: str, default: str = "") -> str:
        """The item's title, or ``default`` when the item is not in the table."""
        k = self._position.get(item_id)
        return default if k is None else str(self.title[k])

    def category_of(self, item_id: str, default: str = "") -> str:
        k = self._position.get(item_id)
        return default if k is None else str(self.category[k])

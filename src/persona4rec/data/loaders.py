"""Loaders for the common review and item-metadata formats.

Every loader yields one typed table (:class:`ReviewTable` or :class:`ItemTable`).
Files may be gzip-compressed (detected by content, not by name). A missing required
field or a malformed line raises :class:`DataFormatError` naming the file, the
1-based line and the field; ``lenient=True`` skips such lines instead and records how
many were skipped in ``table.skipped_lines`` (and warns once).

Formats:

* ``amazon2014``: ``reviewerID, asin, overall, unixReviewTime, summary, reviewText``
* ``amazon2023``: ``user_id, parent_asin, rating, timestamp`` (milliseconds), ``title, text``
* ``yelp``: ``user_id, business_id, stars, date`` (``YYYY-MM-DD[ HH:MM:SS]``), ``text``
* generic JSONL or CSV with a :class:`ReviewColumns` mapping.
"""

from __future__ import annotations

import ast
import csv
import gzip
import io
import json
import os
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from persona4rec.data.tables import DataFormatError, ItemTable, ReviewTable

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class ReviewColumns:
    """Which source field feeds each column of a :class:`ReviewTable`.

    ``timestamp_unit`` is ``"s"``, ``"ms"`` or ``"date"`` (an ISO date or date-time
    string, read as UTC). ``title``/``text`` may be ``None`` (the column is empty);
    fields listed in ``optional`` default to ``""`` when a record lacks them, because
    real dumps omit the review title or text on some rows. ``rating=None`` gives 1.0.
    """

    user: str
    item: str
    timestamp: str
    rating: str | None = None
    title: str | None = None
    text: str | None = None
    timestamp_unit: str = "s"
    optional: frozenset[str] = frozenset()


AMAZON_2014 = ReviewColumns(
    user="reviewerID", item="asin", rating="overall", timestamp="unixReviewTime",
    title="summary", text="reviewText", optional=frozenset({"summary", "reviewText"}),
)
AMAZON_2023 = ReviewColumns(
    user="user_id", item="parent_asin", rating="rating", timestamp="timestamp",
    title="title", text="text", timestamp_unit="ms", optional=frozenset({"title", "text"}),
)
YELP = ReviewColumns(
    user="user_id", item="business_id", rating="stars", timestamp="date",
    text="text", timestamp_unit="date", optional=frozenset({"text"}),
)
REVIEW_FORMATS: dict[str, ReviewColumns] = {
    "amazon2014": AMAZON_2014,
    "amazon2018": AMAZON_2014,
    "amazon2023": AMAZON_2023,
    "yelp": YELP,
}


@dataclass(frozen=True)
class ItemColumns:
    """Which source field feeds each column of an :class:`ItemTable`.

    Description and category fields may hold a string or a list (of strings or of
    lists, as Amazon 2014 ``categories``); lists are flattened and joined.
    """

    item: str
    title: str | None = None
    description: str | None = None
    category: str | None = None


AMAZON_META_2014 = ItemColumns(item="asin", title="title", description="description", category="categories")
AMAZON_META_2023 = ItemColumns(item="parent_asin", title="title", description="description", category="categories")
YELP_BUSINESS = ItemColumns(item="business_id", title="name", category="categories")
# The layout of ``items.csv`` that ships with the MI-5core evaluation data.
ITEMS_CSV = ItemColumns(item="Product ID", title="Description", category="Category")
ITEM_FORMATS: dict[str, ItemColumns] = {
    "amazon-meta-2014": AMAZON_META_2014,
    "amazon-meta-2018": AMAZON_META_2014,
    "amazon-meta-2023": AMAZON_META_2023,
    "yelp-business": YELP_BUSINESS,
    "items-csv": ITEMS_CSV,
}


def open_text(path: PathLike) -> io.TextIOBase:
    """Open a text file, transparently decompressing gzip (detected by magic bytes)."""
    with open(path, "rb") as probe:
        magic = probe.read(2)
    if magic == b"\x1f\x8b":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _parse_record_line(line: str) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except json.JSONDecodeError:
        # Amazon 2014 metadata is written as Python dict literals, not JSON.
        try:
            value = ast.literal_eval(line)
        except (ValueError, SyntaxError) as exc:
            raise ValueError(f"not a JSON object ({exc.__class__.__name__})") from None
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, got {type(value).__name__}")
    return value


def iter_records(path: PathLike, lenient: bool = False) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, record)`` from a JSON-lines or CSV file (gzip or not).

    CSV is chosen by a ``.csv``/``.csv.gz`` suffix; every other file is read as one
    JSON object per line (blank lines are ignored).
    """
    path = Path(path)
    name = path.name.lower()
    with open_text(path) as handle:
        if name.endswith(".csv") or name.endswith(".csv.gz"):
            reader = csv.DictReader(handle)
            for row in reader:
                yield reader.line_num, dict(row)
            return
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield number, _parse_record_line(line)
            except ValueError as exc:
                if lenient:
                    yield number, {"__malformed__": str(exc)}
                    continue
                raise DataFormatError(f"{path}: line {number}: malformed line: {exc}") from None


class _Field:
    """Reads one field of a record, raising DataFormatError with file/line/field context."""

    def __init__(self, path: Path, number: int, record: dict[str, Any]):
        self.path, self.number, self.record = path, number, record

    def error(self, field: str, problem: str) -> DataFormatError:
        keys = ", ".join(sorted(map(str, self.record))[:12])
        return DataFormatError(
            f"{self.path}: line {self.number}: field '{field}': {problem} (record has: {keys}); "
            "fix the file, pass the right column mapping, or load with lenient=True to skip such lines"
        )

    def get(self, field: str | None, optional: frozenset[str] = frozenset()) -> Any:
        if field is None:
            return None
        if field not in self.record or self.record[field] is None:
            if field in optional:
                return None
            raise self.error(field, "missing")
        return self.record[field]


def _to_seconds(value: Any, unit: str) -> float:
    if unit == "date":
        text = str(value).strip().replace("Z", "+00:00")
        moment = datetime.fromisoformat(text)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
        return moment.timestamp()
    seconds = float(value)
    if seconds != seconds:
        raise ValueError("NaN")
    return seconds / 1000.0 if unit == "ms" else seconds


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        parts: list[str] = []
        for part in value:
            parts.append(_text(part))
        return " | ".join(p for p in parts if p)
    return str(value)


def _warn_skipped(path: Path, skipped: int) -> None:
    if skipped:
        warnings.warn(f"{path}: skipped {skipped} malformed line(s) (lenient=True)", stacklevel=3)


def load_reviews(
    path: PathLike,
    columns: ReviewColumns | str = "amazon2014",
    lenient: bool = False,
) -> ReviewTable:
    """Load a review file into a :class:`ReviewTable`.

    ``columns`` is a :class:`ReviewColumns` mapping or one of the names in
    ``REVIEW_FORMATS`` (``amazon2014``, ``amazon2018``, ``amazon2023``, ``yelp``).
    """
    mapping = REVIEW_FORMATS[columns] if isinstance(columns, str) else columns
    path = Path(path)
    users: list[str] = []
    items: list[str] = []
    ratings: list[float] = []
    times: list[float] = []
    titles: list[str] = []
    texts: list[str] = []
    raws: list[dict[str, Any]] = []
    skipped = 0
    for number, record in iter_records(path, lenient=lenient):
        reader = _Field(path, number, record)
        try:
            if "__malformed__" in record:
                raise DataFormatError(record["__malformed__"])
            user = reader.get(mapping.user)
            item = reader.get(mapping.item)
            raw_time = reader.get(mapping.timestamp)
            try:
                seconds = _to_seconds(raw_time, mapping.timestamp_unit)
            except (TypeError, ValueError):
                raise reader.error(mapping.timestamp, f"cannot read {raw_time!r} as a timestamp "
                                   f"(unit {mapping.timestamp_unit!r})") from None
            rating = 1.0
            if mapping.rating is not None:
                raw_rating = reader.get(mapping.rating)
                try:
                    rating = float(raw_rating)
                except (TypeError, ValueError):
                    raise reader.error(mapping.rating, f"cannot read {raw_rating!r} as a number") from None
            title = _text(reader.get(mapping.title, mapping.optional))
            text = _text(reader.get(mapping.text, mapping.optional))
            if str(user) == "" or str(item) == "":
                raise reader.error(mapping.user if str(user) == "" else mapping.item, "empty id")
        except DataFormatError:
            if lenient:
                skipped += 1
                continue
            raise
        users.append(str(user))
        items.append(str(item))
        ratings.append(rating)
        times.append(seconds)
        titles.append(title)
        texts.append(text)
        raws.append(record)
    _warn_skipped(path, skipped)
    return ReviewTable.from_columns(users, items, ratings, times, titles, texts, raws,
                                    source=str(path), skipped_lines=skipped)


def load_items(
    path: PathLike,
    columns: ItemColumns | str = "items-csv",
    lenient: bool = False,
) -> ItemTable:
    """Load item metadata into an :class:`ItemTable`.

    ``columns`` is an :class:`ItemColumns` mapping or one of the names in
    ``ITEM_FORMATS`` (``amazon-meta-2014``, ``amazon-meta-2023``, ``yelp-business``,
    ``items-csv``). Only the item id is required; other mapped fields that a record
    lacks are left empty.
    """
    mapping = ITEM_FORMATS[columns] if isinstance(columns, str) else columns
    path = Path(path)
    ids: list[str] = []
    titles: list[str] = []
    descriptions: list[str] = []
    categories: list[str] = []
    raws: list[dict[str, Any]] = []
    skipped = 0
    optional = frozenset(f for f in (mapping.title, mapping.description, mapping.category) if f)
    for number, record in iter_records(path, lenient=lenient):
        reader = _Field(path, number, record)
        try:
            if "__malformed__" in record:
                raise DataFormatError(record["__malformed__"])
            item = reader.get(mapping.item)
            if str(item) == "":
                raise reader.error(mapping.item, "empty id")
        except DataFormatError:
            if lenient:
                skipped += 1
                continue
            raise
        ids.append(str(item))
        titles.append(_text(reader.get(mapping.title, optional)))
        descriptions.append(_text(reader.get(mapping.description, optional)))
        categories.append(_text(reader.get(mapping.category, optional)))
        raws.append(record)
    _warn_skipped(path, skipped)
    return ItemTable.from_columns(ids, titles, descriptions, categories, raws,
                                  source=str(path), skipped_lines=skipped)


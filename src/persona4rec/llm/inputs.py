"""Reading reviews and item metadata into the plain dictionaries the LLM stages take.

A review is ``{"review_id", "item_id", "user_id", "rating", "timestamp", "title", "text"}``;
an item is ``{"item_id", "title", "categories", "description", "attributes"}``.

Review ids: the Amazon 5-core files (e.g. ``reviews_Musical_Instruments_5.json.gz``)
have no review id, and contain at most one review per (user, item) pair, so the id
is defined as ``f"{reviewerID}:{asin}"`` (:func:`amazon_review_id`). Splits and the
stages' ``exclude_review_ids`` use these ids.
"""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path
from typing import Any


def amazon_review_id(reviewer_id: str, asin: str) -> str:
    """The review id of an Amazon 5-core review: ``"{reviewerID}:{asin}"`` (unique per user-item pair)."""
    return f"{reviewer_id}:{asin}"


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def normalize_review(raw: dict[str, Any]) -> dict[str, Any]:
    """One review in the stages' shape, from the Amazon 5-core fields or the shape itself."""
    if "reviewerID" in raw:
        return {
            "review_id": amazon_review_id(raw["reviewerID"], raw["asin"]),
            "item_id": raw["asin"],
            "user_id": raw["reviewerID"],
            "rating": float(raw.get("overall", 0.0)),
            "timestamp": int(raw.get("unixReviewTime", 0)),
            "title": raw.get("summary", "") or "",
            "text": raw.get("reviewText", "") or "",
        }
    missing = [k for k in ("review_id", "item_id", "user_id") if k not in raw]
    if missing:
        raise ValueError(f"review record lacks {missing}: give review_id, item_id, user_id, rating, timestamp, "
                         "title, text (or the Amazon fields reviewerID, asin, overall, ...)")
    return {
        "review_id": str(raw["review_id"]),
        "item_id": str(raw["item_id"]),
        "user_id": str(raw["user_id"]),
        "rating": float(raw.get("rating", 0.0)),
        "timestamp": raw.get("timestamp", 0),
        "title": raw.get("title", raw.get("review_title", "")) or "",
        "text": raw.get("text", raw.get("review_text", "")) or "",
    }


def load_reviews(path: str | Path) -> list[dict[str, Any]]:
    """Reviews from JSON lines (optionally gzipped), Amazon 5-core or already normalised; ids must be unique."""
    path = Path(path)
    reviews = []
    with _open_text(path) as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    reviews.append(normalize_review(json.loads(line)))
                except (json.JSONDecodeError, ValueError) as exc:
                    raise ValueError(f"{path}:{number}: {exc}") from None
    seen: set[str] = set()
    for r in reviews:
        if r["review_id"] in seen:
            raise ValueError(f"{path}: duplicate review id {r['review_id']!r}; review ids must be unique")
        seen.add(r["review_id"])
    return reviews


def load_items(path: str | Path) -> dict[str, dict[str, Any]]:
    """Item metadata by item id, from the MI ``items.csv`` (Product ID, Description, price, Category) or JSON lines."""
    path = Path(path)
    items: dict[str, dict[str, Any]] = {}
    if path.suffix == ".csv" or path.name.endswith(".csv.gz"):
        with _open_text(path) as f:
            for row in csv.DictReader(f):
                item_id = row.get("Product ID") or row.get("item_id")
                if not item_id:
                    raise ValueError(f"{path}: a row has no 'Product ID' / 'item_id' column")
                attributes = {"price": row["price"]} if row.get("price") else {}
                items[item_id] = {
                    "item_id": item_id,
                    # The MI file's "Description" column holds the product title.
                    "title": row.get("Description") or row.get("title") or "",
                    "categories": row.get("Category") or row.get("categories") or "",
                    "description": row.get("description", ""),
                    "attributes": attributes,
                }
        return items
    with _open_text(path) as f:
        for line in f:
            if line.strip():
                raw = json.loads(line)
                item_id = str(raw.get("item_id") or raw.get("asin") or "")
                if not item_id:
                    raise ValueError(f"{path}: an item record has no item_id")
                items[item_id] = {
                    "item_id": item_id,
                    "title": raw.get("title") or raw.get("item_title") or "",
                    "categories": raw.get("categories") or raw.get("category") or "",
                    "description": raw.get("description") or raw.get("item_description") or "",
                    "attributes": raw.get("attributes") or {},
                }
    return items


def load_review_ids(path: str | Path) -> set[str]:
    """Review ids to exclude, one per line (``#`` comments allowed) or JSON lines with ``review_id``."""
    ids = set()
    with _open_text(Path(path)) as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            ids.add(str(json.loads(line)["review_id"]) if line.startswith("{") else line)
    return ids

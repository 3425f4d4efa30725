"""The review ids a split holds out, for the leakage guard of the offline LLM stages.

The LLM stages (``persona4rec llm ...``) must not read validation or test reviews of the
split they will be evaluated on: an item's personas built from a held-out review would
describe the very interaction the evaluation asks to predict. This module names those
reviews, with the cleaning and split of ``persona4rec evaluate`` (latest review per
user-item pair, k-core, then the split), so the two agree row for row.

Review ids: a review's own ``review_id`` field when the raw record has one (Yelp, the
normalised JSON shape), else ``"{user}:{item}"``, which for Amazon 5-core files is
``"{reviewerID}:{asin}"`` (unique after de-duplication), the id ``persona4rec.llm.inputs``
gives the same reviews.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from persona4rec.data import split as split_module
from persona4rec.data.registry import load_dataset
from persona4rec.data.split import dedupe_keep_latest, k_core
from persona4rec.data.tables import ReviewTable

SPLITS = ("loo", "temporal")


def review_id(raw: dict, user: str, item: str) -> str:
    """The id of one review row: its own ``review_id`` when it has one, else ``"{user}:{item}"``."""
    own = raw.get("review_id") if isinstance(raw, dict) else None
    return str(own) if own not in (None, "") else f"{user}:{item}"


def review_ids(table: ReviewTable, rows: np.ndarray | None = None) -> list[str]:
    """Review ids of ``rows`` of ``table`` (all rows when None)."""
    rows = np.arange(len(table)) if rows is None else np.asarray(rows)
    return [review_id(table.raw[r], str(table.user[r]), str(table.item[r])) for r in rows]


def split_table(table: ReviewTable, split: str = "loo", tie_break: str = "random", seed: int = 0):
    """The split object of ``split`` ("loo": leave-one-out by time; "temporal": two global time cuts)."""
    if split == "loo":
        return split_module.leave_one_out_split(table, tie_break, seed)
    if split == "temporal":
        temporal = getattr(split_module, "temporal_split", None)
        if temporal is None:
            raise ValueError("this version of persona4rec has no temporal split; use --split loo")
        return temporal(table, tie_break=tie_break, seed=seed)
    raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")


def heldout_review_ids_of_table(reviews: ReviewTable, split: str = "loo", tie_break: str = "random",
                                seed: int = 0, k_core_min: int = 5) -> set[str]:
    """Ids of every review the split keeps out of training (validation and test rows, and for the
    temporal split every review from the first cut on), after the evaluation's cleaning."""
    table = k_core(dedupe_keep_latest(reviews), k_core_min)
    parts = split_table(table, split, tie_break, seed)
    held_out = np.ones(len(table), dtype=bool)
    held_out[parts.train] = False
    return set(review_ids(table, np.flatnonzero(held_out)))


def heldout_review_ids(dataset: str, split: str = "loo", tie_break: str = "random", seed: int = 0,
                       data_dir: str | os.PathLike[str] | None = None, k_core_min: int = 5,
                       download: bool = False) -> set[str]:
    """Held-out review ids of a registered ``dataset`` under ``split`` (see
    :func:`heldout_review_ids_of_table`); the defaults are those of ``persona4rec evaluate``."""
    reviews, _ = load_dataset(dataset, data_dir, download=download)
    return heldout_review_ids_of_table(reviews, split, tie_break, seed, k_core_min)


def write_review_ids(ids: set[str], path: str | os.PathLike[str], comment: str = "") -> Path:
    """One id per line, sorted, after ``#`` comment lines (the format of ``--exclude-review-ids``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# {line}" for line in comment.splitlines()] + sorted(ids)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path

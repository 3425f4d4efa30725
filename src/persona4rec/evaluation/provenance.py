"""Provenance of LLM personas given to ``persona4rec evaluate --personas``.

An LLM persona written from a validation or test review describes the very interaction
the evaluation asks to predict. The offline stages record, on every persona row, the
``review_ids`` whose text reached the prompt (``"{reviewerID}:{asin}"`` for Amazon 5-core
files, or the record's own ``review_id``; :mod:`persona4rec.data.heldout`). Before such a
file is used, every one of those ids must be a training review of the split being
evaluated; a file without the ids is refused unless the caller vouches for it
(``trust=True``, the ``--trust-personas`` flag), and the report records which.
"""

from __future__ import annotations

import os
from typing import Any, Collection

from persona4rec.data.loaders import iter_records


class PersonaProvenanceError(ValueError):
    """A persona file built from held-out reviews, or one that does not say which reviews."""


def check_persona_provenance(path: str | os.PathLike[str], heldout_ids: Collection[str], *, trust: bool = False,
                             split_name: str = "the split") -> dict[str, Any]:
    """Check every persona row of ``path`` against ``heldout_ids`` (the split's non-training
    review ids). Returns a summary for the report; raises :class:`PersonaProvenanceError`
    when a row names a held-out review (always), or when rows carry no ``review_ids`` and
    ``trust`` is False."""
    heldout = set(heldout_ids)
    rows = with_ids = 0
    leaking: dict[str, list[str]] = {}
    without: list[str] = []
    for number, record in iter_records(path):
        if record.get("status") == "failed":
            continue
        rows += 1
        item = str(record.get("item_id", f"line {number}"))
        ids = record.get("review_ids")
        if not isinstance(ids, list) or not ids:
            without.append(item)
            continue
        with_ids += 1
        bad = [str(i) for i in ids if str(i) in heldout]
        if bad:
            leaking[item] = bad
    path = os.fspath(path)
    if leaking:
        examples = "; ".join(f"{item}: {', '.join(ids[:2])}" for item, ids in list(leaking.items())[:3])
        raise PersonaProvenanceError(
            f"{path}: personas of {len(leaking)} item(s) were written from reviews that {split_name} holds out "
            f"({sum(map(len, leaking.values()))} review ids, e.g. {examples}); they would leak the targets. "
            "Regenerate them with the LLM stages' leakage guard for this split (persona4rec llm ... --split, or "
            "--exclude-review-ids from `persona4rec data heldout`)")
    if without and not trust:
        raise PersonaProvenanceError(
            f"{path}: {len(without)} of {rows} persona rows (e.g. {', '.join(without[:3])}) do not list the "
            "review_ids they were written from, so nothing shows they avoid the held-out reviews; regenerate "
            "them with this version's LLM stages, or pass --trust-personas if you know they are clean")
    return {"file": path, "rows": rows, "rows_with_review_ids": with_ids, "rows_without_review_ids": len(without),
            "checked_against": f"{len(heldout)} held-out review ids of {split_name}",
            "trusted_without_provenance": bool(without) and trust}

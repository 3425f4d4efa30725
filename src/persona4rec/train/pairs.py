"""Training pairs for user-persona alignment, and the two ways to label them.

A pair is (user profile vector, positive persona vector) plus ids used to mask in-batch
negatives and, optionally, the other personas of the positive item as hard negatives.

Labels come from
  (a) the LLM judge's selections (``4_selected_personas.jsonl.gz`` rows), parsed
      defensively: :func:`parse_judge_selections`;
  (b) the user's own review, without an LLM: the target item's persona closest to the
      review embedding, :func:`review_grounded_selection`.
:func:`selection_agreement` reports how often the two agree where both exist.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any, Hashable, Iterable, Mapping, Sequence

import numpy as np

from persona4rec.selection import _PID_RE, SelectionMatch, find_selection, read_choice  # noqa: F401 - re-exported

def _as_vectors(x: Any, what: str, dim: int | None = None) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{what}: expected a 2-d (n, d) array, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{what}: expected floating-point vectors, got dtype {arr.dtype}")
    if dim is not None and arr.shape[1] != dim:
        raise ValueError(f"{what}: dimension {arr.shape[1]} != {dim}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what}: contains NaN or infinite values")
    return arr


def _as_ids(x: Any, n: int, what: str) -> np.ndarray | None:
    if x is None:
        return None
    arr = np.asarray(x)
    if arr.shape != (n,):
        raise ValueError(f"{what}: expected shape ({n},), got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{what}: expected integer ids (map strings to dense ints first), got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


@dataclass
class TrainingPairs:
    """Arrays of (user vector, positive persona vector) pairs.

    users, positives: (n, d) float32. user_ids, item_ids: (n,) ints used to mask in-batch
    negatives of the same user / item. positive_ids: (n,) ints naming the positive persona
    (a duplicate of a row's own positive elsewhere in the batch is always masked; -1 =
    unknown). hard_negatives: (n, H, d) float32, the positive item's other personas, with
    hard_valid (n, H) bool marking the real ones (rows have different persona counts).
    """

    users: np.ndarray
    positives: np.ndarray
    user_ids: np.ndarray | None = None
    item_ids: np.ndarray | None = None
    positive_ids: np.ndarray | None = None
    hard_negatives: np.ndarray | None = None
    hard_valid: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.users = _as_vectors(self.users, "users")
        n, d = self.users.shape
        if n == 0:
            raise ValueError("no training pairs (users is empty)")
        if d == 0:
            raise ValueError("users have dimension 0")
        self.positives = _as_vectors(self.positives, "positives")
        if self.positives.shape != (n, d):
            raise ValueError(f"positives shape {self.positives.shape} != users shape {(n, d)}")
        self.user_ids = _as_ids(self.user_ids, n, "user_ids")
        self.item_ids = _as_ids(self.item_ids, n, "item_ids")
        self.positive_ids = _as_ids(self.positive_ids, n, "positive_ids")
        if self.hard_negatives is None:
            if self.hard_valid is not None:
                raise ValueError("hard_valid given without hard_negatives")
        else:
            hn = np.asarray(self.hard_negatives)
            if hn.ndim != 3 or hn.shape[0] != n or hn.shape[2] != d:
                raise ValueError(f"hard_negatives: expected shape ({n}, H, {d}), got {hn.shape}")
            if not np.issubdtype(hn.dtype, np.floating):
                raise ValueError(f"hard_negatives: expected floats, got dtype {hn.dtype}")
            hn = np.ascontiguousarray(hn, dtype=np.float32)
            if self.hard_valid is None:
                hv = np.ones(hn.shape[:2], bool)
            else:
                hv = np.asarray(self.hard_valid, dtype=bool)
                if hv.shape != hn.shape[:2]:
                    raise ValueError(f"hard_valid shape {hv.shape} != {hn.shape[:2]}")
            if not np.all(np.isfinite(hn[hv])):
                raise ValueError("hard_negatives: contains NaN or infinite values")
            hn[~hv] = 0.0
            self.hard_negatives, self.hard_valid = hn, hv

    def __len__(self) -> int:
        return int(self.users.shape[0])

    @property
    def dim(self) -> int:
        return int(self.users.shape[1])

    def subset(self, index: Any) -> "TrainingPairs":
        idx = np.asarray(index)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)

        def take(a):
            return None if a is None else a[idx]

        return TrainingPairs(
            self.users[idx],
            self.positives[idx],
            take(self.user_ids),
            take(self.item_ids),
            take(self.positive_ids),
            take(self.hard_negatives),
            take(self.hard_valid),
        )

    @classmethod
    def from_persona_bank(
        cls,
        users: Any,
        persona_vectors: Any,
        item_ptr: Any,
        pair_items: Any,
        positive_persona: Any,
        user_ids: Any = None,
        *,
        max_hard_negatives: int | None = None,
        exclude: Any = None,
    ) -> "TrainingPairs":
        """Pairs whose positives (and hard negatives) index a persona bank grouped by item.

        persona_vectors: (P, d). item_ptr: (I + 1,) CSR offsets, personas of item i are rows
        item_ptr[i]:item_ptr[i+1]. pair_items: (n,) item index of each pair.
        positive_persona: (n,) row of the positive persona in the bank (must lie inside its
        item's range). Hard negatives are the item's other personas (up to
        ``max_hard_negatives``, the first ones in bank order), except ``exclude[i]`` (an
        optional (n,) bank row to leave out per pair, -1 for none: e.g. a persona that is
        the user's own review of the item).
        """
        users = _as_vectors(users, "users")
        n, d = users.shape
        bank = _as_vectors(persona_vectors, "persona_vectors", d)
        ptr = _check_ptr(item_ptr, bank.shape[0])
        items = _as_ids(pair_items, n, "pair_items")
        pos = _as_ids(positive_persona, n, "positive_persona")
        if np.any(items < 0) or np.any(items >= len(ptr) - 1):
            raise ValueError("pair_items out of range of item_ptr")
        lo, hi = ptr[items], ptr[items + 1]
        if np.any(pos < lo) or np.any(pos >= hi):
            bad = int(np.flatnonzero((pos < lo) | (pos >= hi))[0])
            raise ValueError(f"pair {bad}: positive persona {pos[bad]} is not a persona of item {items[bad]}")
        skip = np.full(n, -1, np.int64) if exclude is None else _as_ids(exclude, n, "exclude")
        if np.any(skip == pos):
            raise ValueError("a pair's positive persona is also its excluded persona")
        counts = hi - lo
        h = int(max(counts.max() - 1, 0))
        if max_hard_negatives is not None:
            h = min(h, int(max_hard_negatives))
        hard_idx = np.full((n, h), -1, np.int64)
        for i in range(n):  # n is the number of pairs: small; a vectorised version is not worth it
            others = [j for j in range(lo[i], hi[i]) if j != pos[i] and j != skip[i]][:h]
            hard_idx[i, : len(others)] = others
        valid = hard_idx >= 0
        hard = bank[np.where(valid, hard_idx, 0)]
        return cls(users, bank[pos], user_ids, items, pos, hard, valid)


def _check_ptr(item_ptr: Any, n_rows: int) -> np.ndarray:
    ptr = np.asarray(item_ptr)
    if ptr.ndim != 1 or ptr.size < 1 or not np.issubdtype(ptr.dtype, np.integer):
        raise ValueError("item_ptr must be a 1-d integer array of CSR offsets")
    ptr = ptr.astype(np.int64)
    if ptr[0] != 0 or ptr[-1] != n_rows or np.any(np.diff(ptr) < 0):
        raise ValueError(f"item_ptr must start at 0, be non-decreasing and end at {n_rows}")
    return ptr


# --------------------------------------------------------------------------------------
# (a) LLM judge selections


@dataclass(frozen=True)
class JudgeSelection:
    user_id: str
    item_id: str
    persona_id: str | None  # e.g. "P3"; None when nothing could be parsed
    source: str  # "reasoning_id" | "reasoning_number" | "reasoning_name" | "field" | "none"
    field_persona_id: str | None  # what the row's selected_persona_id field says


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a (gzip) JSON-lines file; blank lines skipped, bad lines raise with a line number."""
    from persona4rec.data.loaders import open_text  # gzip detected by magic bytes

    rows = []
    with open_text(path) as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON: {exc}") from exc
    return rows


def parse_selection(row: Mapping[str, Any], persona_names: Mapping[str, str] | None = None) -> JudgeSelection:
    """Parse one stored judge row; the reasoning text's final selection wins over the structured field.

    In the published Amazon sample, ``selected_persona_id`` is "P1" on every row while the
    reasoning's "**Selection:** 3. <item>_P3" names other personas on 38 of 50 (the Yelp
    sample agrees with its field): the field is unreliable. The reasoning is read by
    :func:`find_selection` (lenient: an ``<item_id>_P<k>`` token, "P<k>", a number "k." or a
    persona name (``persona_names``: id -> name) after the last "Selection" marker, else the
    last id token or name anywhere); the ``selected_persona_id`` field is the last resort.
    """
    user = str(row.get("user_id", ""))
    item = str(row.get("target_item_id", row.get("item_id", "")))
    field_raw = row.get("selected_persona_id")
    field_pid = str(field_raw).strip() if field_raw is not None else None
    if field_pid is not None and not _PID_RE.match(field_pid):
        m = re.search(r"_?(P\d+)$", field_pid)
        field_pid = m.group(1) if m else None
    found = find_selection(row.get("selection_reasoning"), item_id=item or None, persona_names=persona_names)
    if found.persona_id is not None:
        return JudgeSelection(user, item, found.persona_id, found.source, field_pid)
    if field_pid is not None:
        return JudgeSelection(user, item, field_pid, "field", field_pid)
    return JudgeSelection(user, item, None, "none", field_pid)


def parse_judge_selections(
    source: str | os.PathLike | Iterable[Mapping[str, Any]],
    personas_by_item: Mapping[str, Mapping[str, str]] | None = None,
) -> list[JudgeSelection]:
    """Parse judge rows (a ``4_selected_personas.jsonl[.gz]`` path or an iterable of dicts).

    personas_by_item: optional item id -> {persona id: name}, used to resolve selections
    that name a persona instead of numbering it, and to reject ids the item does not have
    (those fall back to the next rule; see :func:`parse_selection`).
    """
    rows = read_jsonl(source) if isinstance(source, (str, os.PathLike)) else list(source)
    out = []
    for row in rows:
        if not isinstance(row, Mapping):
            raise ValueError(f"judge row is not an object: {row!r:.80}")
        names = None
        if personas_by_item is not None:
            names = personas_by_item.get(str(row.get("target_item_id", row.get("item_id", ""))))
        sel = parse_selection(row, names)
        if names is not None and sel.persona_id is not None and sel.persona_id not in names:
            fallback = sel.field_persona_id if sel.field_persona_id in names else None
            sel = JudgeSelection(sel.user_id, sel.item_id, fallback, "field" if fallback else "none", sel.field_persona_id)
        out.append(sel)
    return out


def personas_by_item_from_rows(rows: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, str]]:
    """item id -> {persona id: name} from ``3_personas`` / ``3.5_persona_with_summary`` rows."""
    out: dict[str, dict[str, str]] = {}
    for row in rows:
        item = str(row.get("item_id"))
        out[item] = {str(p.get("ID")): str(p.get("Name", "")) for p in row.get("personas") or [] if isinstance(p, Mapping)}
    return out


# --------------------------------------------------------------------------------------
# (b) review-grounded selection


def review_grounded_selection(
    review_vectors: Any,
    review_items: Any,
    persona_vectors: Any,
    item_ptr: Any,
    exclude: Any = None,
) -> tuple[np.ndarray, np.ndarray]:
    """For each review, the persona of its item nearest (cosine) to the review embedding.

    review_vectors: (n, d) embeddings of the users' own reviews of the target items (their
    extracted aspects when available, else the text). review_items: (n,) item index of each
    review into ``item_ptr`` (CSR offsets over ``persona_vectors`` (P, d)). Returns (n,)
    persona rows (-1 when the item has no persona) and the margin between the best and the
    second-best cosine (inf with a single persona), a confidence one can threshold.
    exclude: optional (n,) bank row to ignore per review (-1: none), e.g. the review's own
    vector when every training review of an item is one of its personas.
    """
    rv = _as_vectors(review_vectors, "review_vectors")
    n, d = rv.shape
    bank = _as_vectors(persona_vectors, "persona_vectors", d)
    ptr = _check_ptr(item_ptr, bank.shape[0])
    items = _as_ids(review_items, n, "review_items")
    if np.any(items < 0) or np.any(items >= len(ptr) - 1):
        raise ValueError("review_items out of range of item_ptr")
    rv = rv / np.maximum(np.linalg.norm(rv, axis=1, keepdims=True), 1e-12)
    bn = bank / np.maximum(np.linalg.norm(bank, axis=1, keepdims=True), 1e-12)
    skip = np.full(n, -1, np.int64) if exclude is None else _as_ids(exclude, n, "exclude")
    lo, hi = ptr[items], ptr[items + 1]
    width = int((hi - lo).max()) if n else 0
    scores = np.full((n, max(width, 1)), -np.inf, np.float32)
    for k in range(width):  # width = most personas per item: vectorised over reviews
        has = (lo + k < hi) & (lo + k != skip)
        rows = np.flatnonzero(has)
        scores[rows, k] = np.einsum("ij,ij->i", rv[rows], bn[lo[rows] + k])
    if n == 0:
        return np.empty(0, np.int64), np.empty(0, np.float64)
    best = np.argmax(scores, axis=1)
    top = scores[np.arange(n), best].astype(np.float64)
    if scores.shape[1] > 1:
        second = np.partition(scores, -2, axis=1)[:, -2].astype(np.float64)
    else:
        second = np.full(n, -np.inf)
    out_idx = np.where(np.isfinite(top), lo + best, -1).astype(np.int64)
    with np.errstate(invalid="ignore"):
        out_margin = np.where(np.isfinite(second), top - second, np.inf)
    return out_idx, out_margin


def selection_agreement(
    first: Mapping[Hashable, Hashable],
    second: Mapping[Hashable, Hashable],
    n_choices: Mapping[Hashable, int] | None = None,
) -> dict[str, Any]:
    """How often two selectors pick the same persona for the same (user, item) key.

    first, second: key -> selected persona (None entries are ignored). n_choices: optional
    key -> number of personas of the item, to report the agreement expected by chance
    (mean of 1 / n_choices over the shared keys).
    """
    shared = [k for k in first if k in second and first[k] is not None and second[k] is not None]
    agree = sum(1 for k in shared if first[k] == second[k])
    out: dict[str, Any] = {
        "n_first": sum(v is not None for v in first.values()),
        "n_second": sum(v is not None for v in second.values()),
        "n_both": len(shared),
        "n_agree": agree,
        "agreement": agree / len(shared) if shared else float("nan"),
    }
    if n_choices is not None:
        known = [n_choices[k] for k in shared if k in n_choices and n_choices[k] > 0]
        out["chance_agreement"] = float(np.mean([1.0 / c for c in known])) if known else float("nan")
    return out


def judge_field_disagreement(selections: Sequence[JudgeSelection]) -> dict[str, Any]:
    """Counts of parse sources and of rows where the reasoning overrides the structured field."""
    sources: dict[str, int] = {}
    for s in selections:
        sources[s.source] = sources.get(s.source, 0) + 1
    differ = sum(
        1 for s in selections if s.persona_id is not None and s.field_persona_id is not None and s.persona_id != s.field_persona_id
    )
    return {"rows": len(selections), "sources": sources, "reasoning_differs_from_field": differ}

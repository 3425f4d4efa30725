"""PersonaIndex: the persona-profiled item index that a service holds in memory and queries.

Every item owns one or more persona vectors (int8 codes + one float32 scale each, CSR by
item). An item's score for a user is its best persona's score, and that persona is the
explanation. Exact scoring runs in the native core (:mod:`persona4rec.kernels`);
approximate search uses hnswlib over persona vectors with exact int8 re-scoring.

Thread safety
-------------
Queries (:meth:`PersonaIndex.rerank`, :meth:`~PersonaIndex.search`,
:meth:`~PersonaIndex.search_approx`, :meth:`~PersonaIndex.explain`) are safe from any
number of threads at once: each call reads one immutable snapshot of the index and the
native work runs without the GIL. Mutations (:meth:`~PersonaIndex.add_items`,
:meth:`~PersonaIndex.remove_items`, :meth:`~PersonaIndex.compact`,
:meth:`~PersonaIndex.build_ann`) take an exclusive lock; they build a new snapshot and
publish it atomically, so a query running during a mutation sees the index either
before or after it, never half-way. Two mutations at once are serialised; a mutation
attempted while another holds the lock waits (``blocking``) or raises
:class:`ConcurrentMutationError` (``blocking=False``).
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path
from typing import Any

import numpy as np

from persona4rec import _persist
from persona4rec.errors import ConcurrentMutationError, EncoderMismatchError, UnknownItemError
from persona4rec.kernels import MaxSimIndex, dot_int8, lists_to_csr, quantize

__all__ = [
    "ConcurrentMutationError",
    "EncoderMismatchError",
    "PersonaIndex",
    "PersonaMatch",
    "PersonaText",
    "RerankResult",
    "SearchResult",
    "UnknownItemError",
]


@dataclass(frozen=True)
class PersonaText:
    """What an explanation shows for one persona."""

    persona_id: str
    name: str = ""
    description: str = ""
    rationale: str = ""


@dataclass(frozen=True)
class PersonaMatch:
    """One persona of an item with its score for a user."""

    persona_id: str
    score: float
    name: str
    description: str
    rationale: str
    row: int


@dataclass
class RerankResult:
    """Candidates sorted best first by the fused score.

    ``scores`` is the fused score; ``persona_scores`` the raw max-sim score of the
    matched persona; ``persona_ids`` the matched persona of each item (its explanation).
    """

    ids: list[Any]
    scores: np.ndarray
    persona_scores: np.ndarray
    persona_rows: np.ndarray
    _index: "PersonaIndex" = field(repr=False)
    _state: "_Snapshot" = field(repr=False)

    @property
    def persona_ids(self) -> list[str]:
        return [self._state.persona_text(int(r)).persona_id for r in self.persona_rows]

    def __len__(self) -> int:
        return len(self.ids)


class SearchResult:
    """Top-k items, best first: ``ids``, ``scores`` and ``persona_ids`` (each item's matched
    persona: its explanation), in the shapes of :meth:`PersonaIndex.search` (1-D for one user,
    padded 2-D for a batch). Persona ids are looked up only when read.

    It unpacks and indexes like the tuple earlier versions returned: ``ids, scores``, or
    ``ids, scores, persona_ids`` when the search asked ``return_personas=True``.
    """

    __slots__ = ("ids", "scores", "persona_rows", "_snap", "_unpack_personas", "_persona_ids")

    def __init__(self, ids: np.ndarray, scores: np.ndarray, persona_rows: np.ndarray, snap: "_Snapshot", *,
                 unpack_personas: bool = False) -> None:
        self.ids = ids
        self.scores = scores
        self.persona_rows = persona_rows
        self._snap = snap
        self._unpack_personas = unpack_personas
        self._persona_ids: np.ndarray | None = None

    @property
    def persona_ids(self) -> np.ndarray:
        if self._persona_ids is None:
            out = np.empty(self.persona_rows.shape, dtype=object)
            for pos, r in np.ndenumerate(self.persona_rows):
                out[pos] = self._snap.persona_text(int(r)).persona_id if r >= 0 else None
            self._persona_ids = out
        return self._persona_ids

    def _as_tuple(self) -> tuple[np.ndarray, ...]:
        if self._unpack_personas:
            return self.ids, self.scores, self.persona_ids
        return self.ids, self.scores

    def __iter__(self) -> Iterator[np.ndarray]:
        return iter(self._as_tuple())

    def __len__(self) -> int:
        return len(self._as_tuple())

    def __getitem__(self, i: int) -> np.ndarray:
        if i == 2:  # persona ids are always there, whatever the unpacking
            return self.persona_ids
        return self._as_tuple()[i]

    def __repr__(self) -> str:
        return f"SearchResult(ids={self.ids!r}, scores={self.scores!r})"


_TEXT_FIELDS = ("persona_id", "name", "description", "rationale")
# Largest |value| accepted in a user or persona vector: far above any embedding, far below
# what makes int8 score products (up to 127 * 127 * d times both scales) overflow float32.
_MAX_ABS = 1e15


class _Snapshot:
    """An immutable view of the index; queries read exactly one snapshot."""

    __slots__ = (
        "codes", "scales", "offsets", "core", "ids", "id_kind", "id_to_index", "texts",
        "removed", "n_removed", "ann", "encoder", "dim", "has_empty_items",
    )

    def __init__(self, *, codes: np.ndarray, scales: np.ndarray, offsets: np.ndarray, ids: Any, id_kind: str,
                 id_to_index: "_IdMap", texts: dict[str, _persist.StringColumn] | None = None,
                 removed: np.ndarray | None = None, ann: Any = None, encoder: dict[str, Any] | None = None,
                 core: MaxSimIndex | None = None) -> None:
        self.codes = codes
        self.scales = scales
        self.offsets = offsets
        # Validates the arrays once (offsets, scales, codes in [-127, 127]).
        self.core = core if core is not None else MaxSimIndex(codes, scales, offsets)
        self.ids = ids  # _persist.StringColumn or int64 array, item index -> id
        self.id_kind = id_kind  # "str" | "int"
        self.id_to_index = id_to_index  # _IdMap of exactly these ids, never changed
        self.texts = texts  # dict field -> StringColumn, or None when derived
        self.removed = removed  # uint8 mask (n_items,) or None
        self.n_removed = 0 if removed is None else int(removed.sum())
        self.ann = ann
        self.encoder = encoder
        self.dim = int(codes.shape[1])
        self.has_empty_items = bool(len(offsets) > 1 and np.any(offsets[1:] == offsets[:-1]))

    def replace(self, **changes: Any) -> "_Snapshot":
        """A new snapshot with some fields changed (the native view is reused when the
        arrays are the same)."""
        fields = {f: getattr(self, f) for f in ("codes", "scales", "offsets", "ids", "id_kind", "id_to_index",
                                                "texts", "removed", "ann", "encoder")}
        fields.update(changes)
        same_arrays = all(fields[f] is getattr(self, f) for f in ("codes", "scales", "offsets"))
        return _Snapshot(**fields, core=self.core if same_arrays else None)

    @property
    def n_items(self) -> int:
        return len(self.offsets) - 1

    def item_id(self, i: int) -> Any:
        return self.ids[i] if self.id_kind == "str" else int(self.ids[i])

    def item_of_row(self, row: int) -> int:
        return int(np.searchsorted(self.offsets, row, side="right")) - 1

    def persona_text(self, row: int) -> PersonaText:
        if row < 0:  # an item without personas has no explanation
            raise ValueError("no persona row: the item has no personas")
        if self.texts is None:
            item = self.item_of_row(row)
            return PersonaText(f"{self.item_id(item)}_P{row - int(self.offsets[item]) + 1}")
        return PersonaText(*(self.texts[f][row] for f in _TEXT_FIELDS))

    def lookup(self, item_id: Hashable) -> int:
        """Dense index of a live item, or -1."""
        i = self.id_to_index.mapping().get(item_id, -1)
        if i < 0 or i >= self.n_items or (self.removed is not None and self.removed[i]):
            return -1
        return i


class _IdMap:
    """item id -> dense index for one snapshot. Never changed once a snapshot holds it:
    a mutation publishes a new snapshot with a new map (copy on write), so a query reads
    one consistent map whatever another thread is adding. Built lazily (loading stays
    fast); a load that already decoded the ids hands them over.

    Integer ids in a compact range also get a lookup table, so a candidate array maps to
    indices in one vectorised step instead of one dict probe per id.
    """

    def __init__(self, ids: Any, id_kind: str, keys: list[Any] | None = None) -> None:
        self._ids = ids
        self._kind = id_kind
        self._keys = keys
        self._map: dict[Any, int] | None = None
        self._table: np.ndarray | None = None
        self._table_lo = 0
        self._lock = threading.Lock()

    def _built(self) -> dict[Any, int]:
        m = self._map
        if m is None:
            with self._lock:
                if self._map is None:
                    keys = self._keys
                    if keys is None:
                        keys = self._ids.to_list() if self._kind == "str" else self._ids.tolist()
                    # Later duplicates win: a re-added id points at its newest index.
                    mapping = {k: i for i, k in enumerate(keys)}
                    if self._kind == "int" and keys:
                        lo, hi = min(keys), max(keys)
                        if hi - lo < 4 * len(keys) + 1024:
                            table = np.full(hi - lo + 1, -1, dtype=np.int64)
                            table[np.asarray(keys, dtype=np.int64) - lo] = np.arange(len(keys), dtype=np.int64)
                            self._table, self._table_lo = table, lo
                    self._keys = None
                    self._map = mapping
                m = self._map
        return m

    def mapping(self) -> dict[Any, int]:
        return self._built()

    @property
    def needs_dict_lookup(self) -> bool:
        """True when ids map through the dict (string ids, or ints outside a compact range)."""
        self._built()
        return self._table is None

    def lookup_many(self, ids: Sequence[Any]) -> np.ndarray:
        """Dense indices of ``ids`` (-1 for unknown ones)."""
        mapping = self._built()
        table = self._table
        if table is not None and len(ids):
            arr = np.asarray(ids)
            if arr.ndim == 1 and arr.dtype.kind in "iu":
                if arr.dtype == np.uint64:  # above the int64 range: no such id, never a wrapped one
                    big = arr > np.uint64(np.iinfo(np.int64).max)
                    pos = np.where(big, -1, arr.astype(np.int64)) - self._table_lo
                    pos[big] = -1
                else:
                    pos = arr.astype(np.int64) - self._table_lo
                inside = (pos >= 0) & (pos < len(table))
                return np.where(inside, table[np.where(inside, pos, 0)], -1)
        return np.fromiter(map(mapping.get, ids, repeat(-1)), dtype=np.int64, count=len(ids))

    def with_added(self, ids: Any, added: list[Any], first_index: int) -> "_IdMap":
        """A new map over ``ids`` (the extended id column) that also knows ``added``."""
        out = _IdMap(ids, self._kind)
        if self._map is None:  # never queried: the new map builds lazily from the column
            return out
        mapping = dict(self._map)
        table = self._table
        if table is not None:
            table = table.copy()
        for j, item_id in enumerate(added):
            mapping[item_id] = first_index + j
            if table is not None:
                pos = int(item_id) - self._table_lo
                if 0 <= pos < len(table):
                    table[pos] = first_index + j
                else:
                    table = None  # out of the compact range: fall back to the dict
        out._map, out._table, out._table_lo = mapping, table, self._table_lo
        return out


def _identity_dict(encoder: Any) -> dict[str, Any] | None:
    if encoder is None:
        return None
    if isinstance(encoder, Mapping):
        return dict(encoder)
    identity = getattr(encoder, "identity", None)
    if isinstance(identity, Mapping):
        return dict(identity)
    raise TypeError("encoder must be an identity dict or an object with an `identity` dict")


def _check_ids(item_ids: Sequence[Hashable]) -> tuple[str, Any]:
    ids = list(item_ids)
    if all(isinstance(x, str) for x in ids):
        return "str", ids
    if all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in ids):
        return "int", np.asarray(ids, dtype=np.int64)
    raise TypeError("item ids must be all str or all int (ids are mapped to dense indices once, at build)")


def _as_offsets(offsets: Any, n_items: int, n_vectors: int) -> np.ndarray:
    off = np.asarray(offsets)
    if off.ndim != 1 or not np.issubdtype(off.dtype, np.integer):
        raise ValueError("offsets must be a 1-D integer array (CSR: item i owns rows offsets[i]:offsets[i+1])")
    if len(off) != n_items + 1:
        raise ValueError(f"offsets must have len(item_ids) + 1 = {n_items + 1} entries, got {len(off)}")
    off = np.ascontiguousarray(off, dtype=np.int64)
    if off[0] != 0 or off[-1] != n_vectors or np.any(np.diff(off) < 0):
        raise ValueError(
            f"offsets must start at 0, never decrease, and end at the number of vectors ({n_vectors})")
    return off


def _as_vectors(vectors: Any, normalize: bool) -> np.ndarray:
    v = np.asarray(vectors)
    if v.ndim != 2:
        raise ValueError(f"vectors must be 2-D (n_personas, d), got shape {v.shape}")
    if v.dtype != np.float32:
        raise ValueError(f"vectors must be float32, got {v.dtype}: pass np.asarray(vectors, dtype=np.float32)")
    if not np.all(np.isfinite(v)):
        bad = int(np.flatnonzero(~np.isfinite(v).all(axis=1))[0])
        raise ValueError(f"vectors row {bad} contains NaN or infinity")
    if v.size and float(np.max(np.abs(v))) > _MAX_ABS:
        bad = int(np.flatnonzero(np.abs(v).max(axis=1) > _MAX_ABS)[0])
        raise ValueError(f"vectors row {bad} holds values above {_MAX_ABS:.0e}: scores would overflow float32; "
                         "L2-normalise the vectors (normalize=True)")
    if normalize:
        norms = np.linalg.norm(v, axis=1, keepdims=True)
        if np.any(norms == 0):
            raise ValueError("cannot L2-normalise a zero vector (row "
                             f"{int(np.flatnonzero(norms[:, 0] == 0)[0])})")
        v = v / norms
    return np.ascontiguousarray(v, dtype=np.float32)


def _persona_texts(personas: Any, item_ids: list[Any], offsets: np.ndarray) -> dict[str, list[str]] | None:
    """Per-persona text columns (lists), or None when personas were not given."""
    if personas is None:
        return None
    personas = list(personas)
    n = int(offsets[-1])
    if len(personas) != n:
        raise ValueError(f"personas must have one entry per vector ({n}), got {len(personas)}")
    cols: dict[str, list[str]] = {f: [] for f in _TEXT_FIELDS}
    item_of_row = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    for row, p in enumerate(personas):
        if isinstance(p, PersonaText):
            p = p.__dict__
        elif isinstance(p, str):
            p = {"name": p}
        elif not isinstance(p, Mapping):
            raise TypeError("each persona must be a PersonaText, a dict (persona_id, name, "
                            "description, rationale; also Name/Description/Preference_Rationale) or a str")
        item = int(item_of_row[row])
        default_id = f"{item_ids[item]}_P{row - int(offsets[item]) + 1}"
        cols["persona_id"].append(str(p.get("persona_id") or p.get("unique_persona_id") or default_id))
        cols["name"].append(str(p.get("name") or p.get("Name") or ""))
        cols["description"].append(str(p.get("description") or p.get("Description") or ""))
        cols["rationale"].append(str(p.get("rationale") or p.get("Preference_Rationale") or ""))
    return cols


def fuse_with_base_scores(persona_scores: np.ndarray, base_scores: Any, alpha: float, n_candidates: int,
                          kept: np.ndarray | None) -> np.ndarray:
    """``alpha * persona_score + (1 - alpha) * minmax(base_scores)`` for the kept candidates
    (``kept``: their positions among all ``n_candidates``, None for all); the persona scores
    alone when ``base_scores`` is None. Checks the first-stage scores it is given."""
    if base_scores is None:
        return persona_scores
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    base = np.asarray(base_scores, dtype=np.float32)
    if base.shape != (n_candidates,):
        raise ValueError(f"base_scores must have one score per candidate ({n_candidates}), got shape {base.shape}")
    if not np.all(np.isfinite(base)):
        raise ValueError("base_scores contain NaN or infinity")
    if kept is not None:
        base = base[kept]
    if not len(base):
        return persona_scores
    return np.asarray(np.float32(alpha) * persona_scores + np.float32(1 - alpha) * _minmax(base))


def _minmax(x: np.ndarray) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    if hi > lo:
        return ((x - lo) / (hi - lo)).astype(np.float32)
    return np.zeros_like(x, dtype=np.float32)


class PersonaIndex:
    """Items with several persona vectors each, scored by their best persona.

    Build with :meth:`build`, query with :meth:`rerank` (score a candidate list, the
    paper's online stage), :meth:`search` (exact top-k over the catalog),
    :meth:`search_approx` (hnswlib), :meth:`explain`; persist with :meth:`save` /
    :meth:`load`. See the module docstring for thread safety.
    """

    def __init__(self, snapshot: _Snapshot):
        self._snap = snapshot
        self._mutation_lock = threading.Lock()
        self._ann_query_lock = threading.Lock()

    # ------------------------------------------------------------------ build
    @classmethod
    def build(
        cls,
        item_ids: Sequence[Hashable],
        vectors: np.ndarray,
        offsets: Sequence[int] | np.ndarray,
        personas: Iterable[Mapping[str, Any] | PersonaText | str] | None = None,
        *,
        normalize: bool = False,
        encoder: Mapping[str, Any] | Any | None = None,
    ) -> "PersonaIndex":
        """Build from item ids, persona vectors (float32, n_personas x d) and CSR offsets.

        ``personas`` (optional) gives one text record per vector: a :class:`PersonaText`,
        a dict (``persona_id``/``name``/``description``/``rationale``, or the LLM stage's
        ``unique_persona_id``/``Name``/``Description``/``Preference_Rationale``) or a name.
        Without it persona ids are ``{item_id}_P{n}``. ``normalize=True`` L2-normalises
        the vectors (otherwise the caller must have). ``encoder`` (an identity dict or an
        object with ``.identity``) is recorded so that a mismatched user encoder is
        caught at query time.
        """
        kind, ids = _check_ids(item_ids)
        n_items = len(ids)
        if len(set(ids.tolist() if kind == "int" else ids)) != n_items:
            raise ValueError("item ids must be unique")
        v = _as_vectors(vectors, normalize)
        off = _as_offsets(offsets, n_items, v.shape[0])
        texts = _persona_texts(personas, ids.tolist() if kind == "int" else ids, off)
        codes, scales = quantize(v)
        id_col = _persist.StringColumn.from_list(ids) if kind == "str" else ids
        text_cols = None if texts is None else {f: _persist.StringColumn.from_list(texts[f]) for f in _TEXT_FIELDS}
        snap = _Snapshot(codes=codes, scales=scales, offsets=off, ids=id_col, id_kind=kind,
                         id_to_index=_IdMap(id_col, kind), texts=text_cols, encoder=_identity_dict(encoder))
        return cls(snap)

    # ------------------------------------------------------------ properties
    @property
    def n_items(self) -> int:
        """Live items (removed ones excluded)."""
        s = self._snap
        return s.n_items - s.n_removed

    @property
    def n_personas(self) -> int:
        return int(self._snap.codes.shape[0])

    @property
    def dim(self) -> int:
        return self._snap.dim

    @property
    def encoder_identity(self) -> dict[str, Any] | None:
        return None if self._snap.encoder is None else dict(self._snap.encoder)

    @property
    def memory_bytes(self) -> int:
        s = self._snap
        return int(s.codes.nbytes + s.scales.nbytes + s.offsets.nbytes)

    @property
    def item_ids(self) -> list[Any]:
        """Live item ids in index order."""
        s = self._snap
        return [s.item_id(i) for i in range(s.n_items) if s.removed is None or not s.removed[i]]

    def __len__(self) -> int:
        return self.n_items

    def __contains__(self, item_id: Hashable) -> bool:
        return self._snap.lookup(item_id) >= 0

    def __repr__(self) -> str:
        return (f"PersonaIndex(n_items={self.n_items}, n_personas={self.n_personas}, dim={self.dim}, "
                f"ann={'yes' if self._snap.ann is not None else 'no'})")

    # --------------------------------------------------------------- checks
    def check_encoder(self, encoder: Mapping[str, Any] | Any) -> None:
        """Raise :class:`EncoderMismatchError` if ``encoder`` is not the one the index was built with."""
        mine = self._snap.encoder
        theirs = _identity_dict(encoder)
        if mine is None or theirs is None:
            return
        for key in ("model", "dim", "pooling", "fingerprint"):
            if key in mine and key in theirs and mine[key] != theirs[key]:
                raise EncoderMismatchError(
                    f"user encoder {key}={theirs[key]!r} does not match the index's {key}={mine[key]!r}: "
                    "encode users with the encoder that embedded the personas, or rebuild the index")

    def _query(self, user_vecs: Any, encoder: Any) -> tuple[_Snapshot, np.ndarray, bool]:
        snap = self._snap
        if encoder is not None:
            self.check_encoder(encoder)
        q = np.asarray(user_vecs)
        if q.dtype != np.float32:
            if not np.issubdtype(q.dtype, np.floating):
                raise ValueError(f"user vectors must be float32, got {q.dtype}")
            q = q.astype(np.float32)
        single = q.ndim == 1
        if q.ndim not in (1, 2):
            raise ValueError(f"user vectors must be 1-D (one user) or 2-D (batch), got shape {q.shape}")
        if q.shape[-1] != snap.dim:
            raise EncoderMismatchError(
                f"user vector dimension {q.shape[-1]} does not match the index dimension {snap.dim}: "
                "encode users with the encoder that embedded the personas")
        # NaN, infinity and values that would overflow the scores are refused by the core
        # when it prepares the query (explain, which scores in numpy, checks for itself).
        return snap, np.ascontiguousarray(q), single

    def _indices(self, snap: _Snapshot, ids: Sequence[Any], unknown: str, what: str,
                 need_personas: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """Dense indices of the given ids, and the positions (in ``ids``) they came from
        (None when every id is known, the common case, to keep rerank cheap)."""
        if unknown not in ("error", "skip"):
            raise ValueError("unknown must be 'error' or 'skip'")
        idx = snap.id_to_index.lookup_many(ids)
        if snap.removed is not None and len(idx):
            idx[(idx >= 0) & (snap.removed[np.maximum(idx, 0)] != 0)] = -1
        keep = idx >= 0
        no_personas = None
        if need_personas and len(idx):
            sizes = np.diff(snap.offsets)
            no_personas = keep & (sizes[np.maximum(idx, 0)] == 0)
            keep &= ~no_personas
        if keep.all():
            return idx, None
        if unknown == "error":
            if no_personas is not None and no_personas.any():
                bad = [ids[i] for i in np.flatnonzero(no_personas)[:5]]
                raise UnknownItemError(
                    f"{int(no_personas.sum())} {what} have no personas, so they cannot be scored, e.g. {bad!r}: "
                    "give them personas (add_items), or pass unknown='skip' to drop them")
            bad = [ids[i] for i in np.flatnonzero(~keep)[:5]]
            raise UnknownItemError(
                f"{int((~keep).sum())} {what} not in the index (or removed), e.g. {bad!r}: "
                "pass unknown='skip' to drop them")
        pos = np.flatnonzero(keep)
        return idx[keep], pos

    # ---------------------------------------------------------------- rerank
    def rerank(
        self,
        user_vec: np.ndarray,
        candidate_ids: Sequence[Hashable],
        base_scores: Sequence[float] | np.ndarray | None = None,
        alpha: float = 1.0,
        *,
        unknown: str = "error",
        encoder: Mapping[str, Any] | Any | None = None,
    ) -> RerankResult:
        """Score candidates by their best persona and sort them, best first.

        Fused score: ``alpha * persona_score + (1 - alpha) * minmax(base_scores)``, with
        the first-stage scores min-max normalised over the candidates (a constant list
        becomes 0). Without ``base_scores`` the score is the persona score (``alpha`` is
        ignored). Unknown or removed candidate ids raise :class:`UnknownItemError`
        (``unknown='error'``, the default) or are dropped (``unknown='skip'``). Ties keep
        the candidates' input order.
        """
        snap, q, single = self._query(user_vec, encoder)
        if not single:
            raise ValueError("rerank takes one user vector (1-D); loop or use search() for batches")
        if isinstance(candidate_ids, (str, bytes)):
            raise TypeError("candidate_ids must be a list of item ids, not a string: "
                            f"write rerank(user_vec, [{candidate_ids!r}])")
        cand = candidate_ids if isinstance(candidate_ids, (list, tuple, np.ndarray)) else list(candidate_ids)
        if base_scores is None and snap.id_to_index.needs_dict_lookup and unknown in ("error", "skip"):
            # Hot path for string ids: lookup, scoring and sorting in one native call.
            ids, scores, rows, n_unknown = snap.core.rerank_by_id(
                q, cand, snap.id_to_index.mapping(), snap.n_items, snap.removed)
            # A row of -1 is a candidate without personas: the general path names it.
            if (n_unknown == 0 or unknown == "skip") and (not snap.has_empty_items or len(rows) == 0
                                                          or rows.min() >= 0):
                return RerankResult(ids, scores, scores, rows, self, snap)
        idx, pos = self._indices(snap, cand, unknown, "candidate ids", need_personas=True)
        persona_scores, rows = snap.core.score_candidates(q, idx)
        fused = fuse_with_base_scores(persona_scores, base_scores, alpha, len(cand), pos)
        order = np.argsort(-fused, kind="stable")
        positions = order if pos is None else pos[order]
        if snap.id_kind == "int":
            ids = np.asarray(cand, dtype=np.int64)[positions].tolist()
        else:
            ids = [cand[p] for p in positions.tolist()]
        return RerankResult(ids, fused[order], persona_scores[order], rows[order], self, snap)

    # ---------------------------------------------------------------- search
    def _lists(self, snap: _Snapshot, lists: Any, n_queries: int, single: bool, unknown: str, what: str
               ) -> tuple[np.ndarray, np.ndarray] | None:
        if lists is None:
            return None
        if isinstance(lists, (str, bytes)):
            raise TypeError(f"{what} must be a list of item ids{'' if single else ' per user'}, not a string: "
                            f"write {what}=[{lists!r}]" if single else f"write {what}=[[{lists!r}]]")
        if single:
            lists = [lists]
        elif any(isinstance(lst, (str, bytes)) for lst in lists):
            raise TypeError(f"{what} for a batch must hold one list of item ids per user, not strings: "
                            f"write [[id, ...], ...]")
        if len(lists) != n_queries:
            raise ValueError(f"{what} must have one list per user ({n_queries}), got {len(lists)}")
        out = []
        for lst in lists:
            lst = list(lst)
            idx, _ = self._indices(snap, lst, unknown, f"{what} ids")
            out.append(idx)
        return lists_to_csr(out, n_queries)

    def search(
        self,
        user_vecs: np.ndarray,
        k: int = 10,
        exclude: Sequence[Any] | None = None,
        allow: Sequence[Any] | None = None,
        *,
        return_personas: bool = False,
        n_threads: int = 1,
        unknown: str = "error",
        encoder: Mapping[str, Any] | Any | None = None,
    ) -> SearchResult:
        """Exact top-k items over the whole catalog.

        One user (1-D vector) gives 1-D ``ids, scores`` with at most ``k`` entries; a batch
        (2-D) gives 2-D arrays of ``k`` columns, padded with ``-1`` (int ids) or ``None``
        (str ids) and ``-inf`` when fewer items are eligible. ``exclude`` (already-seen
        items; unknown ids are ignored) or ``allow`` (only these; unknown ids follow
        ``unknown``) are one list of item ids per user (a plain list for one user).
        ``return_personas=True`` adds the matched persona ids as a third result.
        ``n_threads`` > 1 splits a batch across threads (default: the calling thread only).
        """
        if exclude is not None and allow is not None:
            raise ValueError("pass either exclude or allow, not both")
        if int(k) != k or k < 0:
            raise ValueError(f"k must be a non-negative integer, got {k}")
        snap, q, single = self._query(user_vecs, encoder)
        q2 = q[None, :] if single else q
        deny = self._lists(snap, exclude, len(q2), single, "skip", "exclude")
        allow_csr = self._lists(snap, allow, len(q2), single, unknown, "allow")
        items, scores, rows = snap.core.topk(q2, int(k), allow=allow_csr, deny=deny,
                                             exclude_mask=snap.removed, n_threads=n_threads)
        return self._format(snap, items, scores, rows, single, return_personas)

    def _format(self, snap: _Snapshot, items: np.ndarray, scores: np.ndarray, rows: np.ndarray, single: bool,
                return_personas: bool) -> "SearchResult":
        ids: np.ndarray
        if snap.id_kind == "int":
            ids = np.where(items >= 0, snap.ids[np.maximum(items, 0)] if snap.n_items else -1, -1)
        else:
            ids = np.empty(items.shape, dtype=object)
            for pos, i in np.ndenumerate(items):
                ids[pos] = snap.ids[int(i)] if i >= 0 else None
        if single:
            n = int((items[0] >= 0).sum())
            ids, scores, rows = ids[0, :n], scores[0, :n], rows[0, :n]
        return SearchResult(ids, scores, rows, snap, unpack_personas=return_personas)

    # --------------------------------------------------------------- explain
    def explain(self, user_vec: np.ndarray, item_id: Hashable, *, encoder: Any = None) -> list[PersonaMatch]:
        """Every persona of one item with its score for the user, best first."""
        snap, q, single = self._query(user_vec, encoder)
        if not single:
            raise ValueError("explain takes one user vector (1-D)")
        peak = float(np.max(np.abs(q))) if q.size else 0.0
        if not np.isfinite(peak):
            raise ValueError("the user vector contains NaN or infinity: check the profile that produced it")
        if peak > _MAX_ABS:
            raise ValueError(f"the user vector holds values up to {peak:.3g}, above {_MAX_ABS:.0e}: scores would "
                             "overflow float32; L2-normalise the user vector")
        i = snap.lookup(item_id)
        if i < 0:
            raise UnknownItemError(f"item {item_id!r} is not in the index (or was removed)")
        a, b = int(snap.offsets[i]), int(snap.offsets[i + 1])
        q_codes, q_scale = quantize(q[None, :])
        dots = dot_int8(q_codes[0], snap.codes[a:b])
        scores = (dots.astype(np.float32) * q_scale[0]) * snap.scales[a:b]
        out = []
        for j in np.argsort(-scores, kind="stable"):
            t = snap.persona_text(a + int(j))
            out.append(PersonaMatch(t.persona_id, float(scores[j]), t.name, t.description, t.rationale, a + int(j)))
        return out

    # -------------------------------------------------------------- mutation
    def _acquire(self, blocking: bool) -> None:
        if not self._mutation_lock.acquire(blocking=blocking):
            raise ConcurrentMutationError("another mutation of this index is in progress")

    def add_items(self, item_ids: Sequence[Hashable], vectors: np.ndarray, offsets: Any, personas: Any = None, *,
                  normalize: bool = False, blocking: bool = True) -> None:
        """Append items (ids must be new; a removed id may be added again).

        Copies the int8 arrays once (a memory-mapped index becomes an in-memory one); the
        approximate-search graph, if any, gets the new personas too.
        """
        self._acquire(blocking)
        try:
            snap = self._snap
            kind, ids = _check_ids(item_ids)
            if len(ids) == 0:  # nothing to add (an empty list has no id kind): check the shapes only
                _as_offsets(offsets, 0, _as_vectors(vectors, normalize).shape[0])
                return
            if kind != snap.id_kind:
                raise TypeError(f"this index has {snap.id_kind} item ids; got {kind} ids")
            id_list = ids.tolist() if kind == "int" else ids
            if len(set(id_list)) != len(id_list):
                raise ValueError("item ids must be unique")
            clash = [x for x in id_list if snap.lookup(x) >= 0]
            if clash:
                raise ValueError(f"items already in the index: {clash[:5]!r}; remove them first to replace them")
            v = _as_vectors(vectors, normalize)
            if v.shape[1] != snap.dim:
                raise ValueError(f"vectors have dimension {v.shape[1]}, the index has {snap.dim}")
            off = _as_offsets(offsets, len(id_list), v.shape[0])
            codes, scales = quantize(v)
            n_old_items, n_old_rows = snap.n_items, snap.codes.shape[0]
            new_codes = np.concatenate([snap.codes, codes])
            new_scales = np.concatenate([snap.scales, scales])
            new_offsets = np.concatenate([snap.offsets, off[1:] + n_old_rows])
            if kind == "str" or (len(id_list) == 0 and snap.id_kind == "str"):
                new_ids = snap.ids.extended(id_list)
            else:
                new_ids = np.concatenate([snap.ids, np.asarray(id_list, dtype=np.int64)])
            texts = snap.texts
            if texts is not None or personas is not None:
                new_texts_lists = _persona_texts(personas, id_list, off) if personas is not None else None
                if texts is None:  # materialise derived ids for the old part
                    texts = {f: _persist.StringColumn.from_list(
                        [getattr(snap.persona_text(r), f) for r in range(n_old_rows)]) for f in _TEXT_FIELDS}
                if new_texts_lists is None:
                    new_texts_lists = _persona_texts([{}] * v.shape[0], id_list, off)
                assert new_texts_lists is not None  # records were given (an empty one per vector at least)
                texts = {f: texts[f].extended(new_texts_lists[f]) for f in _TEXT_FIELDS}
            removed = None
            if snap.removed is not None:
                removed = np.concatenate([snap.removed, np.zeros(len(id_list), dtype=np.uint8)])
            id_map = snap.id_to_index.with_added(new_ids, id_list, n_old_items)
            ann = snap.ann
            if ann is not None:
                ann = ann.with_added(codes, scales, n_old_rows)
            self._snap = snap.replace(codes=new_codes, scales=new_scales, offsets=new_offsets, ids=new_ids,
                                      id_to_index=id_map, texts=texts, removed=removed, ann=ann)
        finally:
            self._mutation_lock.release()

    def remove_items(self, item_ids: Sequence[Hashable], *, missing: str = "error", blocking: bool = True) -> int:
        """Tombstone items: they are never returned again. Returns how many were removed.

        The space is reclaimed by :meth:`compact`. ``missing='ignore'`` skips unknown ids.
        """
        if missing not in ("error", "ignore"):
            raise ValueError(f"missing must be 'error' or 'ignore', got {missing!r}")
        if isinstance(item_ids, (str, bytes)):
            raise TypeError(f"item_ids must be a list of item ids, not a string: write remove_items([{item_ids!r}])")
        self._acquire(blocking)
        try:
            snap = self._snap
            ids = list(dict.fromkeys(item_ids))  # a repeated id is removed (and counted) once
            idx, _ = self._indices(snap, ids, "error" if missing == "error" else "skip", "ids to remove")
            removed = np.zeros(snap.n_items, dtype=np.uint8) if snap.removed is None else snap.removed.copy()
            removed[idx] = 1
            self._snap = snap.replace(removed=removed)
            return len(idx)
        finally:
            self._mutation_lock.release()

    def compact(self, *, blocking: bool = True) -> None:
        """Drop removed items for good (rebuilds the arrays and, if present, the ANN graph)."""
        self._acquire(blocking)
        try:
            snap = self._snap
            if snap.removed is None or snap.n_removed == 0:
                return
            keep_items = np.flatnonzero(snap.removed == 0)
            sizes = np.diff(snap.offsets)[keep_items]
            rows = np.concatenate([np.arange(snap.offsets[i], snap.offsets[i + 1]) for i in keep_items]) \
                if len(keep_items) else np.zeros(0, dtype=np.int64)
            offsets = np.zeros(len(keep_items) + 1, dtype=np.int64)
            np.cumsum(sizes, out=offsets[1:])
            codes = np.ascontiguousarray(snap.codes[rows])
            scales = np.ascontiguousarray(snap.scales[rows])
            ids: Any
            if snap.id_kind == "str":
                ids = _persist.StringColumn.from_list([snap.ids[int(i)] for i in keep_items])
            else:
                ids = np.ascontiguousarray(snap.ids[keep_items])
            texts = None
            if snap.texts is not None:
                texts = {f: _persist.StringColumn.from_list([snap.texts[f][int(r)] for r in rows]) for f in _TEXT_FIELDS}
            ann = snap.ann.rebuilt(codes, scales) if snap.ann is not None else None
            self._snap = snap.replace(codes=codes, scales=scales, offsets=offsets, ids=ids,
                                      id_to_index=_IdMap(ids, snap.id_kind), texts=texts, removed=None, ann=ann)
        finally:
            self._mutation_lock.release()

    # ------------------------------------------------------- approximate search
    def build_ann(self, M: int = 16, ef_construction: int = 100, ef: int = 128, *, seed: int = 0,
                  n_threads: int = 1, blocking: bool = True) -> None:
        """Build an hnswlib graph over the (dequantized) persona vectors for :meth:`search_approx`."""
        from persona4rec._ann import PersonaGraph

        self._acquire(blocking)
        try:
            snap = self._snap
            graph = PersonaGraph.build(snap.codes, snap.scales, M=M, ef_construction=ef_construction, ef=ef,
                                       seed=seed, n_threads=n_threads)
            self._snap = snap.replace(ann=graph)
        finally:
            self._mutation_lock.release()

    def search_approx(self, user_vecs: np.ndarray, k: int = 10, exclude: Sequence[Any] | None = None, *,
                      ef: int | None = None, overfetch: int = 4, return_personas: bool = False,
                      encoder: Any = None) -> SearchResult:
        """Approximate top-k: hnswlib finds ``overfetch * k`` personas, they are grouped by
        item (an item's score is its best persona among those found... then re-scored
        exactly over all its personas with the int8 kernel), and the best ``k`` items are
        returned. Same shapes as :meth:`search`. Requires :meth:`build_ann` (or a loaded graph).
        """
        snap, q, single = self._query(user_vecs, encoder)
        if snap.ann is None:
            raise RuntimeError("no approximate-search graph: call build_ann() first")
        if int(k) != k or k < 0:
            raise ValueError(f"k must be a non-negative integer, got {k}")
        q2 = q[None, :] if single else q
        deny = self._lists(snap, exclude, len(q2), single, "skip", "exclude")
        n_fetch = max(1, min(snap.codes.shape[0], overfetch * max(int(k), 1) + snap.n_removed))
        with self._ann_query_lock:
            rows = snap.ann.query(q2, n_fetch, ef)
        k = int(k)
        items_out = np.full((len(q2), k), -1, dtype=np.int64)
        scores_out = np.full((len(q2), k), -np.inf, dtype=np.float32)
        rows_out = np.full((len(q2), k), -1, dtype=np.int64)
        for u in range(len(q2)):
            r = rows[u]
            # The graph is shared with newer snapshots (hnswlib inserts in place): rows
            # beyond this snapshot belong to items it does not hold.
            r = r[(r >= 0) & (r < snap.codes.shape[0])]
            cand = np.unique(np.searchsorted(snap.offsets, r, side="right") - 1)
            if snap.removed is not None:
                cand = cand[snap.removed[cand] == 0]
            if deny is not None:
                d0, d1 = deny[0][u], deny[0][u + 1]
                cand = cand[~np.isin(cand, deny[1][d0:d1])]
            if not len(cand) or not k:
                continue
            s, pr = snap.core.score_candidates(q2[u], cand)
            order = np.lexsort((cand, -s))[:k]
            n = len(order)
            items_out[u, :n], scores_out[u, :n], rows_out[u, :n] = cand[order], s[order], pr[order]
        return self._format(snap, items_out, scores_out, rows_out, single, return_personas)

    def recall_at_k(self, user_vecs: np.ndarray, k: int = 10, *, ef: int | None = None, overfetch: int = 4,
                    reference_vectors: np.ndarray | None = None) -> float:
        """Mean recall@k of :meth:`search_approx` on these users.

        The truth is exact int8 :meth:`search` by default. Pass ``reference_vectors`` (the
        float32 persona vectors the index was built from, one row per persona) to measure
        against the float exact answer instead, which also counts what int8 scoring
        changes: the number a user comparing with a float index should look at.
        """
        q = np.atleast_2d(np.asarray(user_vecs, dtype=np.float32))
        approx, _ = self.search_approx(q, k, ef=ef, overfetch=overfetch)
        snap = self._snap
        if reference_vectors is None:
            exact, _ = self.search(q, k)
            truths = [{x for x in e.tolist() if x is not None and x != -1} for e in exact]
        else:
            ref = np.asarray(reference_vectors, dtype=np.float32)
            if ref.shape != snap.codes.shape:
                raise ValueError(f"reference_vectors must have shape {snap.codes.shape} (one float row per "
                                 f"persona, in index order), got {ref.shape}")
            sizes = np.diff(snap.offsets)
            live = sizes > 0
            if snap.removed is not None:
                live &= snap.removed == 0
            starts = snap.offsets[:-1][sizes > 0]
            truths = []
            for u in range(len(q)):
                per_row = ref @ q[u]
                item_scores = np.full(snap.n_items, -np.inf, dtype=np.float32)
                if len(starts):
                    item_scores[sizes > 0] = np.maximum.reduceat(per_row, starts)
                item_scores[~live] = -np.inf
                order = np.lexsort((np.arange(snap.n_items), -item_scores))[:k]
                truths.append({snap.item_id(int(i)) for i in order if np.isfinite(item_scores[i])})
        hits = []
        for truth, a in zip(truths, approx):
            if truth:
                hits.append(len(truth & set(a.tolist())) / len(truth))
        return float(np.mean(hits)) if hits else 1.0

    # ----------------------------------------------------------- persistence
    def save(self, path: str | Path) -> None:
        """Write the index, its ANN graph included, as one file, atomically (temp file,
        fsync, rename, directory fsync), in the versioned binary format of
        :mod:`persona4rec._persist`: a kill at any point leaves the old or the new file."""
        _persist.save_index(self._snap, Path(path))

    @classmethod
    def load(cls, path: str | Path, mmap: bool = True, *, verify: bool = True) -> "PersonaIndex":
        """Open a saved index. ``mmap=True`` maps the vectors read-only without copying,
        so worker processes share one copy in the page cache. ``verify=False`` skips the
        checksum of the vector payload (everything else is always checked, the codes' range
        included).

        Raises :class:`persona4rec.IndexFormatError` (a ``ValueError``) naming the problem for
        a truncated, corrupted or version-mismatched file.
        """
        parts = _persist.load_index(Path(path), mmap=mmap, verify=verify)
        ann = None
        if parts["ann"] is not None:
            from persona4rec._ann import PersonaGraph, parse_hnswlib_file

            stored = parts["ann"]
            if "hnswlib_file" in stored:  # format 1: the graph in hnswlib's own file layout
                scalars, arrays = parse_hnswlib_file(stored["hnswlib_file"], Path(stored["source"]))
                stored = {"meta": dict(stored["meta"], hnswlib=scalars), "arrays": arrays, "source": stored["source"]}
            ann = PersonaGraph.from_sections(stored["meta"], stored["arrays"], parts["codes"], parts["scales"],
                                             source=stored["source"])
        ids = parts["ids"]
        snap = _Snapshot(codes=parts["codes"], scales=parts["scales"], offsets=parts["offsets"], ids=ids,
                         id_kind=parts["id_kind"], id_to_index=_IdMap(ids, parts["id_kind"]),
                         texts=parts["texts"], removed=parts["removed"], ann=ann, encoder=parts["encoder"],
                         core=parts["core"])
        return cls(snap)

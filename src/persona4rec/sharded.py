"""ShardedPersonaIndex: one catalog split over several PersonaIndex files, queried as one.

Items go to shards by a stable hash of their id (:func:`shard_of`), so any process (a
Ray Serve replica, a pipeline worker) routes an id without asking anyone. A query scans
every shard in its own thread (the native core releases the GIL, so this is real
parallelism) and the per-shard top-k lists are merged exactly.

Identical results to one PersonaIndex
-------------------------------------
Quantization is per vector, so an item's score does not depend on which other items
share its index: a shard scores an item exactly as the single index would. The single
index breaks score ties by the lower internal index, i.e. insertion order; every item
here carries its global insertion ordinal, shards keep their items in ordinal order
(items reach a shard in the same order as they reach the catalog), and the merge sorts by
(score descending, ordinal ascending). Exclusions are applied inside each shard, before
its top-k, so the merge of per-shard top-k lists is the exact global top-k.

On disk
-------
A directory holding ``manifest.json`` (format version, shard count, the partitioning
rule, id kind, dimension, encoder identity, and per shard: its index file, ordinal file,
their sizes and BLAKE2b digests, item and persona counts) and per shard one PersonaIndex
file plus one ``.ord.npy`` file (the global ordinal of each live item, in shard order).
:meth:`ShardedPersonaIndex.save` writes new shard files under new names (a generation
number), fsyncs them, and only then replaces the manifest atomically (temp file, fsync,
rename, directory fsync); files of older generations are deleted afterwards. A process
killed at any point leaves either the old or the new version loadable. One writer per
directory at a time (an advisory ``flock`` on ``DIR/.lock`` serialises writers).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import threading
from collections.abc import Hashable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from persona4rec._persist import atomic_write, fsync_dir
from persona4rec.errors import EncoderMismatchError
from persona4rec.hashing import file_blake2b
from persona4rec.index import PersonaIndex, PersonaMatch, UnknownItemError, fuse_with_base_scores

__all__ = [
    "IndexShard",
    "check_user_vectors",
    "format_topk",
    "fuse_rerank",
    "route_candidates",
    "route_lists",
    "ManifestError",
    "ShardedPersonaIndex",
    "ShardedRerankResult",
    "merge_topk",
    "read_manifest",
    "shard_of",
]

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "persona4rec-sharded"
MANIFEST_VERSION = 1
PARTITION_RULE = "blake2b-64"
PARTITION_DOC = ("shard = int.from_bytes(blake2b(key, digest_size=8).digest(), 'little') % n_shards, "
                 "key = b's:' + utf8(id) for str ids, b'i:' + ascii(decimal id) for int ids")
_NO_ORDINAL = np.iinfo(np.int64).max  # pads sort after every real item


class ManifestError(ValueError):
    """A sharded index directory that cannot be trusted (missing, corrupted, newer format, files that
    do not match the manifest)."""


def _id_key(item_id) -> bytes:
    if isinstance(item_id, str):
        return b"s:" + item_id.encode("utf-8")
    if isinstance(item_id, (int, np.integer)) and not isinstance(item_id, bool):
        return b"i:" + str(int(item_id)).encode("ascii")
    raise TypeError(f"item ids must be str or int, got {type(item_id).__name__}")


def shard_of(item_id: Hashable, n_shards: int) -> int:
    """The shard that holds ``item_id`` (stable across processes, machines and Python versions)."""
    digest = hashlib.blake2b(_id_key(item_id), digest_size=8).digest()
    return int.from_bytes(digest, "little") % n_shards




def read_manifest(path: str | Path) -> dict:
    """The manifest of a sharded index directory, checked for format and consistency."""
    path = Path(path)
    mf = path / MANIFEST
    if not mf.is_file():
        raise ManifestError(f"{path} is not a sharded persona index: {MANIFEST} is missing "
                            "(write one with ShardedPersonaIndex.build(..., path=DIR) or .save(DIR))")
    try:
        meta = json.loads(mf.read_text("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{mf} is not valid JSON: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != MANIFEST_FORMAT:
        raise ManifestError(f"{mf} is not a {MANIFEST_FORMAT} manifest")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > MANIFEST_VERSION:
        raise ManifestError(f"{mf} has format version {version!r}; this persona4rec reads up to "
                            f"{MANIFEST_VERSION}: upgrade persona4rec")
    if meta.get("partition", {}).get("rule") != PARTITION_RULE:
        raise ManifestError(f"{mf} uses partitioning rule {meta.get('partition')!r}, expected {PARTITION_RULE}")
    n = meta.get("n_shards")
    shards = meta.get("shards")
    if not isinstance(n, int) or n < 1 or not isinstance(shards, list) or len(shards) != n:
        raise ManifestError(f"{mf}: n_shards {n!r} does not match its {len(shards or [])} shard entries")
    return meta


# --------------------------------------------------------------------------- one shard
class IndexShard:
    """One shard: a PersonaIndex (``None`` while the shard is empty) plus the global insertion
    ordinal of each of its items. A Ray Serve replica holds exactly one of these."""

    def __init__(self, index: PersonaIndex | None, ordinals: Mapping | None = None,
                 ordinal_array: np.ndarray | None = None):
        self.index = index
        # id -> ordinal, built on first use from the saved array (aligned with index.item_ids)
        self._ordinals: dict | None = dict(ordinals) if ordinals is not None else None
        self._ordinal_array = ordinal_array
        self._lock = threading.Lock()
        self.source: tuple[Path, dict] | None = None  # (directory, manifest entry) it was loaded from, until changed

    @classmethod
    def open(cls, directory: str | Path, shard_no: int, *, mmap: bool = True, verify: bool = True,
             manifest: dict | None = None) -> "IndexShard":
        """Open shard ``shard_no`` of a sharded index directory on its own (what a serving replica does)."""
        directory = Path(directory)
        meta = manifest if manifest is not None else read_manifest(directory)
        if not 0 <= shard_no < meta["n_shards"]:
            raise ValueError(f"shard {shard_no} does not exist: the index has {meta['n_shards']} shards")
        entry = meta["shards"][shard_no]
        if entry.get("file") is None:
            shard = cls(None, {})
        else:
            index_path, ord_path = directory / entry["file"], directory / entry["ordinals_file"]
            for p, size_key, digest_key in ((index_path, "file_bytes", "file_blake2b"),
                                            (ord_path, "ordinals_bytes", "ordinals_blake2b")):
                if not p.is_file():
                    raise FileNotFoundError(f"shard {shard_no}: {p} named by the manifest is missing")
                if p.stat().st_size != entry[size_key]:
                    raise ManifestError(f"shard {shard_no}: {p} has {p.stat().st_size} bytes, the manifest says "
                                        f"{entry[size_key]}: the directory was modified outside ShardedPersonaIndex")
                if verify and file_blake2b(p) != entry[digest_key]:
                    raise ManifestError(f"shard {shard_no}: {p} does not match the manifest's checksum")
            index = PersonaIndex.load(index_path, mmap=mmap, verify=verify)
            ordinals = np.load(ord_path, allow_pickle=False)
            if ordinals.dtype != np.int64 or ordinals.ndim != 1 or len(ordinals) != index.n_items:
                raise ManifestError(f"shard {shard_no}: {ord_path} must hold {index.n_items} int64 ordinals, "
                                    f"got {ordinals.dtype} {ordinals.shape}")
            if index.n_items != entry["n_items"]:
                raise ManifestError(f"shard {shard_no}: {index_path} holds {index.n_items} items, "
                                    f"the manifest says {entry['n_items']}")
            shard = cls(index, None, ordinals)
        shard.source = (directory, entry)
        return shard

    # ordinals ------------------------------------------------------------
    def ordinal_map(self) -> dict:
        m = self._ordinals
        if m is None:
            with self._lock:
                if self._ordinals is None:
                    ids = self.index.item_ids if self.index is not None else []
                    arr = self._ordinal_array if self._ordinal_array is not None else np.zeros(0, np.int64)
                    self._ordinals = dict(zip(ids, arr.tolist()))
                    self._ordinal_array = None
                m = self._ordinals
        return m

    def ordinals_in_order(self) -> np.ndarray:
        """Ordinals aligned with ``index.item_ids`` (what is saved)."""
        if self.index is None:
            return np.zeros(0, dtype=np.int64)
        m = self.ordinal_map()
        return np.asarray([m[x] for x in self.index.item_ids], dtype=np.int64)

    # queries -------------------------------------------------------------
    def topk(self, q2: np.ndarray, k: int, exclude: list | None, allow: list | None, *,
             return_personas: bool, n_threads: int = 1, approx: dict | None = None):
        """Top-k of this shard for a batch: ``(ids, scores, ordinals, personas)`` arrays of shape
        (n_users, k); pads have score -inf and ordinal int64-max. ``exclude``/``allow`` are one
        list per user of ids that belong to this shard (unknown ones are ignored). ``approx``
        (``ef``, ``overfetch``) uses the shard's hnswlib graph instead of the exact scan."""
        n_users = len(q2)
        if self.index is None:
            empty = np.empty((n_users, k), dtype=object)
            return (empty, np.full((n_users, k), -np.inf, dtype=np.float32),
                    np.full((n_users, k), _NO_ORDINAL, dtype=np.int64), empty.copy() if return_personas else None)
        if approx is not None:
            res = self.index.search_approx(q2, k, exclude=exclude, return_personas=return_personas, **approx)
        else:
            res = self.index.search(q2, k, exclude=exclude, allow=allow, return_personas=return_personas,
                                    unknown="skip", n_threads=n_threads)
        ids, scores = res[0], res[1]
        ordinals = np.full(scores.shape, _NO_ORDINAL, dtype=np.int64)
        valid = scores > -np.inf
        if valid.any():
            m = self.ordinal_map()
            ordinals[valid] = [m[x] for x in ids[valid].tolist()]
        return ids, scores, ordinals, (res[2] if return_personas else None)

    def persona_scores(self, q: np.ndarray, candidate_ids: list, unknown: str = "skip"
                       ) -> tuple[np.ndarray, np.ndarray, list]:
        """Positions (in ``candidate_ids``) of the candidates this shard can score, ascending, with
        their persona score and matched persona id. Ids it cannot score (unknown, removed, or
        without personas) raise like :meth:`PersonaIndex.rerank` or are left out (``unknown='skip'``)."""
        if not candidate_ids:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32), []
        if self.index is None:
            if unknown == "error":
                raise UnknownItemError(f"{len(candidate_ids)} candidate ids not in the index (or removed), "
                                       f"e.g. {candidate_ids[:5]!r}: pass unknown='skip' to drop them")
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32), []
        res = self.index.rerank(q, candidate_ids, unknown=unknown)
        # rerank sorts stably by score; put the results back in input order. Duplicated ids
        # score the same, so the k-th copy in the output is the k-th copy in the input.
        slots: dict[Any, list[int]] = {}
        for pos, x in enumerate(candidate_ids):
            slots.setdefault(x, []).append(pos)
        taken: dict[Any, int] = {}
        positions = np.empty(len(res.ids), dtype=np.int64)
        for j, x in enumerate(res.ids):
            t = taken.get(x, 0)
            positions[j] = slots[x][t]
            taken[x] = t + 1
        order = np.argsort(positions, kind="stable")
        persona_ids = res.persona_ids
        return positions[order], np.asarray(res.persona_scores)[order], [persona_ids[j] for j in order]


def merge_topk(parts: Sequence[tuple], k: int):
    """Exact merge of per-shard top-k lists: by score descending, then global ordinal ascending
    (the single index's insertion order). ``parts`` are ``(ids, scores, ordinals, personas)`` of
    shape (n_users, k_i) each; returns the same four arrays of shape (n_users, k)."""
    ids = np.concatenate([p[0] for p in parts], axis=1)
    scores = np.concatenate([p[1] for p in parts], axis=1)
    ordinals = np.concatenate([p[2] for p in parts], axis=1)
    with_personas = parts[0][3] is not None
    order = np.lexsort((ordinals, -scores), axis=-1)[:, :k]

    def pick(a: np.ndarray) -> np.ndarray:
        return np.take_along_axis(a, order, axis=1)

    personas = pick(np.concatenate([p[3] for p in parts], axis=1)) if with_personas else None
    return pick(ids), pick(scores), pick(ordinals), personas


# --------------------------------------------------------------------------- fan-out helpers
# Shared by ShardedPersonaIndex (shards in threads) and the Ray Serve router (shards in replicas).
def check_user_vectors(user_vecs, dim: int) -> tuple[np.ndarray, bool]:
    """User vectors as a contiguous float32 array, and whether it is one user (1-D)."""
    q = np.asarray(user_vecs)
    if q.dtype != np.float32:
        if not np.issubdtype(q.dtype, np.floating):
            raise ValueError(f"user vectors must be float32, got {q.dtype}")
        q = q.astype(np.float32)
    if q.ndim not in (1, 2):
        raise ValueError(f"user vectors must be 1-D (one user) or 2-D (batch), got shape {q.shape}")
    if q.shape[-1] != dim:
        raise EncoderMismatchError(
            f"user vector dimension {q.shape[-1]} does not match the index dimension {dim}: "
            "encode users with the encoder that embedded the personas")
    return np.ascontiguousarray(q), q.ndim == 1


def route_lists(lists, n_shards: int, n_queries: int, single: bool, what: str) -> list[list[list]] | None:
    """One id list per user -> per shard, one list per user of the ids that shard owns."""
    if lists is None:
        return None
    if single:
        lists = [lists]
    if len(lists) != n_queries:
        raise ValueError(f"{what} must have one list per user ({n_queries}), got {len(lists)}")
    out: list[list[list]] = [[[] for _ in range(n_queries)] for _ in range(n_shards)]
    for u, lst in enumerate(lists):
        for x in lst:
            try:
                s = shard_of(x, n_shards)
            except TypeError:
                continue  # an id of another type can never be in the index
            out[s][u].append(x)
    return out


def route_candidates(candidates: list, n_shards: int) -> list[list[int]]:
    """Per shard, the positions in ``candidates`` of the ids it owns (ids of another type go nowhere)."""
    routed: list[list[int]] = [[] for _ in range(n_shards)]
    for pos, x in enumerate(candidates):
        try:
            routed[shard_of(x, n_shards)].append(pos)
        except TypeError:
            pass  # neither str nor int: unknown, like in PersonaIndex
    return routed


def format_topk(parts, n_users: int, k: int, single: bool, return_personas: bool, id_kind: str):
    """Merge per-shard top-k parts and shape the result exactly as :meth:`PersonaIndex.search` does."""
    if parts:
        ids, scores, _, personas = merge_topk(parts, k)
    else:
        ids = np.empty((n_users, k), dtype=object)
        scores = np.full((n_users, k), -np.inf, dtype=np.float32)
        personas = np.empty((n_users, k), dtype=object) if return_personas else None
    valid = scores > -np.inf
    if id_kind == "int":
        out = np.full(ids.shape, -1, dtype=np.int64)
        if valid.any():
            out[valid] = np.asarray(ids[valid].tolist(), dtype=np.int64)
        ids = out
    else:
        ids = ids.astype(object)
        ids[~valid] = None
    if personas is not None:
        personas = personas.astype(object)
        personas[~valid] = None
    scores = scores.astype(np.float32, copy=False)
    if single:
        n = int(valid[0].sum())
        ids, scores = ids[0, :n], scores[0, :n]
        if personas is not None:
            personas = personas[0, :n]
    return (ids, scores, personas) if return_personas else (ids, scores)


def fuse_rerank(cand: list, routed: list[list[int]], results: Mapping[int, tuple], base_scores, alpha: float,
                unknown: str) -> "ShardedRerankResult":
    """Combine per-shard persona scores (``IndexShard.persona_scores`` of ``routed[s]``) into
    :meth:`PersonaIndex.rerank`'s result: fused score, sorted best first, ties in input order."""
    persona_scores = np.zeros(len(cand), dtype=np.float32)
    persona_ids: list[Any] = [None] * len(cand)
    known = np.zeros(len(cand), dtype=bool)
    for s, (local, scores, pids) in results.items():
        where = np.asarray(routed[s], dtype=np.int64)[local]
        persona_scores[where], known[where] = scores, True
        for p, pid in zip(where.tolist(), pids):
            persona_ids[p] = pid
    pos = np.flatnonzero(known)
    if len(pos) < len(cand) and unknown == "error":
        missing = np.flatnonzero(~known)
        bad = [cand[i] for i in missing[:5]]
        raise UnknownItemError(f"{len(missing)} candidate ids not in the index (or removed), e.g. {bad!r}: "
                               "pass unknown='skip' to drop them")
    ps = persona_scores[pos]
    fused = fuse_with_base_scores(ps, base_scores, alpha, len(cand), pos)
    order = np.argsort(-fused, kind="stable")
    return ShardedRerankResult([cand[int(p)] for p in pos[order]], fused[order], ps[order],
                               [persona_ids[int(p)] for p in pos[order]])


@dataclass
class ShardedRerankResult:
    """What :meth:`PersonaIndex.rerank` returns, for a sharded index: candidates best first.

    ``persona_ids`` is the matched persona of each item (its explanation).
    """

    ids: list
    scores: np.ndarray
    persona_scores: np.ndarray
    persona_ids: list

    def __len__(self) -> int:
        return len(self.ids)


class _ReadWriteLock:
    """Many queries at once, or one mutation: a query never sees some shards before a mutation
    and others after it. Writers are preferred so a stream of queries cannot starve them."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0

    @contextmanager
    def read(self):
        with self._cond:
            while self._writing or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self):
        with self._cond:
            self._writers_waiting += 1
            while self._writing or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()


# --------------------------------------------------------------------------- validation
def _check_ids(item_ids) -> tuple[str, list]:
    ids = list(item_ids)
    if all(isinstance(x, str) for x in ids):
        return "str", ids
    if all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in ids):
        return "int", [int(x) for x in ids]
    raise TypeError("item ids must be all str or all int")


def _check_vectors(vectors, normalize: bool) -> np.ndarray:
    v = np.asarray(vectors)
    if v.ndim != 2:
        raise ValueError(f"vectors must be 2-D (n_personas, d), got shape {v.shape}")
    if v.dtype != np.float32:
        raise ValueError(f"vectors must be float32, got {v.dtype}: pass np.asarray(vectors, dtype=np.float32)")
    if not np.all(np.isfinite(v)):
        bad = int(np.flatnonzero(~np.isfinite(v).all(axis=1))[0])
        raise ValueError(f"vectors row {bad} contains NaN or infinity")
    if normalize:
        norms = np.linalg.norm(v, axis=1, keepdims=True)
        if np.any(norms == 0):
            raise ValueError(f"cannot L2-normalise a zero vector (row {int(np.flatnonzero(norms[:, 0] == 0)[0])})")
        v = v / norms
    return np.ascontiguousarray(v, dtype=np.float32)


def _check_offsets(offsets, n_items: int, n_vectors: int) -> np.ndarray:
    off = np.asarray(offsets)
    if off.ndim != 1 or (len(off) and not np.issubdtype(off.dtype, np.integer)):
        raise ValueError("offsets must be a 1-D integer array (CSR: item i owns rows offsets[i]:offsets[i+1])")
    if len(off) != n_items + 1:
        raise ValueError(f"offsets must have len(item_ids) + 1 = {n_items + 1} entries, got {len(off)}")
    off = off.astype(np.int64)
    if off[0] != 0 or off[-1] != n_vectors or np.any(np.diff(off) < 0):
        raise ValueError(f"offsets must start at 0, never decrease, and end at the number of vectors ({n_vectors})")
    return off


def _split(ids: list, vectors: np.ndarray, offsets: np.ndarray, personas: list | None, n_shards: int):
    """Per shard: (ids, vectors, offsets, personas, positions in the input), input order kept."""
    owner = np.fromiter((shard_of(x, n_shards) for x in ids), dtype=np.int64, count=len(ids))
    sizes = np.diff(offsets)
    out = []
    for s in range(n_shards):
        pos = np.flatnonzero(owner == s)
        rows = (np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in pos]) if len(pos)
                else np.zeros(0, dtype=np.int64))
        off = np.zeros(len(pos) + 1, dtype=np.int64)
        np.cumsum(sizes[pos], out=off[1:])
        recs = None if personas is None else [personas[int(r)] for r in rows]
        out.append(([ids[int(i)] for i in pos], vectors[rows], off, recs, pos))
    return out


def _identity(encoder) -> dict | None:
    if encoder is None:
        return None
    if isinstance(encoder, Mapping):
        return dict(encoder)
    identity = getattr(encoder, "identity", None)
    if isinstance(identity, Mapping):
        return dict(identity)
    raise TypeError("encoder must be an identity dict or an object with an `identity` dict")


# --------------------------------------------------------------------------- the index
class ShardedPersonaIndex:
    """A PersonaIndex split over ``n_shards`` files by a hash of the item id; same queries,
    identical results (ids, scores, persona ids, tie order). See the module docstring."""

    def __init__(self, shards: list[IndexShard], *, id_kind: str, dim: int, encoder: dict | None,
                 next_ordinal: int, n_threads: int | None = None, ann: dict | None = None):
        self._shards = shards
        self._ann = ann  # build_ann parameters once every shard has a graph; None: exact search only
        self._id_kind = id_kind
        self._dim = int(dim)
        self._encoder = encoder
        self._next_ordinal = int(next_ordinal)
        self._rw = _ReadWriteLock()
        self._mutation = threading.Lock()
        self._n_threads = n_threads
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._directory: Path | None = None

    # ------------------------------------------------------------------ build/load
    @classmethod
    def build(cls, item_ids: Sequence[Hashable], vectors: np.ndarray, offsets, personas=None, *,
              n_shards: int, path: str | Path | None = None, normalize: bool = False, encoder=None,
              n_threads: int | None = None) -> "ShardedPersonaIndex":
        """Split the catalog into ``n_shards`` PersonaIndex shards (and save it to ``path`` when given).

        Arguments as :meth:`PersonaIndex.build`. ``n_threads`` bounds the threads that scan
        shards in parallel (default: one per shard, at most the CPU count).
        """
        if not isinstance(n_shards, (int, np.integer)) or n_shards < 1:
            raise ValueError(f"n_shards must be a positive integer, got {n_shards!r}")
        kind, ids = _check_ids(item_ids)
        if len(set(ids)) != len(ids):
            raise ValueError("item ids must be unique")
        v = _check_vectors(vectors, normalize)
        off = _check_offsets(offsets, len(ids), v.shape[0])
        recs = None if personas is None else list(personas)
        if recs is not None and len(recs) != v.shape[0]:
            raise ValueError(f"personas must have one entry per vector ({v.shape[0]}), got {len(recs)}")
        identity = _identity(encoder)
        shards = []
        for s_ids, s_vecs, s_off, s_recs, pos in _split(ids, v, off, recs, int(n_shards)):
            if not s_ids:
                shards.append(IndexShard(None, {}))
                continue
            index = PersonaIndex.build(s_ids, s_vecs, s_off, s_recs, encoder=identity)
            shards.append(IndexShard(index, dict(zip(s_ids, pos.tolist()))))
        out = cls(shards, id_kind=kind if ids else "str", dim=v.shape[1], encoder=identity,
                  next_ordinal=len(ids), n_threads=n_threads)
        if path is not None:
            out.save(path)
        return out

    @classmethod
    def load(cls, path: str | Path, mmap: bool = True, *, verify: bool = True,
             n_threads: int | None = None) -> "ShardedPersonaIndex":
        """Open a sharded index directory. ``mmap=True`` maps every shard read-only.

        ``verify=True`` checks each shard file against the manifest's BLAKE2b digest and
        runs PersonaIndex's own checksums; ``verify=False`` checks sizes and headers only.
        Raises :class:`ManifestError` for a missing, corrupted or newer-format manifest.
        """
        path = Path(path)
        for attempt in range(3):
            meta = read_manifest(path)
            try:
                shards = [IndexShard.open(path, s, mmap=mmap, verify=verify, manifest=meta)
                          for s in range(meta["n_shards"])]
                break
            except FileNotFoundError:
                # A concurrent save replaced the manifest and removed the old generation's
                # files between our reads: read the new manifest.
                if attempt == 2 or read_manifest(path).get("generation") == meta.get("generation"):
                    raise
        out = cls(shards, id_kind=meta["id_kind"], dim=meta["dim"], encoder=meta.get("encoder"),
                  next_ordinal=meta["next_ordinal"], n_threads=n_threads, ann=meta.get("ann"))
        out._directory = path
        return out

    # ------------------------------------------------------------------ properties
    @property
    def n_shards(self) -> int:
        return len(self._shards)

    @property
    def shards(self) -> list[IndexShard]:
        return list(self._shards)

    @property
    def n_items(self) -> int:
        """Live items (removed ones excluded)."""
        return sum(s.index.n_items for s in self._shards if s.index is not None)

    @property
    def n_personas(self) -> int:
        return sum(s.index.n_personas for s in self._shards if s.index is not None)

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def id_kind(self) -> str:
        return self._id_kind

    @property
    def encoder_identity(self) -> dict | None:
        return None if self._encoder is None else dict(self._encoder)

    @property
    def item_ids(self) -> list:
        """Live item ids in insertion order (the order of one PersonaIndex built from the same data)."""
        with self._rw.read():
            pairs = [(o, x) for s in self._shards if s.index is not None for x, o in s.ordinal_map().items()]
        return [x for _, x in sorted(pairs)]

    def shard_sizes(self) -> list[int]:
        return [0 if s.index is None else s.index.n_items for s in self._shards]

    def __len__(self) -> int:
        return self.n_items

    def __contains__(self, item_id) -> bool:
        try:
            shard = self._shards[shard_of(item_id, self.n_shards)]
        except TypeError:
            return False
        return shard.index is not None and item_id in shard.index

    def __repr__(self) -> str:
        return (f"ShardedPersonaIndex(n_shards={self.n_shards}, n_items={self.n_items}, "
                f"n_personas={self.n_personas}, dim={self.dim})")

    def close(self) -> None:
        """Stop the scan threads (the index stays usable; a later query starts them again)."""
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None

    def __enter__(self) -> "ShardedPersonaIndex":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ checks
    def check_encoder(self, encoder) -> None:
        """Raise :class:`EncoderMismatchError` if ``encoder`` is not the one the index was built with."""
        mine, theirs = self._encoder, _identity(encoder)
        if mine is None or theirs is None:
            return
        for key in ("model", "dim", "pooling", "fingerprint"):
            if key in mine and key in theirs and mine[key] != theirs[key]:
                raise EncoderMismatchError(
                    f"user encoder {key}={theirs[key]!r} does not match the index's {key}={mine[key]!r}: "
                    "encode users with the encoder that embedded the personas, or rebuild the index")

    def _query(self, user_vecs, encoder) -> tuple[np.ndarray, bool]:
        if encoder is not None:
            self.check_encoder(encoder)
        return check_user_vectors(user_vecs, self._dim)

    def _map(self, fn, shards: Sequence[int]) -> list:
        """``fn(shard_no)`` for every shard, in parallel threads; the first error is raised."""
        if len(shards) <= 1:
            return [fn(s) for s in shards]
        with self._pool_lock:
            if self._pool is None:
                workers = self._n_threads or min(self.n_shards, os.cpu_count() or 1)
                self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="p4r-shard")
            pool = self._pool
        return [f.result() for f in [pool.submit(fn, s) for s in shards]]

    # ------------------------------------------------------------------ search
    def search(self, user_vecs: np.ndarray, k: int = 10, exclude: Sequence | None = None,
               allow: Sequence | None = None, *, return_personas: bool = False, n_threads: int = 1,
               unknown: str = "error", encoder=None):
        """Exact top-k over every shard; same arguments, shapes and results as :meth:`PersonaIndex.search`.

        Each shard is scanned in its own thread with exclusions applied inside the shard; the
        per-shard top-k lists are merged by (score descending, insertion order ascending).
        ``n_threads`` > 1 also splits a batch inside each shard.
        """
        if exclude is not None and allow is not None:
            raise ValueError("pass either exclude or allow, not both")
        if int(k) != k or k < 0:
            raise ValueError(f"k must be a non-negative integer, got {k}")
        if unknown not in ("error", "skip"):
            raise ValueError("unknown must be 'error' or 'skip'")
        k = int(k)
        q, single = self._query(user_vecs, encoder)
        q2 = q[None, :] if single else q
        with self._rw.read():
            deny = route_lists(exclude, self.n_shards, len(q2), single, "exclude")
            allowed = route_lists(allow, self.n_shards, len(q2), single, "allow")
            if allow is not None and unknown == "error":
                bad = [x for lst in ([allow] if single else allow) for x in lst if x not in self]
                if bad:
                    raise UnknownItemError(f"{len(bad)} allow ids not in the index (or removed), e.g. {bad[:5]!r}: "
                                           "pass unknown='skip' to drop them")
            live = [s for s, sh in enumerate(self._shards) if sh.index is not None]

            def one(s: int):
                return self._shards[s].topk(q2, k, None if deny is None else deny[s],
                                            None if allowed is None else allowed[s],
                                            return_personas=return_personas, n_threads=n_threads)

            parts = self._map(one, live)
        return format_topk(parts, len(q2), k, single, return_personas, self._id_kind)

    # ------------------------------------------------------------------ approximate search
    def build_ann(self, M: int = 16, ef_construction: int = 100, ef: int = 128, *, seed: int = 0,
                  n_threads: int = 1) -> None:
        """An hnswlib graph per shard (built in parallel threads), for :meth:`search_approx`."""
        params: dict[str, Any] = {"M": M, "ef_construction": ef_construction, "ef": ef, "seed": seed,
                                  "n_threads": n_threads}
        with self._mutation:
            live = [s for s, sh in enumerate(self._shards) if sh.index is not None]

            def one(s: int) -> None:
                index = self._shards[s].index
                assert index is not None
                index.build_ann(**params)
                self._shards[s].source = None

            self._map(one, live)
            self._ann = params

    def search_approx(self, user_vecs: np.ndarray, k: int = 10, exclude: Sequence | None = None, *,
                      ef: int | None = None, overfetch: int = 4, return_personas: bool = False, encoder=None):
        """Approximate top-k: :meth:`PersonaIndex.search_approx` on every shard, merged like
        :meth:`search` (exact int8 scores of the candidates the graphs found). Not identical to one
        PersonaIndex's approximate search (the graphs differ); measure with :meth:`recall_at_k`."""
        if self._ann is None:
            raise RuntimeError("no approximate-search graphs: call build_ann() first")
        if int(k) != k or k < 0:
            raise ValueError(f"k must be a non-negative integer, got {k}")
        k = int(k)
        q, single = self._query(user_vecs, encoder)
        q2 = q[None, :] if single else q
        approx = {"ef": ef, "overfetch": overfetch}
        with self._rw.read():
            deny = route_lists(exclude, self.n_shards, len(q2), single, "exclude")
            live = [s for s, sh in enumerate(self._shards) if sh.index is not None]

            def one(s: int):
                return self._shards[s].topk(q2, k, None if deny is None else deny[s], None,
                                            return_personas=return_personas, approx=approx)

            parts = self._map(one, live)
        return format_topk(parts, len(q2), k, single, return_personas, self._id_kind)

    def recall_at_k(self, user_vecs: np.ndarray, k: int = 10, *, ef: int | None = None, overfetch: int = 4) -> float:
        """Mean recall@k of :meth:`search_approx` against exact :meth:`search` on these users."""
        q = np.atleast_2d(np.asarray(user_vecs, dtype=np.float32))
        exact, _ = self.search(q, k)
        approx, _ = self.search_approx(q, k, ef=ef, overfetch=overfetch)
        hits = []
        for e, a in zip(exact, approx):
            truth = {x for x in e.tolist() if x is not None and x != -1}
            if truth:
                hits.append(len(truth & set(a.tolist())) / len(truth))
        return float(np.mean(hits)) if hits else 1.0

    # ------------------------------------------------------------------ rerank
    def rerank(self, user_vec: np.ndarray, candidate_ids: Sequence[Hashable], base_scores=None,
               alpha: float = 1.0, *, unknown: str = "error", encoder=None) -> ShardedRerankResult:
        """Score candidates by their best persona and sort them, best first; as :meth:`PersonaIndex.rerank`
        (fused score, min-max normalised base scores, ties in input order, unknown ids)."""
        if unknown not in ("error", "skip"):
            raise ValueError("unknown must be 'error' or 'skip'")
        q, single = self._query(user_vec, encoder)
        if not single:
            raise ValueError("rerank takes one user vector (1-D); loop or use search() for batches")
        cand = list(candidate_ids)
        routed = route_candidates(cand, self.n_shards)
        with self._rw.read():
            def one(s: int):
                return self._shards[s].persona_scores(q, [cand[p] for p in routed[s]], unknown)

            busy = [s for s in range(self.n_shards) if routed[s]]
            results = dict(zip(busy, self._map(one, busy)))
        return fuse_rerank(cand, routed, results, base_scores, alpha, unknown)

    # ------------------------------------------------------------------ explain
    def explain(self, user_vec: np.ndarray, item_id: Hashable, *, encoder=None) -> list[PersonaMatch]:
        """Every persona of one item with its score, best first (``row`` is the row inside its shard)."""
        q, single = self._query(user_vec, encoder)
        if not single:
            raise ValueError("explain takes one user vector (1-D)")
        try:
            shard = self._shards[shard_of(item_id, self.n_shards)]
        except TypeError:
            shard = IndexShard(None, {})
        with self._rw.read():
            if shard.index is None or item_id not in shard.index:
                raise UnknownItemError(f"item {item_id!r} is not in the index (or was removed)")
            return shard.index.explain(q, item_id)

    # ------------------------------------------------------------------ mutation
    def add_items(self, item_ids: Sequence[Hashable], vectors: np.ndarray, offsets, personas=None, *,
                  normalize: bool = False) -> None:
        """Append items (ids must be new; a removed id may be added again); they get the next
        insertion ordinals, so ties order exactly as in one PersonaIndex. Queries wait for the
        whole change (every shard) or see none of it."""
        with self._mutation:
            kind, ids = _check_ids(item_ids)
            if not ids:
                return
            if any(s.index is not None for s in self._shards) and kind != self._id_kind:
                raise TypeError(f"this index has {self._id_kind} item ids; got {kind} ids")
            if len(set(ids)) != len(ids):
                raise ValueError("item ids must be unique")
            clash = [x for x in ids if x in self]
            if clash:
                raise ValueError(f"items already in the index: {clash[:5]!r}; remove them first to replace them")
            v = _check_vectors(vectors, normalize)
            if v.shape[1] != self._dim:
                raise ValueError(f"vectors have dimension {v.shape[1]}, the index has {self._dim}")
            off = _check_offsets(offsets, len(ids), v.shape[0])
            recs = None if personas is None else list(personas)
            if recs is not None and len(recs) != v.shape[0]:
                raise ValueError(f"personas must have one entry per vector ({v.shape[0]}), got {len(recs)}")
            base = self._next_ordinal
            parts = _split(ids, v, off, recs, self.n_shards)
            with self._rw.write():
                for shard, (s_ids, s_vecs, s_off, s_recs, pos) in zip(self._shards, parts):
                    if not s_ids:
                        continue
                    if shard.index is None:
                        shard.index = PersonaIndex.build(s_ids, s_vecs, s_off, s_recs, encoder=self._encoder)
                        shard._ordinals = {}
                        if self._ann is not None:  # every shard answers search_approx
                            shard.index.build_ann(**self._ann)
                    else:
                        shard.index.add_items(s_ids, s_vecs, s_off, s_recs)
                    shard.ordinal_map().update(zip(s_ids, (base + pos).tolist()))
                    shard.source = None
                self._id_kind = kind
                self._next_ordinal = base + len(ids)

    def remove_items(self, item_ids: Sequence[Hashable], *, missing: str = "error") -> int:
        """Tombstone items (never returned again); returns how many were removed. ``missing='ignore'``
        skips unknown ids, the default raises :class:`UnknownItemError` before removing anything."""
        if missing not in ("error", "ignore"):
            raise ValueError("missing must be 'error' or 'ignore'")
        with self._mutation:
            ids = list(item_ids)
            absent = [x for x in ids if x not in self]
            if absent and missing == "error":
                raise UnknownItemError(f"{len(absent)} ids to remove not in the index (or removed), "
                                       f"e.g. {absent[:5]!r}: pass missing='ignore' to skip them")
            per_shard: list[list] = [[] for _ in range(self.n_shards)]
            for x in ids:
                if x in self:
                    per_shard[shard_of(x, self.n_shards)].append(x)
            removed = 0
            with self._rw.write():
                for shard, lst in zip(self._shards, per_shard):
                    if lst and shard.index is not None:
                        removed += shard.index.remove_items(lst)
                        m = shard.ordinal_map()
                        for x in lst:
                            m.pop(x, None)
                        shard.source = None
            return removed

    def compact(self) -> None:
        """Drop removed items for good in every shard (order and results unchanged)."""
        with self._mutation, self._rw.write():
            for shard in self._shards:
                if shard.index is not None:
                    before = shard.index.n_personas
                    shard.index.compact()
                    if shard.index.n_personas != before:
                        shard.source = None

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> None:
        """Write the index to directory ``path``: new shard files first (each fsynced), then the
        manifest atomically, then the old generation's files are removed. A kill at any point
        leaves the old or the new version loadable. Shards unchanged since they were loaded from
        this directory are not rewritten."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        with self._mutation, self._rw.read(), _dir_lock(path):
            try:
                old = read_manifest(path)
            except ManifestError:
                if (path / MANIFEST).exists():
                    raise
                old = None
            generation = (old.get("generation", 0) + 1) if old else 1
            entries = []
            for s, shard in enumerate(self._shards):
                src = shard.source
                if src is not None and old is not None and src[0].resolve() == path.resolve() \
                        and src[1] in old["shards"] and src[1].get("file") is not None \
                        and (path / src[1]["file"]).is_file():
                    entries.append(dict(src[1]))  # unchanged since loaded from here: reuse the files
                    continue
                entries.append(self._write_shard(path, s, shard, generation))
            meta = {
                "format": MANIFEST_FORMAT,
                "format_version": MANIFEST_VERSION,
                "generation": generation,
                "n_shards": self.n_shards,
                "partition": {"rule": PARTITION_RULE, "definition": PARTITION_DOC},
                "id_kind": self._id_kind,
                "dim": self._dim,
                "encoder": self._encoder,
                "encoder_fingerprint": (self._encoder or {}).get("fingerprint"),
                "next_ordinal": self._next_ordinal,
                "ann": self._ann,
                "n_items": self.n_items,
                "n_personas": self.n_personas,
                "shards": entries,
            }
            fsync_dir(path)  # the shard files' names are durable before the manifest names them
            manifest = json.dumps(meta, indent=1, sort_keys=True).encode("utf-8")
            atomic_write(path / MANIFEST, lambda f: f.write(manifest))
            for shard, entry in zip(self._shards, entries):
                shard.source = (path, entry)
            _remove_unreferenced(path, entries)
            self._directory = path

    @staticmethod
    def _write_shard(path: Path, s: int, shard: IndexShard, generation: int) -> dict:
        base = {"shard": s, "n_items": 0, "n_personas": 0, "file": None, "ordinals_file": None}
        if shard.index is None:
            return base
        name = f"shard-{s:04d}.g{generation}.p4r"
        ord_name = f"shard-{s:04d}.g{generation}.ord.npy"
        shard.index.save(path / name)  # temp file + fsync + rename inside PersonaIndex.save
        ordinals = shard.ordinals_in_order()
        atomic_write(path / ord_name, lambda f: np.save(f, ordinals, allow_pickle=False))
        return {**base, "n_items": shard.index.n_items, "n_personas": shard.index.n_personas,
                "file": name, "file_bytes": (path / name).stat().st_size,
                "file_blake2b": file_blake2b(path / name),
                "ordinals_file": ord_name, "ordinals_bytes": (path / ord_name).stat().st_size,
                "ordinals_blake2b": file_blake2b(path / ord_name)}


@contextmanager
def _dir_lock(path: Path):
    with open(path / ".lock", "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _remove_unreferenced(path: Path, entries: list[dict]) -> None:
    """Delete shard files (and their sidecars, and temp files of killed saves) that the current
    manifest does not name. Readers that mapped them keep their mapping (POSIX unlink)."""
    keep = [e[k] for e in entries for k in ("file", "ordinals_file") if e.get(k)]
    for p in path.iterdir():
        name = p.name
        is_ours = name.startswith("shard-") or name.startswith(".shard-") or name.startswith(f".{MANIFEST}.tmp")
        if is_ours and p.is_file() and not any(name == k or name.startswith(k + ".") for k in keep):
            try:
                p.unlink()
            except FileNotFoundError:
                pass

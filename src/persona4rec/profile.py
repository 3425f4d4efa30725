"""User profiles: the online user side of Persona4Rec.

A user's profile is the L2-normalised, recency-weighted mean of the embeddings of
their ``k`` most recent usable interactions::

    kept     = interactions with rating >= min_rating (unrated ones are kept), non-empty text
    last k   = the k newest of ``kept`` (by timestamp when given, else list order), oldest first
    w_i      = gamma ** (L - 1 - i) / sum_j gamma ** (L - 1 - j),   i = 0..L-1, L = len(last k)
    profile  = normalize(transform(sum_i w_i * embed(text_i)))

so the newest interaction weighs most (defaults: k=10, gamma=0.65, min_rating=3).
Each interaction is turned into text by a per-domain template (:data:`TEMPLATES`).

Interaction embeddings are kept in an :class:`InteractionEmbeddingCache` on disk,
keyed by a hash of the interaction text and bound to one encoder fingerprint, so a
returning user costs lookups and a weighted sum; only new interactions are encoded.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import json
import math
import os
import threading
import warnings
from operator import attrgetter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Union

import numpy as np

from persona4rec._core import checksum64_rows
from persona4rec._persist import atomic_write
from persona4rec.errors import CacheCorruptError, EmptyHistoryError, EncoderMismatchError
from persona4rec.paths import default_cache_dir

__all__ = [
    "Interaction",
    "InteractionTemplate",
    "AspectSummaryTemplate",
    "ReviewTextTemplate",
    "TEMPLATES",
    "get_template",
    "EmptyHistoryError",
    "CacheCorruptError",
    "InteractionEmbeddingCache",
    "UserProfiler",
    "ProfileBatch",
    "recency_weights",
    "text_key",
    "DEFAULT_K",
    "DEFAULT_GAMMA",
    "DEFAULT_MIN_RATING",
]

DEFAULT_K = 10
DEFAULT_GAMMA = 0.65
DEFAULT_MIN_RATING: float | None = 3.0


# --------------------------------------------------------------------------- interactions and templates


@dataclass(frozen=True, slots=True)
class Interaction:
    """One user-item interaction, already rendered to the text that gets embedded."""

    text: str
    rating: float | None = None
    timestamp: float | None = None
    item_id: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.text, str):
            raise TypeError(f"Interaction.text must be str, got {type(self.text).__name__}; decode bytes first")
        for name in ("rating", "timestamp"):
            value = getattr(self, name)
            if value is None or (type(value) is float and math.isfinite(value)):
                continue
            if (isinstance(value, bool) or not isinstance(value, (int, float, np.number))
                                      or not math.isfinite(value)):
                raise ValueError(f"Interaction.{name} must be a finite number or None, got {value!r}")


class InteractionTemplate(Protocol):
    """Turns one raw history record (a mapping) into an :class:`Interaction`."""

    def __call__(self, record: Mapping[str, Any]) -> Interaction: ...


# LLM aspect values that mean "nothing extracted".
_EMPTY_ASPECT_VALUES = frozenset({"", "none", "null", "n/a", "na", "not specified", "unknown", "not mentioned"})

AMAZON_ASPECTS = ("category_preference", "purchase_purpose", "quality_criteria", "usage_context")
YELP_ASPECTS = ("cuisine_category", "specific_dishes_or_attributes", "visit_purpose", "quality_criteria", "visit_context")


def _optional_number(record: Mapping[str, Any], field: str) -> float | None:
    value = record.get(field)
    if value is None:
        return None
    if type(value) is float and value == value:  # the common case; value == value rules out NaN
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"field {field!r} must be a number or missing, got {value!r}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"field {field!r} is NaN; drop the field (unknown) or give a number")
    return value


def _optional_timestamp(record: Mapping[str, Any], field: str) -> float | None:
    """A number (any epoch unit: only the order matters), or an ISO 8601 date string
    such as Yelp's ``2017-10-09 04:08:23`` (read as UTC when it has no zone)."""
    value = record.get(field)
    if isinstance(value, str):
        try:
            parsed = _dt.datetime.fromisoformat(value.strip())
        except ValueError:
            raise ValueError(
                f"field {field!r} = {value!r} is neither a number nor an ISO 8601 date (YYYY-MM-DD[ HH:MM:SS])"
            ) from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=_dt.timezone.utc)
        return parsed.timestamp()
    return _optional_number(record, field)


_LONGEST_EMPTY_VALUE = max(map(len, _EMPTY_ASPECT_VALUES))


def _clean(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ", ".join(part for part in (_clean(v) for v in value) if part)
    text = (value if isinstance(value, str) else str(value)).strip()
    # lower() copies the string: only short values can be one of the "nothing" markers
    if len(text) <= _LONGEST_EMPTY_VALUE and text.lower() in _EMPTY_ASPECT_VALUES:
        return ""
    return text


@functools.lru_cache(maxsize=256)
def _label(field: str) -> str:
    return field.replace("_", " ").capitalize()


@dataclass(frozen=True)
class AspectSummaryTemplate:
    """Persona4Rec history records (``3.5_history*.jsonl``): the user's extracted
    aspects as ``Label: value.`` sentences, then the item summary. ``*_reason`` fields
    are left out (they explain the extraction, not the user). Aspects come first so
    that truncation at the encoder's max length (256 tokens for all-MiniLM-L6-v2)
    cuts the generic item summary, never the user's own signal: Yelp summaries run
    to 200+ words.

    Rendered text::

        Category preference: Historical fiction. Quality criteria: Engagement.
        {summary}

    A record with neither summary nor aspects falls back to ``review_title`` and
    ``review_text``. ``aspect_fields=None`` uses every non-reason field, sorted.
    """

    aspect_fields: tuple[str, ...] | None = None
    summary_field: str = "summary"
    aspects_field: str = "extracted"
    title_field: str = "review_title"
    text_field: str = "review_text"
    rating_field: str = "rating"
    timestamp_field: str = "timestamp"
    item_field: str = "item_id"

    def render(self, record: Mapping[str, Any]) -> str:
        parts = []
        aspects = record.get(self.aspects_field)
        if isinstance(aspects, Mapping):
            fields = self.aspect_fields or tuple(sorted(k for k in aspects if not k.endswith("_reason")))
            sentences = [f"{_label(f)}: {v.rstrip('.')}." for f in fields if (v := _clean(aspects.get(f)))]
            if sentences:
                parts.append(" ".join(sentences))
        elif aspects is not None:
            raise ValueError(f"field {self.aspects_field!r} must be a mapping of aspects, got {type(aspects).__name__}")
        summary = _clean(record.get(self.summary_field))
        if summary:
            parts.append(summary)
        if not parts:
            parts = [p for p in (_clean(record.get(self.title_field)), _clean(record.get(self.text_field))) if p]
            return ". ".join(parts)
        return "\n".join(parts)

    def __call__(self, record: Mapping[str, Any]) -> Interaction:
        return _interaction(self, record)


def _interaction(template: Any, record: Mapping[str, Any]) -> Interaction:
    """One record through a template with ``render`` and rating/timestamp/item field names."""
    item = record.get(template.item_field)
    return Interaction(
        template.render(record),
        _optional_number(record, template.rating_field),
        _optional_timestamp(record, template.timestamp_field),
        None if item is None else str(item),
    )


@dataclass(frozen=True)
class ReviewTextTemplate:
    """Raw review rows without LLM fields (the Amazon 5-core ``reviews_*.json`` format):
    ``{item title}. {review title}. {review text}``, skipping empty parts. The item
    title is read from ``item_title`` when the caller joined it in (it is not in the raw rows)."""

    item_title_field: str = "item_title"
    title_field: str = "summary"
    text_field: str = "reviewText"
    rating_field: str = "overall"
    timestamp_field: str = "unixReviewTime"
    item_field: str = "asin"

    def render(self, record: Mapping[str, Any]) -> str:
        fields = (self.item_title_field, self.title_field, self.text_field)
        return ". ".join(p.rstrip(".") if i < 2 else p for i, p in enumerate(_clean(record.get(f)) for f in fields) if p)

    def __call__(self, record: Mapping[str, Any]) -> Interaction:
        return _interaction(self, record)


TEMPLATES: dict[str, InteractionTemplate] = {
    "amazon": AspectSummaryTemplate(AMAZON_ASPECTS),
    "yelp": AspectSummaryTemplate(YELP_ASPECTS),
    "persona4rec": AspectSummaryTemplate(),
    "amazon-5core": ReviewTextTemplate(),
}


def get_template(domain: str) -> InteractionTemplate:
    """The documented template of ``domain`` (one of :data:`TEMPLATES`)."""
    try:
        return TEMPLATES[domain]
    except KeyError:
        raise ValueError(f"no interaction template for domain {domain!r}; known: {', '.join(TEMPLATES)}") from None


# --------------------------------------------------------------------------- errors and weights


def recency_weights(n: int, gamma: float = DEFAULT_GAMMA) -> np.ndarray:
    """Weights for ``n`` interactions ordered oldest to newest: gamma^(n-1-i), summing to 1."""
    if n < 1:
        raise ValueError(f"need at least one interaction, got n={n}")
    weights = gamma ** np.arange(n - 1, -1, -1, dtype=np.float64)
    return np.asarray(weights / weights.sum(), dtype=np.float32)


# --------------------------------------------------------------------------- cache

_CACHE_VERSION = 2
_READABLE_VERSIONS = (1, 2)  # version 1 has no row checksums; a writer adds them on open
_KEY_BYTES = 16
_META_FILE = "meta.json"
_KEYS_FILE = "keys.bin"
_VECTORS_FILE = "vectors.f32"
_SUMS_FILE = "sums.u64"
_LOCK_FILE = "lock"
_TEXT_MEMO_LIMIT = 200_000  # texts remembered per process before the memo is dropped


def text_key(text: str) -> bytes:
    """Cache key of an interaction text: 128-bit BLAKE2b of its UTF-8 bytes."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=_KEY_BYTES).digest()


def _row_sums(keys: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """One checksum per row of its vector seeded by its key: a flipped bit, or a vector
    that moved to another key's row, no longer matches."""
    seeds = np.ascontiguousarray(keys[:, :8]).view("<u8").reshape(-1).astype(np.uint64)
    return checksum64_rows(np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(seeds))


class _DirectoryWriter:
    """The one writer of a cache directory in this process.

    The directory's exclusive lock (flock) keeps other processes out; every cache object
    of this process that writes the directory shares this writer, whose mutex makes each
    append of (vectors, sums, keys) one unit, so two profilers of one encoder in one
    process both work and never interleave rows.
    """

    _registry: dict[Path, "_DirectoryWriter"] = {}
    _registry_lock = threading.Lock()

    def __init__(self, directory: Path, key: Path, fd: int):
        self.directory = directory
        self.key = key  # the resolved directory: the registry's key
        self.fd = fd
        self.users = 0
        self.mutex = threading.Lock()

    @classmethod
    def acquire(cls, directory: Path) -> "_DirectoryWriter":
        key = directory.resolve()
        with cls._registry_lock:
            writer = cls._registry.get(key)
            if writer is None:
                fd = os.open(directory / _LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    import fcntl

                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except ImportError:  # not POSIX: no cross-process protection
                    pass
                except OSError:
                    os.close(fd)
                    raise RuntimeError(
                        f"interaction cache {directory} is open for writing in another process; "
                        "open it with read_only=True, or give this process its own cache directory."
                    ) from None
                writer = cls._registry[key] = cls(directory, key, fd)
            writer.users += 1
            return writer

    def release(self) -> None:
        with self._registry_lock:
            self.users -= 1
            if self.users == 0:
                self._registry.pop(self.key, None)
                os.close(self.fd)

    def append(self, keys: bytes, vectors: np.ndarray, sums: np.ndarray) -> None:
        # Vectors, then sums, then keys: a crash leaves rows without keys, which the
        # next open trims; the number of keys is the number of rows.
        with self.mutex:
            with open(self.directory / _VECTORS_FILE, "ab") as fh:
                fh.write(vectors.tobytes())
            with open(self.directory / _SUMS_FILE, "ab") as fh:
                fh.write(sums.astype("<u8").tobytes())
            with open(self.directory / _KEYS_FILE, "ab") as fh:
                fh.write(keys)


class InteractionEmbeddingCache:
    """Interaction-text embeddings of one encoder, persisted in a directory.

    Files: ``meta.json`` (version, encoder fingerprint, dim), ``keys.bin`` (16-byte
    text hashes), ``vectors.f32`` (float32 rows, memory-mapped) and ``sums.u64`` (one
    checksum per row, of its vector seeded by its key), appended together, keys last,
    so a crash can only leave a tail without a key, which the next open trims. Every row
    is verified on open: a row whose vector no longer matches its key (a flipped bit,
    rows moved) is left out with a warning, so its text is simply encoded again.

    One writing process per directory (an exclusive lock enforces it); within that
    process any number of cache objects (for example one profiler per thread) share
    the writer. Open with ``read_only=True`` to share a cache between processes: rows
    added then stay in memory. A closed cache stays readable and refuses writes.

    Args:
        directory: cache directory, or None for a memory-only cache.
        fingerprint: the encoder fingerprint the vectors belong to.
        dim: vector dimension.

    Raises:
        EncoderMismatchError: the directory holds another encoder's vectors.
        CacheCorruptError: the files are inconsistent (delete the directory; it is only a cache).
    """

    def __init__(self, directory: str | os.PathLike[str] | None, *, fingerprint: str, dim: int, read_only: bool = False):
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        self.directory = None if directory is None else Path(directory)
        self.fingerprint = str(fingerprint)
        self.dim = dim
        self.read_only = read_only or directory is None
        self._index: dict[bytes, int] = {}
        self._disk = np.empty((0, dim), dtype=np.float32)
        self._ram = np.empty((64, dim), dtype=np.float32)
        self._ram_rows = 0
        self._row_by_text: dict[str, int] = {}
        self._writer: _DirectoryWriter | None = None
        self._closed = False
        self._version = _CACHE_VERSION
        if self.directory is not None:
            self._open()

    # -- persistence

    def _open(self) -> None:
        assert self.directory is not None
        meta_path = self.directory / _META_FILE
        if not self.directory.exists():
            if self.read_only:
                raise FileNotFoundError(f"interaction cache {self.directory} does not exist (opened read-only)")
            self.directory.mkdir(parents=True)
        if not self.read_only:
            self._writer = _DirectoryWriter.acquire(self.directory)
        if meta_path.is_file():
            self._check_meta(meta_path)
        elif any((self.directory / f).exists() for f in (_KEYS_FILE, _VECTORS_FILE)):
            self.close()
            raise CacheCorruptError(
                f"interaction cache {self.directory} has data files but no {_META_FILE}; "
                "delete the directory (it is only a cache and will be rebuilt)."
            )
        elif not self.read_only:
            self._write_meta()
        self._load_rows()

    def _write_meta(self) -> None:
        assert self.directory is not None
        meta = {"version": _CACHE_VERSION, "fingerprint": self.fingerprint, "dim": self.dim,
                "key": f"blake2b-{_KEY_BYTES * 8} of UTF-8 text", "dtype": "float32",
                "row_checksum": "checksum64 of the vector, seeded by the key's first 8 bytes"}
        text = (json.dumps(meta, indent=2) + "\n").encode("utf-8")
        atomic_write(self.directory / _META_FILE, lambda f: f.write(text))
        self._version = _CACHE_VERSION

    def _check_meta(self, meta_path: Path) -> None:
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            version, fingerprint, dim = meta["version"], meta["fingerprint"], meta["dim"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
            self.close()
            raise CacheCorruptError(
                f"interaction cache metadata {meta_path} is damaged ({exc!r}); delete {self.directory} "
                "(it is only a cache and will be rebuilt)."
            ) from exc
        if version not in _READABLE_VERSIONS:
            self.close()
            raise CacheCorruptError(
                f"interaction cache {self.directory} has format version {version!r}, this persona4rec "
                f"reads {_READABLE_VERSIONS}; delete the directory to rebuild it."
            )
        if fingerprint != self.fingerprint or dim != self.dim:
            self.close()
            raise EncoderMismatchError(
                f"interaction cache {self.directory} holds vectors of encoder {fingerprint} (dim {dim}), "
                f"not of this encoder {self.fingerprint} (dim {self.dim}); use the cache directory of "
                "this encoder (the default path includes the fingerprint) or delete this one."
            )
        self._version = version

    def _load_rows(self) -> None:
        assert self.directory is not None
        keys_path, vectors_path = self.directory / _KEYS_FILE, self.directory / _VECTORS_FILE
        sums_path = self.directory / _SUMS_FILE
        key_bytes = keys_path.stat().st_size if keys_path.exists() else 0
        row_bytes = 4 * self.dim
        vector_bytes = vectors_path.stat().st_size if vectors_path.exists() else 0
        sum_bytes = sums_path.stat().st_size if sums_path.exists() else 0
        n_keys, n_vectors, n_sums = key_bytes // _KEY_BYTES, vector_bytes // row_bytes, sum_bytes // 8
        checked = self._version >= 2
        if n_keys > n_vectors or (checked and n_keys > n_sums):
            self.close()
            raise CacheCorruptError(
                f"interaction cache {self.directory} has {n_keys} keys but only {n_vectors} vectors and "
                f"{n_sums if checked else 'no'} checksums (keys are always written last, so this is not a crash); "
                "delete the directory."
            )
        tails = [(keys_path, key_bytes, n_keys * _KEY_BYTES), (vectors_path, vector_bytes, n_keys * row_bytes)]
        if checked:
            tails.append((sums_path, sum_bytes, n_keys * 8))
        if any(size != want for _, size, want in tails):
            # The tail of an interrupted append: rows without keys, or a partial row.
            if not self.read_only:
                warnings.warn(
                    f"interaction cache {self.directory}: dropping an incomplete tail left by an interrupted write",
                    RuntimeWarning,
                    stacklevel=4,
                )
                for path, size, want in tails:
                    if path.exists() and size != want:
                        os.truncate(path, want)
        if not n_keys:
            if not checked and not self.read_only:
                self._write_meta()
            return
        keys = np.fromfile(keys_path, dtype=np.uint8, count=n_keys * _KEY_BYTES).reshape(n_keys, _KEY_BYTES)
        # A plain ndarray over the mapping: indexing a np.memmap object costs microseconds more.
        self._disk = np.asarray(np.memmap(vectors_path, dtype=np.float32, mode="r", shape=(n_keys, self.dim)))
        good = np.ones(n_keys, dtype=bool)
        if checked:
            stored = np.fromfile(sums_path, dtype="<u8", count=n_keys)
            good = _row_sums(keys, self._disk) == stored
            if not good.all():
                bad = np.flatnonzero(~good)
                warnings.warn(
                    f"interaction cache {self.directory}: {len(bad)} rows fail their checksum (first: row "
                    f"{int(bad[0])}); they are left out and their texts will be encoded again",
                    RuntimeWarning,
                    stacklevel=4,
                )
        elif not self.read_only:
            # Version 1: no row checksums yet. Trust the rows once and record their sums,
            # so from now on every open verifies them.
            assert self._writer is not None
            with self._writer.mutex:
                sums_path.write_bytes(_row_sums(keys, self._disk).astype("<u8").tobytes())
            self._write_meta()
        rows = np.flatnonzero(good).tolist()
        self._index = {bytes(keys[i]): i for i in rows}

    def close(self) -> None:
        """Release this object's share of the writer (the object stays readable; writes are refused)."""
        self._closed = True
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.release()

    def __del__(self) -> None:  # the lock must not outlive the object
        try:
            self.close()
        except Exception:
            pass

    # -- access

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, text: object) -> bool:
        return isinstance(text, str) and text_key(text) in self._index

    def rows_of(self, keys: Sequence[bytes]) -> list[int]:
        """Row of each key, -1 for a miss."""
        index = self._index
        return [index.get(k, -1) for k in keys]

    def rows_of_texts(self, texts: Sequence[str]) -> list[int]:
        """Row of each text, -1 for a miss. Remembers text -> row for texts seen in this
        process, so a returning user skips hashing (Python caches a str's own hash)."""
        memo = self._row_by_text
        rows = [memo.get(t, -1) for t in texts]
        if -1 in rows:
            index = self._index
            if len(memo) > _TEXT_MEMO_LIMIT:
                memo.clear()
            for i, row in enumerate(rows):
                if row < 0:
                    row = rows[i] = index.get(text_key(texts[i]), -1)
                    if row >= 0:
                        memo[texts[i]] = row
        return rows

    def gather(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """Vectors at ``rows`` (all must be hits), shape (len(rows), dim)."""
        n_disk = self._disk.shape[0]
        if len(rows) == 0:
            return np.empty((0, self.dim), dtype=np.float32)
        if isinstance(rows, np.ndarray):
            low, high = int(rows.min()), int(rows.max())
        else:
            low, high = min(rows), max(rows)  # on a short list, cheaper than array reductions
        if high < n_disk:
            return self._disk.take(rows, axis=0)
        rows = np.asarray(rows, dtype=np.intp)
        if low >= n_disk:
            return self._ram.take(rows - n_disk, axis=0)
        out = np.empty((rows.size, self.dim), dtype=np.float32)
        on_disk = rows < n_disk
        out[on_disk] = self._disk[rows[on_disk]]
        out[~on_disk] = self._ram[rows[~on_disk] - n_disk]
        return out

    def put(self, keys: Sequence[bytes], vectors: np.ndarray) -> None:
        """Add vectors for keys (existing keys are left as they are)."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.shape != (len(keys), self.dim):
            raise ValueError(f"expected vectors of shape ({len(keys)}, {self.dim}), got {vectors.shape}")
        if not np.isfinite(vectors).all():
            raise ValueError("refusing to cache non-finite embeddings")
        if self._closed:
            raise RuntimeError(f"interaction cache {self.directory or '(memory)'} is closed: open a new "
                               "InteractionEmbeddingCache to add vectors")
        fresh = [i for i, k in enumerate(keys) if k not in self._index]
        fresh = list({keys[i]: i for i in fresh}.values())  # one row per distinct key
        if not fresh:
            return
        new_keys = [keys[i] for i in fresh]
        new_vectors = vectors[fresh]
        if self._writer is not None:
            key_block = b"".join(new_keys)
            key_array = np.frombuffer(key_block, dtype=np.uint8).reshape(len(new_keys), _KEY_BYTES)
            self._writer.append(key_block, new_vectors, _row_sums(key_array, new_vectors))
        needed = self._ram_rows + len(fresh)
        if needed > self._ram.shape[0]:
            grown = np.empty((max(needed, 2 * self._ram.shape[0]), self.dim), dtype=np.float32)
            grown[: self._ram_rows] = self._ram[: self._ram_rows]
            self._ram = grown
        self._ram[self._ram_rows : needed] = new_vectors
        base = self._disk.shape[0] + self._ram_rows
        for offset, key in enumerate(new_keys):
            self._index[key] = base + offset
        self._ram_rows = needed


# --------------------------------------------------------------------------- profiler


class _EncoderLike(Protocol):
    fingerprint: str
    dim: int

    def encode(self, texts: Sequence[str], batch_size: int = ...) -> np.ndarray: ...


HistoryEntry = Union[Interaction, Mapping[str, Any], str]


@dataclass(frozen=True)
class ProfileBatch:
    """Profiles of many users: ``vectors[j]`` belongs to input position ``positions[j]``;
    ``empty_positions`` lists the users without a usable interaction."""

    vectors: np.ndarray
    positions: np.ndarray
    empty_positions: np.ndarray


_timestamp_of = attrgetter("timestamp")


class UserProfiler:
    """Builds user profile vectors from interaction histories (see the module docstring).

    Args:
        encoder: an :class:`persona4rec.encoder.Encoder` (anything with ``encode``,
            ``fingerprint`` and ``dim``).
        cache: an :class:`InteractionEmbeddingCache`; a directory path; None for the
            per-user default ``<cache dir>/interactions/<fingerprint>``; False for memory only.
        k: interactions per profile (the newest). gamma: recency decay in (0, 1].
        min_rating: drop interactions rated below it (unrated ones are kept); None keeps all.
        template: domain name from :data:`TEMPLATES` or a callable record -> Interaction,
            used for mapping entries of a history.
        transform: optional map applied to the weighted mean before L2 normalisation
            (e.g. a trained alignment adapter): float32 (d,) or (n, d) -> the same shape.
        batch_size: encoder batch size for new interactions.

    A profiler is not safe to share between threads: give each thread its own (they may
    all use the same cache directory: one process shares one writer), or serialise calls.
    """

    def __init__(
        self,
        encoder: _EncoderLike,
        *,
        cache: InteractionEmbeddingCache | str | os.PathLike[str] | None | bool = None,
        k: int = DEFAULT_K,
        gamma: float = DEFAULT_GAMMA,
        min_rating: float | None = DEFAULT_MIN_RATING,
        template: str | InteractionTemplate = "persona4rec",
        transform: Callable[[np.ndarray], np.ndarray] | None = None,
        batch_size: int = 32,
    ) -> None:
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        if not (isinstance(gamma, (int, float)) and 0.0 < gamma <= 1.0):
            raise ValueError(f"gamma must be in (0, 1] (1 = plain mean), got {gamma!r}")
        if min_rating is not None and (not isinstance(min_rating, (int, float)) or math.isnan(min_rating)):
            raise ValueError(f"min_rating must be a number or None, got {min_rating!r}")
        if transform is not None and not callable(transform):
            raise TypeError("transform must be callable: float32 (d,) or (n, d) -> the same shape")
        self.encoder = encoder
        self.k, self.gamma, self.min_rating = k, float(gamma), min_rating
        self.template: InteractionTemplate = get_template(template) if isinstance(template, str) else template
        self.transform = transform
        self.batch_size = batch_size
        self.cache = self._open_cache(cache)
        self._weights = {n: recency_weights(n, self.gamma) for n in range(1, k + 1)}

    def _open_cache(self, cache: Any) -> InteractionEmbeddingCache:
        fingerprint, dim = self.encoder.fingerprint, self.encoder.dim
        if isinstance(cache, InteractionEmbeddingCache):
            if cache.fingerprint != fingerprint or cache.dim != dim:
                raise EncoderMismatchError(
                    f"the interaction cache holds vectors of encoder {cache.fingerprint} (dim {cache.dim}), "
                    f"the profiler's encoder is {fingerprint} (dim {dim}); give the profiler this encoder's cache."
                )
            return cache
        if cache is False:
            return InteractionEmbeddingCache(None, fingerprint=fingerprint, dim=dim)
        if cache is None or cache is True:
            cache = default_cache_dir() / "interactions" / fingerprint
        return InteractionEmbeddingCache(cache, fingerprint=fingerprint, dim=dim)

    # -- selection

    def _as_interaction(self, entry: HistoryEntry, position: int) -> Interaction:
        if isinstance(entry, Interaction):
            return entry
        if isinstance(entry, str):
            return Interaction(entry)
        if isinstance(entry, Mapping):
            try:
                return self.template(entry)
            except ValueError as exc:
                raise ValueError(f"history[{position}]: {exc}") from exc
        raise TypeError(
            f"history[{position}] is {type(entry).__name__}; expected an Interaction, a record mapping "
            "(rendered by the template) or a text"
        )

    def select(self, history: Iterable[HistoryEntry], user_id: Any = None) -> list[Interaction]:
        """The interactions the profile uses, oldest first (at most ``k``).

        Raises:
            EmptyHistoryError: nothing usable is left.
        """
        if isinstance(history, (str, bytes, Mapping)):
            raise TypeError("history must be a sequence of interactions, not a single one; wrap it in a list")
        interactions = [e if type(e) is Interaction else self._as_interaction(e, i) for i, e in enumerate(history)]
        given = len(interactions)
        if self.min_rating is not None:
            rated = [x for x in interactions if x.rating is None or x.rating >= self.min_rating]
        else:
            rated = interactions
        usable = [x for x in rated if x.text and not x.text.isspace()]
        if not usable:
            who = "" if user_id is None else f"user {user_id!r}: "
            raise EmptyHistoryError(
                f"{who}no usable interaction ({given} given, {given - len(rated)} rated below "
                f"{self.min_rating}, {len(rated) - len(usable)} with empty text); fall back to a "
                "non-personalised ranking",
                user_id=user_id,
                given=given,
                below_min_rating=given - len(rated),
                empty_text=len(rated) - len(usable),
            )
        timed = sum(x.timestamp is not None for x in usable)
        if timed == len(usable):
            usable.sort(key=_timestamp_of)  # stable: ties keep list order
        elif timed:
            raise ValueError(
                f"{timed} of {len(usable)} interactions have a timestamp; give every interaction one, "
                "or none (then list order is taken as oldest to newest)"
            )
        return usable[-self.k :]

    # -- profiles

    def _finish(self, mean: np.ndarray) -> np.ndarray:
        if self.transform is None and mean.ndim == 1:
            # one user, the online path: scalar checks are cheaper than array ones
            squared = float(mean @ mean)
            if not math.isfinite(squared) or squared < 1e-24:
                raise ValueError("the profile is not finite or has zero norm (corrupt cached vectors?)")
            return np.asarray(mean * np.float32(1.0 / math.sqrt(squared)))
        if self.transform is not None:
            transformed = np.asarray(self.transform(mean), dtype=np.float32)
            if transformed.shape != mean.shape:
                raise ValueError(f"transform returned shape {transformed.shape}, expected {mean.shape}")
            mean = transformed
        if not np.isfinite(mean).all():
            raise ValueError("the profile is not finite (check the transform)")
        norms = np.linalg.norm(mean, axis=-1, keepdims=True)
        if (norms < 1e-12).any():
            raise ValueError("the profile has zero norm (the transform maps it to 0?)")
        return np.ascontiguousarray(mean / norms, dtype=np.float32)

    def _rows_for(self, texts: list[str]) -> list[int]:
        """Cache rows of ``texts``, encoding (in one call) those not cached yet."""
        rows = self.cache.rows_of_texts(texts)
        if -1 in rows:
            missing = {texts[i]: None for i, row in enumerate(rows) if row < 0}  # distinct, in order
            batch = list(missing)
            vectors = self.encoder.encode(batch, batch_size=self.batch_size)
            self.cache.put([text_key(t) for t in batch], vectors)
            rows = self.cache.rows_of_texts(texts)
        return rows

    def profile(self, history: Iterable[HistoryEntry], *, user_id: Any = None) -> np.ndarray:
        """Profile vector of one user: float32 (dim,), unit L2 norm.

        Raises:
            EmptyHistoryError: the user has no usable interaction.
        """
        selected = self.select(history, user_id)
        rows = self._rows_for([x.text for x in selected])
        mean = self._weights[len(rows)] @ self.cache.gather(rows)
        return self._finish(mean)

    def profile_many(self, histories: Sequence[Iterable[HistoryEntry]], user_ids: Sequence[Any] | None = None) -> ProfileBatch:
        """Profiles of many users; new interactions of all users are encoded in one batch.

        Users without a usable interaction are listed in ``empty_positions`` instead of raising.
        """
        if user_ids is not None and len(user_ids) != len(histories):
            raise ValueError(f"{len(user_ids)} user_ids for {len(histories)} histories")
        selections: list[list[Interaction]] = []
        positions: list[int] = []
        empty: list[int] = []
        for position, history in enumerate(histories):
            try:
                selections.append(self.select(history, None if user_ids is None else user_ids[position]))
                positions.append(position)
            except EmptyHistoryError:
                empty.append(position)
        texts = [x.text for selected in selections for x in selected]
        rows = self._rows_for(texts) if texts else []
        means = np.empty((len(selections), self.encoder.dim), dtype=np.float32)
        start = 0
        for j, selected in enumerate(selections):
            user_rows = rows[start : start + len(selected)]
            means[j] = self._weights[len(selected)] @ self.cache.gather(user_rows)
            start += len(selected)
        vectors = self._finish(means) if len(selections) else means
        return ProfileBatch(vectors, np.asarray(positions, dtype=np.int64), np.asarray(empty, dtype=np.int64))

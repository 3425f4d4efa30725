"""The persona index file format and its reader/writer.

Layout (little-endian; every byte lies in a checksummed span)::

    0   fixed header, 64 bytes
          magic "P4RINDEX" | format version u32 | byte-order marker u32 (native order)
          | JSON offset u64 | JSON length u64 | file size u64 | checksum of the JSON span u64
          | reserved u64 (zero) | checksum of bytes 0..55 u64
    64  JSON header (UTF-8), zero padding to a 64-byte boundary
        sections, each starting on a 64-byte boundary, zero padding between them

The JSON header holds the format version, counts (items, personas, dimension), the id
kind, the encoder identity, the approximate-search graph's parameters, and for every
section its offset, length, dtype, shape and the checksum of its span (its bytes plus
the padding after it).

Format 2 (written now) keeps the approximate-search graph inside the file as sections
(``ann.*``), so the index and its graph are one atomic unit: a save is one temp file,
fsync, one rename and a directory fsync, and a reader maps one file once and never
opens a second one by path. Checksums are :func:`persona4rec._core.checksum64`, which
has no known cancelling pattern of flips. Format 1 (a ``.hnsw`` file beside the index,
the older checksum) is still read: its graph file is read once, checked, parsed and
validated like a format-2 graph.

Every problem with a file is an :class:`IndexFormatError` naming the section and its
byte offset; nothing else escapes the reader (a missing file is ``FileNotFoundError``).
No pickle anywhere.
"""

from __future__ import annotations

import json
import mmap as _mmap
import os
import re
import struct
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, Union

import numpy as np

from persona4rec.errors import IndexFormatError
from persona4rec._core import (
    MaxSimIndex,
    checksum64,
    checksum64_v1,
    find_duplicate_int,
    find_duplicate_string,
)

MAGIC = b"P4RINDEX"
FORMAT_VERSION = 2
SUPPORTED_VERSIONS = (1, 2)
_HEADER = struct.Struct("<8sI")  # magic, version; then the marker in native order
_MARKER = 0x0A0B0C0D
_FIXED = 64
_ALIGN = 64
_MAX_JSON = 1 << 26  # a header beyond 64 MiB is not one this writer produces
_TEXT_FIELDS = ("persona_id", "name", "description", "rationale")

__all__ = ["IndexFormatError", "StringColumn", "atomic_write", "fsync_dir", "load_index", "save_index",
           "sweep_temp_files"]


class StringColumn:
    """Many strings in two arrays (UTF-8 bytes + int64 offsets): cheap to save, map and slice."""

    __slots__ = ("data", "offsets")

    def __init__(self, data: np.ndarray, offsets: np.ndarray):
        self.data = data
        self.offsets = offsets

    @classmethod
    def from_list(cls, strings: list[str]) -> "StringColumn":
        encoded = [s.encode("utf-8") for s in strings]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        if encoded:
            np.cumsum([len(b) for b in encoded], out=offsets[1:])
        data = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()
        return cls(data, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        return self.data[self.offsets[i]:self.offsets[i + 1]].tobytes().decode("utf-8")

    def to_list(self) -> list[str]:
        raw = self.data.tobytes()
        off = self.offsets.tolist()
        return [raw[off[i]:off[i + 1]].decode("utf-8") for i in range(len(off) - 1)]

    def extended(self, strings: list[str]) -> "StringColumn":
        more = StringColumn.from_list(strings)
        return StringColumn(np.concatenate([self.data, more.data]),
                            np.concatenate([self.offsets, more.offsets[1:] + self.offsets[-1]]))


# Bytes a loader reads sections from: a read-only map of the file, or a copy of it.
Buffer = Union[_mmap.mmap, bytearray]


def _bytes_of(a: np.ndarray) -> memoryview | bytes:
    return memoryview(a).cast("B") if a.nbytes else b""  # type: ignore[arg-type]  # ndarray is a buffer


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


# ------------------------------------------------------------------ atomic writes
def fsync_dir(path: Path) -> None:
    """fsync a directory, so renames inside it are durable (best effort where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


_TEMP_PID = re.compile(r"\.(\d+)\.[^.]+\.tmp$")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def sweep_temp_files(path: Path) -> list[Path]:
    """Delete temp files of earlier saves of ``path`` whose writing process is gone
    (a kill during a save leaves one). Temp files of live writers are left alone."""
    path = Path(path)
    removed: list[Path] = []
    try:
        names = os.listdir(path.parent)
    except OSError:
        return removed
    prefix = _temp_prefix(path)
    legacy = f"{path.name}.hnsw.raw.tmp"  # the fixed temp name of format-1 graph saves
    for name in names:
        if name == legacy:
            try:
                os.unlink(path.parent / name)
                removed.append(path.parent / name)
            except OSError:
                pass
            continue
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        m = _TEMP_PID.search(name[len(prefix) - 1:])
        # Temp names without a pid come from writers older than this sweep: their
        # writers used one fixed name per save, so any such file is a leftover.
        if m is not None and _pid_alive(int(m.group(1))):
            continue
        try:
            os.unlink(path.parent / name)
            removed.append(path.parent / name)
        except OSError:
            pass
    return removed


def atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    """Call ``write(file)`` on a temp file beside ``path``, fsync it, rename it over
    ``path`` and fsync the directory: a kill at any point leaves the old or the new file.

    The temp name carries the writer's pid, so a later save can sweep what a killed
    writer left behind without touching a live writer's file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_temp_files(path)
    fd, tmp = tempfile.mkstemp(prefix=f"{_temp_prefix(path)}{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


# ------------------------------------------------------------------------ writer
def _sections_of(snapshot: Any) -> list[tuple[str, np.ndarray]]:
    s = snapshot
    removed = s.removed if s.removed is not None else np.zeros(s.n_items, dtype=np.uint8)
    out = [("codes", s.codes), ("scales", s.scales), ("offsets", s.offsets), ("removed", removed)]
    if s.id_kind == "str":
        out += [("ids.data", s.ids.data), ("ids.offsets", s.ids.offsets)]
    else:
        out += [("ids", s.ids)]
    if s.texts is not None:
        for name, col in s.texts.items():
            out += [(f"text.{name}.data", col.data), (f"text.{name}.offsets", col.offsets)]
    return out


def save_index(snapshot: Any, path: Path) -> None:
    """Write a snapshot (and its graph, if any) as one format-2 file, atomically."""
    path = Path(path)
    sections = [(name, np.ascontiguousarray(a)) for name, a in _sections_of(snapshot)]
    ann_meta = None
    if snapshot.ann is not None:
        ann_meta, ann_arrays = snapshot.ann.to_sections()
        sections += [(f"ann.{name}", np.ascontiguousarray(a)) for name, a in ann_arrays.items()]

    meta: dict[str, Any] = {
        "format": "persona4rec-index",
        "format_version": FORMAT_VERSION,
        "byteorder": sys.byteorder,
        "n_items": int(snapshot.n_items),
        "n_personas": int(snapshot.codes.shape[0]),
        "dim": int(snapshot.dim),
        "id_kind": snapshot.id_kind,
        "has_texts": snapshot.texts is not None,
        "encoder": snapshot.encoder,
        "ann": ann_meta,
        "sections": [],
    }
    # Offsets depend on the JSON length, which depends on the offsets: lay out with a
    # generous JSON budget, then pad the JSON to exactly that budget.
    entries = [{"name": n, "dtype": a.dtype.str, "shape": list(a.shape), "nbytes": int(a.nbytes)} for n, a in sections]
    meta["sections"] = entries
    budget = _align(len(json.dumps(meta).encode()) + 64 * len(entries) + 256)
    pos = _FIXED + budget
    for e in entries:
        e["offset"] = pos
        pos = _align(pos + e["nbytes"])
    last = entries[-1]
    file_size = last["offset"] + last["nbytes"]
    # Checksums cover each section's span: its bytes and the zero padding after it.
    for i, ((_, a), e) in enumerate(zip(sections, entries)):
        span_end = entries[i + 1]["offset"] if i + 1 < len(entries) else file_size
        e["checksum"] = _span_checksum(a, span_end - e["offset"] - e["nbytes"])
    js = json.dumps(meta, sort_keys=True).encode("utf-8")
    if len(js) > budget:  # pragma: no cover - the budget leaves room for every number
        raise RuntimeError("index header grew beyond its budget")
    json_span = js + b"\0" * (budget - len(js))
    head = _HEADER.pack(MAGIC, FORMAT_VERSION) + struct.pack("=I", _MARKER)
    head += struct.pack("<QQQQQ", _FIXED, len(js), file_size, checksum64(json_span), 0)
    head += struct.pack("<Q", checksum64(head))
    assert len(head) == _FIXED

    def write(f: BinaryIO) -> None:
        f.write(head)
        f.write(json_span)
        for i, ((_, a), e) in enumerate(zip(sections, entries)):
            assert f.tell() == e["offset"]
            f.write(_bytes_of(a))
            span_end = entries[i + 1]["offset"] if i + 1 < len(entries) else file_size
            f.write(b"\0" * (span_end - e["offset"] - e["nbytes"]))

    atomic_write(path, write)
    # A format-1 save left its graph beside the index; nothing refers to it any more.
    stale_graph = path.with_name(path.name + ".hnsw")
    try:
        os.unlink(stale_graph)
    except OSError:
        pass


def _span_checksum(a: np.ndarray, pad: int) -> int:
    if pad == 0:
        return checksum64(_bytes_of(a))
    return checksum64(a.tobytes() + b"\0" * pad)


# ------------------------------------------------------------------------ reader
def _fail(path: Path, what: str) -> IndexFormatError:
    return IndexFormatError(f"{path}: {what}")


def _expect(cond: bool, path: Path, what: str) -> None:
    if not cond:
        raise _fail(path, what)


def _checksum_fn(version: int) -> Callable[..., int]:
    return checksum64_v1 if version == 1 else checksum64


def _read_header(path: Path, buf: Buffer) -> tuple[dict[str, Any], int, int]:
    size = len(buf)
    if size < _FIXED:
        raise _fail(path, f"truncated: {size} bytes, but the fixed header alone needs {_FIXED}")
    head = bytes(buf[:_FIXED])
    magic, version = _HEADER.unpack_from(head)
    if magic != MAGIC:
        raise _fail(path, "not a persona4rec index file (bad magic bytes at offset 0)")
    if version not in SUPPORTED_VERSIONS:
        newer = version > max(SUPPORTED_VERSIONS)
        # A flipped bit in the version field reads as an unknown version: say both.
        raise _fail(path, f"format version {version} is {'newer than' if newer else 'not among'} the "
                          f"versions this persona4rec reads {SUPPORTED_VERSIONS}: "
                          + ("upgrade persona4rec" if newer else "re-save it with the version that wrote it")
                          + " (or the version field at offset 8 is corrupted)")
    checksum = _checksum_fn(version)
    (stored,) = struct.unpack_from("<Q", head, 56)
    if checksum(head[:56]) != stored:
        raise _fail(path, "the fixed header (offset 0-63) is corrupted (checksum mismatch)")
    (marker,) = struct.unpack_from("=I", head, 12)
    if marker != _MARKER:
        raise _fail(path, "written on a machine of the other byte order; rebuild the index on this machine")
    json_off, json_len, file_size, json_sum, _reserved = struct.unpack_from("<QQQQQ", head, 16)
    if file_size != size:
        raise _fail(path, f"truncated or extended: the header says {file_size} bytes, the file has {size}")
    if json_off != _FIXED or json_len == 0 or json_len > _MAX_JSON or json_off + json_len > size:
        raise _fail(path, f"the JSON header (offset {json_off}, {json_len} bytes) lies outside the file")
    try:
        js = bytes(buf[json_off:json_off + json_len]).decode("utf-8")
        meta = json.loads(js)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _fail(path, f"the JSON header at offset {json_off} is corrupted ({type(e).__name__})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("sections"), list) or not meta["sections"]:
        raise _fail(path, f"the JSON header at offset {json_off} has no section table")
    first = meta["sections"][0].get("offset") if isinstance(meta["sections"][0], dict) else None
    if not isinstance(first, int) or isinstance(first, bool) or first < json_off + json_len or first > size:
        raise _fail(path, "the first section lies outside the file")
    if checksum(memoryview(buf)[json_off:first]) != json_sum:
        raise _fail(path, f"the JSON header at offset {json_off} is corrupted (checksum mismatch)")
    if meta.get("format_version") != version:
        raise _fail(path, "the JSON header's version disagrees with the fixed header")
    return meta, size, version


def _int(x: Any) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError("not an integer")
    return x


def _sections(path: Path, buf: Buffer, meta: dict[str, Any], size: int, version: int, verify: bool
              ) -> dict[str, np.ndarray]:
    counts = [meta.get(k) for k in ("n_items", "n_personas", "dim")]
    ints = [x for x in counts if isinstance(x, int) and not isinstance(x, bool) and x >= 0]
    if len(ints) != 3 or ints[2] < 1:
        raise _fail(path, "the header's counts are missing or negative")
    n_items, n_personas, dim = ints
    expected = {
        "codes": ("|i1", [n_personas, dim]),
        "scales": ("<f4", [n_personas]),
        "offsets": ("<i8", [n_items + 1]),
        "removed": ("|u1", [n_items]),
        "ids": ("<i8", [n_items]),
        "ids.offsets": ("<i8", [n_items + 1]),
        "ids.data": ("|u1", None),
    }
    for f in _TEXT_FIELDS:
        expected[f"text.{f}.offsets"] = ("<i8", [n_personas + 1])
        expected[f"text.{f}.data"] = ("|u1", None)
    checksum = _checksum_fn(version)
    arrays: dict[str, np.ndarray] = {}
    entries = meta["sections"]
    previous_end = 0
    for i, e in enumerate(entries):
        _expect(isinstance(e, dict) and isinstance(e.get("name"), str), path, f"section {i} is malformed")
        name = e["name"]
        _expect(name not in arrays, path, f"section {name!r} appears twice")
        try:
            dtype = np.dtype(str(e["dtype"]))
            shape = [_int(x) for x in e["shape"]]
            offset, nbytes, stored = _int(e["offset"]), _int(e["nbytes"]), _int(e["checksum"])
            next_offset = _int(entries[i + 1]["offset"]) if i + 1 < len(entries) else size
        except (KeyError, TypeError, ValueError, IndexError):
            raise _fail(path, f"section {name!r} has a malformed entry") from None
        where = f"section {name!r} at offset {offset}"
        _expect(dtype.kind in "iuf" and not dtype.hasobject and dtype.str[0] in "<|", path,
                f"{where} has an unsupported dtype")
        _expect(len(shape) in (1, 2) and all(x >= 0 for x in shape), path, f"{where} has a malformed shape")
        count = 1
        for x in shape:
            count *= x
        _expect(count * dtype.itemsize == nbytes, path, f"{where}: its length does not match its shape")
        _expect(offset % _ALIGN == 0 and previous_end <= offset and offset + nbytes <= next_offset <= size, path,
                f"{where} lies outside the file or overlaps another section")
        previous_end = offset + nbytes
        if i + 1 == len(entries):
            _expect(offset + nbytes == size, path, "trailing bytes after the last section")
        if name in expected:
            want_dtype, want_shape = expected[name]
            _expect(dtype.str == want_dtype and (want_shape is None or shape == want_shape)
                    and (want_shape is not None or len(shape) == 1), path,
                    f"{where} has dtype {dtype.str} shape {shape}, expected {want_dtype} {want_shape or '[n]'}")
        if name != "codes" or verify:
            if checksum(memoryview(buf)[offset:next_offset]) != stored:
                raise _fail(path, f"{where} is corrupted (checksum mismatch)")
        arrays[name] = np.frombuffer(buf, dtype=dtype, count=count, offset=offset).reshape(shape)
    return arrays


def _string_column(path: Path, arrays: dict[str, np.ndarray], prefix: str, n: int) -> StringColumn:
    data, off = arrays.get(prefix + ".data"), arrays.get(prefix + ".offsets")
    if data is None or off is None:
        raise _fail(path, f"section {prefix!r} is missing")
    _expect(len(off) == n + 1 and (n + 1 == 0 or (off[0] == 0 and off[-1] == len(data)))
            and not np.any(np.diff(off) < 0), path, f"the string offsets of {prefix!r} are inconsistent")
    # Whole-buffer UTF-8 validity plus no string starting on a continuation byte means
    # every slice decodes: checked once here instead of failing at query time.
    try:
        data.tobytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise _fail(path, f"section {prefix + '.data'!r} holds invalid UTF-8 at byte {e.start}") from None
    starts = off[:-1][off[:-1] < len(data)]
    if len(starts) and np.any((data[starts] & 0xC0) == 0x80):
        raise _fail(path, f"section {prefix + '.offsets'!r} splits a UTF-8 character")
    return StringColumn(data, off)


def load_index(path: Path, *, mmap: bool = True, verify: bool = True) -> dict[str, Any]:
    """Read and validate an index file; returns its arrays and metadata.

    Every malformed file raises :class:`IndexFormatError`; ``verify=False`` skips only
    the checksum of the code payload.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such index file")
    try:
        return _load(path, mmap=mmap, verify=verify)
    except IndexFormatError:
        raise
    except (KeyError, TypeError, ValueError, OverflowError, RecursionError, IndexError, SyntaxError,
            UnicodeError, struct.error) as e:  # a malformed field the checks above did not name
        raise _fail(path, f"malformed index file ({type(e).__name__}: {e})") from None


def _load(path: Path, *, mmap: bool, verify: bool) -> dict[str, Any]:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise _fail(path, "truncated: the file is empty")
        buf: Buffer
        if mmap:
            buf = _mmap.mmap(f.fileno(), 0, access=_mmap.ACCESS_READ)
        else:
            buf = bytearray(size)
            f.readinto(buf)
    # Everything below reads `buf` only: one version of the file, whatever a concurrent
    # save renames into place meanwhile.
    meta, size, version = _read_header(path, buf)
    id_kind = meta.get("id_kind")
    _expect(id_kind in ("str", "int"), path, "the header's id kind is not 'str' or 'int'")
    arrays = _sections(path, buf, meta, size, version, verify)
    n_items, n_personas = meta["n_items"], meta["n_personas"]

    for need in ("codes", "scales", "offsets", "removed"):
        _expect(need in arrays, path, f"section {need!r} is missing")
    offsets = arrays["offsets"]
    _expect(offsets[0] == 0 and offsets[-1] == n_personas and not np.any(np.diff(offsets) < 0), path,
            "the item offsets are inconsistent (section 'offsets')")
    scales = arrays["scales"]
    _expect(bool(np.all(np.isfinite(scales))) and not np.any(scales < 0), path,
            "the scales section holds negative or non-finite values")
    codes = arrays["codes"]
    removed = arrays["removed"]
    _expect(not np.any(removed > 1), path, "the removed mask holds values other than 0 and 1")
    try:
        # Validates offsets, scales and codes in [-127, 127] (always, verify or not: a
        # -128 code breaks the exact SIMD paths), in one native pass.
        core = MaxSimIndex(codes, scales, offsets)
    except ValueError as e:
        raise _fail(path, f"section 'codes': {e}") from None

    if id_kind == "str":
        ids: Any = _string_column(path, arrays, "ids", n_items)
        dup = find_duplicate_string(ids.data, ids.offsets, removed)
    else:
        ids = arrays.get("ids")
        _expect(ids is not None, path, "section 'ids' is missing")
        dup = find_duplicate_int(ids, removed)
    # Removed items keep their slot; a re-added id is a new item with the same id: only
    # live ids must be unique.
    if dup >= 0:
        value = ids[dup] if id_kind == "str" else int(ids[dup])
        raise _fail(path, f"section 'ids' holds the live item id {value!r} twice (again at item {dup})")
    texts = None
    if meta.get("has_texts"):
        texts = {f: _string_column(path, arrays, f"text.{f}", n_personas) for f in _TEXT_FIELDS}

    ann = None
    if meta.get("ann"):
        a = meta["ann"]
        _expect(isinstance(a, dict), path, "the ANN entry is malformed")
        if version == 1:
            ann = _read_graph_file_v1(path, a)
        else:
            ann = {"meta": a, "arrays": {k[4:]: v for k, v in arrays.items() if k.startswith("ann.")},
                   "source": f"{path}: sections 'ann.*'"}
    return {
        "codes": codes,
        "scales": scales,
        "offsets": offsets,
        "removed": removed if removed.any() else None,
        "ids": ids,
        "core": core,
        "id_kind": id_kind,
        "texts": texts,
        "encoder": meta.get("encoder"),
        "ann": ann,
        "format_version": version,
    }


def _read_graph_file_v1(path: Path, a: dict[str, Any]) -> dict[str, Any]:
    """A format-1 graph file: read once and checked against the index header."""
    name = a.get("file")
    if not isinstance(name, str) or "/" in name or name in ("", ".", ".."):
        raise _fail(path, "the ANN entry names no graph file")
    graph_path = path.with_name(name)
    try:
        data = graph_path.read_bytes()
    except FileNotFoundError:
        raise _fail(graph_path, "the approximate-search graph file is missing") from None
    if len(data) != a.get("size"):
        raise _fail(graph_path, f"truncated or extended graph file ({len(data)} bytes, expected {a.get('size')})")
    if checksum64_v1(data) != a.get("checksum"):
        raise _fail(graph_path, "the graph file is corrupted (checksum mismatch)")
    # hnswlib's own file layout is parsed by the graph layer (persona4rec._ann).
    return {"meta": a, "hnswlib_file": data, "source": str(graph_path)}

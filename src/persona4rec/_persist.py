"""The persona index file format (version 1) and its reader/writer.

Layout (little-endian; every byte is covered by a checksum)::

    0   fixed header, 64 bytes
          magic "P4RINDEX" | format version u32 | byte-order marker u32 (native order)
          | JSON offset u64 | JSON length u64 | file size u64 | checksum of the JSON span u64
          | reserved u64 (zero) | checksum of bytes 0..55 u64
    64  JSON header (UTF-8), zero padding to a 64-byte boundary
        sections, each starting on a 64-byte boundary, zero padding between them

The JSON header holds the format version, counts (items, personas, dimension), the id
kind, the encoder identity, and for every section its offset, length, dtype, shape and
the checksum of its span (its bytes plus the padding after it). The reader checks the
fixed header, then the file size, then every count against the file size before it
maps or allocates anything, then the checksums. Writers go through a temp file, fsync
and an atomic rename. No pickle anywhere.

Checksums are :func:`persona4rec._core.checksum64`: any changed 8-byte word, hence any
single bit flip, is detected with certainty.
"""

from __future__ import annotations

import json
import mmap as _mmap
import os
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from persona4rec._core import checksum64

MAGIC = b"P4RINDEX"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)
_HEADER = struct.Struct("<8sI")  # magic, version; then the marker in native order
_MARKER = 0x0A0B0C0D
_FIXED = 64
_ALIGN = 64


class IndexFormatError(ValueError):
    """A persona index file that cannot be trusted: truncated, corrupted, or of another version."""


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


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _fsync_dir(path: Path) -> None:
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


def atomic_write(path: Path, write) -> None:
    """Call ``write(file)`` on a temp file beside ``path``, fsync it, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _sections_of(snapshot) -> list[tuple[str, np.ndarray]]:
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


def save_index(snapshot, path: Path) -> None:
    sections = [(name, np.ascontiguousarray(a)) for name, a in _sections_of(snapshot)]
    ann_meta = None
    if snapshot.ann is not None:
        ann_path = path.with_name(path.name + ".hnsw")
        ann_meta = snapshot.ann.save(ann_path)  # atomic; returns size, checksum, parameters
        ann_meta["file"] = ann_path.name

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
        pad = span_end - e["offset"] - e["nbytes"]
        e["checksum"] = _span_checksum(a, pad)
    js = json.dumps(meta, sort_keys=True).encode("utf-8")
    if len(js) > budget:  # pragma: no cover - the budget leaves room for every number
        raise RuntimeError("index header grew beyond its budget")
    json_span = js + b"\0" * (budget - len(js))
    head = _HEADER.pack(MAGIC, FORMAT_VERSION) + struct.pack("=I", _MARKER)
    head += struct.pack("<QQQQQ", _FIXED, len(js), file_size, checksum64(json_span), 0)
    head += struct.pack("<Q", checksum64(head))
    assert len(head) == _FIXED

    def write(f):
        f.write(head)
        f.write(json_span)
        for i, ((_, a), e) in enumerate(zip(sections, entries)):
            assert f.tell() == e["offset"]
            f.write(memoryview(a).cast("B") if a.nbytes else b"")
            span_end = entries[i + 1]["offset"] if i + 1 < len(entries) else file_size
            f.write(b"\0" * (span_end - e["offset"] - e["nbytes"]))

    atomic_write(path, write)


def _span_checksum(a: np.ndarray, pad: int) -> int:
    if pad == 0:
        return checksum64(memoryview(a).cast("B") if a.nbytes else b"")
    return checksum64(a.tobytes() + b"\0" * pad)


def _fail(path: Path, what: str) -> IndexFormatError:
    return IndexFormatError(f"{path}: {what}")


def _read_header(path: Path, buf) -> tuple[dict, int]:
    size = len(buf)
    if size < _FIXED:
        raise _fail(path, f"truncated: {size} bytes, but the fixed header alone needs {_FIXED}")
    head = bytes(buf[:_FIXED])
    magic, version = _HEADER.unpack_from(head)
    if magic != MAGIC:
        raise _fail(path, "not a persona4rec index file (bad magic bytes)")
    (stored,) = struct.unpack_from("<Q", head, 56)
    if checksum64(head[:56]) != stored:
        raise _fail(path, "the fixed header is corrupted (checksum mismatch)")
    if version not in SUPPORTED_VERSIONS:
        newer = version > max(SUPPORTED_VERSIONS)
        raise _fail(path, f"format version {version} is {'newer than' if newer else 'not among'} the versions "
                          f"this persona4rec reads {SUPPORTED_VERSIONS}: "
                          + ("upgrade persona4rec" if newer else "re-save it with the version that wrote it"))
    (marker,) = struct.unpack_from("=I", head, 12)
    if marker != _MARKER:
        raise _fail(path, "written on a machine of the other byte order; rebuild the index on this machine")
    json_off, json_len, file_size, json_sum, _reserved = struct.unpack_from("<QQQQQ", head, 16)
    if file_size != size:
        raise _fail(path, f"truncated or extended: the header says {file_size} bytes, the file has {size}")
    if json_off != _FIXED or json_len == 0 or json_off + json_len > size:
        raise _fail(path, "the JSON header lies outside the file")
    try:
        js = bytes(buf[json_off:json_off + json_len]).decode("utf-8")
        meta = json.loads(js)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(path, f"the JSON header is corrupted ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("sections"), list) or not meta["sections"]:
        raise _fail(path, "the JSON header has no section table")
    first = meta["sections"][0].get("offset") if isinstance(meta["sections"][0], dict) else None
    if not isinstance(first, int) or first < json_off + json_len or first > size:
        raise _fail(path, "the first section lies outside the file")
    if checksum64(memoryview(buf)[json_off:first]) != json_sum:
        raise _fail(path, "the JSON header is corrupted (checksum mismatch)")
    if meta.get("format_version") != version:
        raise _fail(path, "the JSON header's version disagrees with the fixed header")
    return meta, size


def _expect(cond: bool, path: Path, what: str) -> None:
    if not cond:
        raise _fail(path, what)


def load_index(path: Path, *, mmap: bool = True, verify: bool = True) -> dict:
    """Read and validate an index file; returns its arrays and metadata."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such index file")
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise _fail(path, "truncated: the file is empty")
        if mmap:
            buf = _mmap.mmap(f.fileno(), 0, access=_mmap.ACCESS_READ)
        else:
            buf = bytearray(size)
            f.readinto(buf)
    meta, size = _read_header(path, buf)

    n_items, n_personas, dim = meta.get("n_items"), meta.get("n_personas"), meta.get("dim")
    _expect(all(isinstance(x, int) and x >= 0 for x in (n_items, n_personas, dim)) and dim >= 1, path,
            "the header's counts are missing or negative")
    id_kind = meta.get("id_kind")
    _expect(id_kind in ("str", "int"), path, "the header's id kind is not 'str' or 'int'")

    expected_shapes = {
        "codes": ("|i1", [n_personas, dim]),
        "scales": ("<f4", [n_personas]),
        "offsets": ("<i8", [n_items + 1]),
        "removed": ("|u1", [n_items]),
        "ids": ("<i8", [n_items]),
        "ids.offsets": ("<i8", [n_items + 1]),
    }
    arrays: dict[str, np.ndarray] = {}
    entries = meta["sections"]
    for i, e in enumerate(entries):
        _expect(isinstance(e, dict) and isinstance(e.get("name"), str), path, f"section {i} is malformed")
        name = e["name"]
        try:
            dtype = np.dtype(e["dtype"])
            shape = [int(x) for x in e["shape"]]
            offset, nbytes, checksum = int(e["offset"]), int(e["nbytes"]), int(e["checksum"])
        except (KeyError, TypeError, ValueError):
            raise _fail(path, f"section {name!r} has a malformed entry") from None
        _expect(dtype.kind in "iuf" and not dtype.hasobject, path, f"section {name!r} has an unsupported dtype")
        _expect(all(x >= 0 for x in shape) and int(np.prod(shape, dtype=np.int64)) * dtype.itemsize == nbytes, path,
                f"section {name!r}: its length does not match its shape")
        span_end = int(entries[i + 1]["offset"]) if i + 1 < len(entries) else size
        _expect(offset % _ALIGN == 0 and offset + nbytes <= span_end <= size, path,
                f"section {name!r} lies outside the file or overlaps the next one")
        if i + 1 == len(entries):
            _expect(offset + nbytes == size, path, "trailing bytes after the last section")
        if name in expected_shapes:
            want_dtype, want_shape = expected_shapes[name]
            _expect(dtype.str == want_dtype and shape == want_shape, path,
                    f"section {name!r} has dtype {dtype.str} shape {shape}, expected {want_dtype} {want_shape}")
        if name != "codes" or verify:
            if checksum64(memoryview(buf)[offset:span_end]) != checksum:
                raise _fail(path, f"section {name!r} is corrupted (checksum mismatch)")
        count = nbytes // dtype.itemsize
        arrays[name] = np.frombuffer(buf, dtype=dtype, count=count, offset=offset).reshape(shape)

    for need in ("codes", "scales", "offsets", "removed"):
        _expect(need in arrays, path, f"section {need!r} is missing")
    offsets = arrays["offsets"]
    _expect(n_items + 1 == len(offsets) and offsets[0] == 0 and offsets[-1] == n_personas
            and not np.any(np.diff(offsets) < 0), path, "the item offsets are inconsistent")
    _expect(np.all(np.isfinite(arrays["scales"])) and not np.any(arrays["scales"] < 0), path,
            "the scales section holds invalid values")
    if verify:
        _expect(int(arrays["codes"].min(initial=0)) >= -127, path, "a code is -128, outside [-127, 127]")

    def column(prefix: str, n: int) -> StringColumn:
        data, off = arrays.get(prefix + ".data"), arrays.get(prefix + ".offsets")
        _expect(data is not None and off is not None, path, f"section {prefix!r} is missing")
        _expect(len(off) == n + 1 and off[0] == 0 and off[-1] == len(data) and not np.any(np.diff(off) < 0), path,
                f"the string offsets of {prefix!r} are inconsistent")
        return StringColumn(data, off)

    ids = column("ids", n_items) if id_kind == "str" else arrays.get("ids")
    _expect(ids is not None, path, "the ids section is missing")
    texts = None
    if meta.get("has_texts"):
        texts = {f: column(f"text.{f}", n_personas) for f in ("persona_id", "name", "description", "rationale")}
    removed = arrays["removed"]
    ann = None
    if meta.get("ann"):
        a = meta["ann"]
        _expect(isinstance(a, dict) and isinstance(a.get("file"), str), path, "the ANN entry is malformed")
        ann = dict(a, path=str(path.with_name(a["file"])))
    return {
        "codes": arrays["codes"],
        "scales": arrays["scales"],
        "offsets": offsets,
        "removed": removed if removed.any() else None,
        "ids": ids,
        "id_kind": id_kind,
        "texts": texts,
        "encoder": meta.get("encoder"),
        "ann": ann,
    }

"""Approximate search over persona vectors with hnswlib (the optional `ann` extra).

The graph indexes every persona row (label = row) by inner product over the dequantized
int8 vectors, so that graph and exact re-scoring see the same vectors.

Persistence: the graph travels inside the index file as sections (``ann.data_level0``,
``ann.link_lists``, ``ann.element_levels``) plus hnswlib's scalar parameters in the
JSON header. hnswlib trusts what it is given (a crafted link can make it read outside
its memory), so before a graph reaches hnswlib every structural fact it relies on is
checked here: sizes, levels, entry point, neighbour counts, neighbour ids in range and
present on the level they are linked at, labels a permutation of the persona rows. A
graph that fails is an :class:`IndexFormatError`, never a crash.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path
from typing import Any

import numpy as np

from persona4rec._persist import IndexFormatError
from persona4rec.kernels import dequantize

_MAX_LEVEL = 64  # hnswlib draws levels from an exponential law: real graphs stay below 20
_MAX_M = 1 << 12


def _hnswlib() -> Any:
    try:
        import hnswlib
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("approximate search needs hnswlib: pip install 'persona4rec[ann]'") from e
    return hnswlib


_SCALARS = ("offset_level0", "max_elements", "cur_element_count", "size_data_per_element", "label_offset",
            "offset_data", "max_level", "enterpoint_node", "max_M", "max_M0", "M", "mult", "ef_construction",
            "size_links_per_element")


class PersonaGraph:
    def __init__(self, graph: Any, M: int, ef_construction: int, ef: int, seed: int):
        self.graph = graph
        self.M, self.ef_construction, self.ef, self.seed = M, ef_construction, ef, seed
        self._current_ef = ef

    @classmethod
    def build(cls, codes: np.ndarray, scales: np.ndarray, *, M: int = 16, ef_construction: int = 100, ef: int = 128, seed: int = 0,
              n_threads: int = 1, chunk: int = 100_000) -> "PersonaGraph":
        if M < 2 or ef_construction < 1 or ef < 1:
            raise ValueError("M must be >= 2, ef_construction and ef >= 1")
        hnswlib = _hnswlib()
        n, d = codes.shape
        graph = hnswlib.Index(space="ip", dim=d)
        graph.init_index(max_elements=max(n, 1), ef_construction=ef_construction, M=M, random_seed=seed)
        graph.set_num_threads(n_threads)
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            graph.add_items(dequantize(codes[a:b], scales[a:b]), np.arange(a, b))
        graph.set_ef(ef)
        return cls(graph, M, ef_construction, ef, seed)

    def with_added(self, codes: np.ndarray, scales: np.ndarray, first_row: int) -> "PersonaGraph":
        """The same graph with new rows appended (hnswlib inserts incrementally)."""
        n_new = len(codes)
        total = first_row + n_new
        if total > self.graph.get_max_elements():
            self.graph.resize_index(max(total, 2 * self.graph.get_max_elements()))
        if n_new:
            self.graph.add_items(dequantize(codes, scales), np.arange(first_row, total))
        return self

    def rebuilt(self, codes: np.ndarray, scales: np.ndarray) -> "PersonaGraph":
        return PersonaGraph.build(codes, scales, M=self.M, ef_construction=self.ef_construction, ef=self.ef,
                                  seed=self.seed)

    def query(self, queries: np.ndarray, n_fetch: int, ef: int | None) -> np.ndarray:
        """Persona rows of the approximate nearest neighbours, (n_queries, n_fetch), -1 padded."""
        count = self.graph.get_current_count()
        if count == 0:
            return np.full((len(queries), n_fetch), -1, dtype=np.int64)
        want = max(ef or self.ef, n_fetch)
        if want != self._current_ef:
            self.graph.set_ef(want)
            self._current_ef = want
        k = min(n_fetch, count)
        labels, _ = self.graph.knn_query(queries, k=k, num_threads=1)
        out = np.full((len(queries), n_fetch), -1, dtype=np.int64)
        out[:, :k] = labels
        return out

    # ------------------------------------------------------------ persistence
    def to_sections(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The graph as JSON-able parameters and flat arrays (sections of the index file)."""
        state = self.graph.__getstate__()[0]
        cur = int(state["cur_element_count"])
        scalars: dict[str, Any] = {k: (float(state[k]) if k == "mult" else int(state[k])) for k in _SCALARS}
        meta: dict[str, Any] = {"M": self.M, "ef_construction": self.ef_construction, "ef": self.ef, "seed": self.seed,
                "hnswlib": scalars}
        arrays: dict[str, np.ndarray] = {
            "data_level0": np.asarray(state["data_level0"]).view(np.uint8)[: cur * scalars["size_data_per_element"]],
            "link_lists": np.asarray(state["link_lists"]).view(np.uint8),
            "element_levels": np.asarray(state["element_levels"], dtype=np.int32)[:cur],
        }
        return meta, arrays

    @classmethod
    def from_sections(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray], codes: np.ndarray,
                      scales: np.ndarray, *,
                      source: str = "index") -> "PersonaGraph":
        """Validate a stored graph against the index and hand it to hnswlib (which then owns a copy)."""
        state = validated_state(meta, arrays, n_rows=int(codes.shape[0]), dim=int(codes.shape[1]), source=source)
        hnswlib = _hnswlib()
        try:
            graph = hnswlib.Index(state)
        except (RuntimeError, ValueError, TypeError, KeyError) as e:
            raise IndexFormatError(f"{source}: hnswlib refused the graph ({e})") from None
        try:
            params = [int(meta["M"]), int(meta["ef_construction"]), int(meta["ef"]), int(meta.get("seed", 0))]
        except (KeyError, TypeError, ValueError):
            raise IndexFormatError(f"{source}: the graph's parameters are malformed") from None
        if not (2 <= params[0] <= _MAX_M and params[1] >= 1 and params[2] >= 1):
            raise IndexFormatError(f"{source}: the graph's parameters are out of range")
        g = cls(graph, *params)
        graph.set_ef(g.ef)
        return g


def _fail(source: str, what: str) -> IndexFormatError:
    return IndexFormatError(f"{source}: the approximate-search graph {what}")


def validated_state(meta: Any, arrays: dict[str, np.ndarray], *, n_rows: int, dim: int, source: str
                    ) -> dict[str, Any]:
    """hnswlib's state dict for a stored graph, after checking every fact hnswlib relies on."""
    if not isinstance(meta, dict) or not isinstance(meta.get("hnswlib"), dict):
        raise _fail(source, "has no parameters")
    raw = meta["hnswlib"]
    try:
        s = {k: int(raw[k]) for k in _SCALARS if k != "mult"}
        mult = float(raw["mult"])
    except (KeyError, TypeError, ValueError, OverflowError):
        raise _fail(source, "has malformed parameters") from None
    cur = s["cur_element_count"]
    M, max_m, max_m0 = s["M"], s["max_M"], s["max_M0"]
    links0 = 4 + 4 * max_m0
    expect = {
        "cur_element_count": n_rows,
        "offset_level0": 0,
        "max_M": M,
        "max_M0": 2 * M,
        "offset_data": links0,
        "label_offset": links0 + 4 * dim,
        "size_data_per_element": links0 + 4 * dim + 8,
        "size_links_per_element": 4 + 4 * max_m,
    }
    if not 2 <= M <= _MAX_M:
        raise _fail(source, f"has M={M}, outside [2, {_MAX_M}]")
    for k, want in expect.items():
        if s[k] != want:
            raise _fail(source, f"parameter {k}={s[k]} disagrees with the index (expected {want})")
    if not math.isclose(mult, 1.0 / math.log(M), rel_tol=1e-12):
        raise _fail(source, "parameter mult disagrees with M")
    if s["ef_construction"] < 1:
        raise _fail(source, "has ef_construction < 1")
    size = s["size_data_per_element"]
    data0 = arrays.get("data_level0")
    link_lists = arrays.get("link_lists")
    levels = arrays.get("element_levels")
    for name, a, dtype in (("data_level0", data0, np.uint8), ("link_lists", link_lists, np.uint8),
                           ("element_levels", levels, np.int32)):
        if a is None or a.ndim != 1 or a.dtype != dtype:
            raise _fail(source, f"section {name!r} is missing or has the wrong type")
    assert data0 is not None and link_lists is not None and levels is not None
    if len(data0) != cur * size:
        raise _fail(source, f"section 'data_level0' has {len(data0)} bytes, expected {cur * size}")
    if len(levels) != cur:
        raise _fail(source, f"section 'element_levels' has {len(levels)} entries, expected {cur}")
    if cur and (levels.min() < 0 or levels.max() > _MAX_LEVEL):
        raise _fail(source, f"has element levels outside [0, {_MAX_LEVEL}]")
    lv = levels.astype(np.int64)
    per_level = s["size_links_per_element"]
    if len(link_lists) != int(lv.sum()) * per_level:
        raise _fail(source, f"section 'link_lists' has {len(link_lists)} bytes, expected {int(lv.sum()) * per_level}")
    labels = np.zeros(0, dtype=np.uint64)
    if cur == 0:
        if s["max_level"] != -1:
            raise _fail(source, "is empty but has a top level")
    else:
        ep = s["enterpoint_node"]
        if not 0 <= ep < cur:
            raise _fail(source, f"has entry point {ep}, outside [0, {cur})")
        if s["max_level"] != int(lv.max()) or int(lv[ep]) != s["max_level"]:
            raise _fail(source, "has a top level that disagrees with its entry point or its elements")
        words = data0.view("<u4").reshape(cur, size // 4)
        head0 = words[:, 0]
        if np.any(head0 >> 16):  # the deletion mark and unused bits: this index never deletes
            raise _fail(source, "marks elements deleted or has a malformed level-0 link header")
        counts0 = head0.astype(np.int64)
        if np.any(counts0 > max_m0):
            raise _fail(source, f"has a level-0 neighbour count above {max_m0}")
        ids0 = words[:, 1:1 + max_m0]
        used0 = np.arange(max_m0)[None, :] < counts0[:, None]
        if np.any(ids0[used0] >= cur):
            raise _fail(source, "links to an element outside the graph on level 0")
        lo = words[:, s["label_offset"] // 4].astype(np.uint64)
        hi = words[:, s["label_offset"] // 4 + 1].astype(np.uint64)
        labels = lo | (hi << np.uint64(32))
        if np.any(labels >= np.uint64(n_rows)) or len(np.unique(labels)) != cur:
            raise _fail(source, "has labels that are not a permutation of the persona rows")
        if len(link_lists):
            blocks = link_lists.view("<u4").reshape(-1, 1 + max_m)
            owner_level = np.concatenate([np.arange(1, n + 1) for n in lv.tolist() if n > 0])
            head = blocks[:, 0]
            if np.any(head >> 16) or np.any(head.astype(np.int64) > max_m):
                raise _fail(source, f"has an upper-level neighbour count above {max_m} or a malformed header")
            used = np.arange(max_m)[None, :] < head.astype(np.int64)[:, None]
            ids = blocks[:, 1:][used].astype(np.int64)
            if np.any(ids >= cur):
                raise _fail(source, "links to an element outside the graph on an upper level")
            link_level = np.broadcast_to(owner_level[:, None], used.shape)[used]
            if np.any(lv[ids] < link_level):
                raise _fail(source, "links to an element on a level that element does not reach")
    full_levels = np.zeros(max(cur, 1), dtype=np.int32)
    full_levels[:cur] = levels
    return {
        "ser_version": 1, "space": "ip", "dim": dim, "index_inited": True, "ep_added": cur > 0,
        "normalize": False, "num_threads": 1, "seed": int(meta.get("seed", 0)) if isinstance(meta.get("seed", 0), int) else 0,
        "offset_level0": 0, "max_elements": max(cur, 1), "cur_element_count": cur,
        "size_data_per_element": size, "label_offset": s["label_offset"], "offset_data": s["offset_data"],
        "max_level": s["max_level"], "enterpoint_node": s["enterpoint_node"] if cur else 0,
        "max_M": max_m, "max_M0": max_m0, "M": M, "mult": mult, "ef_construction": s["ef_construction"],
        "ef": 10, "has_deletions": False, "size_links_per_element": per_level, "allow_replace_deleted": False,
        "label_lookup_external": labels.astype(np.uint64),
        "label_lookup_internal": np.arange(cur, dtype=np.uint32),
        "element_levels": full_levels,
        "data_level0": np.ascontiguousarray(data0).view(np.int8),
        "link_lists": np.ascontiguousarray(link_lists).view(np.int8),
    }


_V1_HEAD = struct.Struct("<QQQQQQiIQQQdQ")  # hnswlib's saveIndex header


def parse_hnswlib_file(data: bytes, path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """hnswlib's own file format (format-1 indexes kept the graph in one) as the scalar
    parameters and arrays that :func:`validated_state` checks."""
    if len(data) < _V1_HEAD.size:
        raise IndexFormatError(f"{path}: truncated graph file")
    (off0, max_el, cur, size, label_off, off_data, max_level, ep, max_m, max_m0, M, mult,
     efc) = _V1_HEAD.unpack_from(data, 0)
    pos = _V1_HEAD.size
    if cur > len(data) or size > len(data) or pos + cur * size > len(data):
        raise IndexFormatError(f"{path}: the graph file's element table lies outside the file")
    data0 = np.frombuffer(data, dtype=np.uint8, count=cur * size, offset=pos)
    pos += cur * size
    per_level = 4 + 4 * max_m
    levels = np.zeros(cur, dtype=np.int32)
    chunks = []
    for i in range(cur):
        if pos + 4 > len(data):
            raise IndexFormatError(f"{path}: the graph file ends inside element {i}'s links (offset {pos})")
        (n,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if n:
            if n % per_level or n // per_level > _MAX_LEVEL or pos + n > len(data):
                raise IndexFormatError(f"{path}: element {i}'s upper links are malformed (offset {pos - 4})")
            levels[i] = n // per_level
            chunks.append(np.frombuffer(data, dtype=np.uint8, count=n, offset=pos))
            pos += n
    if pos != len(data):
        raise IndexFormatError(f"{path}: trailing bytes after the graph (offset {pos})")
    scalars = {"offset_level0": off0, "max_elements": max_el, "cur_element_count": cur, "size_data_per_element": size,
               "label_offset": label_off, "offset_data": off_data, "max_level": max_level,
               "enterpoint_node": ep if cur else 0, "max_M": max_m, "max_M0": max_m0, "M": M, "mult": mult,
               "ef_construction": efc, "size_links_per_element": per_level}
    link_lists = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.uint8)
    return scalars, {"data_level0": data0, "link_lists": link_lists, "element_levels": levels}

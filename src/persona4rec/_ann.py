"""Approximate search over persona vectors with hnswlib (the optional `ann` extra).

The graph indexes every persona row (label = row) by inner product over the dequantized
int8 vectors, so that graph and exact re-scoring see the same vectors. The graph file is
written atomically beside the index and verified (size and checksum) before hnswlib
reads it: hnswlib itself trusts its input.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from persona4rec._core import checksum64
from persona4rec._persist import IndexFormatError, atomic_write
from persona4rec.kernels import dequantize


def _hnswlib():
    try:
        import hnswlib
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("approximate search needs hnswlib: pip install 'persona4rec[ann]'") from e
    return hnswlib


class PersonaGraph:
    def __init__(self, graph, M: int, ef_construction: int, ef: int, seed: int):
        self.graph = graph
        self.M, self.ef_construction, self.ef, self.seed = M, ef_construction, ef, seed
        self._current_ef = ef

    @classmethod
    def build(cls, codes, scales, *, M: int = 16, ef_construction: int = 100, ef: int = 128, seed: int = 0,
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

    def with_added(self, codes, scales, first_row: int) -> "PersonaGraph":
        """The same graph with new rows appended (hnswlib inserts incrementally)."""
        n_new = len(codes)
        total = first_row + n_new
        if total > self.graph.get_max_elements():
            self.graph.resize_index(max(total, 2 * self.graph.get_max_elements()))
        if n_new:
            self.graph.add_items(dequantize(codes, scales), np.arange(first_row, total))
        return self

    def rebuilt(self, codes, scales) -> "PersonaGraph":
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

    def save(self, path: Path) -> dict:
        tmp = path.with_name(path.name + ".raw.tmp")
        self.graph.save_index(str(tmp))
        try:
            data = tmp.read_bytes()
        finally:
            os.unlink(tmp)
        atomic_write(path, lambda f: f.write(data))
        return {"size": len(data), "checksum": checksum64(data), "M": self.M,
                "ef_construction": self.ef_construction, "ef": self.ef, "seed": self.seed}

    @classmethod
    def load(cls, meta: dict, codes, scales) -> "PersonaGraph":
        path = Path(meta["path"])
        if not path.is_file():
            raise IndexFormatError(f"{path}: the approximate-search graph file is missing")
        data = path.read_bytes()
        if len(data) != meta.get("size"):
            raise IndexFormatError(f"{path}: truncated or extended graph file ({len(data)} bytes, "
                                   f"expected {meta.get('size')})")
        if checksum64(data) != meta.get("checksum"):
            raise IndexFormatError(f"{path}: the graph file is corrupted (checksum mismatch)")
        hnswlib = _hnswlib()
        graph = hnswlib.Index(space="ip", dim=codes.shape[1])
        graph.load_index(str(path), max_elements=max(codes.shape[0], 1))
        if graph.get_current_count() != codes.shape[0]:
            raise IndexFormatError(f"{path}: the graph holds {graph.get_current_count()} vectors, "
                                   f"the index {codes.shape[0]}")
        g = cls(graph, int(meta["M"]), int(meta["ef_construction"]), int(meta["ef"]), int(meta.get("seed", 0)))
        graph.set_ef(g.ef)
        return g

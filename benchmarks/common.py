"""Synthetic persona catalogs and numpy float32 baselines shared by the core benchmarks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from persona4rec.kernels import MaxSimIndex, quantize


@dataclass
class Catalog:
    vectors: np.ndarray  # float32 (n_personas, d), L2-normalised
    codes: np.ndarray  # int8
    scales: np.ndarray  # float32
    offsets: np.ndarray  # int64, n_items + 1
    index: MaxSimIndex

    @property
    def n_items(self) -> int:
        return len(self.offsets) - 1


def make_catalog(n_items: int, personas: int, d: int, seed: int = 0, chunk: int = 65536) -> Catalog:
    """Random unit persona vectors, `personas` per item, quantized chunk by chunk."""
    rng = np.random.default_rng(seed)
    n = n_items * personas
    vectors = np.empty((n, d), dtype=np.float32)
    codes = np.empty((n, d), dtype=np.int8)
    scales = np.empty(n, dtype=np.float32)
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        block = rng.standard_normal((b - a, d), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        vectors[a:b] = block
        codes[a:b], scales[a:b] = quantize(block)
    offsets = np.arange(0, n + 1, personas, dtype=np.int64)
    return Catalog(vectors, codes, scales, offsets, MaxSimIndex(codes, scales, offsets))


def random_queries(n: int, d: int, seed: int = 1) -> np.ndarray:
    q = np.random.default_rng(seed).standard_normal((n, d), dtype=np.float32)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def numpy_rerank(vectors: np.ndarray, personas: int, query: np.ndarray, candidates: np.ndarray):
    """The float32 numpy way: gather, matrix-vector product, per-item max."""
    rows = (candidates[:, None] * personas + np.arange(personas)).reshape(-1)
    s = (vectors[rows] @ query).reshape(len(candidates), personas)
    best = s.argmax(axis=1)
    return s[np.arange(len(candidates)), best], candidates * personas + best


def numpy_topk(vectors: np.ndarray, offsets: np.ndarray, query: np.ndarray, k: int):
    """Float32 full scan: matrix-vector product, np.maximum.reduceat, argpartition."""
    s = vectors @ query
    item_scores = np.maximum.reduceat(s, offsets[:-1])
    top = np.argpartition(-item_scores, k)[:k]
    return top[np.argsort(-item_scores[top], kind="stable")]

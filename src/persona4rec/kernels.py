"""The native max-sim kernel layer: quantization, SIMD path control, grouped scoring.

Everything here is a thin layer over :mod:`persona4rec._core` (C++), which does the
work with the GIL released:

* :func:`quantize` turns float32 rows into int8 codes in [-127, 127] plus one float32
  scale per row (``x ~= codes * scales[:, None]``). Codes never take -128, which keeps
  every SIMD path exact.
* :class:`MaxSimIndex` holds int8 persona rows grouped by item in CSR form
  (``offsets[i]:offsets[i+1]`` are item ``i``'s personas) and answers
  ``score(item) = max_p (float(dot(q, v_p)) * q_scale) * scale_p`` for candidate lists
  (rerank) or as an exact fused top-k over the catalog. Queries are float32 and are
  quantized the same way inside the call.
* :func:`simd_info` tells which kernel path is active (``PERSONA4REC_SIMD`` forces one
  at import: ``scalar``, ``avx2``, ``avx512vnni``, ``neon``).

Quantization error bound (documented for callers comparing with float scores): for
L2-normalised ``q`` and ``v`` of dimension ``d`` with per-row scales ``s_q, s_v``
(each at most ``max|x| / 127``), ``|int8_score - float_score| <= s_q * ||v||_1 / 2 +
s_v * ||q||_1 / 2 + d * s_q * s_v / 4``; :func:`score_error_bound` computes it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np

from persona4rec._core import MaxSimIndex, dot_int8, quantize, set_simd, simd_info, stream_read

__all__ = [
    "MaxSimIndex",
    "dequantize",
    "dot_int8",
    "forced_simd",
    "lists_to_csr",
    "quantize",
    "score_error_bound",
    "set_simd",
    "simd_info",
    "stream_read",
]


def dequantize(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Float32 rows back from int8 codes and per-row scales."""
    return codes.astype(np.float32) * np.asarray(scales, dtype=np.float32)[:, None]


def score_error_bound(query: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Upper bound of ``|int8 score - float score|`` for one float query against float rows.

    Rounding moves every code by at most half a step, so with ``q = s_q (c_q + e_q)``
    and ``v = s_v (c_v + e_v)``, ``|e| <= 1/2`` per coordinate, the error of the dot
    product is bounded by the three cross terms below.
    """
    q = np.asarray(query, dtype=np.float64).reshape(-1)
    v = np.atleast_2d(np.asarray(vectors, dtype=np.float64))
    s_q = np.abs(q).max() / 127.0
    s_v = np.abs(v).max(axis=1) / 127.0
    d = q.shape[0]
    return np.asarray(s_q * np.abs(v).sum(axis=1) / 2 + s_v * np.abs(q).sum() / 2 + d * s_q * s_v / 4)


def lists_to_csr(lists: Sequence[Sequence[int] | np.ndarray], n_queries: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-query lists of item indices -> ``(offsets, items)`` int64 arrays (CSR)."""
    if len(lists) != n_queries:
        raise ValueError(f"expected one list per query ({n_queries}), got {len(lists)}")
    lengths = np.fromiter((len(x) for x in lists), dtype=np.int64, count=n_queries)
    offsets = np.zeros(n_queries + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    items = (
        np.concatenate([np.asarray(x, dtype=np.int64).reshape(-1) for x in lists])
        if offsets[-1] > 0
        else np.zeros(0, dtype=np.int64)
    )
    return offsets, np.ascontiguousarray(items)


@contextmanager
def forced_simd(name: str) -> Iterator[None]:
    """Run a block on one kernel path, then restore the previous one (tests, benchmarks).

    Changes a process-wide setting: do not use while other threads query.
    """
    previous = simd_info()["active"]
    set_simd(name)
    try:
        yield
    finally:
        set_simd(previous)
